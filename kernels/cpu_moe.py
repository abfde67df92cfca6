"""Routed experts on the CPU from their stored codes (int4, FP4, FP8) or float weights (fp32, bf16): the C++
kernel in cpu_moe.cpp, beside its torch reference (dequantize, then matmul).

The kernel is compiled with the system's g++ at first use (about a second: it includes no torch headers)
into a cache folder keyed by the source, the compiler and this CPU, then loaded with ctypes. Where it
cannot be built, `available()` says why once, as a warning, and the engine keeps the torch path (which
dequantizes each expert it uses for the call). int4 activations go in as int8 where the CPU has AVX2 or
AVX-512 VNNI and `DS4_CPU_ACTIVATIONS` does not say float (`fake_int8` is what the reference does to match).
Owns nothing else: callers pick the path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ds4.kernels import cpu_activations_int8, cpu_kernels_enabled

SOURCE = Path(__file__).with_name("cpu_moe.cpp")
FORMATS = {"int4": 0, "fp4": 1, "fp8": 2, "fp32": 3, "bf16": 4}
FLOAT_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16"}  # float experts' weight dtypes
_SCALE_DTYPES = {"int4": torch.bfloat16, "fp4": torch.float8_e8m0fnu, "fp8": torch.float32}
THREAD_BYTES = 128 << 10  # weight bytes per thread: below it, OpenMP's fork and barriers cost more than
# they save. V3 `small`'s int4 experts read 864 KB a layer per token: one thread read them at 17 GB/s in the
# engine, two at 28 (the floor was 512 KB, which kept them on one)
# builds of the kernel: this CPU's best ("native"), and for tests the narrower paths it also has
VARIANTS = {"native": [], "avx2": ["-mno-avx512f", "-mno-avxvnni"], "avx-vnni": ["-mno-avx512f"]}
VARIANTS["generic"] = ["-DDS4_GENERIC"]
ISAS = ("generic", "avx512", "avx512-vnni", "avx2", "avx-vnni")  # ds4_moe_isa's codes
_libs: dict[str, ctypes.CDLL | str] = {}  # variant -> the library, or why it could not be built


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ds4" / "kernels"


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def build(variant: str = "native") -> ctypes.CDLL:
    """The compiled kernel (built once per source, flags, compiler and CPU). `variant`: one of VARIANTS (what
    -march=native gives, less AVX-512, less AVX-512 and AVX-VNNI, or no intrinsics at all)."""
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
    target = compile_library(SOURCE, [SOURCE], flags + VARIANTS[variant], "cpu_moe")
    lib = ctypes.CDLL(str(target))
    lib.ds4_moe.restype = ctypes.c_int
    lib.ds4_moe.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4
    lib.ds4_moe.argtypes += [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    lib.ds4_moe.argtypes += [ctypes.c_int, ctypes.c_void_p]
    lib.ds4_moe_act8.argtypes = [ctypes.c_int]
    lib.ds4_linear.restype = ctypes.c_int
    lib.ds4_linear.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]
    lib.ds4_linear.argtypes += [ctypes.c_void_p, ctypes.c_int]
    return lib


def compile_library(
    source: Path, inputs: list[Path], flags: list[str], stem: str, libs: tuple = (), key_extra: str = ""
) -> Path:
    """`source` compiled with g++ and `flags` (then linked with `libs`, which must follow it) into a shared
    library in the cache folder, once per the `inputs`' text, the flags, the compiler, this CPU (and
    `key_extra`); its path. RuntimeError when it cannot be built."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [p.read_text() for p in inputs]
    key = hashlib.sha256(
        "\0".join([*texts, *flags, *libs, version, _cpu_id(), key_extra]).encode()
    ).hexdigest()
    target = _cache_dir() / f"{stem}-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            command = [compiler, *flags, str(source), "-o", str(out), *libs]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"g++ failed: {run.stderr.strip()[-1000:]}")
            os.replace(out, target)  # atomic: concurrent builders agree
    return target


