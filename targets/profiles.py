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
import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from core.formats import FORMATS
from core.io import read_json
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
    """The profiles file, every device in it checked: a hand edit that cannot work is named here,
    with the file and the field, not found as a KeyError inside a converter."""
    data = read_json(path, "restore it with git checkout targets/devices.json")
    if not isinstance(data, dict) or not isinstance(data.get("gates"), dict) or not isinstance(data.get("devices"), dict):
        raise ValueError(f'{path}: expected {{"gates": {{...}}, "devices": {{...}}}} at the top')
    for precision, gate in data["gates"].items():
        check_gate(gate, f"{path}: gates.{precision}")
    for name, spec in data["devices"].items():
        check_device(name, spec, path)
    return data


PROFILE_KEYS = {f.name for f in fields(DeviceProfile)} - {"name"}
REQUIRED_KEYS = {"description", "format", "precision", "runtime", "threads", "latency_budget_ms", "bench"}


def check_device(name: str, spec: dict, path: str) -> None:
    where = f"{path}: devices.{name}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object with the keys {sorted(REQUIRED_KEYS)}")
    unknown, missing = sorted(set(spec) - PROFILE_KEYS), sorted(REQUIRED_KEYS - set(spec))
    problems = ([f"unknown keys {unknown} (valid: {sorted(PROFILE_KEYS)})"] if unknown else []) + \
               ([f"missing {missing}"] if missing else [])
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    fmt = FORMATS.get(spec["format"])
    if fmt is None:
        raise ValueError(f"{where}: format {spec['format']!r}; valid: {list(FORMATS)}")
    if spec["precision"] not in fmt.precisions:
        raise ValueError(f"{where}: precision {spec['precision']!r} is not one of {fmt.name}'s: {', '.join(fmt.precisions)}")
    threads, size, budget = spec["threads"], spec.get("input_size"), spec["latency_budget_ms"]
    if threads is not None and (not number(threads, int) or threads < 1):
        raise ValueError(f"{where}: threads {threads!r} must be a positive integer or null (the host's default)")
    if budget is not None and (not number(budget) or not 0 < budget < math.inf):
        raise ValueError(f"{where}: latency_budget_ms {budget!r} must be a positive number of milliseconds or null")
    texts = {k: spec[k] for k in ("description", "runtime", "bench") if not isinstance(spec[k], str)}
    if texts:
        raise ValueError(f"{where}: {', '.join(texts)} must be text, got {texts}")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and
                                 all(isinstance(v, int) and v >= 32 and v % 32 == 0 for v in size)):
        raise ValueError(f"{where}: input_size {size!r} must be [H, W], each a positive multiple of 32 (the "
                         f"student downsamples by 32), or absent (the run's size)")
    check_gate(spec.get("gates", {}), f"{where}.gates")


def check_gate(gate: dict, where: str) -> None:
    if not isinstance(gate, dict):   # null or a bare number: no key to name, so say the shape
        raise ValueError(f"{where} must be an object of tolerances, e.g. {{\"abs_rel_change\": 0.02}}, "
                         f"or absent; got {json.dumps(gate)}")
    unknown = sorted(set(gate) - set(GATE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown gate keys {unknown}; valid: {list(GATE_KEYS)}")
    bad = {k: v for k, v in gate.items() if not number(v) or not 0 <= v < math.inf}
    if bad:
        raise ValueError(f"{where}: gate tolerances must be finite non-negative numbers, got {bad}")
    # a share and a number of points have an upper end: past it a gate can never pass
    if gate.get("seg_agreement_min", 0) > 1:
        raise ValueError(f"{where}: seg_agreement_min={gate['seg_agreement_min']:g} is a share of pixels in [0, 1] "
                         f"(e.g. 0.999 for 99.9%), not a percentage")
    if gate.get("miou_drop_pt", 0) > 100:
        raise ValueError(f"{where}: miou_drop_pt={gate['miou_drop_pt']:g} is in mIoU points, at most 100")


def number(value, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether `value` is a number of `kinds`; JSON's true and false are not (bool is an int to Python,
    so a gate of `true` would read as a tolerance of 1, i.e. 100%)."""
    return isinstance(value, kinds) and not isinstance(value, bool)


def device_names(path: Path = PROFILES_FILE) -> list[str]:
    return list(_load(str(path))["devices"])


def device(name: str, path: Path = PROFILES_FILE) -> DeviceProfile:
    devices = _load(str(path))["devices"]
    if name not in devices:
        raise ValueError(unknown_target_message(name, path))
    spec = dict(devices[name])   # checked when the file was read
    size = spec.pop("input_size", None)
    return DeviceProfile(name=name, input_size=tuple(size) if size else None, **spec)


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
