"""Host synchronisations: the aten ops that make the host wait for the device, recorded while code runs.

A decode step is meant to be a device program: from its inputs to its sampled ids nothing may read a
device value on the host (`.item()`, `.tolist()`, `int(t)`), produce a shape that depends on device
values (`nonzero`, boolean-mask indexing, `unique`, `bincount`, `repeat_interleave` without
`output_size`), or copy device memory to the host. `SyncRecorder` names every such op as it runs, on any
device, so a CPU test sees what a GPU would wait for. The step's one copy of its sampled ids back to the
host is made under `allowed_copy_back()`; anything else is a finding.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose result the host must wait for (a scalar read, or an output shape known only on the device)
_WAITING = {
    aten._local_scalar_dense.default: "a device value read on the host (.item(), int(), bool(), .tolist())",
    aten.nonzero.default: "nonzero: output shape depends on device values",
    aten.nonzero_static.default: None,  # fixed size: fine
    aten.masked_select.default: "masked_select: output shape depends on device values",
    aten._unique2.default: "unique: output shape depends on device values",
    aten.unique_dim.default: "unique: output shape depends on device values",
    aten.unique_consecutive.default: "unique_consecutive: output shape depends on device values",
    aten.bincount.default: "bincount: output size depends on the largest device value",
    aten.equal.default: "torch.equal: a device comparison read on the host",
    aten.is_nonzero.default: "a device value read on the host (truth value of a tensor)",
}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


class SyncRecorder(TorchDispatchMode):
    """Records (op, reason) for every op that waits for the device; `allowed_copy_back()` marks the
    one permitted copy of a step's results to the host."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._allowed = 0
        self._reading = 0  # inside a patched Tensor method (its _local_scalar_dense is the same finding)
        self._saved: dict[str, object] = {}

    # Reading a value on the host does not always reach the dispatcher (inference mode, CPU fast paths),
    # so the Tensor methods that do it are watched too while the recorder is active.
    _READERS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")

    def __enter__(self):
        for name in self._READERS:
            self._saved[name] = method = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._watched(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved.clear()
        return super().__exit__(*exc)

    def _watched(self, name: str, method):
        def read(tensor, *args, **kwargs):
            if not self._allowed and not self._reading:
                self.found.append((f"Tensor.{name}", "a device value read on the host"))
            self._reading += 1
            try:
                return method(tensor, *args, **kwargs)
            finally:
                self._reading -= 1

        return read

    @contextmanager
    def allowed_copy_back(self):
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = self._reason(func, args, kwargs)
        if reason is not None and not self._allowed and not self._reading:  # a read: named once
            self.found.append((str(func), reason))
        return func(*args, **kwargs)

    @staticmethod
    def _reason(func, args, kwargs) -> str | None:
        if func in _WAITING:
            return _WAITING[func]
        if func in _REPEAT and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size: output shape depends on device values"
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                return "boolean-mask indexing: output shape depends on device values"
        if func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                return "a copy from the device to the host"
        return None
