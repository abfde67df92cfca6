"""`ds4-agent model info` arithmetic: parameter totals of the real presets against DeepSeek's published
figures, and cache sizes at 1M tokens against hand calculations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds4.engine.config import ModelConfig
from ds4.engine.presets import load_preset, preset_names
from ds4.engine.sizing import cache_bytes, param_counts, weight_bytes

M = 1 << 20  # a 1M-token context


def config(name: str) -> ModelConfig:
    return ModelConfig.from_hf(load_preset(name), source=name)


@pytest.mark.parametrize(
    "name, total, active",
    [
        ("deepseek-v3", 671e9, 37e9),
        ("deepseek-v4-flash", 284e9, 13e9),
        ("deepseek-v4-pro", 1.6e12, 49e9),
        ("deepseek-1t-a32b", 1.0e12, 32e9),
    ],
)
def test_parameter_totals_match_published_figures(name, total, active):
    counts = param_counts(config(name))
    assert abs(counts["params_total"] / total - 1) < 0.02 + (0.015 if name == "deepseek-1t-a32b" else 0)
    # "13B" for V4-Flash is a rounded figure: ds4 counts 13.27B (every matmul a token runs, one embedding row)
    assert abs(counts["params_active"] / active - 1) < (0.025 if name == "deepseek-v4-flash" else 0.02)


def test_v3_cache_at_1m_tokens_by_hand():
    # 61 layers x (512 latent + 64 rope) per token; fp8: 512 bytes + 4 float32 scales + 64 bf16 rope = 656 B
    cfg = config("deepseek-v3")
    assert cache_bytes(cfg, M, "bf16") == 61 * 576 * 2 * M
    assert cache_bytes(cfg, M, "fp8") == 61 * 656 * M


def test_v32_cache_adds_the_indexer_keys_by_hand():
    cfg = config("deepseek-v3.2")
    assert cache_bytes(cfg, M, "fp8") == 61 * (656 + 128 + 4) * M


def test_v4_flash_cache_at_1m_tokens_by_hand():
    # 43 layers: 2 heavily compressed, then alternating HCA/CSA -> 23 HCA + 20 CSA. Row: 448 fp8 + 4 scales
    # x 4 bytes + 64 bf16 rope = 592 B. Each layer keeps a 128-row window; CSA keeps 1M/4 rows plus as many
    # 132-byte indexer keys, HCA 1M/128 rows.
    cfg = config("deepseek-v4-flash")
    assert cfg.layer_types.count("compressed_sparse_attention") == 20
    expected = 43 * 128 * 592 + 20 * (M // 4) * (592 + 132) + 23 * (M // 128) * 592
    assert cache_bytes(cfg, M, "fp8") == expected
    assert 3.5e9 < expected < 4.5e9  # "about 4 GB at 1M tokens"


def test_v4_pro_cache_is_about_6gb_and_a_tenth_of_v32():
    pro = cache_bytes(config("deepseek-v4-pro"), M, "fp8")
    assert 5e9 < pro < 6.5e9
    assert pro < 0.15 * cache_bytes(config("deepseek-v3.2"), M, "fp8")


def test_fp4_experts_shrink_the_weights():
    sizes = weight_bytes(config("deepseek-v4-flash"))
    assert sizes["fp8+fp4-experts"] < 0.6 * sizes["fp8"]
    assert sizes["fp8"] < 0.52 * sizes["bf16"]
    assert 140e9 < sizes["fp8+fp4-experts"] < 170e9  # DESIGN.md: ~160 GB with FP4 experts


def test_every_preset_parses():
    for name in preset_names():
        assert param_counts(config(name))["params_total"] > 0


def test_model_info_cli_json(tmp_path):
    exe = Path(sys.executable).parent / "ds4-agent"
    out = subprocess.run(
        [exe, "model", "info", "deepseek-v4-pro", "--json"], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    assert info["params_total"] == param_counts(config("deepseek-v4-pro"))["params_total"]
    assert info["cache_bytes"]["fp8"]["1M"] == cache_bytes(config("deepseek-v4-pro"), M, "fp8")


def test_model_info_reads_a_checkpoint_folder(tiny_v3):
    exe = Path(sys.executable).parent / "ds4-agent"
    out = subprocess.run(
        [exe, "model", "info", str(tiny_v3), "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["model_type"] == "deepseek_v3"


def test_model_info_unknown_preset_is_a_clear_error():
    exe = Path(sys.executable).parent / "ds4-agent"
    out = subprocess.run([exe, "model", "info", "deepseek-v9"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown preset 'deepseek-v9'" in out.stderr and "deepseek-v4-flash" in out.stderr
