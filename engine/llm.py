"""The LLM facade: `generate`, `stream`, `score` and `stats` over a model runner and its cache.

Prompts are strings (tokenized with the checkpoint's tokenizer, BOS prepended) or token-id lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds4.engine.config import EngineConfig
from ds4.engine.context import SeqSlice
from ds4.engine.errors import RequestError
from ds4.engine.runner import ModelRunner
from ds4.engine.sampler import SamplingParams, make_generator, sample
from ds4.engine.tokenizer import Tokenizer

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop string) or "length"


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "float32", **engine_kwargs):
        self.engine_config = EngineConfig(device=device, dtype=dtype, **engine_kwargs)
        self.runner = ModelRunner(model, self.engine_config)
        self.config = self.runner.config
        has_tokenizer = (Path(model) / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer(model, self.config.bos_token_id) if has_tokenizer else None
        self.max_model_len = self.engine_config.max_model_len or self.config.max_position_embeddings
        self._stats = {"tokens_prefilled": 0, "tokens_reused": 0, "tokens_decoded": 0}

    # -- public API -------------------------------------------------------------------------

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [T, vocab] for every position of `token_ids`."""
        ids = self._prompt_ids(token_ids, max_new=0)
        cache = self.runner.new_cache(1, len(ids))
        logits = self.runner.step(
            ids, [SeqSlice(slot=0, start=0, num_tokens=len(ids), offset=0)], cache, all_logits=True
        )
        self._stats["tokens_prefilled"] += len(ids)
        return logits

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts: give at least one string or token-id list")
        prompt_ids = [self._prompt_ids(p, params.max_tokens) for p in prompts]
        outputs = [RequestOutput(prompt_token_ids=ids) for ids in prompt_ids]
        step = self.engine_config.max_num_seqs
        for first in range(0, len(prompt_ids), step):
            batch = list(range(first, min(first + step, len(prompt_ids))))
            for _ in self._run([prompt_ids[i] for i in batch], [outputs[i] for i in batch], params):
                pass
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion as they are decoded (stop strings never leak)."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt, params.max_tokens)
        out = RequestOutput(prompt_token_ids=ids)
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        for _ in self._run([ids], [out], params):
            stable = out.text if out.finish_reason else out.text[: max(len(out.text) - hold, 0)]
            if stable.endswith("\ufffd") and not out.finish_reason:
                continue  # an incomplete UTF-8 sequence: wait for its next byte
            if len(stable) > sent:
                yield stable[sent:]
                sent = len(stable)

    def stats(self) -> dict:
        s = dict(self._stats)
        total = s["tokens_prefilled"] + s["tokens_reused"]
        s["prefix_hit_rate"] = s["tokens_reused"] / total if total else 0.0
        return s

    # -- internals ----------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt, max_new: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) + max_new > self.max_model_len:
            raise RequestError(
                f"prompt of {len(ids)} tokens + {max_new} new exceeds the "
                f"{self.max_model_len}-token limit (max_model_len)"
            )
        return ids

    def _run(self, prompt_ids: list[list[int]], outs: list[RequestOutput], params: SamplingParams):
        """Prefills all prompts in one step, then decodes them together; yields (index, token) as produced."""
        cache = self.runner.new_cache(len(prompt_ids), max(len(p) for p in prompt_ids) + params.max_tokens)
        generators = [make_generator(params, "cpu") for _ in prompt_ids]
        seqs, offset = [], 0
        for slot, ids in enumerate(prompt_ids):
            seqs.append(SeqSlice(slot=slot, start=0, num_tokens=len(ids), offset=offset))
            offset += len(ids)
        logits = self.runner.step([t for ids in prompt_ids for t in ids], seqs, cache)
        self._stats["tokens_prefilled"] += offset
        active = list(range(len(prompt_ids)))
        while active:
            next_tokens = []
            for row, i in enumerate(active):
                token = sample(logits[row].cpu(), params, generators[i])
                self._append(outs[i], token, params)
                next_tokens.append(token)
                yield i, token
            still = [
                (i, t) for i, t in zip(active, next_tokens, strict=True) if outs[i].finish_reason is None
            ]
            if not still:
                break
            active = [i for i, _ in still]
            seqs = [
                SeqSlice(
                    slot=i, start=len(prompt_ids[i]) + len(outs[i].token_ids) - 1, num_tokens=1, offset=row
                )
                for row, i in enumerate(active)
            ]
            logits = self.runner.step([t for _, t in still], seqs, cache)
            self._stats["tokens_decoded"] += len(active)

    def _append(self, out: RequestOutput, token: int, params: SamplingParams) -> None:
        is_eos = token in self.config.eos_token_ids and not params.ignore_eos
        if not is_eos:
            out.token_ids.append(token)
        if self.tokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids)
            for stop in params.stop:
                if stop in out.text:
                    out.text = out.text[: out.text.index(stop)]
                    out.finish_reason = "stop"
                    return
        if is_eos:
            out.finish_reason = "stop"
        elif len(out.token_ids) >= params.max_tokens:
            out.finish_reason = "length"
