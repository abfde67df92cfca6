"""Token counts in the model's own tokens: a checkpoint's tokenizer.json, or an estimate for endpoints
without one; and each file's count as a prompt places it, cached in the index by content hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlite_utils

from ds4.agent.index.query import cached_token_counts, save_token_counts
from ds4.agent.views import FileBlock

BATCH = 256  # files counted per tokenizer call


class TokenCounter:
    """Token counts with a checkpoint's tokenizer.json (no torch), batched; its fingerprint keys caches."""

    def __init__(self, tokenizer_file: str | Path):
        from tokenizers import Tokenizer

        data = Path(tokenizer_file).read_bytes()
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self._tok = Tokenizer.from_str(data.decode())

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


class ApproxCounter:
    """Token estimate for endpoints without a local tokenizer: 1 token per 3.5 characters, rounded up."""

    fingerprint = "approx-3.5"

    def count(self, text: str) -> int:
        return -(-len(text) * 2 // 7)

    def count_batch(self, texts: list[str]) -> list[int]:
        return [self.count(t) for t in texts]


def token_counts(
    db: sqlite_utils.Database, files: list[tuple[int, str, str, str]], counter: TokenCounter
) -> dict[str, int]:
    """Each file's token count as a whole-file block, by path: cached in the index by content hash, else
    counted in batches. `files`: (id, path, hash, text)."""
    cached = cached_token_counts(db, counter.fingerprint)
    todo = [(fid, path, h, text) for fid, path, h, text in files if cached.get(fid, (None,))[0] != h]
    counts = {path: cached[fid][1] for fid, path, h, _ in files if cached.get(fid, (None,))[0] == h}
    for first in range(0, len(todo), BATCH):
        chunk = todo[first : first + BATCH]
        numbers = counter.count_batch([FileBlock(path, text).render() for _, path, _, text in chunk])
        counts.update({path: n for (_, path, _, _), n in zip(chunk, numbers, strict=True)})
        try:
            rows = [(fid, h, n) for (fid, _, h, _), n in zip(chunk, numbers, strict=True)]
            save_token_counts(db, counter.fingerprint, rows)
        except Exception as e:  # a read-only index still packs; the counts are just not cached
            if "readonly" not in str(e):
                raise
    return counts
