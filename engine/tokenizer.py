"""A checkpoint's tokenizer.json (byte-level BPE) through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ds4.engine.errors import ConfigError


class Tokenizer:
    def __init__(self, path: str | Path, bos_token_id: int | None):
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{path}: no tokenizer.json; pass token ids instead of text, or add the tokenizer")
        self._tok = HFTokenizer.from_file(str(file))
        self.bos_token_id = bos_token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if add_bos and self.bos_token_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
