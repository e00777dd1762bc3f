"""One interface over the runtimes that execute our artefacts: LiteRT, ONNX Runtime and Core ML.

Every artefact takes one input "image", float32 RGB in [0, 1] (TFLite: NHWC (1, H, W, 3);
ONNX and Core ML: NCHW (1, 3, H, W)), and returns "depth" (1, 1, H, W) in metres and "seg"
(1, C, H, W) logits (TFLite: NHWC). A runner hides the layout and the batch of 1:

- `format`: "tflite" | "onnx" | "coreml"; `runtime`: "<package> <version>";
  `executor`: what runs it, in words (e.g. "onnxruntime 1.31.1 (CPUExecutionProvider, 2 threads)");
  `input_shape`: the input shape as the artefact takes it.
- `runner(images (N, 3, H, W) float32) -> (depth (N, 1, H, W) float32, seg (N, C, H, W) float32)`.
- `runner.invoke_fn(image (1, 3, H, W)) -> fn`: sets the input once; `fn()` runs one inference and
  nothing else (for LiteRT only `invoke()`, like TFLite's benchmark_model), for timing.

This module imports neither torch nor TensorFlow: converter processes (targets/) and the run and
bench processes (edge/run.py, edge/bench.py) import it, and the two must never share a process
(docs/TOOLCHAIN.md). Runtimes are imported when a runner is made.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable

import numpy as np

from core.contract import DEPTH, SEG
from core.formats import FORMATS, SUFFIXES, format_for
from core.io import home_path, tree_bytes
from core.manifest import verify_artefact

EXECUTORS = tuple(dict.fromkeys(e for f in FORMATS.values() for e in f.executors))   # all but "auto": Core ML's


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "unknown" (e.g. a vendored runtime)."""
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def threads_text(threads: int | None) -> str:
    return "default threads" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"


def image_shape(runner) -> tuple[int, int, int]:
    """(3, H, W): one image in the NCHW layout every runner's `__call__` takes."""
    shape = tuple(int(s) for s in runner.input_shape)
    if len(shape) != 4:
        raise ValueError(f"{runner.format} artefact has input shape {shape}; expected 4-D (1, H, W, 3) or (1, 3, H, W)")
    layout = getattr(runner, "layout", FORMATS[runner.format].input_layout)   # a TFLite file says its own
    return (shape[3], shape[1], shape[2]) if layout == "NHWC" else shape[1:]


def check_images(images: np.ndarray, runner) -> None:
    """Raise ValueError unless `images` is (N, 3, H, W) with the artefact's H and W."""
    expected = image_shape(runner)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images have shape {tuple(images.shape)}; this artefact takes "
                         f"(N, {', '.join(map(str, expected))}) float32 RGB in [0, 1] "
                         f"(NCHW; the runner converts the layout itself)")


def find_outputs(available: list[str], path: str | Path) -> None:
    """Raise ValueError naming the artefact's outputs when "depth" or "seg" is missing."""
    missing = [name for name in (DEPTH, SEG) if name not in available]
    if missing:
        raise ValueError(f"{path} has outputs {sorted(available)} but no {', '.join(missing)}: artefacts from "
                         f"python -m quant.export name them '{DEPTH}' and '{SEG}'; re-export the model")


def import_litert_interpreter() -> tuple[type, str]:
    """(Interpreter class, distribution name): ai-edge-litert, else tflite_runtime (small devices)."""
    errors = []
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError as exc:
        errors.append(f"ai_edge_litert: {exc}")
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except (ImportError, AttributeError) as exc:   # tflite-runtime with numpy 2: "_ARRAY_API not found"
        errors.append(f"tflite_runtime: {exc}")
    raise ImportError("running a .tflite artefact needs ai-edge-litert or tflite-runtime, and neither imports "
                      f"({'; '.join(errors)}). Install one: `pip install ai-edge-litert` (maintained, numpy 2), or "
                      "on a small device without a wheel for it `pip install tflite-runtime \"numpy<2\"`")


