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
    """Wraps the interpreter's `_patch_lang` once; False (and nothing changed) where this Triton's
    interpreter is not shaped as expected."""
    try:
        from triton import language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "_ds4_wrapped", False):
        return False
    patched: list[set[int]] = []  # per running launch: the ids of the language modules it patched

    def languages(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def patch_lang(fn):
        seen = languages(fn)
        if patched and seen and seen <= patched[-1]:
            return scope_type()  # inside a launch that patched these already
        scope = original(fn)
        if patched:  # a helper seeing a module the launch did not patch: patched as before, and left so
            patched[-1] |= seen  # (the interpreter never restores a helper's patches)
            return scope
        patched.append(seen)
        restore = scope.restore

        def restore_and_end():
            patched.pop()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang._ds4_wrapped = True
    interpreter._patch_lang = patch_lang
    return True
