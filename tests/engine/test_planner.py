"""`ds4-agent plan`: byte counts by component against hand calculations for the big presets, the cache
at 1M tokens, placement across two cards, hot experts in the VRAM left, predictions, and plans that
cannot fit refused with the shortfall and the ways out named."""

from __future__ import annotations

import json

import pytest

from ds4.engine.config import ModelConfig
from ds4.engine.planner import component_bytes, parse_gpus, parse_size, parse_tokens, plan
from ds4.engine.prediction import Hardware
from ds4.engine.presets import load_preset
from ds4.engine.sizing import cache_bytes, layer_cache_bytes
from tests.servers import run_cli

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
    n = result.hot_experts_per_layer  # the same in every layer: the tightest card has no room for one more
    assert result.hot_experts == 43 * n
    assert min((d.capacity - d.used) / len(d.layers) for d in (gpu0, gpu1)) < result.expert_bytes
    assert 1 < result.decode_tokens_per_s < 200 and result.prefill_tokens_per_s > 100
    faster = plan(config, "x", [24 * GB, 24 * GB, 24 * GB, 24 * GB], 512 * GB, context=131072)
    assert faster.hot_experts > result.hot_experts and faster.decode_tokens_per_s > result.decode_tokens_per_s


def test_an_impossible_plan_is_refused_with_the_shortfall_and_the_ways_out():
    run = run_cli(
        *"plan --model deepseek-v3 --gpu 24GB --gpu 24GB --ram 512GB --context 1M".split(), timeout=120
    )
    assert run.returncode == 1
    out = run.stdout
    assert "host RAM is 150.1 GB short" in out and "gpu0 is" in out and "GB short" in out
    assert "more host RAM: at least 663 GB" in out
    assert "4-bit experts (--experts fp4): host RAM fits" in out
    # the cache is the engine's bf16 latent rows: 73.7 GB at 1M tokens
    assert "a shorter context: up to" in out and "more GPUs: 5 of 24 GB" in out


