"""Decode graphs in pieces for tiered experts (ds4.engine.split_graphs), checked on the CPU: the pieces,
replayed around the MoE layers' host passes, give the tokens, logprobs and expert statistics of the eager
hybrid engine, over padded buckets, sequences of different lengths, a prefix hit and a layer pipeline.

CUDA's capture exists only on a GPU, so here each piece is a `RecordedGraph` (tests/engine/recorded_graph.py,
a stand-in named as such): it records the aten ops of its capture and re-runs them at replay over the
same tensors. A value a piece took from the host at capture stays baked in, as in a CUDA graph, and a host
read inside a piece fails the capture. tests/engine/test_graphs.py runs the real capture on a card."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams
from ds4.engine.graphs import DecodeGraphs
from ds4.engine.split_graphs import SplitGraph
from tests.engine.recorded_graph import RecordedGraph


class RecordedGraphs(DecodeGraphs):
    """DecodeGraphs whose pieces are RecordedGraph stand-ins (CPU tests only)."""

    def _new_graph(self):
        return RecordedGraph()


def _run(path, replayed: bool, devices, monkeypatch):
    llm = LLM(path, dtype="float32", devices=devices, max_num_seqs=6, compile_decode=False, hot_experts=2)
    runner, cache = llm.runner, llm.engine.cache
    for tiered in runner.tiered:
        tiered.overlap = True  # the order a GPU runs: copies to the host queued, the shared expert, the wait
    if replayed:
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        runner.graphs = RecordedGraphs(runner, cache, 6, -(-llm.engine.max_model_len // cache.block_size))
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 90, (270,), generator=gen).tolist()  # a full block: a prefix hit later
    prompts = [shared + torch.randint(2, 90, (n,), generator=gen).tolist() for n in (3, 11, 1)] + [[0, 7, 9]]
    llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1))
    requests = [  # 4 sequences, then fewer as they finish: batches of 3 run padded to the bucket of 4
        llm.engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2))
        for p, n in zip(prompts, (10, 4, 7, 9), strict=True)
    ]
    while llm.engine.has_unfinished:
        llm.engine.step()
    outputs = [llm.engine.release(r) for r in requests]
    assert llm.stats()["tokens_reused"] >= 256
    return llm, outputs


@pytest.mark.parametrize(
    "checkpoint, devices",
    [
        ("tiny_v3", ("cpu",)),
        ("tiny_v32", ("cpu",)),
        ("tiny_v4_engram", ("cpu",)),
        ("tiny_v3", ("cpu", "cpu")),
    ],
)
def test_pieces_around_the_host_passes_give_the_eager_hybrid_tokens(
    request, checkpoint, devices, monkeypatch
):
    path = request.getfixturevalue(checkpoint)
    eager, want = _run(path, False, devices, monkeypatch)
    llm, got = _run(path, True, devices, monkeypatch)
    graphs = llm.runner.graphs
    moe_layers = len(llm.runner.tiered)
    stages = len(graphs.stages)
    assert moe_layers > 0 and stages == len(devices)
    split = graphs.graphs[graphs.buckets[-1], 0]
    assert isinstance(split, SplitGraph)
    # per MoE layer of the stage: its piece ends at the routing, its shared expert is a graph, a host pass
    layers = sum(isinstance(split, SplitGraph) for split in graphs.graphs.values())
    assert layers == len(graphs.graphs) == stages * len(graphs.buckets)
    pieces = sum(graphs.graphs[graphs.buckets[-1], k].pieces for k in range(stages))
    assert pieces == 2 * moe_layers + stages
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5
    # the host passes computed the real rows alone: the experts' popularity and moves are the eager ones
    for replayed_tier, eager_tier in zip(llm.runner.tiered, eager.runner.tiered, strict=True):
        counted = lambda stats: {k: v for k, v in stats.items() if k != "decode_expert_s"}  # noqa: E731 (a time)
        assert counted(replayed_tier.stats) == counted(eager_tier.stats)
        assert torch.equal(replayed_tier.counts, eager_tier.counts)
        assert replayed_tier.hot.keys() == eager_tier.hot.keys()


def test_the_stand_in_replays_what_it_recorded_and_refuses_host_reads():
    """The stand-in the test above relies on: a replay recomputes from the inputs' new values, and a host
    read inside a capture fails it, as CUDA fails such a capture."""
    x, out = torch.ones(4), torch.zeros(4)
    graph = RecordedGraph()
    graph.capture_begin()
    y = (x * 2 + 1).sin()
    out.copy_(y.exp())
    total = y[:2] + out[:2]  # a view of a rewritten output, read again
    graph.capture_end()
    x.fill_(3.0)
    graph.replay()
    want = torch.full((2,), 7.0).sin()
    torch.testing.assert_close(total, want + want.exp(), rtol=0, atol=0)
    refused = RecordedGraph()
    refused.capture_begin()
    x.sum().item()
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        refused.capture_end()
