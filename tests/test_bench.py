"""The benchmark harness counts work correctly and measures both engines
(speed itself is never asserted)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qnnjit
from qnnjit.bench import bench_model, count_ops, format_table


def _conv_model(path):
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 5, 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what ONNX Runtime 1.31 reads
    onnx.save(model, path)
    return path


def test_count_ops_is_two_macs_per_sample(tmp_path):
    compiled = qnnjit.compile(str(_conv_model(tmp_path / "c.onnx")), target="reference")
    assert count_ops(compiled.graph) == 2 * (8 * 5 * 5) * (3 * 3 * 3)


def test_bench_measures_qnnjit_and_onnxruntime(tmp_path):
    result = bench_model(
        str(_conv_model(tmp_path / "c.onnx")), target="reference", batches=(2,), repeats=2
    )
    engines = [row["engine"] for row in result["rows"]]
    assert engines == ["qnnjit-reference", "onnxruntime"]
    assert all(row["min_ms"] > 0 and row["batch"] == 2 for row in result["rows"])
    assert "vs ORT" in format_table(result)
