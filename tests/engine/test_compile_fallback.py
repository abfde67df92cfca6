"""When the decode step cannot run compiled, the engine decodes eagerly and says why: layer pipelines are
never compiled (their hand-off counters would recompile the step at every token), and a compile that
fails, past dynamo's recompile limit included, leaves the eager step with the same tokens."""

from __future__ import annotations

import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.compiled import CompiledDecode

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(3, 40))


def test_a_cpu_layer_pipeline_decodes_eagerly(tiny_v3, caplog):
    caplog.set_level("INFO", logger="ds4.engine")
    llm = LLM(tiny_v3, devices=("cpu", "cpu"), compile_decode=True)
    assert not isinstance(llm.runner.decode_forward, CompiledDecode)
    assert "a layer pipeline counts its hand-offs on the host" in caplog.text
    assert llm.generate([PROMPT], GREEDY)[0].token_ids == LLM(tiny_v3).generate([PROMPT], GREEDY)[0].token_ids


def test_hitting_the_recompile_limit_falls_back_to_the_eager_step(tiny_v3, monkeypatch):
    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: refuse)
    llm = LLM(tiny_v3, compile_decode=True)
    tokens = llm.generate([PROMPT], GREEDY)[0].token_ids
    step = llm.runner.decode_forward
    assert isinstance(step, CompiledDecode) and step.failure.startswith("FailOnRecompileLimitHit")
    assert tokens == LLM(tiny_v3).generate([PROMPT], GREEDY)[0].token_ids


def test_a_c_plus_plus_wrapper_that_cannot_be_built_leaves_the_python_wrapper(tiny_v3, monkeypatch):
    """The step compiles with inductor's C++ wrapper; where that cannot be built (no Python headers, a
    compiler error), it compiles again with the Python wrapper rather than decoding eagerly. torch.compile
    is replaced by one that refuses the C++ wrapper and otherwise runs the step as given."""
    seen = []

    def fake_compile(step, **kwargs):
        options = kwargs["options"]
        seen.append(dict(options))
        if options["cpp_wrapper"]:

            def refuse(*args):
                raise torch._inductor.exc.InductorError(RuntimeError("Python.h: No such file"), None)

            return refuse
        return step

    monkeypatch.setattr(torch, "compile", fake_compile)
    llm = LLM(tiny_v3, compile_decode=True)
    tokens = llm.generate([PROMPT], GREEDY)[0].token_ids
    step = llm.runner.decode_forward
    assert [o["cpp_wrapper"] for o in seen] == [True, False]
    assert all(o["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe for o in seen)
    assert step.failure is None and "Python.h" in step.wrapper_failure
    assert step.compile_seconds is not None
    assert tokens == LLM(tiny_v3, compile_decode=False).generate([PROMPT], GREEDY)[0].token_ids
