"""The CPU backend's data movement (`backends/cpu/kernels/views.py`): the
transpose copy kernel and gather of one constant index, against the
reference semantics, element for element; both replayed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.kernels import _threads, views
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType


def _graph(dtype, shape, op, attrs, extra=()):
    """x -> clip (so the op reads no graph input and may replay) -> op -> y."""
    g = Graph()
    x = g.add_input("x", TensorType(dtype, shape))
    if dtype == dtypes.bool_:
        x = g.add_node("not", [x]).outputs[0]
    elif dtype.is_int:
        x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    else:
        x = g.add_node("relu", [x]).outputs[0]
    node = g.add_node(op, [x, *(g.constant(e, "index") for e in extra)], attrs)
    g.set_outputs(node.outputs)
    return g


def _values(rng, dtype, shape):
    if dtype == dtypes.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.is_int:
        info = np.iinfo(dtype.numpy)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype.numpy)
    return np.abs(rng.standard_normal(shape)).astype(dtype.numpy)  # relu keeps them


def check(g, arrays, threads=1):
    """CPU == reference on every array; returns the executor and the
    `run_tasks` calls of the first run."""
    cpu = CpuExecutor(g, num_threads=threads, warmup=False)
    op = g.outputs[0].producer.op
    assert not [node for node, _ in cpu.declined if node.op == op], cpu.describe()
    ref = ReferenceExecutor(g)
    first = None
    for index, x in enumerate(arrays):
        with _threads.recording() as calls:
            got = cpu.run([x])[0]
        first = calls if first is None else first
        want = ref.run([x])[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"input {index}")
    return cpu, first


SHAPES = [(5,), (3, 4), (2, 1, 3), (2, 3, 4, 5), (2, 1, 3, 1, 4), (3, 2, 2, 3, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_transpose_matches_the_reference_for_every_permutation(shape, threads, monkeypatch):
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(len(shape))
    for perm in itertools.permutations(range(len(shape))):
        g = _graph(dtypes.uint8, shape, "transpose", {"perm": list(perm)})
        x = _values(rng, dtypes.uint8, shape)
        _, calls = check(g, [x, x[::-1].copy()], threads)
        kernels = [c.kernel for c in calls]
        merged = views.transpose_plan(shape, perm)
        copied = merged is not None and not np.transpose(x, perm).flags.c_contiguous
        assert kernels.count(views.transpose_rows) == copied, (perm, kernels)


@pytest.mark.parametrize(
    "dtype", [dtypes.int8, dtypes.uint16, dtypes.int32, dtypes.int64, dtypes.float32, dtypes.bool_],
    ids=str,
)  # fmt: skip
def test_transpose_copies_every_element_width(dtype):
    g = _graph(dtype, (2, 3, 4), "transpose", {"perm": [2, 0, 1]})
    rng = np.random.default_rng(7)
    check(g, [_values(rng, dtype, (2, 3, 4)) for _ in range(3)])


def test_transpose_plan_merges_what_stays_contiguous():
    # attention's [b, t, 3, h, d] -> [3, b, h, t, d]: b drops out, (3, h) are
    # adjacent in the source and merge, d stays innermost
    dims, strides = views.transpose_plan((1, 197, 3, 3, 64), [2, 0, 3, 1, 4])
    assert dims.tolist() == [1, 9, 197, 64] and strides.tolist() == [0, 64, 576, 1]
    # [0, 1] kept together merge into one dim
    dims, strides = views.transpose_plan((4, 5, 6), [2, 0, 1])
    assert dims.tolist() == [1, 1, 6, 20] and strides.tolist() == [0, 0, 1, 6]
    assert views.transpose_plan((2, 3, 2, 3, 2), [4, 3, 2, 1, 0]) is None  # five dims left


def test_attention_transpose_and_gathers_are_replayed():
    """qkv [b, t, 3, h, d] -> transpose -> q, k, v = gather 0, 1, 2: the
    transpose is a recorded kernel call, each gather a view of its slice."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 7, 3, 2, 4)))
    x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    t = g.add_node("transpose", [x], {"perm": [2, 0, 3, 1, 4]}).outputs[0]
    outs = []
    for i in range(3):
        index = g.constant(np.array(i, np.int64), "i")
        outs.append(g.add_node("gather", [t, index], {"axis": 0}).outputs[0])
    g.set_outputs(outs)
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert not cpu.declined, cpu.describe()
    ref = ReferenceExecutor(g)
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = _values(rng, dtypes.uint8, (1, 7, 3, 2, 4))
        for got, want in zip(cpu.run([x]), ref.run([x]), strict=True):
            np.testing.assert_array_equal(got, want)
    (binding,) = next(iter(cpu._bindings.values()))
    assert [s.name for s in binding.input_steps] == ["clip_flat[uint8]"], binding.input_steps
    assert binding.replayed_steps == 5 and not binding.rerun_steps


