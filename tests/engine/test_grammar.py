"""Grammar-constrained sampling on a random tiny model: every constrained answer parses and conforms,
constrained and free requests share steps without the free ones noticing, the mask touches only its
rows, and a grammar that cannot be compiled is a RequestError."""

from __future__ import annotations

import json

import pytest
import torch

from ds4.engine import LLM, RequestError, SamplingParams
from ds4.engine.grammar import Grammar
from ds4.engine.sampler import TokenMask, apply_token_mask, sample_batch
from tests.schema_check import errors

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["bug", "feature", "chore"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "urgent": {"type": "boolean"},
    },
    "required": ["name", "age", "kind", "tags", "urgent"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_v3):
    return LLM(tiny_v3, max_num_seqs=64)


def run(llm: LLM, requests: list[tuple[list[int], SamplingParams]]):
    engine = llm.engine
    ids = [engine.add_request(p, params) for p, params in requests]
    while engine.has_unfinished:
        engine.step()
    return [engine.release(i) for i in ids]


@pytest.mark.slow
def test_a_hundred_samples_at_temperature_one_all_conform(llm):
    prompt = llm.tokenizer.encode("Describe the issue as JSON:")
    params = [
        SamplingParams(temperature=1.0, max_tokens=200, seed=s, grammar=Grammar.json_schema(SCHEMA))
        for s in range(100)
    ]
    outs = run(llm, [(prompt, p) for p in params])
    for out in outs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert errors(value, SCHEMA) == [], (out.text, errors(value, SCHEMA))
    assert len({out.text for out in outs}) > 50  # sampled, not one answer forced


def test_constrained_and_free_requests_share_a_step(llm):
    free = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    prompt = llm.tokenizer.encode("def f(x):")
    alone = run(llm, [(prompt, free)])[0]
    json_object = SamplingParams(temperature=0.7, max_tokens=300, seed=3, grammar=Grammar.json_object())
    together = run(llm, [(prompt, json_object), (prompt, free), (prompt, json_object)])
    assert together[1].token_ids == alone.token_ids
    for a, b in zip(together[1].logprobs, alone.logprobs, strict=True):
        assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) < 1e-5
    for out in (together[0], together[2]):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)


def test_a_lark_grammar_stops_when_complete(llm):
    grammar = Grammar.lark('start: "answer: " ("yes" | "no") "."')
    out = run(llm, [([0, 5, 6], SamplingParams(temperature=1.0, max_tokens=50, seed=1, grammar=grammar))])[0]
    assert out.finish_reason == "stop" and out.text in ("answer: yes.", "answer: no.")


@pytest.mark.parametrize(
    "grammar",
    [Grammar.json_schema({"type": "strin"}), Grammar.lark("start: nothing"), Grammar("json_schema", "{")],
)
def test_a_grammar_that_cannot_compile_is_a_request_error(llm, grammar):
    with pytest.raises(RequestError, match="cannot"):
        llm.engine.check_request([0, 5], SamplingParams(grammar=grammar))


def test_the_mask_changes_only_its_rows():
    logits = torch.randn(3, 70)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 2] = 1 << 3  # only token 67
    masked = apply_token_mask(logits, TokenMask(torch.tensor([1]), bits))
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert masked[1, 67] == logits[1, 67] and torch.isinf(masked[1]).sum() == 69
    params = [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0)]
    gens = [None, torch.Generator().manual_seed(0), None]
    ids = sample_batch(logits, params, gens, TokenMask(torch.tensor([1]), bits))
    assert ids[1] == 67 and ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
