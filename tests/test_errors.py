"""Bad input gets a qnnjit error naming the culprit, never a raw traceback."""

import gc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qnnjit


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=imports)


def _add_model():
    return _model(
        [helper.make_node("Add", ["x", "y"], ["z"], name="the_add")],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
    )


def test_unsupported_ops_are_listed_all_at_once():
    model = _model(
        [
            helper.make_node("Add", ["x", "x"], ["a"], name="fine"),
            helper.make_node("Hardmax", ["a"], ["b"], name="hm"),
            helper.make_node("FancyOp", ["b"], ["c"], name="fancy", domain="my.domain"),
            helper.make_node("Det", ["c"], ["d"], name="det"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 3])],
        extra_opsets=[helper.make_opsetid("my.domain", 1)],
    )
    with pytest.raises(qnnjit.UnsupportedModelError) as info:
        qnnjit.compile(model, target="reference")
    message = str(info.value)
    for culprit in ("'hm'", "'Hardmax'", "'fancy'", "'FancyOp'", "'my.domain'", "'det'", "'Det'"):
        assert culprit in message
    assert "'fine'" not in message
    assert "opset 17" in message and "3 node(s)" in message
    assert [u["op_type"] for u in info.value.unsupported] == ["Hardmax", "FancyOp", "Det"]


def test_too_old_opset_is_unsupported_with_reason():
    model = _add_model()
    model.opset_import[0].version = 10  # Add is accepted from 11 (same semantics as 13)
    with pytest.raises(qnnjit.UnsupportedModelError, match="supported from opset 11"):
        qnnjit.compile(model, target="reference")


def test_malformed_model_is_a_model_error():
    model = _model(
        [helper.make_node("Add", ["x", "nowhere"], ["z"], name="broken")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(qnnjit.ModelError, match="malformed.*nowhere"):
        qnnjit.compile(model, target="reference")


def test_missing_model_file():
    with pytest.raises(qnnjit.ModelError, match="does not exist"):
        qnnjit.compile("/no/such/model.onnx", target="reference")


def test_not_a_model():
    with pytest.raises(qnnjit.QnnjitError, match="expected an ONNX model"):
        qnnjit.compile(42, target="reference")


def test_unknown_and_unbuilt_targets():
    with pytest.raises(qnnjit.QnnjitError, match="unknown target 'tpu'"):
        qnnjit.compile(_add_model(), target="tpu")
    with pytest.raises(qnnjit.QnnjitError, match="'cuda' is not built yet"):
        qnnjit.compile(_add_model(), target="cuda")


@pytest.mark.parametrize("collecting", [True, False])
def test_a_compile_leaves_the_garbage_collector_as_it_found_it(collecting):
    """`compile` pauses Python's cyclic collector (api._collector_paused):
    after it returns or raises, the collector is on again only if it was."""
    was = gc.isenabled()
    try:
        (gc.enable if collecting else gc.disable)()
        assert qnnjit.compile(_add_model(), target="cpu") is not None
        assert gc.isenabled() is collecting
        with pytest.raises(qnnjit.ModelError):
            qnnjit.compile("/no/such/model.onnx", target="cpu")
        assert gc.isenabled() is collecting
    finally:
        (gc.enable if was else gc.disable)()


@pytest.fixture(scope="module")
def add_model():
    return qnnjit.compile(_add_model(), target="reference")


def test_inputs_run_and_broadcast(add_model):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(add_model(x, y), x + y)
    np.testing.assert_array_equal(add_model.run({"x": x, "y": y})["z"], x + y)
    assert add_model.input_names == ["x", "y"] and add_model.output_names == ["z"]


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"x": np.zeros((2, 3), np.float32)}, r"missing input\(s\) \['y'\]"),
        (
            {"x": np.zeros((2, 3), np.float32), "y": np.zeros((1, 3), np.float32), "q": 1},
            r"unknown input name\(s\) \['q'\]",
        ),
        (
            {"x": np.zeros((2, 3), np.float64), "y": np.zeros((1, 3), np.float32)},
            "input 'x' has dtype float64, expected float32",
        ),
        (
            {"x": np.zeros((2, 4), np.float32), "y": np.zeros((1, 3), np.float32)},
            r"input 'x' has shape \(2, 4\), expected \('N', 3\)",
        ),
        (
            {"x": np.zeros((2, 3), np.float32), "y": np.zeros((3,), np.float32)},
            r"input 'y' has shape \(3,\), expected \(1, 3\)",
        ),
        (
            {"x": [[1.0, 2.0, 3.0]], "y": np.zeros((1, 3), np.float32)},
            "input 'x' must be a numpy.ndarray, got list",
        ),
    ],
)
def test_wrong_inputs_name_the_input(add_model, feeds, message):
    with pytest.raises(qnnjit.InputError, match=message):
        add_model.run(feeds)


def test_wrong_positional_count(add_model):
    with pytest.raises(qnnjit.InputError, match=r"takes 2 input\(s\)"):
        add_model(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_symbol_shared_by_two_inputs_must_agree(target):
    # The declared-inputs check of a run (`CompiledModel._as_declared`) looks
    # at each input alone; a symbol two dimensions share is left to the full
    # checks.
    model = qnnjit.compile(
        _model(
            [helper.make_node("Add", ["x", "y"], ["z"], name="the_add")],
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
                helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            ],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        ),
        target=target,
    )
    x, y = np.ones((2, 3), np.float32), np.ones((3, 3), np.float32)
    with pytest.raises(qnnjit.InputError, match="dimension 'N' is 2 in another input"):
        model(x, y)
    with pytest.raises(qnnjit.InputError, match="dimension 'N' is 2 in another input"):
        model.run({"x": x, "y": y})
    np.testing.assert_array_equal(model(y, y), y + y)


def test_inputs_as_declared_take_any_size_of_a_symbolic_dimension(add_model):
    y = np.ones((1, 3), np.float32)
    for n in (0, 1, 5):
        x = np.full((n, 3), 2, np.float32)
        np.testing.assert_array_equal(add_model(x, y), x + y)
        np.testing.assert_array_equal(add_model.run({"x": x, "y": y})["z"], x + y)


def test_an_ndarray_subclass_is_checked_and_run(add_model):
    class Tagged(np.ndarray):
        pass

    x = np.zeros((2, 3), np.float32).view(Tagged)
    y = np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(add_model(x, y), np.ones((2, 3), np.float32))
    with pytest.raises(qnnjit.InputError, match="input 'x' has dtype float64"):
        add_model(x.astype(np.float64), y)


def test_reading_an_undefined_value_names_the_node():
    # onnx.checker accepts a graph whose node reads a value defined later only
    # in some versions; either way qnnjit names the node.
    model = _model(
        [
            helper.make_node("Add", ["x", "later"], ["z"], name="early"),
            helper.make_node("Identity", ["x"], ["later"], name="late"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
    )
    with pytest.raises(qnnjit.ModelError, match="later"):
        qnnjit.compile(model, target="reference")


def test_cli_reports_errors_without_traceback(capsys, tmp_path):
    from qnnjit.cli import main

    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    assert main(["compile", str(path), "--target", "reference"]) == 1
    assert "qnnjit: error:" in capsys.readouterr().err
    onnx.save(_add_model(), tmp_path / "ok.onnx")
    assert main(["compile", str(tmp_path / "ok.onnx"), "--target", "reference"]) == 0
