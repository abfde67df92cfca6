"""Checkpoint loading: broken checkpoints raise one CheckpointError naming the tensor and file; sharded,
MTP-carrying, FP8 and tied-embedding checkpoints load to the same logits as their plain equivalents."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds4.engine import LLM
from ds4.engine.errors import CheckpointError, ConfigError
from ds4.engine.quant import dequantize_fp4, dequantize_fp8_blocks
from ds4.engine.random_checkpoint import init_checkpoint
from ds4.engine.sampler import SamplingParams
from ds4.kernels import cpu_kernels

IDS = list(range(2, 22))  # 20 tokens: more than the V3.2 index_topk of 16
SHARD_BYTES = 100_000
SCALE = "_scale_inv"


def _init(tmp_path: Path, name: str = "ckpt", family: str = "deepseek_v3", **kwargs) -> Path:
    return init_checkpoint(family, "tiny", tmp_path / name, seed=0, **kwargs)


def _edit_tensors(path: Path, edit) -> None:
    """Applies `edit(state_dict)` to the single-file checkpoint at `path`."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _load_error(path: Path, error: type[Exception] = CheckpointError) -> str:
    with pytest.raises(error) as info:
        LLM(path)
    return str(info.value)


# -- broken checkpoints ----------------------------------------------------------------------------


