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
