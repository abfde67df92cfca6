"""`ds4-agent plan`: byte counts by component against hand calculations for the big presets, the cache
at 1M tokens, placement across two cards, hot experts in the VRAM left, predictions, and plans that
cannot fit refused with the shortfall and the ways out named."""

from __future__ import annotations

import json
import subprocess

import pytest

from ds4.engine.config import ModelConfig
from ds4.engine.planner import component_bytes, layer_cache_bytes, parse_size, parse_tokens, plan
from ds4.engine.presets import load_preset
from ds4.engine.sizing import cache_bytes
from tests.servers import EXE

GB = 1e9
MIB = 1024 * 1024  # a 1M context is 1,048,576 tokens


def preset(name: str) -> ModelConfig:
    return ModelConfig.from_hf(load_preset(name), source=name)


def fp8(out_dim: int, in_dim: int) -> int:  # e4m3 bytes + a float32 scale per 128 x 128 block
    return out_dim * in_dim + 4 * -(-out_dim // 128) * -(-in_dim // 128)


def fp4(out_dim: int, in_dim: int) -> int:  # two e2m1 per byte + an e8m0 per 32 inputs
    return out_dim * in_dim // 2 + out_dim * (in_dim // 32)


@pytest.mark.parametrize(
    "name, fmt, moe_layers, experts, hidden, inter",
    [
        ("deepseek-v3", "fp8", 58, 256, 7168, 2048),  # 3 dense layers of 61
        ("deepseek-v4-flash", "fp4", 43, 256, 4096, 2048),
        ("deepseek-v4-pro", "fp4", 61, 384, 7168, 3072),
        ("deepseek-1t-a32b", "fp8", 60, 384, 7168, 2048),  # 1 dense layer of 61
    ],
)
def test_routed_expert_and_embedding_bytes_match_hand_calculations(
    name, fmt, moe_layers, experts, hidden, inter
):
    per = fp8 if fmt == "fp8" else fp4
    comps = component_bytes(preset(name), "fp8", fmt)
    want = moe_layers * experts * (per(2 * inter, hidden) + per(hidden, inter))  # w13 = [gate; up], w2
    assert sum(layer["experts"] for layer in comps["layers"]) == want
    assert comps["embed"] == 129280 * hidden * 2  # bf16
    assert comps["head"] >= 129280 * hidden * 2  # the head, plus the final norm (and V4's mixers)


def test_cache_at_one_million_tokens_by_hand():
    v3 = preset("deepseek-v3")
    per_layer = layer_cache_bytes(v3, MIB)
    assert per_layer == [MIB * (512 + 4 * 4 + 2 * 64)] * 61  # FlashMLA's 656-byte rows, every layer
    v32 = preset("deepseek-v3.2")
    assert sum(layer_cache_bytes(v32, MIB)) == 61 * MIB * (656 + 128 + 4)  # + fp8 indexer keys, one scale
    for name in ("deepseek-v4-flash", "deepseek-v4-pro"):
        config = preset(name)
        assert sum(layer_cache_bytes(config, MIB)) == cache_bytes(config, MIB)


def test_v4_flash_on_two_4090s_and_512_gb():
    config = preset("deepseek-v4-flash")
    result = plan(config, "deepseek-v4-flash", [24 * GB, 24 * GB], 512 * GB, context=parse_tokens("128K"))
    assert result.fits and result.expert_format == "fp4"
    gpu0, gpu1, ram = result.devices
    assert gpu0.layers[0] == 0 and gpu1.layers[-1] == config.num_hidden_layers - 1
    assert sorted(gpu0.layers + gpu1.layers) == list(range(config.num_hidden_layers))
    assert all(d.used <= d.capacity for d in (gpu0, gpu1, ram))
    assert ram.weights == result.routed_expert_bytes  # every routed expert in host RAM
    assert 0 < result.hot_experts < result.total_experts == 43 * 256
    assert gpu0.capacity - gpu0.used < result.expert_bytes  # the spare VRAM is full of hot experts
    assert 1 < result.decode_tokens_per_s < 200 and result.prefill_tokens_per_s > 100
    faster = plan(config, "x", [24 * GB, 24 * GB, 24 * GB, 24 * GB], 512 * GB, context=131072)
    assert faster.hot_experts > result.hot_experts and faster.decode_tokens_per_s > result.decode_tokens_per_s


def test_an_impossible_plan_is_refused_with_the_shortfall_and_the_ways_out():
    run = subprocess.run(
        [
            EXE,
            "plan",
            "--model",
            "deepseek-v3",
            "--gpu",
            "24GB",
            "--gpu",
            "24GB",
            "--ram",
            "512GB",
            "--context",
            "1M",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    out = run.stdout
    assert "host RAM is 150.1 GB short" in out and "gpu0 is" in out and "GB short" in out
    assert "more host RAM: at least 663 GB" in out
    assert "4-bit experts (--experts fp4): host RAM fits" in out
    assert "a shorter context: up to" in out and "more GPUs: 3 of 24 GB" in out


def test_plan_json_has_the_predictions():
    run = subprocess.run(
        [
            EXE,
            "plan",
            "--model",
            "deepseek-v4-flash",
            "--gpu",
            "24GB",
            "--gpu",
            "24GB",
            "--ram",
            "256GB",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["fits"] and report["decode_tokens_per_s"] > 0 and report["prefill_tokens_per_s"] > 0
    assert [d["name"] for d in report["devices"]] == ["gpu0", "gpu1", "ram"]


def test_sizes_and_contexts_parse():
    assert parse_size("24GB") == 24e9 and parse_size("1.5TB") == 1.5e12 and parse_size("512") == 512e9
    assert parse_tokens("1M") == MIB and parse_tokens("128K") == 131072 and parse_tokens("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")
