"""The host a latency was measured on: its CPU and the instructions that set int8's speed-up.

`python -m edge.bench` records `host_device()` in every result and `python -m edge.peak` records
`host_cpu()` beside the peak, so a ratio is never read without the CPU it came from. Torch-free:
it runs in the runtime processes.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# Instructions that multiply-accumulate 8-bit values in one step (x86: AVX-512 VNNI, AVX-VNNI, AMX;
# Arm: dotprod, i8mm). Without one, int8 kernels widen to 16 bits first and gain less over fp32's
# FMA: on an AVX2-only host the matrix-product peak of int8 was 3.95x fp32's against 7.6-10x on
# VNNI and AMX hosts (`python -m edge.peak`, README "Measured on a laptop CPU").
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "sve2")


def host_cpu(cpuinfo: str | None = None) -> dict:
    """{"model": str, "simd": [...], "int8_dot": [...] or None}: this CPU and the instruction sets
    that decide int8's speed-up, from /proc/cpuinfo (`cpuinfo`: its text, for tests). `int8_dot` is
    None where the flags cannot be read (not Linux), [] where the CPU has none of INT8_DOT_FLAGS."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"model": platform.processor() or platform.machine() or "unknown", "simd": [], "int8_dot": None}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:   # the first processor's entry describes them all
            fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())   # x86 | Arm
    model = fields.get("model name") or fields.get("Model") or platform.machine() or "unknown"
    if not flags:
        return {"model": model, "simd": [], "int8_dot": None}
    return {"model": model, "simd": [f for f in SIMD_FLAGS if f in flags],
            "int8_dot": [f for f in INT8_DOT_FLAGS if f in flags]}


def describe_cpu(cpu: dict) -> str:
    """One line for reports: "AMD EPYC (avx2; no int8 dot-product instructions)"."""
    simd = ", ".join(cpu["simd"]) or "no listed SIMD"
    if cpu["int8_dot"] is None:
        dot = "int8 dot-product instructions unknown"
    elif cpu["int8_dot"]:
        dot = "int8 dot products: " + ", ".join(cpu["int8_dot"])
    else:
        dot = "no int8 dot-product instructions"
    return f"{cpu['model']} ({simd}; {dot})"


def host_device() -> dict:
    """The "device" block of the densekit.bench/1 schema for this host."""
    cpu = host_cpu()
    return {"name": "host", "system": platform.system(), "machine": platform.machine(), "processor": cpu["model"],
            "cores": os.cpu_count(), "simd": cpu["simd"], "int8_dot": cpu["int8_dot"]}


def device_cpu(device: dict) -> dict:
    """host_cpu()'s form of a bench result's "device" block (blocks written before 2026-12-02, and
    the device scripts', have no instruction sets: unknown)."""
    return {"model": device.get("processor") or device.get("machine") or "unknown", "simd": device.get("simd", []),
            "int8_dot": device.get("int8_dot")}