class UnreadableArtefact(ValueError):
    """The runtime refused to load an artefact: a damaged or truncated file, another file under its
    suffix, or one written for a newer runtime. LiteRT itself says only "not a valid Flatbuffer buffer"."""

    def __init__(self, path: Path, runtime: str, error: Exception):
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        super().__init__(
            f"{runtime} cannot load {path} ({tree_bytes(path)} bytes): {reason.rstrip('.')}. A damaged "
            f"or truncated file (an interrupted copy), another file under this suffix, or one written for a newer "
            f"runtime fails this way. If it came from python -m quant.export, `python -m quant.verify <its export "
            f"directory>` checks it against the export's manifest.json; export again to replace it.")


@contextmanager
def loading(path: Path, runtime: str, keep: tuple[type[Exception], ...] = ()):
    """Runs a runtime's load of `path`; what it raises, but a missing runtime and the `keep` types
    (errors that name something other than a damaged file), becomes UnreadableArtefact."""
    try:
        yield
    except (ImportError, *keep):
        raise
    except Exception as e:   # noqa: BLE001 - runtimes raise RuntimeError, ValueError or their own types
        raise UnreadableArtefact(path, runtime, e) from e


class LiteRTRunner:
    """A .tflite file run by the LiteRT interpreter (XNNPACK is its default CPU delegate).

    threads: the interpreter's num_threads; None leaves the runtime's default.
    """

    format = "tflite"
    import_runtime = staticmethod(import_litert_interpreter)

    def __init__(self, path: str | Path, threads: int | None = None):
        Interpreter, package = import_litert_interpreter()
        self.path, self.threads = Path(path), threads
        with loading(self.path, package):
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        find_outputs(list(self.outputs), path)
        self.runtime = f"{package} {package_version(package)}"
        self.executor = f"{self.runtime} (XNNPACK, {threads_text(threads)})"
        self.input_shape = tuple(int(s) for s in self.input["shape"])
        # NHWC as onnx2tf writes it, or NCHW (litert-torch's --layout NCHW): 3 channels, H and W multiples of 32
        self.layout = "NCHW" if self.input_shape[1] == 3 else "NHWC"

    def set_input(self, image: np.ndarray) -> None:
        """image: (1, 3, H, W) float32 in [0, 1]; written in the file's layout (quantised if the input is integer)."""
        value = np.ascontiguousarray(image.transpose(0, 2, 3, 1) if self.layout == "NHWC" else image, np.float32)
        dtype = np.dtype(self.input["dtype"])
        if dtype.kind in "iu":
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            value = np.clip(np.round(value / scale + zero), info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], value)

    def output(self, name: str) -> np.ndarray:
        """Output `name` as float32 NCHW (dequantised if the output is integer)."""
        detail = self.outputs[name]
        value = self.interpreter.get_tensor(detail["index"])
        if np.dtype(detail["dtype"]).kind in "iu":
            scale, zero = detail["quantization"]
            value = (value.astype(np.float32) - zero) * scale
        return value.astype(np.float32).transpose(0, 3, 1, 2) if self.layout == "NHWC" else value.astype(np.float32)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_images(images, self)
        depth, seg = [], []
        for image in images:   # the artefact has batch 1
            self.set_input(image[None])
            self.interpreter.invoke()
            depth.append(self.output(DEPTH))
            seg.append(self.output(SEG))
        return np.concatenate(depth), np.concatenate(seg)

    def invoke_fn(self, image: np.ndarray) -> Callable[[], None]:
        check_images(image, self)
        self.set_input(image)
        return self.interpreter.invoke


