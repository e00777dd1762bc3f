"""This host's matrix-product peak, in the runtime family our artefacts run in: `python -m edge.peak`.

    python -m edge.peak [--threads N] [--size 1024] [--repeats 5] [--json OUT.json]

What it measures: MLAS, the GEMM library under onnxruntime's CPU kernels (and the kind of
kernel that a convolution lowers to), on this CPU with `threads` intra-op threads. Two one-node
ONNX graphs, built here with onnx.helper: an fp32 `MatMul` and an int8 `MatMulInteger` (uint8
activations x int8 weights -> int32, the U8S8 path int8 convolutions use), each size x size x
size with the right-hand matrix a constant (prepacked, as a layer's weights are). Time is the
best of `repeats` session.run calls after one warmup, so it includes the small per-call overhead
every artefact also pays.

Figures: 1 MAC = 2 ops, so a (M, K) x (K, N) product is 2*M*K*N ops: fp32_gflops = 2*M*K*N / t / 1e9
and int8_gops likewise. Why: an artefact's own speed (2 x its MACs / its latency) means little
alone; divided by what this CPU reaches on a large, dense GEMM with the same runtime and threads,
it becomes an efficiency (quant/benchmark.py), the share of the hardware the model uses. Depthwise
convolutions, resizes and memory traffic are why a small dense-prediction network reaches only a
fraction of it.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from core.cli import ArgumentParser, at_least, command, threads_option
from core.io import check_output_file
from edge.host import describe_cpu, host_cpu
from edge.run import write_json

MAX_SIZE = 8192
OPSET, IR_VERSION = 17, 8   # pinned: onnx may write an IR version newer than onnxruntime reads


def matmul_model(size: int, integer: bool):
    """One-node ONNX graph: A (size, size) input @ B (size, size) constant -> Y.

    fp32: MatMul, float32 in and out. integer: MatMulInteger, A uint8, B int8, Y int32.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        b = rng.integers(-128, 128, (size, size), dtype=np.int8)
        a_type, y_type, op = TensorProto.UINT8, TensorProto.INT32, "MatMulInteger"
    else:
        b = rng.standard_normal((size, size), dtype=np.float32)
        a_type, y_type, op = TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    graph = helper.make_graph(
        [helper.make_node(op, ["A", "B"], ["Y"])], f"densekit_peak_{op}",
        [helper.make_tensor_value_info("A", a_type, [size, size])],
        [helper.make_tensor_value_info("Y", y_type, [size, size])],
        initializer=[numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="densekit")


def best_seconds(model, feed: dict, threads: int | None, repeats: int) -> float:
    """Fastest of `repeats` session.run calls of `model` on `feed` after one warmup, in seconds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak(threads: int | None = None, *, size: int = 1024, repeats: int = 5) -> dict:
    """{"fp32_gflops", "int8_gops", "method", "size", "threads", "cpu"}: this host's GEMM peak, and
    the CPU it was measured on (`host_cpu`).

    threads: onnxruntime intra-op threads (None: its default, one per physical core); size: M = K
    = N; repeats: timed runs, the best counts.
    """
    import onnxruntime as ort

    if size < 1 or repeats < 1:
        raise ValueError(f"size={size}, repeats={repeats}: both must be >= 1 (default size 1024, repeats 5)")
    rng = np.random.default_rng(1)
    ops = 2.0 * size ** 3   # 1 MAC = 2 ops
    fp32 = best_seconds(matmul_model(size, False),
                        {"A": rng.standard_normal((size, size), dtype=np.float32)}, threads, repeats)
    int8 = best_seconds(matmul_model(size, True),
                        {"A": rng.integers(0, 256, (size, size), dtype=np.uint8)}, threads, repeats)
    method = (f"onnxruntime {ort.__version__} CPUExecutionProvider (MLAS): MatMul fp32 and MatMulInteger "
              f"uint8 x int8 -> int32, {size}x{size}x{size} with a constant right-hand side, best of "
              f"{repeats} after 1 warmup; 1 MAC = 2 ops")
    return {"fp32_gflops": ops / fp32 / 1e9, "int8_gops": ops / int8 / 1e9, "method": method, "size": size,
            "threads": threads, "cpu": host_cpu()}


@command("python -m edge.peak")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m edge.peak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--size", type=int, default=1024, help="M = K = N (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, best counts (default 5)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    threads_option("--threads", args.threads)
    if args.size > MAX_SIZE:   # memory grows as size^2 and time as size^3; the peak is reached long before
        raise ValueError(f"--size {args.size}: at most {MAX_SIZE} (its matrices alone take "
                         f"{5 * 4 * args.size ** 2 / 2 ** 30:.1f} GiB; 1024 already measures the peak)")
    if args.json:
        check_output_file(args.json, "--json")
    result = measure_peak(args.threads, size=args.size, repeats=args.repeats)
    print(f"host peak ({args.threads or 'default'} threads, {args.size}^3): fp32 {result['fp32_gflops']:.1f} GFLOP/s, "
          f"int8 {result['int8_gops']:.1f} GOP/s ({result['int8_gops'] / result['fp32_gflops']:.2f}x)\n"
          f"cpu: {describe_cpu(result['cpu'])}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
