"""The cards ds4 targets, and its kernels compiled for them on a machine without one: the launches a
workload makes are recorded under Triton's interpreter (`recording`), then compiled in a separate
process by Triton's CUDA backend and ptxas for each card's architecture (`compile_launches`), with the
shared memory, registers and spills each build needs. A launch that fails to compile, or asks for more
shared memory than the card has, fails there, before anyone starts the engine on one."""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import triton

from ds4.kernels import tuning
from ds4.kernels.dot import gpu_dot_args
from ds4.kernels.mla_decode import GRID_YZ


@dataclass(frozen=True)
class Card:
    label: str
    arch: int  # compute capability: 89 for sm_89
    shared: int  # shared memory a block may ask for (the opt-in maximum), bytes


CARDS = {
    "sm89": Card("RTX 4090 (Ada, sm_89)", 89, 101_376),
    "sm90": Card("H100 / H200 (Hopper, sm_90)", 90, 232_448),
}
GRID_LIMITS = (2**31 - 1, GRID_YZ, GRID_YZ)  # programs a CUDA launch may have on each axis
# the kernels a GPU times over configurations (tuning.py): each configuration is compiled there
TUNED = {
    "_expert_gemm_kernel": tuning.expert_configs,
    "_quant_linear_kernel": tuning.linear_configs,
}


@dataclass(frozen=True)
class Launch:
    """One specialisation of a kernel as a GPU compiles it: the argument types, the constexprs (by
    position), the divisibility facts Triton derives from the arguments, the launch options."""

    module: str
    kernel: str
    signature: dict  # name -> Triton type ("*bf16", "i32", "constexpr")
    constexprs: tuple  # ((position, value), ...); a tl.dtype value as {"dtype": name}
    attrs: tuple  # ((position, ((attribute, value), ...)), ...)
    options: tuple = ()  # ((name, value), ...): num_warps, num_stages
    origin: str = ""  # the workload that made it
    grid: tuple = ()  # the largest programs on each axis its launches asked for (not part of the build)

    def key(self) -> str:
        return json.dumps(
            [self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options]
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Launch:
        return cls(
            module=d["module"],
            kernel=d["kernel"],
            signature=d["signature"],
            constexprs=tuple((i, v) for i, v in d["constexprs"]),
            attrs=tuple((i, tuple(tuple(a) for a in attrs)) for i, attrs in d["attrs"]),
            options=tuple((k, v) for k, v in d["options"]),
            origin=d["origin"],
            grid=tuple(d["grid"]),
        )

    def constexpr(self, name: str):
        index = list(self.signature).index(name)
        return dict(self.constexprs)[index]

    def with_constexprs(self, values: dict, options: dict | None = None) -> Launch:
        names = list(self.signature)
        merged = dict(self.constexprs) | {names.index(k): v for k, v in values.items() if k in names}
        opts = dict(self.options) | (options or {})
        return replace(self, constexprs=tuple(sorted(merged.items())), options=tuple(sorted(opts.items())))


@dataclass
class Build:
    """A launch compiled for a card: its needs, or why it failed."""

    card: str
    module: str
    kernel: str
    origin: str
    constexprs: dict = field(default_factory=dict)  # by name
    options: dict = field(default_factory=dict)
    shared: int = 0  # bytes: Triton's dynamic allocation plus the cubin's static shared memory
    registers: int = 0  # per thread
    stack: int = 0  # bytes per thread of spilled registers and local arrays
    seconds: float = 0.0
    error: str | None = None
    triton: str = ""  # the compiler's version
    grid: list = field(default_factory=list)

    def fits(self) -> bool:
        return self.error is None and self.shared <= CARDS[self.card].shared and self.grid_fits()

    def grid_fits(self) -> bool:
        """Within CUDA's grid: 2^31 - 1 programs on the first axis, 65,535 on the others."""
        return all(n <= limit for n, limit in zip(self.grid, GRID_LIMITS, strict=False))


def _encode(value):
    if isinstance(value, triton.language.dtype):
        return {"dtype": value.name}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"a constexpr of type {type(value).__name__} cannot be recorded: {value!r}")


def _decode(value):
    return triton.language.dtype(value["dtype"]) if isinstance(value, dict) else value


