"""A checkpoint's tokenizer.json (byte-level BPE) through the `tokenizers` library, the family's chat
template as token ids (chat_template.py: V3's, with V3.1's tool calls; dsml.py: V3.2's and V4's), and
incremental detokenization that never emits half a UTF-8 character."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from ds4.engine import chat_template, dsml
from ds4.engine.errors import ConfigError


class Tokenizer:
    def __init__(self, path: str | Path, bos_token_id: int | None, model_type: str = "deepseek_v3"):
        """`model_type` (config.json's) chooses the chat template and its tool-call format."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(
                f"{path}: no tokenizer.json; pass token ids instead of text, or add the tokenizer"
            )
        self._tok = HFTokenizer.from_file(str(file))
        self.bos_token_id = bos_token_id
        self.model_type = model_type
        added_tokens = self._tok.get_added_tokens_decoder()
        self._added_ids = frozenset(added_tokens)
        added = sorted((t.content for t in added_tokens.values()), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, added))) if added else None
        self._max_token_chars: int | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text of n characters has at least
        n // max_token_chars tokens, a bound that needs no tokenising."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._plain(text)
        return [self.bos_token_id] + ids if add_bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what a grammar engine compiles against)."""
        return self._tok.to_str()

    def token_id(self, token: str) -> int | None:
        """The id of a (special) token, or None when this tokenizer does not have it."""
        return self._tok.token_to_id(token)

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """The text of `ids`; control tokens are dropped unless `keep_special` (a tool-call parser
        reads DeepSeek's tool-call tokens)."""
        return self._tok.decode(ids, skip_special_tokens=not keep_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token can hold part of a UTF-8 character, so
        its text alone may not say): an added token's spelling, a byte-level token through the
        byte alphabet, otherwise its decoded text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids or not isinstance(self._tok.decoder, decoders.ByteLevel):
            return (piece if token_id in self._added_ids else self._tok.decode([token_id])).encode()
        return bytes(_BYTE_OF_CHAR[c] for c in piece)

    def encode_fim(self, prefix: str | list[int], suffix: str) -> list[int] | None:
        """DeepSeek's fill-in-the-middle prompt, BOS <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>
        (the prefix as text or token ids); None when this tokenizer has no FIM tokens."""
        begin, hole, end = (self.token_id(t) for t in FIM_TOKENS)
        if begin is None or hole is None or end is None:
            return None
        head = [self.bos_token_id] if self.bos_token_id is not None else []
        body = self.encode(prefix, add_bos=False) if isinstance(prefix, str) else list(prefix)
        return [*head, begin, *body, hole, *self.encode(suffix, add_bos=False), end]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of untrusted text (a chat message, a repository file): a control token's spelling in
        it (`<｜User｜>`, `<｜end▁of▁sentence｜>`) is encoded as the plain text it is, never as the token."""
        if self._control is None or self._control.search(text) is None:
            return self._plain(text)
        ids, start = [], 0
        for match in self._control.finditer(text):
            ids += self._plain(text[start : match.start()]) + self._literal(match.group())
            start = match.end()
        return ids + self._plain(text[start:])

    def _plain(self, text: str) -> list[int]:
        """encode_batch releases the GIL (encode does not): a long text tokenised in a server's worker
        thread leaves the event loop free. Same ids as encode."""
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids if text else []

    def _literal(self, text: str) -> list[int]:
        """The tokenizer's pipeline without its added-token matching: normalizer, pre-tokenizer, model."""
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        words = self._tok.pre_tokenizer.pre_tokenize_str(text) if self._tok.pre_tokenizer else [(text, None)]
        return [token.id for word, _ in words for token in self._tok.model.tokenize(word)]

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The family's template (V3's: BOS, the system text and the tools' descriptions, then
        <｜User｜>{user} and <｜Assistant｜>{reply}[{tool calls}]<｜end▁of▁sentence｜> turns, tool results as
        <｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>, ending with <｜Assistant｜> to prompt a reply;
        V3.2's and V4's: see dsml.py). `tools` are OpenAI's function tools ({"type": "function",
        "function": {name, description, parameters}})."""
        return "".join(text for text, _ in self._chat_parts(messages, add_generation_prompt, tools))

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat prompt (the template carries its own BOS): the template's markers as
        their control tokens (as text where this tokenizer lacks them), the messages' contents as text
        only."""
        ids = []
        for text, is_marker in self._chat_parts(messages, True, tools):
            marker_id = self.token_id(text) if is_marker else None
            if marker_id is not None:
                ids.append(marker_id)
            else:  # a marker spanning several tokens (DSML's tags) is the template's own text
                ids += self._plain(text) if is_marker else self.encode_text(text)
        return ids

    def _chat_parts(
        self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None
    ) -> list[tuple[str, bool]]:
        if self.model_type in dsml.CALLS_TAG:
            return dsml.chat_parts(messages, add_generation_prompt, tools, self.model_type)
        return chat_template.chat_parts(messages, add_generation_prompt, tools)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the others for the
    characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_alphabet()


class IncrementalDetokenizer:
    """Text of a growing token list, extended step by step: only a short window is decoded each time,
    and text ending in an incomplete UTF-8 sequence is held back until its next token arrives."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # the window decoded for context starts here
        self.read_offset = 0  # tokens up to here are already in `text`

    def add(self, token_id: int) -> str:
        """Appends a token; returns the newly stable text (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if after.endswith("\ufffd") or len(after) <= len(before) and after == before:
            return ""
        delta = after[len(before) :]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


# DeepSeek's special tokens; BOS and EOS take ids 0 and 1 as in DeepSeek's configs; then the chat roles
# and the fill-in-the-middle markers (DeepSeek's FIM prompt: begin PREFIX hole SUFFIX end).
SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁hole｜>",
    "<｜fim▁end｜>",
)
FIM_TOKENS = SPECIAL_TOKENS[4:7]
# Text every CPython install carries: the corpus for tokenizers of test checkpoints (no download).
CORPUS_MODULES = (
    "argparse.py",
    "textwrap.py",
    "dataclasses.py",
    "functools.py",
    "pathlib.py",
    "difflib.py",
    "shutil.py",
    "subprocess.py",
    "json/decoder.py",
    "json/encoder.py",
    "tokenize.py",
    "ast.py",
)


def corpus_texts() -> list[str]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [
        (stdlib / name).read_text(encoding="utf-8") for name in CORPUS_MODULES if (stdlib / name).is_file()
    ]


def train_bpe(vocab_size: int, texts: list[str] | None = None) -> HFTokenizer:
    """A byte-level BPE with DeepSeek's special tokens, trained in about a second."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus_texts(), trainer)
    return tok
