"""Quantized checkpoints load as stored: FP8 / FP4 / int4 matrices keep the file's bytes in memory and are
dequantized inside each matmul (the torch path dequantizes per call; the Triton path tile by tile in
registers). Scores and greedy tokens match loading with `weights="dequantize"` (the same values, summed
in another order), for every family, on the torch path, through the kernels, and with experts moving
between hybrid tiers while they stay quantized."""

from __future__ import annotations

import pytest
import torch

from ds4 import kernels
from ds4.engine import LLM, SamplingParams
from ds4.engine.layers.quantized import QuantizedLinear
from ds4.engine.quantize import quantize_checkpoint
from ds4.engine.random_checkpoint import init_checkpoint

IDS = list(range(3, 40))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(5, 30)), list(range(100, 108))]
EXPERT_DTYPES = {"fp4": torch.int8, "int4": torch.uint8}  # two codes per byte


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v32", "deepseek_v4"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    init_checkpoint(request.param, "tiny", root / "src", seed=2)
    return root


def _quantized(root, experts: str):
    path = root / f"{experts}-fp8"
    if not path.exists():
        quantize_checkpoint(root / "src", path, experts, "fp8")
    return path


def _bytes(llm: LLM, stacks_only: bool = False) -> int:
    return sum(
        p.numel() * p.element_size()
        for name, p in llm.runner.model.named_parameters()
        if not stacks_only or ".experts." in name
    )


@pytest.mark.parametrize("experts", ["fp4", "int4", "fp8"])
def test_stored_weights_score_and_generate_like_dequantized_ones(family, experts):
    path = _quantized(family, experts)
    stored, loaded = LLM(path), LLM(path, weights="dequantize")
    assert stored.runner.quantized_modules > 0 and loaded.runner.quantized_modules == 0
    modules = list(stored.runner.model.modules())
    linears = [m for m in modules if isinstance(m, QuantizedLinear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    stacks = [m for m in modules if hasattr(m, "w13")]
    if experts in EXPERT_DTYPES:
        assert all(s.quant == experts and s.w13.dtype == EXPERT_DTYPES[experts] for s in stacks)
        # 4 bits a weight plus a scale per 32: well under a sixth of the float32 bytes
        assert _bytes(stored, stacks_only=True) < _bytes(loaded, stacks_only=True) / 6
    else:  # the tiny experts' 32-row intermediate straddles FP8's 128-row blocks once gate and up stack
        assert all(s.quant == "none" for s in stacks)
    assert _bytes(stored) < _bytes(loaded)
    want = loaded.score(IDS)
    torch.testing.assert_close(stored.score(IDS), want, atol=1e-5, rtol=1e-5)
    tokens = [o.token_ids for o in stored.generate(PROMPTS, GREEDY)]
    assert tokens == [o.token_ids for o in loaded.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("experts", ["fp4", "int4"])
def test_the_kernels_dequantize_stored_weights_inside_the_matmul(family, experts, monkeypatch):
    """Triton (the interpreter here) runs every quantized linear and every expert stack, from the
    stored bytes, and scores like the dequantized model on torch."""
    import ds4.kernels.moe as moe_kernels
    import ds4.kernels.quant_linear as linear_kernels

    calls = {"linear": set(), "moe": set()}
    real_linear, real_moe = linear_kernels.quant_linear, moe_kernels.fused_moe

    def linear_spy(x, weight, scale, quant, **kw):
        calls["linear"].add(quant)
        return real_linear(x, weight, scale, quant, **kw)

    def moe_spy(*args, quant="none", **kw):
        calls["moe"].add(quant)
        return real_moe(*args, quant=quant, **kw)

    monkeypatch.setattr(linear_kernels, "quant_linear", linear_spy)
    monkeypatch.setattr(moe_kernels, "fused_moe", moe_spy)
    path = _quantized(family, experts)
    ids = IDS[:16]
    want = LLM(path, weights="dequantize").score(ids)
    with kernels.forced(True):
        got = LLM(path).score(ids)
    assert calls == {"linear": {"fp8"}, "moe": {experts}}
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("devices", [None, ("cpu", "cpu")])
def test_hybrid_experts_move_between_tiers_quantized(family, devices):
    """Also with the layers split over two stages: each layer's hot experts on its own stage."""
    path = _quantized(family, "int4")
    single = [o.token_ids for o in LLM(path).generate(PROMPTS, GREEDY)]
    placement = {"devices": devices, "device": None} if devices else {}
    hybrid = LLM(path, hot_experts=2, hot_period=1, **placement)
    assert [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)] == single
    if devices:
        assert hybrid.runner.handoffs.num_handoffs > 0 and hybrid.runner.quantized_modules > 0
    tiers = hybrid.runner.tiered
    assert tiers and sum(t.stats["evicted"] for t in tiers) > 0
    hot = [w for t in tiers for weights in t.hot.values() for w in weights]
    assert hot and all(w.dtype in (torch.uint8, torch.bfloat16) for w in hot)  # codes and scales


def test_hot_quantized_experts_run_in_the_kernel(tmp_path, monkeypatch):
    """Tiered experts compute their hot pairs on the compute device: on the Triton path all of a pass's
    in the fused MoE kernel, over the hot stack. Their 4-bit codes go through the kernel, not a
    dequantized copy."""
    import ds4.kernels.moe as moe_kernels

    init_checkpoint("deepseek_v3", "tiny", tmp_path / "src", seed=2)
    path = _quantized(tmp_path, "int4")
    formats = []
    real = moe_kernels.fused_moe

    def spy(*args, **kw):
        formats.append(kw.get("quant", args[6] if len(args) > 6 else "none"))
        return real(*args, **kw)

    monkeypatch.setattr(moe_kernels, "fused_moe", spy)
    ids = IDS[:12]
    want = LLM(path, weights="dequantize").score(ids)
    with kernels.forced(True):
        hybrid = LLM(path, hot_experts=8, hot_period=1)  # every expert hot after the first pass
        hybrid.score(ids)
        assert all(len(t.hot) == 8 and t.device_hot for t in hybrid.runner.tiered)
        formats.clear()
        got = hybrid.score(ids)
    assert formats == ["int4"] * len(hybrid.runner.tiered)  # each layer's hot pairs, in one kernel
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_weights_setting_is_checked():
    from ds4.engine.config import EngineConfig

    with pytest.raises(ValueError, match="weights must be stored or dequantize"):
        EngineConfig(weights="fp4")


def test_the_cli_takes_the_weights_and_hot_experts_settings(tmp_path):
    import subprocess

    from tests.servers import EXE

    init_checkpoint("deepseek_v4", "tiny", tmp_path / "src", seed=2)
    path = _quantized(tmp_path, "int4")
    outputs = []
    for flags in ([], ["--weights", "dequantize"], ["--hot-experts", "2"]):
        run = subprocess.run(
            [EXE, "generate", "--model", str(path), "--max-tokens", "6", "--temperature", "0", *flags, "ab"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1] == outputs[2]  # greedy: the same text however the weights are held
    run = subprocess.run(
        [EXE, "generate", "--model", str(path), "--hot-experts", "-1", "ab"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "hot_experts must be >= 0" in run.stderr
