"""`ModelConfig.from_hf` on DeepSeek config.json dicts (legacy and transformers 5 rope formats), its errors,
and YaRN rope frequencies / softmax scale against transformers' own."""

from __future__ import annotations

import pytest
import torch

from ds4.engine.config import ModelConfig
from ds4.engine.errors import ConfigError
from ds4.engine.layers.rope import inv_freq_and_attention_factor, softmax_scale

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# DeepSeek-V3's config.json as published (legacy rope_theta + rope_scaling, FP8 block quantization).
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": YARN,
    "attention_bias": False,
    "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
V32 = dict(V3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)


def _v5(cfg: dict) -> dict:
    """The same config in the transformers 5 format: `rope_parameters` holding rope_theta and rope_type."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    params = {k: v for k, v in cfg["rope_scaling"].items() if k != "type"}
    out["rope_parameters"] = dict(params, rope_type="yarn", rope_theta=float(cfg["rope_theta"]))
    return out


def test_legacy_v3_config_fields():
    cfg = ModelConfig.from_hf(V3)
    assert cfg.model_type == "deepseek_v3"
    assert cfg.num_hidden_layers == 61
    assert cfg.q_lora_rank == 1536
    assert cfg.kv_lora_rank == 512
    assert cfg.qk_head_dim == 192
    assert cfg.n_group == 8
    assert cfg.topk_group == 4
    assert cfg.routed_scaling_factor == 2.5
    assert cfg.gate_bias is True
    assert cfg.mlp_layer_types == ("dense",) * 3 + ("sparse",) * 58
    assert not cfg.is_moe_layer(2) and cfg.is_moe_layer(3)
    assert cfg.fp8_block_size == (128, 128)
    assert cfg.eos_token_ids == (1,)
    assert cfg.torch_dtype == "bfloat16"
    assert cfg.rope.kind == "yarn"
    assert cfg.rope.theta == 10000.0
    assert cfg.rope.factor == 40.0
    assert cfg.rope.original_max_position_embeddings == 4096
    assert cfg.rope.beta_fast == 32.0 and cfg.rope.beta_slow == 1.0
    assert cfg.rope.mscale == 1.0 and cfg.rope.mscale_all_dim == 1.0
    assert not cfg.has_indexer


def test_transformers5_rope_parameters_read_the_same():
    assert ModelConfig.from_hf(_v5(V3)) == ModelConfig.from_hf(V3)
    assert ModelConfig.from_hf(_v5(V3)).rope.kind == "yarn"


def test_no_quantization_config_means_no_fp8():
    cfg = {k: v for k, v in V3.items() if k != "quantization_config"}
    assert ModelConfig.from_hf(cfg).fp8_block_size is None


def test_v32_reads_indexer():
    cfg = ModelConfig.from_hf(V32)
    assert cfg.has_indexer
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)


def test_null_q_lora_rank_accepted_for_v3():
    assert ModelConfig.from_hf(dict(V3, q_lora_rank=None)).q_lora_rank is None


@pytest.mark.parametrize("q_lora_rank", ["absent", None])
def test_v32_without_q_lora_rank_is_config_error(q_lora_rank):
    cfg = {k: v for k, v in V32.items() if k != "q_lora_rank"}
    if q_lora_rank is None:
        cfg["q_lora_rank"] = None
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelConfig.from_hf(cfg)


def test_explicit_mlp_layer_types_win():
    kinds = ["dense", "sparse"] * 30 + ["dense"]
    cfg = ModelConfig.from_hf(dict(V3, mlp_layer_types=kinds))
    assert cfg.mlp_layer_types == tuple(kinds)


def test_mlp_layer_types_of_wrong_length_is_config_error():
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelConfig.from_hf(dict(V3, mlp_layer_types=["dense", "sparse"]))


def test_eos_token_id_list():
    assert ModelConfig.from_hf(dict(V3, eos_token_id=[1, 7])).eos_token_ids == (1, 7)


def test_missing_required_key_is_config_error_naming_it():
    cfg = {k: v for k, v in V3.items() if k != "kv_lora_rank"}
    with pytest.raises(ConfigError, match="'kv_lora_rank'"):
        ModelConfig.from_hf(cfg, source="ckpt/config.json")


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v2", None])
def test_unknown_model_type_names_it_and_supported_ones(model_type):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(dict(V3, model_type=model_type), source="ckpt/config.json")
    msg = str(info.value)
    assert repr(model_type) in msg
    assert "deepseek_v3" in msg and "deepseek_v32" in msg
    assert "ckpt/config.json" in msg


# A small geometry (so transformers' attention module builds fast) with V3's rope head sizes.
SMALL = dict(
    V3,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    vocab_size=256,
)
ROPES = {
    "v3": YARN,
    "mscale_differs": dict(YARN, factor=4, mscale=0.707, mscale_all_dim=1.0),
    "no_mscale": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048},
    "attention_factor": dict(YARN, factor=16, attention_factor=1.25, beta_fast=16, beta_slow=2),
}


@pytest.mark.parametrize("rope_name", list(ROPES))
def test_yarn_rope_and_softmax_scale_match_transformers(rope_name):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    raw = dict(SMALL, rope_scaling=ROPES[rope_name])
    ours = ModelConfig.from_hf(raw)
    hf_raw = _v5(raw)
    hf_raw.pop("quantization_config")
    hf_config = DeepseekV3Config(**hf_raw)
    assert hf_config.rope_parameters["rope_type"] == "yarn"

    inv_freq, attention_factor = inv_freq_and_attention_factor(ours.rope, ours.qk_rope_head_dim)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert inv_freq.dtype == hf_inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, hf_inv_freq)
    assert attention_factor == hf_attention_factor
    assert softmax_scale(ours.rope, ours.qk_head_dim) == DeepseekV3Attention(hf_config, 0).scaling
