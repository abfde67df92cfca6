"""DeepSeek-V4's residual streams after a block (mHC), in one kernel: each new stream is the block's
output spread by its `post` weight plus the old streams mixed by `comb`, rounded as the torch form
(ds4.engine.layers.hyper.hyper_update) rounds: the spread and the mix each to the streams' dtype, then
their sum. One program per (token, stream, block of the hidden size)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hyper_update_kernel(
    streams_ptr,
    out_block_ptr,
    post_ptr,
    comb_ptr,
    new_ptr,
    dim,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, n = tl.program_id(0), tl.program_id(1)
    d = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = d < dim
    dtype = new_ptr.dtype.element_ty
    base = t.to(tl.int64) * N * dim
    mix = tl.zeros([BLOCK], tl.float32)
    for m in tl.static_range(N):  # comb^T @ streams: stream m weighed by comb[m, n]
        weight = tl.load(comb_ptr + t * N * N + m * N + n).to(dtype).to(tl.float32)
        mix += weight * tl.load(streams_ptr + base + m * dim + d, mask=mask, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * N + n).to(dtype).to(tl.float32)
    block = tl.load(out_block_ptr + t.to(tl.int64) * dim + d, mask=mask, other=0.0).to(tl.float32)
    spread = (post * block).to(dtype).to(tl.float32)
    tl.store(new_ptr + base + n * dim + d, (spread + mix.to(dtype).to(tl.float32)).to(dtype), mask=mask)


def hyper_update(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """New streams [T, N, D] from the old ones [T, N, D], the block output [T, D], post [T, N] and comb
    [T, N, N] (float32)."""
    tokens, n, dim = streams.shape
    streams, block_out = streams.contiguous(), block_out.contiguous()
    post, comb = post.float().contiguous(), comb.float().contiguous()
    new = torch.empty_like(streams)
    if tokens:
        block = min(1024, triton.next_power_of_2(dim))
        _hyper_update_kernel[(tokens, n, triton.cdiv(dim, block))](
            streams, block_out, post, comb, new, dim, N=n, BLOCK=block
        )
    return new
