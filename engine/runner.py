"""The model runner: loads a checkpoint onto a device, or pipelined over several (the layers split in
order), and runs one forward step over a flat token batch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ds4.engine.cache import PagedLatentCache
from ds4.engine.config import EngineConfig, ModelConfig
from ds4.engine.context import ForwardContext, SeqSlice, forward_context
from ds4.engine.errors import ParamError
from ds4.engine.layers.engram import normalized_token_map
from ds4.engine.loader import keep_stored, load_weights, materialize, model_fingerprint
from ds4.engine.models import build_model
from ds4.engine.pipeline import Pipeline, current_device, stage_sizes
from ds4.engine.step_inputs import StepInputs
from ds4.engine.window_cache import WindowCache
from ds4.kernels import triton_enabled

log = logging.getLogger("ds4.engine")


def open_device(name: str) -> torch.device:
    """The device `name` names, checked before any weight is placed: a name torch does not know, or a CUDA
    device this torch or machine does not have, is a ParamError that says what to pass instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ParamError(
            f"--device {name}: not a device; use cpu, cuda or cuda:N (e.g. cuda:0)", "device"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU is visible"
            raise ParamError(
                f"--device {name}: no CUDA device here ({why}): use --device cpu, or a torch built for CUDA "
                "on a machine with a GPU",
                "device",
            )
        if device.index is not None and device.index >= count:
            raise ParamError(
                f"--device {name}: there are {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})",
                "device",
            )
    return device


class ModelRunner:
    def __init__(self, path: str | Path, engine_config: EngineConfig):
        self.engine_config = engine_config
        self.config = ModelConfig.from_dir(path)
        self.devices = [open_device(d) for d in engine_config.devices or (engine_config.device,)]
        self.device = self.devices[0]  # where the inputs go; the layers' devices are `layer_devices`
        self.dtype = getattr(torch, engine_config.dtype)
        engram_tokens = None
        if self.config.engram is not None:
            tokenizer = Path(path) / "tokenizer.json"
            engram_tokens = normalized_token_map(
                tokenizer if tokenizer.is_file() else None, self.config.vocab_size, self.config.engram.pad_id
            )
        with torch.device("meta"):
            self.model = build_model(self.config, engram_tokens)
        self.quantized_modules = 0  # modules holding weights as the checkpoint stores them (FP8, FP4, int4)
        if engine_config.weights == "stored":
            self.quantized_modules = keep_stored(self.model, path, self.config, self.dtype)
        self.pipeline = self.model.pipeline = self._split()
        self.layer_devices = self.pipeline.layer_devices  # and `pipeline.layer_stages`: the stage of each
        materialize(self.model, self.config, self.dtype, self.device, self.layer_devices)
        load_weights(self.model, path, self.config)
        head, last = self.model.head, self.model.norm.weight.device
        if head.weight.device != last:  # tied to the embeddings, which live on the first stage
            head.weight = nn.Parameter(head.weight.detach().to(last), requires_grad=False)
        self.model.eval()
        self.handoffs = self.pipeline.stats  # activations moved between stages
        self.tiered = []  # hybrid execution: the tiered experts of each MoE layer
        if engine_config.hot_experts is not None:
            from ds4.engine.hybrid import make_hybrid

            self.tiered = make_hybrid(
                self.model,
                engine_config.hot_experts,
                engine_config.expert_device,
                engine_config.hot_period,
                engine_config.stream_tokens,
            )
        self.fingerprint = model_fingerprint(path, self.dtype)
        self.inputs = StepInputs(self.device)
        self.graphs = None  # DecodeGraphs over the engine's cache, once captured
        self.graph_failure: str | None = None  # why capturing them failed, where it did
        self.decode_forward = self._eager_decode

    def _split(self) -> Pipeline:
        """The layers over `devices` in order, each running its `layer_split` count of them (default:
        balanced by the bytes of the layers' weights, as the planner balances its GPUs)."""
        materialize(self.model, self.config, self.dtype, "meta")  # storage dtypes without storage: bytes
        sizes = stage_sizes(self.model, len(self.devices), self.engine_config.layer_split)
        return Pipeline.split(self.devices, sizes)

    def new_cache(
        self, num_slots: int, max_len: int, block_size: int = 256
    ) -> PagedLatentCache | WindowCache:
        """A cache for callers that manage no blocks: slot s owns positions [0, max_len) of its own."""
        if self.config.is_v4:
            return WindowCache(
                self.config,
                max_len,
                self.dtype,
                self.device,
                layer_devices=self.layer_devices,
                num_slots=num_slots,
            )
        per_slot = -(-max_len // block_size)
        blocks = num_slots * per_slot
        return PagedLatentCache(
            self.config, blocks, block_size, self.dtype, self.device, per_slot, self.layer_devices
        )

    def new_paged_cache(
        self, num_blocks: int, block_size: int, max_len: int, max_num_seqs: int = 1
    ) -> PagedLatentCache | WindowCache:
        """The engine's cache: paged blocks (V3, V3.2), or V4's pooled state for `max_num_seqs` sequences
        with its compressed rows in the blocks (its prefix blocks also snapshot the rest of that state)."""
        if self.config.is_v4:
            return WindowCache(
                self.config,
                max_len,
                self.dtype,
                self.device,
                block_size,
                self.layer_devices,
                max_num_seqs,
                num_blocks,
            )
        return PagedLatentCache(
            self.config, num_blocks, block_size, self.dtype, self.device, layer_devices=self.layer_devices
        )

    def mla_mode(self, seqs: list[SeqSlice]) -> str:
        if self.engine_config.mla_mode != "auto":
            return self.engine_config.mla_mode
        return "absorbed" if all(s.num_tokens == 1 for s in seqs) else "naive"  # decode / prefill

    @torch.inference_mode()
    def step(self, token_ids: list[int], seqs: list[SeqSlice], cache, all_logits=False):
        """Runs the new tokens of `seqs` (concatenated in `token_ids`); returns float32 logits:
        [T, V] for every token when `all_logits`, else [len(seqs), V] for each sequence's last token,
        on the device of the last layer."""
        if not all_logits and self.decodes_batched(seqs, cache):
            return self._decode(token_ids, seqs, cache)
        seqs = [cache.prepare(s) for s in seqs]
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(s.start, s.end) for s in seqs]).to(self.device)
        ctx = ForwardContext(seqs=seqs, positions=positions, cache=cache, mla_mode=self.mla_mode(seqs))
        with forward_context(ctx), current_device(self.device):  # a pipeline's stages switch it
            hidden = self.model(input_ids, positions)  # [T, D]
            if not all_logits:
                hidden = hidden[[s.offset + s.num_tokens - 1 for s in seqs]]
            return self.model.logits(hidden)

    def decodes_batched(self, seqs: list[SeqSlice], cache) -> bool:
        """Every sequence adds one token, over a paged latent cache (V3, V3.2, absorbed) or V4's pooled
        window state: attention runs for the whole batch at once from device tensors alone, a step that
        can be captured as a graph."""
        if not all(s.num_tokens == 1 for s in seqs):
            return False
        if isinstance(cache, WindowCache):
            return True
        return isinstance(cache, PagedLatentCache) and self.mla_mode(seqs) == "absorbed"

    def _decode(self, token_ids: list[int], seqs: list[SeqSlice], cache) -> torch.Tensor:
        seqs = [cache.with_blocks(s) for s in seqs]
        state_rows = [cache.row(s.slot) for s in seqs] if isinstance(cache, WindowCache) else None
        input_ids, positions, batch = self.inputs.decode(token_ids, seqs, cache.block_size, 0, state_rows)
        if self.graphs is not None and cache is self.graphs.cache:
            logits = self.graphs.run(input_ids, positions, batch)
            if logits is not None:
                return logits.clone()  # the graph's output buffer is overwritten by the next replay
        ctx = ForwardContext(seqs=seqs, positions=positions, cache=cache, mla_mode="absorbed", decode=batch)
        with forward_context(ctx), current_device(self.device):
            return self.decode_forward(input_ids, positions)  # [B, V]: every token is a last one

    def _eager_decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model(input_ids, positions))

    def graph_blocker(self, cache) -> str | None:
        """Why decode steps over `cache` cannot be captured as CUDA graphs here, or None."""
        if self.device.type != "cuda":
            return "not on a CUDA device"
        if not triton_enabled(self.device):
            return "the torch kernel path reads device values on the host"
        if isinstance(cache, PagedLatentCache) and self.engine_config.mla_mode == "naive":
            return "mla_mode naive decodes per sequence"
        return None

    def compile_decode(self) -> None:
        """Decode steps run compiled (ds4.engine.compiled) where this runner allows; else says why, once."""
        from ds4.engine.compiled import CompiledDecode, compile_blocker

        blocker = compile_blocker(self)
        if blocker is None:
            self.decode_forward = CompiledDecode(self._eager_decode)
        else:
            log.info("decode steps run uncompiled: %s", blocker)

    def capture_decode_graphs(self, cache, max_batch: int, max_len: int) -> None:
        """Captures the decode graphs over `cache` where this model and device allow (see graph_blocker)."""
        from ds4.engine.graphs import DecodeGraphs

        try:
            self.graphs = DecodeGraphs(self, cache, max_batch, -(-max_len // cache.block_size))
        except RuntimeError as e:  # CUDA's capture refused an op, or the graphs' memory did not fit
            # what the capture made is dropped; of the cache, only its scratch rows were written
            self.graphs = None
            self.graph_failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning(
                "decode steps run eagerly: capturing their CUDA graphs failed (%s)", self.graph_failure
            )
