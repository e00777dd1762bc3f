"""A .tflite file as both TFLite converters see it (onnx2tf's targets/tflite.py and litert-torch's
targets/litert.py): its data flow, the ops an int8 file keeps in float, the metadata and output
names every artefact carries, and what computes in which precision.

Imports numpy, flatbuffers and ai-edge-litert (its interpreter and flatbuffer schema), never torch
or TensorFlow: the litert-torch converter shares its process with torch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from core.contract import DEPTH, INPUT_NAME, SEG, precision_metadata
from core.graph import output_tails as walk_output_tails
from edge.op_profile import op_name
from edge.runners import LiteRTRunner
from targets.job import Job, check_against_reference, publish
from targets.stem import Op, island_ops, stem_ops

METADATA_NAME = "densekit"


class TFLiteGraph:
    """A .tflite model's data flow: ops in execution order, tensor names, graph inputs and outputs."""

    def __init__(self, model_content: bytes):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=model_content)
        self.names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
        self.ops = interpreter._get_ops_details()
        self.inputs = [int(d["index"]) for d in interpreter.get_input_details()]
        self.outputs = [int(d["index"]) for d in interpreter.get_output_details()]

    def name(self, op: dict) -> str:
        return self.names[int(op["outputs"][0])]

    def op_tuples(self) -> list[Op]:
        """(name, type, inputs, outputs) per op, in execution order (a topological order), for the
        rules of targets/stem.py."""
        return [(self.name(op), op["op_name"], [int(t) for t in op["inputs"]], [int(t) for t in op["outputs"]])
                for op in self.ops]


COMPUTE_OPS = ("BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")   # where int8 pays: they bound a float island


def float_islands(graph: TFLiteGraph, op_types: list[str]) -> list[str]:
    """Output tensor names of every op connected to an `op_types` op without crossing a weighted op
    (convolution, fully connected): the whole region around it, in float, as one island.

    Why (EfficientViT's linear attention, v4): out = (q k^T v) / (q k^T 1 + eps). The int8 DIV
    kernel rejects a divisor that quantises to its zero point, which happens wherever ReLU zeroes a
    query (docs/TOOLCHAIN.md), so DIV must run in float. What surrounds it must too, for accuracy
    and for speed:
    - timm's form takes numerator and denominator from one matmul (v padded with ones), so they
      share one int8 scale sized for the numerator (~10^4 on v4): with the DIV alone in float, PTQ
      drifted depth |d - d_float| / d_float median / p95 6.1% / 25% and segmentation agreement fell
      to 88.1% (32 validation images).
    - XNNPACK runs neither int8 BATCH_MATMUL nor int8 RELU: as one-op models on 2 threads, v4's 21
      int8 BATCH_MATMULs took 1063 us against 185 us in float, its 14 int8 RELUs 652 us against 24.
      With only the DIV and its operands' chains in float, v4's int8 file ran 1.06x its fp32 one;
      with the deploy form's separate matmuls and only the DIVs in float, 0.98x.
    So everything between the attention's qkv convolutions and its output projection runs in float,
    with QUANTIZE/DEQUANTIZE only at its edges (v4: 115 float ops, 15 + 37 at the edges of 7
    attentions and 2 output tails): int8 1.96x faster than fp32. MobileNetV3 students have no DIV.
    """
    ops = graph.op_tuples()
    return island_ops(ops, {name for name, kind, *_ in ops if kind in op_types},
                      {name for name, kind, *_ in ops if kind in WEIGHTED_OPS})


def input_stem(graph: TFLiteGraph, layers: int) -> list[str]:
    """Output tensor names of the ops within the first `layers` weighted layers from the graph input,
    which an int8 file runs in float (the rule and why: targets/stem.py)."""
    return stem_ops(graph.op_tuples(), graph.inputs, layers, WEIGHTED_OPS)


def float_nodes(graph: TFLiteGraph, float_ops: list[str], stem_layers: int) -> list[str]:
    """Every op an int8 file keeps in float: the input stem, the islands of `float_ops`, the output tails."""
    return input_stem(graph, stem_layers) + float_islands(graph, float_ops) + output_tails(graph)


def output_tails(graph: TFLiteGraph) -> list[str]:
    """Output tensor names of the ops between each graph output and the last compute op before it
    (the heads' final upsampling and the depth EXP), which an int8 file runs in float.

    Why: XNNPACK's int8 bilinear resize is slower than its float one on these tensors (1 and 13
    channels at full resolution; measured 43 vs 24 us and 63 vs 45 us on 2 threads), and requantising
    the full-resolution outputs only loses precision. In float, the int8 part ends at the heads'
    stride-4 convolutions: log-depth (uniform relative precision over the depth range) and logits.
    """
    ops = graph.ops
    producer = {int(t): i for i, op in enumerate(ops) for t in op["outputs"]}
    tails, _ = walk_output_tails(graph.outputs, producer, lambda i: ops[i]["inputs"],
                                 lambda i: ops[i]["op_name"] in COMPUTE_OPS)
    return [graph.name(ops[i]) for i in tails]


