"""Where a .tflite file's whole-graph time goes, section by section: `python -m edge.section_profile`.

    python -m edge.section_profile MODEL.tflite [OTHER.tflite] [--sections N] [--threads N]
                                   [--runs K] [--json OUT.json]

Why: `python -m edge.op_profile` times each op alone, as a one-op model, which cannot show what an
op costs inside the graph. On v3's int8 file the 17 hardswish MULs add up to 49 us as one-op
models, yet the file with them removed ran no faster (2026-12-01, interleaved). This command
times the graph itself, in nested sub-graphs: the ops a weighted op (convolution, fully
connected) depends on, its output the only output, run by LiteRT with its XNNPACK delegate as the
whole file is. The anchors are chosen so that each sub-graph holds the one before (the longest
such chain, cut into about N sections of equal counts of weighted ops), and the last sub-graph is
the whole file. The sub-graph before the whole file ends at the last weighted ops, so the last
section is the output tails alone: the ops between those and the graph outputs (a student's final
upsampling and EXP), which cost the same in an fp32 and an int8 file and so cap int8's speed-up. A
section's time is the difference of two sub-graphs' median times, so the sections add up to the
file's time. Differences of a few microseconds are noise; a run disturbed
by other work can swing one section by hundreds of microseconds and the next one negative (seen
once in four runs on v3 with --runs 100): repeat the run and read the sections that agree.

A sub-graph is defined by data flow, not by the order a converter wrote the branches in, so it
holds the same layers in the fp32 and int8 files of one model (weighted ops matched by type,
weight shape, output shape and order). With two files, the sub-graphs of both are timed
interleaved and the table gives each section's speed-up.

Imports ai-edge-litert (its flatbuffer schema and interpreter), never TensorFlow or torch.

JSON ("densekit.section-profile/1"): {"schema", "models" (file names), "threads", "runs",
"total_us" (per model), "sections": [{"weighted_ops", "macs", "resolutions" (of the weighted ops'
outputs, HxW), "ops" (how many ops it adds, per model), "us" (per model), "speedup" (two models:
first / second), "output_tails" (true for the section of the output tails)}]}
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from core.cli import ArgumentParser, at_least, command, threads_option
from core.graph import output_tails
from core.io import check_output_file
from core.manifest import files_read, verify_artefact, verify_command_arguments
from edge.op_profile import cut_model, load_model, op_name, seeded_interpreter
from edge.run import write_json

SCHEMA = "densekit.section-profile/1"
WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
TAILS = "output tails"   # the anchor of the sub-graph that ends at the last weighted ops


def weighted_layers(model) -> list[tuple[int, tuple, int]]:
    """(op index, key, MACs) of each weighted op in execution order; key = (type, weight shape,
    output shape, how many ops of the same kind came before), the same in an fp32 and int8 file."""
    graph = model.subgraphs[0]
    seen: dict[tuple, int] = {}
    layers = []
    for index, op in enumerate(graph.operators):
        kind = op_name(model, op)
        if kind not in WEIGHTED:
            continue
        weight = tuple(int(s) for s in graph.tensors[op.inputs[1]].shape)
        output = tuple(int(s) for s in graph.tensors[op.outputs[0]].shape)
        base = (kind, weight, output)
        seen[base] = seen.get(base, 0) + 1
        layers.append((index, (*base, seen[base]), layer_macs(kind, weight, output)))
    return layers


def layer_macs(kind: str, weight: tuple, output: tuple) -> int:
    """Multiply-accumulates of one weighted op from its weight and output shapes (TFLite layouts:
    CONV_2D [O, kh, kw, I], DEPTHWISE_CONV_2D [1, kh, kw, C], FULLY_CONNECTED [O, I])."""
    outputs = int(np.prod(output))
    if kind == "CONV_2D":
        return outputs * weight[1] * weight[2] * weight[3]
    if kind == "DEPTHWISE_CONV_2D":
        return outputs * weight[1] * weight[2]
    return outputs * weight[-1]


def ancestors(graph, tensors: list[int]) -> set[int]:
    """Indices of the ops that `tensors` depend on (the ops that write them included)."""
    producer = {int(t): i for i, op in enumerate(graph.operators) for t in op.outputs}
    ops, pending = set(), [int(t) for t in tensors]
    while pending:
        index = producer.get(pending.pop())
        if index is not None and index not in ops:
            ops.add(index)
            pending += [int(t) for t in graph.operators[index].inputs if t >= 0]
    return ops


def nested_anchors(model, layers: list, sections: int) -> list[tuple | None]:
    """Keys of about `sections` weighted ops whose sub-graphs nest (each holds the one before), in
    data-flow order, ending with None (the whole graph). A sub-graph is the same set of layers in
    every file of one model, whatever order its converter wrote the branches in."""
    graph = model.subgraphs[0]
    key_of = {index: key for index, key, _ in layers}
    subs = sorted(((ancestors(graph, list(graph.operators[index].outputs)), key) for index, key, _ in layers),
                  key=lambda entry: len(entry[0]))
    # the longest chain of nested sub-graphs (an FPN's branches leave a greedy chain short)
    length, previous = [1] * len(subs), [None] * len(subs)
    for i, (sub, _) in enumerate(subs):
        for j in range(i):
            if length[j] + 1 > length[i] and subs[j][0] <= sub:
                length[i], previous[i] = length[j] + 1, j
    chain, i = [], max(range(len(subs)), key=length.__getitem__)
    while i is not None:
        sub, key = subs[i]
        chain.insert(0, (key, {key_of[o] for o in sub if o in key_of}))
        i = previous[i]
    picked, total = [], len(layers)
    for i in range(1, sections):   # spread by the count of layers each anchor's sub-graph holds
        key, _ = min(chain, key=lambda entry: abs(len(entry[1]) - total * i / sections))
        if key not in picked and len(dict(chain)[key]) < total:
            picked.append(key)
    order = {key: len(held_keys) for key, held_keys in chain}
    return sorted(picked, key=order.get) + [None]


def tail_frontier(model) -> list[int]:
    """The tensors where the graph outputs' tails begin: the outputs of the last weighted ops before
    each graph output (a graph output written by a weighted op is its own frontier)."""
    graph = model.subgraphs[0]
    producer = {int(t): i for i, op in enumerate(graph.operators) for t in op.outputs}
    _, frontier = output_tails(graph.outputs, producer, lambda i: graph.operators[i].inputs,
                               lambda i: op_name(model, graph.operators[i]) in WEIGHTED)
    return frontier


def sub_model(model, anchor_index: int | str | None) -> tuple[bytes, set[int]]:
    """The flatbuffer of the ops that weighted op `anchor_index` depends on (None: the whole
    graph; TAILS: all but the output tails), its outputs the only outputs; and the ops' indices."""
    graph = model.subgraphs[0]
    outputs = (list(graph.outputs) if anchor_index is None else tail_frontier(model) if anchor_index == TAILS
               else list(graph.operators[anchor_index].outputs))
    ops = ancestors(graph, outputs)
    operators = [op for i, op in enumerate(graph.operators) if i in ops]
    return cut_model(model, operators, list(graph.inputs), outputs), ops


