"""QDQ canonicalization (compiler/passes/qdq_to_integer.py) on the node
units that full-size exported models bring and the small zoo did not:

- MatMul with uint8 activations and int8 weights (Linear layers on 3-D
  tokens export as MatMul + Add);
- Conv -> Relu/Clip -> QuantizeLinear where the quantize already implies the
  clamp (PyTorch eager-mode exports keep the Relu);
- Conv / Gemm with a float bias between DequantizeLinear and QuantizeLinear
  (PyTorch PT2E exports), which ONNX Runtime quantizes to int32;
- per-channel MatMul weights along an axis that is not the output's.

Each model is built with onnx.helper, compiled for the reference target,
checked for the rewrite (the pass's log) and compared with ONNX Runtime's
optimized session bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnjit

RNG = np.random.default_rng(11)
F32 = np.float32


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _q_dq(src, name, scale, zero_point, inits, nodes):
    """Append Q -> DQ of `src` with the given parameters; returns the DQ output."""
    inits += [_init(f"{name}_s", F32(scale)), _init(f"{name}_z", zero_point)]
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name])
    )
    return name


def _weight_dq(name, q, scale, inits, nodes, axis=None):
    zero = np.zeros(np.shape(scale), q.dtype)
    inits += [_init(f"{name}_q", q), _init(f"{name}_s", F32(scale)), _init(f"{name}_z", zero)]
    attrs = {} if axis is None else {"axis": axis}
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], **attrs
        )
    )
    return name


def _model(nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _compile_and_compare(model, x, lsb=None):
    """qnnjit == ORT bit for bit; or, with `lsb` (the output scale), within one
    LSB -- for units both leave in float, where ORT's float32 conv kernel and
    qnnjit's exact sum may round a value to neighbouring codes."""
    compiled = qnnjit.compile(model, target="reference")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    got, want = compiled(x), session.run(None, {"x": x})[0]
    if lsb is None:
        np.testing.assert_array_equal(got, want)
    else:
        assert np.abs(got.astype(np.float64) - want).max() <= lsb * 1.0001
    return compiled


def _applied(compiled) -> list[str]:
    return compiled.graph.metadata["qdq_log"].applied


def _conv_unit(activation=None, y_zero=0, clip=(0.0, 6.0), float_bias=False, per_channel=False):
    """x -> Q/DQ (u8) -> Conv(DQ(w s8), bias) -> [activation] -> Q/DQ (u8) -> y."""
    nodes, inits = [], []
    xq = _q_dq("x", "xd", 0.05, np.uint8(128), inits, nodes)
    w = RNG.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    w_scale = RNG.uniform(0.002, 0.01, 8).astype(F32) if per_channel else F32(0.004)
    wd = _weight_dq("w", w, w_scale, inits, nodes, axis=0 if per_channel else None)
    bias = RNG.normal(0, 0.5, 8).astype(F32)
    if float_bias:
        inits.append(_init("b", bias))
    else:
        b_scale = (F32(0.05) * w_scale).astype(F32)
        q = np.round(bias / b_scale).astype(np.int32)
        inits += [_init("b_q", q), _init("b_s", b_scale)]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], axis=0))
    nodes.append(helper.make_node("Conv", [xq, wd, "b"], ["conv"], pads=[1, 1, 1, 1]))
    out = "conv"
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["conv"], ["act"]))
        out = "act"
    elif activation == "Clip":
        inits += [_init("lo", F32(clip[0])), _init("hi", F32(clip[1]))]
        nodes.append(helper.make_node("Clip", ["conv", "lo", "hi"], ["act"]))
        out = "act"
    _q_dq(out, "y", 0.02, np.uint8(y_zero), inits, nodes)
    return _model(nodes, inits, [1, 4, 9, 9], [1, 8, 9, 9])


def _x(shape):
    return RNG.normal(0, 2.0, shape).astype(F32)


# ---- MatMul with u8 activations and s8 weights ----------------------------------------


@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_u8_activation_s8_weight_is_integer(per_column):
    """ORT's MatMul selector only needs the activation and output types to
    agree; the weight may be int8. Run as float, K = 192 products of
    dequantized values would round where the integer kernel does not."""
    nodes, inits = [], []
    xq = _q_dq("x", "xd", 0.04, np.uint8(120), inits, nodes)
    w = RNG.integers(-127, 128, (192, 24)).astype(np.int8)
    scale = RNG.uniform(0.001, 0.004, 24).astype(F32) if per_column else F32(0.002)
    wd = _weight_dq("w", w, scale, inits, nodes, axis=1 if per_column else None)
    nodes.append(helper.make_node("MatMul", [xq, wd], ["mm"]))
    _q_dq("mm", "y", 0.03, np.uint8(128), inits, nodes)
    model = _model(nodes, inits, [2, 16, 192], [2, 16, 24])
    compiled = _compile_and_compare(model, _x((2, 16, 192)))
    assert any(entry.startswith("fuse_compute_unit") for entry in _applied(compiled))
    assert "matmul" not in compiled.graph.op_counts()


