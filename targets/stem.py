"""The regions an int8 file keeps in float, as rules over any graph's ops: the input stem
(`quant.export --float-stem`), used by the TFLite files (targets/tflite_file.py), the ONNX files
(targets/onnx.py) and Core ML's w8a8 (targets/coreml.py, float16 there), and by quant/qat.py on the
torch modules QAT simulates (traced into the same op form: the leaf modules and the torch functions
called between them, `quant.qat.graph_ops`); and the islands around ops that int8
kernels handle badly (`island_ops`, TFLite and ONNX).

Why (MobileNetV3-Small, v3): the stem convolution's output, the hardswish input, spans a wide range
that one int8 scale resolves coarsely, and every later layer reads it. In the torch simulation of
the int8 scheme (pointwise v3 student, seed 0, 200 validation images), the stem and the layers
reading it held 3.1 of the 3.4 points of abs_rel drift (docs/TRAINING.md). With 2 layers, v3
keeps the stem convolution, its hardswish and the convolutions that read it: the first depthwise
layer, and with a stride-2 decoder level (`model.output_stride=2`) that level's lateral (4.4 M of
108 M MACs there), where int8 ran no faster than fp32. Depth counts layers, not execution order,
which differs between converters (ONNX ran the lateral before the depthwise layer, TFLite after).

Standard library only: the converter processes import it.
"""
from __future__ import annotations

from typing import Collection, Hashable, Iterable, Sequence

# int8 files keep the first 2 weighted layers float unless told (`quant.export --float-stem N`): on v3
# the stem and the layers reading it, where its int8 drift began (above)
DEFAULT_FLOAT_STEM = 2

# (name, op type, input tensors, output tensors), in a topological order
Op = tuple[str, str, Sequence[Hashable], Sequence[Hashable]]


def stem_ops(ops: Iterable[Op], graph_inputs: Iterable[Hashable], layers: int, weighted: Collection[str],
             fused: Collection[str] = ()) -> list[str]:
    """Names of the ops within the first `layers` weighted layers from the graph inputs. A weighted
    op `layers` deep is kept, with an activation of a `fused` type that reads it (a separate op in
    ONNX, part of the convolution in TFLite); what follows is int8. An op that reads a tensor from
    outside the stem is not in it; constants (tensors no input reaches) do not count."""
    depth = {t: 0 for t in graph_inputs}      # stem tensor -> weighted layers between the input and it
    activations = set(depth)                  # tensors computed from the inputs
    last_layer: set[Hashable] = set()         # outputs of the weighted ops `layers` deep
    keep: list[str] = []
    for name, kind, inputs, outputs in ops:
        sources = [t for t in inputs if t in activations]
        if not sources:
            continue
        activations.update(outputs)
        if any(t not in depth for t in sources):
            continue
        level = max(depth[t] for t in sources)
        if kind in weighted:
            level += 1
            if level > layers:
                continue
            if level == layers:
                last_layer.update(outputs)
        elif level >= layers and not (kind in fused and inputs[0] in last_layer):
            continue
        keep.append(name)
        depth.update((t, level) for t in outputs)
    return keep


def island_ops(ops: Iterable[Op], seeds: Collection[str], bounds: Collection[str]) -> list[str]:
    """Names of the ops connected to a `seeds` op without passing through a `bounds` op (the
    weighted ones): the whole region around it, which an int8 file runs in float as one island
    with quantisation only at its edges. Why, on EfficientViT's linear attention (v4):
    targets/tflite_file.py, `float_islands`."""
    ops = list(ops)
    producer = {t: op for op in ops for t in op[3]}
    consumers: dict[Hashable, list[Op]] = {}
    for op in ops:
        for t in op[2]:
            consumers.setdefault(t, []).append(op)
    keep: dict[str, None] = {}               # insertion-ordered set
    pending = [op for op in ops if op[0] in seeds]
    while pending:
        name, _kind, inputs, outputs = pending.pop()
        if name in bounds or name in keep:
            continue
        keep[name] = None
        pending += [producer[t] for t in inputs if t in producer]
        pending += [c for t in outputs for c in consumers.get(t, [])]
    return list(keep)
