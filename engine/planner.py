"""`ds4-agent plan`: where a model's bytes go on GPUs plus host RAM, and what would make it fit.

Placement: when the whole model fits the GPUs, every weight goes there, layers split across the cards in
order by bytes. Otherwise KTransformers' recipe: embeddings, attention, norms, routers, shared experts,
dense layers and the decode cache on the GPUs; every routed expert in host RAM, computed on the CPU in
decode; the VRAM left over caches the same number of hot experts in every MoE layer. The plan names
the `generate` flags that realise it. The speed it buys is `ds4.engine.prediction`'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ds4.engine.config import ModelConfig
from ds4.engine.prediction import Hardware, predict
from ds4.engine.sizing import engine_layer_cache_bytes, parameter_shapes, tensor_bytes

GB = 1e9
EXPERT_FORMATS = ("fp32", "bf16", "fp8", "fp4", "int4")


@dataclass
class Device:
    name: str
    capacity: float
    weights: float = 0.0
    cache: float = 0.0
    reserve: float = 0.0
    hot_experts: int = 0
    hot_expert_bytes: float = 0.0
    layers: list[int] = field(default_factory=list)

    @property
    def used(self) -> float:
        return self.weights + self.cache + self.reserve + self.hot_expert_bytes


def component_bytes(config: ModelConfig, attn_fmt: str = "fp8", expert_fmt: str = "fp8") -> dict:
    """Weight bytes by component: embed, head (with the final norm and mixers), and per layer
    attention (norms and mHC included), router, shared experts, dense MLP, routed experts."""
    layers = [
        dict(attention=0.0, router=0.0, shared=0.0, dense=0.0, experts=0.0)
        for _ in range(config.num_hidden_layers)
    ]
    out = {"embed": 0.0, "head": 0.0, "layers": layers}
    for name, shape in parameter_shapes(config).items():
        nbytes = tensor_bytes(name, shape, attn_fmt, expert_fmt)
        if not name.startswith("layers."):
            out["embed" if name.startswith("embed.") else "head"] += nbytes
            continue
        layer = layers[int(name.split(".")[1])]
        if ".ffn.experts." in name:
            layer["experts"] += nbytes
        elif ".ffn.shared_experts." in name:
            layer["shared"] += nbytes
        elif ".ffn.gate." in name:
            layer["router"] += nbytes
        elif ".ffn." in name:
            layer["dense"] += nbytes
        else:
            layer["attention"] += nbytes
    return out


def split_layers(
    fixed: list[float], embed: float, head: float, n_devices: int, every_device: bool = False
) -> list[list[int]]:
    """Layers in order over `n_devices`, each device taking its share of the bytes (`fixed` per layer;
    the embeddings on the first device and the head on the last counted in): a layer goes to the next
    device once it would take the current one past its share by more than half of itself.

    `every_device`: each device runs at least one layer (pipeline stages, given enough layers); the
    planner lets a card hold only the embeddings or only the head when that balances better."""
    target = (sum(fixed) + embed + head) / n_devices
    stages: list[list[int]] = [[] for _ in range(n_devices)]
    card, load = 0, embed
    for i, nbytes in enumerate(fixed):
        if card < n_devices - 1:
            full = load + nbytes / 2 > target
            if every_device:  # never leave this one empty, nor a later one without a layer to take
                full = bool(stages[card]) and (full or len(fixed) - i <= n_devices - 1 - card)
            if full:
                card, load = card + 1, 0.0
        stages[card].append(i)
        load += nbytes
    return stages


@dataclass
class Plan:
    model: str
    fits: bool
    context: int
    batch: int
    attn_format: str
    expert_format: str
    devices: list[Device]
    components: dict
    routed_expert_bytes: float
    expert_bytes: float  # one routed expert (w13 + w2)
    total_experts: int
    hot_experts: int
    hot_experts_per_layer: int  # `--hot-experts N`; every expert in VRAM: None is passed, N = all
    experts_in_ram: bool  # hybrid: routed experts in host RAM, computed on the CPU
    ram_checked: bool  # False: no --ram given; the RAM row says what is needed
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    shortfall: list[str]
    suggestions: list[str]
    hardware: Hardware

    def as_json(self) -> dict:
        out = asdict(self)
        out["devices"] = [dict(asdict(d), used=d.used) for d in self.devices]
        out["flags"] = engine_flags(self)
        return out


def plan(
    config: ModelConfig,
    name: str,
    gpus: list[float],
    ram: float | None = None,
    context: int = 131072,
    batch: int = 1,
    expert_format: str | None = None,
    attn_format: str = "fp8",
    hardware: Hardware | None = None,
    experts_in_ram: bool | None = None,
    _explore: bool = True,
) -> Plan:
    """`ram`: host RAM in bytes, None when unknown (then what the plan needs is reported, not checked).
    `experts_in_ram`: force the routed experts' placement (default: on the GPUs when everything fits)."""
    hw = hardware or Hardware()
    expert_format = expert_format or ("fp4" if config.is_v4 else "fp8")
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(f"expert format {expert_format!r}: one of {', '.join(EXPERT_FORMATS)}")
    if not gpus:
        raise ValueError("give at least one GPU (--gpu 24GB)")
    comps = component_bytes(config, attn_format, expert_format)
    itemsize = 4 if attn_format == "fp32" else 2  # the engine keeps its cache rows in the model's dtype
    caches = [c * batch for c in engine_layer_cache_bytes(config, context, itemsize)]
    reserve = hw.gpu_reserve + _activations(config, context, attn_format, hw)
    moe_layers = [i for i, lay in enumerate(comps["layers"]) if lay["experts"]]
    routed = sum(lay["experts"] for lay in comps["layers"])
    total_experts = len(moe_layers) * config.n_routed_experts
    expert_bytes = routed / total_experts if total_experts else 0.0
    devices = None
    if not experts_in_ram:  # everything on the GPUs, when it fits
        devices = _place(comps, caches, gpus, reserve, with_experts=True)
        if any(d.used > d.capacity for d in devices) and experts_in_ram is None:
            devices = None
    in_ram = devices is None and bool(routed)
    if devices is None:
        devices = _place(comps, caches, gpus, reserve, with_experts=False)
    ram_device = Device("ram", ram if ram is not None else 0.0, reserve=hw.ram_reserve)
    ram_device.weights = routed if in_ram else 0.0
    if ram is None:
        ram_device.capacity = ram_device.used

    shortfall = []
    for d in devices + [ram_device]:
        if d.used > d.capacity:
            short, need = (d.used - d.capacity) / GB, d.used / GB
            what = "host RAM" if d is ram_device else d.name
            shortfall.append(f"{what} is {short:.1f} GB short ({need:.1f} GB of {d.capacity / GB:.1f})")
    fits = not shortfall
    per_layer = config.n_routed_experts if not in_ram else 0
    if fits and in_ram:
        per_layer = _hot_per_layer(devices, comps, expert_bytes, config.n_routed_experts)
        for d in devices:
            n = per_layer * sum(1 for i in d.layers if i in moe_layers)
            d.hot_experts, d.hot_expert_bytes = n, n * expert_bytes
    hot = per_layer * len(moe_layers)
    decode, prefill = predict(config, comps, context, batch, hot, total_experts, expert_bytes, moe_layers, hw)
    suggestions = []
    if not fits and _explore:
        suggestions = _suggest(
            config, name, gpus, ram, context, batch, expert_format, attn_format, hw, shortfall
        )
    return Plan(
        name,
        fits,
        context,
        batch,
        attn_format,
        expert_format,
        devices + [ram_device],
        {
            "embed": comps["embed"],
            "head": comps["head"],
            **{
                k: sum(lay[k] for lay in comps["layers"])
                for k in ("attention", "router", "shared", "dense", "experts")
            },
            "cache": sum(caches),
        },
        routed,
        expert_bytes,
        total_experts,
        hot,
        per_layer,
        in_ram,
        ram is not None,
        decode if fits else 0.0,
        prefill if fits else 0.0,
        shortfall,
        suggestions,
        hw,
    )


