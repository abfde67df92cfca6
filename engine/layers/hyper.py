"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4): `hc_mult` residual streams per token.

Legend: T tokens, N streams (hc_mult), D hidden size.
Before each block the streams are collapsed into its input with weights `pre`; after it, the output is
spread back with weights `post` and the old streams are mixed by `comb`, a matrix projected towards the
doubly-stochastic ones by Sinkhorn-Knopp iterations. All three come from the streams themselves
through one small projection. Everything here runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds4.kernels import triton_enabled


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x times its inverse RMS over the last dim (rounded to x's dtype first); one kernel on the Triton
    path."""
    if x.stride(-1) == 1 and triton_enabled(x.device):
        from ds4.kernels.rmsnorm import rmsnorm

        return rmsnorm(x, None, eps)[0]
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class HyperConnection(nn.Module):
    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        width = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(width, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty(width))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [T, N, D] -> (post [T, N], comb [T, N, N], the collapsed block input [T, D])."""
        hc, eps = self.hc, self.hc_eps
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        mix = F.linear(flat, self.fn.float())  # [T, (2 + N) * N]
        if triton_enabled(streams.device):
            from ds4.kernels.small_ops import mhc_mix

            return mhc_mix(mix, self.base, self.scale, streams, self.iters, eps)
        pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps  # [T, N]
        post = 2 * torch.sigmoid(post_w * post_s + post_b)  # [T, N]
        comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.iters - 1):  # Sinkhorn-Knopp: rows, then columns
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)  # [T, D]
        return post, comb, collapsed


def hyper_update(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor):
    """New streams: the block output spread by `post` plus the old streams mixed by `comb` (one kernel on
    the Triton path)."""
    if streams.dim() == 3 and triton_enabled(streams.device):
        from ds4.kernels.streams import hyper_update as hyper_update_kernel

        return hyper_update_kernel(streams, block_out, post, comb)
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + torch.matmul(
        comb.to(dtype).transpose(-1, -2), streams
    )  # [T, N, D]


class HyperHead(nn.Module):
    """The final collapse of the streams before the output norm."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty(hc_mult))
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms_norm(streams.flatten(1).float(), self.norm_eps)
        pre = (
            torch.sigmoid(F.linear(flat, self.fn.float()) * self.scale.float() + self.base.float())
            + self.hc_eps
        )
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)  # [T, D]
