"""Triton's interpreter, without its redundant re-patching (tests only; the kernels and their results are
unchanged).

A launch under the interpreter patches `triton.language` for its run (`interpreter._patch_lang`: every
builtin of `tl`, `tl.tensor` and `tl.math` found through `inspect.getmembers`, then restored). A call of
a `@triton.jit` helper from inside the kernel does it again, once per call in every program instance,
and never restores it: in the V4 long-prefill oracle test, 326,000 such passes took 28% of the test's
time. Where the helper sees only language modules that the running launch has patched already, that
pass changes nothing (their builtins are already the interpreter's, which are not builtins any more),
so it is skipped. A helper that sees a module the launch did not patch (Triton's own `standard.py`
helpers, which call through `tl.core`) is patched as before, the first time in a launch; the interpreter
never restores a helper's patches, so later calls would change nothing either.
"""

from __future__ import annotations


def install() -> bool:
    """Wraps the interpreter's launches and its `_patch_lang` once; False (and nothing changed) where this
    Triton's interpreter is not shaped as expected."""
    try:
        from triton import language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if None in (original, executor, scope_type) or getattr(original, "_ds4_wrapped", False):
        return False
    launch = executor.__call__
    patched: list[set[int] | None] = []  # per running launch: the ids of the language modules patched

    def run(self, *args, **kwargs):
        patched.append(None)  # the launch's own patch comes first
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def patch_lang(fn):
        seen = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if not patched:  # outside a launch: as Triton does it
            return original(fn)
        if patched[-1] is not None and seen and seen <= patched[-1]:
            return scope_type()  # a helper inside a launch that patched these already
        scope = original(fn)  # the launch's own, or a helper seeing another module (and left so)
        patched[-1] = seen | (patched[-1] or set())
        return scope

    patch_lang._ds4_wrapped = True
    interpreter._patch_lang = patch_lang
    executor.__call__ = run
    return True
