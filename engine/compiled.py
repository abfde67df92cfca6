"""The decode step compiled for the CPU: `torch.compile` (inductor's generated C++ loops, torch's own GEMMs)
of the model's forward over a decode batch, so a step stops paying Python and aten dispatch per small op.

One graph holds the whole step, every layer included (fullgraph): the batch size and the longest
sequence (the length of `DecodeBatch.span`) are dynamic sizes, so one compile serves every batch and
context length. The routed experts are one opaque op (the C++ operator `ds4_cpu::moe` for a plain
stack, the Python op `ds4::routed_experts` for a tiered one, whose dispatch reads expert ids on the
host, which a traced graph cannot). The dense layers whose weights the CPU kernel reads are another
(`ds4_cpu::linear`, engine/layers/linear.py). Prefill and mixed steps run eagerly.

The cache's tensors are allocated once, for the engine's life (V4's pools and paged rows too), so the
graph takes their sizes as constants (`mark_static`), while the step's own tensors keep dynamic sizes.
Fewer symbols to reason about: V4's warm compile 19 -> 14 s (`small`, docs/perf.md). A cache tensor
that did change size would fail its guard and compile once more.

The first decode step compiles (tens of seconds on two cores; inductor caches its kernels on disk, so a
later process reuses them); a compile that fails is reported once and the runner decodes eagerly.

Guards: dynamo checks, before every call, that what the graph assumed still holds. The model's modules
never change after load (what changes from step to step, the caches and the batch, comes through the
inputs and the forward context, which stay guarded), so the guards on the modules (about 1,000 of 1,700
checks; 0.13-0.21 ms a step on two cores, 2-4% of a `small` preset's batch-1 step, measured side by side
in one process) are dropped. Each runner compiles its own copy of the step's code, since dynamo keeps
graphs per code object: without the module guards, two models of the same shapes would otherwise share a
graph.

The graph's wrapper, the code that calls its kernels, GEMMs and the opaque ops in turn, is C++
(inductor's `cpp_wrapper`), not Python: 1.09-1.19x a `small` preset's batch-1 step and 1.05x at batch 32
(V3, V3.2, V4; measured side by side in one process), for about 30% more compile time (cold). It is
built with the Python headers; where it cannot be built, the step compiles with the Python wrapper.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import types

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ds4.engine.context import get_forward_context

log = logging.getLogger("ds4.engine")

# The weights stay graph inputs, not constants frozen into it (inductor's `freezing`). Freezing once let
# inductor pack the dense weights for its C++ GEMM template; since those layers run in ds4's CPU kernel
# (`ds4_cpu::linear`), a frozen graph decodes no faster (V3 batch 1, V3.2 and V4 batch 32, side by side in
# one process: within 1%), keeps packed copies beside the weights, and cannot use AOTAutograd's cache, so
# each process traced it again: 1.3-1.6x the warm compile time (docs/perf.md). Nor does inductor time its
# GEMM template against torch's (`max_autotune`) for the products left in the graph (small batched ones
# in the runs measured): each timing builds a C++ kernel (3-4 s on two cores), which made cold compiles
# 1.1-2.2x longer (V3.2 `small`, both graphs: 115 against 53 s) for the same decode steps within the
# runs' noise (0.97-1.06x; `small` presets, batches of 1 and 32, side by side in one process;
# docs/perf.md). On a small machine the code is built in this process: a pool of compile workers would
# start (importing torch) beside the engine and slow its first steps for seconds, for a graph compiled
# once.
OPTIONS = {
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,  # see the module's docstring
    "cpp_wrapper": True,  # see the module's docstring
}
if (os.cpu_count() or 1) <= 8:
    OPTIONS["compile_threads"] = 1


def compile_blocker(runner) -> str | None:
    """Why this runner's decode steps cannot run compiled, or None."""
    from ds4.kernels import triton_enabled

    if any(d.type != "cpu" for d in runner.devices):
        return "not on the CPU (a GPU replays CUDA graphs instead)"
    if len(runner.devices) > 1:  # its hand-off counters are Python ints: a recompile at every step
        return "a layer pipeline counts its hand-offs on the host"
    if triton_enabled(runner.device):
        return "the Triton kernels run under their interpreter"
    return None


