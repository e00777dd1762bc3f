"""Device profiles and drift gates, read from targets/devices.json (data, not code: add a device there).

A profile names what a device runs (format, precision, runtime, threads), the input size to export
at, the drift it tolerates and its latency budget. `python -m quant.export --target pixel8` takes
everything from the profile; `--target tflite|coreml|onnx` uses the default gates per precision.

Gate semantics (the keys of a gate, checked by quant/validate.py):
- abs_rel_change: largest |abs_rel(artefact) - abs_rel(float)| / abs_rel(float), both measured on
  the same validation images (0.02 = 2 % relative).
- miou_drop_pt: largest miou(float) - miou(artefact), in points (x100).
- depth_rel_p99, seg_agreement_min (float precisions only): the 99th percentile of the per-pixel
  |d - d_float| / d_float, and the least share of pixels with the float model's label. A float
  conversion must keep the function itself, not only the metrics: on a weak model a corrupted
  weight can leave abs_rel and miou unmoved. int8 is not gated per pixel: a QAT file differs
  from its float parent per pixel as much as PTQ does while being as accurate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from core.formats import FORMATS
from core.registry import suggest

PROFILES_FILE = Path(__file__).with_name("devices.json")
GATE_KEYS = ("abs_rel_change", "miou_drop_pt", "depth_rel_p99", "seg_agreement_min")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    format: str                          # tflite | coreml | onnx
    precision: str
    runtime: str
    threads: int | None
    input_size: tuple[int, int] | None   # (H, W) the artefact is exported at; None = the run's
    latency_budget_ms: float | None
    bench: str                           # how to measure it on the device
    gates: dict[str, float] = field(default_factory=dict)   # overrides of the default gate


@lru_cache(maxsize=None)
def _load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    for precision, gate in data["gates"].items():
        check_gate(gate, f"{path}: gates.{precision}")
    return data


def check_gate(gate: dict, where: str) -> None:
    unknown = sorted(set(gate) - set(GATE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown gate keys {unknown}; valid: {list(GATE_KEYS)}")
    bad = {k: v for k, v in gate.items() if not isinstance(v, (int, float)) or v < 0}
    if bad:
        raise ValueError(f"{where}: gate tolerances must be non-negative numbers, got {bad}")


def device_names(path: Path = PROFILES_FILE) -> list[str]:
    return list(_load(str(path))["devices"])


def device(name: str, path: Path = PROFILES_FILE) -> DeviceProfile:
    devices = _load(str(path))["devices"]
    if name not in devices:
        raise ValueError(unknown_target_message(name, path))
    spec = dict(devices[name])
    size = spec.pop("input_size", None)
    gates = spec.pop("gates", {})
    check_gate(gates, f"{path}: devices.{name}.gates")
    profile = DeviceProfile(name=name, input_size=tuple(size) if size else None, gates=gates, **spec)
    if profile.format not in FORMATS:
        raise ValueError(f"{path}: device {name} has format {profile.format!r}; valid: {list(FORMATS)}")
    return profile


def unknown_target_message(name: str, path: Path = PROFILES_FILE) -> str:
    return (f'unknown target "{name}"; formats: {", ".join(FORMATS)}; devices: {", ".join(device_names(path))} '
            f"(targets/devices.json).{suggest(name, [*FORMATS, *device_names(path)])}")


def gate_for(precision: str, profile: DeviceProfile | None = None, overrides: dict | None = None,
             path: Path = PROFILES_FILE) -> dict[str, float]:
    """The tolerances an artefact of `precision` must meet: defaults, then the device's, then the user's."""
    defaults = _load(str(path))["gates"]
    if precision not in defaults:
        raise ValueError(f"no default gate for precision {precision!r} in {path}; known: {sorted(defaults)}")
    gate = {**defaults[precision], **(profile.gates if profile else {}), **(overrides or {}).get(precision, {})}
    check_gate(gate, f"gate for {precision}")
    return gate


def parse_tolerances(items: list[str] | None) -> dict[str, dict[str, float]]:
    """`["int8.abs_rel_change=0.03", "fp16.miou_drop_pt=0.5"]` -> {"int8": {...}, "fp16": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        precision, dot, metric = key.partition(".")
        if not sep or not dot or metric not in GATE_KEYS:
            raise ValueError(f'--tolerance "{item}": expected PRECISION.KEY=VALUE with KEY in {list(GATE_KEYS)}, '
                             f'e.g. int8.abs_rel_change=0.03')
        try:
            out.setdefault(precision, {})[metric] = float(value)
        except ValueError:
            raise ValueError(f'--tolerance "{item}": {value!r} is not a number') from None
    return out
