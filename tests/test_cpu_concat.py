"""Channel concat on the CPU backend (`backends/cpu/kernels/views.py`
`concat_channels`) against the reference, element for element: 2-4
operands mixing convs' channels-last results, NCHW tensors, graph inputs
and constants, read in place into a channels-last result that the convs
and max pools after it read as it is; one and two threads; the concat and
its readers replay. Other concats copy rows (`concat_rows`) and replay too."""

from __future__ import annotations

import numpy as np
import pytest
from test_cpu_pool_nhwc import DTYPES, POOLS, SCALES, check_runs, codes, conv, qaverage_pool

from qnnjit.backends.cpu.kernels import _threads, pool, views
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

SIZE = (5, 7)

# operands: (kind, channels); "conv": a conv's channels-last result, "clip":
# an NCHW tensor, "input": the graph input itself (NCHW), "const": a constant
OPERANDS = [
    [("conv", 16), ("conv", 8)],
    [("conv", 3), ("clip", 5)],
    [("clip", 4), ("conv", 32), ("conv", 1)],
    [("conv", 24), ("clip", 1), ("conv", 7), ("clip", 16)],
    [("clip", 2), ("clip", 3), ("conv", 5), ("conv", 5)],
    [("conv", 6), ("const", 3), ("conv", 4)],
]


def concat_graph(rng, dt, operands, consumer):
    """x [2, 8, H, W] (and an input [2, channels, H, W] per "clip" or "input"
    operand) -> operands -> concat (axis 1) -> consumer: "conv" (a 1x1 and a
    3x3 conv), "max_pool", or None (the concat is the output)."""
    g = Graph()
    x = g.add_input("x", TensorType(dt, (2, 8, *SIZE)))
    parts = []
    for index, (kind, channels) in enumerate(operands):
        if kind == "conv":
            parts.append(conv(g, rng, x, dt, 8, channels))
        elif kind == "const":
            parts.append(g.constant(codes(rng, dt, (2, channels, *SIZE))))
        else:
            v = g.add_input(f"x{index}", TensorType(dt, (2, channels, *SIZE)))
            if kind == "clip":
                v = g.add_node("clip", [v], {"min": None, "max": None}).outputs[0]
            parts.append(v)
    y = g.add_node("concat", parts, {"axis": 1}).outputs[0]
    total = sum(c for _, c in operands)
    if consumer == "conv":
        outs = [conv(g, rng, y, dt, total, 8), conv(g, rng, y, dt, total, 5, 3)]
    elif consumer == "max_pool":
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                 "dilations": [1, 1], "ceil_mode": False}  # fmt: skip
        outs = g.add_node("max_pool", [y], attrs).outputs
    else:
        outs = [y]
    g.set_outputs(outs)
    return g


def _inputs(rng, g, count=3):
    """`count` runs' arrays of `g`'s inputs."""
    return [[codes(rng, v.type.dtype, v.type.shape) for v in g.inputs] for _ in range(count)]


def _reads_an_input(g, step) -> bool:
    return any(v in g.inputs for node in step.nodes for v in node.inputs)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("consumer", ["conv", "max_pool", None])
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_concat_matches_the_reference_and_replays(dt, consumer, threads, monkeypatch):
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)  # every call split over threads
    for index, operands in enumerate(OPERANDS):
        rng = np.random.default_rng(index)
        g = concat_graph(rng, dt, operands, consumer)
        cpu, kernels, binding = check_runs(g, _inputs(rng, g), threads)
        (step,) = [s for s in cpu.steps if s.nodes[-1].op == "concat"]
        assert step.name.startswith("concat_channels"), step.name
        assert kernels.count(views.concat_channels) == len(operands), (operands, kernels)
        # the steps reading x run again (convs: they copy it channels-last)
        # or replay on each run's array; the concat and its readers replay
        assert all(_reads_an_input(g, s) for s in binding.rerun_steps + binding.input_steps), (
            operands, [s.name for s in binding.rerun_steps])  # fmt: skip
        if consumer == "max_pool":
            assert pool.max_pool_2d_nhwc in kernels


