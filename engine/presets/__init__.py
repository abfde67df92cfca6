"""Model geometries as data: one config.json per preset (`deepseek-v4-flash.json`, ...).

Real models (deepseek-v3, deepseek-v3.2, deepseek-v4-flash, deepseek-v4-pro, deepseek-1t-a32b) feed
`ds4-agent model info` and the planner; the tiny and small ones are what `ds4-agent model init` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ds4.engine.errors import ParamError

HERE = Path(__file__).parent
FAMILY_LABELS = {"deepseek_v3": "deepseek-v3", "deepseek_v32": "deepseek-v3.2", "deepseek_v4": "deepseek-v4"}
SIZES = ("tiny", "small")


def preset_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


def load_preset(name: str) -> dict:
    """The config.json dict of a preset; ParamError (a ValueError) naming the choices for an unknown one."""
    file = HERE / f"{name}.json"
    if not file.is_file():
        raise ParamError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return json.loads(file.read_text())


def init_preset(family: str, size: str) -> dict:
    """The config of `ds4-agent model init --family F --preset tiny|small`."""
    if family not in FAMILY_LABELS:
        raise ParamError(f"unknown family {family!r}; choose from {', '.join(FAMILY_LABELS)}")
    if size not in SIZES:
        raise ParamError(f"unknown preset {size!r}; choose from {', '.join(SIZES)}")
    return load_preset(f"{FAMILY_LABELS[family]}-{size}")
