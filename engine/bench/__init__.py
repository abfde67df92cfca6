"""The engine's benchmarks, each next to a peer: the engine and prefix cache (engine.py), long prompts
(long.py), hybrid expert placement (hybrid.py), the Triton kernels (kernels.py)."""
