"""The elementwise_tables pass: chains of elementwise ops on one 8-bit tensor
become one table lookup, bit-identical to the chain (reference interpreter),
and everything else is left alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.elementwise_tables import elementwise_tables
from qnnjit.ir import Graph, TensorType, dtypes
from qnnjit.ir.verifier import verify

I8, U8, I16, F32 = dtypes.int8, dtypes.uint8, dtypes.int16, dtypes.float32


def codes(dtype, shape) -> np.ndarray:
    """Every code of `dtype`, in `shape` (its size must be the code count)."""
    return np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy).reshape(shape)


def check_exact(build, feeds, *, expect_change=True) -> Graph:
    """Build twice, run the pass on one copy, verify it and compare every
    output bit for bit with the untouched copy; returns the rewritten graph."""
    reference, rewritten = build(), build()
    assert elementwise_tables(rewritten) == expect_change
    verify(rewritten, context="after elementwise_tables")
    want = ReferenceExecutor(reference).run(list(feeds))
    got = ReferenceExecutor(rewritten).run(list(feeds))
    for w, g in zip(want, got, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    return rewritten


class Builder:
    """A graph under construction, with short forms of the quantized ops."""

    def __init__(self, x_dtype, shape):
        self.g = Graph()
        self.x = self.g.add_input("x", TensorType(x_dtype, shape))

    def const(self, value, dtype):
        return self.g.constant(np.asarray(value, dtype=dtype.numpy), "c")

    def node(self, op, inputs, attrs=None):
        return self.g.add_node(op, inputs, attrs or {}).outputs[0]

    def dq(self, q, scale, zp):
        attrs = {"axis": 1, "block_size": 0, "dtype": F32}
        return self.node(
            "dequantize", [q, self.const(scale, F32), self.const(zp, q.type.dtype)], attrs
        )

    def q(self, v, scale, zp, dtype):
        attrs = {"dtype": dtype, "axis": 1, "block_size": 0, "saturate": True, "precision": F32}
        return self.node("quantize", [v, self.const(scale, F32), self.const(zp, dtype)], attrs)

    def qbinary(self, op, a, a_params, b, b_params, out_params):
        dtype = a.type.dtype
        inputs = [a, self.const(a_params[0], F32), self.const(a_params[1], dtype)]
        inputs += [b, self.const(b_params[0], F32), self.const(b_params[1], dtype)]
        inputs += [self.const(out_params[0], F32), self.const(out_params[1], dtype)]
        rounding = "mlas_fma" if op == "qadd" else "mlas"
        return self.node(op, inputs, {"rounding": rounding})

    def outputs(self, *values) -> Graph:
        self.g.set_outputs(list(values))
        return self.g


def gelu_graph(dtype, x_scale, x_zp, shape=(2, 128), keep_erf=False):
    """A QDQ GELU as ONNX Runtime's quantizer leaves it (after qdq_to_integer):
    DQ -> div(sqrt 2) -> erf -> Q -> qadd(., 1) -> qmul(x, .) -> qmul(., 0.5)."""
    x_params = (x_scale, x_zp)

    def build():
        b = Builder(dtype, shape)
        e = b.node("div", [b.dq(b.x, *x_params), b.const(math.sqrt(2), F32)])
        e = b.node("erf", [e], {"algorithm": "ort_mlas"})
        e_params = (np.float32(2 / 255), 127 if dtype == U8 else 0)
        eq = b.q(e, *e_params, dtype)
        one = b.const(255 if dtype == U8 else 127, dtype)
        one_params = (np.float32(1 / 255 if dtype == U8 else 1 / 127), 0)
        plus_params = (np.float32(2 / 255), 0)
        plus = b.qbinary("qadd", eq, e_params, one, one_params, plus_params)
        prod_params = (np.float32(x_scale * 1.1), x_zp)
        prod = b.qbinary("qmul", b.x, x_params, plus, plus_params, prod_params)
        half = b.const(255 if dtype == U8 else 127, dtype)
        half_params = (np.float32(0.5 / 255 if dtype == U8 else 0.5 / 127), 0)
        out_params = (np.float32(x_scale * 0.6), x_zp)
        y = b.qbinary("qmul", prod, prod_params, half, half_params, out_params)
        return b.outputs(y, eq) if keep_erf else b.outputs(y)

    return build


@pytest.mark.parametrize(
    "dtype, x_scale, x_zp",
    [(U8, 0.0625, 128), (U8, 0.021964, 127), (I8, 0.03125, 0), (I8, 0.0471, -5)],
)
def test_gelu_chain_becomes_one_lookup(dtype, x_scale, x_zp):
    build = gelu_graph(dtype, np.float32(x_scale), x_zp)
    assert build().op_counts() == {
        "dequantize": 1, "div": 1, "erf": 1, "quantize": 1, "qadd": 1, "qmul": 2,
    }  # fmt: skip
    g = check_exact(build, [codes(dtype, (2, 128))])
    assert g.op_counts() == {"lookup": 1}
    (lookup,) = g.nodes
    assert lookup.inputs[0] is g.inputs[0]


def test_a_chain_value_read_outside_gets_its_own_lookup():
    build = gelu_graph(U8, np.float32(0.05), 120, keep_erf=True)
    g = check_exact(build, [codes(U8, (2, 128))])
    assert g.op_counts() == {"lookup": 2}
    assert all(n.inputs[0] is g.inputs[0] for n in g.nodes)


def test_a_chain_value_read_by_another_node_gets_its_own_lookup():
    def build():
        b = Builder(U8, (2, 128))
        y = b.g.add_input("y", TensorType(U8, (2, 128)))
        t = b.q(b.node("tanh", [b.dq(b.x, 0.05, 128)]), 1 / 128, 128, U8)
        return b.outputs(b.qbinary("qadd", t, (1 / 128, 128), y, (0.1, 100), (0.1, 110)))

    g = check_exact(build, [codes(U8, (2, 128)), codes(U8, (2, 128))[:, ::-1].copy()])
    assert g.op_counts() == {"lookup": 1, "qadd": 1}


def test_the_identity_is_no_node():
    def build():
        b = Builder(I8, (2, 128))
        same = b.q(b.dq(b.x, 0.25, 3), 0.25, 3, I8)
        return b.outputs(b.node("transpose", [same], {"perm": [1, 0]}))

    g = check_exact(build, [codes(I8, (2, 128))])
    assert g.op_counts() == {"transpose": 1}
    assert g.nodes[0].inputs[0] is g.inputs[0]


def test_a_graph_output_keeps_its_name():
    """Callers read results by name; an identity table still makes a node."""

    def build():
        b = Builder(I8, (256,))
        return b.outputs(b.q(b.dq(b.x, 0.25, 3), 0.25, 3, I8))

    name = build().outputs[0].name
    g = check_exact(build, [codes(I8, (256,))])
    assert g.op_counts() == {"lookup": 1} and g.outputs[0].name == name


def test_float_readers_keep_their_nodes():
    """A float value of the chain read elsewhere stays; only the integer
    result becomes a lookup, and a chain ending in floats is not rewritten."""

    def build():
        b = Builder(U8, (4, 64))
        s = b.node("sigmoid", [b.dq(b.x, 0.1, 128)])
        return b.outputs(b.q(s, 1 / 256, 0, U8), s)

    g = check_exact(build, [codes(U8, (4, 64))])
    assert g.op_counts() == {"dequantize": 1, "lookup": 1, "sigmoid": 1}

    def float_only():
        b = Builder(U8, (4, 64))
        return b.outputs(b.node("tanh", [b.dq(b.x, 0.1, 128)]))

    check_exact(float_only, [codes(U8, (4, 64))], expect_change=False)


# Shapes of 256 elements: a per-position constant then also fits the table's
# evaluation, so only the pass's checks keep it from being tabled.


def _per_channel_scale(b):
    attrs = {"axis": 0, "block_size": 0, "dtype": F32}
    scale = b.const(np.linspace(0.05, 0.5, 256), F32)
    return b.node("dequantize", [b.x, scale, b.const(np.arange(256), U8)], attrs)


def _per_position_constant(b):
    return b.node("add", [b.dq(b.x, 0.1, 128), b.const(np.linspace(-3, 3, 256), F32)])


def _broadcast_up(b):
    return b.node("add", [b.dq(b.x, 0.1, 128), b.const(np.zeros((1, 1)), F32)])


def _two_roots(b):
    y = b.g.add_input("y", TensorType(U8, (256,)))
    return b.node("add", [b.dq(b.x, 0.1, 128), b.dq(y, 0.2, 128)])


@pytest.mark.parametrize(
    "make",
    [_per_channel_scale, _per_position_constant, _broadcast_up, _two_roots],
    ids=lambda f: f.__name__,
)
def test_not_elementwise_in_one_code_is_left_alone(make):
    def build():
        b = Builder(U8, (256,))
        return b.outputs(b.q(make(b), 0.05, 100, U8))

    feeds = [codes(U8, (256,))]
    if make is _two_roots:
        feeds.append(codes(U8, (256,))[::-1].copy())
    check_exact(build, feeds, expect_change=False)


def test_one_lookup_or_clip_of_the_root_stays():
    def build():
        b = Builder(U8, (256,))
        clip = b.node("clip", [b.x, b.const(3, U8), b.const(250, U8)])
        table = b.const(np.arange(256)[::-1], U8)
        return b.outputs(clip, b.node("lookup", [b.x, table]))

    check_exact(build, [codes(U8, (256,))], expect_change=False)


def test_sixteen_bit_codes_are_not_tabled():
    def build():
        b = Builder(I16, (64,))
        return b.outputs(b.q(b.dq(b.x, 0.1, 0), 0.3, 0, I16))

    check_exact(build, [np.arange(-32, 32, dtype=np.int16)], expect_change=False)


@pytest.mark.parametrize(
    "shape, feed_shape, tabled",
    [
        ((2, 128), (2, 128), True),  # "scalar1" in the graph and in the table
        ((256, 1), (256, 1), False),  # the trailing 1 makes the constant MLAS's A: "scalar0"
        (("n", 256), (1, 256), True),  # the same mode at every n
        ((256, "n"), (256, 1), False),  # "scalar0" at n = 1, "scalar1" above
    ],
)
def test_qadd_joins_only_with_the_tables_operand_order(shape, feed_shape, tabled):
    def build():
        b = Builder(U8, shape)
        one = b.const([255], U8)
        return b.outputs(b.qbinary("qadd", b.x, (0.1, 128), one, (1 / 255, 0), (0.11, 120)))

    g = check_exact(build, [codes(U8, feed_shape)], expect_change=tabled)
    assert g.op_counts() == ({"lookup": 1} if tabled else {"qadd": 1})
