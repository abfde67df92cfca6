"""Triton kernels for the engine's hot path, each beside its torch reference (built in the kernels issue).

The engine runs its torch path everywhere until then; nothing here is imported by it yet.
"""
