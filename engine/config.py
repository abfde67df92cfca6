"""Model and engine configuration.

`ModelConfig.from_hf` is the only place that knows Hugging Face config.json key names and their
defaults; everything else reads DeepSeek's own vocabulary from the frozen dataclass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ds4.engine.errors import ConfigError, ParamError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "deepseek_v4")
V4_ATTENTION_KINDS = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is "default" or "yarn"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class EngramConfig:
    """Engram's hashed n-gram memory (deepseek-ai/Engram); the fields of its published EngramConfig."""

    layer_ids: tuple[int, ...]
    vocab_sizes: tuple[int, ...]  # table size per n-gram order (2, 3, ...), before rounding up to primes
    max_ngram: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    kernel_size: int = 4
    pad_id: int = 2
    seed: int = 0
    norm_eps: float | None = None  # None: the dtype's machine epsilon (torch.nn.RMSNorm's default)
    conv_norm_eps: float = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    gate_bias: bool
    mlp_layer_types: tuple[str, ...]
    rope: RopeConfig
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    fp8_block_size: tuple[int, int] | None = None
    int4_experts: bool = False  # packed routed experts are int4 (ds4 model quantize), not FP4 e2m1
    torch_dtype: str = "float32"
    # DeepSeek-V4 only (zero/empty elsewhere): one K=V head of head_dim, a sliding window, per-layer
    # compression (0 = window only), grouped output projection, mHC streams, clamped SwiGLU.
    head_dim: int = 0
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    compress_ratios: tuple[int, ...] = ()
    compress_rope: RopeConfig | None = None
    o_groups: int = 0
    o_lora_rank: int = 0
    hc_mult: int = 0
    hc_sinkhorn_iters: int = 0
    hc_eps: float = 1e-6
    swiglu_limit: float | None = None
    engram: EngramConfig | None = None  # hashed n-gram memory, off unless config.json enables it
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.model_type == "deepseek_v32"

    @property
    def is_v4(self) -> bool:
        return self.model_type == "deepseek_v4"

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.mlp_layer_types[layer_id] != "dense"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(
                f"{path}: no config.json; point --model at a Hugging Face-style checkpoint folder"
            )
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path}: not valid JSON ({e})") from e
        return cls.from_hf(raw, source=str(config_path))

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"ds4 runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "deepseek_v4":
            return _v4_from_hf(cls, cfg, source)
        need = _needer(cfg, source, model_type)
        common = _common_fields(cfg, source, need)
        num_layers, heads = common["num_hidden_layers"], common["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if kv_heads != heads:
            raise ConfigError(
                f"{source}: MLA needs num_key_value_heads == num_attention_heads, got {kv_heads}"
            )
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
            raise ConfigError(
                f"{source}: deepseek_v32's indexer reads the query latent; q_lora_rank is needed"
            )

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
        return cls(
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


# Fields of a V4 config.json that would change the computation in ways ds4 does not implement yet.
V4_UNSUPPORTED = {
    "attention_bias": lambda v: bool(v),
    "mlp_bias": lambda v: bool(v),
    "hidden_act": lambda v: v != "silu",
    "num_key_value_heads": lambda v: v not in (None, 1),
    "n_shared_experts": lambda v: v not in (None, 1),
    "expert_dtype": lambda v: v not in (None, "bf16", "bfloat16", "fp8", "fp4"),
}


def _v4_from_hf(cls, cfg: dict, source: str) -> ModelConfig:
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
    return cls(
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


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs, checked on construction."""

    device: str | None = None  # the primary device (inputs, sampling); default: devices[0], else "cpu"
    devices: tuple[str, ...] | None = None  # pipeline: the layers split in order over these (repeats allowed)
    layer_split: tuple[int, ...] | None = None  # layers per device; default: balanced by weight bytes
    dtype: str = "float32"
    mla_mode: str = "auto"  # "auto": naive for prefill, absorbed for decode; or force one of them
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    max_num_seqs: int = 16  # sequences decoded together
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks
    block_size: int = 256  # tokens per cache block (a multiple of every V4 compression ratio)
    num_cache_blocks: int | None = None  # default: max_num_seqs full-length sequences, within cache_memory_gb
    cache_memory_gb: float = 1.0  # per device: a pipeline's devices each hold their own layers' rows
    enable_prefix_caching: bool = True
    prefix_cache_dir: str | None = None  # disk tier: full prefix blocks persist across processes
    hot_experts: int | None = None  # hybrid: routed experts on expert_device, this many per layer hot
    expert_device: str = "cpu"
    hot_period: int = 8  # forward passes between re-rankings of the hot experts
    stream_tokens: int = 4096  # prefill passes this long stream their cold experts to the device once
    weights: str = "stored"  # quantized tensors kept as stored (dequantized in the matmul), or "dequantize"
    cuda_graphs: bool = True  # decode steps replay captured CUDA graphs (on a GPU, where the model allows)

    def __post_init__(self):
        self._check_devices()
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ParamError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.mla_mode not in ("auto", "naive", "absorbed"):
            raise ParamError(f"mla_mode must be auto, naive or absorbed, got {self.mla_mode!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ParamError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hot_experts is not None and self.hot_experts < 0:
            raise ParamError(f"hot_experts must be >= 0, got {self.hot_experts}")
        if self.weights not in ("stored", "dequantize"):
            raise ParamError(f"weights must be stored or dequantize, got {self.weights!r}")
        if self.hot_period < 1 or self.stream_tokens < 1:
            raise ParamError("hot_period and stream_tokens must be positive")
        if self.num_cache_blocks is not None and self.num_cache_blocks < 1:
            raise ParamError(f"num_cache_blocks must be positive, got {self.num_cache_blocks}")

    def _check_devices(self) -> None:
        """`device` is `devices[0]` when a split is given; the split's per-device counts are checked
        against the model's layers by the runner."""
        if self.devices is not None:
            devices = (self.devices,) if isinstance(self.devices, str) else tuple(self.devices)
            if not devices or not all(isinstance(d, str) and d for d in devices):
                raise ParamError(
                    f"devices must name at least one device, e.g. ('cuda:0', 'cuda:1'); got {devices}"
                )
            if self.device is not None and self.device != devices[0]:
                raise ParamError(
                    f"device {self.device!r} must be the first of devices {list(devices)} (or left unset)"
                )
            object.__setattr__(self, "devices", devices)
            object.__setattr__(self, "device", devices[0])
        elif self.device is None:
            object.__setattr__(self, "device", "cpu")
        if self.layer_split is not None:
            split = tuple(self.layer_split)
            if self.devices is None or len(split) != len(self.devices):
                raise ParamError(
                    f"layer_split {list(split)} needs one layer count per device of devices "
                    f"({'unset' if self.devices is None else list(self.devices)})"
                )
            object.__setattr__(self, "layer_split", split)
