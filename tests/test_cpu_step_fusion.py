"""Fusion across CPU kernels (`kernels/step_fusion.py`): a depthwise conv and
the 1x1 conv that alone reads its output run as one kernel, with the same
bits as the reference; and the pair stays two kernels whenever the
intermediate tensor is needed elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnjit

MS = "com.microsoft"
FUSED = "depthwise+pointwise["


def _qconv(name, x, w_name, ws_name, y, group, stride):
    return helper.make_node(
        "QLinearConv", [x, "s_" + x, "z_" + x, w_name, ws_name, "wz_" + w_name, "s_" + y, "z_" + y,
                        "b_" + w_name],
        [y], name=name, group=group, strides=[stride, stride], pads=[1, 1, 1, 1] if group > 1
        else [0, 0, 0, 0],
    )  # fmt: skip


def dw_pw_model(rng, *, channels, out_channels, stride, residual=False, extra_output=False,
                second_reader=False, signed=False):  # fmt: skip
    """x (u8) -> depthwise 3x3 QLinearConv -> 1x1 QLinearConv [-> QLinearAdd x]:
    per-channel s8 weights, u8 activations (`signed`: s8), odd zero points.
    `extra_output`: the depthwise result is a graph output too;
    `second_reader`: another 1x1 conv reads it."""
    c, m = channels, out_channels
    inits = {
        "dw_w": rng.integers(-128, 128, (c, 1, 3, 3)).astype(np.int8),
        "pw_w": rng.integers(-128, 128, (m, c, 1, 1)).astype(np.int8),
        "pw2_w": rng.integers(-128, 128, (m, c, 1, 1)).astype(np.int8),
    }
    for w in ("dw_w", "pw_w", "pw2_w"):
        n = inits[w].shape[0]
        inits["ws_" + w] = (2.0 ** rng.uniform(-9, -6, n)).astype(np.float32)
        inits["wz_" + w] = np.zeros(n, np.int8)
        inits["b_" + w] = rng.integers(-3000, 3000, n).astype(np.int32)
    for v, scale in (("x", 0.02), ("mid", 0.05), ("y", 0.07), ("y2", 0.07), ("out", 0.1)):
        inits["s_" + v] = np.float32(scale * rng.uniform(0.8, 1.2))
        inits["z_" + v] = (
            np.int8(rng.integers(-20, 20)) if signed else np.uint8(rng.integers(100, 140))
        )
    nodes = [
        _qconv("dw", "x", "dw_w", "ws_dw_w", "mid", c, stride),
        _qconv("pw", "mid", "pw_w", "ws_pw_w", "y", 1, 1),
    ]
    outputs = ["y"]
    if residual:
        nodes.append(helper.make_node(
            "QLinearAdd", ["y", "s_y", "z_y", "x", "s_x", "z_x", "s_out", "z_out"], ["out"],
            domain=MS, name="add",
        ))  # fmt: skip
        outputs = ["out"]
    if second_reader:
        nodes.append(_qconv("pw2", "mid", "pw2_w", "ws_pw2_w", "y2", 1, 1))
        outputs.append("y2")
    if extra_output:
        outputs.append("mid")
    elem = TensorProto.INT8 if signed else TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "dw_pw",
        [helper.make_tensor_value_info("x", elem, ["n", c, "h", "w"])],
        [helper.make_tensor_value_info(o, elem, ["n", "c", "oh", "ow"]) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)]
    )
    model.ir_version = 8
    return model


def check(model, x, threads, fused: bool):
    cpu = qnnjit.compile(model, target="cpu", num_threads=threads)
    ref = qnnjit.compile(model, target="reference")
    got, want = cpu.run({"x": x}), ref.run({"x": x})
    for name in ref.output_names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    names = "\n".join(step.name for step in cpu._executor.steps)
    assert (FUSED in names) == fused, names


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "channels,out_channels,stride,size,batch",
    [
        (32, 24, 1, (9, 13), 2),  # odd rows: a short last band
        (64, 40, 2, (15, 8), 1),  # stride 2; M not a multiple of the GEMM's NR
        (48, 16, 1, (40, 37), 3),  # several bands per image, three images
    ],
)
def test_depthwise_pointwise_fused(channels, out_channels, stride, size, batch, threads):
    rng = np.random.default_rng(channels + stride + batch)
    model = dw_pw_model(rng, channels=channels, out_channels=out_channels, stride=stride)
    x = rng.integers(0, 256, (batch, channels, *size)).astype(np.uint8)
    check(model, x, threads, fused=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride,residual", [(1, False), (2, False), (1, True)])
def test_depthwise_pointwise_fused_signed(stride, residual, threads):
    """s8 activations: the depthwise row kernel stores its codes flipped to
    u8 (zero point + 128), the GEMM's A as it reads it; with a residual qadd
    of s8 codes too."""
    rng = np.random.default_rng(13 + stride)
    model = dw_pw_model(rng, channels=32, out_channels=32 if residual else 24, stride=stride,
                        residual=residual, signed=True)  # fmt: skip
    x = rng.integers(-128, 128, (2, 32, 17, 12)).astype(np.int8)
    check(model, x, threads, fused=True)


def test_depthwise_pointwise_fused_with_residual_add():
    """The pointwise conv's requantize and residual qadd stay in its microkernels."""
    rng = np.random.default_rng(5)
    model = dw_pw_model(rng, channels=32, out_channels=32, stride=1, residual=True)
    x = rng.integers(0, 256, (2, 32, 11, 10)).astype(np.uint8)
    check(model, x, 1, fused=True)


@pytest.mark.parametrize("kind", ["extra_output", "second_reader"])
def test_no_fusion_when_the_depthwise_output_is_needed(kind):
    rng = np.random.default_rng(7)
    model = dw_pw_model(rng, channels=32, out_channels=24, stride=1, **{kind: True})
    x = rng.integers(0, 256, (1, 32, 6, 7)).astype(np.uint8)
    check(model, x, 1, fused=False)


def test_no_fusion_without_requantizing_row_kernels():
    """20 channels leave a partial vector: the depthwise sums go through the
    epilogue, not a requantizing row kernel, so there is nothing to merge."""
    rng = np.random.default_rng(9)
    model = dw_pw_model(rng, channels=20, out_channels=24, stride=1)
    x = rng.integers(0, 256, (1, 20, 6, 7)).astype(np.uint8)
    check(model, x, 1, fused=False)


def test_depthwise_pointwise_fused_on_avx2(monkeypatch):
    """The merged kernel on the AVX2 path (8-lane row kernels), when the host runs it."""
    from qnnjit.backends.cpu.features import runnable_isas

    if "avx2" not in runnable_isas():
        pytest.skip(reason="host cannot run avx2")
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx2")
    rng = np.random.default_rng(11)
    model = dw_pw_model(rng, channels=24, out_channels=20, stride=2)
    x = rng.integers(0, 256, (2, 24, 13, 9)).astype(np.uint8)
    check(model, x, 1, fused=True)
