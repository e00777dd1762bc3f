"""ONNX converter process: the parent's ONNX graph as fp32, fp16, and int8 QDQ via onnxruntime.quantization.

`python -m targets.onnx JOB.json`. Imports onnx and onnxruntime only.

- fp32: the exported graph, simplified (onnxsim folds constant chains), with metadata_props.
- fp16: float16 weights and compute with float32 input and output (`to_float16`), for GPUs
  (Jetson's CUDA / TensorRT providers); on a CPU onnxruntime runs it too, mostly through casts.
- int8: static QDQ quantisation (QuantizeLinear/DequantizeLinear around each op, which
  onnxruntime fuses into int8 kernels): per-channel symmetric weights on a 7-bit grid ([-64, 64],
  onnxruntime's reduce_range: core/formats.py says why), per-tensor asymmetric
  uint8 activations (MLAS's fast x86 path) with min/max ranges from the job's calibration images — the same scheme as
  TFLite's int8 and as quant/qat.py's fake quantisation, so a QAT model converts as trained;
  the input stem within the job's `float_stem` weighted layers and each linear attention (v4) stay
  float, as in TFLite's files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from core.contract import INPUT_NAME, precision_metadata
from core.formats import FORMATS
from edge.runners import OrtRunner
from targets.job import Job, check_against_reference, main, publish, source_for, tool_versions, write_result
from targets.stem import island_ops, stem_ops


def simplified(source: str, dest: Path) -> Path:
    """onnx-simplifier: folds constant chains (and the Shape->Resize chains onnx2tf cannot convert)."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(source))
    if not ok:
        raise RuntimeError(f"onnx-simplifier could not validate the simplified {source}")
    onnx.save(model, dest)
    return dest


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over an (N, 3, H, W) array, one image per call."""

    def __init__(self, path: str):
        self.images = np.load(path).astype(np.float32)
        self.position = 0

    def get_next(self):
        if self.position >= len(self.images):
            return None
        self.position += 1
        return {INPUT_NAME: self.images[self.position - 1][None]}

    def rewind(self):
        self.position = 0


WEIGHTED_NODES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip")   # onnxruntime folds them into the convolution before them


def node_tuples(model) -> list[tuple]:
    """(name, type, inputs, outputs) per node, in the graph's (topological) order, for the rules of
    targets/stem.py."""
    return [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]


def input_stem(model, layers: int) -> list[str]:
    """Names of the nodes within the first `layers` weighted layers from the graph input, which the
    int8 file keeps in float (the rule and why: targets/stem.py)."""
    return stem_ops(node_tuples(model), [i.name for i in model.graph.input], layers, WEIGHTED_NODES, FUSED_ACTIVATIONS)


def attention_islands(model) -> list[str]:
    """Names of the nodes around each division of two computed tensors (EfficientViT's linear
    attention, v4), out to the nearest weighted nodes: one float island each, as in the TFLite files
    (targets/tflite_file.py, `float_islands`, says why). Left to onnxruntime, the attention's
    matmuls and the division's operands were uint8, each with its own scale: on the v4 9-epoch
    seed-0 run the PTQ file moved depth 4.7% per pixel from the float model (64 validation
    images), against 1.5% in the simulation of the scheme (quant.sensitivity)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    seeds = {n.name for n in model.graph.node if n.op_type == "Div" and not constants & set(n.input)}
    bounds = {n.name for n in model.graph.node if n.op_type in WEIGHTED_NODES and constants & set(n.input)}
    return island_ops(node_tuples(model), seeds, bounds)


