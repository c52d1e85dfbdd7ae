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
    assert [row["exact"] for row in result["rows"]] == [None, None]  # nothing to compare with
    assert "vs ORT" in format_table(result)


def test_bench_checks_the_cpu_outputs_against_the_reference(tmp_path, monkeypatch):
    """Each qnnjit-cpu row says whether its outputs on the benchmark's inputs
    match the reference interpreter bit for bit; a wrong one is flagged in
    the table and fails `qnnjit bench`."""
    from qnnjit import bench, cli
    from qnnjit.runtime.compiled_model import CompiledModel

    path = str(_conv_model(tmp_path / "c.onnx"))
    result = bench_model(path, batches=(1, 2), threads=(1, 2), repeats=1)
    cpu_rows = [row for row in result["rows"] if row["engine"] == "qnnjit-cpu"]
    assert [row["exact"] for row in cpu_rows] == [True] * 4
    assert not bench.inexact_rows(result) and "NO" not in format_table(result)

    run = CompiledModel.run

    def off_by_one(self, inputs):
        outputs = run(self, inputs)
        if self.target == "cpu":
            outputs = {name: np.nextafter(v, np.inf).astype(v.dtype) for name, v in outputs.items()}
        return outputs

    monkeypatch.setattr(CompiledModel, "run", off_by_one)
    result = bench_model(path, batches=(1,), threads=(1,), repeats=1)
    assert [row["exact"] for row in bench.inexact_rows(result)] == [False]
    assert "differ from the reference" in format_table(result)
    assert cli.main(["bench", path, "--repeats", "1"]) == 1
