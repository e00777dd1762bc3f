"""The format table: everything the project knows about a deployment format, in one row.

Adding a format is one row here, one converter module (`python -m targets.<name> JOB.json`) and
one runner class in edge/. Every other place (export, profiles, runners, validation, bench, the
device kit) reads this table instead of branching on the format's name.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Converter:
    """One way to make a format's artefacts: a converter process and the graph the parent hands it."""
    name: str                                      # --converter NAME
    module: str                                    # `python -m <module> JOB.json`
    source_graph: Literal["onnx", "torch.export"]  # what the parent exports (targets/deploy.py)
    deploy_form: str = ""                          # torch-side rewrites first ("xnnpack": targets/xnnpack_form.py)
    layouts: tuple[str, ...] = ()                  # input layouts it can write; () = the format's only
    needs: tuple[str, ...] = ()                    # modules its export imports (the parent's graph export, the
                                                   # converter, the runtime that checks its files): checked first
    extra: str = "export"                          # the pip extra that installs them
    int8_weight_max: int = 127                     # int8 weights are integers in [-max, max], per channel
    int8_requantized_outputs: bool = False         # its int8 resizes re-round the heads' upsampled outputs

    def missing(self) -> list[str]:
        """The modules of `needs` that are not installed: looked for on sys.path, without importing
        them and whatever this process's sys.modules holds (the converters import them in their own
        process; a test process bars TensorFlow from its own)."""
        from importlib.machinery import PathFinder

        return [m for m in self.needs if PathFinder.find_spec(m) is None]


@dataclass(frozen=True)
class Format:
    name: str
    title: str                                     # in messages: "TFLite", "Core ML", "ONNX"
    suffix: str                                    # of the artefact file (.mlpackage is a directory)
    precisions: tuple[str, ...]                    # what the converter can produce
    defaults: tuple[str, ...]                      # produced when no precision is asked for
    converters: tuple[Converter, ...]              # the first is the default
    input_layout: Literal["NHWC", "NCHW"]          # the default layout of the artefacts' input
    runner: str                                    # "module:Class" running an artefact (edge/)
    executors: tuple[str, ...]                     # "auto" first; Core ML also "predict" | "reference"
    timed_on: tuple[str, ...]                      # sys.platform values where host latency means something
    untimed: str                                   # elsewhere: why not, and where to time it ({name} {runs})
    device_commands: tuple[str, ...]               # the device kit's lines; {path} {threads} filled in

    def converter(self, name: str = "") -> Converter:
        """The converter called `name` ("" = the default); ValueError listing this format's converters."""
        for converter in self.converters:
            if converter.name == name or not name:
                return converter
        raise ValueError(f"{self.title} has no converter {name!r}; its converters are "
                         f"{', '.join(c.name for c in self.converters)} (the first is the default)")

    def timed_here(self) -> bool:
        return "any" in self.timed_on or sys.platform in self.timed_on


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("tflite", "TFLite", ".tflite", ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8"), (
               Converter("onnx2tf", "targets.tflite", "onnx",
                         needs=("onnx", "onnxscript", "onnxsim", "onnx2tf", "tensorflow", "ai_edge_litert")),
               Converter("litert-torch", "targets.litert", "torch.export", "xnnpack", ("NHWC", "NCHW"),
                         ("litert_torch", "ai_edge_quantizer"), "litert")), "NHWC",
           "edge.runners:LiteRTRunner", ("auto",), ("any",), "", (
               "# Linux board (Raspberry Pi 5: pip install ai-edge-litert numpy), or any Linux host",
               "python3 device/linux_bench.py {path} --threads {threads} --runs 50 --warmup 5 --json {path}.linux.bench.json",
               "# Android, from a host with adb and TFLite's benchmark_model binary for the phone's ABI",
               "python3 device/android_bench.py {path} --benchmark-binary /path/to/benchmark_model "
               "--threads {threads} --delegate xnnpack --runs 50 --warmup 5 --json {path}.android.bench.json")),
    # w4block, palette4g, sparse-palette4 and w8a8 need iOS18 / macOS 15 (targets/coreml.py), so they
    # are produced only when asked for; the defaults run on iOS16. palette4 only when asked for too:
    # with coremltools' k-means, 16 values per tensor failed the drift gate on half of the recent
    # default students (v3 with Muon +10.85% and +11.45% abs_rel against 5%, v4 seed 1 +8.2%); with
    # densekit's corrected palettes those v3 students drift +2.9% to +4.9%, too close to the gate
    # for a default (docs/EXPORT.md, "Palettes that keep the weights' size").
    Format("coreml", "Core ML", ".mlpackage", ("fp32", "fp16", "w8", "palette4", "palette6", "w4block",
                                               "palette4g", "sparse-palette4", "w8a8"),
           ("fp16", "w8", "palette6"),
           (Converter("coremltools", "targets.coreml", "torch.export", needs=("coremltools",)),), "NCHW",
           "edge.coreml:CoreMLRunner", ("auto", "predict", "reference"), ("darwin",),
           "off macOS Core ML runs through the reference executor, which measures accuracy, not device latency. "
           "Bench Core ML on a Mac: python3 coreml_bench.py {name} --runs {runs} (the script is device/coreml_bench.py "
           "in an export folder, edge/device/coreml_bench.py in densekit)", (
               "# macOS (pip install coremltools numpy); on iOS use Xcode's Core ML performance report",
               "python3 device/coreml_bench.py {path} --compute-units all --runs 50 --warmup 5 --json {path}.mac.bench.json")),
    Format("onnx", "ONNX", ".onnx", ("fp32", "fp16", "int8"), ("fp32", "fp16", "int8"),
           # 7-bit weights ([-64, 64], onnxruntime's reduce_range): its uint8 x int8 kernels on x86 without
           # VNNI add products in pairs in 16 bits, which saturate with 8-bit weights; with 7-bit ones
           # they cannot, so the file computes the same on every CPU (docs/EXPORT.md: "ONNX int8 files store 7-bit weights").
           # QDQ runs Resize in int8: the upsampled outputs are rounded again, on the Resize input's scale
           (Converter("onnxruntime", "targets.onnx", "onnx", needs=("onnx", "onnxscript", "onnxruntime"),
                      int8_weight_max=64, int8_requantized_outputs=True),),
           "NCHW",
           "edge.runners:OrtRunner", ("auto",), ("any",), "", (
               "# any machine with densekit and onnxruntime installed (pip install -e .[export])",
               "python -m edge.bench {path} --threads {threads} --runs 50 --warmup 5 --json {path}.bench.json")),
)}
SUFFIXES: dict[str, Format] = {f.suffix: f for f in FORMATS.values()}
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.precisions))
INTEGER_PRECISIONS = ("int8",)   # converted from the (QAT) int8 source model; timed against the int8 peak
# their converters measure activations on calibration images: int8 and w8a8 their ranges, Core ML's
# k-means palettes their bias correction (targets/coreml.py)
CALIBRATED_PRECISIONS = ("int8", "w8a8", "palette4", "palette6", "palette4g")


def format_for(path: str | Path) -> Format:
    """The format of artefact `path` by its suffix; ValueError listing the known suffixes."""
    suffix = Path(path).suffix.lower()   # model.ONNX is an ONNX file
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot run {path}: unknown artefact suffix {suffix!r}; known suffixes: "
                         f"{', '.join(SUFFIXES)}")
    return SUFFIXES[suffix]
