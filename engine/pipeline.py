"""Pipeline parallelism: the model's layers split in order over several devices, the activations handed
from one stage to the next during a forward pass.

Owns the split (given, or balanced by weight bytes as the planner balances its GPUs) and the hand-off of
one forward pass, with its counts. Weights are placed by `loader.materialize`, cache rows by the caches'
`layer_devices`, the attention metadata by `ForwardContext.on`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ds4.engine.context import switch_forward_context
from ds4.engine.errors import ConfigError
from ds4.engine.planner import split_layers

LAYER_NAME = re.compile(r"^layers\.(\d+)(\.|$)")


def layer_of(name: str) -> int | None:
    """i for a parameter or module of `layers.{i}`, None for the rest (embeddings, final norm, head)."""
    m = LAYER_NAME.match(name)
    return int(m.group(1)) if m else None


def weight_bytes(model: nn.Module) -> tuple[list[float], float, float]:
    """(bytes of each layer's weights but its routed experts, bytes before the layers, bytes after them):
    the planner's fixed, embed and head bytes, read off the materialized (or meta) parameters. Routed
    experts are left out as the planner leaves them: hybrid execution keeps them in host RAM."""
    fixed = [0.0] * len(model.layers)
    before = after = 0.0
    seen_layers = False
    for name, param in model.named_parameters():  # in the model's order: embeddings, layers, head
        nbytes = param.numel() * param.element_size()
        layer = layer_of(name)
        seen_layers = seen_layers or layer is not None
        if layer is not None:
            fixed[layer] += 0 if ".ffn.experts." in name else nbytes
        elif seen_layers:
            after += nbytes
        else:
            before += nbytes
    return fixed, before, after


def stage_sizes(model: nn.Module, n_devices: int, layer_split: tuple[int, ...] | None) -> list[int]:
    """Layers per device: `layer_split` checked against the model, or balanced by `weight_bytes` with
    `planner.split_layers` (every device taking at least one layer)."""
    num_layers = len(model.layers)
    if n_devices > num_layers:
        raise ConfigError(
            f"{n_devices} devices for a model of {num_layers} layers: each device runs at least one layer, "
            f"so give at most {num_layers} devices"
        )
    if layer_split is None:
        fixed, embed, head = weight_bytes(model)
        return [len(s) for s in split_layers(fixed, embed, head, n_devices, every_device=True)]
    assert len(layer_split) == n_devices, f"layer_split {layer_split} for {n_devices} devices"
    if min(layer_split) < 1:
        raise ConfigError(f"layer_split {list(layer_split)}: each device needs at least one layer")
    if sum(layer_split) != num_layers:
        raise ConfigError(
            f"layer_split {list(layer_split)} adds up to {sum(layer_split)} layers, but the model has "
            f"{num_layers}: give per-device counts that add up to {num_layers}"
        )
    return list(layer_split)


@dataclass
class HandoffStats:
    """Activation hand-offs between pipeline stages: in the last forward pass and since the start."""

    num_handoffs: int = 0
    num_bytes: int = 0  # activation bytes moved
    last_num_handoffs: int = 0
    last_num_bytes: int = 0

    def count(self, nbytes: int) -> None:
        self.num_handoffs, self.last_num_handoffs = self.num_handoffs + 1, self.last_num_handoffs + 1
        self.num_bytes, self.last_num_bytes = self.num_bytes + nbytes, self.last_num_bytes + nbytes


@dataclass
class Pipeline:
    """A model's layers in stages: the stage of each layer and its device, and the hand-offs between
    stages counted in `stats`. One stage unless the runner splits the model over devices."""

    layer_stages: list[int]
    layer_devices: list[torch.device] | None = None  # None: one stage, wherever the model is
    stats: HandoffStats = field(default_factory=HandoffStats)

    @classmethod
    def split(cls, devices: list[torch.device], sizes: list[int]) -> Pipeline:
        """`sizes[k]` consecutive layers on `devices[k]` (a device may serve several stages)."""
        stages = [k for k, n in enumerate(sizes) for _ in range(n)]
        return cls(stages, [devices[k] for k in stages])

    def run(self, layers: nn.ModuleList, x: torch.Tensor, inputs: dict, stage: int | None = None):
        """`x` through `layers`, each also given `inputs` (handed to its stage's device): every stage in
        turn, or the layers of `stage` alone, with `x` and `inputs` already on its device (a decode graph
        captured per stage, ds4.engine.graphs)."""
        handoff = Handoff(self, x.device, inputs, stage)
        for i, layer in enumerate(layers):
            if stage is None or self.layer_stages[i] == stage:
                x, kwargs = handoff(i, x)  # to the layer's stage, when it starts a new one
                x = layer(x, **kwargs)
        return x

    def stages(self) -> list[tuple[int, torch.device | None]]:
        """(stage, its device) in order; the device is None for a model on one device."""
        first = {}  # stage -> its first layer
        for i, stage in enumerate(self.layer_stages):
            first.setdefault(stage, i)
        return [(k, None if self.layer_devices is None else self.layer_devices[i]) for k, i in first.items()]


class Handoff:
    """One forward pass's way through the stages. Called before each layer, it brings the activations
    to the layer's stage when they come from another (counted), switches the forward context to its view
    on that stage's device, and gives the step's inputs every layer reads (rope tables, token ids) on
    that device: copied once per device and pass, not once per layer."""

    def __init__(self, pipeline: Pipeline, device: torch.device, inputs: dict, stage: int | None = None):
        self.pipeline, self.stage = pipeline, pipeline.layer_stages[0] if stage is None else stage
        self.inputs = {device: inputs}  # device -> the inputs there
        self.current = inputs
        if stage is None:  # a whole pass (one stage's part is counted by the graphs that run it)
            pipeline.stats.last_num_handoffs = pipeline.stats.last_num_bytes = 0

    def __call__(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(x where layer `layer` runs, the inputs there)."""
        stage = self.pipeline.layer_stages[layer]
        if stage != self.stage:  # a stage boundary
            self.stage = stage
            self.pipeline.stats.count(x.numel() * x.element_size())
            x = x.to(self.pipeline.layer_devices[layer])
            switch_forward_context(x.device)
            if x.device.type == "cuda":
                torch.cuda.set_device(x.device)  # Triton launches on the current device
            if x.device not in self.inputs:
                self.inputs[x.device] = _moved(self.current, x.device)
            self.current = self.inputs[x.device]
        return x, self.current


def current_device(device: torch.device):
    """A block run with `device` as CUDA's current device, restored after it: Triton kernels launch on
    the current device, not on their tensors' (a pipeline's hand-offs switch it). Elsewhere a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _moved(value, device: torch.device):
    """`value` (tensors, in dicts and tuples, or None) with every tensor on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value
