"""The compiled CPU decode step (ds4.engine.compiled) gives the eager engine's tokens, with logprobs within
float32 rounding (1e-5), for every family, over batches of one and of several sequences of different
lengths (the batch size and the longest sequence are dynamic sizes of one graph) and a prefix hit; and
dynamo traces each graph once (no restart)."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.compiled import CompiledDecode

pytestmark = pytest.mark.slow  # each engine compiles its step: tens of seconds on two cores


@contextlib.contextmanager
def _restarts():
    """The times dynamo gave up a trace and traced the frame again ("Restarting analysis", logged at INFO
    by its frame converter), as a list of their reasons."""
    reasons = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Restarting analysis"):
                reasons.append(record.getMessage())

    logger, handler = logging.getLogger("torch._dynamo.convert_frame"), Handler()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _runs(path, compile_decode: bool):
    llm = LLM(path, dtype="float32", max_num_seqs=4, compile_decode=compile_decode)
    compiled = isinstance(llm.runner.decode_forward, CompiledDecode)
    assert compiled == compile_decode
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 90, (270,), generator=gen).tolist()  # a full block: a prefix hit later
    with _restarts() as restarts:
        alone = llm.generate([shared + [5]], params)  # batch 1
        batch = [shared + torch.randint(2, 90, (n,), generator=gen).tolist() for n in (3, 1)] + [[0, 7, 9]]
        together = llm.generate(batch, params)  # three sequences of different lengths, two from the cache
    assert llm.stats()["tokens_reused"] >= 256
    if compiled:
        assert llm.runner.decode_forward.failure is None
        assert llm.runner.decode_forward.compile_seconds is not None
        # each graph (batch 1, larger batches) traced once: a restart traces the whole step again, which
        # was 40-60% of a warm compile (module floats reaching operators' float arguments)
        assert restarts == []
    return alone + together


# V4 as tiny_v4_engram: the tiny V4 with Engram at two of its four layers, so its step holds plain V4
# layers too (a second V4 compile, without Engram, took 2.5 of the suite's 29 minutes on two cores)
@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32", "tiny_v4_engram"])
def test_the_compiled_step_gives_the_eager_tokens(request, checkpoint):
    path = request.getfixturevalue(checkpoint)
    compiled, eager = _runs(path, True), _runs(path, False)
    for a, b in zip(compiled, eager, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5


def test_tiered_experts_decode_compiled_with_the_eager_tokens(tiny_v3):
    """Hot experts on the compute device, the rest in host RAM (`hot_experts`): the tiered stack is the
    compiled step's opaque expert op, as a plain stack is, and the tokens are the eager engine's."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(5, 20))]
    runs = []
    for compile_decode in (True, False):
        llm = LLM(tiny_v3, hot_experts=2, compile_decode=compile_decode, max_num_seqs=4)
        runs.append([out.token_ids for out in llm.generate(prompts, params)])
        if compile_decode:
            step = llm.runner.decode_forward
            assert step.failure is None and step.compile_seconds is not None
    assert runs[0] == runs[1]


def test_two_models_of_the_same_shapes_compile_their_own_steps(tiny_v3, tmp_path):
    """The compiled step keeps no guards on the model's modules (they never change after load), so each
    runner compiles its own copy of the step's code: a second model of the same shapes, other weights, in
    the same process, decodes its own tokens, not the first model's graph's. Fails if the runners share
    the code object (dynamo would find the first graph valid for the second model)."""
    from ds4.engine.random_checkpoint import init_checkpoint

    other = init_checkpoint("deepseek_v3", "tiny", tmp_path / "other", seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
    prompt = [list(range(3, 30))]
    outs = {}
    for path in (tiny_v3, other):
        for compile_decode in (True, False):
            llm = LLM(path, dtype="float32", max_num_seqs=2, compile_decode=compile_decode)
            outs[path, compile_decode] = llm.generate(prompt, params)[0]
            assert not compile_decode or llm.runner.decode_forward.failure is None
    for path in (tiny_v3, other):
        a, b = outs[path, True], outs[path, False]
        assert a.token_ids == b.token_ids
        pairs = zip(a.logprobs, b.logprobs, strict=True)
        assert all(abs(x["logprob"] - y["logprob"]) < 1e-5 for x, y in pairs)
    first, second = outs[tiny_v3, False], outs[other, False]
    assert [x["logprob"] for x in first.logprobs] != [x["logprob"] for x in second.logprobs]