def time_interleaved(interpreters: list, runs: int, warmup: int = 10) -> list[float]:
    """Median microseconds of each interpreter's invoke, all timed round-robin, one call each, so
    that a noisy machine slows each alike. Not in `edge.bench`'s turns of 20: a section is the
    difference of two sub-graphs' medians, and timed in turns those went negative (v3, 2026-12-03)."""
    for interpreter in interpreters:
        for _ in range(warmup):
            interpreter.invoke()
    times = [[] for _ in interpreters]
    for _ in range(runs):
        for interpreter, t in zip(interpreters, times):
            start = time.perf_counter()
            interpreter.invoke()
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e6 for t in times]


def profile(paths: list[str | Path], sections: int = 8, threads: int | None = None, runs: int = 200,
            progress: bool = False, verify: bool = True) -> dict:
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.suffix.lower() != ".tflite" or not path.is_file():
            raise ValueError(f"{path}: edge.section_profile takes existing .tflite files")
        if verify:   # a file of an export directory must be the one its manifest recorded
            verify_artefact(path)
    models = [load_model(p) for p in paths]
    for path, model in zip(paths, models):
        if len(model.subgraphs) != 1:
            raise ValueError(f"{path} has {len(model.subgraphs)} subgraphs; only single-graph models are profiled")
    layers = [weighted_layers(m) for m in models]
    if not layers[0]:
        raise ValueError(f"{paths[0]} has no convolution or fully connected op to cut between")
    keys = [sorted(key for _, key, _ in file_layers) for file_layers in layers]
    if any(k != keys[0] for k in keys[1:]):
        raise ValueError("the files do not hold the same layers (weighted ops by type and shape): "
                         "compare the fp32 and int8 files of one export")
    anchors = nested_anchors(models[0], layers[0], sections)
    if tail_frontier(models[0]) != sorted(int(t) for t in models[0].subgraphs[0].outputs):
        anchors.insert(-1, TAILS)   # the last section: the output tails alone
    index_of = [{key: index for index, key, _ in file_layers} for file_layers in layers]
    from tqdm.auto import tqdm

    subs = [[sub_model(m, a if a in (None, TAILS) else index_of[f][a]) for a in anchors]
            for f, m in enumerate(tqdm(models, desc="sub-graphs", unit="file", disable=not progress))]
    interpreters = [seeded_interpreter(content, threads) for file_subs in subs for content, _ in file_subs]
    medians = time_interleaved(interpreters, runs)
    per_file = [medians[f * len(anchors):(f + 1) * len(anchors)] for f in range(len(models))]
    macs = {key: m for _, key, m in layers[0]}
    key_at = [{index: key for index, key, _ in file_layers} for file_layers in layers]
    result_sections, before = [], [set() for _ in models]
    for s, _ in enumerate(anchors):
        new_ops = [subs[f][s][1] - before[f] for f in range(len(models))]
        new_layers = {key_at[0][i] for i in new_ops[0] if i in key_at[0]}
        us = [round(t[s] - (t[s - 1] if s else 0.0), 2) for t in per_file]
        entry = {"weighted_ops": len(new_layers), "macs": int(sum(macs[k] for k in new_layers)),
                 "resolutions": sorted({f"{k[2][1]}x{k[2][2]}" for k in new_layers
                                        if len(k[2]) == 4 and k[2][1] * k[2][2] > 1},
                                       key=lambda r: -int(r.split("x")[0])),
                 "ops": [len(o) for o in new_ops], "us": us, "output_tails": anchors[s] is None and TAILS in anchors}
        if len(models) == 2:
            entry["speedup"] = round(us[0] / us[1], 3) if us[1] > 0 else None
        result_sections.append(entry)
        before = [subs[f][s][1] for f in range(len(models))]
    return {"schema": SCHEMA, "models": [p.name for p in paths], "threads": threads, "runs": runs,
            "total_us": [round(t[-1], 2) for t in per_file], "sections": result_sections}


