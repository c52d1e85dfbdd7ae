"""A random-graph fuzzer for the compiler pipeline.

Hypothesis draws small quantized CNNs — QLinearConv (strides, pads, groups,
depthwise, per-channel or per-tensor weights, bias), residual QLinearAdd,
integer MaxPool, QLinearSigmoid, QLinearAveragePool, QLinearGlobalAveragePool,
QLinearMatMul head — with random zero points and with scales that are either
random or powers of two (which force rounding ties). Each graph is checked two
ways:

- the optimized graph's reference output equals the unoptimized graph's, bit
  for bit (the QOperator form is integer IR straight from the frontend, so
  every pass after it must preserve every integer);
- it equals ONNX Runtime's output (ORT_ENABLE_ALL), bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler import run_pipeline
from qnnjit.frontends.onnx import load_onnx

MS = "com.microsoft"


class Builder:
    """Accumulates nodes and initializers of a QOperator model."""

    def __init__(self, rng: np.random.Generator, pow2: bool, dtype):
        self.rng, self.pow2, self.dtype = rng, pow2, dtype
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def const(self, array, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scale(self) -> str:
        exponent = self.rng.integers(-7, -2) if self.pow2 else self.rng.uniform(-7, -2)
        return self.const(np.float32(2.0**exponent), "s")

    def zero_point(self) -> str:
        info = np.iinfo(self.dtype)
        return self.const(self.dtype(self.rng.integers(info.min + 40, info.max - 40)), "z")

    def node(self, op, inputs, domain="", **attrs) -> str:
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out


def qconv(b: Builder, x, channels, out_channels, *, kernel, stride, depthwise, per_channel):
    group = channels if depthwise else 1
    out_channels = channels if depthwise else out_channels
    w = b.rng.integers(-127, 128, (out_channels, channels // group, kernel, kernel), np.int8)
    n = out_channels if per_channel else 1
    w_scale = (
        np.float32(2.0 ** b.rng.integers(-8, -4, n))
        if b.pow2
        else b.rng.uniform(0.002, 0.02, n).astype(np.float32)
    )
    w_scale = w_scale if per_channel else w_scale.reshape(())
    bias = b.rng.integers(-3000, 3000, out_channels, np.int32)
    pad = kernel // 2
    y = b.node(
        "QLinearConv",
        [x["q"], x["s"], x["z"], b.const(w, "w"), b.const(w_scale, "ws"),
         b.const(np.zeros(w_scale.shape, np.int8), "wz"), ys := b.scale(), yz := b.zero_point(),
         b.const(bias, "b")],
        strides=[stride, stride], pads=[pad] * 4, group=group,
    )  # fmt: skip
    return {"q": y, "s": ys, "z": yz}, out_channels


def unary(b: Builder, x, op, **attrs):
    y = b.node(op, [x["q"], x["s"], x["z"], ys := b.scale(), yz := b.zero_point()], MS, **attrs)
    return {"q": y, "s": ys, "z": yz}


@st.composite
def quantized_cnn(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    pow2 = draw(st.booleans())
    dtype = draw(st.sampled_from([np.uint8, np.int8]))
    rng = np.random.default_rng(seed)
    b = Builder(rng, pow2, dtype)
    in_channels, size = draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([5, 6, 8]))
    channels = in_channels
    x = {"q": b.node("QuantizeLinear", ["input", s := b.scale(), z := b.zero_point()]),
         "s": s, "z": z}  # fmt: skip
    for _ in range(draw(st.integers(1, 4))):
        layer = draw(st.sampled_from(["conv", "residual", "maxpool", "sigmoid", "avgpool"]))
        if layer == "conv":
            x, channels = qconv(
                b, x, channels, draw(st.sampled_from([2, 4, 6])),
                kernel=draw(st.sampled_from([1, 3])), stride=draw(st.sampled_from([1, 2])),
                depthwise=draw(st.booleans()), per_channel=draw(st.booleans()),
            )  # fmt: skip
        elif layer == "residual":
            mid, mid_channels = qconv(b, x, channels, 4, kernel=3, stride=1, depthwise=False,
                                      per_channel=draw(st.booleans()))  # fmt: skip
            back, _ = qconv(b, mid, mid_channels, channels, kernel=1, stride=1,
                            depthwise=False, per_channel=True)  # fmt: skip
            added = b.node("QLinearAdd", [back["q"], back["s"], back["z"], x["q"], x["s"], x["z"],
                                          ys := b.scale(), yz := b.zero_point()], MS)  # fmt: skip
            x = {"q": added, "s": ys, "z": yz}
        elif layer == "maxpool":
            x = {**x, "q": b.node("MaxPool", [x["q"]], kernel_shape=[2, 2], pads=[0, 0, 1, 1])}
        elif layer == "sigmoid":
            x = unary(b, x, "QLinearSigmoid")
        else:
            x = unary(b, x, "QLinearAveragePool", kernel_shape=[3, 3], pads=[1] * 4,
                      count_include_pad=draw(st.sampled_from([0, 1])))  # fmt: skip
    pooled = unary(b, x, "QLinearGlobalAveragePool")
    flat = b.node("Flatten", [pooled["q"]])
    head_w = rng.integers(-127, 128, (channels, 3), np.int8)
    logits = b.node(
        "QLinearMatMul",
        [flat, pooled["s"], pooled["z"], b.const(head_w, "hw"), b.const(np.float32(0.01), "hs"),
         b.const(np.int8(0), "hz"), ys := b.scale(), yz := b.zero_point()],
    )  # fmt: skip
    output = b.node("DequantizeLinear", [logits, ys, yz])
    shape = [2, in_channels, size, size]
    graph = helper.make_graph(
        b.nodes, "fuzz",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, 3])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 9
    return model, shape, seed


def run_ort(model, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input": x})[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=quantized_cnn())
def test_pipeline_preserves_every_integer_and_matches_onnxruntime(case):
    model, shape, seed = case
    x = np.random.default_rng(seed).normal(0, 1.5, shape).astype(np.float32)
    unoptimized = load_onnx(model)
    optimized = load_onnx(model)
    run_pipeline(optimized, verify=True)
    (before,) = ReferenceExecutor(unoptimized).run([x])
    (after,) = ReferenceExecutor(optimized).run([x])
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, run_ort(model, x))
