"""core/graph.py: the walk from a graph's outputs back to its last compute ops."""
from core.graph import output_tails

# tensor 0 is the input; op name -> (inputs, outputs); -1 is an absent optional input
OPS = {
    "conv_a": ([0, 10], [1]),
    "conv_b": ([1, 11], [2]),       # writes graph output 2 itself
    "resize": ([1, 12, -1], [3]),
    "add": ([3, 2], [4]),           # joins a tail and a compute op's output
    "exp": ([4], [5]),              # graph output 5
}
PRODUCER = {t: name for name, (_, outs) in OPS.items() for t in outs}


def walk(outputs):
    return output_tails(outputs, PRODUCER, lambda op: OPS[op][0], lambda op: op.startswith("conv"))


def test_output_tails_stop_at_the_last_compute_ops_and_name_where_the_tails_begin():
    tails, frontier = walk([5, 2])
    assert sorted(tails) == ["add", "exp", "resize"]
    assert frontier == [1, 2]                # conv_a feeds the resize, conv_b the add and an output


def test_an_output_written_by_a_compute_op_has_no_tail_and_is_its_own_frontier():
    assert walk([2]) == ([], [2])


def test_tails_are_listed_once_in_walk_order_when_two_outputs_share_them():
    tails, frontier = walk([5, 4])
    assert tails == ["add", "resize", "exp"] and frontier == [1, 2]
