"""Constant folding (qnnjit/compiler/passes/constant_folding.py): all-constant
nodes become constants, computed by the reference semantics, so outputs are
bit-identical; `dequantize` folds only in the run after QDQ canonicalization;
graph outputs stay node outputs; a node whose evaluation fails is left alone."""

import numpy as np

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.constant_folding import (
    constant_folding,
    constant_folding_with_dequantize,
)
from qnnjit.ir import Graph, QuantParams, TensorType, dtypes, ops
from qnnjit.ir.verifier import verify

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4)).astype(np.float32)

Q_ATTRS = {"dtype": dtypes.int8, "axis": 1, "block_size": 0, "saturate": True,
           "precision": dtypes.float32}  # fmt: skip
DQ_ATTRS = {"axis": 1, "block_size": 0, "dtype": dtypes.float32}


def run(graph: Graph) -> np.ndarray:
    return ReferenceExecutor(graph).run([X])[0]


def chain_graph() -> Graph:
    """y = x + (-c1) * c2: neg and mul read only constants."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3, 4)))
    c1 = g.constant(np.arange(4, dtype=np.float32), "c1")
    c2 = g.constant(np.full(4, 0.1, np.float32), "c2")
    n = g.add_node("neg", [c1], name="n").outputs[0]
    p = g.add_node("mul", [n, c2], name="p").outputs[0]
    y = g.add_node("add", [x, p], name="y").outputs[0]
    g.set_outputs([y])
    return g


def test_folds_a_chain_of_constant_nodes_in_one_run():
    reference = run(chain_graph())
    g = chain_graph()
    assert constant_folding(g)
    verify(g)
    assert g.op_counts() == {"add": 1}
    assert str(g) == (  # the folded constant keeps the name of the value it replaces
        "graph main(%x: float32[3x4]) -> (%y) {\n"
        "  %y = add(%x, %p=[-0. ,-0.1,-0.2,-0.3]) : float32[3x4]\n"
        "}"
    )
    np.testing.assert_array_equal(run(g), reference)
    assert not constant_folding(g)


def qdq_weight_graph() -> Graph:
    """y = x + DQ(Q(w)): a float weight quantized in the graph."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3, 4)))
    w = g.constant(np.array([0.3, -1.2, 0.05, 2.0], np.float32), "w")
    scale = g.constant(np.float32(0.02), "s")
    zp = g.constant(np.int8(3), "zp")
    q = g.add_node("quantize", [w, scale, zp], Q_ATTRS, name="q").outputs[0]
    d = g.add_node("dequantize", [q, scale, zp], DQ_ATTRS, name="dq").outputs[0]
    y = g.add_node("add", [x, d], name="y").outputs[0]
    g.set_outputs([y])
    return g


def test_quantize_folds_keeping_its_type_and_dequantize_stays():
    reference = run(qdq_weight_graph())
    g = qdq_weight_graph()
    assert constant_folding(g)
    verify(g)
    assert g.op_counts() == {"add": 1, "dequantize": 1}
    folded = g.value("q")
    assert folded.is_constant
    assert folded.type.quant == QuantParams(0.02, 3, dtypes.int8)
    np.testing.assert_array_equal(run(g), reference)
    assert not constant_folding(g)  # DQ of a constant weight is kept for canonicalization


def test_dequantize_folds_after_canonicalization():
    reference = run(qdq_weight_graph())
    g = qdq_weight_graph()
    assert constant_folding_with_dequantize(g)
    verify(g)
    assert g.op_counts() == {"add": 1}
    assert g.value("dq").const.dtype == np.float32
    np.testing.assert_array_equal(run(g), reference)


def test_node_with_a_non_constant_operand_is_kept():
    g = chain_graph()
    constant_folding(g)
    assert not constant_folding(g)
    assert g.op_counts() == {"add": 1}


def test_graph_output_stays_a_node_output():
    g = Graph()
    g.add_input("x", TensorType(dtypes.float32, (3, 4)))
    c = g.constant(np.ones(4, np.float32), "c")
    y = g.add_node("neg", [c], name="y").outputs[0]
    g.set_outputs([y])
    assert not constant_folding(g)
    assert g.op_counts() == {"neg": 1}
    assert [v.name for v in g.outputs] == ["y"]


def test_node_whose_evaluation_fails_is_left_for_run_time(monkeypatch):
    def broken(inputs, attrs):
        raise FloatingPointError("boom")

    g = chain_graph()
    monkeypatch.setattr(ops.get("neg"), "evaluate", broken)
    assert not constant_folding(g)
    assert g.op_counts() == {"add": 1, "mul": 1, "neg": 1}