def quantize_int8(source: Path, dest: Path, calibration: str, stem_layers: int, weight_max: int) -> None:
    """Static QDQ int8; the input stem within its first `stem_layers` weighted layers and the
    attention islands (`attention_islands`) stay float. `weight_max`: 127 (int8 weights in
    [-127, 127]) or 64 (onnxruntime's `reduce_range`, [-64, 64]: core/formats.py says why)."""
    if weight_max not in (64, 127):
        raise ValueError(f"onnxruntime quantises weights to [-127, 127] or, reduced, [-64, 64]; "
                         f"not [-{weight_max}, {weight_max}]")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name(source.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    for i, node in enumerate(model.graph.node):   # quantize_static excludes nodes by name; some come unnamed
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.save(model, str(prepared))
    in_float = input_stem(model, stem_layers) + attention_islands(model)
    # uint8 activations x int8 weights (U8S8): MLAS's fast x86 path. With int8 activations (S8S8) the
    # v3 student's QDQ file ran 0.45-0.6x the speed of fp32 on this AVX-512 VNNI host, with U8S8 1.3-1.4x
    # (python -m edge.bench, 2 threads; docs/TOOLCHAIN.md).
    quantize_static(str(prepared), str(dest), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=in_float,
                    reduce_range=weight_max == 64,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


# Inputs that stay float32 in a float16 graph: Resize's roi and scales (ONNX types them float32).
FLOAT32_INPUTS = {"Resize": (1, 2)}


def to_float16(source: Path, dest: Path) -> Path:
    """float16 weights and compute, float32 input and output (a Cast at each end), so the file takes
    and returns what the fp32 one does. onnxruntime.transformers.float16 produced invalid graphs on
    our students (duplicate Cast names for constants shared by several Resize nodes), hence this
    small converter: every float32 initializer and Constant becomes float16, except FLOAT32_INPUTS."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    keep = {node.input[i] for node in graph.node for i in FLOAT32_INPUTS.get(node.op_type, ())
            if i < len(node.input)}

    def half(tensor):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))

    for tensor in graph.initializer:
        half(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep:
            for attribute in node.attribute:
                if attribute.name == "value":
                    half(attribute.t)
    image, outputs = graph.input[0].name, {o.name for o in graph.output}
    ends = outputs | {image}
    # inner tensors take the float16 names, the graph's ends keep theirs; a node that reads an output
    # reads its float16 tensor (the float32 Cast comes last)
    for node in graph.node:
        node.input[:] = [f"{name}_fp16" if name in ends else name for name in node.input]
        node.output[:] = [f"{name}_fp16" if name in outputs else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", [image], [f"{image}_fp16"], to=TensorProto.FLOAT16,
                                          name="densekit_input_to_fp16"))
    for name in outputs:
        graph.node.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=TensorProto.FLOAT,
                                           name=f"densekit_{name}_to_fp32"))
    del graph.value_info[:]   # intermediate types changed; onnxruntime infers them again
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


def set_metadata(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    entries = {"densekit": json.dumps(metadata, sort_keys=True)}
    entries.update({k: str(v) for k, v in metadata.items() if isinstance(v, (str, int, float))})
    del model.metadata_props[:]
    for key, value in sorted(entries.items()):
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "densekit"
    onnx.save(model, str(path))


def convert(job: Job) -> None:
    work = Path(job.work_dir)
    artefacts = []
    for precision in job.precisions:
        start = time.time()
        source = source_for(precision)
        produced = simplified(job.sources[source], work / f"{source}.sim.onnx")
        if precision == "int8":
            produced, float_graph = work / f"{source}.int8.onnx", produced
            quantize_int8(float_graph, produced, job.calibration["nchw"], job.float_stem,
                          FORMATS["onnx"].converter(job.converter).int8_weight_max)
        elif precision == "fp16":
            produced = to_float16(produced, work / f"{source}.fp16.onnx")
        set_metadata(produced, precision_metadata(job.metadata, precision))
        entry = {"path": f"{job.stem}_{precision}.onnx", "format": "onnx", "precision": precision, "source": source,
                 "check": check_against_reference(job, precision, OrtRunner(produced, job.threads))}
        publish(job, produced, entry["path"])
        artefacts.append(entry)
        print(f"onnx {precision}: {entry['path']} ({time.time() - start:.1f} s)", flush=True)
    write_result(job, artefacts, tool_versions("onnx", "onnxruntime", "onnxsim", "numpy"))


if __name__ == "__main__":
    main(convert, toolchain=("onnx", "onnxsim"))