def _activations(config: ModelConfig, context: int, attn_format: str, hw: Hardware) -> float:
    """The workspace of one prefill chunk at the full context, as the engine checks it at start-up."""
    from ds4.engine.workspace import prefill_workspace

    if not hw.engine_chunk:
        return 0.0
    dtype_bytes = 4 if attn_format == "fp32" else 2  # activations run in bf16 unless the model is fp32
    return float(prefill_workspace(config, min(hw.engine_chunk, context), context, dtype_bytes))


def _place(comps: dict, caches: list[float], gpus: list[float], reserve: float, with_experts: bool):
    """The GPUs with their layers (split in order by bytes, every card running at least one layer as the
    engine's pipeline needs), weights and cache; the routed experts counted in when `with_experts`."""
    keys = ("attention", "router", "shared", "dense") + (("experts",) if with_experts else ())
    weights = [sum(lay[k] for k in keys) for lay in comps["layers"]]
    fixed = [w + c for w, c in zip(weights, caches, strict=True)]
    devices = [Device(f"gpu{i}", cap, reserve=reserve) for i, cap in enumerate(gpus)]
    devices[0].weights += comps["embed"]
    devices[-1].weights += comps["head"]
    every = len(fixed) >= len(devices)
    stages = split_layers(fixed, comps["embed"], comps["head"], len(devices), every)
    for device, layers in zip(devices, stages, strict=True):
        for i in layers:
            device.layers.append(i)
            device.weights += weights[i]
            device.cache += caches[i]
    return devices


