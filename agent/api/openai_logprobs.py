"""The engine's per-token log-probabilities in OpenAI's two shapes: chat (`logprobs.content[]`, each with
its bytes and top alternatives) and completions (parallel `tokens` / `token_logprobs` / `top_logprobs` /
`text_offset` lists). The values are the model's own distribution, before any grammar mask."""

from __future__ import annotations

from ds4.engine.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -Infinity: a token the model gives no chance at all


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def _token(tokenizer: Tokenizer, token_id: int) -> tuple[str, bytes]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), raw


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    text, raw = _token(tokenizer, token_id)
    return {"token": text, "logprob": _value(logprob), "bytes": list(raw)}


def chat_logprobs(tokenizer: Tokenizer, entries: list[dict]) -> dict:
    """`choices[].logprobs` of a chat completion (or of one streamed chunk) from engine entries."""
    content = [
        {
            **_chat_entry(tokenizer, e["token"], e["logprob"]),
            "top_logprobs": [_chat_entry(tokenizer, t, lp) for t, lp in e["top"]],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """`choices[].logprobs` of a text completion, chunk by chunk: text offsets run on across chunks
    (from the end of an echoed prompt)."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset

    def echo(self, text: str) -> dict:
        """The echoed prompt's tokens: their log-probabilities are not computed (null); the completion's
        offsets start after the echoed text."""
        tokens = [_token(self.tokenizer, t)[0] for t in self.tokenizer.encode_text(text)]
        shaped = self._shaped(tokens, [None] * len(tokens), [None] * len(tokens))
        self.offset = len(text)
        return shaped

    def add(self, entries: list[dict]) -> dict:
        tokens = [_token(self.tokenizer, e["token"])[0] for e in entries]
        values = [_value(e["logprob"]) for e in entries]
        tops = [{_token(self.tokenizer, t)[0]: _value(lp) for t, lp in e["top"]} for e in entries]
        return self._shaped(tokens, values, tops)

    def _shaped(self, tokens: list[str], values: list, tops: list) -> dict:
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
