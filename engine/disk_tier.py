"""The prefix cache's disk tier: full, named blocks as safetensors files, so that a new process reuses a
prefix an earlier one computed.

One file per block, named by its hash, under a folder per model fingerprint. A file is used only if its
format version, fingerprint, hash chain and token ids all check out and its tensors have the pool's
shapes; anything else (corrupt, truncated, foreign, stale) is skipped with a warning, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ds4.engine.blocks import block_hash
from ds4.engine.loader import CACHE_FORMAT_VERSION

log = logging.getLogger("ds4.engine.disk_tier")


class DiskTier:
    def __init__(self, root: str | Path, fingerprint: bytes):
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint.hex()[:32]
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, h: bytes) -> Path:
        return self.dir / f"{h.hex()}.safetensors"

    def has(self, h: bytes) -> bool:
        return self.path(h).is_file()

    def save(
        self, h: bytes, parent: bytes, token_ids: tuple[int, ...], tensors: dict[str, torch.Tensor]
    ) -> None:
        """Writes a block atomically (temporary file, then rename); an existing file is kept."""
        final = self.path(h)
        if final.exists():
            return
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        metadata = {
            "checksum": _checksum(tensors),
            "format": str(CACHE_FORMAT_VERSION),
            "fingerprint": self.fingerprint.hex(),
            "hash": h.hex(),
            "parent": parent.hex(),
            "token_ids": json.dumps(list(token_ids)),
        }
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(final)

    def load(self, h: bytes, parent: bytes, token_ids: tuple[int, ...], like: dict[str, torch.Tensor]):
        """The block's tensors if its file checks out against everything expected, else None (warned)."""
        file = self.path(h)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                problem = self._check_metadata(meta, h, parent, token_ids)
                if problem is None and set(f.keys()) != set(like):
                    problem = "its tensors are not this cache's"
                tensors = {} if problem else {name: f.get_tensor(name) for name in like}
                if problem is None and _checksum(tensors) != meta.get("checksum"):
                    problem = "its contents do not match their checksum (corrupt)"
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
            problem = f"unreadable ({e})"
        if problem is None:
            problem = next(
                (
                    f"tensor {n} has shape {tuple(t.shape)} {t.dtype}"
                    for n, t in tensors.items()
                    if t.shape != like[n].shape or t.dtype != like[n].dtype
                ),
                None,
            )
        if problem is not None:
            log.warning("ignoring prefix-cache file %s: %s", file, problem)
            return None
        return tensors

    def _check_metadata(self, meta: dict, h: bytes, parent: bytes, token_ids: tuple[int, ...]) -> str | None:
        if meta.get("format") != str(CACHE_FORMAT_VERSION):
            return f"format {meta.get('format')!r}, expected {CACHE_FORMAT_VERSION}"
        if meta.get("fingerprint") != self.fingerprint.hex():
            return "written for another model or dtype"
        if meta.get("hash") != h.hex() or meta.get("parent") != parent.hex():
            return "its hash chain does not match its name"
        if tuple(json.loads(meta.get("token_ids", "[]"))) != token_ids:
            return "its token ids differ from the prompt's"
        if block_hash(parent, token_ids, self.fingerprint) != h:
            return "its hash does not match its tokens"
        return None


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
