"""Two kernels a card refuses though Triton's interpreter runs them (for tests/kernels/test_targets.py):
a loop that leaves early with `break` (plain Python to the interpreter; Triton's compiler has no such
statement), and one whose pipelined tiles need more shared memory than an RTX 4090 gives a block
(99 KiB), though less than an H100's (227 KiB)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def early_exit_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] = the sum of x's blocks up to the first whose sum is negative."""
    total = 0.0
    for start in range(0, n, BLOCK):
        part = tl.sum(tl.load(x_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < n))
        if part < 0:
            break
        total += part
    tl.store(out_ptr, total)


@triton.jit
def wide_tiles_kernel(
    a_ptr, b_ptr, out_ptr, k_in, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    m, n, k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k_in, BLOCK_K):
        a = tl.load(a_ptr + m[:, None] * k_in + start + k[None, :])
        b = tl.load(b_ptr + (start + k[:, None]) * BLOCK_N + n[None, :])
        acc += tl.dot(a, b)
    tl.store(out_ptr + m[:, None] * BLOCK_N + n[None, :], acc)
