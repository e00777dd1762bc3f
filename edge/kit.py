"""The device kit of an export: `device/` with the on-device bench scripts and the commands for its files.

Copying `exports/<run>/<target>/` to a device (or just `device/` and one artefact) is enough to
measure it there: the scripts import nothing from densekit and write the same JSON as
`python -m edge.bench` (schema "densekit.bench/1"), so device and host figures sit side by side.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from core import io
from core.formats import FORMATS

SCRIPTS_DIR = Path(__file__).with_name("device")
SCRIPTS = ("linux_bench.py", "android_bench.py", "coreml_bench.py", "README.md")
DEVICE_THREADS = 4   # without a profile: the fast cores of a Raspberry Pi 5 or a phone's CPU cluster


def write_device_kit(export_dir: Path, artefacts: list[dict], profile=None) -> Path:
    """Copy the scripts into `export_dir/device/` and write COMMANDS.md for `artefacts` (threads
    from the device profile, else DEVICE_THREADS; never this host's)."""
    kit = Path(export_dir) / "device"
    kit.mkdir(exist_ok=True)
    for name in SCRIPTS:
        shutil.copyfile(SCRIPTS_DIR / name, kit / name)
    threads = profile.threads if profile and profile.threads else DEVICE_THREADS
    io.write_text(kit / "COMMANDS.md", commands(artefacts, profile, threads))
    return kit


def commands(artefacts: list[dict], profile, threads: int) -> str:
    lines = ["# Measuring this export on a device", "",
             "Run from the export directory (the one holding the artefacts); every command writes "
             "its own `<artefact>[.<device>].bench.json` in the schema of `python -m edge.bench` "
             "(device/README.md), so a board's record and a phone's stay side by side.", ""]
    if profile:
        budget = f"{profile.latency_budget_ms} ms" if profile.latency_budget_ms else "none set"
        lines += [f"Target **{profile.name}**: {profile.description}. Latency budget: {budget}. "
                  f"Measure with: {profile.bench}.", ""]
        if profile.threads is None and profile.format == "onnx":   # a GPU runtime; edge.bench times the CPU
            lines += [f"The budget is for {profile.runtime}. `python -m edge.bench` below times ONNX Runtime's "
                      f"CPU execution provider, not the GPU: time the GPU with TensorRT's "
                      f"`trtexec --onnx=<artefact> --fp16`, or `onnxruntime_perf_test -e tensorrt -r 50 <artefact>` "
                      f"(or `-e cuda`) from an onnxruntime-gpu build.", ""]
    for a in artefacts:
        lines += [f"## {a['path']}", "", "```bash", *for_artefact(a["path"], a["format"], threads), "```", ""]
    return "\n".join(lines)


def for_artefact(path: str, fmt: str, threads: int) -> list[str]:
    """The format table's device commands (core/formats.py) for one artefact."""
    return [line.format(path=path, threads=threads) for line in FORMATS[fmt].device_commands]
