"""A CPU stand-in for `torch.cuda.CUDAGraph`, named as such: `RecordedGraph` records the aten ops that run
between `capture_begin` and `capture_end` and re-runs them at `replay` over the same tensors, as a
replayed CUDA graph re-launches its kernels over the same addresses.

What it keeps of a graph's semantics, and so lets a CPU test check:
- Every value a captured piece reads must be in a tensor: a Python number taken from a tensor during the
  capture (or any host read: `.item()`, `.tolist()`, `nonzero`, a copy to the host) makes `capture_end`
  raise, as CUDA refuses such a capture; one computed on the host is baked into the recording, so a replay
  that should have changed it gives wrong values.
- Outputs are rewritten in place: an op that makes a new tensor writes its replayed result into the tensor
  it made at capture; in-place ops re-run on their tensors; views are not re-run (they alias memory the
  replay rewrites; an op that may alias, such as `to`, counts as a view where its output shares its
  input's memory); allocations (`empty`) touch nothing.
- Triton kernels run by Triton's interpreter (the Triton path forced on the CPU) are recorded as launches,
  with their arguments, and launched again at replay.
What it does not model: streams, memory pools, and code that computes outside the dispatcher and Triton
(ds4's CPU expert kernel is called through ctypes: a test keeps it out of captured pieces, as tiered
experts do)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from ds4.engine.syncs import SyncRecorder

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default}
_ALLOCATIONS |= {aten.new_empty.default, aten.new_empty_strided.default}


class _Recorder(SyncRecorder):
    """Records every op it dispatches (and, as SyncRecorder, every host read)."""

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.ops.append((func, args, kwargs or {}, out, _aliases(func, args, out)))
        return out


def _aliases(func, args, out) -> bool:
    """Whether `out` is a view of an input: the schema says it may be (`to`, `reshape` and others may also
    copy) and its memory is an input's."""
    if not any(r.alias_info is not None for r in func._schema.returns) or not isinstance(out, torch.Tensor):
        return False
    memory = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == memory for a in args)


def _replay(func, args, kwargs, out, view: bool) -> None:
    if func in _ALLOCATIONS:
        return
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        func(*args, **kwargs)  # in place: on the recorded tensors
        return
    if view:  # of memory the replay rewrites
        return
    fresh = func(*args, **kwargs)
    tree_map(lambda o, f: o.copy_(f) if isinstance(o, torch.Tensor) else None, out, fresh)


class RecordedGraph:
    """Capture records, replay re-runs (see the module's docstring). A stand-in, CPU tests only."""

    def __init__(self):
        self.ops: list = []
        self._recorder: _Recorder | None = None

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        assert self._recorder is None and not self.ops, "one capture per graph"
        self._recorder = recorder = _Recorder(self.ops)
        recorder.__enter__()
        if _TRITON_RUN is not None:
            InterpretedFunction.run = lambda kernel, *args, **kwargs: _launch(recorder, kernel, args, kwargs)

    def capture_end(self) -> None:
        recorder, self._recorder = self._recorder, None
        if _TRITON_RUN is not None:
            InterpretedFunction.run = _TRITON_RUN
        recorder.__exit__(None, None, None)
        if recorder.found:
            raise RuntimeError(f"operation not permitted when stream is capturing: {recorder.found[0]}")

    def pool(self):
        return ("recorded", id(self))

    def replay(self) -> None:
        for op in self.ops:
            if op[0] == "triton":
                _TRITON_RUN(op[1], *op[2], **op[3])
            else:
                _replay(*op)


# A Triton kernel run by Triton's interpreter (the Triton path forced on the CPU) is a launch as on a card:
# recorded with its arguments (its Python numbers baked in, as a CUDA graph bakes them) and launched again
# at replay. The interpreter's own copies of the arguments are not the kernel's and are not recorded.
try:
    from triton.runtime.interpreter import InterpretedFunction

    _TRITON_RUN = InterpretedFunction.run
except ImportError:  # no Triton: nothing launches kernels
    _TRITON_RUN = None


def _launch(recorder: _Recorder, kernel, args, kwargs):
    recorder.ops.append(("triton", kernel, args, kwargs))
    recorder._reading += 1  # the interpreter reads its arguments on the host: that is not the kernel's
    try:
        with _disable_current_modes():
            return _TRITON_RUN(kernel, *args, **kwargs)
    finally:
        recorder._reading -= 1
