"""The LLM facade through its public API: generate, stream, score, stats and request errors,
on tiny random checkpoints written by `ds4-agent model init`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer

from ds4.engine import LLM, RequestError, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def f(x):", "import os\n", "class A:\n    pass  # a longer prompt than the others\n"]


@pytest.fixture(scope="module")
def llm(tiny_v3):
    return LLM(tiny_v3)


@pytest.fixture(scope="module")
def llm32(tiny_v32):
    return LLM(tiny_v32)


def copy_checkpoint(src, dst, **config_updates):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_updates)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_text_is_decode_of_token_ids(llm, tiny_v3):
    out = llm.generate("def f(x):", SamplingParams(max_tokens=10, ignore_eos=True, seed=0))[0]
    hf = Tokenizer.from_file(str(tiny_v3 / "tokenizer.json"))
    assert out.text == hf.decode(out.token_ids)
    assert out.prompt_token_ids == [0] + hf.encode("def f(x):", add_special_tokens=False).ids


def test_length_finish(llm):
    out = llm.generate("def f(x):", SamplingParams(max_tokens=7, ignore_eos=True, seed=0))[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


@pytest.mark.parametrize("family", ["v3", "v32"])
def test_batch_equals_single(family, llm, llm32):
    model = llm if family == "v3" else llm32
    batched = model.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in batched] == [model.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def test_batch_equals_single_across_chunks(tiny_v3, llm):
    chunked = LLM(tiny_v3, max_num_seqs=2).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_batch_with_early_finish(llm):
    """One request stops on a stop string mid-way; the others keep decoding as if alone."""
    stop = llm.generate(PROMPTS[0], GREEDY)[0].text[4:7]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=(stop,))
    batched = llm.generate(PROMPTS, params)
    assert batched[0].finish_reason == "stop"
    assert len(batched[0].token_ids) < 12
    assert [(o.token_ids, o.text) for o in batched] == [
        (o.token_ids, o.text) for o in (llm.generate(p, params)[0] for p in PROMPTS)
    ]


def test_seeded_batch_equals_single(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=5, max_tokens=10, ignore_eos=True)
    batched = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in batched] == [llm.generate(p, params)[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("family", ["v3", "v32"])
def test_greedy_matches_score(family, llm, llm32):
    model = llm if family == "v3" else llm32
    prompt_ids = model.generate("def f(x):", GREEDY)[0].prompt_token_ids
    first, second = model.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=2))[0].token_ids
    assert first == int(model.score(prompt_ids)[-1].argmax())
    assert second == int(model.score(prompt_ids + [first])[-1].argmax())


def test_score_shape(llm):
    logits = llm.score([0, 5, 9, 300])
    assert tuple(logits.shape) == (4, llm.config.vocab_size)


def test_token_id_prompts(llm):
    text_out = llm.generate("def f(x):", GREEDY)[0]
    ids_out = llm.generate(text_out.prompt_token_ids, GREEDY)[0]
    batch = llm.generate([text_out.prompt_token_ids, [0, 7, 8]], GREEDY)
    assert ids_out.token_ids == text_out.token_ids
    assert ids_out.text == text_out.text
    assert len(batch) == 2
    assert batch[0].token_ids == text_out.token_ids


def test_eos_stops_immediately(tiny_v3, llm, tmp_path):
    first = llm.generate("def f(x):", GREEDY)[0].token_ids[0]
    out = LLM(copy_checkpoint(tiny_v3, tmp_path / "ckpt", eos_token_id=first)).generate("def f(x):", GREEDY)
    assert out[0].token_ids[0] == first  # ignore_eos decodes past it
    out = LLM(tmp_path / "ckpt").generate("def f(x):", SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert out.token_ids == []
    assert out.text == ""
    assert out.finish_reason == "stop"


def test_eos_stops_mid_generation(tiny_v3, llm, tmp_path):
    greedy_ids = llm.generate("def f(x):", GREEDY)[0].token_ids
    eos = next(t for i, t in enumerate(greedy_ids) if i >= 2 and t not in greedy_ids[:i])
    cut = greedy_ids.index(eos)
    eos_llm = LLM(copy_checkpoint(tiny_v3, tmp_path / "ckpt", eos_token_id=[eos, 511]))
    out = eos_llm.generate("def f(x):", SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert out.token_ids == greedy_ids[:cut]
    assert eos not in out.token_ids
    assert out.finish_reason == "stop"


def test_stop_string(llm):
    full = llm.generate("class A:", GREEDY)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = llm.generate("class A:", SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,)))[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"


def test_stop_as_plain_string():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


@pytest.mark.parametrize("prompt", ["def f(x):", "class A:"])
def test_stream_joins_to_generate(llm, prompt):
    params = SamplingParams(temperature=0.0, max_tokens=16)
    deltas = list(llm.stream(prompt, params))
    assert "".join(deltas) == llm.generate(prompt, params)[0].text
    assert len(deltas) > 1


@pytest.mark.parametrize("family", ["v3", "v32"])
def test_stream_with_stop_string(family, llm, llm32):
    model = llm if family == "v3" else llm32
    full = model.generate("class A:", GREEDY)[0].text
    params = SamplingParams(temperature=0.0, max_tokens=16, stop=(full[6:9], "never-seen"))
    text = model.generate("class A:", params)[0].text
    assert "".join(model.stream("class A:", params)) == text
    assert len(text) < len(full)


def test_seed_reproducible(llm):
    def sample(seed):
        params = SamplingParams(
            temperature=0.8, top_p=0.9, top_k=20, seed=seed, max_tokens=16, ignore_eos=True
        )
        return llm.generate("def f(x):", params)[0].token_ids

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_empty_prompt(llm):
    with pytest.raises(RequestError, match="empty prompt"):
        llm.generate([[]], GREEDY)
    with pytest.raises(RequestError, match="empty prompt"):
        list(llm.stream([], GREEDY))
    with pytest.raises(RequestError, match="empty prompt"):
        llm.score([])


def test_empty_text_prompt_gets_bos(llm):
    assert llm.generate("", GREEDY)[0].prompt_token_ids == [0]


@pytest.mark.parametrize("bad_id", [512, -1])
def test_token_id_out_of_vocab(llm, bad_id):
    with pytest.raises(RequestError, match=rf"token id {bad_id} is outside the vocabulary \[0, 512\)"):
        llm.generate([0, 5, bad_id], GREEDY)


def test_too_long(tiny_v3):
    short = LLM(tiny_v3, max_model_len=32)
    assert len(short.generate([0] * 20, SamplingParams(temperature=0.0, max_tokens=12))[0].token_ids) <= 12
    with pytest.raises(RequestError, match=r"20 tokens \+ 13 new exceeds the 32-token limit"):
        short.generate([0] * 20, SamplingParams(max_tokens=13))
    with pytest.raises(RequestError, match="33 tokens"):
        short.score([0] * 33)


def test_text_prompt_without_tokenizer(tiny_v3, tmp_path):
    folder = copy_checkpoint(tiny_v3, tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    bare = LLM(folder)
    with pytest.raises(RequestError, match="no tokenizer.json"):
        bare.generate("def f(x):", GREEDY)
    out = bare.generate([0, 5, 6], GREEDY)[0]
    assert len(out.token_ids) == GREEDY.max_tokens
    assert out.text == ""


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0)]
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("top_p", [5e-324, 1e-30, 1e-3])
def test_a_vanishing_top_p_keeps_the_most_likely_token(top_p):
    from ds4.engine.sampler import make_generator, sample

    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
    assert sample(logits, params, make_generator(params, "cpu")) == int(logits.argmax())


def test_stats(tiny_v3):
    fresh = LLM(tiny_v3)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    fresh.generate([[0, 5, 6], [0, 7, 8, 9, 10]], params)
    fresh.score([0, 1, 2])
    stats = fresh.stats()
    assert stats["tokens_prefilled"] == 3 + 5 + 3
    assert stats["tokens_decoded"] == 2 * 3  # the first token of each comes from prefill
    assert stats["prefix_hit_rate"] == 0.0


def test_empty_prompt_list_is_an_error(tiny_v3):
    with pytest.raises(RequestError, match="no prompts"):
        LLM(tiny_v3).generate([], SamplingParams(max_tokens=2))


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(stop=("",))


def test_logprobs_report_the_chosen_token_and_alternatives(tiny_v3):
    llm = LLM(tiny_v3)
    out = llm.generate([0, 5, 6], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=4))[
        0
    ]
    assert len(out.logprobs) == 3
    first = out.logprobs[0]
    assert first["token"] == out.token_ids[0] and len(first["top"]) == 4
    assert first["top"][0][0] == first["token"]  # greedy picks the most likely
    expected = torch.log_softmax(llm.score([0, 5, 6])[-1], -1)[first["token"]]
    assert abs(first["logprob"] - float(expected)) < 1e-5


def test_stop_token_ids_end_generation(tiny_v3):
    llm = LLM(tiny_v3)
    free = llm.generate([0, 5, 6], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    stop = free.token_ids[2]
    out = llm.generate(
        [0, 5, 6], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop_token_ids=(stop,))
    )[0]
    first = free.token_ids.index(stop)
    assert out.token_ids == free.token_ids[:first] and out.finish_reason == "stop"


def test_min_p_keeps_only_likely_tokens(tiny_v3):
    from ds4.engine.sampler import sample

    logits = torch.tensor([2.0, 1.9, -3.0, -5.0])
    params = SamplingParams(temperature=1.0, min_p=0.5, seed=0)
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, params, gen) for _ in range(200)}
    assert picks == {0, 1}


def test_chat_prompt_generates(tiny_v3):
    llm = LLM(tiny_v3)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "write a function"}])
    out = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.prompt_token_ids == ids