class OrtRunner:
    """An .onnx file run by ONNX Runtime's CPUExecutionProvider.

    threads: intra-op threads; None leaves onnxruntime's default (one per physical core).
    """

    format = "onnx"

    @staticmethod
    def import_runtime():
        import onnxruntime
        return onnxruntime

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3   # errors only: the graph-optimiser's notes are not ours to act on
        self.path, self.threads = Path(path), threads
        with loading(self.path, "onnxruntime"):
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        find_outputs([o.name for o in self.session.get_outputs()], path)
        self.input_name = self.session.get_inputs()[0].name
        self.runtime = f"onnxruntime {ort.__version__}"
        self.executor = f"{self.runtime} (CPUExecutionProvider, {threads_text(threads)})"
        self.input_shape = static_input_shape(self.session.get_inputs()[0], self.path)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_images(images, self)
        outs = [self.session.run([DEPTH, SEG], {self.input_name: np.ascontiguousarray(image[None], np.float32)})
                for image in images]   # the artefact has batch 1
        return (np.concatenate([o[0] for o in outs]).astype(np.float32),
                np.concatenate([o[1] for o in outs]).astype(np.float32))

    def invoke_fn(self, image: np.ndarray) -> Callable[[], None]:
        check_images(image, self)
        feed = {self.input_name: np.ascontiguousarray(image, np.float32)}
        names = [DEPTH, SEG]
        return lambda: self.session.run(names, feed)


def static_input_shape(node, path: Path) -> tuple[int, ...]:
    """An ONNX input's shape, a symbolic batch read as 1 (the artefacts run one image at a time);
    ValueError for a symbolic image size, which densekit's checks and benches cannot feed."""
    shape = list(node.shape)
    if shape and not isinstance(shape[0], int):
        shape[0] = 1
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"{path}: input {node.name!r} has the dynamic shape {node.shape}; densekit runs "
                         f"artefacts of a fixed image size: export one with python -m quant.export (or "
                         f"torch.onnx.export without dynamic_axes on the image's height and width)")
    return tuple(shape)


def artefact_format(path: str | Path, executor: str = "auto") -> str:
    """The format's name ("tflite", "onnx", "coreml", ...: core/formats.py) of artefact `path`, after
    checking that it exists and that `executor` applies to it; ValueError naming the bad value
    otherwise. Opens nothing."""
    path = Path(path)
    fmt = format_for(path)
    if not path.exists():
        raise ValueError(f"cannot run {path}: it does not exist (artefacts have the suffixes {', '.join(SUFFIXES)}; "
                         f"python -m quant.export writes them under exports/)")
    if path.is_dir() and fmt.suffix != ".mlpackage":   # the runtime read it as a damaged 0-byte file
        raise ValueError(f"cannot run {path}: it is a directory, and a {fmt.title} artefact is a file; give the "
                         f"{fmt.suffix} file inside the export (e.g. exports/<run>/{fmt.name}/<run>_int8{fmt.suffix})")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor not in fmt.executors:
        owners = " and ".join(f.title for f in FORMATS.values() if executor in f.executors)
        raise ValueError(f"executor {executor!r} applies to {owners} artefacts only; {path.name} is {fmt.name}: "
                         f"use executor='auto' (--executor auto)")
    return fmt.name


def open_runner(path: str | Path, *, threads: int | None = None, executor: str = "auto", verify: bool = True):
    """The runner for artefact `path`, chosen by its suffix through the format table.

    executor: Core ML only ("auto" | "predict" | "reference", see edge/coreml.py); the other
    runtimes have one executor, so anything but "auto" is an error there. Runtimes are imported
    here, lazily: coremltools is heavy and absent on most devices. verify: an artefact in an
    export directory must match its manifest's sha256 (core/manifest.py; IntegrityError), as
    edge.run and edge.bench check it; False for a caller that has checked it already.
    """
    path = home_path(path)
    fmt = FORMATS[artefact_format(path, executor)]
    if verify:
        verify_artefact(path)
    options = {"executor": executor} if len(fmt.executors) > 1 else {}
    return runner_class(path, executor)(path, threads=threads, **options)


def runner_class(path: str | Path, executor: str = "auto") -> type:
    """The runner class of artefact `path` (its `import_runtime()` imports the runtime alone: edge.bench
    takes its memory baseline after it, as the device scripts do)."""
    module, _, name = FORMATS[artefact_format(path, executor)].runner.partition(":")
    return getattr(importlib.import_module(module), name)
