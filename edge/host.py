"""The host a latency was measured on: its CPU and the instructions that set int8's speed-up.

`python -m edge.bench` records `host_device()` in every result and `python -m edge.peak` records
`host_cpu()` beside the peak, so a ratio is never read without the CPU it came from. The reading
itself is the on-device script's (`edge/device/linux_bench.py`, which must stand alone), so host
and device records name a CPU alike. Torch-free: it runs in the runtime processes.
"""
from __future__ import annotations

from edge.device.linux_bench import cpu_info as host_cpu   # the device script's, so both read a CPU alike
from edge.device.linux_bench import device_info


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
    """The "device" block of the densekit.bench/1 schema for this host (named "host")."""
    return {**device_info(), "name": "host"}


def device_cpu(device: dict) -> dict:
    """host_cpu()'s form of a bench result's "device" block (blocks written before 2026-12-02, and
    the Android and Core ML scripts', name no instruction sets: unknown)."""
    return {"model": device.get("processor") or device.get("machine") or "unknown", "simd": device.get("simd", []),
            "int8_dot": device.get("int8_dot")}
