"""The LLM facade: `generate`, `stream`, `score` and `stats` over the engine loop.

Prompts are strings (tokenized with the checkpoint's tokenizer, BOS prepended) or token-id lists.
Requests run through the scheduler (continuous batching, chunked prefill, prefix cache); `score` is a
teacher-forced pass of its own that leaves the cache alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ds4.engine.config import EngineConfig
from ds4.engine.context import SeqSlice
from ds4.engine.engine_thread import EngineLoop, stable_text
from ds4.engine.errors import RequestError
from ds4.engine.request_engine import LLMEngine, RequestOutput
from ds4.engine.runner import ModelRunner
from ds4.engine.sampler import SamplingParams
from ds4.engine.tokenizer import Tokenizer

Prompt = str | Sequence[int]

__all__ = ["LLM", "Prompt", "RequestOutput"]


class LLM:
    def __init__(self, model: str | Path, device: str | None = None, dtype: str = "float32", **engine_kwargs):
        """`device`: where the model runs (default the CPU); or `devices=(...)` to split its layers over
        several, in order (`layer_split` layers each, default balanced by bytes). See EngineConfig."""
        self.engine_config = EngineConfig(device=device, dtype=dtype, **engine_kwargs)
        self.runner = ModelRunner(model, self.engine_config)
        self.config = self.runner.config
        has_tokenizer = (Path(model) / "tokenizer.json").is_file()
        self.tokenizer = (
            Tokenizer(model, self.config.bos_token_id, self.config.model_type) if has_tokenizer else None
        )
        self.max_model_len = self.engine_config.max_model_len or self.config.max_position_embeddings
        self.engine = LLMEngine(self.runner, self.tokenizer, self.engine_config, self.max_model_len)
        self._scored = 0

    # -- public API -------------------------------------------------------------------------

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [T, vocab] for every position of `token_ids`."""
        ids = self._prompt_ids(token_ids, max_new=0)
        cache = self.runner.new_cache(1, len(ids))
        logits = self.runner.step(
            ids, [SeqSlice(slot=-1, start=0, num_tokens=len(ids), offset=0)], cache, all_logits=True
        )
        self._scored += len(ids)
        return logits

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts: give at least one string or token-id list")
        ids = [self._prompt_ids(p, params.max_tokens) for p in prompts]
        request_ids = [self.engine.add_request(p, params) for p in ids]
        while self.engine.has_unfinished:
            self.engine.step()
        return [self.engine.release(r) for r in request_ids]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        on_finish: Callable[[RequestOutput], None] | None = None,
    ) -> Iterator[str]:
        """Text deltas of one completion as they are decoded (never broken UTF-8; stop strings never leak).
        `on_finish` receives the request's output (token ids, cached prompt tokens) when it ends."""
        params = params or SamplingParams()
        request_id = self.engine.add_request(self._prompt_ids(prompt, params.max_tokens), params)
        out = self.engine.output(request_id)
        sent = 0
        try:
            while out.finish_reason is None:
                self.engine.step()
                stable = stable_text(out, params)
                if len(stable) > sent:
                    yield stable[sent:]
                    sent = len(stable)
        finally:
            self.engine.cancel(request_id)  # a consumer that stops early frees the request's blocks
            self.engine.release(request_id)
            if on_finish is not None:
                on_finish(out)

    def serve(self) -> EngineLoop:
        """Starts an engine thread over this LLM's engine, for servers with concurrent callers; drive
        the engine only through it from then on."""
        return EngineLoop(self.engine)

    def stats(self) -> dict:
        """Tokens prefilled (scoring included), reused from the prefix cache, decoded; the hit rate."""
        s = self.engine.stats()
        s["tokens_prefilled"] += self._scored
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
        self.engine.check_prompt(ids, max_new)
        return ids
