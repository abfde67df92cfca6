"""DeepSeek V3.2's and V4's DSML call blocks read back as OpenAI tool_calls: whole and streamed agree at
every split, content before the calls is kept, values become JSON arguments, what a model garbles comes
back as OpenAI would give it; and the forcing grammar takes exactly the well-formed calls."""

from __future__ import annotations

import json

import pytest

from ds4.agent.api.dsml_calls import DsmlCallStream, call_grammar
from ds4.agent.api.tool_calls import MAX_PARALLEL_CALLS, merge, parse
from ds4.engine.dsml import calls_parts

TAGS = ["function_calls", "tool_calls"]


def block(tag: str, *calls: tuple[str, dict]) -> str:
    """Calls as the template writes them (the same text the model was trained to write)."""
    openai = [{"function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls]
    return "".join(text for text, _ in calls_parts(openai, tag))


def plain(parsed_calls: list[dict]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in parsed_calls]


@pytest.mark.parametrize("tag", TAGS)
def test_content_then_two_calls(tag):
    text = "Let me look." + block(tag, ("read_file", {"path": "a.py", "n": 2}), ("ls", {}))
    content, found = parse(text + "<｜end▁of▁sentence｜>", DsmlCallStream(tag))
    assert content == "Let me look."  # the "\n\n" before the block belongs to the format
    assert plain(found) == [("read_file", '{"path": "a.py", "n": 2}'), ("ls", "{}")]
    assert len({c["id"] for c in found}) == 2 and all(c["type"] == "function" for c in found)


@pytest.mark.parametrize("tag", TAGS)
def test_values_become_json_arguments(tag):
    args = {"code": 'if a < b:\n    print("</p>")', "opts": {"x": [1, None]}, "ok": False, "s": "5"}
    (call,) = parse(block(tag, ("run", args)), DsmlCallStream(tag))[1]
    assert json.loads(call["function"]["arguments"]) == args  # "5" stays a string: string="true"


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_deltas_reassemble_to_the_whole_parse(tag, step):
    text = "ok\n" + block(tag, ("get_weather", {"city": 'Pa"ris', "celsius": True}), ("ls", {"d": [1]}))
    text += "<｜end▁of▁sentence｜>"
    stream, content, deltas = DsmlCallStream(tag), "", []
    for end in [*range(step, len(text), step), len(text)]:
        c, d = stream.update(text[:end])
        content, deltas = content + c, deltas + d
    c, d = stream.update(text, final=True)
    content, deltas = content + c, deltas + d
    whole_content, whole = parse(text, DsmlCallStream(tag))
    assert content == whole_content == "ok\n" and plain(merge(deltas)) == plain(whole)
    assert sum(1 for d in deltas if "id" in d) == 2  # each call announced once


@pytest.mark.parametrize("tag", TAGS)
def test_every_cut_of_the_output_streams_to_its_own_whole_parse(tag):
    """Cut short anywhere (max_tokens), the streamed deltas still reassemble to what parse() reads."""
    text = "a\n" + block(tag, ("f", {"s": "x</y", "n": 1}), ("g", {"t": "z"}))
    for cut in range(len(text) + 1):
        stream, content, deltas = DsmlCallStream(tag), "", []
        for end in range(1, cut + 1):
            c, d = stream.update(text[:end])
            content, deltas = content + c, deltas + d
        c, d = stream.update(text[:cut], final=True)
        whole_content, whole = parse(text[:cut], DsmlCallStream(tag))
        assert (content + c, plain(merge(deltas + d))) == (whole_content, plain(whole)), cut


@pytest.mark.parametrize("tag", TAGS)
def test_a_marker_prefix_is_held_back_until_it_is_known(tag):
    stream = DsmlCallStream(tag)
    assert stream.update("hi\n\n<｜DS")[0] == "hi"
    assert stream.update("hi\n\n<｜DS", final=True)[0] == "\n\n<｜DS"


@pytest.mark.parametrize("tag", TAGS)
def test_garbled_output_is_content_and_bad_values_pass_through(tag):
    opening = f"\n\n<｜DSML｜{tag}>\n"
    assert parse("x" + opening + "junk", DsmlCallStream(tag)) == ("x" + opening + "junk", [])
    bad = (
        opening
        + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">{1,</｜DSML｜parameter>\n'
    )
    assert plain(parse(bad + "</｜DSML｜invoke>", DsmlCallStream(tag))[1]) == [("f", '{"a": {1,}')]
    cut = opening + '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="p" string="true">a.p'
    assert plain(parse(cut, DsmlCallStream(tag))[1]) == [("f", '{"p": "a.p')]  # finish_reason says length


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def compiled(tiny_v3):
    from ds4.engine.config import ModelConfig
    from ds4.engine.grammar import GrammarCompiler
    from ds4.engine.tokenizer import Tokenizer

    config = ModelConfig.from_dir(tiny_v3)
    tokenizer = Tokenizer(tiny_v3, config.bos_token_id)
    compiler = GrammarCompiler(tokenizer, config.vocab_size, tuple(config.eos_token_ids))

    def accepts(grammar, text: str, complete: bool = True) -> bool:
        matcher = compiler.matcher(grammar)._m
        ok = matcher.consume_tokens(tokenizer.encode_text(text)) and not matcher.is_error()
        return ok and (not complete or matcher.is_accepting())

    return accepts


@pytest.mark.parametrize("tag", TAGS)
def test_the_grammar_takes_well_formed_calls_with_schema_valid_values(compiled, tag):
    grammar = call_grammar([WEATHER], False, tag)
    assert compiled(grammar, block(tag, ("get_weather", {"city": "Paris <3", "days": 3})))
    assert compiled(grammar, block(tag, ("get_weather", {"city": "Oslo", "days": 7, "unit": "F"})))
    assert not compiled(grammar, block(tag, ("get_weather", {"city": "Paris"})))  # days is required
    assert not compiled(grammar, block(tag, ("get_weather", {"city": "Lisbon area", "days": 1})))  # > 10
    assert not compiled(grammar, block(tag, ("get_weather", {"city": "Oslo", "days": 9})))  # > maximum
    assert not compiled(grammar, block(tag, ("get_weather", {"city": "Oslo", "days": 1, "unit": "K"})))
    assert not compiled(grammar, block(tag, ("get_weather", {"days": 1, "city": "Oslo"})))  # schema order
    assert not compiled(grammar, block(tag, ("ls", {})))
    assert not compiled(grammar, block(tag, *[("get_weather", {"city": "a", "days": 1})] * 2))  # one call


@pytest.mark.parametrize("tag", TAGS)
def test_forced_parallel_calls_stop_at_the_bound(compiled, tag):
    grammar = call_grammar([WEATHER], True, tag)
    calls = [("get_weather", {"city": "a", "days": 1})]
    assert compiled(grammar, block(tag, *calls * MAX_PARALLEL_CALLS))
    over = block(tag, *calls * (MAX_PARALLEL_CALLS + 1))
    assert not compiled(grammar, over[: over.rindex("\n</｜DSML｜")], complete=False)


@pytest.mark.parametrize("tag", TAGS)
def test_the_grammar_covers_parameterless_tools_and_json_valued_parameters(compiled, tag):
    ls = {"type": "function", "function": {"name": "ls"}}
    edit = {
        "type": "function",
        "function": {
            "name": "edit",
            "parameters": {
                "type": "object",
                "properties": {
                    "lines": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
                    "mode": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    "tag": {"type": "string", "pattern": "^v[0-9]$"},
                },
                "required": ["lines", "note"],
            },
        },
    }
    grammar = call_grammar([ls, edit], True, tag)
    assert compiled(grammar, block(tag, ("ls", {})))
    assert compiled(grammar, block(tag, ("edit", {"lines": [], "mode": None, "note": 5}), ("ls", {})))
    assert not compiled(grammar, block(tag, ("edit", {"lines": [1, 2, 3], "note": 5})))  # maxItems
    assert not compiled(grammar, block(tag, ("edit", {"lines": []})))  # "note" is required, though untyped
    # a string with a pattern is JSON (string="false"), held to the pattern; parsed, it is the string
    note = '<｜DSML｜parameter name="note"'
    tagged = '<｜DSML｜parameter name="tag" string="false">"v7"</｜DSML｜parameter>\n' + note
    quoted = block(tag, ("edit", {"lines": [], "note": 0})).replace(note, tagged)
    assert compiled(grammar, quoted)
    assert json.loads(parse(quoted, DsmlCallStream(tag))[1][0]["function"]["arguments"])["tag"] == "v7"
    assert not compiled(grammar, quoted.replace('"v7"', '"v77"'))
