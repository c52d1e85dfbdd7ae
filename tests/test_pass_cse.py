"""Common-subexpression elimination (qnnjit/compiler/passes/cse.py): equal op,
operands (the same value, or constants equal bit for bit) and attributes
(compared structurally) make one node; near-misses stay apart."""

import numpy as np
import pytest

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.cse import Incomparable, attr_key, cse
from qnnjit.ir import Graph, QuantParams, TensorType, dtypes
from qnnjit.ir.verifier import verify

X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
X[0, 0] = -0.0


def run(graph: Graph) -> list[np.ndarray]:
    return ReferenceExecutor(graph).run([X])


def twin_graph(c1, c2, attrs1=None, attrs2=None, op="add") -> Graph:
    """y = op(relu(x), c1) * op(relu(x), c2): relu is duplicated."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3, 4)))
    r1 = g.add_node("relu", [x], name="r1").outputs[0]
    r2 = g.add_node("relu", [x], name="r2").outputs[0]
    a1 = g.add_node(op, [r1, g.constant(c1, "c1")], attrs1, name="a1").outputs[0]
    a2 = g.add_node(op, [r2, g.constant(c2, "c2")], attrs2, name="a2").outputs[0]
    y = g.add_node("mul", [a1, a2], name="y").outputs[0]
    g.set_outputs([y])
    return g


def test_equal_nodes_merge_through_a_chain():
    c = np.array([1.0, np.nan, -2.0, 0.5], np.float32)
    reference = run(twin_graph(c, c.copy()))
    g = twin_graph(c, c.copy())  # two constant values, equal bit for bit (NaN included)
    assert cse(g)
    verify(g)
    assert g.op_counts() == {"add": 1, "mul": 1, "relu": 1}
    assert "%y = mul(%a1, %a1) : float32[3x4]" in str(g)
    np.testing.assert_array_equal(run(g)[0], reference[0])
    assert not cse(g)


def test_constants_equal_by_value_but_not_by_bits_stay_apart():
    # 0.0 and -0.0 compare equal but add(-0.0, c) differs: -0.0 + 0.0 = 0.0
    g = twin_graph(np.zeros(4, np.float32), np.full(4, -0.0, np.float32))
    assert cse(g)  # the relus still merge
    assert g.op_counts() == {"add": 2, "mul": 1, "relu": 1}


def test_constants_of_another_shape_stay_apart():
    g = twin_graph(np.ones(4, np.float32), np.ones((1, 4), np.float32))
    cse(g)
    assert g.op_counts()["add"] == 2


def conv_twins(attrs1, attrs2) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (1, 2, 5, 5)))
    w = g.constant(np.ones((3, 2, 3, 3), np.float32), "w")
    c1 = g.add_node("conv", [x, w], attrs1, name="c1").outputs[0]
    c2 = g.add_node("conv", [x, w], attrs2, name="c2").outputs[0]
    g.set_outputs([g.add_node("add", [c1, c2], name="y").outputs[0]])
    return g


CONV = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}


def test_attributes_compare_structurally():
    g = conv_twins(CONV, {**CONV, "strides": (1, 1), "pads": (1, 1, 1, 1)})  # tuple == list
    assert cse(g)
    assert g.op_counts() == {"add": 1, "conv": 1}
    g = conv_twins(CONV, {**CONV, "pads": [2, 1, 0, 1]})  # same output shape
    assert not cse(g)
    assert attr_key(np.array([1, 2], np.int64)) == attr_key(np.array([1, 2], np.int64))
    assert attr_key(np.array([1, 2], np.int64)) != attr_key(np.array([1, 2], np.int32))
    assert attr_key({"d": dtypes.int8, "t": (1, [2.5])}) == attr_key(
        {"t": [1, (2.5,)], "d": dtypes.int8}
    )
    assert attr_key(dtypes.int8) != attr_key(dtypes.uint8)
    assert attr_key(1) != attr_key(1.0) != attr_key(True)
    assert attr_key(float("nan")) == attr_key(float("nan"))
    assert attr_key(0.0) != attr_key(-0.0)
    assert attr_key(QuantParams(0.5, 1, dtypes.uint8)) == attr_key(
        QuantParams(0.5, 1, dtypes.uint8)
    )


@pytest.mark.parametrize("value", [{1, 2}, np.array([object()])])
def test_incomparable_attributes_never_merge(value):
    with pytest.raises(Incomparable):
        attr_key(value)
    g = twin_graph(np.ones(4, np.float32), np.ones(4, np.float32), {"note": value}, {"note": value})
    assert cse(g)  # the relus merge, the adds cannot be compared
    assert g.op_counts()["add"] == 2


def quantize_twins(dtype1, dtype2) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3, 4)))
    s = g.constant(np.float32(0.1), "s")
    outs = []
    for name, dtype in (("q1", dtype1), ("q2", dtype2)):
        attrs = {"dtype": dtype, "axis": 1, "block_size": 0, "saturate": True,
                 "precision": dtypes.float32}  # fmt: skip
        outs.append(g.add_node("quantize", [x, s], attrs, name=name).outputs[0])
    g.set_outputs(outs)
    return g


def test_graph_outputs_keep_their_names():
    g = quantize_twins(dtypes.int8, dtypes.int8)
    assert not cse(g)  # both compute a named output: both stay
    assert [v.name for v in g.outputs] == ["q1", "q2"]

    g = twin_graph(np.ones(4, np.float32), np.ones(4, np.float32))
    reference = run(g)
    g.set_outputs([g.outputs[0], g.value("a2")])  # the later twin is an output
    assert cse(g)
    verify(g)
    assert g.op_counts() == {"add": 1, "mul": 1, "relu": 1}
    assert [v.name for v in g.outputs] == ["y", "a2"]
    assert "%y = mul(%a2, %a2)" in str(g)
    np.testing.assert_array_equal(run(g)[0], reference[0])


def test_different_dtype_attribute_stays_apart():
    g = quantize_twins(dtypes.int8, dtypes.uint8)
    g.set_outputs([g.add_node("identity", [v]).outputs[0] for v in g.outputs])
    assert not cse(g)
    assert g.op_counts()["quantize"] == 2


def test_different_declared_output_types_stay_apart():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.int8, (4,)))
    t1 = TensorType(dtypes.int8, (4,), QuantParams(0.5, 0, dtypes.int8))
    t2 = TensorType(dtypes.int8, (4,), QuantParams(0.25, 0, dtypes.int8))
    a = g.add_node("identity", [x], output_types=[t1]).outputs[0]
    b = g.add_node("identity", [x], output_types=[t2]).outputs[0]
    g.set_outputs([g.add_node("max", [a, b], name="y").outputs[0]])
    assert not cse(g)
    assert g.op_counts()["identity"] == 2
