"""Decode graphs (ds4.engine.graphs) captured and replayed on the CPU. Each graph is a `RecordedGraph`
(tests/engine/recorded_graph.py, a stand-in named as such): it records the step's aten ops and Triton
launches at capture and re-runs them at replay over the same tensors, as a CUDA graph re-launches its
kernels. A Python number the step took from the host at capture stays baked in, and a host read inside a
capture fails it. The step runs on the Triton path, as on a card, with Triton's interpreter running the
kernels. Against the eager engine on the same path, the tokens and logprobs must match over padded
buckets, sequences of different lengths and a prefix hit, for every family, for a layer pipeline (a graph
per stage) and for tiered experts (a graph in pieces around the host's passes).

tests/engine/test_graphs.py makes the same comparison with real CUDA graphs on a card; streams and memory
pools exist only there."""

from __future__ import annotations

import inspect

import pytest
import torch

from ds4 import kernels
from ds4.engine import LLM, SamplingParams
from ds4.engine.graphs import DecodeGraphs
from ds4.engine.split_graphs import SplitGraph
from tests.engine.recorded_graph import RecordedGraph


class RecordedGraphs(DecodeGraphs):
    """DecodeGraphs capturing into RecordedGraph stand-ins (CPU tests only)."""

    def _new_graph(self):
        return RecordedGraph()


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """The capture's waits and memory figures, which need a card, as no-ops."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)


def _generate(path, replayed: bool, **engine):
    """The engine (graphs captured where `replayed`) and its outputs for four prompts after a cached
    prefix; they finish at different steps, so batches of 3 run padded to the bucket of 4."""
    llm = LLM(path, dtype="float32", max_num_seqs=4, compile_decode=False, block_size=16, **engine)
    for tiered in llm.runner.tiered:
        tiered.overlap = True  # a GPU's order: copies to the host queued, the shared expert, then the wait
    if replayed:
        cache = llm.engine.cache
        llm.runner.graphs = RecordedGraphs(
            llm.runner, cache, 4, -(-llm.engine.max_model_len // cache.block_size)
        )
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 90, (20,), generator=gen).tolist()  # a full block of 16: a prefix hit later
    prompts = [shared + torch.randint(2, 90, (n,), generator=gen).tolist() for n in (3, 11, 1)] + [[0, 7, 9]]
    llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1))
    requests = [
        llm.engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2))
        for p, n in zip(prompts, (5, 2, 3, 4), strict=True)
    ]
    while llm.engine.has_unfinished:
        llm.engine.step()
    assert llm.stats()["tokens_reused"] >= 16
    return llm, [llm.engine.release(r) for r in requests]


def _compare(path, **engine):
    """(eager engine, replaying engine), after checking that they gave the same tokens and logprobs."""
    with kernels.forced(True):
        eager, want = _generate(path, False, **engine)
        llm, got = _generate(path, True, **engine)
    assert llm.runner.graphs.buckets == [1, 2, 4]
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5
    return eager, llm


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32"])  # V4: the pipeline test below
def test_replayed_graphs_give_the_eager_tokens(request, checkpoint, no_cuda_calls):
    _, llm = _compare(request.getfixturevalue(checkpoint))
    assert all(isinstance(graph, RecordedGraph) for graph in llm.runner.graphs.graphs.values())


def test_a_pipelines_stage_graphs_give_the_eager_tokens_and_hand_offs(tiny_v4_engram, no_cuda_calls):
    """Two stages: a graph per stage and bucket, each stage's static inputs refilled from the one before's
    static outputs. V4 with Engram hands the most between stages (streams, both rope tables, token and
    Engram ids)."""
    eager, llm = _compare(tiny_v4_engram, devices=("cpu", "cpu"))
    graphs = llm.runner.graphs
    assert len(graphs.stages) == 2 and len(graphs.graphs) == 2 * len(graphs.buckets)
    bytes_moved = llm.runner.handoffs.last_num_bytes
    assert bytes_moved == eager.runner.handoffs.last_num_bytes > 0  # the last step's, counted as eager counts


def test_tiered_experts_replay_in_pieces_around_the_host_passes(tiny_v3, no_cuda_calls):
    """Routed experts in host RAM, one of each layer's on the "device" and re-ranked every pass: a piece
    per MoE layer up to its routing, the layer's device part (its hot experts in one fused kernel over
    the hot stack, and its shared expert) a graph of its own, the host pass between. The host
    passes compute the real rows alone, and the capture's warm-up passes count nowhere, so the experts'
    popularity, moves and hot sets are the eager engine's."""
    eager, llm = _compare(tiny_v3, hot_experts=1, hot_period=1)
    graphs, tiered = llm.runner.graphs, llm.runner.tiered
    split = graphs.graphs[graphs.buckets[-1], 0]
    assert isinstance(split, SplitGraph) and len(tiered) > 0
    assert all(t.hot_stack is not None for t in tiered)
    device_parts = [inspect.getclosurevars(step).nonlocals["device_graph"] for step in split.steps[1::2]]
    for graph in device_parts:  # each layer's hot pairs in the fused kernel (gate/up, down), in the graph
        launched = [op[1].fn.__name__ for op in graph.ops if op[0] == "triton"]
        assert launched.count("_expert_gemm_kernel") == 2
    assert split.pieces == 2 * len(tiered) + 1  # per MoE layer, the piece it ends and its device part
    assert len(split.steps) == 2 * len(tiered) + 1  # the pieces around the MoE layers, the host passes
    stack, topk = tiered[0], llm.config.num_experts_per_tok
    many = 4 * stack.w13.shape[0] // topk + 1  # a pass too long for the CPU kernel: hot experts one by one
    x, ids = torch.zeros(many, llm.config.hidden_size), torch.zeros(many, topk, dtype=torch.long)
    with kernels.forced(True):
        assert stack.device_part(x, torch.ones(ids.shape), ids) is None
        assert stack.device_part(x[:1], torch.ones(1, topk), ids[:1]) is not None
    counted = lambda stats: {k: v for k, v in stats.items() if k != "decode_expert_s"}  # noqa: E731 (a time)
    for replayed, plain in zip(tiered, eager.runner.tiered, strict=True):
        assert counted(replayed.stats) == counted(plain.stats)
        assert replayed.stats["hot_rows"] > 0 and replayed.stats["promoted"] > 0
        assert torch.equal(replayed.counts, plain.counts) and replayed.hot.keys() == plain.hot.keys()