def test_missing_tensor_names_param_and_checkpoint(tmp_path):
    path = _init(tmp_path)
    _edit_tensors(path, lambda sd: sd.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    msg = _load_error(path)
    assert "layers.1.attn.wkv_b.weight" in msg
    assert str(path) in msg
    assert "layers.0.attn.wkv_b.weight" not in msg


def test_missing_expert_slice_names_expert_tensor(tmp_path):
    path = _init(tmp_path)
    _edit_tensors(path, lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    msg = _load_error(path)
    assert "layers.1.ffn.experts.w13" in msg
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in msg


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    path = _init(tmp_path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _edit_tensors(path, lambda sd: sd.update({name: sd[name].t().contiguous()}))
    msg = _load_error(path)
    assert name in msg
    assert "model.safetensors" in msg
    assert "(32, 128)" in msg and "(128, 32)" in msg


def test_unexpected_tensor_names_tensor_and_file(tmp_path):
    path = _init(tmp_path)
    name = "model.layers.0.self_attn.bogus.weight"
    _edit_tensors(path, lambda sd: sd.update({name: torch.zeros(4, 4)}))
    msg = _load_error(path)
    assert name in msg
    assert "model.safetensors" in msg


def test_unsupported_dtype_names_tensor_file_and_dtype(tmp_path):
    path = _init(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_tensors(path, lambda sd: sd.update({name: sd[name].to(torch.int32)}))
    msg = _load_error(path)
    assert name in msg
    assert "model.safetensors" in msg
    assert "I32" in msg


@pytest.mark.parametrize("max_shard_bytes", [2 << 30, SHARD_BYTES], ids=["single", "sharded"])
def test_truncated_file_names_file(tmp_path, max_shard_bytes):
    path = _init(tmp_path, max_shard_bytes=max_shard_bytes)
    files = sorted(path.glob("*.safetensors"))
    victim = files[len(files) // 2]
    os.truncate(victim, victim.stat().st_size // 2)
    msg = _load_error(path)
    assert victim.name in msg
    assert "truncated" in msg


def test_index_listing_missing_shard_names_shard(tmp_path):
    path = _init(tmp_path, max_shard_bytes=SHARD_BYTES)
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    msg = _load_error(path)
    assert victim.name in msg
    assert "model.safetensors.index.json" in msg


def test_index_pointing_to_wrong_shard_names_tensor_and_shard(tmp_path):
    path = _init(tmp_path, max_shard_bytes=SHARD_BYTES)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.embed_tokens.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    msg = _load_error(path)
    assert name in msg
    assert wrong in msg


def test_unknown_model_type_is_config_error(tmp_path):
    path = _init(tmp_path)
    _edit_config(path, model_type="llama")
    msg = _load_error(path, ConfigError)
    assert "'llama'" in msg
    assert "deepseek_v3" in msg and "deepseek_v32" in msg
    assert "config.json" in msg


def test_fp8_weight_without_scale_names_both(tmp_path):
    path = _init(tmp_path, fp8=True)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _edit_tensors(path, lambda sd: sd.pop(name + SCALE))
    msg = _load_error(path)
    assert name + SCALE in msg
    assert f"FP8 tensor {name} in model.safetensors" in msg


def _scale_error(tmp_path: Path, name: str, scale: torch.Tensor) -> str:
    """The load error of an FP8 checkpoint given the tensor `name`: `scale`; it names the tensor and file."""
    path = _init(tmp_path, fp8=True)
    _edit_tensors(path, lambda sd: sd.update({name: scale}))
    msg = _load_error(path)
    assert name in msg
    assert "model.safetensors" in msg
    return msg


def test_fp8_scale_with_wrong_shape_names_scale_and_shapes(tmp_path):
    msg = _scale_error(tmp_path, "model.layers.1.self_attn.kv_b_proj.weight" + SCALE, torch.ones(2, 2))
    assert "(2, 2)" in msg and "(1, 1)" in msg


def test_scale_without_weight_is_unexpected(tmp_path):
    _scale_error(tmp_path, "model.layers.0.self_attn.bogus.weight" + SCALE, torch.ones(1, 1))


# -- checkpoints that load -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32"])
def test_sharded_checkpoint_scores_like_single_file(tmp_path, family):
    single = _init(tmp_path, "single", family)
    sharded = _init(tmp_path, "sharded", family, max_shard_bytes=SHARD_BYTES)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert torch.equal(LLM(sharded).score(IDS), LLM(single).score(IDS))


def test_mtp_layer_tensors_are_skipped(tmp_path):
    path = _init(tmp_path)
    expected = LLM(path).score(IDS)
    mtp = {
        "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(7, 5),  # shape irrelevant: never read
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),
        "model.layers.3.enorm.weight": torch.ones(64),
        "model.layers.3.shared_head.head.weight": torch.randn(512, 64),
    }
    _edit_tensors(path, lambda sd: sd.update(mtp))
    _edit_config(path, num_nextn_predict_layers=1)
    assert torch.equal(LLM(path).score(IDS), expected)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v32"])
def test_fp8_checkpoint_scores_like_dequantized_float(tmp_path, family):
    fp8 = _init(tmp_path, "fp8", family, fp8=True)
    ref = tmp_path / "ref"
    shutil.copytree(fp8, ref)
    tensors = load_file(ref / "model.safetensors")
    scale_names = [n for n in tensors if n.endswith(SCALE)]
    assert len(scale_names) > 10
    for scale_name in scale_names:
        name = scale_name.removesuffix(SCALE)
        assert tensors[name].dtype == torch.float8_e4m3fn
        tensors[name] = dequantize_fp8_blocks(tensors[name], tensors.pop(scale_name), (128, 128))
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(ref, quantization_config=None)
    with cpu_kernels(False):  # both through torch's products: the same bits where the values are the same
        got, want = LLM(fp8).score(IDS), LLM(ref).score(IDS)
    assert (got - want).abs().max().item() == 0.0
    assert torch.equal(got, want)


def test_tied_embeddings_without_lm_head(tmp_path):
    path = _init(tmp_path)
    embed = load_file(path / "model.safetensors")["model.embed_tokens.weight"]
    _edit_tensors(path, lambda sd: sd.pop("lm_head.weight"))
    _edit_config(path, tie_word_embeddings=True)
    llm = LLM(path)
    model = llm.runner.model
    assert torch.equal(model.embed.weight, embed)
    assert torch.equal(model.head.weight, embed)
    assert llm.score(IDS).isfinite().all()


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
    """transformers' in-memory layout ([E, 2I, D] gate_up_proj, [E, D, I] down_proj) is accepted too."""
    per_expert = _init(tmp_path, "per-expert")
    fused = _init(tmp_path, "fused")

    def fuse(sd):
        for layer in (1, 2):
            prefix = f"model.layers.{layer}.mlp.experts."
            num_experts = 8
            gate_up = [
                torch.cat([sd.pop(f"{prefix}{e}.gate_proj.weight"), sd.pop(f"{prefix}{e}.up_proj.weight")])
                for e in range(num_experts)
            ]
            down = [sd.pop(f"{prefix}{e}.down_proj.weight") for e in range(num_experts)]
            sd[prefix + "gate_up_proj"] = torch.stack(gate_up)
            sd[prefix + "down_proj"] = torch.stack(down)

    _edit_tensors(fused, fuse)
    ids = list(range(2, 30))
    assert torch.equal(LLM(fused).score(ids), LLM(per_expert).score(ids))


# -- DeepSeek-V4 checkpoints: reference names, `.scale` companions, FP4 routed experts -----------------


def _dequantized_reference(quantized: Path, ref: Path) -> int:
    """Copies `quantized` to `ref` with every scaled weight replaced by its float32 dequantization."""
    shutil.copytree(quantized, ref)
    tensors = load_file(ref / "model.safetensors")
    scales = [n for n in tensors if n.endswith(".scale") and n.removesuffix(".scale") + ".weight" in tensors]
    for scale_name in scales:
        name = scale_name.removesuffix(".scale") + ".weight"
        scale = tensors.pop(scale_name)
        if tensors[name].dtype == torch.float8_e4m3fn:
            tensors[name] = dequantize_fp8_blocks(tensors[name], scale, (128, 128))
        else:
            tensors[name] = dequantize_fp4(tensors[name], scale)
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(ref, quantization_config=None, expert_dtype=None)
    return len(scales)


def test_v4_fp4_experts_and_fp8_weights_score_like_their_dequantized_values(tmp_path):
    quantized = _init(tmp_path, "q", "deepseek_v4", fp8=True, fp4_experts=True)
    tensors = load_file(quantized / "model.safetensors")
    assert tensors["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert tensors["layers.1.ffn.experts.0.w1.scale"].dtype == torch.float8_e8m0fnu
    assert tensors["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert _dequantized_reference(quantized, tmp_path / "ref") > 20
    ids = list(range(2, 60))  # crosses several windows and compression blocks
    want = LLM(tmp_path / "ref").score(ids)
    assert torch.equal(LLM(quantized, weights="dequantize").score(ids), want)
    # kept as stored, dequantized in each matmul: the same values, summed in another order
    torch.testing.assert_close(LLM(quantized).score(ids), want, atol=1e-5, rtol=1e-5)


def test_v4_fp4_expert_without_scale_names_it(tmp_path):
    path = _init(tmp_path, "q", "deepseek_v4", fp4_experts=True)
    _edit_tensors(path, lambda sd: sd.pop("layers.2.ffn.experts.5.w2.scale"))
    msg = _load_error(path)
    assert "FP4 tensor layers.2.ffn.experts.5.w2.weight" in msg and "scale" in msg


def test_v4_fp4_scale_of_wrong_shape_names_both_shapes(tmp_path):
    path = _init(tmp_path, "q", "deepseek_v4", fp4_experts=True)
    name = "layers.1.ffn.experts.0.w3.scale"
    _edit_tensors(path, lambda sd: sd.__setitem__(name, sd[name][:, :1].contiguous()))
    msg = _load_error(path)
    assert name in msg and "one scale per 32 inputs" in msg


def test_v4_unsupported_config_field_is_named(tmp_path):
    path = _init(tmp_path, "v4", "deepseek_v4")
    _edit_config(path, attention_bias=True)
    msg = _load_error(path, ConfigError)
    assert "attention_bias" in msg


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v4"])
def test_dense_layers_on_the_cpu_take_the_kernel_with_torchs_results(tmp_path, family):
    """Loaded on the CPU, every dense layer (widths in groups of 32) holds its weight row by row for the C++
    kernel and runs in it at decode shapes; scores and greedy tokens match torch's products."""
    from ds4.engine.layers.linear import Linear

    path = _init(tmp_path, family=family)
    llm = LLM(path)
    dense = [m for m in llm.runner.model.modules() if isinstance(m, Linear)]
    assert dense and all(m.use_cpu_kernel and m.weight.is_contiguous() for m in dense)
    with cpu_kernels(False):
        torch_llm = LLM(path)
    assert not any(m.use_cpu_kernel for m in torch_llm.runner.model.modules() if isinstance(m, Linear))
    torch.testing.assert_close(llm.score(IDS), torch_llm.score(IDS), atol=1e-5, rtol=1e-5)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert llm.generate([IDS], greedy)[0].token_ids == torch_llm.generate([IDS], greedy)[0].token_ids


def test_dense_layers_under_the_kernels_minimum_stay_with_torch(tmp_path, monkeypatch):
    """By default only weights of 256 KB or more take the kernel (a call costs more than a small matrix
    saves): a tiny model's layers keep torch's input-major layout."""
    from ds4.engine.layers.linear import Linear, kernel_min_bytes

    monkeypatch.delenv("DS4_CPU_DENSE_MIN_BYTES")
    assert kernel_min_bytes() == 256 << 10
    llm = LLM(_init(tmp_path))
    dense = [m for m in llm.runner.model.modules() if isinstance(m, Linear)]
    assert dense and not any(m.use_cpu_kernel for m in dense)
    assert all(m.weight.stride()[0] == 1 for m in dense)  # input-major, for MKL's matrix-vector products
