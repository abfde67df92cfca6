"""The activation memory of code that runs: the bytes of the tensors it creates, alive at once, at their
peak, counted op by op as the dispatcher sees them, so the figure is the same on every run and device.

What existed before (weights, the cache's preallocated pools) is not counted: a storage counts from the
op that creates it (an output whose storage none of the op's inputs share) until it is freed. What the
code leaves alive when it ends (new cache state, its outputs) is reported apart as `kept`, so
`peak - kept` is the workspace a step needs on top of what it keeps. Temporaries inside one kernel
(a GEMM's packing buffers) are not seen; they do not grow with the context.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class ActivationPeak(TorchDispatchMode):
    """`with ActivationPeak() as a: ...` then a.peak, a.kept and a.workspace (bytes)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id of a counted storage -> its bytes, while it lives

    @property
    def kept(self) -> int:
        """Bytes of the counted storages still alive (read after the block)."""
        return self.live

    @property
    def workspace(self) -> int:
        """The peak less what the code kept: the transient memory it needed."""
        return self.peak - self.kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for t in tree_leaves(out):
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _has_storage(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta" and not t.is_sparse
