"""A decode step's integer inputs, built on the host and sent to the device in one copy.

Token ids, positions, each new token's cache row, the block table and the sequence lengths are packed
into one int64 staging buffer (pinned on a CUDA host, so the copy is asynchronous and never waits for
the device) and viewed apart on the device. Nothing here reads a device value.
"""

from __future__ import annotations

import torch

from ds4.engine.context import DecodeBatch, SeqSlice


class StepInputs:
    """Packs decode steps for one device; reuses its staging buffer (a step's copy has completed by the
    time the next step is packed: each step ends with its sampled ids copied back)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.staging = torch.empty(0, dtype=torch.int64)
        self.positions = torch.arange(0, device=device)  # 0, 1, ...: spans are views of it

    def span(self, length: int) -> torch.Tensor:
        """[length] positions 0, 1, ... on the device (a view of one buffer, grown by doubling)."""
        if self.positions.shape[0] < length:
            self.positions = torch.arange(max(length, 2 * self.positions.shape[0]), device=self.device)
        return self.positions[:length]

    def decode(
        self,
        token_ids: list[int],
        seqs: list[SeqSlice],
        block_size: int,
        width: int = 0,
        state_rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, DecodeBatch]:
        """(input ids [B], positions [B], the batch) for sequences adding one token each; the block table
        is `width` blocks wide, or as wide as the longest sequence needs. The batch's slot rows are each
        new token's latent cache row, or, over V4's pooled state, the sequences' `state_rows`."""
        tables = [s.block_ids for s in seqs]
        assert all(t is not None for t in tables), "a decode batch needs every sequence's block ids"
        width = max(width, max(len(t) for t in tables))
        rows = state_rows or [
            s.block_ids[s.start // block_size] * block_size + s.start % block_size for s in seqs
        ]
        flat = [b for t in tables for b in (*t, *[0] * (width - len(t)))]
        ends = [s.end for s in seqs]
        host = self._stage([*token_ids, *(s.start for s in seqs), *rows, *ends, *flat])
        data = host.to(self.device, non_blocking=True)
        B = len(seqs)
        ids, positions, slot_rows, lens = data[:B], data[B : 2 * B], data[2 * B : 3 * B], data[3 * B : 4 * B]
        table = data[4 * B :].view(B, width).to(torch.int32)
        batch = DecodeBatch(slot_rows, table, lens.to(torch.int32), self.span(max(ends)))
        return ids, positions, batch

    def _stage(self, values: list[int]) -> torch.Tensor:
        if self.staging.numel() < len(values):
            self.staging = torch.empty(
                max(len(values), 2 * self.staging.numel()), dtype=torch.int64, pin_memory=self.pinned
            )
        host = self.staging[: len(values)]
        host.copy_(torch.tensor(values, dtype=torch.int64))
        return host


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for it (pinned, asynchronous on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
