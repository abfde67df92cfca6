"""V4's compressor decode kernel against the torch decode it replaces (Compressor.decode on the torch path):
the same pooled state after every step (window buffers, overlap halves, the entries in their blocks),
over windows that finish and start, sequences at different positions, the overlapping kind and the plain
one, and a rope over part of the row."""

from __future__ import annotations

import copy

import pytest
import torch

from ds4.engine.config import RopeConfig
from ds4.engine.layers.compressor import Compressor, CompressorPool
from ds4.kernels import forced
from ds4.kernels.compressor import compressor_decode
from tests.kernels.conftest import DEVICE, randn

# the ratio-32 cases pool their window in two blocks of slots; the float16 one keeps its entries in a
# model's dtype, as the attention's pools do (rounded once, on the way in)
F32, F16 = torch.float32, torch.float16
CASES = [
    (4, True, 24, 8, F32),
    (8, False, 20, 12, F32),
    (2, True, 16, 16, F32),
    (32, False, 16, 8, F32),
    (32, True, 12, 4, F32),
    (4, True, 24, 8, F16),
]


@pytest.mark.parametrize("ratio, overlap, dim, rope_dim, dtype", CASES)
def test_the_kernel_leaves_the_state_the_torch_decode_leaves(gen, ratio, overlap, dim, rope_dim, dtype):
    hidden, block_size, slots = 32, max(16, ratio), 3
    rope = RopeConfig(theta=10000.0)
    module = Compressor(hidden, dim, ratio, overlap, 1e-6, rope, rope_dim).to(DEVICE)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(gen, *p.shape, scale=0.5))
    want = CompressorPool(slots + 1, ratio, dim, overlap, 12, block_size, DEVICE, dtype)
    for t in want.tensors():
        t.copy_(randn(gen, *t.shape))  # stale state: only what the positions make live may matter
    got = copy.deepcopy(want)
    table = torch.tensor([[5, 2, 7, 9], [0, 3, 6, 10], [1, 4, 8, 11]], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([2, 0, 1], device=DEVICE)
    start = torch.tensor([0, ratio - 1, 2 * ratio + 1], device=DEVICE)  # first window, ending, later
    for step in range(min(2 * ratio + 3, 40)):
        positions = start + step
        x = randn(gen, 3, hidden)
        with torch.no_grad(), forced(False):
            module.decode(x, want, rows, positions, table)
            cos, sin = module.rotary(positions // ratio * ratio, torch.float32)
            compressor_decode(
                module.wkv(x), module.wgate(x), got, module.ape, module.norm.weight, 1e-6, cos, sin,
                positions, rows, table,
            )  # fmt: skip
        live = (positions % ratio).tolist()
        for b, row in enumerate(rows.tolist()):  # the buffers' live slots (the rest is stale either way)
            for name in ("buffer_kv", "buffer_gate"):
                a, w = getattr(got, name)[row, : live[b] + 1], getattr(want, name)[row, : live[b] + 1]
                torch.testing.assert_close(a, w, msg=f"{name} at step {step}")
        if overlap:
            torch.testing.assert_close(got.overlap_kv, want.overlap_kv, msg=f"overlap at step {step}")
            torch.testing.assert_close(got.overlap_gate, want.overlap_gate, msg=f"overlap at step {step}")
        bound = 2e-6 if dtype == F32 else 1e-3  # float16: one rounding, maybe a unit apart
        torch.testing.assert_close(
            got.entries, want.entries, atol=bound, rtol=bound, msg=f"entries at {step}"
        )
