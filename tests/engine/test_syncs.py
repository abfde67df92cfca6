"""A decode step is a device program: between its inputs and its sampled ids nothing makes the host wait
for the device (ds4.engine.syncs records every op that would, on the CPU as on a GPU), apart from the
one copy of the sampled ids back. Checked on the path a GPU runs (the Triton kernels, through the
interpreter here; on a CUDA machine, the card with its decode graphs), over sequences of different lengths,
for every family (V4 with and without Engram) and after a prefix hit. A prefill chunk over a cached prefix
does not wait either."""

from __future__ import annotations

import pytest

from ds4.engine import LLM, SamplingParams
from ds4.engine.context import SeqSlice
from ds4.engine.syncs import SyncRecorder
from ds4.kernels import forced
from tests.kernels.conftest import DEVICE


@pytest.mark.parametrize("checkpoint", ["tiny_v3", "tiny_v32", "tiny_v4", "tiny_v4_engram"])
def test_a_decode_step_never_waits_for_the_device(request, checkpoint):
    llm = LLM(request.getfixturevalue(checkpoint), device=DEVICE)
    runner = llm.runner
    cache = runner.new_cache(3, 300)
    for slot, length in enumerate((37, 5, 260)):  # the last spans two blocks; prompts on the torch path
        runner.step(list(range(2, 2 + length)), [SeqSlice(slot, 0, length, 0)], cache)
    seqs = [SeqSlice(0, 37, 1, 0), SeqSlice(1, 5, 1, 1), SeqSlice(2, 260, 1, 2)]
    with forced(True), SyncRecorder() as recorder:
        logits = runner.step([7, 8, 9], seqs, cache)
    assert recorder.found == []
    assert logits.shape == (3, llm.config.vocab_size)


@pytest.mark.parametrize(
    "checkpoint, mla_mode, blocked",
    [
        ("tiny_v3", "absorbed", False),
        ("tiny_v32", "naive", False),  # a GPU's default for prefill: the picks as a mask
        ("tiny_v32", "absorbed", False),  # the picks as positions, attention over them in the sparse kernel
        ("tiny_v32", "naive", True),  # past the workspace: the picks as positions, as absorbed
        ("tiny_v4", "auto", False),
    ],
)
def test_a_prefill_chunk_over_a_cached_prefix_never_waits(
    request, checkpoint, mla_mode, blocked, monkeypatch
):
    """Prefill on the GPU's path too. V3.2's selection reaches the attention as positions or as a mask built
    on the device; it once read the widest pick count on the host (and ran `nonzero`) at every layer."""
    import ds4.engine.layers.mla as mla

    if blocked:
        monkeypatch.setattr(mla, "WORKSPACE", 64)
    llm = LLM(request.getfixturevalue(checkpoint), device=DEVICE, mla_mode=mla_mode)
    cache = llm.runner.new_cache(1, 300)
    llm.runner.step(list(range(2, 42)), [SeqSlice(0, 0, 40, 0)], cache)  # the prefix, on the torch path
    with forced(True), SyncRecorder() as recorder:
        logits = llm.runner.step(list(range(50, 62)), [SeqSlice(0, 40, 12, 0)], cache)
    assert recorder.found == []
    assert logits.shape == (1, llm.config.vocab_size)


@pytest.mark.parametrize("checkpoint", ["tiny_v4", "tiny_v4_engram"])
def test_a_v4_decode_step_after_a_prefix_hit_never_waits(request, checkpoint):
    """V4's pooled state restored from a prefix block, beside sequences of other lengths: the batch's
    decode step (on the GPU's path) copies back its ids and nothing else. (The prompts run on the torch
    path, which the interpreter would make slow; test_deepseek_v4 checks such batches' tokens.)"""
    llm = LLM(request.getfixturevalue(checkpoint), device=DEVICE)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    shared = [(7 * i) % 500 + 2 for i in range(270)]
    llm.generate(shared + [11], params)  # its first block stays in the prefix cache
    ids = [llm.engine.add_request(p, params) for p in (shared + [5, 6, 7], [0, 9], list(range(3, 40)))]
    while any(not llm.engine.output(i).token_ids for i in ids):
        llm.engine.step()  # the prompts, the first one from the cached block on
    with forced(True), SyncRecorder() as recorder:
        produced = llm.engine.step()  # all three decode
    assert llm.engine.requests[ids[0]].seq.num_cached_tokens == 256
    assert sorted(i for i, _ in produced) == sorted(ids)
    assert recorder.found == [("Tensor.tolist", "a device value read on the host")]  # the ids, once


def test_an_engine_step_copies_back_only_its_sampled_ids(tiny_v3):
    llm = LLM(tiny_v3, device=DEVICE)
    params = [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        SamplingParams(
            temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, max_tokens=4, ignore_eos=True
        ),
    ]
    with forced(True):
        for prompt, p in zip(([0, 5, 6, 7], [0, 9]), params, strict=True):
            llm.engine.add_request(prompt, p)
        llm.engine.step()  # the prompts
        with SyncRecorder() as recorder:
            produced = llm.engine.step()  # both decode
    assert len(produced) == 2
    assert recorder.found == [("Tensor.tolist", "a device value read on the host")]  # the ids, once


def test_the_recorder_names_what_waits():
    import torch

    t = torch.tensor([1, 2, 3])
    with SyncRecorder() as recorder:
        int(t.sum())
        t[t > 1]
        t.nonzero()
        with recorder.allowed_copy_back():
            t.tolist()
    assert [op for op, _ in recorder.found] == ["Tensor.__int__", "aten.index.Tensor", "aten.nonzero.default"]
