"""`Linear`: the model's dense layers. An nn.Linear, except that on the CPU, where the loader has laid its
weight out row by row for it (`use_cpu_kernel`: weights of `kernel_min_bytes()` or more), products of a
few rows (decode) run in ds4's C++ kernel (ds4.kernels.cpu_moe.linear): torch's matrix-vector product
reads a weight at 13-25 GB/s on the machines measured, the kernel at close to the machine's read
bandwidth (docs/perf.md). Longer products (prefill) stay with torch's GEMM. The choice is one opaque op:
the C++ operator `ds4_cpu::linear` (ds4.kernels.cpu_ops), which a compiled step's C++ wrapper calls with
no Python in between, or where that cannot be built, the Python custom op `ds4::cpu_linear`."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_ROWS = 32  # rows of x up to which the kernel runs; past them, torch's GEMM (measured: docs/perf.md)


def kernel_min_bytes() -> int:
    """The smallest weight the kernel takes: a call into it costs more than torch's own (the op's Python and
    ctypes, 15-20 us from the compiled step's C++ wrapper), which a smaller matrix does not win back. From
    256 KB up the kernel wins: on the `small` presets, 1.12-1.15x a batch-1 step and 1.12-1.17x at batch
    32 against 2 MB (docs/perf.md). Every real DeepSeek matrix is far larger; `DS4_CPU_DENSE_MIN_BYTES`
    overrides it (the tests set 0, so the tiny models' layers run in the kernel too)."""
    return int(os.environ.get("DS4_CPU_DENSE_MIN_BYTES", 256 << 10))


_CPU_OP = None  # torch.ops.ds4_cpu.linear once built and loaded (`prepare_cpu_kernel`)


def prepare_cpu_kernel() -> None:
    """Builds (once per machine) and loads the C++ operator the kernel's layers call; the loader calls it
    where it lays a weight out for the kernel. Where it cannot be built (or DS4_CPU_OPS=python), the layers
    call the Python custom op: the same kernel and bits, about 20 us more a call."""
    global _CPU_OP
    from ds4.kernels import cpu_ops

    if _CPU_OP is None and cpu_ops.load() is None:
        _CPU_OP = torch.ops.ds4_cpu.linear


class Linear(nn.Linear):
    use_cpu_kernel = False  # set by the loader where the weight is on the CPU, row by row, in a kernel format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_cpu_kernel or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if _CPU_OP is not None:
            y = _CPU_OP(x, self.weight)
        elif torch.compiler.is_compiling():
            y = cpu_linear(x, self.weight)
        else:
            y = _product(x, self.weight)
        return y if self.bias is None else y + self.bias


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > KERNEL_ROWS:
        return F.linear(x, weight)
    from ds4.kernels.cpu_moe import linear

    return linear(rows, weight).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("ds4::cpu_linear", mutates_args=())
def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T on the CPU: in ds4's kernel for up to KERNEL_ROWS rows, else torch's GEMM."""
    return _product(x, weight)


@cpu_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
