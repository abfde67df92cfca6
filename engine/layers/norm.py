"""RMSNorm, computed in float32 (as DeepSeek and transformers do).

V3 casts back to the input dtype before the weight; V4 keeps its norm weights in float32 and casts
after (`cast_after_weight`). The two agree exactly in float32.
"""

import torch

from ds4.kernels import triton_enabled


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, cast_after_weight: bool = False):
        super().__init__()
        self.eps = eps
        self.cast_after_weight = cast_after_weight
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._in_kernel(x) and triton_enabled(x.device):
            from ds4.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_after_weight:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)

    def _in_kernel(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernel takes this norm: it normalizes in float32 and multiplies by the weight
        before its one cast, which is V4's order (float32 weights); V3's order (cast, then the weight)
        where the weight has x's dtype: the same in float32, one rounding fewer in bf16."""
        if self.cast_after_weight:
            return self.weight.dtype == torch.float32
        return x.dtype == self.weight.dtype

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): on the Triton path one kernel reads both and writes both."""
        if x.dtype == residual.dtype and self._in_kernel(x) and triton_enabled(x.device):
            from ds4.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        total = residual + x
        return self(total), total
