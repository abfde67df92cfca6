"""The request engine: requests in, one scheduled step at a time through the model, tokens out.

Owns the block manager, the scheduler, the paged cache and each request's sampling state. `step()` runs
one batch (chunked prefills and decodes together) and reports the tokens it produced; the LLM facade and
servers drive it. Single-threaded by design: one engine per process, callers submit between steps (the
engine thread that servers share, EngineLoop, is in engine_thread.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ds4.engine.blocks import BlockManager, block_hash
from ds4.engine.config import EngineConfig
from ds4.engine.context import SeqSlice
from ds4.engine.disk_tier import DiskTier
from ds4.engine.errors import RequestError, StepFailed
from ds4.engine.runner import ModelRunner
from ds4.engine.sampler import SamplingParams, logprobs_batch, make_generator, sample_batch
from ds4.engine.scheduler import Scheduler, Sequence
from ds4.engine.sizing import paged_bytes
from ds4.engine.step_inputs import on_device
from ds4.engine.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from ds4.engine.grammar import GrammarCompiler, Matcher

log = logging.getLogger("ds4.engine")


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos, stop token, stop string), "length", "cancelled", "error"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[dict] | None = None  # per token: its log-probability and the top alternatives


@dataclass
class Request:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    output: RequestOutput
    detokenizer: IncrementalDetokenizer | None = None
    searched: int = 0  # text already searched for stop strings
    matcher: Matcher | None = None  # where the request stands in its grammar, when it has one


class LLMEngine:
    def __init__(
        self, runner: ModelRunner, tokenizer: Tokenizer | None, config: EngineConfig, max_model_len: int
    ):
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.max_model_len = max_model_len
        bs = config.block_size
        self.num_blocks = config.num_cache_blocks or self._default_num_blocks()
        caching = config.enable_prefix_caching
        self.blocks = BlockManager(self.num_blocks, bs, runner.fingerprint, enable_prefix_caching=caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.cache = runner.new_paged_cache(self.num_blocks, bs, max_model_len, config.max_num_seqs)
        self.blocks.on_evict = self.cache.drop_block
        self._check_workspace()
        self.disk = (
            DiskTier(config.prefix_cache_dir, runner.fingerprint)
            if config.prefix_cache_dir and caching
            else None
        )
        blocker = runner.graph_blocker(self.cache) if config.cuda_graphs else "turned off (cuda_graphs)"
        if blocker is None:
            runner.capture_decode_graphs(self.cache, config.max_num_seqs, max_model_len)
        elif runner.device.type == "cuda":
            log.info("decode steps run eagerly: %s", blocker)
        elif config.compile_decode:
            runner.compile_decode()
        self.requests: dict[int, Request] = {}
        self._grammars: GrammarCompiler | None = None  # built on first use: it reads the whole vocabulary
        self._grammars_lock = threading.Lock()
        self._ids = itertools.count()
        self.counters = {"tokens_prefilled": 0, "tokens_decoded": 0, "tokens_loaded_from_disk": 0}

    def _check_workspace(self) -> None:
        """Refuses to start (ConfigError with the numbers) when a full prefill chunk at the longest context
        would not fit in what the weights and the cache leave free on some device."""
        from ds4.engine.workspace import available_bytes, check_fits

        for device in dict.fromkeys(self.runner.devices):
            check_fits(
                self.runner.config,
                self.config.max_num_batched_tokens,
                self.max_model_len,
                self.runner.dtype.itemsize,
                available_bytes(device),
            )

    def _default_num_blocks(self) -> int:
        """Enough for max_num_seqs sequences of max_model_len tokens, within the configured memory of
        each device: a block's rows of a layer live on that layer's device, so the device holding the
        most bytes of a block bounds the count (the bytes as the planner counts them, `paged_bytes`)."""
        bs, cfg = self.config.block_size, self.runner.config
        wanted = self.config.max_num_seqs * -(-self.max_model_len // bs)
        devices = self.runner.layer_devices or [self.runner.device] * cfg.num_hidden_layers
        on = {d: [i for i, e in enumerate(devices) if e == d] for d in devices}
        itemsize = self.runner.dtype.itemsize
        per_block = max(paged_bytes(cfg, bs, itemsize, layers) for layers in on.values()) or 1
        return max(1, min(wanted, int(self.config.cache_memory_gb * (1 << 30)) // per_block))

    # -- requests -------------------------------------------------------------------------------

    def check_prompt(self, prompt_ids: list[int], max_new: int) -> None:
        """RequestError unless the prompt is non-empty, in the vocabulary and within max_model_len."""
        if not prompt_ids:
            raise RequestError("empty prompt: give at least one token")
        vocab = self.runner.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) + max_new > self.max_model_len:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens + {max_new} new exceeds the "
                f"{self.max_model_len}-token limit (max_model_len)"
            )

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this model's tokenizer (llguidance is imported only when asked)."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer.json: grammars need its vocabulary")
        with self._grammars_lock:
            if self._grammars is None:
                from ds4.engine.grammar import GrammarCompiler

                cfg = self.runner.config
                self._grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size, tuple(cfg.eos_token_ids))
            return self._grammars

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Everything add_request checks, without touching engine state (safe from any thread)."""
        self.check_prompt(prompt_ids, params.max_tokens)
        if params.grammar is not None:
            self.grammars.check(params.grammar)
        needed = -(-(len(prompt_ids) + params.max_tokens) // self.config.block_size)
        if needed > self.num_blocks:
            raise RequestError(
                f"prompt of {len(prompt_ids)} tokens + {params.max_tokens} new needs {needed} cache blocks; "
                f"the cache has {self.num_blocks} (raise num_cache_blocks or cache_memory_gb)"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        self.check_request(prompt_ids, params)
        if self.disk is not None:
            self._load_from_disk(prompt_ids)
        seq = Sequence(next(self._ids), list(prompt_ids), len(prompt_ids))
        output = RequestOutput(list(prompt_ids), logprobs=[] if params.logprobs is not None else None)
        detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        self.requests[seq.seq_id] = Request(
            seq, params, make_generator(params, self.runner.device), output, detokenizer, matcher=matcher
        )
        self.scheduler.add(seq)
        return seq.seq_id

    def _load_from_disk(self, token_ids: list[int]) -> None:
        """Brings the prompt's prefix blocks that only the disk tier has into free cache blocks."""
        bs, parent = self.config.block_size, b""
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens, self.blocks.fingerprint)
            if h not in self.blocks.hash_to_block:
                if not self.disk.has(h) or not self.blocks.free_ids:
                    return
                tensors = self.disk.load(h, parent, tokens, self.cache.block_template())
                if tensors is None:
                    return
                self.cache.load_block(self.blocks.adopt(h, parent, tokens), tensors)
                self.counters["tokens_loaded_from_disk"] += bs
            parent = h

    def cancel(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.output.finish_reason is None:
            req.output.finish_reason = "cancelled"
            self._retire(req)

    def output(self, request_id: int) -> RequestOutput:
        return self.requests[request_id].output

    def release(self, request_id: int) -> RequestOutput:
        """Forgets a finished request, returning its output."""
        req = self.requests.pop(request_id)
        assert req.output.finish_reason is not None, f"request {request_id} is still running"
        return req.output

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[tuple[int, int]]:
        """Runs one scheduled batch; returns (request id, token) for every token sampled."""
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.cache.free_slot(seq.seq_id)
        assert batch.entries or not self.scheduler.has_unfinished, "nothing schedulable: a request is too big"
        if not batch.entries:
            return []
        try:
            return self._run(batch)
        except Exception as error:
            return self._isolate(batch, error)

    def _isolate(self, batch, error: Exception) -> list[tuple[int, int]]:
        """A failed step: alone, its one request is the culprit and finishes with "error" (StepFailed);
        together, they all rerun alone (from the prefix cache, recomputing the rest) to find it."""
        seqs = [seq for seq, _ in batch.entries if seq.status != "finished"]
        for seq in seqs:
            self.cache.free_slot(seq.seq_id)
        if len(batch.entries) == 1:
            for seq in seqs:
                req = self.requests[seq.seq_id]
                req.output.finish_reason = "error"
                self._retire(req)
            raise StepFailed([seq.seq_id for seq, _ in batch.entries], error) from error
        log.warning("a step of %d requests failed (%r): rerunning them one at a time", len(seqs), error)
        self.scheduler.isolate(seqs)
        return []

    def _run(self, batch) -> list[tuple[int, int]]:
        tokens, slices = [], []
        for seq, n in batch.entries:
            start = seq.num_computed_tokens
            if start and not self.cache.has_state(seq.seq_id):  # a prefix hit on state kept per sequence
                self.cache.restore(seq.seq_id, seq.table.block_ids[: start // self.config.block_size])
            slices.append(SeqSlice(seq.seq_id, start, n, len(tokens), tuple(seq.table.block_ids)))
            tokens += seq.token_ids[start : start + n]
        logits = self.runner.step(tokens, slices, self.cache)
        for seq, block_id in self.scheduler.advance(batch):
            end = (seq.table.block_ids.index(block_id) + 1) * self.config.block_size
            self.cache.store_block(block_id, seq.seq_id, end)
            if self.disk is not None:
                block = self.blocks.blocks[block_id]
                self.disk.save(block.hash, block.parent, block.token_ids, self.cache.block_tensors(block_id))
        ready = []  # (row, seq): sequences whose prompt is done, so this step gives them a token
        for row, (seq, n) in enumerate(batch.entries):
            decode = n == 1 and len(seq.token_ids) > seq.num_prompt_tokens
            self.counters["tokens_decoded" if decode else "tokens_prefilled"] += n
            if seq.num_computed_tokens >= seq.num_tokens:
                ready.append((row, seq))
        if not ready:
            return []  # chunks of longer prefills only
        requests = [self.requests[seq.seq_id] for _, seq in ready]
        token_ids, logprobs = self._sample(logits, [row for row, _ in ready], requests)
        produced = []
        for (_, seq), req, token, lp in zip(ready, requests, token_ids, logprobs, strict=True):
            if lp is not None:
                req.output.logprobs.append(lp)
            seq.token_ids.append(token)
            produced.append((seq.seq_id, token))
            self.scheduler.cleared(seq)
            if self._append(req, token):
                self._retire(req)
        return produced

    def _sample(self, logits: torch.Tensor, rows: list[int], requests: list[Request]):
        """Samples the given rows of the step's logits on the device, all at once; the step's one copy
        back to the host is their ids (and the log-probabilities asked for)."""
        if len(rows) < logits.shape[0]:
            logits = logits.index_select(0, on_device(rows, torch.int64, logits.device))
        params = [r.params for r in requests]
        constrained = [(row, r.matcher) for row, r in enumerate(requests) if r.matcher is not None]
        mask = self.grammars.mask(constrained, logits.device) if constrained else None
        ids = sample_batch(logits, params, [r.generator for r in requests], mask)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if not asked:
            return ids.tolist(), [None] * len(rows)
        chosen, values, top_ids = logprobs_batch(logits, ids, max(asked))
        token_ids, chosen, values, top_ids = ids.tolist(), chosen.tolist(), values.tolist(), top_ids.tolist()
        logprobs = [
            None
            if p.logprobs is None
            else {"token": t, "logprob": c, "top": list(zip(i[: p.logprobs], v[: p.logprobs], strict=True))}
            for p, t, c, v, i in zip(params, token_ids, chosen, values, top_ids, strict=True)
        ]
        return token_ids, logprobs

    def _retire(self, req: Request) -> None:
        req.output.num_cached_tokens = req.seq.num_cached_tokens
        self.scheduler.finish(req.seq)
        self.cache.free_slot(req.seq.seq_id)

    def _append(self, req: Request, token: int) -> bool:
        """Adds a sampled token to the output; True when the request is done."""
        out, params = req.output, req.params
        stop_token = (token in self.runner.config.eos_token_ids and not params.ignore_eos) or (
            token in params.stop_token_ids
        )
        if not stop_token and req.matcher is not None:
            req.matcher.accept(token)
        if not stop_token:
            out.token_ids.append(token)
            if req.detokenizer is not None:
                req.detokenizer.add(token)
                out.text = req.detokenizer.text
                if self._hit_stop_string(req):
                    return True
        if stop_token or (req.matcher is not None and req.matcher.done):
            out.finish_reason = "stop"
        elif len(out.token_ids) >= params.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason is not None and req.detokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids)  # whatever the detokenizer still held back
        return out.finish_reason is not None

    def _hit_stop_string(self, req: Request) -> bool:
        text = req.output.text
        for stop in req.params.stop:
            at = text.find(stop, max(0, req.searched - len(stop) + 1))
            if at >= 0:
                req.output.text, req.output.finish_reason = text[:at], "stop"
                return True
        req.searched = len(text)
        return False

    def stats(self) -> dict:
        s = dict(self.counters, tokens_reused=self.scheduler.num_reused_tokens)
        total = s["tokens_prefilled"] + s["tokens_reused"]
        s["prefix_hit_rate"] = s["tokens_reused"] / total if total else 0.0
        s["free_blocks"], s["cached_blocks"] = self.blocks.num_free_blocks, len(self.blocks.cached)
        s["preemptions"] = self.scheduler.num_preemptions
        return s

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
