"""One engine thread shared by many caller threads: concurrent submissions give the same tokens as
sequential runs, streams add up to the final text, cancellation and bad requests are handled."""

from __future__ import annotations

import threading

import pytest
import torch

from ds4.engine import LLM, RequestError, SamplingParams
from ds4.engine.errors import EngineStopped, StepFailed

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_v32):
    return LLM(tiny_v32, max_num_seqs=4, max_num_batched_tokens=64)


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [
        torch.randint(2, 512, (int(k),), generator=gen).tolist()
        for k in torch.randint(3, 90, (n,), generator=gen)
    ]


def test_concurrent_callers_get_what_sequential_runs_give(llm, tiny_v32):
    many = prompts(10)
    expected = [o.token_ids for o in LLM(tiny_v32, enable_prefix_caching=False).generate(many, GREEDY)]
    loop = llm.serve()
    results: dict[int, list[int]] = {}

    def caller(i):
        results[i] = loop.submit(many[i], GREEDY).result(timeout=60).token_ids

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(many))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    loop.shutdown()
    assert [results[i] for i in range(len(many))] == expected
    llm.engine.check_integrity()


def test_stream_events_add_up_to_the_final_output(llm):
    loop = llm.serve()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    events = list(loop.submit(llm.tokenizer.encode("def main():"), params))
    loop.shutdown()
    final = events[-1].output
    assert final is not None and final.finish_reason == "length"
    assert [t for e in events for t in e.token_ids] == final.token_ids
    assert "".join(e.text for e in events) == final.text


def test_cancel_from_another_thread(llm):
    loop = llm.serve()
    handle = loop.submit(
        prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=100_000 // 1000, ignore_eos=True)
    )
    first = next(iter(handle))
    handle.cancel()
    rest = list(handle)
    loop.shutdown()
    outcome = (rest[-1] if rest else first).output
    assert outcome.finish_reason in ("cancelled", "length")
    assert llm.engine.blocks.num_free_blocks == llm.engine.num_blocks


def test_bad_request_is_refused_in_the_callers_thread(llm):
    loop = llm.serve()
    with pytest.raises(RequestError, match="outside the vocabulary"):
        loop.submit([10**6], GREEDY)
    loop.shutdown()


def poison(llm, bad: set[int]):
    """The runner fails every step that includes one of the `bad` requests."""
    step = llm.runner.step

    def failing(tokens, slices, cache, **kwargs):
        if bad & {s.slot for s in slices}:
            raise RuntimeError("poisoned request")
        return step(tokens, slices, cache, **kwargs)

    return failing


def test_a_failing_request_fails_alone_and_the_batch_goes_on(tiny_v32, monkeypatch):
    many = prompts(4)
    expected = [o.token_ids for o in LLM(tiny_v32, enable_prefix_caching=False).generate(many, GREEDY)]
    llm = LLM(tiny_v32, max_num_seqs=4, max_num_batched_tokens=512)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in many]
    monkeypatch.setattr(llm.runner, "step", poison(llm, {ids[2]}))
    failures = []
    while engine.has_unfinished:
        try:
            engine.step()
        except StepFailed as e:
            failures.append(e)
    assert [f.request_ids for f in failures] == [[ids[2]]]
    assert "poisoned request" in str(failures[0].cause)
    outputs = [engine.release(i) for i in ids]
    assert [o.finish_reason for o in outputs] == ["length", "length", "error", "length"]
    assert [o.token_ids for i, o in enumerate(outputs) if i != 2] == [
        e for i, e in enumerate(expected) if i != 2
    ]
    assert engine.scheduler.num_preemptions >= 3  # the batch's requests reran one at a time
    engine.check_integrity()
    assert engine.blocks.num_free_blocks == engine.num_blocks


def test_the_loop_fails_only_the_culprits_stream(tiny_v32, monkeypatch):
    many = prompts(3)
    expected = [o.token_ids for o in LLM(tiny_v32, enable_prefix_caching=False).generate(many, GREEDY)]
    llm = LLM(tiny_v32, max_num_seqs=4, max_num_batched_tokens=512)
    monkeypatch.setattr(llm.runner, "step", poison(llm, {1}))  # the engine numbers requests from 0
    loop = llm.serve()
    handles = [loop.submit(p, GREEDY) for p in many]
    results = []
    for h in handles:
        try:
            results.append(h.result(timeout=60).token_ids)
        except RuntimeError as e:
            results.append(str(e))
    later = loop.submit(many[0], GREEDY).result(timeout=60).token_ids
    loop.shutdown()
    assert results == [expected[0], "poisoned request", expected[2]]
    assert later == expected[0]
    assert loop.num_in_flight == 0


def test_a_request_the_engine_refuses_fails_alone_and_the_thread_serves_on(llm):
    loop = llm.serve()
    prompt = llm.tokenizer.encode("def main():")
    refused = loop.submit(prompt, SamplingParams(temperature=1.0, max_tokens=4, seed=2**64))  # out of range
    with pytest.raises(RequestError, match="request refused"):
        refused.result(timeout=60)
    assert loop.is_alive
    assert len(loop.submit(prompt, GREEDY).result(timeout=60).token_ids) == GREEDY.max_tokens
    loop.shutdown()
    assert not loop.is_alive


def test_shutdown_ends_the_streams_in_flight(llm):
    loop = llm.serve()
    handle = loop.submit(llm.tokenizer.encode("def main():"), SamplingParams(max_tokens=400, ignore_eos=True))
    assert handle.events.get(timeout=60).token_ids  # generating
    loop.shutdown()
    assert handle.result(timeout=10).finish_reason == "cancelled"
    with pytest.raises(EngineStopped, match="not running"):
        loop.submit([2, 3], GREEDY)
