"""TFLite converter process through litert-torch: torch.export program -> .tflite, int8 by the
LiteRT quantizer (ai-edge-quantizer), run by LiteRT.

`python -m targets.litert JOB.json` (written by `python -m quant.export --converter litert-torch`).
Imports torch, litert-torch and ai-edge-quantizer, never TensorFlow (docs/TOOLCHAIN.md: the two
segfault in one process; litert-torch converts without it).

The parent hands over the artefact's function as a torch.export program already in its XNNPACK
deploy form (targets/deploy.py `xnnpack_form`: hard activations as relu6 forms, normalisation along
rows), the torch-side twin of the ONNX rewrites the onnx2tf route applies (targets/litert_graph.py).

Precisions:
- fp32: litert-torch's conversion; fp16: the same with float16 weights (the quantizer's float
  casting; dequantised at load on CPUs).
- int8: the quantizer's static int8 recipe (per-channel symmetric int8 weights, per-tensor int8
  activations calibrated by min/max on the job's calibration images) on the float conversion of
  the int8 source (the QAT model when QAT ran: its weights are on the int8 grid, the ranges are
  measured again here, as in the onnx2tf route). Input and output stay float32; so do the input
  stem, the output tails and the float islands of the job's `float_ops` (targets/tflite_file.py),
  as in onnx2tf's files.

Layout: the job's metadata `input_layout`. NHWC (default, as onnx2tf's files) wraps the program
with litert-torch's channel-last I/O; NCHW keeps PyTorch's layout at the inputs and outputs (the
graph inside is NHWC either way).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np

from targets.job import Job, main, precisions_by_source, tool_versions, write_result
from targets.tflite_file import TFLiteGraph, deliver, float_nodes

SIGNATURE = "serving_default"
# The narrowest range a tensor is quantised over. A ReLU dead on every calibration image spanned
# [0, 1e-6]; the quantizer's int32 bias of the convolution reading it (in units of that tensor's
# scale x weight scale) overflowed, and v3's file drifted +142% (README, "TFLite: two converters").
MIN_RANGE = 1e-2


def convert_float(program_path: str, sample: np.ndarray, nhwc: bool, dest: Path) -> None:
    """litert-torch's float conversion of a saved torch.export program; `sample` (1, 3, H, W)."""
    import litert_torch
    import torch

    module = torch.export.load(program_path).module()
    x = torch.from_numpy(sample)
    if nhwc:
        module = litert_torch.to_channel_last_io(module, args=[0], outputs=[0, 1])
        x = x.permute(0, 2, 3, 1).contiguous()
    module.training = False   # an exported program's module refuses train()/eval(); it is in eval form already
    litert_torch.convert(module, (x,)).export(str(dest))


def quantize_fp16(source: Path, dest: Path) -> None:
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    qt = quantizer.Quantizer(str(source))
    qt.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                              algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    qt.quantize().export_model(str(dest), overwrite=True)


def quantize_int8(source: Path, images: np.ndarray, dest: Path, float_ops: list[str], stem_layers: int) -> None:
    """Static int8 with float32 I/O; the input stem, the output tails and `float_ops`' islands stay
    float (targets/tflite_file.py, `float_nodes`).
    `images`: calibration in the file's input layout, (N, ...) float32 in [0, 1]."""
    from ai_edge_quantizer import qtyping, quantizer, recipe

    qt = quantizer.Quantizer(str(source), recipe.static_wi8_ai8())
    graph = TFLiteGraph(source.read_bytes())
    # The quantizer's scope of an op is its output tensors' names joined by ";", ending in ";".
    every_op = qtyping.TFLOperationName.ALL_SUPPORTED
    for name in float_nodes(graph, float_ops, stem_layers):
        qt.update_quantization_recipe(regex=f"^{re.escape(name)};$", operation_name=every_op,
                                      algorithm_key="no_quantize")
    for boundary in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
        qt.update_quantization_recipe(regex=".*", operation_name=boundary, algorithm_key="no_quantize")
    (input_name,) = signature_inputs(source)
    qt.quantize(min_max_ranges(qt, input_name, images)).export_model(str(dest), overwrite=True)


def min_max_ranges(qt, input_name: str, images: np.ndarray) -> dict:
    """Each tensor's min and max over all calibration images: the ranges TFLite's own converter
    measures and QAT simulates (quant/qat.py).

    The quantizer's `calibrate` keeps a moving average (0.95) of the per-image extremes instead,
    which depends on the images' order and clips the rare far depths: measured on v3 (PTQ, 128
    calibration images, 200 validation images against the fp32 file), depth |d - d_fp32| / d_fp32
    p95 9.6% with the moving average, 5.8% with these ranges; segmentation agreement 94.4 / 95.1%.
    Every range spans at least `MIN_RANGE`, so a dead tensor keeps its readers' biases.
    """
    ranges: dict[str, dict] = {}
    for image in images:
        for name, qsv in qt.calibrate({SIGNATURE: [{input_name: image[None]}]}, num_threads=1).items():
            seen = ranges.get(name)
            ranges[name] = dict(qsv) if seen is None else {
                **seen, "min": np.minimum(seen["min"], qsv["min"]), "max": np.maximum(seen["max"], qsv["max"])}
    return {name: {**qsv, "max": np.maximum(qsv["max"], qsv["min"] + MIN_RANGE)} for name, qsv in ranges.items()}


def signature_inputs(path: Path) -> list[str]:
    """The input names of the file's signature (what the quantizer's calibration data is keyed by)."""
    from ai_edge_litert.interpreter import Interpreter

    return list(Interpreter(model_path=str(path)).get_signature_runner(SIGNATURE).get_input_details())


def convert(job: Job) -> None:
    import torch

    torch.set_num_threads(max(1, job.threads))   # --threads, as the Core ML converter; torch takes every core
    work = Path(job.work_dir)
    nhwc = job.metadata.get("input_layout", "NHWC") == "NHWC"
    sample = np.load(job.check["inputs"])[:1] if job.check else np.full(job.input_shape, 0.5, np.float32)
    artefacts = []
    for source, precisions in precisions_by_source(job).items():
        start = time.time()
        float_file = work / f"litert_{source}.tflite"
        convert_float(job.sources[source], sample, nhwc, float_file)
        for precision in precisions:
            produced = work / f"litert_{source}_{precision}.tflite"
            if precision == "fp32":
                shutil.copyfile(float_file, produced)
            elif precision == "fp16":
                quantize_fp16(float_file, produced)
            elif precision == "int8":
                quantize_int8(float_file, np.load(job.calibration["nhwc" if nhwc else "nchw"]), produced,
                              job.float_ops, job.float_stem)
            artefacts.append(deliver(job, produced, precision, source, start, converter="litert-torch"))
            start = time.time()   # the next file's time is its own, the shared conversion counted once
    write_result(job, artefacts, tool_versions("litert-torch", "ai-edge-quantizer", "torch", "ai-edge-litert", "numpy"))


if __name__ == "__main__":
    main(convert, toolchain=("litert_torch", "torch"))
