"""Model and engine configuration: two frozen dataclasses, `ModelConfig` (DeepSeek's own vocabulary)
and `EngineConfig` (runtime knobs, checked on construction). `ModelConfig.from_hf` reads config.json
through `ds4.engine.hf_config`, the only module that knows Hugging Face key names and defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ds4.engine.errors import ConfigError, ParamError


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
    """A DeepSeek model's shape and routing in DeepSeek's own vocabulary (V3, V3.2 and V4)."""

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
        """The config a Hugging Face config.json's dict describes; `source` names it in errors."""
        from ds4.engine.hf_config import model_fields  # it builds this module's RopeConfig and EngramConfig

        return cls(**model_fields(cfg, source))


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
    # decode steps on the CPU run a compiled forward (ds4.engine.compiled); DS4_COMPILE=0 sets it off
    compile_decode: bool = field(default_factory=lambda: os.environ.get("DS4_COMPILE", "1") != "0")

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
