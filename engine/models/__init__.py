"""One file per model family; `build_model` picks the class from `ModelConfig.model_type`."""

from ds4.engine.config import ModelConfig


def build_model(config: ModelConfig, engram_tokens=None):
    """`engram_tokens`: V4's Engram normalization table (see ds4.engine.layers.engram), when enabled."""
    if config.is_v4:
        from ds4.engine.models.deepseek_v4 import DeepseekV4ForCausalLM

        return DeepseekV4ForCausalLM(config, engram_tokens)
    from ds4.engine.models.deepseek_v3 import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(config)