@functools.cache
def _binder(fn):
    """(a JITFunction of `fn`, a CUDA backend, Triton's binder of its arguments): made once per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(fn)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def _launch_of(fn, args, kwargs, dtype, origin, grid) -> Launch:
    """The specialisation a CUDA device would compile for this call: Triton's own binder (types,
    alignment and divisibility of the arguments), with the dot operands a GPU gets for `dtype`."""
    jit, backend, binder = _binder(fn)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    names = list(signature)
    values = {path[0]: value for path, value in constexprs.items()}
    if dtype is not None and "DOT" in names:  # the interpreter multiplies in float32 whatever the model
        for name, value in gpu_dot_args(dtype).items():
            values[names.index(name)] = value
    return Launch(
        module=fn.__module__,
        kernel=fn.__name__,
        signature=signature,
        constexprs=tuple(sorted((k, _encode(v)) for k, v in values.items())),
        attrs=tuple(sorted((path[0], tuple(map(tuple, a))) for path, a in attrs.items() if a)),
        options=tuple(sorted((k, v) for k, v in kwargs.items() if k not in names)),
        origin=origin,
        grid=tuple(int(n) for n in grid),
    )


class Recorder:
    """The launches made inside `recording`, one per specialisation."""

    def __init__(self, execute: bool):
        self.execute = execute
        self.launches: dict[str, Launch] = {}
        self.dtype: torch.dtype | None = None  # the model's dtype: decides the GPU's dot operands
        self.origin = ""

    @contextmanager
    def workload(self, origin: str, dtype: torch.dtype):
        self.origin, self.dtype = origin, dtype
        try:
            yield
        finally:
            self.origin, self.dtype = "", None

    def add(self, launch: Launch) -> None:
        key = launch.key()
        seen = self.launches.setdefault(key, launch)
        if seen is not launch:
            grid = tuple(max(a, b) for a, b in itertools.zip_longest(seen.grid, launch.grid, fillvalue=1))
            self.launches[key] = replace(seen, grid=grid)


@contextmanager
def recording(execute: bool = True):
    """Records every Triton launch in the block (Triton's interpreter must be on, TRITON_INTERPRET=1).
    `execute=False` records without running the kernel: workloads at a real model's sizes, whose
    outputs nobody reads."""
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1", "recording needs Triton's interpreter"
    recorder, run = Recorder(execute), InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        if callable(grid):  # a grid of the launch's arguments (an autotuned kernel's tiles)
            grid = grid(dict(zip(self.arg_names, args, strict=False)) | kwargs)
        recorder.add(_launch_of(self.fn, args, kwargs, recorder.dtype, recorder.origin, grid))
        if recorder.execute:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded
    try:
        yield recorder
    finally:
        InterpretedFunction.run = run


def variants(launch: Launch) -> list[Launch]:
    """The builds a GPU makes of a launch: every configuration its autotuner times, where it has one
    (the interpreter ran the fixed tiles)."""
    if launch.kernel not in TUNED:
        return [launch]
    configs = tuning.for_operands(TUNED[launch.kernel](), _decode(launch.constexpr("DOT")))
    return [launch] + [
        launch.with_constexprs(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages})
        for c in configs
    ]


def compile_launches(
    launches: list[Launch], cards: list[str], jobs: int | None = None, triton_path: str | None = None
) -> list[Build]:
    """Every launch (and its tuned variants) compiled for every card, in `jobs` processes with Triton's
    interpreter off and a fresh cache (so each build's seconds are a first start's). `triton_path`: a
    folder holding another Triton to compile with (the version a GPU image ships, say)."""
    work = [(card, v) for launch in launches for v in variants(launch) for card in cards]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as folder:
        env["TRITON_CACHE_DIR"] = os.path.join(folder, "cache")
        procs = []
        for j in range(jobs):
            given, made = os.path.join(folder, f"launches-{j}.json"), os.path.join(folder, f"builds-{j}.json")
            with open(given, "w") as f:
                json.dump([[card, v.to_json()] for card, v in work[j::jobs]], f)
            command = [sys.executable, "-m", "ds4.kernels.targets", given, made]
            procs.append((subprocess.Popen(command, stderr=subprocess.PIPE, env=env, text=True), made))
        results = []
        for proc, made in procs:
            _, err = proc.communicate()
            assert proc.returncode == 0, f"the kernel compiler's process failed:\n{err[-4000:]}"
            with open(made) as f:
                results.extend(Build(**b) for b in json.load(f))
    return results


def _tools() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED and LOCAL of the cubin's kernel (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [os.path.join(_tools(), "cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(part for part in text.splitlines() if "REG:" in part)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def build(card: str, launch: Launch) -> Build:
    """Compiles one launch for one card (in a process whose kernels are compiled, not interpreted)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert os.environ.get("TRITON_INTERPRET") != "1", "compile with Triton's interpreter off"
    names = list(launch.signature)
    result = Build(
        card=card,
        module=launch.module,
        kernel=launch.kernel,
        origin=launch.origin,
        constexprs={names[i]: v for i, v in launch.constexprs},
        options=dict(launch.options),
        triton=triton.__version__,
        grid=list(launch.grid),
    )
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    source = ASTSource(
        fn,
        launch.signature,
        {(i,): _decode(v) for i, v in launch.constexprs},
        {(i,): [tuple(a) for a in attrs] for i, attrs in launch.attrs},
    )
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", CARDS[card].arch, 32), options=result.options
        )
    except Exception as e:  # the report carries every failure; the caller decides what fails
        result.error = f"{type(e).__name__}: {e}"[:2000]
        return result
    result.seconds = round(time.perf_counter() - start, 3)
    usage = _resources(compiled.asm["cubin"])
    result.shared = compiled.metadata.shared + usage["SHARED"]
    result.registers, result.stack = usage["REG"], usage["STACK"] + usage["LOCAL"]
    return result


def _main() -> None:
    given, made = sys.argv[1:3]
    with open(given) as f:
        work = json.load(f)
    builds = [asdict(build(card, Launch.from_json(launch))) for card, launch in work]
    with open(made, "w") as f:
        json.dump(builds, f)


if __name__ == "__main__":
    _main()
