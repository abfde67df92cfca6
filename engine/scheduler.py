"""The scheduler: which sequences run in the next step, and how many of their tokens.

Plain Python over integers (`num_computed_tokens`, `num_tokens`), no tensors. Continuous batching under
a per-step token budget: running sequences first (decodes and unfinished chunked prefills), then
waiting ones in arrival order, admitted when their blocks fit (a prefix-cache hit needs none for the
reused part). Under memory pressure the most recently admitted running sequence is preempted: its
blocks are released (named ones stay cached) and it is recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ds4.engine.blocks import BlockManager, BlockTable


@dataclass
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # tokens reused from the prefix cache, over all admissions
    table: BlockTable = field(default_factory=BlockTable)
    status: str = "waiting"  # waiting | running | finished

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class ScheduledBatch:
    """One step: each sequence with the number of its tokens to compute now (from num_computed_tokens)."""

    entries: list[tuple[Sequence, int]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_seqs > 0 and max_num_batched_tokens > 0, (max_num_seqs, max_num_batched_tokens)
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_reused_tokens = 0  # served from the prefix cache, over all admissions
        self.num_preemptions = 0
        self.suspects: list[Sequence] = []  # from a failed batch: each runs alone until it samples again

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self.suspects = [s for s in self.suspects if s.status != "finished"]
        if self.suspects:
            batch = self._schedule_alone(self.suspects[0])
            if batch is not None:
                return batch
            self.suspects.clear()  # no room to run it alone: back to batching
        budget, entries, preempted = self.max_num_batched_tokens, [], []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != "running":  # preempted while making room for an earlier one
                continue
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            while (
                self.blocks.blocks_needed(seq.table, seq.num_computed_tokens + n)
                > self.blocks.num_free_blocks
            ):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != "running":
                continue
            self.blocks.allocate(seq.table, seq.num_computed_tokens + n)
            entries.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            self.running.append(seq)
            entries.append((seq, n))
            budget -= n
        return ScheduledBatch(entries, preempted)

    def isolate(self, seqs: list[Sequence]) -> None:
        """After a failed step: its sequences give back their blocks and rerun one at a time (recomputing
        what they had), so the one that fails the step fails alone."""
        for seq in reversed(seqs):
            if seq.status == "running":
                self._preempt(seq)
        self.suspects = [s for s in seqs if s.status == "waiting"]

    def cleared(self, seq: Sequence) -> None:
        """`seq` ran alone through a step that sampled from it: it is no longer a suspect."""
        if seq in self.suspects:
            self.suspects.remove(seq)

    def _schedule_alone(self, seq: Sequence) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        if seq.status == "waiting":
            if len(self.running) >= self.max_num_seqs:
                return None
            n = self._admit(seq, budget)
            if n == 0:
                return None
            self.waiting.remove(seq)
            self.running.append(seq)
        else:
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            if self.blocks.blocks_needed(seq.table, end) > self.blocks.num_free_blocks:
                return None
            self.blocks.allocate(seq.table, end)
        return ScheduledBatch([(seq, n)])

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Reserves blocks for as much of `seq` as fits (prefix hits first); 0 when nothing fits."""
        hits = self.blocks.match_prefix(seq.token_ids, max_tokens=seq.num_tokens - 1)  # >= 1 token to run
        computed = len(hits) * self.blocks.block_size
        n = self._chunk(seq, computed, budget)
        reused_free = sum(self.blocks.blocks[b].ref_count == 0 for b in hits)  # hits sitting in the LRU pool
        needed = -(-(computed + n) // self.blocks.block_size) - len(hits)
        if needed + reused_free > self.blocks.num_free_blocks:
            return 0
        self.blocks.take_cached(seq.table, hits)
        self.blocks.allocate(seq.table, computed + n)
        seq.num_computed_tokens, seq.status = computed, "running"
        seq.num_cached_tokens += computed
        self.num_reused_tokens += computed
        return n

    def _chunk(self, seq: Sequence, computed: int, budget: int) -> int:
        return min(seq.num_tokens - computed, budget)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.blocks.free(seq.table)
        self.running.remove(seq)
        seq.num_computed_tokens, seq.status = 0, "waiting"
        self.waiting.appendleft(seq)

    def advance(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Counts a step's tokens as computed and names the blocks they completed; returns
        (sequence, block id) for each block named."""
        named = []
        for seq, n in batch.entries:
            seq.num_computed_tokens += n
            named += [
                (seq, b)
                for b in self.blocks.register_full_blocks(seq.table, seq.token_ids, seq.num_computed_tokens)
            ]
        return named

    def finish(self, seq: Sequence) -> None:
        """A finished or cancelled sequence gives back its blocks (named ones stay cached)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        seq.status = "finished"

    def check_integrity(self) -> None:
        self.blocks.check_integrity([s.table for s in self.running])
        assert all(not s.table.block_ids for s in self.waiting), "a waiting sequence holds blocks"
        assert len(self.running) <= self.max_num_seqs