def test_matmul_weight_per_channel_on_k_is_not_fused():
    """A weight scale per row of B (axis 0) does not scale output columns:
    no QLinearMatMul can express it, so the unit stays float."""
    nodes, inits = [], []
    xq = _q_dq("x", "xd", 0.04, np.uint8(120), inits, nodes)
    w = RNG.integers(-127, 128, (16, 16)).astype(np.int8)
    wd = _weight_dq("w", w, RNG.uniform(0.001, 0.004, 16).astype(F32), inits, nodes, axis=0)
    nodes.append(helper.make_node("MatMul", [xq, wd], ["mm"]))
    _q_dq("mm", "y", 0.03, np.uint8(128), inits, nodes)
    compiled = qnnjit.compile(_model(nodes, inits, [4, 16], [4, 16]), target="reference")
    assert "matmul" in compiled.graph.op_counts()
    assert "output channels" in compiled.report()


# ---- Relu / Clip implied by the quantize ----------------------------------------------


@pytest.mark.parametrize(
    "activation, y_zero, clip, dropped",
    [("Relu", 0, None, True), ("Relu", 3, None, False),
     ("Clip", 0, (0.0, 6.0), True),     # u8 [0, 255] * 0.02 = [0, 5.1] lies inside [0, 6]
     ("Clip", 0, (0.0, 4.0), False),    # 4.0 cuts the range
     ("Clip", 0, (-0.004, 9.0), True),  # Q(-0.004) = rne(-0.2) = 0 = qmin
     ("Clip", 0, (0.5, 9.0), False)],
)  # fmt: skip
def test_redundant_relu_and_clip_before_quantize(activation, y_zero, clip, dropped):
    model = _conv_unit(activation, y_zero, clip or (0.0, 6.0))
    compiled = _compile_and_compare(model, _x((1, 4, 9, 9)), lsb=None if dropped else 0.02)
    applied = _applied(compiled)
    assert any(e.startswith("drop_redundant_clip") for e in applied) == dropped
    # Once the clamp is gone, the conv forms a QLinearConv unit.
    assert any(e.startswith("fuse_compute_unit") for e in applied) == dropped


# ---- float bias between DQ and Q (PT2E) -------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("activation", [None, "Relu"])
def test_float_conv_bias_is_quantized_like_ort(per_channel, activation):
    """ORT's WeightBiasQuantization rounds the float bias to int32 with scale
    x_s * w_s, then fuses the unit; so does qnnjit, bit for bit."""
    model = _conv_unit(activation, float_bias=True, per_channel=per_channel)
    compiled = _compile_and_compare(model, _x((1, 4, 9, 9)))
    applied = _applied(compiled)
    assert any(e.startswith("quantize_float_bias") for e in applied)
    assert "conv" not in compiled.graph.op_counts()


def test_float_gemm_bias_is_quantized_like_ort():
    nodes, inits = [], []
    xq = _q_dq("x", "xd", 0.04, np.uint8(120), inits, nodes)
    w = RNG.integers(-127, 128, (10, 32)).astype(np.int8)
    wd = _weight_dq("w", w, RNG.uniform(0.001, 0.004, 10).astype(F32), inits, nodes, axis=0)
    inits.append(_init("b", RNG.normal(0, 0.3, 10).astype(F32)))
    nodes.append(helper.make_node("Gemm", [xq, wd, "b"], ["gemm"], transB=1))
    _q_dq("gemm", "y", 0.03, np.uint8(128), inits, nodes)
    compiled = _compile_and_compare(_model(nodes, inits, [3, 32], [3, 10]), _x((3, 32)))
    assert any(e.startswith("quantize_float_bias") for e in _applied(compiled))
    assert "gemm" not in compiled.graph.op_counts()


def test_float_bias_without_a_quantize_stays_float():
    """No QuantizeLinear after the conv: ORT leaves the bias alone."""
    nodes, inits = [], []
    xq = _q_dq("x", "xd", 0.05, np.uint8(128), inits, nodes)
    wd = _weight_dq("w", RNG.integers(-127, 128, (8, 4, 1, 1)).astype(np.int8), 0.004, inits, nodes)
    inits.append(_init("b", RNG.normal(0, 0.5, 8).astype(F32)))
    nodes.append(helper.make_node("Conv", [xq, wd, "b"], ["y"]))
    compiled = qnnjit.compile(_model(nodes, inits, [1, 4, 5, 5], [1, 8, 5, 5]), "reference")
    assert not any(e.startswith("quantize_float_bias") for e in _applied(compiled))
