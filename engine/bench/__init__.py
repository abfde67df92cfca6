"""The engine's benchmarks, each next to a peer: the engine (engine.py), the prefix cache (prefix.py),
long prompts (long.py), hybrid expert placement (hybrid.py), the Triton kernels (kernels.py)."""
