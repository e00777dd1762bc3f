"""Where a .tflite file spends its time, op by op: `python -m edge.op_profile`.

    python -m edge.op_profile MODEL.tflite [--threads N] [--runs K] [--top T] [--json OUT.json]

Why: an int8 file that is not much faster than its fp32 twin has to show where the time goes,
and LiteRT's Python interpreter has no op profiler (TFLite's `benchmark_model
--enable_op_profiling` needs that binary). Each operator is cut out of the file as a one-op
model, its non-constant inputs becoming the model's inputs (seeded random values), and timed by
LiteRT with its default XNNPACK delegate: median of `runs` invokes after a warm-up. This is how
the rewrites in targets/litert_graph.py were found (docs/EXPORT.md, "How int8 got there").

Read the figures op type by op type between two files, not as a sum equal to the whole graph's
time: a one-op model pays one invoke's overhead (~0.5 us), cannot show fusions XNNPACK makes
across ops (a PAD before a convolution is folded into it in the whole graph, so a big PAD here
costs nothing there), and an op XNNPACK does not take runs in TFLite's own kernel here, as it
would in the whole graph (between two delegate partitions). Small elementwise ops mislead most:
v3's 17 int8 hardswish MULs add up to 49 us here and cost nothing measurable in the graph. For
the graph's own time by section, fp32 against int8, use `python -m edge.section_profile`.

Imports ai-edge-litert (its flatbuffer schema and interpreter), never TensorFlow or torch.

JSON ("densekit.op-profile/1"): {"schema", "model", "threads", "runs", "ops": [{"index", "op",
"inputs" (shapes of the non-constant inputs), "output", "dtype", "us"}], "by_type": {op: {"count", "us"}},
"weight_dequantizes"}. An fp16 file's DEQUANTIZE ops of its float16 weights are not listed: each is
cut out with the op that reads it (XNNPACK folds it into that op's weights), and counted in
"weight_dequantizes".
"""
from __future__ import annotations

import copy
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.cli import ArgumentParser, at_least, command, threads_option
from core.io import check_output_file
from core.manifest import files_read, verify_artefact, verify_command_arguments
from edge.device.linux_bench import time_invokes  # the on-device script's timing loop (milliseconds)
from edge.run import write_json

SCHEMA = "densekit.op-profile/1"


def load_model(path: Path):
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    fix = ("if it came from python -m quant.export, `python -m quant.verify <its export directory>` checks it; "
           "export again to replace it")
    if data[4:8] != b"TFL3":
        raise ValueError(f"{path} ({len(data)} bytes) is not a TFLite file (no TFL3 identifier: empty, cut short "
                         f"or another kind of file); {fix}")
    try:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    except Exception:   # noqa: BLE001 - flatbuffers reads past the end: struct.error, IndexError, ...
        raise ValueError(f"{path} ({len(data)} bytes) is a truncated or damaged TFLite file (its tables point past "
                         f"its end); {fix}") from None


@lru_cache(maxsize=None)
def builtin_op_names() -> dict[int, str]:
    """TFLite's builtin operator codes -> their names (CONV_2D, DIV, ...), from ai-edge-litert's schema."""
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def op_name(model, op) -> str:
    from ai_edge_litert import schema_py_generated as schema

    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return builtin_op_names().get(builtin, f"BUILTIN_{builtin}") if builtin != schema.BuiltinOperator.CUSTOM else \
        f"CUSTOM:{code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode}"