# graphs dynamo keeps for one runner's copy of the step's code (a batch of one and larger batches are two)
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def _tracing_rules():
    """Every dynamic size its own symbol: by default dynamo gives sizes equal when traced one symbol and
    recompiles when they part (V4's compressed entries and the sequence lengths did, 40 tokens in).

    Floats are constants of the graph (`specialize_float`). By default dynamo traces the modules' float
    attributes (norm epsilons, the attention scale, V4's SwiGLU limit, the embedding's `norm_type`) as
    symbolic inputs; one that reaches an operator's `float` argument must be specialised after all, and
    dynamo then traces the whole step a second time. The step's floats never change (the modules are
    fixed after load, and no step input is a float), so specialising them costs no recompile and halves
    the warm compile: V3 9.3 -> 5.1 s, V3.2 15.0 -> 6.6 s, V4 44 -> 18 s (`small`, docs/perf.md)."""
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, specialize_float=True):
            yield


def _mark_static(value, depth: int = 0) -> int:
    """Marks every tensor reachable from `value` (through lists, tuples, dicts and objects' attributes,
    three levels down) static for dynamo: the graph takes its sizes as constants, not symbols. Returns
    how many were marked."""
    if isinstance(value, torch.Tensor):
        torch._dynamo.mark_static(value)
        return 1
    if depth == 3 or isinstance(value, (str, bytes, type)):
        return 0
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return 0
    return sum(_mark_static(v, depth + 1) for v in items)


def _own_code(method):
    """`method` (a bound method) over a copy of its function with a code object of its own: dynamo keeps the
    graphs it compiles, and their guards, per code object."""
    f = method.__func__
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(own, method.__self__)


class CompiledDecode:
    """The runner's decode forward, compiled at its first call; eager again if compiling fails."""

    def __init__(self, eager):
        self.eager = eager
        self.options = dict(OPTIONS)  # this runner's: the C++ wrapper may be turned off for it alone
        self.compiled = None  # made at the first call: torch.compile starts inductor's worker processes
        self.compile_seconds: float | None = None  # the first call's time (tracing and code generation)
        self.failure: str | None = None
        self.wrapper_failure: str | None = None  # why the C++ wrapper was not built, where it was not
        self.static_tensors = 0  # the cache's tensors whose sizes the graph takes as constants

    def _compile(self) -> None:
        for module in getattr(self.eager.__self__, "model", torch.nn.Module()).modules():
            prepare = getattr(module, "prepare_compiled", None)  # host-side choices, settled before tracing
            if prepare is not None:
                prepare()
        step = _own_code(self.eager)
        options = dict(self.options)  # a copy: torch.compile takes guard_filter_fn out of what it is given
        self.compiled = torch.compile(step, dynamic=True, fullgraph=True, options=options)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.failure is not None or _get_current_dispatch_mode() is not None:
            return self.eager(input_ids, positions)  # a dispatch mode (sync recorder, op counter) sees ops
        first = self.compile_seconds is None
        if self.compiled is None:
            log.info("compiling the decode step (once per process; inductor's cache keeps the kernels)")
            self._compile()
            self.static_tensors = _mark_static(get_forward_context().cache)  # see the module's docstring
        start = time.perf_counter()
        try:
            with _tracing_rules():
                logits = self.compiled(input_ids, positions)
        except (
            torch._dynamo.exc.TorchDynamoException,
            torch._dynamo.exc.FailOnRecompileLimitHit,  # not a TorchDynamoException in torch 2.13
            torch._inductor.exc.InductorError,
        ) as e:
            # raised while tracing or generating code (or past the recompile limit), before the graph ran:
            # the cache is untouched
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            codegen = (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError)
            if isinstance(e, codegen) and self.options.get("cpp_wrapper"):  # e.g. no Python headers for it
                self.wrapper_failure, self.options["cpp_wrapper"] = message, False
                log.warning("the decode step's C++ wrapper could not be built; using Python's (%s)", message)
                self._compile()
                return self(input_ids, positions)
            self.failure = message
            log.warning("the decode step could not be compiled; decoding eagerly (%s)", self.failure)
            return self.eager(input_ids, positions)
        if first:
            self.compile_seconds = time.perf_counter() - start
            log.info("compiled the decode step in %.1f s", self.compile_seconds)
        return logits