def test_plan_json_has_the_predictions():
    run = run_cli(
        *"plan --model deepseek-v4-flash --gpu 24GB --gpu 24GB --ram 256GB --json".split(), timeout=120
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


def test_sizes_take_binary_and_decimal_units_and_gpu_counts():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("1.5TiB") == 1.5 * 2**40
    assert parse_size("1TB") == 1e12 and parse_size("512MB") == 512e6 and parse_size("64 gb") == 64e9
    assert parse_gpus(["80GB", "x4"]) == parse_gpus(["80GBx4"]) == parse_gpus(["4x80GB"]) == [80e9] * 4
    assert parse_gpus(["24GiB", "24GiB"]) == [24 * 2**30] * 2
    assert parse_gpus(["24GB x2", "48GB"]) == [24e9, 24e9, 48e9]
    for bad in (["lots"], ["24GB", "x"], ["24XB"], ["0x80GB"]):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_a_machine_with_vram_for_everything_places_every_expert_on_the_gpus():
    run = run_cli("plan", "--model", "deepseek-v4-flash", "--gpu", "80GB", "x4", "--json", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    gpus, ram = report["devices"][:-1], report["devices"][-1]
    assert report["fits"] and not report["experts_in_ram"] and len(gpus) == 4
    assert ram["weights"] == 0  # no expert in host RAM, and no --ram needed to say so
    assert sum(d["weights"] for d in gpus) > report["routed_expert_bytes"]
    assert report["hot_experts"] == report["total_experts"] == 43 * 256
    assert sorted(i for d in gpus for i in d["layers"]) == list(range(43)) and all(d["layers"] for d in gpus)
    split = ",".join(str(len(d["layers"])) for d in gpus)
    assert report["flags"] == [
        *("--device", "cuda:0", "--device", "cuda:1", "--device", "cuda:2", "--device", "cuda:3"),
        *("--layer-split", split),
    ]
    text = run_cli("plan", "--model", "deepseek-v4-flash", "--gpu", "80GB", "x4").stdout
    assert "every weight in VRAM" in text and f"run it with: {' '.join(report['flags'])}" in text


def test_two_24gib_cards_without_ram_report_the_ram_needed_and_the_hot_experts_per_layer():
    run = run_cli("plan", "--model", "deepseek-v4-flash", "--gpu", "24GiB", "x2")
    assert run.returncode == 0, run.stdout + run.stderr
    config = preset("deepseek-v4-flash")
    result = plan(config, "deepseek-v4-flash", [24 * 2**30] * 2)
    assert result.experts_in_ram and result.fits and not result.ram_checked
    n = result.hot_experts_per_layer
    assert 0 < n < 256 and result.hot_experts == n * 43
    assert result.devices[-1].weights == result.routed_expert_bytes
    assert f"--hot-experts {n}" in run.stdout and "(no --ram given)" in run.stdout


def test_the_printed_flags_passed_to_generate_give_the_planned_placement(tmp_path):
    """A tiny model on two small 'GPUs': the plan's flags, on CPU devices, build the engine it planned."""
    from ds4.agent.cli import build_parser
    from ds4.agent.cli.flags import device_kwargs
    from ds4.engine import LLM, SamplingParams
    from ds4.engine.planner import engine_flags
    from ds4.engine.random_checkpoint import init_checkpoint

    path = init_checkpoint("deepseek_v3", "tiny", tmp_path / "tiny")
    config = ModelConfig.from_dir(path)
    comps = component_bytes(config, "fp32", "fp32")
    per_layer = max(lay["experts"] for lay in comps["layers"]) / config.n_routed_experts  # one expert
    layers = sum(sum(lay.values()) - lay["experts"] for lay in comps["layers"])
    total = comps["embed"] + comps["head"] + layers
    hw = Hardware(gpu_reserve=0, ram_reserve=0, engine_chunk=0)
    card = total / 2 + comps["embed"] + 3 * per_layer  # the routed experts do not fit; 3 per layer do
    result = plan(config, "tiny", [card, card], 1e9, 64, 1, "fp32", "fp32", hw)
    assert result.fits and result.experts_in_ram and 0 < result.hot_experts_per_layer < 8
    flags = [f.replace("cuda:0", "cpu").replace("cuda:1", "cpu") for f in engine_flags(result)]
    args = build_parser().parse_args(["generate", "hi", "--model", str(path), *flags])
    llm = LLM(path, **device_kwargs(args))
    stages = llm.runner.pipeline.layer_stages
    assert [stages.count(k) for k in range(2)] == [len(d.layers) for d in result.devices[:2]]
    assert [t.capacity for t in llm.runner.tiered] == [result.hot_experts_per_layer] * 2  # 2 MoE layers
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    single = LLM(path).generate([[5, 6, 7]], greedy)[0].token_ids
    assert llm.generate([[5, 6, 7]], greedy)[0].token_ids == single


def test_measured_dispatch_per_layer_is_counted_in_the_decode_prediction():
    config = preset("deepseek-v4-flash")
    fast = plan(config, "x", [24 * GB] * 2, 512 * GB, hardware=Hardware())
    slow = plan(config, "x", [24 * GB] * 2, 512 * GB, hardware=Hardware(layer_dispatch=1e-3))
    step = 1 / slow.decode_tokens_per_s - 1 / fast.decode_tokens_per_s
    assert step == pytest.approx(config.num_hidden_layers * 1e-3)  # 43 layers at 1 ms each


def test_each_card_reserves_the_engines_prefill_workspace_at_the_context():
    """The reserve is what the engine checks at start-up: a chunk's activations at the full context
    (ds4.engine.workspace): bounded whatever the context, larger with a larger chunk."""
    from ds4.engine.workspace import prefill_workspace

    config = preset("deepseek-v3")
    short, long = (plan(config, "v3", [24e9] * 8, 512e9, context) for context in (4096, 131072))
    for result, context in ((short, 4096), (long, 131072)):
        workspace = prefill_workspace(config, 2048, context, 2)
        assert all(d.reserve == Hardware().gpu_reserve + workspace for d in result.devices[:8])
    assert long.devices[0].reserve == short.devices[0].reserve  # the blocked attention caps it
    bigger = plan(config, "v3", [24e9] * 8, 512e9, 131072, hardware=Hardware(engine_chunk=8192))
    assert bigger.devices[0].reserve > long.devices[0].reserve


def test_plan_can_time_the_cpu_expert_kernel_here_and_predict_the_experts_in_ram_with_it():
    import re

    args = ["plan", "--model", "deepseek-v3", "--gpu", "24GB", "x2", "--ram", "512GB", "--experts", "int4"]
    run = run_cli(*args, "--json", "--measure-cpu-experts", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    measured = float(re.search(r"CPU expert kernel here: ([\d.]+) GB/s \(int4\)", run.stderr).group(1))
    assert measured > 0
    hw = Hardware(ram_bandwidth=measured * 1e9, cpu_flops=float("inf"))  # the kernel's rate, compute included
    want = plan(preset("deepseek-v3"), "x", [24 * GB] * 2, 512 * GB, expert_format="int4", hardware=hw)
    assert json.loads(run.stdout)["decode_tokens_per_s"] == pytest.approx(want.decode_tokens_per_s, rel=0.05)


@pytest.mark.parametrize("name", ["deepseek-v3-tiny", "deepseek-v3.2-tiny", "deepseek-v4-tiny"])
def test_the_planned_cache_is_what_the_engine_allocates(name):
    """The planner counts the engine's own rows (model dtype; V4's indexer keys in float32), not DeepSeek's
    fp8 reference rows: a plan that fits is a cache the engine can allocate."""
    import torch

    from ds4.engine.cache import PagedLatentCache
    from ds4.engine.sizing import engine_layer_cache_bytes, paged_bytes
    from ds4.engine.window_cache import WindowCache

    config, blocks, block_size = preset(name), 6, 256
    for dtype in (torch.bfloat16, torch.float32):
        if config.is_v4:
            cache = WindowCache(config, blocks * block_size, dtype, "cpu", block_size, num_blocks=blocks)
            paged = sum(p.pages()[:blocks].nbytes for p in cache.compressors.values())
            window = sum(w[0].nbytes for w in cache.windows)  # one sequence's ring
        else:
            cache = PagedLatentCache(config, blocks, block_size, dtype, "cpu")
            paged = sum(t[: blocks * block_size].nbytes for t in cache.kv + (cache.index_k or []))
            window = 0
        assert paged == blocks * paged_bytes(config, block_size, dtype.itemsize) > 0
        context = blocks * block_size
        assert sum(engine_layer_cache_bytes(config, context, dtype.itemsize)) == paged + window
    fp8_rows = sum(layer_cache_bytes(config, context, "fp8"))
    assert sum(engine_layer_cache_bytes(config, context, 2)) > fp8_rows  # what the planner counted before
