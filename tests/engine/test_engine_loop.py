"""One engine thread shared by many caller threads: concurrent submissions give the same tokens as
sequential runs, streams add up to the final text, cancellation and bad requests are handled."""

from __future__ import annotations

import threading

import pytest
import torch

from ds4.engine import LLM, RequestError, SamplingParams

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