def _hot_per_layer(devices: list[Device], comps: dict, expert_bytes: float, experts: int) -> int:
    """The hot experts every MoE layer can cache (the engine takes one `--hot-experts N` for all): the
    most that the tightest card holds for each of its MoE layers."""
    n = experts
    for d in devices:
        moe = sum(1 for i in d.layers if comps["layers"][i]["experts"])
        if moe:
            n = min(n, int(max(d.capacity - d.used, 0.0) // (moe * expert_bytes)))
    return n


def engine_flags(p: Plan) -> list[str]:
    """The `ds4-agent generate` / `serve` flags that realise the plan: one --device per GPU in order, the
    layers each runs, and the hot experts per layer when the routed experts live in host RAM."""
    flags = []
    for i in range(len(p.devices) - 1):  # the last device is host RAM
        flags += ["--device", f"cuda:{i}"]
    if len(p.devices) > 2:
        flags += ["--layer-split", ",".join(str(len(d.layers)) for d in p.devices[:-1])]
    if p.experts_in_ram:
        flags += ["--hot-experts", str(p.hot_experts_per_layer)]
    return flags


def _suggest(config, name, gpus, ram, context, batch, expert_format, attn_format, hw, shortfall) -> list[str]:
    """What would make it fit: more RAM (how much), 4-bit experts, a shorter context, more GPUs."""
    out = []
    again = lambda **kw: plan(  # noqa: E731
        config,
        name,
        kw.get("gpus", gpus),
        kw.get("ram", ram),
        kw.get("context", context),
        batch,
        kw.get("expert_format", expert_format),
        attn_format,
        hw,
        _explore=False,
    )
    needed = hw.ram_reserve + sum(
        lay["experts"] for lay in component_bytes(config, attn_format, expert_format)["layers"]
    )
    if any(s.startswith("host RAM") for s in shortfall):
        out.append(f"more host RAM: at least {math.ceil(needed / GB)} GB")
        if expert_format not in ("fp4", "int4"):
            four = hw.ram_reserve + sum(
                lay["experts"] for lay in component_bytes(config, attn_format, "fp4")["layers"]
            )
            verdict = "fits" if four <= ram else f"needs {math.ceil(four / GB)} GB"
            out.append(f"4-bit experts (--experts fp4): host RAM {verdict}")
    if any(s.startswith("gpu") for s in shortfall):
        lo, hi = 0, context
        while lo < hi:  # the longest context whose cache fits the cards
            mid = (lo + hi + 1) // 2
            if all(d.used <= d.capacity for d in again(context=mid, ram=float("inf")).devices[:-1]):
                lo = mid
            else:
                hi = mid - 1
        if lo >= 1024:
            out.append(f"a shorter context: up to {lo:,} tokens fits the GPUs")
        for extra in range(1, 7):
            more = again(gpus=gpus + [gpus[-1]] * extra, ram=float("inf"))
            if all(d.used <= d.capacity for d in more.devices[:-1]):
                out.append(f"more GPUs: {len(gpus) + extra} of {gpus[-1] / GB:.0f} GB hold it")
                break
    return out


_UNITS = {"": GB, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_UNITS |= {f"{k}I": 1024.0 ** (i + 1) for i, k in enumerate("KMGT")}  # KiB, MiB, GiB, TiB


def parse_size(text: str) -> float:
    """'24GB', '24GiB', '512GB', '1.5TB', '24' (GB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?)?B?\s*", text.upper())
    if not match:
        raise ValueError(f"{text!r} is not a size: write e.g. 24GB, 24GiB or 1.5TB")
    return float(match[1]) * _UNITS[match[2] or ""]


_GPU = r"(?:(\d+)\s*X\s*)?([0-9.]+\s*(?:[KMGT]I?)?B?)(?:\s*X\s*(\d+))?"  # [N x] SIZE [x N]


def parse_gpus(items: list[str]) -> list[float]:
    """GPU memories from `--gpu` words: sizes, each optionally repeated by a count ('80GB x4', '80GBx4',
    '4x80GB', '24GiB 24GiB') -> bytes per card."""
    text = " ".join(items).strip().upper()
    if not re.fullmatch(rf"{_GPU}(\s+{_GPU})*", text):
        raise ValueError(f"{text!r} is not a list of GPU memories: write e.g. 24GB, 24GiB or 80GB x4")
    gpus: list[float] = []
    for before, size, after in re.findall(_GPU, text):
        count = int(before or after or 1)
        if count < 1:
            raise ValueError(f"{text!r}: a GPU count must be at least 1")
        gpus += [parse_size(size)] * count
    return gpus


def parse_tokens(text: str) -> int:
    """'1M', '128K', '4096' -> tokens (binary K/M, as context lengths are)."""
    t = text.strip().upper()
    if t.endswith("K"):
        return int(float(t[:-1]) * 1024)
    if t.endswith("M"):
        return int(float(t[:-1]) * 1024 * 1024)
    return int(t)


def format_plan(p: Plan) -> str:
    c = {k: v / GB for k, v in p.components.items()}
    lines = [
        f"{p.model}: context {p.context:,} x batch {p.batch}, attention {p.attn_format}, "
        f"experts {p.expert_format}",
        f"  weights: embed {c['embed']:.2f} GB, attention {c['attention']:.2f}, routers {c['router']:.2f}, "
        f"shared experts {c['shared']:.2f}, dense {c['dense']:.2f}, head {c['head']:.2f}, "
        f"routed experts {c['experts']:.2f} GB; cache {c['cache']:.2f} GB",
    ]
    for d in p.devices:
        layers = f" layers {d.layers[0]}-{d.layers[-1]}" if d.layers else ""
        hot = f", {d.hot_experts} hot experts {d.hot_expert_bytes / GB:.2f} GB" if d.hot_experts else ""
        of = f"{d.capacity / GB:7.2f} GB" if d.name != "ram" or p.ram_checked else "(no --ram given)"
        lines.append(
            f"  {d.name:<5} {d.used / GB:7.2f} of {of}: weights {d.weights / GB:.2f}, "
            f"cache {d.cache / GB:.2f}, reserve {d.reserve / GB:.2f}{hot}{layers}"
        )
    if p.fits:
        placement = (
            f"routed experts in host RAM, {p.hot_experts_per_layer} per layer hot in VRAM "
            f"({p.hot_experts} of {p.total_experts})"
            if p.experts_in_ram
            else "every weight in VRAM"
        )
        lines.append(
            f"  predicted: decode {p.decode_tokens_per_s:.1f} tokens/s, "
            f"prefill {p.prefill_tokens_per_s:,.0f} tokens/s ({placement})"
        )
        lines.append(f"  run it with: {' '.join(engine_flags(p))}")
    else:
        lines += [f"  does not fit: {s}" for s in p.shortfall]
        lines += [f"  to fit: {s}" for s in p.suggestions]
    return "\n".join(lines)
