"""DeepSeek-V3 and V3.2 causal LM (also V2-style checkpoints with q_lora_rank null).

Legend: T tokens in the step, D hidden size, V vocabulary.
Notable features:
- MLA attention caching only the [kv_lora_rank + qk_rope_head_dim] latent row per token;
- V3.2: a lightning indexer per layer restricts each query to its top-`index_topk` keys;
- the first layers (per `mlp_layer_types`) are dense SwiGLU, the rest routed MoE with shared experts;
- YaRN rope on interleaved pairs, with mscale folded into the softmax scale;
- pipelined when its layers live on several devices: the activations follow them (ds4.engine.pipeline).
Parameter names follow DeepSeek's reference code (attn.wq_a, ffn.w1, ...); the loader maps HF names.
"""

from __future__ import annotations

import torch
from torch import nn

from ds4.engine.config import ModelConfig
from ds4.engine.layers.linear import Linear
from ds4.engine.layers.mla import MLA
from ds4.engine.layers.moe import MLP, MoE
from ds4.engine.layers.norm import RMSNorm
from ds4.engine.layers.rope import RotaryEmbedding
from ds4.engine.pipeline import Pipeline


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config, layer_id)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            self.ffn = MoE(config)
        else:
            self.ffn = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        h, x = self.ffn_norm.add(self.attn(self.attn_norm(x), rope), x)  # the residual add in the norm
        return x + self.ffn(h)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.qk_rope_head_dim)
        self.pipeline = Pipeline([0] * config.num_hidden_layers)  # one stage unless the runner splits it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [T, D] of a flat token batch (sequences described by the context)."""
        x, inputs = self.begin(input_ids, positions)
        return self.end(self.pipeline.run(self.layers, x, inputs))

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(the layers' input [T, D], what every layer also reads): the part before the layers."""
        x = self.embed(input_ids)  # [T, D]
        return x, {"rope": self.rotary(positions, x.dtype)}  # cos, sin: [T, R/2]

    def end(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()  # [T, V]
