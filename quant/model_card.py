"""The model card of an export: `exports/<run>/<target>/README.md`, what a model hub page shows.

Front matter a hub reads (tags, library, license, teacher and student), how to feed the model,
what comes out, how far each file drifts from the float model and how fast it ran here (tables
generated from drift.json and benchmark.json, never typed), provenance, and how to run it. The
card is written last, from the files already in the export directory, so it cannot disagree
with them.
"""
from __future__ import annotations

import json
from pathlib import Path

from core import io
from core.contract import DEPTH, IMAGENET_MEAN, IMAGENET_STD, INPUT_NAME, SEG
from core.formats import FORMATS, Format
from core.manifest import MANIFEST
from edge.host import describe_cpu

CARD = "README.md"
LICENSE = "apache-2.0"
RUN_METRICS = ("abs_rel", "d1", "rmse", "miou", "teacher_abs_rel", "gap_closed", "dbe_comp", "seg_boundary_f1")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def front_matter(fields: dict) -> str:
    """YAML front matter from a flat dict of strings, numbers and lists of strings (JSON-quoted
    scalars are valid YAML, so any value survives)."""
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def drift_rows(drift: dict) -> list[str]:
    """One row per artefact of drift.json: the task metrics of float and artefact on the same images."""
    rows = ["| file | precision | executor | images | abs_rel float -> file | Δabs_rel | miou float -> file "
            "| Δmiou (pt) | gates |", "|---|---|---|---|---|---|---|---|---|"]
    for a in drift["artefacts"]:
        f, x, d = a.get("float") or {}, a.get("artefact") or {}, a.get("delta") or {}
        rel = f"{100 * d['abs_rel'] / f['abs_rel']:+.2f}%" if f.get("abs_rel") else "-"
        miou = (f"{f['miou']:.3f} -> {x['miou']:.3f} | {100 * d['miou']:+.2f}" if "miou" in d else "- | -")
        abs_rel = f"{f['abs_rel']:.4f} -> {x['abs_rel']:.4f}" if "abs_rel" in x else "-"
        rows.append(f"| {a['path']} | {a['precision']} | {a['executor']} | {a['images']} | {abs_rel} | {rel} "
                    f"| {miou} | {'pass' if a['pass'] else 'FAIL'} |")
    return rows


