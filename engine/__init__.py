"""ds4's inference engine: DeepSeek V3, V3.2 and V4 checkpoints in torch, behind the `LLM` facade."""

from ds4.engine.config import EngineConfig, ModelConfig
from ds4.engine.errors import CheckpointError, ConfigError, EngineError, RequestError
from ds4.engine.llm import LLM
from ds4.engine.request_engine import LLMEngine, RequestOutput
from ds4.engine.sampler import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "ModelConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
