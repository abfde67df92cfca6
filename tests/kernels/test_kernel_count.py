"""How many kernels a decode step launches on the Triton path (the path a GPU runs): a graphed step costs
a launch per kernel, so the count bounds decode at batch 1 (docs/perf.md). Counted on the CPU: every
Triton launch, and every aten op that computes (views and allocations are free), with the dense
products counted as one op each (DS4_CPU_DENSE_MIN_BYTES raised so they stay aten ops, as cuBLAS calls
would). The bounds are today's counts for the tiny presets with a little room: a change that puts chains
of small ops back on the decode path fails here."""

from __future__ import annotations

import collections

import pytest
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from ds4.engine import LLM
from ds4.engine.context import SeqSlice
from ds4.kernels import forced
from tests.kernels.conftest import DEVICE

FREE = {
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "select", "slice", "expand",
    "unsqueeze", "squeeze", "permute", "detach", "detach_", "alias", "empty", "empty_like",
    "empty_strided", "lift_fresh", "split", "split_with_sizes", "unbind", "_reshape_alias", "unflatten",
    "flatten", "narrow", "chunk", "view_as", "to", "sym_size", "sym_stride", "diagonal",
}  # fmt: skip
# kernels per layer a decode step may launch (the counts on 2026-12-05: V3 24.0, V3.2 38.0, V4 96.75, then
# 67.5 with V4's compressor decode in one kernel and its attention over paged rows in place; before that
# day's fusions, the small presets ran 63, 95 and 222)
BOUND = {"tiny_v3": 26, "tiny_v32": 42, "tiny_v4": 72}


class Launches(TorchDispatchMode):
    """Counts the aten ops that compute, and (through `launched`) the Triton kernels; the aten ops the
    interpreter itself runs inside a kernel are not counted."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.depth == 0 and name not in FREE:
            self.count[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    def launched(self, run):
        def counted(fn, *args, **kwargs):
            if self.depth == 0:
                self.count[f"triton.{fn.fn.__name__}"] += 1
            self.depth += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                self.depth -= 1

        return counted


@pytest.mark.skipif(DEVICE != "cpu", reason="counts Triton launches through the CPU interpreter")
@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32", "tiny_v4"])
def test_a_decode_step_launches_few_kernels_per_layer(request, checkpoint, monkeypatch):
    monkeypatch.setenv("DS4_CPU_DENSE_MIN_BYTES", str(1 << 40))
    llm = LLM(request.getfixturevalue(checkpoint), device=DEVICE)
    runner = llm.runner
    cache = runner.new_cache(2, 300)
    for slot, length in enumerate((37, 60)):
        runner.step(list(range(2, 2 + length)), [SeqSlice(slot, 0, length, 0)], cache)
    with forced(True):
        runner.step([7, 8], [SeqSlice(0, 37, 1, 0), SeqSlice(1, 60, 1, 1)], cache)  # first decode: warm
        launches = Launches()
        monkeypatch.setattr(
            interpreter.InterpretedFunction, "run", launches.launched(interpreter.InterpretedFunction.run)
        )
        with launches:
            runner.step([9, 10], [SeqSlice(0, 38, 1, 0), SeqSlice(1, 61, 1, 1)], cache)
    per_layer = sum(launches.count.values()) / llm.config.num_hidden_layers
    assert any(name.startswith("triton.") for name in launches.count)  # the Triton path ran
    assert per_layer <= BOUND[checkpoint], (per_layer, launches.count.most_common(12))
