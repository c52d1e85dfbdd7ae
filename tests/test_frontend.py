"""ONNX frontend behaviour beyond single ops: initializers, multiple outputs,
dynamic batch, names, the ONNX backend's run_node and value binding."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnjit
from qnnjit import onnx_backend


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_multiple_outputs_keep_their_names_and_order():
    w = numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "w")
    model = _model(
        [
            helper.make_node("Mul", ["x", "w"], ["scaled"]),
            helper.make_node("Relu", ["scaled"], ["relu"]),
            helper.make_node("Identity", ["x"], ["copy"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("copy", TensorProto.FLOAT, ["batch", 2]),
        ],
        [w],
    )
    compiled = qnnjit.compile(model, target="reference")
    assert compiled.output_names == ["relu", "scaled", "copy"]
    x = np.array([[1.0, -1.0], [-2.0, 4.0], [0.5, 0.25]], np.float32)
    relu, scaled, copy = compiled(x)
    np.testing.assert_array_equal(scaled, x * np.array([2.0, 3.0], np.float32))
    np.testing.assert_array_equal(relu, np.maximum(scaled, 0))
    np.testing.assert_array_equal(copy, x)
    assert "batch" in str(compiled.graph)


def test_an_output_that_is_an_input_gets_an_identity():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
    )
    compiled = qnnjit.compile(model, target="reference")
    assert compiled.output_names == ["y", "x"]
    y, x_out = compiled(np.array([-1.0, 2.0], np.float32))
    np.testing.assert_array_equal(x_out, [-1.0, 2.0])


def test_shape_subgraph_folds_at_compile_time():
    model = _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
            helper.make_node("Gather", ["shape", "zero"], ["d0"], axis=0),
            helper.make_node("Unsqueeze", ["d0", "zero_axes"], ["d0v"]),
            helper.make_node("Concat", ["d0v", "minus_one"], ["new_shape"], axis=0),
            helper.make_node("Reshape", ["x", "new_shape"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
        ],
    )
    compiled = qnnjit.compile(model, target="reference")
    assert [node.op for node in compiled.graph.nodes] == ["reshape"]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(compiled(x), x.reshape(2, 12))


def test_run_node_and_value_binding():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    x = np.arange(6, dtype=np.float32)
    (y,) = onnx_backend.run_node(node, [x, np.array([2, 3], np.int64)])
    np.testing.assert_array_equal(y, x.reshape(2, 3))
    # The shape is a graph input: the rep binds its run-time value and
    # compiles once per distinct value.
    model = _model(
        [node],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["d0", "d1"])],
    )
    rep = onnx_backend.prepare(model)
    for shape in ([3, 2], [1, 6], [3, 2]):
        (y,) = rep.run([x, np.array(shape, np.int64)])
        np.testing.assert_array_equal(y, x.reshape(shape))
    assert len(rep._compiled) == 2
    assert onnx_backend.supports_device("CPU") and not onnx_backend.supports_device("CUDA")


def test_compile_accepts_path_bytes_and_proto(tmp_path):
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(model, tmp_path / "m.onnx")
    x = np.array([-1.0, 1.0], np.float32)
    for source in (model, model.SerializeToString(), str(tmp_path / "m.onnx"), tmp_path / "m.onnx"):
        np.testing.assert_array_equal(qnnjit.compile(source, target="reference")(x), [0.0, 1.0])


def test_non_constant_compile_time_operand_names_the_input():
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape_node")],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["d0", "d1"])],
    )
    with pytest.raises(qnnjit.ModelError, match="reshape_node.*graph input 'shape'"):
        qnnjit.compile(model, target="reference")
