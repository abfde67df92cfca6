"""Block bookkeeping for the paged cache: which block holds what, who uses it, what can be reused.

Pure Python over integers, no tensors. A block holds `block_size` consecutive tokens of one sequence.
A full block is named by a hash chain H(parent hash, its token ids, model fingerprint); a named block
outlives its sequences in a least-recently-used pool until its slot is needed, so a later request with
the same prefix reuses it. A hit is verified against the stored token ids, never trusted on the hash.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field


def block_hash(parent: bytes, token_ids: tuple[int, ...], fingerprint: bytes) -> bytes:
    digest = hashlib.sha256(parent)
    digest.update(fingerprint)
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered
    parent: bytes = b""  # the previous block's hash in the chain
    token_ids: tuple[int, ...] = ()


@dataclass
class BlockTable:
    """A sequence's blocks, in order, and the hashes of its full ones."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, fingerprint: bytes, enable_prefix_caching: bool = True
    ):
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.block_size, self.fingerprint = block_size, fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # never named, or evicted
        self.cached: OrderedDict[int, None] = OrderedDict()  # named, unreferenced: LRU first
        self.hash_to_block: dict[bytes, int] = {}
        self.on_evict = None  # called with a block id whose cached contents are dropped

    # -- capacity -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.cached)

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """New blocks a table needs to hold `num_tokens` tokens in all."""
        return max(0, -(-num_tokens // self.block_size) - len(table.block_ids))

    # -- prefix cache ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Cached blocks holding the longest prefix of `token_ids` (whole blocks, at most `max_tokens`)."""
        if not self.enable_prefix_caching:
            return []
        matched, parent = [], b""
        for i in range(max_tokens // self.block_size):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens, self.fingerprint)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:  # verified, not trusted
                break
            matched.append(block_id)
            parent = h
        return matched

    def take_cached(self, table: BlockTable, block_ids: list[int]) -> None:
        """Starts `table` with cache-hit blocks (their references counted)."""
        assert not table.block_ids, "a prefix hit starts an empty table"
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.cached.pop(block_id)
            block.ref_count += 1
            table.block_ids.append(block_id)
            table.hashes.append(block.hash)

    # -- allocation -----------------------------------------------------------------------------

    def allocate(self, table: BlockTable, num_tokens: int) -> None:
        """Grows `table` to hold `num_tokens` tokens; the caller checked `blocks_needed` fits."""
        needed = self.blocks_needed(table, num_tokens)
        assert needed <= self.num_free_blocks, f"{needed} blocks needed, {self.num_free_blocks} free"
        for _ in range(needed):
            block = self.blocks[self._pop_free()]
            block.ref_count = 1
            table.block_ids.append(block.block_id)

    def _pop_free(self) -> int:
        if self.free_ids:
            return self.free_ids.popleft()
        block_id, _ = self.cached.popitem(last=False)  # evict the least recently used
        block = self.blocks[block_id]
        del self.hash_to_block[block.hash]
        block.hash, block.parent, block.token_ids = None, b"", ()
        if self.on_evict is not None:
            self.on_evict(block_id)
        return block_id

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> list[int]:
        """Names the blocks whose tokens are now all computed; returns the ids newly named."""
        named = []
        while len(table.hashes) < num_computed // self.block_size:
            i = len(table.hashes)
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(table.hashes[-1] if table.hashes else b"", tokens, self.fingerprint)
            table.hashes.append(h)
            block = self.blocks[table.block_ids[i]]
            if self.enable_prefix_caching and block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                block.parent = table.hashes[-2] if len(table.hashes) > 1 else b""
                self.hash_to_block[h] = block.block_id
                named.append(block.block_id)
        return named

    def free(self, table: BlockTable) -> None:
        """Drops a sequence's references; named blocks stay cached (most recently used last)."""
        for block_id in reversed(table.block_ids):  # the tail is evicted before the shared head
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached[block_id] = None
                else:
                    self.free_ids.append(block_id)
        table.block_ids.clear()
        table.hashes.clear()

    def adopt(self, h: bytes, parent: bytes, token_ids: tuple[int, ...]) -> int | None:
        """Names a never-used free block as cached under `h` (its rows come from the disk tier);
        None when no free block is left (cached blocks are not evicted for it)."""
        if h in self.hash_to_block or not self.free_ids or not self.enable_prefix_caching:
            return None
        block = self.blocks[self.free_ids.popleft()]
        block.hash, block.parent, block.token_ids = h, parent, token_ids
        self.hash_to_block[h] = block.block_id
        self.cached[block.block_id] = None
        return block.block_id

    # -- checks ---------------------------------------------------------------------------------

    def check_integrity(self, tables: list[BlockTable]) -> None:
        """Every block is exactly one of: free, cached (named, unreferenced), or referenced by tables."""
        refs = [0] * len(self.blocks)
        for table in tables:
            for block_id in table.block_ids:
                refs[block_id] += 1
        free, cached = set(self.free_ids), set(self.cached)
        assert len(free) == len(self.free_ids) and not free & cached, "a block is listed twice"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: {block.ref_count} refs"
            in_use = block.ref_count > 0
            assert in_use + (block.block_id in free) + (block.block_id in cached) == 1, (
                f"block {block.block_id}"
            )
            if block.block_id in free:
                assert block.hash is None, f"free block {block.block_id} still named"
            if block.hash is not None:
                assert self.hash_to_block[block.hash] == block.block_id, f"block {block.block_id} hash map"
        assert len(self.hash_to_block) == sum(b.hash is not None for b in self.blocks)
