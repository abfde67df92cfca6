"""DeepSeek-V4 causal LM (V4-Flash / V4-Pro geometry).

Legend: T tokens in the step, N mHC streams (hc_mult), D hidden size, V vocabulary.
Notable features:
- attention per layer kind: sliding window only, + compressed sparse (ratio 4, indexer top-k), or
  + heavily compressed (ratio 128, all rows); one shared 512-d K=V head with a sink;
- mHC: the residual is N streams, collapsed before and re-expanded after every block;
- MoE everywhere: the first layers hash-routed by token id (`tid2eid`), sqrt(softplus) scores,
  SwiGLU clamped at `swiglu_limit`, one shared expert; no dense layers;
- pipelined when its layers live on several devices: the streams follow them (ds4.engine.pipeline).
Parameter names are DeepSeek's reference names (attn.wkv, ffn.gate.tid2eid, hc_attn.fn, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.context import get_forward_context
from ds4.engine.layers.compressed_attention import CompressedAttention
from ds4.engine.layers.engram import Engram
from ds4.engine.layers.hyper import HyperConnection, HyperHead, hyper_update
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.moe import MoE
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.rope import RotaryEmbedding
from ds4.engine.pipeline import Pipeline


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, engram_vocab: tuple[int, int] | None = None):
        super().__init__()
        self.layer_id = layer_id
        D, eps = config.hidden_size, config.rms_norm_eps
        self.attn_norm = RMSNorm(D, eps, cast_after_weight=True)
        self.attn = CompressedAttention(config, layer_id)
        self.ffn_norm = RMSNorm(D, eps, cast_after_weight=True)
        self.ffn = MoE(config, hash_routed=config.mlp_layer_types[layer_id] == "hash_moe")
        hc = (D, config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, eps)
        self.hc_attn = HyperConnection(*hc)
        self.hc_ffn = HyperConnection(*hc)
        self.engram = None
        if config.engram is not None and layer_id in config.engram.layer_ids:
            self.engram = Engram(config.engram, layer_id, D, config.hc_mult, *engram_vocab)

    def forward(self, streams: torch.Tensor, ropes, input_ids: torch.Tensor, engram_ids) -> torch.Tensor:
        if self.engram is not None:  # n-gram memory joins the residual streams before attention
            streams = streams + self._engram(streams, engram_ids)
        post, comb, x = self.hc_attn(streams)  # streams [T, N, D] -> block input x [T, D]
        streams = hyper_update(streams, self.attn(self.attn_norm(x), ropes), post, comb)
        post, comb, x = self.hc_ffn(streams)
        return hyper_update(streams, self.ffn(self.ffn_norm(x), input_ids), post, comb)

    def _engram(self, streams: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        pool = ctx.cache.engram[self.layer_id]
        if ctx.decode is not None:  # decode: every sequence at once
            return self.engram.decode(streams, ids, pool, ctx.decode.slot_rows)
        outs = []
        for seq in ctx.seqs:  # prefill
            new, row = slice(seq.offset, seq.offset + seq.num_tokens), ctx.cache.row(seq.slot)
            state = pool.load(row)
            ends = tuple(ctx.cache.boundaries(seq))  # block ends inside the chunk: the state there is kept
            outs.append(self.engram.step(streams[new], ids[new], state, tuple(e - seq.start for e in ends)))
            pool.store(row, state)
            for end in ends:
                kept = state.kept[end - seq.start]
                ctx.cache.keep(seq.slot, end, f"engram_ids.{self.layer_id}", kept.ids)
                ctx.cache.keep(seq.slot, end, f"engram_values.{self.layer_id}", kept.values)
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, engram_tokens: tuple[torch.Tensor, int, int] | None = None):
        """`engram_tokens`: (token id -> normalized id, number of normalized ids, normalized pad id)."""
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.engram_token_map = None
        engram_vocab = None
        if config.engram is not None:
            self.engram_token_map, n_normalized, pad = engram_tokens or (
                torch.arange(config.vocab_size, device="cpu"),
                config.vocab_size,
                config.engram.pad_id,
            )
            engram_vocab = (n_normalized, pad)
        self.embed = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(Block(config, i, engram_vocab) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(D, config.hc_mult, config.hc_eps, config.rms_norm_eps)
        self.norm = RMSNorm(D, config.rms_norm_eps, cast_after_weight=True)
        self.head = Linear(D, config.vocab_size, bias=False)
        self.rotary = nn.ModuleDict(
            {
                "main": RotaryEmbedding(config.rope, config.qk_rope_head_dim),  # window-only layers
                "compress": RotaryEmbedding(
                    config.compress_rope, config.qk_rope_head_dim
                ),  # compressed layers
            }
        )
        self.pipeline = Pipeline([0] * config.num_hidden_layers)  # one stage unless the runner splits it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, D] of a flat token batch (sequences described by the context)."""
        streams, inputs = self.begin(input_ids, positions)
        return self.end(self.pipeline.run(self.layers, streams, inputs))

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the layers' residual streams [T, N, D], what every layer also reads): the part before them."""
        x = self.embed(input_ids)  # [T, D]
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary.items()}
        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()  # [T, N, D]
        engram_ids = None
        if self.engram_token_map is not None:
            self.engram_token_map = self.engram_token_map.to(input_ids.device)
            engram_ids = self.engram_token_map[input_ids]
        return streams, {"ropes": ropes, "input_ids": input_ids, "engram_ids": engram_ids}

    def end(self, streams: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(streams))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()  # [T, V]
