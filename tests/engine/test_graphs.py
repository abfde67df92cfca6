"""CUDA graphs replay decode steps exactly as the eager engine runs them: the same greedy tokens, logits
within float32 rounding, over batches of different lengths, padded buckets and prefix-cache hits. Needs
a CUDA device (the graphs exist only there); `make gpu-check` runs it on the card. V4 replays over its
pooled state and its compressed rows paged in the cache blocks. A layer pipeline replays a graph per stage
and, with tiered experts, a graph in pieces around the host's passes (tests/engine/test_graphs_recorded.py
checks both on the CPU with a recording stand-in for the graphs)."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _compare(path, **engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 500, (300,), generator=gen).tolist()  # a prefix hit for the later prompts
    prompts = [shared + torch.randint(2, 500, (n,), generator=gen).tolist() for n in (3, 40, 1, 77, 9)]
    runs = {}
    for graphs in (True, False):
        llm = LLM(path, dtype="float32", max_num_seqs=8, cuda_graphs=graphs, **engine)
        assert (llm.runner.graphs is not None) == graphs
        llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1))  # cache the prefix
        runs[graphs] = llm.generate(prompts, params)  # 5 sequences: the bucket of 8, padded
        assert llm.stats()["tokens_reused"] > 0
    for with_graphs, eager in zip(runs[True], runs[False], strict=True):
        assert with_graphs.token_ids == eager.token_ids
        for a, b in zip(with_graphs.logprobs, eager.logprobs, strict=True):
            assert abs(a["logprob"] - b["logprob"]) < 1e-5


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32", "tiny_v4"])
def test_graphs_give_the_eager_tokens(request, checkpoint):
    _compare(request.getfixturevalue(checkpoint), device="cuda")


def test_a_pipelines_stage_graphs_give_the_eager_tokens(tiny_v4_engram):
    """Two stages, on two cards where there are two, else both on one: a graph per stage and bucket. V4
    with Engram hands the most between stages (streams, both rope tables, token and Engram ids)."""
    devices = ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cuda:0")
    _compare(tiny_v4_engram, devices=devices)


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v4_engram"])
def test_graphs_in_pieces_around_tiered_experts_give_the_eager_tokens(request, checkpoint):
    """Routed experts in host RAM, one of each layer's cached on the card and re-ranked every pass: each
    decode graph is captured in pieces around the MoE layers' host passes (checked on the CPU by
    tests/engine/test_graphs_recorded.py)."""
    _compare(request.getfixturevalue(checkpoint), device="cuda", hot_experts=1, hot_period=1)