def finish(path: Path, metadata: dict) -> int:
    """Name the input and outputs as the artefact contract does (core/contract.py), store the export
    metadata in the file, hold each int8 tensor under a fused activation to that activation's range
    (`tighten_activation_ranges`; returns how many), give each int8 output XNNPACK could not
    requantise to the finest scale it takes (`widen_too_fine_output_scales`) and share identical
    zero points.

    The converters name tensors their own way (onnx2tf `Identity`, `PartitionedCall:1` in an order
    that differs between float and int8 files; litert-torch `serving_default_output_0_output`); the
    depth output is the one with a single channel, in the layout the metadata states.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    channel_axis = -1 if metadata.get("input_layout", "NHWC") == "NHWC" else 1
    names = {index: (DEPTH if int(graph.tensors[index].shape[channel_axis]) == 1 else SEG) for index in graph.outputs}
    names[graph.inputs[0]] = INPUT_NAME
    for index, name in names.items():
        graph.tensors[index].name = name.encode()
    for signature in model.signatureDefs or []:   # the names apps see through the signature API
        for entry in [*signature.inputs, *signature.outputs]:
            if entry.tensorIndex in names:
                entry.name = names[entry.tensorIndex].encode()
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    tightened = tighten_activation_ranges(model)
    widen_too_fine_output_scales(model)
    refuse_too_fine_output_scales(model)
    path.write_bytes(serialize_sharing_zero_points(model))
    return tightened


# A fused activation bounds what an op writes; int8 kernels of these readers take any input scale
ACTIVATION_BOUNDS = {"RELU": (0.0, float("inf")), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
RESCALABLE_READERS = ("ADD", "SUB", "MUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "DEQUANTIZE")


def rescalable_int8_outputs(model):
    """(op, op type, tensor index) for each op whose single output is int8 on one scale, is not a
    graph output, and is read only by ops that take any input scale (RESCALABLE_READERS): the
    tensors a pass may give another scale and zero point through `rescale_int8_tensor`."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    kinds = [op_name(model, op) for op in graph.operators]
    readers: dict[int, set[str]] = {}
    for op, op_kind in zip(graph.operators, kinds):
        for t in op.inputs:
            readers.setdefault(int(t), set()).add(op_kind)
    for op, op_kind in zip(graph.operators, kinds):
        if len(op.outputs) != 1:
            continue
        index = int(op.outputs[0])
        tensor = graph.tensors[index]
        q = tensor.quantization
        if (tensor.type == schema.TensorType.INT8 and q is not None and q.scale is not None and len(q.scale) == 1
                and index not in graph.outputs and readers.get(index, set()) <= set(RESCALABLE_READERS)):
            yield op, op_kind, index


# Readers whose int32 bias is stored in units of input scale x weight scale (TFLite's quantisation spec)
BIASED_READERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
INT32_MAX = 2 ** 31 - 1


def rescale_int8_tensor(model, index: int, scale: float, zero_point: int) -> bool:
    """Give int8 tensor `index` a new scale and zero point, and re-express the int32 bias of each
    convolution reading it on its new input scale x weight scale, the unit the kernels assume:
    a bias left on the old input scale is multiplied by new / old scale (a widened squeeze-excite
    input once made a gate's bias 25x too large, and the file drifted past its gate). Returns
    False, and changes nothing, when a rescaled bias would not fit in int32."""
    graph = model.subgraphs[0]
    ratio = float(graph.tensors[index].quantization.scale[0]) / scale
    biases = [graph.tensors[op.inputs[2]] for op in graph.operators
              if op_name(model, op) in BIASED_READERS and int(op.inputs[0]) == index
              and len(op.inputs) > 2 and op.inputs[2] >= 0]
    rescaled = [np.round(bias_values(model, bias) * ratio) for bias in biases]
    if any(np.abs(values).max(initial=0) > INT32_MAX for values in rescaled):
        return False
    for bias, values in zip(biases, rescaled):
        set_bias_values(model, bias, values.astype(np.int32))
        bias.quantization.scale = (np.asarray(bias.quantization.scale, np.float64) / ratio).astype(np.float32)
    q = graph.tensors[index].quantization
    q.scale = np.array([scale], np.float32)
    q.zeroPoint = np.array([zero_point], np.int64)
    q.min, q.max = None, None     # the stale calibration range
    return True


