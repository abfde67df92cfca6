"""A layer pipeline's decode graphs, one per stage and bucket (ds4.engine.graphs), checked on the CPU: the
stages run over their own static buffers, each fed the one before's static outputs, and give the tokens
and logprobs of the eager pipeline, over padded buckets, sequences of different lengths and a prefix hit.

CUDA's capture exists only on a GPU, so here a stage's "graph" (`EagerReplay`, a stand-in named as such)
re-runs the stage's forward over the same static buffers at each replay and copies its results into the
outputs it recorded at capture, as a replayed graph rewrites its static outputs. What it does not check
(the capture itself, streams, memory pools) tests/engine/test_graphs.py checks on a card."""

from __future__ import annotations

import types

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.graphs import DecodeGraphs, _copy_into


class EagerReplay(DecodeGraphs):
    """DecodeGraphs whose capture records the stage's forward instead of a CUDA graph (a CPU stand-in)."""

    def _record(self, b: int, k: int, pool):
        outputs = self._forward(b, k)
        replay = lambda: _copy_into(outputs, self._forward(b, k))  # noqa: E731
        return types.SimpleNamespace(replay=replay), outputs, pool


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32", "tiny_v4_engram"])
def test_stage_graphs_give_the_eager_pipelines_tokens(request, checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    path = request.getfixturevalue(checkpoint)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 90, (270,), generator=gen).tolist()  # a full block: a prefix hit later
    prompts = [shared + torch.randint(2, 90, (n,), generator=gen).tolist() for n in (3, 11, 1)] + [[0, 7, 9]]
    runs, handoffs = {}, {}
    for replayed in (True, False):
        llm = LLM(path, dtype="float32", devices=("cpu", "cpu"), max_num_seqs=6, compile_decode=False)
        runner, cache = llm.runner, llm.engine.cache
        if replayed:
            runner.graphs = EagerReplay(runner, cache, 6, -(-llm.engine.max_model_len // cache.block_size))
            assert len(runner.graphs.stages) == 2 and len(runner.graphs.graphs) == 2 * 4  # buckets 1, 2, 4, 6
        llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1))  # cache the prefix
        requests = [  # 4 sequences, then fewer as they finish: batches of 3 run padded to the bucket of 4
            llm.engine.add_request(
                p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
            )
            for p, n in zip(prompts, (10, 4, 7, 9), strict=True)
        ]
        while llm.engine.has_unfinished:
            llm.engine.step()
        runs[replayed] = [llm.engine.release(r) for r in requests]
        assert llm.stats()["tokens_reused"] >= 256
        handoffs[replayed] = runner.handoffs.last_num_bytes
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5
    assert handoffs[True] == handoffs[False] > 0  # the last step's activations, counted as eager counts


def test_a_capture_that_fails_leaves_decode_eager_with_the_reason(tiny_v3, monkeypatch):
    """CUDA refusing a capture (an op not allowed while a stream captures, or out of memory) must not stop
    the engine: decode runs eagerly, the reason is kept, and the tokens are the eager engine's."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)

    def refuse(self, b, k, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(EagerReplay, "_record", refuse)
    monkeypatch.setattr("ds4.engine.graphs.DecodeGraphs", EagerReplay)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = LLM(tiny_v3, compile_decode=False).generate([[3, 4, 5, 6]], params)[0].token_ids
    llm = LLM(tiny_v3, compile_decode=False, max_num_seqs=2)
    llm.runner.capture_decode_graphs(llm.engine.cache, 2, llm.engine.max_model_len)
    assert llm.runner.graphs is None
    assert (
        llm.runner.graph_failure
        == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    )
    assert llm.generate([[3, 4, 5, 6]], params)[0].token_ids == want
