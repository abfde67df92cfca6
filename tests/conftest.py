"""Shared fixtures: tiny random checkpoints written by transformers' save_pretrained or by ds4 itself,
and the oracle's deterministic top-k rule for the V3.2 indexer (STACK-NOTES: ties to the lower index)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS4_COMPILE", "0")  # compiling takes tens of seconds: test_compiled.py asks for it
os.environ.setdefault("DS4_AUTOTUNE", "0")  # timing tiles on a GPU syncs: the kernel tests ask for it
os.environ.setdefault("DS4_CPU_DENSE_MIN_BYTES", "0")  # the tiny models' dense layers in the CPU kernel too

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run through its interpreter; set before any import
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_speed

    interpreter_speed.install()

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Small geometry shared by the transformers-written test checkpoints; tests override pieces of it.
SHARED_GEOMETRY = dict(
    vocab_size=96,
    hidden_size=48,
    moe_intermediate_size=24,
    num_attention_heads=4,
    q_lora_rank=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)
BASE_GEOMETRY = dict(
    SHARED_GEOMETRY,
    intermediate_size=80,
    num_hidden_layers=3,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=12,
    first_k_dense_replace=1,
    max_position_embeddings=512,
)
INDEXER_GEOMETRY = dict(index_n_heads=4, index_head_dim=16, index_topk=8)
V4_GEOMETRY = dict(
    SHARED_GEOMETRY,
    num_hidden_layers=4,
    head_dim=32,
    o_groups=2,
    o_lora_rank=16,
    sliding_window=8,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=4,
    hc_mult=2,
    partial_rotary_factor=0.25,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1
    ),
    max_position_embeddings=1024,
)


def greedy_reference(hf, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt` up to (not including) the first EOS, as ds4 reports
    generated ids."""
    with torch.no_grad(), stable_indexer_topk():
        out = hf.generate(prompt[None], max_new_tokens=max_new_tokens, do_sample=False)
    token_ids, eos = out[0, len(prompt) :].tolist(), hf.config.eos_token_id
    return token_ids[: token_ids.index(eos)] if eos in token_ids else token_ids


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest, over positions, of max |got - ref| / max |ref| (per row of logits)."""
    return float(((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max())


def _stable_topk(self, k, dim=-1, largest=True, sorted=True):
    assert largest and dim in (-1, self.dim() - 1), "the indexer asks for the largest scores on the last dim"
    values, indices = torch.sort(self + 0.0, dim=-1, descending=True, stable=True)
    return torch.return_types.topk((values[..., :k], indices[..., :k]))


@contextlib.contextmanager
def stable_indexer_topk():
    """While transformers' V3.2 or V4 indexer runs (only then), Tensor.topk breaks ties to the lower index."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m4
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as m32

    indexers = (m32.DeepseekV32Indexer, m4.DeepseekV4Indexer)
    originals, original_topk = [cls.forward for cls in indexers], torch.Tensor.topk

    def patched(original_forward):
        def forward(self, *args, **kwargs):
            torch.Tensor.topk = _stable_topk
            try:
                return original_forward(self, *args, **kwargs)
            finally:
                torch.Tensor.topk = original_topk

        return forward

    for cls, original in zip(indexers, originals, strict=True):
        cls.forward = patched(original)
    try:
        yield
    finally:
        for cls, original in zip(indexers, originals, strict=True):
            cls.forward = original


def save_hf_checkpoint(path, family: str, seed: int = 0, **overrides):
    """Writes a random transformers model of `family` with save_pretrained; returns (path, model)."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        DeepseekV4Config,
        DeepseekV4ForCausalLM,
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
    )

    if family == "deepseek_v4":
        geometry = dict(V4_GEOMETRY)
    else:
        geometry = dict(BASE_GEOMETRY, **(INDEXER_GEOMETRY if family == "deepseek_v32" else {}))
    geometry.update(overrides)
    config_cls, model_cls = {
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
        "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
        "deepseek_v4": (DeepseekV4Config, DeepseekV4ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**geometry)).eval()
    _randomize_zero_initialized(model)
    model.save_pretrained(path, safe_serialization=True)
    model = model_cls.from_pretrained(path, attn_implementation="eager").eval()
    return path, model


def oracle_case(path, family: str, overrides: dict, seed: int, seq_len: int, ids_seed: int):
    """(checkpoint path, transformers model, `seq_len` random token ids, transformers' logits for them at
    every position): a checkpoint and the oracle's answer to check the engine against."""
    path, hf = save_hf_checkpoint(path, family, seed=seed, **overrides)
    gen = torch.Generator().manual_seed(ids_seed)
    ids = torch.randint(2, hf.config.vocab_size, (seq_len,), generator=gen)
    with torch.no_grad(), stable_indexer_topk():
        ref = hf(ids[None]).logits[0].float()
    return path, hf, ids, ref