def bias_values(model, bias) -> np.ndarray:
    return np.frombuffer(np.asarray(model.buffers[bias.buffer].data, np.uint8).tobytes(), "<i4").astype(np.int64)


def set_bias_values(model, bias, values: np.ndarray) -> None:
    """Write an int32 bias, into a buffer of its own if another tensor shares the old one."""
    from ai_edge_litert import schema_py_generated as schema

    sharers = sum(t.buffer == bias.buffer for g in model.subgraphs for t in g.tensors)
    if sharers > 1:
        model.buffers.append(schema.BufferT())
        bias.buffer = len(model.buffers) - 1
    model.buffers[bias.buffer].data = np.frombuffer(values.astype("<i4").tobytes(), np.uint8)


def tighten_activation_ranges(model) -> int:
    """Give each int8 tensor written under a fused RELU6 (RELU, RELU_N1_TO_1) at most that
    activation's range; returns how many tensors changed.

    TensorFlow's quantiser gives the gate of our int8 hardswish, relu6(x + 3) as an ADD with a fused
    RELU6, the scale of the MUL that reads it (x * gate, e.g. [-2.2, 108] in steps of 0.43 on v4):
    14-19 levels for a value in [0, 6]. Every hardswish lost precision, and the int8 files drifted
    beyond the torch simulation of the same scheme (quant/qat.py quantises the gate over [0, 6]): on
    a v4 run, PTQ moved depth by 7.5% per pixel in the file against 1.5% simulated. The op's own
    kernel requantises to whatever scale its output tensor states, and the readers listed above
    take any input scale, so the file computes the same function with a finer gate.
    """
    from ai_edge_litert import schema_py_generated as schema

    activations = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
    changed = 0
    for op, _, index in rescalable_int8_outputs(model):
        fused = activations.get(getattr(op.builtinOptions, "fusedActivationFunction", None))
        if fused not in ACTIVATION_BOUNDS:
            continue
        q = model.subgraphs[0].tensors[index].quantization
        scale, zero = float(q.scale[0]), int(q.zeroPoint[0])
        low, high = (-128 - zero) * scale, (127 - zero) * scale
        bound_low, bound_high = ACTIVATION_BOUNDS[fused]
        new_low, new_high = max(low, bound_low), min(high, bound_high)
        if new_high <= new_low:   # e.g. [-255 s, 0] under RELU: only 0 representable, no range to give
            continue
        if new_high - new_low > 0.9 * (high - low):   # under a tenth finer: leave the converter's choice
            continue
        new_scale = (new_high - new_low) / 255
        changed += rescale_int8_tensor(model, index, new_scale, int(round(-128 - new_low / new_scale)))
    return changed


# XNNPACK's int8 convolutions requantise their int32 accumulator (input scale x weight scale) to
# the output scale and refuse a ratio of 256 or more (operators/convolution-nhwc.c); LiteRT 2.3's
# delegate then frees the half-built subgraph twice and the process aborts ("double free").
XNNPACK_MAX_REQUANTIZATION = 256.0
REQUANTIZING_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def widen_too_fine_output_scales(model) -> int:
    """Give each int8 convolution output whose scale is too fine for XNNPACK's requantisation the
    finest scale it takes; returns how many tensors changed.

    A layer whose outputs never leave a tiny range gets a tiny scale: a squeeze-excite ReLU dead on
    every calibration image had [0, 1e-6], scale 3.9e-9 (accumulator step / output step = 12,800)
    on a v3 run, and the file crashed every XNNPACK interpreter. The new range (255 steps of a
    255th of one accumulator step) holds the old one, which spanned less than a step, and keeps its
    low end: the op's output changes by less than the accumulator resolves. Only outputs whose
    readers take any input scale are changed (`rescalable_int8_outputs`).
    """
    graph = model.subgraphs[0]
    changed = 0
    for op, kind, index in rescalable_int8_outputs(model):
        steps = requantization(graph, op) if kind in REQUANTIZING_OPS else None
        if steps is None or steps[0] / steps[1] < XNNPACK_MAX_REQUANTIZATION:
            continue
        step, output_scale = steps
        low = (-128 - int(graph.tensors[index].quantization.zeroPoint[0])) * output_scale
        new_scale = step / (XNNPACK_MAX_REQUANTIZATION - 1)
        changed += rescale_int8_tensor(model, index, new_scale, int(np.clip(round(-128 - low / new_scale), -128, 127)))
    return changed


