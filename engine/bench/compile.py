"""`ds4-agent bench compile`: every Triton kernel compiled for the cards ds4 targets (ds4.kernels.targets),
on any machine: shared memory, registers and spilled bytes per build, against each card's limit.

Two sources of launches, both recorded under Triton's interpreter:
- the real models' sizes (the presets deepseek-v3, deepseek-v3.2, deepseek-v4-flash): each kernel's host
  wrapper called as the engine calls it, at decode batches of 1 and 32 and a prefill chunk of 2,048
  tokens, on tensors never read (the kernels are recorded, not run);
- the engine itself on the Triton path (prefill, a prefix hit, batched decode) on each family's tiny
  checkpoint, with the kernels run: every launch the engine makes, whatever the sizes."""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import contextmanager

import torch

from ds4.engine.presets import load_preset
from ds4.kernels import forced, mla_decode
from ds4.kernels.indexer import indexer_topk, paged_indexer_scores, paged_topk_rows
from ds4.kernels.mla_decode import paged_mla_decode
from ds4.kernels.mla_prefill import mla_prefill
from ds4.kernels.moe import fused_moe
from ds4.kernels.moe_align import align_pairs
from ds4.kernels.quant_linear import quant_linear
from ds4.kernels.rmsnorm import rmsnorm
from ds4.kernels.router import route
from ds4.kernels.small_ops import mhc_mix, rope, rope_table, rope_tail, swiglu, write_latent_rows
from ds4.kernels.sparse_attention import sparse_attention
from ds4.kernels.streams import hyper_update
from ds4.kernels.targets import CARDS, Build, compile_launches, recording

