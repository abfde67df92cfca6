"""The engine loop end to end on tiny checkpoints: greedy outputs are identical with and without the
prefix cache, for every chunk size, batch mix and under preemption; reuse is counted exactly; every
block is accounted for after every step."""

from __future__ import annotations

import pytest
import torch

from ds4.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Three prompts sharing a 600-token prefix (two full 256-token blocks) and one unrelated prompt."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(2, vocab, (600,), generator=gen).tolist()
    tails = [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in (5, 40, 1)]
    other = torch.randint(2, vocab, (300,), generator=gen).tolist()
    return [shared + t for t in tails] + [other]


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_v32", "tiny_v4"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Each prompt alone, no prefix cache, whole prompts in one step."""
    llm = LLM(checkpoint, enable_prefix_caching=False, max_num_batched_tokens=4096)
    return [llm.generate(p, GREEDY)[0].token_ids for p in prompts(llm.config.vocab_size)]


def drive(llm: LLM, request_prompts, params=GREEDY) -> list[list[int]]:
    """Submits all prompts, steps the engine to the end checking integrity after every step."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in request_prompts]
    while engine.has_unfinished:
        engine.step()
        engine.check_integrity()
    outs = [engine.release(i).token_ids for i in ids]
    blocks = engine.blocks
    assert blocks.num_free_blocks == blocks.blocks.__len__(), "a finished engine holds no blocks"
    return outs


@pytest.mark.parametrize("chunk", [1, 3, 255, 256, 257, 1024])
def test_any_chunk_size_gives_the_same_tokens(checkpoint, reference, chunk):
    llm = LLM(checkpoint, max_num_batched_tokens=chunk)
    assert drive(llm, prompts(llm.config.vocab_size)) == reference


def test_prefix_cache_reuses_exactly_the_shared_blocks(checkpoint, reference):
    llm = LLM(checkpoint)
    first, *rest = prompts(llm.config.vocab_size)
    assert llm.generate(first, GREEDY)[0].token_ids == reference[0]
    assert llm.stats()["tokens_reused"] == 0
    outs = llm.generate(rest[:2], GREEDY)
    assert [o.token_ids for o in outs] == reference[1:3]
    assert [o.num_cached_tokens for o in outs] == [512, 512]
    assert llm.stats()["tokens_reused"] == 1024


def test_same_prompt_twice_recomputes_only_the_tail(checkpoint, reference):
    llm = LLM(checkpoint)
    prompt = prompts(llm.config.vocab_size)[3]  # 300 tokens: one full block
    llm.generate(prompt, GREEDY)
    again = llm.generate(prompt, GREEDY)[0]
    assert again.token_ids == reference[3] and again.num_cached_tokens == 256


def test_preemption_under_memory_pressure_changes_nothing(checkpoint, reference):
    # 8 blocks of 128 tokens cannot hold four ~650-token sequences at once: some are preempted and redone
    llm = LLM(checkpoint, block_size=128, num_cache_blocks=8, max_num_batched_tokens=300)
    assert drive(llm, prompts(llm.config.vocab_size)) == reference
    assert llm.stats()["preemptions"] > 0


def test_more_requests_than_blocks_all_complete(checkpoint):
    llm = LLM(checkpoint, block_size=16, num_cache_blocks=6, max_num_seqs=4, max_num_batched_tokens=24)
    gen = torch.Generator().manual_seed(3)
    many = [
        torch.randint(2, llm.config.vocab_size, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 40, (12,), generator=gen)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = drive(llm, many, params)
    assert llm.stats()["preemptions"] > 0
    alone = LLM(checkpoint, enable_prefix_caching=False)
    assert outs == [alone.generate(p, params)[0].token_ids for p in many]


def test_a_request_larger_than_the_cache_is_refused(checkpoint):
    from ds4.engine import RequestError

    llm = LLM(checkpoint, block_size=16, num_cache_blocks=2)
    with pytest.raises(RequestError, match="cache blocks"):
        llm.generate(list(range(2, 40)), GREEDY)


def test_cancel_frees_the_blocks(checkpoint):
    llm = LLM(checkpoint)
    request = llm.engine.add_request(prompts(llm.config.vocab_size)[0], GREEDY)
    llm.engine.step()
    llm.engine.cancel(request)
    llm.engine.check_integrity()
    assert llm.engine.release(request).finish_reason == "cancelled"
    assert not llm.engine.has_unfinished


def test_a_vanishing_temperature_is_greedy_not_nan(tiny_v3):
    """temperature=3e-120 once made logits / T overflow to inf and failed the whole batch's step."""
    llm = LLM(tiny_v3)
    prompt = prompts(llm.config.vocab_size)[3]
    tiny_t = SamplingParams(temperature=3e-120, max_tokens=12, ignore_eos=True)
    assert llm.generate(prompt, tiny_t)[0].token_ids == llm.generate(prompt, GREEDY)[0].token_ids
