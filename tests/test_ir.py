"""The IR core: validated types, the graph API, the printer and the verifier."""

import pickle

import numpy as np
import pytest

from qnnjit.errors import VerificationError
from qnnjit.ir import Accumulator, Graph, QuantParams, TensorType, dtypes
from qnnjit.ir.verifier import verify


def test_dtype_ranges():
    assert (dtypes.int4.qmin, dtypes.int4.qmax) == (-8, 7)
    assert (dtypes.uint2.qmin, dtypes.uint2.qmax) == (0, 3)
    assert (dtypes.int16.qmin, dtypes.uint16.qmax) == (-32768, 65535)
    assert dtypes.float8e4m3fn.max_finite == 448.0
    assert dtypes.float8e5m2.max_finite == 57344.0
    assert dtypes.float4e2m1.max_finite == 6.0
    assert dtypes.from_numpy(np.int8) is dtypes.int8
    with pytest.raises(TypeError, match="not an integer type"):
        _ = dtypes.float32.qmin


def test_quant_params_are_validated_values():
    a = QuantParams(0.5, 3, dtypes.uint8)
    assert a == QuantParams(np.float32(0.5), np.int64(3), dtypes.uint8)
    assert hash(a) == hash(QuantParams(0.5, 3, dtypes.uint8))
    assert a != QuantParams(0.5, 4, dtypes.uint8)
    assert str(a) == "q<uint8:float32, 0.5:3>"
    per_axis = QuantParams([0.1, 0.2], [0, 0], dtypes.int8, axis=0)
    assert not per_axis.per_tensor
    with pytest.raises(ValueError, match="outside the range"):
        QuantParams(0.5, 300, dtypes.uint8)
    with pytest.raises(ValueError, match="finite and positive"):
        QuantParams(0.0, 0, dtypes.int8)
    with pytest.raises(ValueError, match="per-tensor"):
        QuantParams([0.1, 0.2], [0, 0], dtypes.int8)
    with pytest.raises(ValueError, match="not a quantized storage type"):
        QuantParams(1.0, 0, dtypes.float32)
    with pytest.raises(ValueError):
        a.scale[()] = 2.0  # frozen arrays


def test_tensor_and_accumulator_types():
    t = TensorType(dtypes.uint8, ("N", 3, 8, 8), QuantParams(0.5, 3, dtypes.uint8))
    assert str(t) == "uint8[Nx3x8x8] q<uint8:float32, 0.5:3>"
    assert not t.is_static and t.rank == 4
    acc = TensorType(dtypes.int32, (2, 4), accumulator=Accumulator(32, -100, 200))
    assert str(acc) == "int32[2x4] acc<i32, range=[-100, 200]>"
    with pytest.raises(ValueError):
        Accumulator(24)
    with pytest.raises(ValueError):
        Accumulator(32, 5, 1)
    with pytest.raises(ValueError, match="cannot carry"):
        TensorType(dtypes.int8, (1,), QuantParams(0.5, 3, dtypes.uint8))


def _small_graph():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, ("N", 4)))
    w = g.constant(np.ones((4,), np.float32), "w")
    a = g.add_node("add", [x, w], name="a").outputs[0]
    b = g.add_node("mul", [a, a], name="b").outputs[0]
    dead = g.add_node("sub", [a, w], name="dead")
    g.set_outputs([b])
    return g, x, w, a, b, dead


def test_graph_api_users_replace_and_dce():
    g, x, w, a, b, dead = _small_graph()
    assert g.producer(a).name == "a"
    assert [n.name for n in g.users(a)] == ["b", "dead"]
    assert [n.name for n in g.nodes] == ["a", "b", "dead"]
    assert g.dead_code_elimination()
    assert [n.name for n in g.nodes] == ["a", "b"]
    assert not g.dead_code_elimination()
    g.replace_all_uses(a, x)
    assert g.users(a) == []
    assert g.dead_code_elimination()
    assert [n.name for n in g.nodes] == ["b"]
    assert g.nodes[0].inputs == [x, x]
    verify(g)


def test_a_pickled_graph_keeps_its_structure():
    g, x, w, a, b, dead = _small_graph()
    g.metadata["_cache"] = object()  # a cache beside the graph: not pickled
    g.metadata["kept"] = [1, 2]
    copy = pickle.loads(pickle.dumps(g))
    assert str(copy) == str(g)
    assert copy.metadata == {"kept": [1, 2]}
    a2 = copy.value("a")
    assert copy.producer(a2).name == "a" and copy.producer(copy.inputs[0]) is None
    assert [n.name for n in copy.users(a2)] == ["b", "dead"]
    fresh = copy.add_node("add", [a2, a2], name="a")  # names continue where g's stopped
    assert fresh.name not in ("a", "b", "dead") and fresh.outputs[0].name != "a"
    assert copy.dead_code_elimination()
    assert [n.name for n in copy.nodes] == ["a", "b"]
    verify(copy)


def test_a_deep_graph_pickles_without_recursing_per_node():
    """Pickle used to follow value -> producer -> input links once per node
    and overflowed Python's stack past ~300 chained nodes."""
    g = Graph()
    y = g.add_input("x", TensorType(dtypes.float32, (1, 4)))
    for _ in range(3000):
        y = g.add_node("relu", [y]).outputs[0]
    g.set_outputs([y])
    copy = pickle.loads(pickle.dumps(g))
    assert len(copy) == 3000
    assert copy.outputs[0].producer is copy.nodes[-1]
    assert copy.nodes[0].inputs[0] is copy.inputs[0]


def test_type_inference_broadcasts_symbolic_dims():
    g, *_ = _small_graph()
    assert str(g.nodes[0].outputs[0].type) == "float32[Nx4]"


def test_type_inference_error_names_the_node():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3,)))
    y = g.add_input("y", TensorType(dtypes.float32, (4,)))
    with pytest.raises(ValueError, match="'bad'.*do not broadcast"):
        g.add_node("add", [x, y], name="bad")


def test_printer_is_deterministic():
    g, *_ = _small_graph()
    text = str(g)
    assert text == str(g)
    assert "%a = add(%x, %w=[1.,1.,1.,1.]) : float32[Nx4]" in text
    assert text.startswith("graph main(%x: float32[Nx4]) -> (%b) {")


def test_verifier_catches_a_wrong_type():
    g, x, w, a, b, dead = _small_graph()
    a.type = TensorType(dtypes.float32, (5,))
    with pytest.raises(VerificationError, match="typed float32"):
        verify(g)


def test_verifier_matches_a_rebuilt_nodes_fresh_dims():
    """A strided conv's output dims over symbolic input dims are fresh symbols
    named after the node; a pass that rebuilds the node under a new name and
    keeps the value's type must verify, while a wrong rank or a static dim
    where a symbol belongs still fails."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, ("n", 4, "h", "w")))
    w = g.constant(np.ones((4, 1, 3, 3), np.int8), "w")
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 4}
    first = g.add_node("qconv", [x, w], attrs, name="dw")
    assert "dw." in str(first.outputs[0].type)  # fresh symbols, named after "dw"
    again = g.add_node("qconv", [x, w], attrs, name="dw", output_types=[first.outputs[0].type])
    assert again.name != "dw"
    g.set_outputs([first.outputs[0], again.outputs[0]])
    verify(g)
    again.outputs[0].type = TensorType(dtypes.int32, ("n", 4, 3, "dw.d3"))
    with pytest.raises(VerificationError, match="typed int32"):
        verify(g)


def test_unknown_op_is_a_clear_error():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (3,)))
    with pytest.raises(NotImplementedError, match="no op 'frobnicate'"):
        g.add_node("frobnicate", [x])