def cut_model(model, operators: list, inputs: list[int], outputs: list[int]) -> bytes:
    """The flatbuffer of `model` reduced to `operators` (a part of its graph, in order) with these
    input and output tensors; tensors and buffers are shared, signatures and metadata dropped."""
    import flatbuffers

    cut, sub = copy.copy(model), copy.copy(model.subgraphs[0])
    cut.subgraphs, cut.signatureDefs, cut.metadata = [sub], None, None
    sub.operators, sub.inputs, sub.outputs = operators, inputs, outputs
    builder = flatbuffers.Builder(1024)
    builder.Finish(cut.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def is_constant(model, tensor: int) -> bool:
    return tensor >= 0 and model.buffers[model.subgraphs[0].tensors[tensor].buffer].data is not None


def constant_dequantizes(model) -> dict[int, object]:
    """{tensor: the DEQUANTIZE op writing it} for each DEQUANTIZE of a constant: an fp16 file stores its
    weights as float16 constants dequantized for the float kernels, and XNNPACK folds them into the
    weights, so such an op is part of its reader, not an op of its own."""
    return {int(op.outputs[0]): op for op in model.subgraphs[0].operators
            if op_name(model, op) == "DEQUANTIZE" and is_constant(model, int(op.inputs[0]))}


def one_op_model(model, index: int, folded: dict[int, object] | None = None) -> tuple[bytes, list[int]]:
    """The flatbuffer of a model made of operator `index` alone (with the DEQUANTIZE ops that give it
    constant weights, `constant_dequantizes`), and its input tensor indices."""
    folded = constant_dequantizes(model) if folded is None else folded
    op = model.subgraphs[0].operators[index]
    weights = [folded[int(i)] for i in op.inputs if int(i) in folded]
    inputs = [i for i in op.inputs if i >= 0 and int(i) not in folded and not is_constant(model, i)]
    return cut_model(model, [*weights, op], inputs, list(op.outputs)), inputs


def seeded_interpreter(model_content: bytes, threads: int | None):
    """A LiteRT interpreter of `model_content`, tensors allocated, inputs seeded random in their dtype's range."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        dtype = np.dtype(detail["dtype"])
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            value = rng.integers(max(info.min, -128), min(info.max, 127), detail["shape"], endpoint=True)
        else:
            value = rng.random(detail["shape"])
        interpreter.set_tensor(detail["index"], value.astype(dtype))
    return interpreter


def median_invoke_us(model_content: bytes, threads: int | None, runs: int, warmup: int = 10) -> float:
    """Median microseconds of one invoke of `model_content`, inputs seeded random in their dtype's range."""
    return float(np.median(time_invokes(seeded_interpreter(model_content, threads), runs, warmup))) * 1e3


def profile(path: str | Path, threads: int | None = None, runs: int = 100, progress: bool = False,
            verify: bool = True) -> dict:
    path = Path(path)
    if path.suffix.lower() != ".tflite" or not path.is_file():
        raise ValueError(f"{path}: edge.op_profile takes an existing .tflite file")
    if verify:   # a file of an export directory must be the one its manifest recorded
        verify_artefact(path)
    model = load_model(path)
    graph = model.subgraphs[0]
    if len(model.subgraphs) != 1:
        raise ValueError(f"{path} has {len(model.subgraphs)} subgraphs; only single-graph models are profiled")
    from tqdm.auto import tqdm

    ops, folded = [], constant_dequantizes(model)
    for index, op in enumerate(tqdm(graph.operators, desc="ops", unit="op", disable=not progress)):
        if int(op.outputs[0]) in folded:   # timed with the op that reads it
            continue
        content, inputs = one_op_model(model, index, folded)
        output = graph.tensors[op.outputs[0]]
        ops.append({"index": index, "op": op_name(model, op),
                    "inputs": [[int(s) for s in graph.tensors[i].shape] for i in inputs],
                    "output": [int(s) for s in output.shape], "dtype": tensor_type(output.type),
                    "us": round(median_invoke_us(content, threads, runs), 2)})
    by_type: dict[str, dict] = {}
    for op in ops:
        entry = by_type.setdefault(op["op"], {"count": 0, "us": 0.0})
        entry["count"] += 1
        entry["us"] = round(entry["us"] + op["us"], 2)
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]["us"]))
    return {"schema": SCHEMA, "model": path.name, "threads": threads, "runs": runs, "ops": ops, "by_type": by_type,
            "weight_dequantizes": len(folded)}


def tensor_type(code: int) -> str:
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return names.get(code, str(code)).lower()


def summary(result: dict, top: int) -> str:
    total = sum(op["us"] for op in result["ops"]) or 1.0
    rows = [f"{result['model']}: {len(result['ops'])} ops as one-op models, median of {result['runs']} invokes, "
            f"threads {result['threads'] or 'default'} (not the whole graph's time: see the module doc; "
            f"python -m edge.section_profile times the graph by sections)"
            + (f"; {result['weight_dequantizes']} DEQUANTIZE ops of float16 weights timed with their readers"
               if result.get("weight_dequantizes") else ""),
            f"  {'op type':<22} {'count':>5} {'us':>9} {'share':>6}"]
    for name, entry in result["by_type"].items():
        rows.append(f"  {name:<22} {entry['count']:>5} {entry['us']:>9.1f} {entry['us'] / total:>6.1%}")
    rows.append(f"  slowest {top}:")
    for op in sorted(result["ops"], key=lambda o: -o["us"])[:top]:
        shapes = " ".join("x".join(map(str, s)) for s in op["inputs"]) or "-"
        rows.append(f"  {op['us']:>8.1f} us  #{op['index']:<4} {op['op']:<20} {op['dtype']:<8} "
                    f"{shapes} -> {'x'.join(map(str, op['output']))}")
    return "\n".join(rows)


@command("python -m edge.op_profile")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m edge.op_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a .tflite file")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the runtime's)")
    parser.add_argument("--runs", type=int, default=100, help="timed invokes per op (default 100)")
    parser.add_argument("--top", type=int, default=15, help="slowest ops to list (default 15)")
    parser.add_argument("--json", default=None, help=f"write the {SCHEMA} JSON here")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest's sha256 check")
    args = parser.parse_args(argv)
    threads_option("--threads", args.threads)
    at_least("--runs", args.runs, 1)
    at_least("--top", args.top, 1)
    if args.json:
        check_output_file(args.json, "--json", reads=files_read([args.model]))
    if not args.no_verify:
        verify_command_arguments([args.model])
    result = profile(args.model, args.threads, args.runs, progress=True, verify=False)
    print(summary(result, args.top))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
