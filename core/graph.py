"""Walks over a dataflow graph given by its producer map (tensor -> the op that writes it).

Shared by the converters (targets/tflite_file.py: the ops an int8 file keeps in float) and the
profiler (edge/section_profile.py: where a file's last section begins), which read the same .tflite
graph in two forms: the interpreter's op details and the flatbuffer's operators. Imports nothing.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Mapping, TypeVar

OpKey = TypeVar("OpKey", bound=Hashable)


def output_tails(outputs: Iterable[int], producer: Mapping[int, OpKey],
                 inputs_of: Callable[[OpKey], Iterable[int]],
                 is_compute: Callable[[OpKey], bool]) -> tuple[list[OpKey], list[int]]:
    """Walk back from each graph output to the last compute op before it.

    Returns the ops in between (the output tails, in the order the walk meets them) and the tensors
    where the tails begin (the frontier: the outputs of those compute ops, sorted; a graph output
    written by a compute op is its own frontier). Tensors without a producer (graph inputs,
    constants, -1 for an absent optional input) end the walk.
    """
    tails: list[OpKey] = []
    frontier: set[int] = set()
    seen: set[int] = set()
    pending = [int(t) for t in outputs]
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor not in producer:
            continue
        seen.add(tensor)
        op = producer[tensor]
        if is_compute(op):
            frontier.add(tensor)
        elif op not in tails:
            tails.append(op)
            pending += [int(t) for t in inputs_of(op)]
    return tails, sorted(frontier)