def chunked_logits(llm, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Every position's logits from one sequence prefilled `chunk` tokens a step into a fresh cache."""
    from ds4.engine.context import SeqSlice

    n = len(ids)
    cache = llm.runner.new_cache(1, n)
    step = llm.runner.step
    rows = [
        step(ids[a : a + chunk].tolist(), [SeqSlice(0, a, min(chunk, n - a), 0)], cache, all_logits=True)
        for a in range(0, n, chunk)
    ]
    return torch.cat(rows)


def stepwise_logits(llm, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Every position's logits from one sequence: the first `prefix` tokens prefilled into a fresh cache,
    then one token a decode step."""
    from ds4.engine.context import SeqSlice

    n = len(ids)
    cache = llm.runner.new_cache(1, n)
    step = llm.runner.step
    rows = [step(ids[:prefix].tolist(), [SeqSlice(0, 0, prefix, 0)], cache, all_logits=True)]
    for pos in range(prefix, n):
        rows.append(step([int(ids[pos])], [SeqSlice(0, pos, 1, 0)], cache))
    return torch.cat(rows)


def _randomize_zero_initialized(model) -> None:
    """transformers zero-inits router biases, V4's sinks, gate position terms and mHC biases, and fills
    tid2eid with zeros (every token to expert 0, twice): random values exercise what they steer."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "position_bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
            elif name.endswith(("sinks", "attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                rows = [torch.randperm(experts, generator=gen)[: t.shape[1]] for _ in range(t.shape[0])]
                t.copy_(torch.stack(rows))


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory):
    """A tiny deepseek_v3 checkpoint written by `ds4-agent model init` (with tokenizer.json)."""
    from ds4.engine.random_checkpoint import init_checkpoint

    return init_checkpoint("deepseek_v3", "tiny", tmp_path_factory.mktemp("tiny-v3"), seed=0)


@pytest.fixture(scope="session")
def tiny_v32(tmp_path_factory):
    from ds4.engine.random_checkpoint import init_checkpoint

    return init_checkpoint("deepseek_v32", "tiny", tmp_path_factory.mktemp("tiny-v32"), seed=0)


@pytest.fixture(scope="session")
def tiny_v4(tmp_path_factory):
    from ds4.engine.random_checkpoint import init_checkpoint

    return init_checkpoint("deepseek_v4", "tiny", tmp_path_factory.mktemp("tiny-v4"), seed=0)


# V4 with Engram at two layers (the tiny preset has none).
ENGRAM_FIELDS = dict(
    engram_layers=[0, 2],
    engram_vocab_size=[211, 307],
    engram_max_ngram_size=3,
    engram_n_embed_per_ngram=16,
    engram_n_head_per_ngram=2,
    engram_kernel_size=3,
)


@pytest.fixture(scope="session")
def tiny_v4_engram(tmp_path_factory):
    from ds4.engine.random_checkpoint import init_checkpoint

    folder = tmp_path_factory.mktemp("tiny-v4-engram")
    return init_checkpoint("deepseek_v4", "tiny", folder, seed=1, config_overrides=ENGRAM_FIELDS)


def block_snapshots(path, prompt: list[int], block_size: int, chunk: int) -> dict[tuple, dict]:
    """V4's prefix blocks after prefilling `prompt` in chunks of `chunk` tokens (each block's snapshot and
    compressed rows), keyed by each block's tokens."""
    from ds4.engine import LLM, SamplingParams

    llm = LLM(path, block_size=block_size, max_num_batched_tokens=chunk)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    cache, blocks = llm.engine.cache, llm.engine.blocks.blocks
    return {blocks[b].token_ids: cache.block_tensors(b) for b in cache.snapshots}  # rows: views of pages


def assert_same_snapshots(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 1
    for block, snap in want.items():
        assert got[block].keys() == snap.keys()
        for name, tensor in snap.items():
            torch.testing.assert_close(got[block][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