PRESETS = ("deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash")
FAMILIES = ("deepseek_v3", "deepseek_v32", "deepseek_v4")
BATCHES = (1, 32)  # decode
CHUNK = 2048  # a prefill step (EngineConfig.max_num_batched_tokens)
BLOCK = 256  # tokens per cache block (EngineConfig.block_size)
CONTEXT = 4096  # cached positions each decode sequence has
STACKED = 8  # experts in a workload's stack
# stored formats of each family's expert (and, for quant_linear, dense) weights: (dtype, packed columns)
FORMATS = {"fp8": (torch.float8_e4m3fn, 1), "fp4": (torch.int8, 2), "int4": (torch.uint8, 2)}


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def _stored(rows: int, cols: int, fmt: str, experts: int | None = None):
    """(weight, scale) of `fmt` as the engine stores them (ds4.engine.quant), unread."""
    lead = () if experts is None else (experts,)
    dtype, packed = FORMATS[fmt]
    weight = _empty(*lead, rows, cols // packed, dtype=dtype)
    if fmt == "fp8":
        scale = _empty(*lead, rows // 128, cols // 128, dtype=torch.float32)
    else:
        scale = _empty(
            *lead, rows, cols // 32, dtype=torch.float8_e8m0fnu if fmt == "fp4" else torch.bfloat16
        )
    return weight, scale


def _experts(cfg: dict, dtype, tokens: int, fmt: str, skips: bool) -> None:
    """The fused MoE over STACKED experts of the preset's shape (the expert count changes no build but
    the alignment's, recorded apart at the real count: a stack of 256 would be tens of GB even unread)."""
    dim, inter, topk = (cfg[k] for k in ("hidden_size", "moe_intermediate_size", "num_experts_per_tok"))
    experts = STACKED
    x = _empty(tokens, dim, dtype=dtype)
    ids = torch.zeros(tokens, topk, dtype=torch.int64)
    weights = torch.zeros(tokens, topk)
    limit = cfg.get("swiglu_limit")
    if fmt == "none":
        w13, w2 = _empty(experts, 2 * inter, dim, dtype=dtype), _empty(experts, dim, inter, dtype=dtype)
        fused_moe(x, w13, w2, weights, ids, limit, skips=skips, add=x)
        return
    (w13, s13), (w2, s2) = _stored(2 * inter, dim, fmt, experts), _stored(dim, inter, fmt, experts)
    fused_moe(x, w13, w2, weights, ids, limit, fmt, s13, s2, skips=skips)


def _dense(cfg: dict, dtype, tokens: int) -> None:
    dim = cfg["hidden_size"]
    x, residual = _empty(tokens, dim, dtype=dtype), _empty(tokens, dim, dtype=dtype)
    rmsnorm(x, _empty(dim, dtype=dtype), 1e-6, residual)
    rmsnorm(x, None if cfg["model_type"] == "deepseek_v4" else _empty(dim, dtype=dtype), 1e-6)
    inter = cfg.get("intermediate_size", cfg["moe_intermediate_size"])
    both = _empty(tokens, 2 * inter, dtype=dtype)
    swiglu(both[:, :inter], both[:, inter:], cfg.get("swiglu_limit"))
    for fmt in FORMATS:
        quant_linear(x, *_stored(inter, dim, fmt), fmt)
    align_pairs(
        torch.zeros(tokens, cfg["num_experts_per_tok"], dtype=torch.int64), cfg["n_routed_experts"], 16
    )
    logits = _empty(tokens, cfg["n_routed_experts"], dtype=torch.float32)
    groups = (cfg.get("n_group", 1), cfg.get("topk_group", 1))
    route(
        logits,
        _empty(cfg["n_routed_experts"], dtype=torch.float32),
        cfg["scoring_func"],
        cfg["num_experts_per_tok"],
        *groups,
        True,
        cfg["routed_scaling_factor"],
    )


def _rope(cfg: dict, dtype, tokens: int) -> tuple:
    half = cfg["qk_rope_head_dim"] // 2
    cos, sin = rope_table(
        torch.zeros(tokens, dtype=torch.int64), _empty(half, dtype=torch.float32), 1.0, dtype
    )
    return cos, sin


def _mla(cfg: dict, dtype, tokens: int, decode: bool, rows_fmt: str) -> None:
    """V3 / V3.2 attention: rope, the cache rows' write, decode or prefill over the latent rows."""
    heads, latent, rope_dim = cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    cos, sin = _rope(cfg, dtype, tokens)
    rope(_empty(tokens, heads, rope_dim, dtype=dtype), cos, sin, True)
    pages = (max(BATCHES) * CONTEXT) // BLOCK + CHUNK // BLOCK
    width = latent + rope_dim if rows_fmt == "bf16" else latent + latent // 32 + 2 * rope_dim
    pool = _empty(pages * BLOCK, width, dtype=dtype if rows_fmt == "bf16" else torch.uint8)
    if rows_fmt == "bf16":
        write_latent_rows(
            _empty(tokens, latent + rope_dim, dtype=dtype),
            _empty(latent, dtype=dtype),
            1e-6,
            cos,
            sin,
            True,
            pool,
            torch.zeros(tokens, dtype=torch.int64),
        )
    ql, qr = _empty(tokens, heads, latent, dtype=dtype), _empty(tokens, heads, rope_dim, dtype=dtype)
    scale = (latent + rope_dim) ** -0.5
    if decode:
        table = torch.zeros(tokens, CONTEXT // BLOCK, dtype=torch.int32)
        paged_mla_decode(ql, qr, pool, table, torch.full((tokens,), CONTEXT), BLOCK, scale)
    else:
        blocks = torch.zeros((CONTEXT + tokens) // BLOCK, dtype=torch.int32)
        mla_prefill(ql, qr, pool, blocks, CONTEXT, BLOCK, scale)
    if "index_topk" in cfg and rows_fmt == "bf16":  # V3.2: the indexer and attention over its picks
        _indexer(cfg, dtype, tokens, decode, rows=pool.shape[0])
        picks = torch.zeros(tokens, cfg["index_topk"], dtype=torch.int32)
        sparse_attention(_empty(tokens, heads, latent + rope_dim, dtype=dtype), pool, picks, scale, latent)


def _indexer(cfg: dict, dtype, tokens: int, decode: bool, rows: int) -> None:
    heads, dim, topk = cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]
    q, weights = _empty(tokens, heads, dim, dtype=dtype), _empty(tokens, heads, dtype=torch.float32)
    if decode:
        table = torch.zeros(tokens, CONTEXT // BLOCK, dtype=torch.int32)
        scores = paged_indexer_scores(
            q, weights, _empty(rows, dim, dtype=dtype), table, torch.full((tokens,), CONTEXT), BLOCK, CONTEXT
        )
        paged_topk_rows(scores, topk, table, BLOCK)
    else:
        keys = _empty(CONTEXT + tokens, dim, dtype=dtype)
        indexer_topk(q, weights, keys, torch.arange(CONTEXT, CONTEXT + tokens), topk)


def _v4(cfg: dict, dtype, tokens: int, decode: bool) -> None:
    """V4 attention (K = V rows with a sink over the window and the compressed rows) and mHC."""
    heads, head_dim = cfg["num_attention_heads"], cfg["head_dim"]
    cos, sin = _rope(cfg, dtype, tokens)
    q = rope_tail(_empty(tokens, heads, head_dim, dtype=dtype), cos, sin)
    rope_tail(_empty(tokens, head_dim, dtype=dtype), cos, sin, negate=True)
    keys = cfg["index_topk"] + cfg["sliding_window"]
    kv = _empty(CONTEXT // 4 + CHUNK, head_dim, dtype=dtype)
    picks = torch.zeros(tokens, keys, dtype=torch.int32)
    sparse_attention(q, kv, picks, head_dim**-0.5, head_dim, _empty(heads, dtype=torch.float32))
    _indexer(cfg, dtype, tokens, decode, rows=CONTEXT // 4)
    n, dim = cfg["hc_mult"], cfg["hidden_size"]
    streams = _empty(tokens, n, dim, dtype=dtype)
    post, comb, _ = mhc_mix(
        _empty(tokens, (2 + n) * n, dtype=torch.float32),
        _empty((2 + n) * n, dtype=torch.float32),
        _empty(3, dtype=torch.float32),
        streams,
        cfg["hc_sinkhorn_iters"],
        cfg["hc_eps"],
    )
    hyper_update(streams, _empty(tokens, dim, dtype=dtype), post, comb)


@contextmanager
def _gpu_splits(sms: int = 132):
    """kv_splits' rule as on a card of `sms` SMs (an H200's 132; a 4090 has 128), not the interpreter's."""
    rule = mla_decode.split_rule
    mla_decode.split_rule = lambda device: (sms, mla_decode.GPU_MIN_SPLIT)
    try:
        yield
    finally:
        mla_decode.split_rule = rule


def preset_launches(recorder, preset: str, dtype: torch.dtype) -> None:
    """Records the launches of one decoder layer's kernels at `preset`'s sizes."""
    cfg = load_preset(preset)
    with _gpu_splits():
        _preset_launches(recorder, cfg, preset, dtype)


def _preset_launches(recorder, cfg: dict, preset: str, dtype: torch.dtype) -> None:
    for tokens, decode in [(b, True) for b in BATCHES] + [(CHUNK, False)]:
        label = f"{preset} {'decode B=' if decode else 'prefill T='}{tokens} {str(dtype).split('.')[-1]}"
        with recorder.workload(label, dtype):
            _dense(cfg, dtype, tokens)
            for fmt in ("none", *FORMATS):
                _experts(cfg, dtype, tokens, fmt, skips=False)
            _experts(cfg, dtype, tokens, "int4", skips=True)  # tiered experts' hot part
            if cfg["model_type"] == "deepseek_v4":
                _v4(cfg, dtype, tokens, decode)
            else:
                for rows_fmt in ("bf16", "fp8"):
                    _mla(cfg, dtype, tokens, decode, rows_fmt)


def engine_launches(recorder, family: str, dtype: torch.dtype, folder: str) -> None:
    """Records every launch of the engine on `family`'s tiny checkpoint, on the Triton path: a prompt,
    then four that share its first block, decoded as a batch."""
    from ds4.engine import LLM, SamplingParams
    from ds4.engine.random_checkpoint import init_checkpoint

    path = init_checkpoint(family, "tiny", folder, seed=0)
    name = str(dtype).split(".")[-1]
    with forced(True), recorder.workload(f"engine {family} tiny {name}", dtype):
        llm = LLM(path, dtype=name, max_num_seqs=4, compile_decode=False, cuda_graphs=False, block_size=16)
        shared = list(range(2, 22))
        llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1))
        for i in range(4):  # prefilled together over the cached block, then two decode steps of four
            params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
            llm.engine.add_request(shared + [30 + i] * (1 + 3 * i), params)
        while llm.engine.has_unfinished:
            llm.engine.step()


def run(
    cards: list[str],
    dtypes: list[torch.dtype],
    presets=PRESETS,
    families=FAMILIES,
    jobs=None,
    triton_path=None,
) -> list[Build]:
    """The builds of every launch the presets' workloads and the engine on `families` make."""
    with recording(execute=False) as sized:
        for dtype in dtypes:
            for preset in presets:
                preset_launches(sized, preset, dtype)
    launches = list(sized.launches.values())
    with recording(execute=True) as engine, tempfile.TemporaryDirectory() as folder:
        for family in families:
            for dtype in dtypes:
                engine_launches(engine, family, dtype, f"{folder}/{family}")
    launches += list(engine.launches.values())
    return compile_launches(launches, cards, jobs, triton_path)


def _describe(b: Build) -> str:
    shown = {k: v for k, v in b.constexprs.items() if k.startswith("BLOCK") or k in ("QUANT", "DOT", "FP8")}
    tiles = " ".join(f"{k}={v['dtype'] if isinstance(v, dict) else v}" for k, v in shown.items())
    opts = " ".join(f"{k}={v}" for k, v in b.options.items())
    return f"{tiles} {opts}".strip()


def format_report(builds: list[Build]) -> str:
    """Per card: the failures and the builds over its shared memory, then each kernel's largest needs."""
    lines = []
    for card in dict.fromkeys(b.card for b in builds):
        mine = [b for b in builds if b.card == card]
        failed = [b for b in mine if b.error]
        over = [b for b in mine if not b.error and b.shared > CARDS[card].shared]
        wide = [b for b in mine if not b.grid_fits()]
        spilled = [b for b in mine if not b.error and b.stack]
        lines.append(
            f"{CARDS[card].label}, Triton {mine[0].triton}: {len(mine)} builds, {len(failed)} failed, "
            f"{len(over)} over its {CARDS[card].shared // 1024} KiB of shared memory, "
            f"{len(wide)} past the grid's limits, {len(spilled)} spill registers, "
            f"{sum(b.seconds for b in mine):.0f} s to compile"
        )
        for b in failed:
            lines.append(f"  FAILED {b.kernel} [{b.origin}] {_describe(b)}: {b.error.splitlines()[0][:300]}")
        for b in over:
            lines.append(f"  OVER   {b.kernel} [{b.origin}] {_describe(b)}: {b.shared / 1024:.1f} KiB")
        for b in wide:
            lines.append(f"  GRID   {b.kernel} [{b.origin}]: {b.grid} programs, past CUDA's limits")
        lines.append(
            f"  {'kernel':<28}{'builds':>7}{'max shared KiB':>16}{'max regs':>10}{'max spill B':>13}"
        )
        for kernel, count in sorted(Counter(b.kernel for b in mine if not b.error).items()):
            ok = [b for b in mine if b.kernel == kernel and not b.error]
            lines.append(
                f"  {kernel:<28}{count:>7}{max(b.shared for b in ok) / 1024:>16.1f}"
                f"{max(b.registers for b in ok):>10}{max(b.stack for b in ok):>13}"
            )
    return "\n".join(lines)
