"""DeepSeek tool-call output read back as OpenAI tool_calls: whole and streamed agree at every split,
content before the calls is kept, and what a model garbles comes back as OpenAI would give it."""

from __future__ import annotations

import pytest

from ds4.agent.api.tool_calls import ToolCallStream, merge, parse
from ds4.engine.chat_template import CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END


def calls(*pairs: tuple[str, str]) -> str:
    body = "".join(f"{CALL_BEGIN}{name}{CALL_SEP}{args}{CALL_END}" for name, args in pairs)
    return f"{CALLS_BEGIN}{body}{CALLS_END}"


def plain(parsed_calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in parsed_calls]


def test_content_then_two_calls():
    content, found = parse("Let me look. " + calls(("read_file", '{"path": "a.py"}'), ("ls", "{}")))
    assert content == "Let me look. " and plain(found) == [("read_file", '{"path": "a.py"}'), ("ls", "{}")]
    assert len({c["id"] for c in found}) == 2 and all(c["type"] == "function" for c in found)


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_deltas_reassemble_to_the_whole_parse(step):
    text = "ok " + calls(("get_weather", '{"city": "Paris", "celsius": true}'), ("ls", "{}"))
    stream, content, deltas = ToolCallStream(), "", []
    for end in [*range(step, len(text), step), len(text)]:
        c, d = stream.update(text[:end])
        content, deltas = content + c, deltas + d
    c, d = stream.update(text, final=True)
    content, deltas = content + c, deltas + d
    whole_content, whole = parse(text)
    assert content == whole_content and plain(merge(deltas)) == plain(whole)
    assert sum(1 for d in deltas if "id" in d) == 2  # each call announced once


def test_a_marker_prefix_is_held_back_until_it_is_known():
    stream = ToolCallStream()
    assert stream.update("hi <｜tool")[0] == "hi "
    assert stream.update("hi <｜tool", final=True)[0] == "<｜tool"


def test_garbled_output_is_content_and_bad_arguments_pass_through():
    assert parse("x " + CALLS_BEGIN + "junk") == ("x " + CALLS_BEGIN + "junk", [])
    content, found = parse(calls(("f", '{"a": ')))
    assert content == "" and plain(found) == [("f", '{"a": ')]  # invalid JSON, as OpenAI passes it on
    cut = CALLS_BEGIN + CALL_BEGIN + "f" + CALL_SEP + '{"a'
    assert plain(parse(cut)[1]) == [("f", '{"a')]  # cut short by max_tokens: finish_reason says length


def test_forced_parallel_calls_stop_at_the_bound(tiny_v3):
    """With parallel calls, a forced answer holds up to MAX_PARALLEL_CALLS calls and then must close:
    a model that would call forever is cut off by the grammar, not by max_tokens."""
    from ds4.agent.api.tool_calls import MAX_PARALLEL_CALLS, call_grammar
    from ds4.engine.config import ModelConfig
    from ds4.engine.grammar import GrammarCompiler
    from ds4.engine.tokenizer import Tokenizer

    config = ModelConfig.from_dir(tiny_v3)
    tokenizer = Tokenizer(tiny_v3, config.bos_token_id)
    compiler = GrammarCompiler(tokenizer, config.vocab_size, tuple(config.eos_token_ids))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    grammar = call_grammar([tool], True, tokenizer)
    one = f"{CALL_BEGIN}f{CALL_SEP}{{}}{CALL_END}"

    def accepts(n: int, closed: bool) -> bool:
        text = CALLS_BEGIN + one * n + (CALLS_END if closed else "")
        matcher = compiler.matcher(grammar)._m
        return matcher.consume_tokens(tokenizer.encode_text(text)) and not matcher.is_error()

    assert accepts(MAX_PARALLEL_CALLS, closed=True)
    assert accepts(MAX_PARALLEL_CALLS, closed=False)
    assert not accepts(MAX_PARALLEL_CALLS + 1, closed=False)