def test_a_channels_last_result_flattened_and_transposed_is_not_copied():
    """A ViT's patch embedding: conv (NHWC memory) -> reshape [N, C, H*W] ->
    transpose [N, H*W, C], which is the conv's memory as it is: both steps
    are views of it, replayed, with no copy kernel and no executor copy.
    (The conv itself re-runs: it transposes its NCHW operand per call.)"""
    from qnnjit.backends.cpu.kernels import conv_nhwc

    rng = np.random.default_rng(9)
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 16, 5, 6)))
    x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    w = g.constant(rng.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8))
    zero_x, zero_w = g.constant(np.uint8(3)), g.constant(np.zeros(32, np.int8))
    conv = g.add_node("qconv", [x, w, zero_x, zero_w], {"strides": (1, 1), "pads": (1, 1, 1, 1),
                      "dilations": (1, 1), "group": 1}).outputs[0]  # fmt: skip
    mult, zp = g.constant(np.float32(1e-3)), g.constant(np.uint8(100))
    y = g.add_node("requantize", [conv, mult, zp], {"dtype": dtypes.uint8,
                   "rounding": "half_even_float", "axis": None}).outputs[0]  # fmt: skip
    y = g.add_node("reshape", [y], {"shape": [1, 32, 30], "allowzero": 0}).outputs[0]
    y = g.add_node("transpose", [y], {"perm": [0, 2, 1]}).outputs[0]
    g.set_outputs(g.add_node("clip", [y], {"min": 5, "max": 250}).outputs)
    arrays = [_values(rng, dtypes.uint8, (1, 16, 5, 6)) for _ in range(4)]
    cpu, calls = check(g, arrays)
    kernels = [c.kernel for c in calls]
    assert views.transpose_rows not in kernels
    # the conv's requantizing kernel (its A rows by address, where the ISA has them)
    requantizing = conv_nhwc.conv_gemm_nhwc_requant, conv_nhwc.conv_gemm_nhwc_by_address
    assert any(kernel in kernels for kernel in requantizing), kernels
    (binding,) = next(iter(cpu._bindings.values()))
    views_ = [s for s in cpu.steps if s.name in ("view:reshape", "transpose[[0, 2, 1]]")]
    assert len(views_) == 2, cpu.describe()
    assert not [s for s in binding.rerun_steps if s in views_], binding.rerun_steps


@pytest.mark.parametrize(
    "shape, axis, index",
    [((3, 4, 5), 0, 2), ((3, 4, 5), 0, -1), ((1, 4, 5), 1, 3), ((3, 4, 5), 1, -4),
     ((3, 4, 5), 2, 0), ((3, 4, 5), 1, np.array([2]))],
)  # fmt: skip
def test_gather_of_one_index_matches_the_reference(shape, axis, index):
    g = _graph(dtypes.int8, shape, "gather", {"axis": axis}, [np.asarray(index, np.int64)])
    rng = np.random.default_rng(5)
    check(g, [_values(rng, dtypes.int8, shape) for _ in range(3)])


def test_gather_index_out_of_range_is_an_error():
    g = _graph(dtypes.int8, (3, 4), "gather", {"axis": 0}, [np.array(3, np.int64)])
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    with pytest.raises(Exception, match="out of range"):
        cpu.run([np.zeros((3, 4), np.int8)])


def test_gather_of_several_indices_falls_back():
    g = _graph(dtypes.int8, (3, 4), "gather", {"axis": 0}, [np.array([0, 2], np.int64)])
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert [s.name for s in cpu.steps][-1] == "reference:gather"