def summary(result: dict) -> str:
    names, two = result["models"], len(result["models"]) == 2
    rows = [f"nested sub-graphs timed interleaved, median of {result['runs']} invokes, threads "
            f"{result['threads'] or 'default'}; a section = what a sub-graph adds to the one before",
            f"  {'new ops':<22} {'layers':>6} {'MMACs':>7}  {'resolutions':<28}"
            + "".join(f" {'us ' + str(i + 1):>9}" for i in range(len(names))) + ("  speed-up" if two else "")]
    for s in result["sections"]:
        ops = " | ".join(map(str, s["ops"]))
        where = "output tails" if s.get("output_tails") else ", ".join(s["resolutions"])
        rows.append(f"  {ops:<22} {s['weighted_ops']:>6} {s['macs'] / 1e6:>7.1f}  {where:<28}"
                    + "".join(f" {u:>9.1f}" for u in s["us"])
                    + (f"  {s['speedup']:>7.2f}x" if two and s["speedup"] is not None else ("       -" if two else "")))
    total = result["total_us"]
    rows.append(f"  {'whole file':<22} {sum(s['weighted_ops'] for s in result['sections']):>6} "
                f"{sum(s['macs'] for s in result['sections']) / 1e6:>7.1f}  {'':<28}"
                + "".join(f" {u:>9.1f}" for u in total) + (f"  {total[0] / total[1]:>7.2f}x" if two else ""))
    rows += [f"  us {i + 1}: {name}" for i, name in enumerate(names)]
    return "\n".join(rows)


@command("python -m edge.section_profile")
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m edge.section_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="a .tflite file, or two (fp32 and int8 of one export)")
    parser.add_argument("--sections", type=int, default=8, help="about how many sections (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the runtime's)")
    parser.add_argument("--runs", type=int, default=200, help="timed invokes per sub-graph (default 200)")
    parser.add_argument("--json", default=None, help=f"write the {SCHEMA} JSON here")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest's sha256 check")
    args = parser.parse_intermixed_args(argv)
    if len(args.models) > 2:
        parser.error(f"takes one or two .tflite files, got {len(args.models)}")
    at_least("--sections", args.sections, 1)
    threads_option("--threads", args.threads)
    at_least("--runs", args.runs, 1)
    if args.json:
        check_output_file(args.json, "--json", reads=files_read(args.models))
    if not args.no_verify:
        verify_command_arguments(args.models)
    result = profile(args.models, args.sections, args.threads, args.runs, progress=True, verify=False)
    print(summary(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
