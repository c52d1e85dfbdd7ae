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


@pytest.mark.parametrize("batch,size", [(1, (7, 7)), (3, (5, 6))])
def test_depthwise_pointwise_bands_cut_inside_rows_for_even_threads(batch, size, monkeypatch):
    """Two threads, and whole-row bands they cannot share evenly (7 rows: 4 +
    3; three images of one band): the bands are cut into pixels, so that
    some start inside a row and compute its depthwise outputs once more.
    The same bits; with a residual add too."""
    import numba

    from qnnjit.backends.cpu.kernels import _threads, conv_nhwc

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core: compiled models run on one thread")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    launches = []
    prepare = conv_nhwc.DepthwisePointwise.prepare
    monkeypatch.setattr(
        conv_nhwc.DepthwisePointwise, "prepare",
        lambda self, *a: launches.append(prepare(self, *a)) or launches[-1],
    )  # fmt: skip
    rng = np.random.default_rng(23)
    model = dw_pw_model(rng, channels=32, out_channels=32, stride=1, residual=True)
    x = rng.integers(0, 256, (batch, 32, *size)).astype(np.uint8)
    check(model, x, 2, fused=True)
    pixels = size[0] * size[1]
    band, tasks, _ = launches[-1]
    assert band % size[1] and tasks % 2 == 0, (band, tasks)
    assert tasks == batch * -(-pixels // band)


def test_even_bands():
    from qnnjit.backends.cpu.kernels.conv_nhwc import even_bands

    assert even_bands(49, 1, 28, 2) == 25  # 4 + 3 rows of 7 -> 25 + 24 pixels
    assert even_bands(196, 1, 98, 2) == 98  # two whole bands: as they are
    assert even_bands(3136, 1, 392, 2) == 392
    assert even_bands(30, 3, 30, 2) == 15  # three images of one band: two bands each
    assert even_bands(49, 1, 49, 3) == 17  # one band, three threads: 17 + 17 + 15
    assert even_bands(1, 1, 1, 2) == 1


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


# ---- dequantize -> layer_norm -> quantize ----------------------------------------------


def _qdq_layer_norm_graph(rng, dtype, shape, axis, bias=True, read_mean=False, read_float=False):
    """x -> clip (so the chain reads no graph input) -> DQ -> layer_norm
    ("ort_mlas", constant scale [and bias]) -> Q; `read_mean`: its mean is a
    graph output too; `read_float`: so is the dequantized tensor."""
    from qnnjit.ir import Graph, TensorType, dtypes

    dt = {"u8": dtypes.uint8, "s8": dtypes.int8}[dtype]
    g = Graph()
    x = g.add_input("x", TensorType(dt, shape))
    x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    zx = 131 if dt == dtypes.uint8 else -7
    dq_attrs = {"axis": 1, "block_size": 0, "dtype": dtypes.float32}
    f = g.add_node(
        "dequantize", [x, g.constant(np.float32(0.043)), g.constant(np.asarray(zx, dt.numpy))],
        dq_attrs,
    ).outputs[0]  # fmt: skip
    norm = shape[axis:]
    if not all(isinstance(d, int) for d in norm):
        norm = (1,)  # broadcast over a symbolic row length
    params = [g.constant((rng.random(norm) + 0.5).astype(np.float32))]
    if bias:
        params.append(g.constant((rng.standard_normal(norm) * 0.2).astype(np.float32)))
    attrs = {"axis": axis, "epsilon": 1e-5, "stash_dtype": "float32", "algorithm": "ort_mlas"}
    y, mean, _ = g.add_node("layer_norm", [f, *params], attrs).outputs
    q_attrs = {
        "dtype": dt,
        "axis": 1,
        "block_size": 0,
        "saturate": True,
        "precision": dtypes.float32,
    }
    zy = 120 if dt == dtypes.uint8 else 3
    q = g.add_node(
        "quantize", [y, g.constant(np.float32(0.031)), g.constant(np.asarray(zy, dt.numpy))],
        q_attrs,
    ).outputs[0]  # fmt: skip
    g.set_outputs([q] + ([mean] if read_mean else []) + ([f] if read_float else []))
    return g, dt


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "dtype, shape, axis, bias",
    [("u8", (2, 9, 64), 2, True), ("s8", (3, 40), 1, False), ("u8", (2, 3, 4, 5), 2, True),
     ("u8", (4, 9), 1, True)],
)  # fmt: skip
def test_a_qdq_layer_norm_runs_from_codes_to_codes(dtype, shape, axis, bias, threads, monkeypatch):
    from qnnjit.backends.cpu.executor import CpuExecutor
    from qnnjit.backends.cpu.kernels import _threads
    from qnnjit.backends.reference import ReferenceExecutor

    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(len(shape) + axis)
    g, dt = _qdq_layer_norm_graph(rng, dtype, shape, axis, bias)
    cpu, ref = CpuExecutor(g, num_threads=threads), ReferenceExecutor(g)
    names = [step.name for step in cpu.steps]
    assert names[1].startswith("dequantize+layer_norm+quantize[") and len(names) == 2, names
    for seed in range(3):
        x = np.random.default_rng(seed).integers(dt.qmin, dt.qmax + 1, shape).astype(dt.numpy)
        np.testing.assert_array_equal(cpu.run([x])[0], ref.run([x])[0])
    (binding,) = next(iter(cpu._bindings.values()))
    assert [s.name for s in binding.input_steps] == [names[0]] and not binding.rerun_steps


@pytest.mark.parametrize("why", ["read_mean", "read_float", "rows of 6"])
def test_a_layer_norm_whose_floats_are_read_elsewhere_stays_apart(why):
    """Also rows shorter than 8, which the reference normalizes in two passes."""
    from qnnjit.backends.cpu.executor import CpuExecutor
    from qnnjit.backends.reference import ReferenceExecutor

    kwargs = {} if why == "rows of 6" else {why: True}
    shape = (2, 6) if why == "rows of 6" else (2, 16)
    g, dt = _qdq_layer_norm_graph(np.random.default_rng(0), "u8", shape, 1, **kwargs)
    cpu = CpuExecutor(g, num_threads=1)
    assert not any("+layer_norm+" in step.name for step in cpu.steps)
    x = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    for got, want in zip(cpu.run([x]), ReferenceExecutor(g).run([x]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_symbolic_row_length_under_8_takes_the_two_pass_steps():
    from qnnjit.backends.cpu.executor import CpuExecutor
    from qnnjit.backends.reference import ReferenceExecutor

    g, dt = _qdq_layer_norm_graph(np.random.default_rng(2), "u8", (2, "d"), 1, bias=False)
    cpu, ref = CpuExecutor(g, num_threads=1, warmup=False), ReferenceExecutor(g)
    assert cpu.steps[1].name.startswith("dequantize+layer_norm+quantize[")
    for d in (6, 16, 6):
        x = np.random.default_rng(d).integers(0, 256, (2, d)).astype(np.uint8)
        np.testing.assert_array_equal(cpu.run([x])[0], ref.run([x])[0])