def _library(variant: str = "native") -> ctypes.CDLL | str:
    if variant not in _libs:
        try:
            _libs[variant] = build(variant)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _libs[variant] = str(e)
            warnings.warn(
                f"the CPU expert kernel could not be built ({e}); routed experts on the CPU are dequantized "
                "for each call instead (slower, same results)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _libs[variant]


def available(variant: str = "native") -> bool:
    """Whether the kernel is built and loaded; the first failure is reported as a RuntimeWarning."""
    return not isinstance(_library(variant), str)


def usable() -> bool:
    """Whether the engine takes the kernel: not turned off (DS4_CPU_KERNELS=torch, `cpu_kernels(False)`)
    and built (the build, once per machine, and a failure reported once as a warning)."""
    return cpu_kernels_enabled() and available()


def build_error(variant: str = "native") -> str | None:
    """Why the kernel could not be built, or None when it is loaded."""
    lib = _library(variant)
    return lib if isinstance(lib, str) else None


def isa(variant: str = "native") -> str:
    lib = _library(variant)
    assert not isinstance(lib, str), lib
    return ISAS[lib.ds4_moe_isa()]


def takes_int8(fmt: str, variant: str = "native") -> bool:
    """Whether the kernel can take `fmt`'s activations quantized to int8 (int4, with AVX2 or AVX-512 VNNI)."""
    lib = _library(variant)
    return not isinstance(lib, str) and bool(lib.ds4_moe_act8(FORMATS[fmt]))


def supports(fmt: str, hidden: int, inter: int) -> bool:
    """The kernel's formats and shapes: inputs in whole groups of 32."""
    return fmt in FORMATS and hidden % 32 == 0 and inter % 32 == 0


def moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    fmt: str,
    limit: float | None,
    threads: int | None = None,
    variant: str = "native",
    int8: bool | None = None,
    seconds: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, D] in x's dtype: sum over k of weights[t, k] * expert_ids[t, k](x[t]), the experts of the stacks
    w13 [E, 2I, ...] and w2 [E, D, ...] stored in `fmt` with scales s13, s2 (float formats: the weights
    themselves, in fp32 or bf16, and no scales). Pairs whose id is -1 are
    skipped (their experts are computed elsewhere). `threads`: default torch's, one per THREAD_BYTES read.
    `int8`: the activations (x, and SwiGLU's output) quantized to int8 per group of 32, as
    reference_moe(int8=True) does; by default where the kernel can, unless DS4_CPU_ACTIVATIONS=float.
    `seconds`: a float64 [1] the kernel adds its time to (its own clock: no Python in it)."""
    lib = _library(variant)
    assert not isinstance(lib, str), lib
    if int8 is None:
        int8 = cpu_activations_int8() and takes_int8(fmt, variant)
    T, K = expert_ids.shape
    E, D, inter = w13.shape[0], x.shape[1], w2.shape[-1] * (2 if fmt in ("int4", "fp4") else 1)
    assert supports(fmt, D, inter), f"format {fmt} with hidden {D}, intermediate {inter}"
    assert w13.device.type == w2.device.type == "cpu" and w13.is_contiguous() and w2.is_contiguous()
    if fmt in _SCALE_DTYPES:
        assert s13.dtype == s2.dtype == _SCALE_DTYPES[fmt], f"{fmt} scales {s13.dtype}, {s2.dtype}"
        assert s13.is_contiguous() and s2.is_contiguous() and w13.element_size() == 1
    else:
        assert FLOAT_FORMATS.get(w13.dtype) == FLOAT_FORMATS.get(w2.dtype) == fmt, (fmt, w13.dtype, w2.dtype)
        assert s13 is None and s2 is None, "float experts have no scales"
    xf, ids, wf = _plain(x, torch.float32), _plain(expert_ids, torch.int64), _plain(weights, torch.float32)
    if seconds is None:
        seconds = torch.zeros(1, dtype=torch.float64)
    assert seconds.dtype == torch.float64 and seconds.device.type == "cpu", seconds
    out = torch.empty(T, D, dtype=torch.float32)
    work = torch.empty(T * K * (2 * D + 3 * inter), dtype=torch.float32)  # activations only
    if threads is None:  # a thread per 512 KB of codes: fewer forks and barriers for small layers
        expert_bytes = (w13[0].nbytes if E else 0) + (w2[0].nbytes if E else 0)
        threads = max(1, min(torch.get_num_threads(), min(T * K, E) * expert_bytes // THREAD_BYTES))
    rc = lib.ds4_moe(
        xf.data_ptr(), ids.data_ptr(), wf.data_ptr(), T, K, E, D, inter,
        w13.data_ptr(), _address(s13), w2.data_ptr(), _address(s2),
        FORMATS[fmt], int(int8), float("nan") if limit is None else float(limit),
        out.data_ptr(), work.data_ptr(), threads, seconds.data_ptr(),
    )  # fmt: skip
    assert rc == 0, f"ds4_moe returned {rc}"
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None, variant: str = "native"):
    """x [T, in] @ weight.T in x's dtype, for a float32 or bfloat16 weight [out, in] stored row by row
    (contiguous) on the CPU, in the kernel (decode shapes: a few rows; the weight is read once per 4)."""
    lib = _library(variant)
    assert not isinstance(lib, str), lib
    fmt = FLOAT_FORMATS[weight.dtype]
    (T, n_in), n_out = x.shape, weight.shape[0]
    assert weight.is_contiguous() and weight.device.type == "cpu" and n_in == weight.shape[1], weight.shape
    xf = _plain(x, torch.float32)
    out = torch.empty(T, n_out, dtype=torch.float32)
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), weight.nbytes // THREAD_BYTES))
    w, y = weight.data_ptr(), out.data_ptr()
    rc = lib.ds4_linear(xf.data_ptr(), T, n_in, n_out, w, FORMATS[fmt], y, threads)
    assert rc == 0, f"ds4_linear returned {rc}"
    return out.to(x.dtype)


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous CPU tensor of dtype, without a copy (or a dispatch) when it already is one."""
    if t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous():
        return t
    return t.detach().to(device="cpu", dtype=dtype).contiguous()


def reference_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    fmt: str,
    limit: float | None,
    int8: bool = False,
) -> torch.Tensor:
    """The same sum in float32, each expert dequantized (float formats: widened) and multiplied (pairs with
    id -1 skipped); `int8`: each expert's inputs and SwiGLU outputs first rounded to int8 per group of 32
    (fake_int8)."""
    from ds4.engine.quant import dequantize

    def weight(stack: torch.Tensor, scales: torch.Tensor | None, e: int) -> torch.Tensor:
        return stack[e].float() if scales is None else dequantize(fmt, stack[e], scales[e])

    act = fake_int8 if int8 else (lambda v: v.float())
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t, k in sorted(
        ((t, k) for t in range(x.shape[0]) for k in range(expert_ids.shape[1]) if expert_ids[t, k] >= 0),
        key=lambda tk: (int(expert_ids[tk]), tk[0]),
    ):
        e = int(expert_ids[t, k])
        gate, up = F.linear(act(x[t]), weight(w13, s13, e)).chunk(2)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        out[t] += weights[t, k].float() * F.linear(act(F.silu(gate) * up), weight(w2, s2, e))
    return out.to(x.dtype)


def fake_int8(v: torch.Tensor) -> torch.Tensor:
    """v [..., n] in float32 as the kernel's int8 activations hold it: per group of 32, scaled so the
    largest magnitude maps to 127 and rounded to nearest (even), then scaled back."""
    g = v.float().reshape(-1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return ((g * inv).round() * (amax / 127.0)).view(v.shape)
