"""ds4's CPU kernels as torch operators (`torch.ops.ds4_cpu.*`, cpu_ops.cpp): built at first use with g++
against torch's headers (about 10 s, once per source, torch, compiler and CPU, in the same cache folder as
the ctypes kernel), then loaded into the process. A compiled decode step calls them from its C++ wrapper
without Python. Where they cannot be built, `load()` says why once, as a warning, and callers keep the
Python custom ops, which run the same kernel through ctypes (slower calls, the same bits)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ds4.kernels import cpu_moe

SOURCE = Path(__file__).with_name("cpu_ops.cpp")
ATTENTION_SOURCE = Path(__file__).with_name("cpu_attention.cpp")  # included by SOURCE
_state: dict[str, str | None] = {}  # "error": None once loaded, else why not
READY = False  # the operators are loaded (callers read this; `load()` sets it)


def load() -> str | None:
    """Builds and loads the operator library once per process: None when `torch.ops.ds4_cpu` is ready,
    else why it is not (reported once as a RuntimeWarning; DS4_CPU_OPS=python turns it off quietly)."""
    if os.environ.get("DS4_CPU_OPS") == "python":
        return "turned off by DS4_CPU_OPS=python"
    global READY
    if "error" not in _state:
        try:
            _state["error"] = _load()
        except (RuntimeError, OSError) as e:
            _state["error"] = str(e)
        if _state["error"] is not None:
            warnings.warn(
                f"ds4's CPU operators could not be built ({_state['error']}); the CPU kernels are called "
                "through Python instead (slower calls, same results)",
                RuntimeWarning,
                stacklevel=2,
            )
    READY = _state["error"] is None
    return _state["error"]


def _load() -> str | None:
    if not cpu_moe.available():
        return f"the CPU kernel itself is not built: {cpu_moe.build_error()}"
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20"]  # torch's headers: C++20
    flags += cpu_moe.VARIANTS[os.environ.get("DS4_CPU_OPS_VARIANT", "native")]  # tests: narrower builds
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", f"-I{SOURCE.parent}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f for path in cpp_extension.library_paths() for f in (f"-L{path}", f"-Wl,-rpath,{path}")]
    libs += ["-ltorch", "-ltorch_cpu", "-lc10"]
    target = cpu_moe.compile_library(
        SOURCE,
        [SOURCE, ATTENTION_SOURCE, cpu_moe.SOURCE],
        flags,
        "cpu_ops",
        tuple(libs),
        key_extra=torch.__version__,
    )
    torch.ops.load_library(str(target))

    @torch.library.register_fake("ds4_cpu::linear")
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("ds4_cpu::moe")
    def _(x, weights, expert_ids, w13, s13, w2, s2, fmt: int, act8: bool, limit) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("ds4_cpu::paged_latent_attention")
    def _(q, pool, block_table, seq_lens, block_size: int, scale: float, latent: int) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1], latent, dtype=torch.float32)

    @torch.library.register_fake("ds4_cpu::sparse_latent_attention")
    def _(q, pool, rows, scale: float, latent: int) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1], latent, dtype=torch.float32)

    return None
