"""Hugging Face config.json -> `ModelConfig`'s fields: the only module that knows its key names and
defaults (V3 / V3.2 and V4, with the rope and Engram readers they share). Builds no model and checks no
runtime knob; `ModelConfig.from_hf` is its one caller."""

from __future__ import annotations

from ds4.engine.config import EngramConfig, RopeConfig
from ds4.engine.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v4")
V4_ATTENTION_KINDS = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}

# Fields of a V4 config.json that would change the computation in ways ds4 does not implement yet.
V4_UNSUPPORTED = {
    "attention_bias": lambda v: bool(v),
    "mlp_bias": lambda v: bool(v),
    "hidden_act": lambda v: v != "silu",
    "num_key_value_heads": lambda v: v not in (None, 1),
    "n_shared_experts": lambda v: v not in (None, 1),
    "expert_dtype": lambda v: v not in (None, "bf16", "bfloat16", "fp8", "fp4"),
}


def model_fields(cfg: dict, source: str) -> dict:
    """`ModelConfig`'s fields from a config.json's dict; `source` names it in errors."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"ds4 runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "deepseek_v4":
        return _v4_fields(cfg, source)
    return _v3_fields(cfg, source, model_type)


def _v3_fields(cfg: dict, source: str, model_type: str) -> dict:
    """DeepSeek-V3 and V3.2: MLA (V3.2 with its lightning indexer), grouped-routed MoE."""
    need = _needer(cfg, source, model_type)
    common = _common_fields(cfg, source, need)
    num_layers, heads = common["num_hidden_layers"], common["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ConfigError(f"{source}: MLA needs num_key_value_heads == num_attention_heads, got {kv_heads}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (DeepSeek uses 'silu')")

    n_routed = int(cfg.get("n_routed_experts") or 0)
    n_group = int(cfg.get("n_group") or 1)
    if n_routed and n_routed % n_group:
        raise ConfigError(f"{source}: n_routed_experts {n_routed} is not divisible by n_group {n_group}")
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        raise ConfigError(f"{source}: scoring_func {scoring!r} is not supported (sigmoid or softmax)")

    q_lora_rank = cfg.get("q_lora_rank")
    if model_type == "deepseek_v32" and q_lora_rank is None:
        raise ConfigError(f"{source}: deepseek_v32's indexer reads the query latent; q_lora_rank is needed")

    indexer = {}
    if model_type == "deepseek_v32":
        indexer = dict(
            index_n_heads=int(need("index_n_heads")),
            index_head_dim=int(need("index_head_dim")),
            index_topk=int(need("index_topk")),
        )
        if indexer["index_head_dim"] < int(need("qk_rope_head_dim")):
            raise ConfigError(f"{source}: index_head_dim must be at least qk_rope_head_dim")

    max_pos = int(cfg.get("max_position_embeddings", 4096))
    return dict(
        model_type=model_type,
        **common,
        q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        intermediate_size=int(need("intermediate_size")),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        n_routed_experts=n_routed,
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        n_group=n_group,
        topk_group=int(cfg.get("topk_group") or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        scoring_func=scoring,
        gate_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
        mlp_layer_types=_mlp_layer_types(cfg, num_layers, n_routed, source),
        rope=_rope_config(cfg, max_pos),
        rope_interleave=bool(cfg.get("rope_interleave", True)) or model_type == "deepseek_v32",
        max_position_embeddings=max_pos,
        attention_bias=bool(cfg.get("attention_bias", False)),
        extra={k: v for k, v in cfg.items() if k.startswith("ds4_")},
        **indexer,
    )


def _needer(cfg: dict, source: str, model_type: str):
    """need(key): the config's value, or a ConfigError naming the missing key."""

    def need(key):
        if cfg.get(key) is None:
            raise ConfigError(f"{source}: {model_type} needs {key!r}, which is missing")
        return cfg[key]

    return need


def _common_fields(cfg: dict, source: str, need) -> dict:
    """The fields every family reads the same way: sizes, norms, special tokens, storage."""
    quant = cfg.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: quantization {quant.get('quant_method')!r} is not supported (fp8)")
    eos = cfg.get("eos_token_id", 1)
    return dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=int(need("num_attention_heads")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id", 0),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        fp8_block_size=tuple(quant.get("weight_block_size") or (128, 128)) if quant else None,
        int4_experts=(cfg.get("ds4_quantization") or {}).get("experts") == "int4",
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
    )