def latency_rows(bench: dict | None) -> list[str]:
    """One row per artefact of benchmark.json (or why it was not timed here)."""
    if not bench:
        return ["Not benchmarked (`--bench-runs 0`)."]
    rows = ["| file | threads | p50 ms | p90 ms | img/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for path, b in bench["artefacts"].items():
        if "latency_ms" in b:
            lat = b["latency_ms"]
            rows.append(f"| {path} | {bench['threads']} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
                        f"{b['throughput_ips']:.1f} | {b['memory_mb']['peak_rss']:.0f} |")
        else:
            rows.append(f"| {path} | - | - | - | - | {b.get('skipped', 'not measured')} |")
    return rows


def host_line(bench: dict | None) -> str:
    """What the latency was measured on: the CPU and its int8 instructions, where benchmark.json says."""
    cpu = ((bench or {}).get("host_peak") or {}).get("cpu")
    return f"A desktop CPU, {describe_cpu(cpu)}" if cpu else "A desktop CPU"


def default_of(fmt: Format, key: str) -> str:
    """The format's default converter or layout (core/formats.py)."""
    return fmt.converters[0].name if key == "converter" else fmt.input_layout


def pruned_note(prune: dict) -> list[str]:
    """A pruned export's files are not the run's model: say so, with the pruned float model's figures."""
    after = prune.get("val_after") or {}
    figures = ", ".join(f"{k} {after[k]:.4f}" for k in ("abs_rel", "miou") if isinstance(after.get(k), (int, float)))
    return [f"The run's unpruned model. The files come from it pruned to {prune['macs_after'] / 1e6:.0f} M MACs"
            + (f" and fine-tuned, which measured {figures} on this split" if figures else " and fine-tuned")
            + "; the drift above is against that pruned model.", ""]


def depth_phrase(metadata: dict) -> str:
    """What the depth output is, for the card's first line."""
    space = metadata["depth_space"]
    return "metric depth" if space == "metric" else f"{space} depth ({metadata['depth_units']})"


def usage(fmt: str, example: str, h: int, w: int, layout: str = "NHWC", depth_units: str = "metres") -> str:
    """How to run the file: Python with the format's runtime, then pointers for phones. `depth_units`:
    the depth output's (DepthSpace.describe()); a student of a relative teacher gives no metres."""
    var = "depth_m" if depth_units == "metres" else "depth"
    image = ("rgb = np.asarray(ImageOps.exif_transpose(Image.open(\"room.jpg\")).convert(\"RGB\").resize((%d, %d)), "
             "np.float32) / 255   # upright, as a phone shows it" % (w, h))
    if fmt == "tflite":
        nhwc = layout == "NHWC"
        feed, shape = ("rgb[None]", f"(1, {h}, {w}, 3)") if nhwc else ("rgb.transpose(2, 0, 1)[None]", f"(1, 3, {h}, {w})")
        depth, labels = ('[0, ..., 0]', '[0].argmax(-1)') if nhwc else ('[0, 0]', '[0].argmax(0)')
        code = f"""from ai_edge_litert.interpreter import Interpreter   # pip install ai-edge-litert pillow
import numpy as np
from PIL import Image, ImageOps

interpreter = Interpreter(model_path="{example}", num_threads=2)
interpreter.allocate_tensors()
{image}
interpreter.set_tensor(interpreter.get_input_details()[0]["index"], {feed})   # {shape}
interpreter.invoke()
out = {{d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}}
{var} = out["{DEPTH}"]{depth}            # ({h}, {w}) {depth_units}
labels = out["{SEG}"]{labels}           # ({h}, {w}) class ids"""
        phone = ("Android: load the file with LiteRT (`com.google.ai.edge.litert`, `Interpreter(file, options)` "
                 f"with `setNumThreads`), feed a direct `ByteBuffer` of float32 RGB / 255 in {layout} order and read "
                 "the two outputs by name (`getOutputIndex`). iOS: the TensorFlowLiteSwift pod runs the same file.")
    elif fmt == "onnx":
        code = f"""import numpy as np
import onnxruntime as ort                      # pip install onnxruntime pillow
from PIL import Image, ImageOps

session = ort.InferenceSession("{example}", providers=["CPUExecutionProvider"])
{image}
depth, seg = session.run(["{DEPTH}", "{SEG}"], {{"{INPUT_NAME}": rgb.transpose(2, 0, 1)[None]}})   # (1, 3, {h}, {w})
{var} = depth[0, 0]                          # ({h}, {w}) {depth_units}
labels = seg[0].argmax(0)                      # ({h}, {w}) class ids"""
        phone = ("Android: ONNX Runtime Mobile (`ai.onnxruntime:onnxruntime-android`, `OrtSession.run`) with a "
                 "float32 NCHW `OnnxTensor`. iOS: the `onnxruntime-objc` pod.")
    else:
        code = f"""import coremltools as ct                      # macOS: pip install coremltools pillow
import numpy as np
from PIL import Image, ImageOps

model = ct.models.MLModel("{example}")
{image}
out = model.predict({{"{INPUT_NAME}": rgb.transpose(2, 0, 1)[None]}})   # (1, 3, {h}, {w})
{var} = out["{DEPTH}"][0, 0]                 # ({h}, {w}) {depth_units}
labels = out["{SEG}"][0].argmax(0)             # ({h}, {w}) class ids"""
        phone = ("iOS / macOS: add the .mlpackage to the Xcode target; Xcode generates a Swift class whose "
                 f"`prediction({INPUT_NAME}:)` takes an `MLMultiArray` (1, 3, {h}, {w}) of float RGB / 255 and "
                 f"returns `{DEPTH}` and `{SEG}`. Xcode's Core ML performance report times it on the device.")
    return f"```python\n{code}\n```\n\n{phone}\n"


def model_card(export_dir: Path, run, metadata: dict) -> str:
    """The card's Markdown, from manifest.json, drift.json, benchmark.json, the run's summary and
    the artefacts' embedded `metadata` (core/contract.py)."""
    export_dir = Path(export_dir)
    manifest = read_json(export_dir / MANIFEST)
    drift, bench = read_json(export_dir / "drift.json"), read_json(export_dir / "benchmark.json")
    summary = read_json(Path(run.path) / "summary.json") or {}
    recipe, config = run.recipe, manifest["config"]
    fmt = FORMATS[config["format"]]
    h, w = config["input_size"]
    layout = metadata["input_layout"]
    classes = metadata["classes"]
    teacher = recipe.teacher.source or recipe.teacher.name
    fields = {"library_name": "densekit", "license": LICENSE, "pipeline_tag": "depth-estimation",
              "tags": ["depth-estimation", "image-segmentation", "monocular-depth", "semantic-segmentation",
                       "knowledge-distillation", fmt.name, *dict.fromkeys(a["precision"] for a in manifest["artefacts"])],
              "teacher": teacher, "student": recipe.model.student, "recipe": recipe.name, "run": run.name,
              "dataset": recipe.data.dataset, "input_size": f"{h}x{w}", "input_layout": layout,
              "converter": config.get("converter", default_of(fmt, "converter")),
              "depth_space": metadata["depth_space"]}
    files = ["| file | precision | MB | sha256 |", "|---|---|---|---|"] + [
        f"| {a['path']} | {a['precision']} | {a['bytes'] / 1e6:.2f} | `{a['sha256'][:16]}` |" for a in manifest["artefacts"]]
    nhwc, c = layout == "NHWC", len(classes)
    shape = f"(1, {h}, {w}, 3)" if nhwc else f"(1, 3, {h}, {w})"
    depth_shape, seg_shape = ((f"(1, {h}, {w}, 1)", f"(1, {h}, {w}, {c})") if nhwc else
                              (f"(1, 1, {h}, {w})", f"(1, {c}, {h}, {w})"))
    class_rows = ["| id | class |", "|---|---|"] + [f"| {i} | {name} |" for i, name in enumerate(classes)]
    trained = [f"| {k} | {summary[k]:.4f} |" for k in RUN_METRICS if isinstance(summary.get(k), (int, float))]
    tools = ", ".join(f"{k} {v}" for k, v in sorted(manifest["tools"].items()))
    example = manifest["artefacts"][-1]["path"]
    sections = [
        front_matter(fields),
        f"# {run.name}: {recipe.name} student ({recipe.model.student}) for {fmt.title}\n",
        f"A multi-task student distilled from `{teacher}` by densekit: {depth_phrase(metadata)} and {len(classes)}-class "
        f"semantic segmentation from one RGB image, {config['model'].get('exported_macs', config['model']['macs']) / 1e6:.0f} M "
        f"MACs at {h}x{w}.\n",
        "## Files\n", *files, "",
        "The sha256 column shows each digest's first 16 digits; manifest.json records them whole. Check the "
        "files after copying them: `python -m quant.verify <this folder>` with densekit, or `sha256sum` against "
        "manifest.json. The device scripts (`edge/device/`) check a file against a manifest.json beside it.\n",
        "## Input\n",
        f"- `{INPUT_NAME}`: float32 RGB in [0, 1] (pixels / 255), shape {shape} ({layout}), "
        f"resized to {h}x{w} without keeping the aspect ratio.",
        f"- Normalisation is inside the model ((x - {list(IMAGENET_MEAN)}) / {list(IMAGENET_STD)}): do not normalise again.",
        "- Every file, int8 included, takes and returns float32.\n",
        "## Outputs\n",
        f"- `{DEPTH}`: {depth_shape} depth ({layout}, as the input), {metadata['depth_space']}: "
        f"{metadata['depth_units']}.",
        f"- `{SEG}`: {seg_shape} class logits; argmax over the {'last' if nhwc else 'second'} axis gives the ids "
        f"below.\n", *class_rows, "",
        "## Accuracy against the float model (drift.json)\n",
        "Each file executed by its runtime on the same validation images as the float PyTorch model.\n",
        *drift_rows(drift), "",
        "## Latency on the export host (benchmark.json)\n",
        f"{host_line(bench)}, not a phone: time it on the device with the kit in `device/`.\n",
        *latency_rows(bench), "",
        f"## The float model on its validation split at {run.input_size[0]}x{run.input_size[1]}, its training size "
        f"(the run's summary.json)\n",
        *size_note(run, (h, w), drift),
        *(pruned_note(config.get("prune")) if "prune" in config else []),
        *(["| metric | value |", "|---|---|", *trained] if trained else ["No summary.json in the run."]), "",
        "## How to run\n", usage(fmt.name, example, h, w, layout, metadata["depth_units"]),
        "## Provenance\n",
        f"- run `{run.name}` (recipe {recipe.name}), checkpoint `{Path(run.weights).name}` sha256 "
        f"`{run.weights_sha256}`",
        f"- teacher `{teacher}`, data `{recipe.data.dataset}`" + (", pruned" if "prune" in config else "")
        + int8_provenance(config.get("int8")),
        f"- tools: {tools}",
        f"- rebuild: `{rebuild_command(config, fmt)}`", "",
    ]
    return "\n".join(sections)


def size_note(run, size: tuple[int, int], drift: dict) -> list[str]:
    """For an export at another size than the run trained at: the figures below are not this model's."""
    if tuple(size) == tuple(run.input_size):
        return []
    measured = [a["float"]["abs_rel"] for a in drift["artefacts"] if (a.get("float") or {}).get("abs_rel")]
    here = f": the float model measures abs_rel {measured[0]:.4f} there (the drift table's float column)" if measured else ""
    return [f"This export runs at {size[0]}x{size[1]}, not at the size the model trained at{here}, so the figures "
            f"below do not describe it. For this size, train at it: `{train_at(run, size)}`.\n"]


def train_at(run, size: tuple[int, int]) -> str:
    """The command that trains `run`'s recipe at `size` (an export at another size says it)."""
    return f"python -m distill.run {run.recipe.name} data.height={size[0]} data.width={size[1]}"


def rebuild_command(config: dict, fmt) -> str:
    """The export's own command line (manifests since 2026-12-05 record it); before, the target, run,
    converter and layout, which is all they recorded."""
    if "command" in config:
        return config["command"]
    return (f"python -m quant.export --target {config['target']} --run {config['run']}"
            + "".join(f" --{key} {config[key]}" for key in ("converter", "layout")
                      if config.get(key) and config[key] != default_of(fmt, key)))


def int8_provenance(int8: dict | None) -> str:
    """", int8 by qat, weights in [-64, 64]" (exports before 2026-12-02 recorded no weight range)."""
    if not int8:
        return ""
    weights = ", weights in [{}, {}]".format(*int8["weight_range"]) if "weight_range" in int8 else ""
    return f", int8 by {int8['method']}{weights}"


def write_model_card(export_dir: Path, run, metadata: dict) -> Path:
    path = Path(export_dir) / CARD
    io.write_text(path, model_card(export_dir, run, metadata))
    return path
