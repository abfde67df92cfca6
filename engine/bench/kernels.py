"""`ds4-agent bench kernels`: each Triton kernel against its torch reference (and torch.compile where it
applies) at real model sizes, with achieved GB/s and TFLOP/s next to the card's measured copy
bandwidth and matmul rate. Made for a CUDA GPU; `--small` runs the same code at toy sizes (on the CPU
through Triton's interpreter, TRITON_INTERPRET=1) to check the script itself.

Sizes: V3 (128 heads, latent 512 + rope 64, index top-k 2048, 256 experts of 7168 x 2048, top-8) and
V4-Flash (64 heads, one 512-d K = V head, top-k 512, plus the 128-row window)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ds4.engine.quant import CODECS
from ds4.kernels import reference
from ds4.kernels.indexer import indexer_scores
from ds4.kernels.mla_decode import paged_mla_decode
from ds4.kernels.mla_prefill import mla_prefill
from ds4.kernels.moe import fused_moe
from ds4.kernels.quant_linear import quant_linear
from ds4.kernels.rmsnorm import rmsnorm
from ds4.kernels.small_ops import mhc_mix, rope
from ds4.kernels.sparse_attention import sparse_attention


@dataclass
class KernelResult:
    name: str
    shape: str
    triton_ms: float
    torch_ms: float | None
    compiled_ms: float | None
    bytes_moved: int
    flops: int
    max_err: float
    gb_per_s: float = 0.0
    tflop_per_s: float = 0.0
    bandwidth_share: float = 0.0  # of the measured copy bandwidth
    error: str | None = None  # the kernel failed (to compile, to run): the others are still measured


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, runs: int, warmup: int = 2) -> float:
    """Median milliseconds of `runs` calls after `warmup` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def machine_rates(device: str, small: bool, runs: int) -> dict:
    """Measured copy bandwidth (GB/s: bytes read + written) and bf16 matmul rate (TFLOP/s)."""
    n = (1 << 20) if small else (1 << 28)  # 4 MB or 1 GB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), device, runs)
    size = 256 if small else 8192
    dtype = torch.float32 if small else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_ms = timed(lambda: a @ b, device, runs)
    return {
        "copy_gb_per_s": 2 * n * 4 / copy_ms / 1e6,
        "matmul_tflop_per_s": 2 * size**3 / mm_ms / 1e9,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def _err(a, b) -> float:
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def cases(device: str, small: bool):
    """(name, shape text, triton fn, torch fn, compile-able torch fn or None, bytes, flops)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.float32 if small else torch.bfloat16
    bpe = 4 if small else 2

    def rand(*shape, dtype=dt, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    out = []
    # paged MLA decode (V3)
    B, H, C, R, S, page = (2, 16, 512, 64, 96, 32) if small else (32, 128, 512, 64, 4096, 256)
    blocks = B * (S // page)
    pool = rand(blocks * page, C + R)
    table = torch.randperm(blocks, generator=g).view(B, S // page).to(torch.int32).to(device)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    ql, qr = rand(B, H, C), rand(B, H, R)
    scale = (C + R) ** -0.5
    out.append(
        (
            "paged MLA decode (V3)",
            f"B={B} H={H} C={C}+{R} S={S}",
            lambda: paged_mla_decode(ql, qr, pool, table, lens, page, scale),
            lambda: reference.paged_mla_decode(ql, qr, pool, table, lens, page, scale),
            None,
            B * S * (C + R) * bpe + 2 * B * H * (C + R) * bpe,
            2 * B * H * S * (2 * C + R),
        )
    )
    if C == 512:  # FlashMLA's FP8 rows: 656 bytes per token for 512 + 64, instead of 1,152 in bf16
        packed = reference.quantize_latent_rows(pool.float(), C).to(device)
        rows = reference.dequantize_latent_rows(packed, C)
        out.append(
            (
                "paged MLA decode FP8 rows",
                f"B={B} H={H} C={C}+{R} S={S}",
                lambda packed=packed: paged_mla_decode(ql, qr, packed, table, lens, page, scale),
                lambda rows=rows: reference.paged_mla_decode(ql, qr, rows, table, lens, page, scale),
                None,
                B * S * packed.shape[1] + 2 * B * H * (C + R) * bpe,
                2 * B * H * S * (2 * C + R),
            )
        )
    # one sequence over a long cache (an editor's request on a packed repository): its positions split
    # over many programs (flash-decoding), and unsplit, one program per block of heads, as before
    S1 = 256 if small else 65536
    pool1 = rand(S1 + page, C + R)  # the pool's rows bound the split rule: a cache for this sequence
    table1 = torch.randperm(S1 // page, generator=g).view(1, -1).to(torch.int32).to(device)
    lens1 = torch.full((1,), S1, dtype=torch.int32, device=device)
    ql1, qr1 = ql[:1].contiguous(), qr[:1].contiguous()
    for label, forced_splits in (("split", None), ("unsplit", 1)):
        out.append(
            (
                f"paged MLA decode, one sequence ({label})",
                f"B=1 H={H} C={C}+{R} S={S1}",
                lambda n=forced_splits: paged_mla_decode(
                    ql1, qr1, pool1, table1, lens1, page, scale, splits=n
                ),
                lambda: reference.paged_mla_decode(ql1, qr1, pool1, table1, lens1, page, scale),
                None,
                S1 * (C + R) * bpe + 2 * H * (C + R) * bpe,
                2 * H * S1 * (2 * C + R),
            )
        )
    # MLA prefill (V3, absorbed, causal): a chunk of T tokens over a cached prefix, flash-style
    T, S = (16, 80) if small else (512, 4096)
    end, pages = S + T, -(-(S + T) // page)
    chunk_pool = rand(pages * page, C + R)
    chunk_blocks = torch.randperm(pages, generator=g).to(torch.int32).to(device)
    pql, pqr = rand(T, H, C), rand(T, H, R)
    out.append(
        (
            "MLA prefill (V3, absorbed)",
            f"T={T} H={H} C={C}+{R} S={S}+{T}",
            lambda S=S: mla_prefill(pql, pqr, chunk_pool, chunk_blocks, S, page, scale),
            lambda S=S: reference.mla_prefill(pql, pqr, chunk_pool, chunk_blocks, S, page, scale),
            None,
            end * (C + R) * bpe + 2 * T * H * (C + R) * bpe,
            2 * T * H * (S + T / 2) * (2 * C + R),
        )
    )
    # sparse attention: V3.2 MLA top-k and V4-Flash (K = V head with sink)
    for name, T, H, D, V, K, rows, with_sink in (
        (
            "sparse MLA (V3.2 top-k)",
            *((3, 16, 80, 64, 40, 256) if small else (32, 128, 576, 512, 2048, 65536)),
            False,
        ),
        (
            "sparse K=V + sink (V4-Flash)",
            *((3, 16, 64, 64, 40, 256) if small else (32, 64, 512, 512, 640, 65536)),
            True,
        ),
    ):
        q, kv = rand(T, H, D), rand(rows, D)
        idx = torch.randint(0, rows, (T, K), generator=g).to(torch.int32).to(device)
        sink = rand(H, dtype=torch.float32) if with_sink else None
        out.append(
            (
                name,
                f"T={T} H={H} D={D} k={K}",
                lambda q=q, kv=kv, idx=idx, D=D, V=V, sink=sink: sparse_attention(
                    q, kv, idx, D**-0.5, V, sink
                ),
                lambda q=q, kv=kv, idx=idx, D=D, V=V, sink=sink: reference.sparse_attention(
                    q, kv, idx, D**-0.5, V, sink
                ),
                None,
                T * K * D * bpe,
                2 * T * H * K * (D + V),
            )
        )
    # lightning indexer scores (V3.2)
    T, H, D, S = (3, 16, 32, 200) if small else (32, 64, 128, 32768)
    q, w, k = rand(T, H, D), rand(T, H, dtype=torch.float32), rand(S, D)
    pos = torch.full((T,), S - 1, device=device)
    out.append(
        (
            "indexer scores (V3.2)",
            f"T={T} H={H} D={D} S={S}",
            lambda: indexer_scores(q, w, k, pos),
            lambda: reference.indexer_scores(q, w, k, pos),
            None,
            T * S * D * bpe + T * S * 4,
            2 * T * H * S * D,
        )
    )
    # fused MoE decode at V3's expert shape: bf16, FP8 block-scaled, FP4 experts. 16 experts, all
    # active: each expert's weights are read once per step, as in decode with many tokens in flight.
    T, topk, E, D, I = (4, 2, 4, 64, 64) if small else (16, 8, 16, 7168, 2048)
    x = rand(T, D)
    ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(T)]).to(device)
    wts = torch.rand(T, topk, generator=g).to(device)
    active = int(ids.unique().numel())
    experts13 = [torch.randn(2 * I, D, generator=g) * 0.02 for _ in range(E)]
    experts2 = [torch.randn(D, I, generator=g) * 0.02 for _ in range(E)]
    for quant, per in (("none", bpe), ("fp8", 1), ("fp4", 0.5), ("int4", 0.5)):
        if quant == "none":
            w13 = torch.stack(experts13).to(dt).to(device)
            w2 = torch.stack(experts2).to(dt).to(device)
            s13 = s2 = None
            deq13, deq2 = w13, w2
        else:
            quantize, dequantize = CODECS[quant]
            p13, p2 = [quantize(w) for w in experts13], [quantize(w) for w in experts2]
            w13, s13 = (torch.stack([p[i] for p in p13]).to(device) for i in (0, 1))
            w2, s2 = (torch.stack([p[i] for p in p2]).to(device) for i in (0, 1))
            deq13 = torch.stack([dequantize(*p) for p in p13]).to(device)  # the kernel's error, not FP4's
            deq2 = torch.stack([dequantize(*p) for p in p2]).to(device)
        out.append(
            (
                f"fused MoE {quant}",
                f"T={T} top-{topk} of E={E} D={D} I={I}",
                lambda w13=w13, w2=w2, s13=s13, s2=s2, quant=quant: fused_moe(
                    x, w13, w2, wts, ids, quant=quant, w13_scale=s13, w2_scale=s2
                ),
                lambda deq13=deq13, deq2=deq2: reference.fused_moe(x, deq13, deq2, wts, ids),
                None,
                int(active * 3 * D * I * per),
                2 * T * topk * 3 * D * I,
            )
        )
    # a linear over stored weights (quant_linear) at a dense MLP's up projection, a few decode tokens;
    # the peer is torch's matmul over the same weights in the model dtype
    # (names of their own: the lambdas above read theirs when they run)
    rows, n_out, k_in = (3, 96, 64) if small else (8, 18432, 7168)
    x_lin = rand(rows, k_in)
    dense = torch.randn(n_out, k_in, generator=g) * 0.02
    for quant, per in (("fp8", 1), ("fp4", 0.5), ("int4", 0.5)):
        quantize, dequantize = CODECS[quant]
        stored, scales = quantize(dense)
        deq = dequantize(stored, scales).to(dt).to(device)
        stored, scales = stored.to(device), scales.to(device)
        out.append(
            (
                f"quant linear {quant}",
                f"T={rows} N={n_out} K={k_in}",
                lambda w=stored, sc=scales, quant=quant: quant_linear(x_lin, w, sc, quant),
                lambda deq=deq: torch.nn.functional.linear(x_lin, deq),
                None,
                int(n_out * k_in * per),
                2 * rows * n_out * k_in,
            )
        )
    # fused RMSNorm + residual, rope, mHC
    T, D = (8, 128) if small else (4096, 7168)
    xs, res, wn = rand(T, D), rand(T, D), rand(D).abs()

    def norm_ref(xs=xs, res=res, wn=wn):
        return reference.rmsnorm(xs, wn, 1e-6, res)

    out.append(
        (
            "RMSNorm + residual",
            f"T={T} D={D}",
            lambda: rmsnorm(xs, wn, 1e-6, res),
            norm_ref,
            norm_ref,
            5 * T * D * bpe,
            4 * T * D,
        )
    )
    T, H, R = (8, 16, 64) if small else (4096, 128, 64)
    xr, cos, sin = rand(T, H, R), rand(T, R // 2), rand(T, R // 2)

    def rope_ref(xr=xr, cos=cos, sin=sin):
        return reference.rope(xr, cos, sin, True)

    out.append(
        (
            "rope (interleaved)",
            f"T={T} H={H} R={R}",
            lambda: rope(xr, cos, sin, True),
            rope_ref,
            rope_ref,
            2 * T * H * R * bpe,
            6 * T * H * R,
        )
    )
    T, N, D = (8, 4, 128) if small else (4096, 4, 4096)
    mix, base, sc, streams = (
        rand(T, (2 + N) * N, dtype=torch.float32),
        rand((2 + N) * N, dtype=torch.float32),
        rand(3, dtype=torch.float32),
        rand(T, N, D),
    )

    def mhc_ref(mix=mix, base=base, sc=sc, streams=streams):
        return reference.mhc_mix(mix, base, sc, streams, 20, 1e-6)

    out.append(
        (
            "mHC Sinkhorn + collapse (V4)",
            f"T={T} N={N} D={D}",
            lambda: mhc_mix(mix, base, sc, streams, 20, 1e-6),
            mhc_ref,
            mhc_ref,
            T * N * D * bpe + T * D * bpe,
            2 * T * N * D,
        )
    )
    return out


def bench_kernels(device: str = "cuda", small: bool = False, runs: int = 20, compile_refs: bool = True):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("bench kernels needs a CUDA GPU (or --small --device cpu to check the script)")
    rates = machine_rates(device, small, runs)
    results = []
    for name, shape, fn, ref_fn, compilable, nbytes, flops in cases(device, small):
        try:
            results.append(
                _measure(name, shape, fn, ref_fn, compilable, nbytes, flops, device, runs, compile_refs)
            )
        except Exception as e:  # one kernel that does not build on this card leaves the others' figures
            nan = float("nan")
            failed = KernelResult(
                name, shape, nan, nan, None, nbytes, flops, nan, error=f"{type(e).__name__}: {e}"[:300]
            )
            results.append(failed)
        results[-1].bandwidth_share = results[-1].gb_per_s / rates["copy_gb_per_s"]
    return rates, results


def _measure(name, shape, fn, ref_fn, compilable, nbytes, flops, device, runs, compile_refs) -> KernelResult:
    got, want = fn(), ref_fn()
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    triton_ms = timed(fn, device, runs)
    torch_ms = timed(ref_fn, device, max(1, runs // 4), warmup=1)
    compiled_ms = None
    if compilable is not None and compile_refs:
        compiled = torch.compile(compilable)
        compiled_ms = timed(compiled, device, runs)
    result = KernelResult(name, shape, triton_ms, torch_ms, compiled_ms, nbytes, flops, _err(got, want))
    result.gb_per_s = nbytes / triton_ms / 1e6
    result.tflop_per_s = flops / triton_ms / 1e9
    return result


def format_report(device_name: str, rates: dict, results: list[KernelResult]) -> str:
    lines = [
        f"{device_name}: copy {rates['copy_gb_per_s']:.0f} GB/s, {rates['matmul_dtype']} matmul "
        f"{rates['matmul_tflop_per_s']:.1f} TFLOP/s (measured)",
        f"{'kernel':<40} {'shape':<36} {'triton':>9} {'torch':>9} {'compiled':>9} {'GB/s':>7} {'% bw':>5} "
        f"{'TFLOP/s':>8} {'max err':>8}",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.name:<40} {r.shape:<36} FAILED: {r.error}")
            continue
        compiled = f"{r.compiled_ms:.3f}" if r.compiled_ms is not None else "-"
        lines.append(
            f"{r.name:<40} {r.shape:<36} {r.triton_ms:>9.3f} {r.torch_ms:>9.3f} {compiled:>9} "
            f"{r.gb_per_s:>7.0f} {100 * r.bandwidth_share:>4.0f}% {r.tflop_per_s:>8.2f} {r.max_err:>8.1e}"
        )
    lines.append("times in ms, medians; GB/s and TFLOP/s are the Triton kernel's")
    return "\n".join(lines)


def to_json(device_name: str, rates: dict, results: list[KernelResult]) -> str:
    return json.dumps(
        {"device": device_name, "rates": rates, "results": [asdict(r) for r in results]}, indent=2
    )