def _mlp_layer_types(cfg: dict, num_layers: int, n_routed: int, source: str) -> tuple[str, ...]:
    """ "dense" or "sparse" (MoE) per layer, from `mlp_layer_types` or `first_k_dense_replace`."""
    if cfg.get("mlp_layer_types") is not None:
        kinds = tuple(cfg["mlp_layer_types"])
        if len(kinds) != num_layers or not set(kinds) <= {"dense", "sparse"}:
            raise ConfigError(
                f"{source}: mlp_layer_types must list 'dense'/'sparse' for each of {num_layers} layers"
            )
    else:
        first_dense = int(cfg.get("first_k_dense_replace", 3))
        freq = int(cfg.get("moe_layer_freq", 1))
        kinds = tuple("sparse" if i >= first_dense and i % freq == 0 else "dense" for i in range(num_layers))
    if "sparse" in kinds and not n_routed:
        raise ConfigError(f"{source}: MoE layers need n_routed_experts")
    return kinds


def _rope_config(cfg: dict, max_pos: int) -> RopeConfig:
    """Reads `rope_parameters` (transformers 5) or the legacy `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"rope type {kind!r} is not supported (default or yarn)")
    if kind == "default":
        return RopeConfig(theta=theta)
    orig = int(params.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=float(factor) if factor is not None else max_pos / orig,
        original_max_position_embeddings=orig,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _v4_fields(cfg: dict, source: str) -> dict:
    """DeepSeek-V4: one shared K=V head, windowed + compressed attention, mHC, hash-routed MoE."""
    for key, unsupported in V4_UNSUPPORTED.items():
        if key in cfg and unsupported(cfg[key]):
            raise ConfigError(f"{source}: deepseek_v4 with {key}={cfg[key]!r} is not supported by ds4 yet")

    need = _needer(cfg, source, "deepseek_v4")
    common = _common_fields(cfg, source, need)
    num_layers = common["num_hidden_layers"]
    head_dim = int(need("head_dim"))
    factor = cfg.get("partial_rotary_factor")
    rope_dim = (
        int(cfg["qk_rope_head_dim"]) if cfg.get("qk_rope_head_dim") else int(head_dim * (factor or 0.125))
    )
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise ConfigError(
            f"{source}: the rope slice ({rope_dim} of head_dim {head_dim}) must be even and fit"
        )
    layer_types = _v4_layer_types(cfg, num_layers, source)
    rates = dict(cfg.get("compress_rates") or {})
    for kind, legacy in (
        ("compressed_sparse_attention", "compress_rate_csa"),
        ("heavily_compressed_attention", "compress_rate_hca"),
    ):
        rates.setdefault(kind, cfg.get(legacy) or V4_ATTENTION_KINDS[kind])
    rates["sliding_attention"] = 0
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = int(cfg.get("num_hash_layers", 3))
        mlp_types = ["hash_moe"] * min(num_layers, n_hash) + ["moe"] * max(0, num_layers - n_hash)
    mlp_types = tuple(mlp_types)
    if len(mlp_types) != num_layers or not set(mlp_types) <= {"hash_moe", "moe"}:
        raise ConfigError(
            f"{source}: mlp_layer_types must list 'hash_moe'/'moe' for each of {num_layers} layers"
        )
    scoring = cfg.get("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise ConfigError(
            f"{source}: scoring_func {scoring!r} is not supported (sqrtsoftplus, sigmoid, softmax)"
        )
    main_rope, compress_rope = _v4_ropes(cfg)
    return dict(
        model_type="deepseek_v4",
        **common,
        q_lora_rank=int(need("q_lora_rank")),
        kv_lora_rank=0,
        qk_nope_head_dim=head_dim - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=head_dim,
        intermediate_size=0,
        moe_intermediate_size=int(need("moe_intermediate_size")),
        n_routed_experts=int(need("n_routed_experts")),
        n_shared_experts=1,
        num_experts_per_tok=int(need("num_experts_per_tok")),
        n_group=1,
        topk_group=1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
        norm_topk_prob=True,
        scoring_func=scoring,
        gate_bias=True,
        mlp_layer_types=mlp_types,
        rope=main_rope,
        rope_interleave=True,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 1 << 20)),
        index_n_heads=int(need("index_n_heads")),
        index_head_dim=int(need("index_head_dim")),
        index_topk=int(need("index_topk")),
        head_dim=head_dim,
        sliding_window=int(need("sliding_window")),
        layer_types=layer_types,
        compress_ratios=tuple(int(rates[kind]) for kind in layer_types),
        compress_rope=compress_rope,
        o_groups=int(need("o_groups")),
        o_lora_rank=int(need("o_lora_rank")),
        hc_mult=int(cfg.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(cfg.get("hc_eps", 1e-6)),
        swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
        engram=_engram_config(cfg, num_layers, source),
    )


def _engram_config(cfg: dict, num_layers: int, source: str) -> EngramConfig | None:
    layers = cfg.get("engram_layers")
    if not layers:
        return None
    max_ngram = int(cfg.get("engram_max_ngram_size", 3))
    sizes = cfg.get("engram_vocab_size") or [5 * int(cfg["vocab_size"])] * (max_ngram - 1)
    engram = EngramConfig(
        layer_ids=tuple(int(i) for i in layers),
        vocab_sizes=tuple(int(v) for v in sizes),
        max_ngram=max_ngram,
        n_embed_per_ngram=int(cfg.get("engram_n_embed_per_ngram", 512)),
        n_head_per_ngram=int(cfg.get("engram_n_head_per_ngram", 8)),
        kernel_size=int(cfg.get("engram_kernel_size", 4)),
        pad_id=int(cfg.get("engram_pad_id", 2)),
        seed=int(cfg.get("engram_seed", 0)),
    )
    if len(engram.vocab_sizes) != max_ngram - 1 or max_ngram < 2:
        raise ConfigError(f"{source}: engram_vocab_size needs one table size per n-gram order 2..{max_ngram}")
    if engram.n_embed_per_ngram % engram.n_head_per_ngram:
        raise ConfigError(f"{source}: engram_n_embed_per_ngram must divide by engram_n_head_per_ngram")
    if not all(0 <= i < num_layers for i in engram.layer_ids):
        raise ConfigError(
            f"{source}: engram_layers {list(engram.layer_ids)} must name layers 0..{num_layers - 1}"
        )
    return engram


def _v4_layer_types(cfg: dict, num_layers: int, source: str) -> tuple[str, ...]:
    kinds = cfg.get("layer_types")
    if kinds is None and cfg.get("compress_ratios") is not None:
        by_ratio = {
            0: "sliding_attention",
            4: "compressed_sparse_attention",
            128: "heavily_compressed_attention",
        }
        kinds = [by_ratio[int(r)] for r in cfg["compress_ratios"][:num_layers]]
    if kinds is None:  # V4-Pro's schedule: two heavily compressed layers, then CSA/HCA alternating
        interleave = [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
            for i in range(max(num_layers - 2, 0))
        ]
        kinds = ["heavily_compressed_attention"] * min(num_layers, 2) + interleave
    kinds = tuple(kinds[:num_layers])
    bad = sorted(set(kinds) - set(V4_ATTENTION_KINDS))
    if len(kinds) != num_layers or bad:
        raise ConfigError(
            f"{source}: layer_types must name one of {sorted(V4_ATTENTION_KINDS)} per layer; got {bad}"
        )
    return kinds


def _v4_ropes(cfg: dict) -> tuple[RopeConfig, RopeConfig]:
    """V4 rotates with plain rope (rope_theta) in window-only layers and with `compress_rope_theta`
    (YaRN when configured, with cos/sin left unscaled) wherever a compressor is involved."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    main = params.get("main") or {"rope_theta": cfg.get("rope_theta", 10000.0)}
    compress = params.get("compress") or {
        **{k: v for k, v in params.items() if k not in ("main", "compress")},
        "rope_theta": cfg.get("compress_rope_theta", 160000.0),
    }
    max_pos = int(cfg.get("max_position_embeddings", 1 << 20))
    compress = dict(compress)
    if compress.get("rope_type", compress.get("type", "default")) == "yarn":
        compress.setdefault("attention_factor", 1.0)
    return _rope_config({"rope_parameters": main}, max_pos), _rope_config(
        {"rope_parameters": compress}, max_pos
    )
