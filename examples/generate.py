"""Write a tiny random DeepSeek-V3.2 checkpoint and generate from it with the public API.

Run: .venv/bin/python examples/generate.py
"""

import tempfile

from ds4.engine import LLM, SamplingParams
from ds4.engine.random_checkpoint import init_checkpoint

with tempfile.TemporaryDirectory() as tmp:
    path = init_checkpoint("deepseek_v32", "tiny", tmp, seed=0)
    llm = LLM(path)
    out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=16))[0]
    print(repr(out.text), out.token_ids, out.finish_reason)
    print("logits", tuple(llm.score(out.prompt_token_ids).shape), llm.stats())