def test_graph_input_operand_replays_on_each_runs_array():
    """The graph input as an operand (copied in a transposing read): the
    caller's array is a new one every run, and the concat step replays on
    views of it."""
    rng = np.random.default_rng(3)
    g = concat_graph(rng, dtypes.uint8, [("conv", 4), ("input", 8), ("conv", 2)], "conv")
    cpu, kernels, binding = check_runs(g, _inputs(rng, g), 1)
    assert kernels.count(views.concat_channels) == 3
    assert [s.nodes[-1].op for s in binding.input_steps].count("concat") == 1
    assert [s.nodes[-1].op for s in binding.rerun_steps].count("concat") == 0


def test_channel_concat_without_a_channels_last_operand_is_numpy():
    rng = np.random.default_rng(4)
    g = concat_graph(rng, dtypes.int8, [("clip", 3), ("clip", 8)], None)
    cpu, kernels, _ = check_runs(g, _inputs(rng, g), 1)
    assert views.concat_channels not in kernels


@pytest.mark.parametrize("axis", [0, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_other_axes_copy_rows_and_replay(axis, threads, monkeypatch):
    """Any other axis: `concat_rows`, one call per operand, channels-last
    operands read through C-ordered copies; the concat replays when its
    operands are C-ordered (here a clip's results and a constant)."""
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(axis + 10)
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (2, 8, *SIZE)))
    parts = [conv(g, rng, x, dtypes.uint8, 8, 6), conv(g, rng, x, dtypes.uint8, 8, 6)]
    g.set_outputs(g.add_node("concat", parts, {"axis": axis}).outputs)
    cpu, kernels, _ = check_runs(g, _inputs(rng, g), threads)
    assert cpu.steps[-1].name == "concat_rows[uint8]"
    assert kernels.count(views.concat_rows) == 2

    shape = (3, 4, 5)
    g = Graph()
    y = g.add_input("y", TensorType(dtypes.int8, shape))
    y = g.add_node("clip", [y], {"min": None, "max": None}).outputs[0]
    const = g.constant(codes(rng, dtypes.int8, shape))
    g.set_outputs(g.add_node("concat", [y, const, y], {"axis": axis % 3}).outputs)
    cpu, kernels, binding = check_runs(g, _inputs(rng, g), threads)
    assert kernels.count(views.concat_rows) == 3
    assert binding.input_steps == [cpu.steps[0]] and not binding.rerun_steps


@pytest.mark.parametrize("threads", [1, 2])
def test_inception_block_replays(threads, monkeypatch):
    """Inception's block: an average pool and 1x1 / 3x3 branches of one
    conv's result, concatenated, then read by a conv and a max pool (whose
    results are concatenated again): every step but the first replays."""
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(9)
    dt = dtypes.uint8
    g = Graph()
    x = g.add_input("x", TensorType(dt, (1, 8, 12, 12)))
    stem = conv(g, rng, x, dt, 8, 24, 3)
    pooled = qaverage_pool(g, rng, stem, dt, POOLS[0], SCALES[0], (12, 12))
    narrow = conv(g, rng, stem, dt, 24, 6)
    branches = [conv(g, rng, stem, dt, 24, 8), conv(g, rng, narrow, dt, 6, 8, 3),
                conv(g, rng, pooled, dt, 24, 8)]  # fmt: skip
    block = g.add_node("concat", branches, {"axis": 1}).outputs[0]
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1],
             "ceil_mode": False}  # fmt: skip
    reduced = [
        conv(g, rng, block, dt, 24, 16, 3, 2),
        g.add_node("max_pool", [block], attrs).outputs[0],
    ]
    g.set_outputs(g.add_node("concat", reduced, {"axis": 1}).outputs)
    cpu, kernels, binding = check_runs(
        g, [codes(rng, dt, (1, 8, 12, 12)) for _ in range(3)], threads
    )
    assert pool.qaverage_pool_2d_nhwc in kernels
    assert kernels.count(views.concat_channels) == 5
    # a conv reading x copies it channels-last: it runs again
    assert binding.rerun_steps == [cpu.steps[0]], [s.name for s in binding.rerun_steps]