def requantization(graph, op) -> tuple[float, float] | None:
    """(accumulator step, output scale) of a convolution with quantised input and weights and one
    output on one scale: the accumulator step is the input scale x the largest weight scale, and
    XNNPACK refuses their ratio from XNNPACK_MAX_REQUANTIZATION. None for any other op."""
    def scales(index: int) -> np.ndarray | None:
        q = graph.tensors[index].quantization if index >= 0 else None
        return None if q is None or q.scale is None or not len(q.scale) else np.asarray(q.scale, np.float64)

    if len(op.inputs) < 2 or len(op.outputs) != 1:
        return None
    input_scale, weight_scale, output_scale = (scales(int(t)) for t in (op.inputs[0], op.inputs[1], op.outputs[0]))
    if input_scale is None or weight_scale is None or output_scale is None or len(output_scale) != 1:
        return None
    return float(input_scale[0] * weight_scale.max()), float(output_scale[0])


def refuse_too_fine_output_scales(model) -> None:
    """ValueError naming each int8 convolution output still too fine for XNNPACK after
    `widen_too_fine_output_scales` (one read by an op that needs its input's scale, such as
    RESIZE_BILINEAR, or whose rescaled bias would overflow): XNNPACK would abort on the file
    (a double free), with nothing said of which tensor or why."""
    graph = model.subgraphs[0]
    found = []
    for op in graph.operators:
        steps = requantization(graph, op) if op_name(model, op) in REQUANTIZING_OPS else None
        if steps is None:
            continue
        ratio = steps[0] / steps[1]
        if ratio >= XNNPACK_MAX_REQUANTIZATION:
            found.append(f"{graph.tensors[int(op.outputs[0])].name.decode(errors='replace')} ({ratio:.0f}x)")
    if found:
        # the fix first: the export shows 300 characters of the converter's last line
        raise ValueError(f"the int8 file would abort XNNPACK: calibrate on more images (--calib N) or keep the readers "
                         f"in float (--float-ops); {len(found)} convolution outputs barely moved on the calibration "
                         f"images (a dead unit), so their scale is finer than a 256th of their accumulator step, and "
                         f"their readers need it: {', '.join(found[:5])}")


def serialize_sharing_zero_points(model) -> bytes:
    """The flatbuffer with each distinct int64 vector stored once.

    TFLite stores per-channel quantisation as a float32 scale and an int64 zero point per output
    channel, for every weight and bias tensor; symmetric weights' zero points are all 0, so the
    vectors repeat. MobileNetV3's depthwise convs have only 9-25 weights per channel, which makes
    these repeated 8-byte zeros ~5% of an int8 file. Flatbuffers allow several tables to point
    at one vector, and TFLite reads them through offsets, so the file's meaning is unchanged
    (the int8 file is checked against PyTorch right after).
    """
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, values):
            if values.dtype != np.int64:
                return super().CreateNumpyVector(values)
            key = (values.shape, values.tobytes())
            if key not in self.shared:
                self.shared[key] = super().CreateNumpyVector(values)
            return self.shared[key]

    builder = SharingBuilder(1024)
    builder.shared = {}
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(path: str | Path) -> dict:
    """The metadata `finish` stored."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    raise KeyError(f"{path} has no {METADATA_NAME} metadata")


def op_precision(path: Path) -> dict:
    """Operators by output dtype, which kinds compute in float, and every op type with its count:
    proves an int8 file is int8 and shows what XNNPACK is given."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()   # applies the XNNPACK delegate
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    counts: dict[str, int] = {}
    float_ops: set[str] = set()
    types: dict[str, int] = {}
    for op in interpreter._get_ops_details():
        types[op["op_name"]] = types.get(op["op_name"], 0) + 1
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "DELEGATE") or not len(op["outputs"]):
            continue
        kind = dtypes.get(int(op["outputs"][0]), "unknown")
        counts[kind] = counts.get(kind, 0) + 1
        if kind.startswith("float"):
            float_ops.add(op["op_name"])
    # XNNPACK replaces each run of ops it takes by one DELEGATE op: 1 = the whole graph in XNNPACK
    return {**counts, "float_ops": sorted(float_ops), "op_types": dict(sorted(types.items())),
            "xnnpack_partitions": types.get("DELEGATE", 0)}


def deliver(job: Job, produced: Path, precision: str, source: str, started: float, **extra) -> dict:
    """Finish a converted file (names, metadata), check it against its PyTorch reference in
    LiteRT, publish it into the export and return its result entry (`extra` added to it)."""
    tightened = finish(produced, precision_metadata(job.metadata, precision))
    entry = {"path": f"{job.stem}_{precision}.tflite", "format": "tflite", "precision": precision, "source": source,
             "check": check_against_reference(job, precision, LiteRTRunner(produced, job.threads)),
             "ops_by_dtype": op_precision(produced), "activation_ranges_tightened": tightened, **extra}
    publish(job, produced, entry["path"])
    print(f"tflite {precision}: {entry['path']} ({time.time() - started:.1f} s)", flush=True)
    return entry