def test_a_capture_that_fails_leaves_decode_eager_with_the_reason(tiny_v3, no_cuda_calls, monkeypatch):
    """On the torch path with the CPU kernels off, MoE counts its experts' rows on the host, which a capture
    refuses (CUDA refuses it the same way). That must not stop the engine: decode runs eagerly, the
    reason is kept, and the tokens are the eager engine's."""
    monkeypatch.setattr("ds4.engine.graphs.DecodeGraphs", RecordedGraphs)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with kernels.cpu_kernels(False):
        want = LLM(tiny_v3, compile_decode=False).generate([[3, 4, 5, 6]], params)[0].token_ids
        llm = LLM(tiny_v3, compile_decode=False, max_num_seqs=2)
        llm.runner.capture_decode_graphs(llm.engine.cache, 2, llm.engine.max_model_len)
        assert llm.runner.graphs is None
        assert llm.runner.graph_failure.startswith(
            "RuntimeError: operation not permitted when stream is capturing: ('aten.bincount.default'"
        )
        assert llm.generate([[3, 4, 5, 6]], params)[0].token_ids == want


def test_the_stand_in_replays_what_it_recorded_and_refuses_host_reads():
    """What the tests above rely on: a replay recomputes from the inputs' new values (an op that may
    alias, such as `to`, is re-run where it copied), in-place ops re-run, and a host read fails the
    capture."""
    x, out = torch.ones(4, dtype=torch.float64), torch.zeros(4)
    graph = RecordedGraph()
    graph.capture_begin()
    y = (x.to(torch.float32) * 2 + 1).sin()
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
