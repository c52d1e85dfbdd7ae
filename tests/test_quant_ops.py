"""Quantization ops against ONNX Runtime 1.31 (CPU EP), bit for bit.

Every case builds a one-node ONNX model with onnx.helper, runs it in ONNX
Runtime and in qnnjit's reference interpreter, and compares the integer
outputs with `assert_array_equal`. The com.microsoft ops run under both
ORT_ENABLE_ALL and ORT_DISABLE_ALL (ENABLE_ALL rewrites some of them to NHWC
forms; the integer results are the same). Scales come in two flavours: random,
and power-of-two ratios that force exact .5 ties, where rounding conventions
differ. Storage types ONNX Runtime cannot run (int2/uint2, float4 and some
float8 paths) are compared with onnx.reference.ReferenceEvaluator instead.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qnnjit
from qnnjit.ir.ops.qlinear_contrib import ort_broadcast_mode

MS = "com.microsoft"
LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}

# ---- model builders -------------------------------------------------------------


def _tensor_type(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


def make_model(
    op_type, inputs, consts, attrs=None, *, domain="", opset=21, outputs=("y",), out=None
):
    """One-node model. `inputs`: {name: array} fed at run time; `consts`:
    {name: array or None} initializers (None: omitted optional input). The
    node's input order is `attrs["_order"]`, else inputs' keys then consts'.
    `out`: the output element type(s); default: the output zero point's type
    (`yz`, `z`, `zc`), float32 for DequantizeLinear."""
    order = attrs.pop("_order") if attrs and "_order" in attrs else list(inputs) + list(consts)
    names = [n if (n in inputs or consts.get(n) is not None) else "" for n in order]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op_type, names, list(outputs), domain=domain, **(attrs or {}))
    graph_inputs = [
        helper.make_tensor_value_info(name, _tensor_type(a), a.shape) for name, a in inputs.items()
    ]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items() if a is not None]
    if out is None:
        zero = next((consts[k] for k in ("yz", "z", "zc") if consts.get(k) is not None), None)
        out = np.float32 if op_type == "DequantizeLinear" or zero is None else zero.dtype
    out = out if isinstance(out, (list, tuple)) else [out] * len(outputs)
    graph_outputs = [
        helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(np.dtype(t)), None)
        for o, t in zip(outputs, out, strict=True)
    ]
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs, inits)
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    _declare_output_shapes(model, inputs)
    return model


def _declare_output_shapes(model, inputs):
    """onnx.checker wants graph outputs with a shape: take ORT's (or, where ORT
    has no kernel, the first input's; Q/DQ are elementwise)."""
    try:
        shapes = [r.shape for r in run_ort(model, inputs, "none")]
    except Exception:  # noqa: BLE001 - ORT lacks the kernel (int2, float4...)
        shapes = [next(iter(inputs.values())).shape] * len(model.graph.output)
    for value_info, shape in zip(model.graph.output, shapes, strict=True):
        dims = value_info.type.tensor_type.shape
        dims.SetInParent()  # a 0-d output still declares its (empty) shape
        for size in shape:
            dims.dim.add().dim_value = size


def run_ort(model, feeds, level="all"):
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_qnnjit(model, feeds):
    compiled = qnnjit.compile(model, target="reference")
    result = compiled.run(feeds)
    return [result[name] for name in compiled.output_names]


def check(model, feeds, *, levels=("all",), reference=False):
    """qnnjit == ONNX Runtime (at each level), or == ReferenceEvaluator."""
    ours = run_qnnjit(model, feeds)
    if reference:
        theirs = [ReferenceEvaluator(model).run(None, feeds)]
    else:
        theirs = [run_ort(model, feeds, level) for level in levels]
    for expected in theirs:
        assert len(ours) == len(expected)
        for a, b in zip(ours, expected, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(_comparable(a), _comparable(b))
    return ours


def _comparable(array: np.ndarray) -> np.ndarray:
    """Small float / sub-byte ml_dtypes arrays compare by bit pattern (NaN == NaN)."""
    if array.dtype.itemsize == 1 and array.dtype not in (np.int8, np.uint8, np.bool_):
        return array.view(np.uint8)
    return array


def f32(*values):
    return np.array(values if len(values) > 1 else values[0], dtype=np.float32)


def codes(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dtype)


def zp(dtype, value):
    return np.array(value, dtype=dtype)


def random_scale(rng, low=-6.0, high=-1.0):
    return np.float32(np.exp2(rng.uniform(low, high)))


# ---- QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear ---------------------


def tie_inputs(scale, shape, rng):
    """x values at exact .5 multiples of a power-of-two scale (ties), plus extremes."""
    k = rng.integers(-300, 300, size=shape)
    x = ((k + 0.5) * scale).astype(np.float32)
    x.flat[:4] = [1e9, -1e9, 0.0, -0.0]
    return x


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
@pytest.mark.parametrize("ties", [False, True])
def test_quantize_per_tensor(dtype, ties):
    rng = np.random.default_rng(1)
    scale = np.float32(2.0**-3) if ties else random_scale(rng)
    x = tie_inputs(scale, (4, 37), rng) if ties else rng.normal(0, 3, (4, 37)).astype(np.float32)
    info = np.iinfo(dtype)
    model = make_model("QuantizeLinear", {"x": x}, {"s": scale, "z": zp(dtype, info.min // 2 + 3)})
    check(model, {"x": x})


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_quantize_dequantize_per_axis(dtype, axis):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 2, (3, 4, 5)).astype(np.float32)
    n = x.shape[axis]
    scales = np.array([random_scale(rng) for _ in range(n)], np.float32)
    scales[0] = 2.0**-4  # ties in one channel
    x[(slice(None),) * (axis % 3) + (0,)] = tie_inputs(np.float32(2.0**-4), x.shape, rng)[
        (slice(None),) * (axis % 3) + (0,)
    ]
    zps = codes(rng, dtype, (n,))
    model = make_model("QuantizeLinear", {"x": x}, {"s": scales, "z": zps}, {"axis": axis})
    q = check(model, {"x": x})[0]
    model = make_model("DequantizeLinear", {"q": q}, {"s": scales, "z": zps}, {"axis": axis})
    check(model, {"q": q})


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_com_microsoft_quantize_dequantize(dtype):
    rng = np.random.default_rng(20)
    x = rng.normal(0, 2, (2, 5, 3)).astype(np.float32)
    scales = np.exp2(rng.uniform(-8, -3, 5)).astype(np.float32)
    zps = codes(rng, dtype, (5,))
    model = make_model("QuantizeLinear", {"x": x}, {"s": scales, "z": zps}, {"axis": 1}, domain=MS)
    q = check(model, {"x": x}, levels=("all", "none"))[0]
    model = make_model(
        "DequantizeLinear", {"q": q}, {"s": scales, "z": zps}, {"axis": 1}, domain=MS
    )
    check(model, {"q": q}, levels=("all", "none"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32])
def test_dequantize_all_codes(dtype):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    q = np.linspace(info.min, info.max, 4096).astype(dtype)
    zero = None if dtype == np.int32 else zp(dtype, info.min // 3)
    model = make_model("DequantizeLinear", {"q": q}, {"s": random_scale(rng), "z": zero})
    check(model, {"q": q})


def q_dq_model(x, scale, zero_point, attrs, dq_attrs=None):
    """x -> QuantizeLinear -> DequantizeLinear: ORT's Python API cannot return
    int4 tensors, so the quantized values are checked through the float output."""
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node(
            "DequantizeLinear", ["q", "s", "z"], ["y"], **(attrs if dq_attrs is None else dq_attrs)
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TP.FLOAT, x.shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("dtype", [ml_dtypes.int4, ml_dtypes.uint4])
@pytest.mark.parametrize("blocked", [False, True])
def test_quantize_int4(dtype, blocked):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (4, 8)).astype(np.float32)
    if blocked:
        scales = np.exp2(rng.uniform(-4, -2, (2, 8))).astype(np.float32)
        attrs = {"axis": 0, "block_size": 2}
    else:
        scales = np.exp2(rng.uniform(-4, -2, 8)).astype(np.float32)
        attrs = {"axis": 1}
    zero_point = np.full(scales.shape, 1, dtype=dtype)
    model = q_dq_model(x, scales, zero_point, attrs)
    check(model, {"x": x})


@pytest.mark.parametrize(
    "dtype",
    [
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2fnuz,
    ],
)
@pytest.mark.parametrize("saturate", [1, 0])
def test_quantize_float8(dtype, saturate):
    """float8 through a Q -> DQ chain (ORT's Python API returns floats). Values
    stay clear of the two saturate=0 corners where ORT 1.31 departs from the
    spec (see numerics.quantize)."""
    rng = np.random.default_rng(19)
    x = rng.normal(0, 50, (3, 40)).astype(np.float32)
    x[0, :5] = [1e6, -1e6, np.nan, 0.0, -0.0]
    model = q_dq_model(x, np.float32(0.5), np.zeros((), dtype), {"saturate": saturate}, dq_attrs={})
    ours, theirs = run_qnnjit(model, {"x": x})[0], run_ort(model, {"x": x})[0]
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize(
    "dtype",
    [
        ml_dtypes.int2,
        ml_dtypes.uint2,
        ml_dtypes.float4_e2m1fn,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e5m2fnuz,
    ],
)
def test_small_types_against_reference_evaluator(dtype):
    """Types ONNX Runtime 1.31 lacks kernels for (or deviates on, see numerics)."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 4, (3, 16)).astype(np.float32)
    scale = np.float32(0.5)
    model = make_model("QuantizeLinear", {"x": x}, {"s": scale, "z": np.zeros((), dtype)}, opset=25)
    q = check(model, {"x": x}, reference=True)[0]
    model = make_model(
        "DequantizeLinear", {"q": q}, {"s": scale, "z": np.zeros((), dtype)}, opset=25
    )
    check(model, {"q": q}, reference=True)


@pytest.mark.parametrize("case", ["mixed", "positive", "negative", "zeros", "ties"])
def test_dynamic_quantize(case):
    rng = np.random.default_rng(6)
    x = {
        "mixed": rng.normal(0, 3, (5, 7)),
        "positive": rng.uniform(0.5, 4, (5, 7)),
        "negative": -rng.uniform(0.5, 4, (5, 7)),
        "zeros": np.zeros((5, 7)),
        "ties": np.concatenate([[-2.0, 0.0, 253.0], np.arange(32) + 0.5]),
    }[case].astype(np.float32)
    out = (np.uint8, np.float32, np.uint8)
    model = make_model("DynamicQuantizeLinear", {"x": x}, {}, outputs=("y", "s", "z"), out=out)
    check(model, {"x": x})


# ---- QLinearConv / ConvInteger ----------------------------------------------------

CONV_CASES = {
    # name: (x shape, w shape, attrs)
    "3x3": ((1, 3, 7, 7), (4, 3, 3, 3), {}),
    "stride_pad": ((2, 4, 9, 8), (6, 4, 3, 3), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    "dilation": ((1, 2, 9, 9), (3, 2, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "group": ((1, 6, 6, 6), (4, 3, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": (
        (1, 8, 7, 7),
        (8, 1, 3, 3),
        {"group": 8, "pads": [1, 1, 1, 1], "strides": [2, 2]},
    ),
    "1x1": ((1, 16, 4, 4), (8, 16, 1, 1), {}),
    "5x5_same": ((1, 3, 8, 8), (4, 3, 5, 5), {"auto_pad": "SAME_UPPER"}),
    "1d": ((1, 3, 20), (5, 3, 4), {"strides": [3], "pads": [1, 2]}),
    "3d": ((1, 2, 5, 5, 4), (3, 2, 3, 3, 2), {"pads": [1, 0, 1, 1, 1, 0]}),
}
CONV_TYPES = [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)]


@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("types", CONV_TYPES, ids=["u8s8", "u8u8", "s8s8"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_qlinear_conv(name, types, per_channel):
    rng = np.random.default_rng(abs(hash((name, per_channel))) % 2**32)
    xt, wt = types
    x_shape, w_shape, attrs = CONV_CASES[name]
    m = w_shape[0]
    x, w = codes(rng, xt, x_shape), codes(rng, wt, w_shape)
    ties = name in ("3x3", "depthwise")  # power-of-two scales: many exact .5 ties
    xs = np.float32(2.0**-4) if ties else random_scale(rng)
    ws = (
        np.full(m, 2.0**-5, np.float32)
        if ties
        else np.array([random_scale(rng) for _ in range(m)], np.float32)
    )
    if not per_channel:
        ws = ws[:1].reshape(())
    # ORT's QLinearConv needs one weight zero point value (per-channel arrays must be equal).
    wzp = zp(wt, 0 if wt == np.int8 else 131)
    consts = {
        "xs": xs, "xz": zp(xt, 7 if xt == np.uint8 else -5), "w": w, "ws": ws, "wz": wzp,
        "ys": np.float32(0.25) if ties else random_scale(rng, -2, 1),
        "yz": zp(xt, 120 if xt == np.uint8 else 3),
        "b": rng.integers(-2000, 2000, m).astype(np.int32),
    }  # fmt: skip
    attrs = dict(attrs, _order=["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"])
    model = make_model("QLinearConv", {"x": x}, consts, attrs)
    check(model, {"x": x}, levels=("all", "none"))


@pytest.mark.parametrize("name", ["stride_pad", "group", "1d"])
def test_conv_integer(name):
    rng = np.random.default_rng(7)
    x_shape, w_shape, attrs = CONV_CASES[name]
    x, w = codes(rng, np.uint8, x_shape), codes(rng, np.uint8, w_shape)
    attrs = dict(attrs, _order=["x", "w", "xz", "wz"])
    consts = {"w": w, "xz": zp(np.uint8, 17), "wz": zp(np.uint8, 201)}
    check(make_model("ConvInteger", {"x": x}, consts, dict(attrs), out=np.int32), {"x": x})
    if len(w_shape) != 4:
        return  # ReferenceEvaluator's per-channel ConvInteger handles 2-D only
    # Per-output-channel weight zero points: ONNX allows them, ORT does not.
    consts["wz"] = codes(rng, np.uint8, (w_shape[0],))
    model = make_model("ConvInteger", {"x": x}, consts, dict(attrs), out=np.int32)
    check(model, {"x": x}, reference=True)


def test_qlinear_conv_runtime_scales():
    """Scales as graph inputs: the multiplier is computed by IR float ops at run time."""
    rng = np.random.default_rng(8)
    x, w = codes(rng, np.uint8, (1, 2, 5, 5)), codes(rng, np.int8, (3, 2, 3, 3))
    feeds = {
        "x": x, "xs": f32(0.05), "xz": zp(np.uint8, 9), "w": w,
        "ws": np.array([0.01, 0.02, 0.03], np.float32), "wz": zp(np.int8, 0),
        "ys": f32(0.07), "yz": zp(np.uint8, 100),
    }  # fmt: skip
    model = make_model("QLinearConv", feeds, {}, {"pads": [1, 1, 1, 1]}, out=np.uint8)
    check(model, feeds)


# ---- QLinearMatMul / MatMulInteger ----------------------------------------------


@pytest.mark.parametrize("types", CONV_TYPES, ids=["u8s8", "u8u8", "s8s8"])
@pytest.mark.parametrize(
    "shapes",
    [((5, 7), (7, 3)), ((2, 4, 6), (6, 5)), ((3, 1, 4, 8), (2, 8, 3))],
    ids=["2d", "3d", "bcast"],
)
@pytest.mark.parametrize("per_column", [False, True], ids=["tensor", "column"])
def test_qlinear_matmul(types, shapes, per_column):
    rng = np.random.default_rng(9)
    at, bt = types
    a, b = codes(rng, at, shapes[0]), codes(rng, bt, shapes[1])
    n = shapes[1][-1]
    bs = np.array([random_scale(rng) for _ in range(n)], np.float32)
    bz = codes(rng, bt, (n,)) if bt == np.uint8 else np.zeros(n, bt)
    if not per_column or len(shapes[1]) > 2:  # ORT: per-column needs a 2-D b
        bs, bz = bs[:1].reshape(()), bz[:1].reshape(())
    consts = {
        "as": random_scale(rng), "az": zp(at, 11), "b": b, "bs": bs, "bz": bz,
        "ys": random_scale(rng, -3, 0), "yz": zp(at, -7 if at == np.int8 else 140),
    }  # fmt: skip
    model = make_model("QLinearMatMul", {"a": a}, consts)
    check(model, {"a": a})


def test_qlinear_matmul_ties():
    rng = np.random.default_rng(10)
    a, b = codes(rng, np.uint8, (16, 32)), codes(rng, np.int8, (32, 16))
    consts = {
        "as": f32(2.0**-3), "az": zp(np.uint8, 128), "b": b, "bs": f32(2.0**-4),
        "bz": zp(np.int8, 0), "ys": f32(2.0), "yz": zp(np.uint8, 128),
    }  # fmt: skip
    model = make_model("QLinearMatMul", {"a": a}, consts)
    check(model, {"a": a})


def test_matmul_integer_row_and_column_zero_points():
    rng = np.random.default_rng(11)
    a, b = codes(rng, np.uint8, (6, 9)), codes(rng, np.int8, (9, 4))
    consts = {"b": b, "az": zp(np.uint8, 77), "bz": codes(rng, np.int8, (4,))}
    check(make_model("MatMulInteger", {"a": a}, consts, out=np.int32), {"a": a})
    # Per-row a zero points: ONNX allows them, ORT (and the onnx reference) do not.
    consts["az"] = codes(rng, np.uint8, (6,))
    model = make_model("MatMulInteger", {"a": a}, consts, out=np.int32)
    expected = (a.astype(np.int64) - consts["az"][:, None]) @ (b.astype(np.int64) - consts["bz"])
    np.testing.assert_array_equal(run_qnnjit(model, {"a": a})[0], expected)


# ---- com.microsoft QLinearAdd / QLinearMul -----------------------------------------

BINARY_SHAPES = [
    ((67,), (67,)),
    ((2, 3, 33), (2, 3, 33)),
    ((1,), (40,)),
    ((40,), ()),
    ((2, 3, 4, 5), (1, 3, 1, 1)),  # per-channel broadcast: B is a per-span scalar
    ((2, 3, 4, 5), (5,)),
    ((4, 1), (1, 37)),
    ((3, 1, 5), (3, 4, 1)),
]


def _binary_case(op_type, shapes, dtype, ties, seed):
    rng = np.random.default_rng(seed)
    a, b = codes(rng, dtype, shapes[0]), codes(rng, dtype, shapes[1])
    if ties:
        sa, sb, sc = (
            f32(2.0**-3),
            f32(2.0**-2),
            f32(2.0**-1 if op_type == "QLinearAdd" else 2.0**-4),
        )
    else:
        sa, sb, sc = random_scale(rng), random_scale(rng), random_scale(rng, -4, 0)
    info = np.iinfo(dtype)
    consts = {
        "sa": sa, "za": zp(dtype, rng.integers(info.min, info.max)), "sb": sb,
        "zb": zp(dtype, rng.integers(info.min, info.max)), "sc": sc,
        "zc": zp(dtype, rng.integers(info.min, info.max)),
    }  # fmt: skip
    attrs = {"_order": ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"]}
    model = make_model(op_type, {"a": a, "b": b}, consts, attrs, domain=MS, out=dtype)
    return model, {"a": a, "b": b}


@pytest.mark.parametrize("op_type", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("shapes", BINARY_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_qlinear_binary(op_type, shapes, dtype, ties):
    model, feeds = _binary_case(op_type, shapes, dtype, ties, seed=len(shapes[0]) * 7 + ties)
    check(model, feeds, levels=("all", "none"))


@pytest.mark.parametrize("op_type", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_binary_exhaustive(op_type, dtype):
    """Every (a, b) code pair under several random scale sets."""
    info = np.iinfo(dtype)
    grid = np.arange(info.min, info.max + 1).astype(dtype)
    a, b = np.repeat(grid, 256), np.tile(grid, 256)
    for seed in range(3):
        model, _ = _binary_case(op_type, (a.shape, b.shape), dtype, False, seed=100 + seed)
        check(model, {"a": a, "b": b})


@pytest.mark.parametrize(
    "shapes, mode",
    [
        (((3, 4), (3, 4)), "general"),
        (((3, 4), (1, 4)), "general"),
        (((3, 4), (3, 1)), "scalar1"),
        (((1,), (5,)), "scalar0"),
        (((), (5,)), "scalar0"),
        (((3, 1), (1,)), "scalar0"),
        (((2, 1, 1), (2, 3, 1)), "scalar0"),
    ],
)
def test_ort_broadcast_mode(shapes, mode):
    assert ort_broadcast_mode(*shapes) == mode


# ---- com.microsoft pooling -------------------------------------------------------

POOL_CASES = {
    "3x3s2p1": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    "2x2": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    "asym_pad": {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 2, 0]},
    "same": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    "global_fallback": {"kernel_shape": [5, 6]},
    "1d": {"kernel_shape": [4], "strides": [3], "pads": [1, 2]},
}


@pytest.mark.parametrize("name", list(POOL_CASES))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_average_pool(name, dtype, count_include_pad, channels_last):
    rng = np.random.default_rng(13)
    shape = (2, 3, 9) if name == "1d" else (2, 3, 5, 6)
    x = codes(rng, dtype, shape)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    ties = name == "2x2"
    consts = {
        "xs": f32(2.0**-3) if ties else random_scale(rng), "xz": zp(dtype, 5),
        "ys": f32(2.0**-2) if ties else random_scale(rng),
        "yz": zp(dtype, -3 if dtype == np.int8 else 130),
    }  # fmt: skip
    attrs = dict(POOL_CASES[name], count_include_pad=count_include_pad, channels_last=channels_last)
    model = make_model("QLinearAveragePool", {"x": x}, consts, attrs, domain=MS)
    check(model, {"x": x}, levels=("all", "none"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("channels_last", [0, 1])
@pytest.mark.parametrize("spatial", [(7, 7), (2, 5), (8, 8)])
def test_qlinear_global_average_pool(dtype, channels_last, spatial):
    rng = np.random.default_rng(14)
    shape = (2, 5, *spatial)
    x = codes(rng, dtype, shape)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    consts = {
        "xs": random_scale(rng),
        "xz": zp(dtype, 3),
        "ys": random_scale(rng),
        "yz": zp(dtype, 9),
    }
    model = make_model(
        "QLinearGlobalAveragePool", {"x": x}, consts, {"channels_last": channels_last}, domain=MS
    )
    check(model, {"x": x}, levels=("all", "none"))


# ---- com.microsoft table ops -------------------------------------------------------


@pytest.mark.parametrize("op_type", ["QLinearSigmoid", "QLinearLeakyRelu"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("seed", range(4))
def test_qlinear_lookup_ops(op_type, dtype, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = np.arange(info.min, info.max + 1).astype(dtype)  # every code: the whole table
    y_scale = [f32(1 / 256), random_scale(rng, -8, -5), f32(2.0**-7), random_scale(rng, -4, -1)][
        seed
    ]
    consts = {
        "xs": random_scale(rng, -7, -2), "xz": zp(dtype, rng.integers(info.min, info.max)),
        "ys": y_scale, "yz": zp(dtype, info.min if op_type == "QLinearSigmoid" else 3),
    }  # fmt: skip
    attrs = {"alpha": float(rng.uniform(0.01, 0.3))} if op_type == "QLinearLeakyRelu" else {}
    model = make_model(op_type, {"x": x}, consts, attrs, domain=MS)
    check(model, {"x": x}, levels=("all", "none"))


def test_qlinear_leaky_relu_runtime_scales():
    x = np.arange(256).astype(np.uint8)
    feeds = {
        "x": x,
        "xs": f32(0.05),
        "xz": zp(np.uint8, 100),
        "ys": f32(0.03),
        "yz": zp(np.uint8, 60),
    }
    model = make_model("QLinearLeakyRelu", feeds, {}, {"alpha": 0.1}, domain=MS, out=np.uint8)
    check(model, feeds)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_concat(dtype):
    rng = np.random.default_rng(15)
    xs = [codes(rng, dtype, (2, c, 3)) for c in (2, 3, 1)]
    ys, yz = f32(0.05), zp(dtype, 4)
    consts = {
        "ys": ys, "yz": yz, "s0": ys, "z0": yz,  # same params: copied
        "s1": f32(0.0731), "z1": zp(dtype, -9 if dtype == np.int8 else 200),
        "s2": f32(0.025), "z2": yz,  # tie-forcing ratio 1/2
    }  # fmt: skip
    order = ["ys", "yz", "x0", "s0", "z0", "x1", "s1", "z1", "x2", "s2", "z2"]
    feeds = {f"x{i}": x for i, x in enumerate(xs)}
    model = make_model("QLinearConcat", feeds, consts, {"axis": -2, "_order": order}, domain=MS)
    check(model, feeds, levels=("all", "none"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize(
    "opset, axis, shape", [(13, -1, (4, 10)), (13, 1, (2, 37, 3)), (12, 1, (3, 4, 5))]
)
def test_qlinear_softmax(dtype, opset, axis, shape):
    rng = np.random.default_rng(16)
    x = codes(rng, dtype, shape)
    yz = zp(dtype, 0 if dtype == np.uint8 else -128)
    # 1/ys is not an integer here: ORT uses floor(1 / ys), not 1 / ys.
    ys = f32(1 / 256) if opset == 12 else random_scale(rng, -9, -7)
    consts = {"xs": random_scale(rng, -4, -1), "xz": zp(dtype, 0), "ys": ys, "yz": yz}
    model = make_model(
        "QLinearSoftmax", {"x": x}, consts, {"axis": axis, "opset": opset}, domain=MS
    )
    check(model, {"x": x}, levels=("all", "none"))


# ---- com.microsoft QGemm -----------------------------------------------------------


@pytest.mark.parametrize("types", [(np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)])
@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1)])
@pytest.mark.parametrize("variant", ["plain", "bias_alpha", "per_column", "float_out"])
def test_qgemm(types, trans_a, trans_b, variant):
    rng = np.random.default_rng(17)
    at, bt = types
    m, k, n = 5, 11, 6
    a = codes(rng, at, (k, m) if trans_a else (m, k))
    b = codes(rng, bt, (n, k) if trans_b else (k, n))
    bs = (
        np.array([random_scale(rng) for _ in range(n)], np.float32)
        if variant == "per_column"
        else random_scale(rng)
    )
    bz = np.zeros(np.shape(bs), bt) if bt == np.int8 else np.full(np.shape(bs), 120, bt)
    consts = {"as": random_scale(rng), "az": zp(at, 7), "b": b, "bs": bs, "bz": bz}
    consts["c"] = rng.integers(-5000, 5000, (m, n)).astype(np.int32) if variant != "plain" else None
    if variant != "float_out":
        consts["ys"], consts["yz"] = random_scale(rng, -2, 1), zp(at, 3)
    attrs = {"transA": trans_a, "transB": trans_b}
    if variant == "bias_alpha":
        attrs["alpha"] = 0.75
    attrs["_order"] = ["a", "as", "az", "b", "bs", "bz", "c", "ys", "yz"]
    out = np.float32 if variant == "float_out" else at
    model = make_model("QGemm", {"a": a}, consts, attrs, domain=MS, out=out)
    check(model, {"a": a}, levels=("all", "none"))


# ---- IR-level checks ----------------------------------------------------------------


def test_qlinear_conv_lowers_to_qconv_and_requantize():
    rng = np.random.default_rng(18)
    x, w = codes(rng, np.uint8, (1, 2, 4, 4)), codes(rng, np.int8, (3, 2, 3, 3))
    consts = {
        "xs": f32(0.1), "xz": zp(np.uint8, 3), "w": w, "ws": np.array([0.1, 0.2, 0.3], np.float32),
        "wz": np.zeros(3, np.int8), "ys": f32(0.5), "yz": zp(np.uint8, 9),
    }  # fmt: skip
    model = make_model(
        "QLinearConv", {"x": x}, consts, {"_order": ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]}
    )
    graph = qnnjit.compile(model, target="reference").graph
    (group,) = graph.nodes  # one fused conv+requantize group: look inside
    assert group.op == "fused" and group.attrs["kind"] == "conv+requantize"
    graph = group.attrs["body"]
    ops = [node.op for node in graph.nodes]
    assert "qconv" in ops and "requantize" in ops
    requant = next(node for node in graph.nodes if node.op == "requantize")
    assert requant.attrs["rounding"] == "half_even_float" and requant.attrs["axis"] == 1
    quant = requant.outputs[0].type.quant
    assert quant is not None and float(quant.scale) == 0.5 and int(quant.zero_point) == 9
    qconv = next(node for node in graph.nodes if node.op == "qconv")
    assert qconv.outputs[0].type.accumulator is not None


def test_qconv_wraps_int32():
    from qnnjit.ir import ops

    x = np.full((1, 1, 1, 1), 255, np.uint8)
    w = np.full((1, 1, 1, 1), 127, np.int8)
    bias = np.array([2**31 - 100], np.int32)
    attrs = {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1}
    acc = ops.evaluate("qconv", [x, w, None, None, bias], attrs)[0]
    assert acc.dtype == np.int32 and int(acc.reshape(-1)[0]) == 2**31 - 100 + 255 * 127 - 2**32


@pytest.mark.parametrize("rounding", ["fixed_point_double", "fixed_point_single"])
def test_requantize_fixed_point_modes(rounding):
    """Fixed-point modes follow numerics.requantize_fixed_point (checked against
    hand-computed gemmlowp values at +-0.5)."""
    from qnnjit.ir import dtypes, ops

    acc = np.array([1, 2, -2, 6, -6, 1000], np.int32)  # x 0.25: 0.25, +-0.5, +-1.5, 250
    attrs = {"dtype": dtypes.int8, "axis": None, "rounding": rounding}
    y = ops.evaluate("requantize", [acc, np.float32(0.25), np.int8(0)], attrs)[0]
    if rounding == "fixed_point_double":
        # m = 2^30, shift -1: SRDHM rounds acc/2 half up, then RDBPOT halves
        # rounding half away from zero, so 0.25 double-rounds up to 1.
        np.testing.assert_array_equal(y, [1, 1, -1, 2, -2, 127])
    else:  # one rounding, half towards +inf
        np.testing.assert_array_equal(y, [0, 1, 0, 2, -1, 127])


def test_quantize_carries_quant_params():
    x = np.zeros((2, 3), np.float32)
    model = make_model(
        "QuantizeLinear", {"x": x}, {"s": f32(0.5, 0.25, 0.125), "z": zp(np.int8, [1, 2, 3])}
    )
    graph = qnnjit.compile(model, target="reference").graph
    quant = graph.outputs[0].type.quant
    assert quant is not None and quant.axis == 1 and quant.dtype.name == "int8"


def test_onnx_model_is_valid():
    """The builders produce models onnx.checker accepts (sanity of the harness)."""
    x = np.zeros((2, 2), np.float32)
    onnx.checker.check_model(make_model("QuantizeLinear", {"x": x}, {"s": f32(1.0)}, out=np.uint8))


# Scale sets where ORT's per-span-scalar formula (fixed + a*rA, then one FMA)
# and its general formula (two FMAs) round differently for some code pair:
# found by searching all 256x256 pairs; they pin down which one each
# broadcast layout runs.
ADD_DISCRIMINATING = [
    ((0.3695337176322937, 0.12790803611278534, 0.19580408930778503), (208, 161, 139)),
    ((0.4678690433502197, 0.1681370884180069, 0.14888769388198853), (215, 176, 180)),
    ((0.4915746748447418, 0.41891178488731384, 0.076958566904068), (158, 213, 193)),
    ((0.3888052701950073, 0.4473980665206909, 0.01644202135503292), (30, 221, 21)),
]


@pytest.mark.parametrize("scales, zero_points", ADD_DISCRIMINATING)
@pytest.mark.parametrize(
    "layout", [((256, 1), (1, 256)), ((1, 256), (256, 1)), ((65536,), (65536,))]
)
def test_qlinear_add_broadcast_formulas(scales, zero_points, layout):
    grid = np.arange(256, dtype=np.uint8)
    if layout[0] == (65536,):
        a, b = np.repeat(grid, 256), np.tile(grid, 256)
    else:
        a, b = grid.reshape(layout[0]), grid.reshape(layout[1])
    consts = {
        "sa": f32(scales[0]), "za": zp(np.uint8, zero_points[0]),
        "sb": f32(scales[1]), "zb": zp(np.uint8, zero_points[1]),
        "sc": f32(scales[2]), "zc": zp(np.uint8, zero_points[2]),
    }  # fmt: skip
    attrs = {"_order": ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"]}
    model = make_model("QLinearAdd", {"a": a, "b": b}, consts, attrs, domain=MS, out=np.uint8)
    check(model, {"a": a, "b": b}, levels=("all", "none"))


def test_qlinear_conv_multiplier_order():
    """A scale triple where f32(f32(xs*ws)/ys) differs from f32(xs*f32(ws/ys))
    and f32(f32(xs/ys)*ws), and the products of all codes with weights 1..127
    round differently under each: only ORT's (xs*ws)/ys order matches."""
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    w = np.arange(1, 128, dtype=np.int8).reshape(127, 1, 1, 1)
    xs, ws, ys = f32(0.016173677518963814), f32(0.12466581165790558), f32(0.07779666036367416)
    ort_order = (xs * ws) / ys
    assert ort_order != xs * (ws / ys) and ort_order != (xs / ys) * ws
    consts = {
        "xs": xs, "xz": zp(np.uint8, 128), "w": w, "ws": ws, "wz": zp(np.int8, 0),
        "ys": ys, "yz": zp(np.uint8, 128),
    }  # fmt: skip
    model = make_model("QLinearConv", {"x": x}, consts)
    check(model, {"x": x}, levels=("all", "none"))


def test_fma_f32_is_one_rounding():
    """The float32 FMA emulation against exact rationals, including sums that
    float64 cannot hold exactly (where rounding twice would be wrong)."""
    from fractions import Fraction

    from qnnjit.numerics import _round_fraction_to_f32, fma_f32

    rng = np.random.default_rng(21)
    n = 3000
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    b = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    c = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    # Near-ties: c + a*b lands within 2^-70 of a float32 midpoint.
    a[:3], b[:3], c[:3] = np.float32(2.0**-24), np.float32(1 + 2.0**-23), np.float32(1.0)
    got = fma_f32(a, b, c)
    for i in range(n):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert got[i] == _round_fraction_to_f32(exact), (a[i], b[i], c[i])
    half_ulp = Fraction(1, 2**24)
    assert _round_fraction_to_f32(1 + half_ulp) == np.float32(1.0)  # tie: to even
    assert _round_fraction_to_f32(1 + half_ulp + Fraction(1, 2**80)) == np.float32(1 + 2.0**-23)
    assert _round_fraction_to_f32(1 + 3 * half_ulp) == np.float32(1 + 2.0**-22)  # tie: to even


def test_qlinear_softmax_table_uses_a_float_log():
    """ORT takes ln(FLT_MAX / D) in float32 (`log` of a float): with a double
    log every table entry moves by a common factor, and this row (from a
    power-of-two-scale attention block) rounds element 40 to 5 instead of 4."""
    row = [138, 115, 122, 126, 98, 118, 129, 111, 103, 150, 136, 80, 75, 145, 71, 145,
           154, 146, 117, 108, 69, 96, 124, 114, 119, 165, 96, 115, 136, 111, 141, 99,
           136, 137, 113, 119, 145, 104, 135, 158, 133, 127, 97, 116, 109, 107, 111, 153,
           130, 138, 121, 148, 116, 141, 99, 121, 94, 124, 165, 159, 85, 118, 140, 116]  # fmt: skip
    x = np.array([row, row[::-1]], np.uint8)
    consts = {"xs": f32(2.0**-6), "xz": zp(np.uint8, 0), "ys": f32(2.0**-8), "yz": zp(np.uint8, 0)}
    model = make_model("QLinearSoftmax", {"x": x}, consts, {"axis": -1, "opset": 13}, domain=MS)
    (y,) = check(model, {"x": x})
    assert y[0, 40] == 4


# ---- the float64 fast path of the accumulating ops -----------------------------------


def _qconv_int64(inputs, attrs):
    """qconv's exact int64 einsum path (the float64 BLAS path switched off)."""
    from qnnjit.ir.ops import evaluate, quant

    saved = quant._fits_float64
    quant._fits_float64 = lambda *bounds: False
    try:
        return evaluate("qconv", inputs, attrs)[0]
    finally:
        quant._fits_float64 = saved


@pytest.mark.parametrize(
    "x_dtype, w_dtype", [(np.uint8, np.int8), (np.int8, np.int8), (np.uint16, np.int16)]
)
@pytest.mark.parametrize(
    "channels, out, group, kernel, stride, dilation, pad",
    [(8, 6, 1, 3, 1, 1, 1), (8, 8, 8, 3, 2, 1, 1), (8, 16, 8, 3, 1, 2, 2), (6, 9, 3, 5, 2, 1, 0),
     (16, 4, 2, 1, 1, 1, 0)],
)  # fmt: skip
@pytest.mark.parametrize("pad_value", [None, 7])
def test_qconv_float64_path_is_exact(
    x_dtype, w_dtype, channels, out, group, kernel, stride, dilation, pad, pad_value
):
    """Integer products summed by float64 BLAS are exact while K * max|x| *
    max|w| < 2^53, whatever order BLAS adds in; the result (bias added and
    wrapped to int32) equals the int64 computation."""
    from qnnjit.ir.ops import evaluate

    rng = np.random.default_rng(channels * 31 + kernel)
    x = codes(rng, x_dtype, (2, channels, 9, 8))
    w = codes(rng, w_dtype, (out, channels // group, kernel, kernel))
    inputs = [x, w, codes(rng, x_dtype, ()), codes(rng, w_dtype, (out,)),
              rng.integers(-(2**31), 2**31, out).astype(np.int32)]  # fmt: skip
    attrs = {"strides": (stride,) * 2, "pads": (pad,) * 4, "dilations": (dilation,) * 2}
    attrs["group"] = group
    if pad_value is not None:
        attrs["pad_value"] = pad_value
    got = evaluate("qconv", inputs, attrs)[0]
    np.testing.assert_array_equal(got, _qconv_int64(inputs, attrs))


def test_qmatmul_float64_path_is_exact():
    from qnnjit.ir.ops import evaluate
    from qnnjit.ir.ops.quant import _wrap_int32

    rng = np.random.default_rng(3)
    a, b = codes(rng, np.int16, (3, 5, 300)), codes(rng, np.int16, (300, 7))
    got = evaluate("qmatmul", [a, b, np.int16(-9), np.int16(4)], {})[0]
    exact = np.matmul(a.astype(np.int64) + 9, b.astype(np.int64) - 4)
    np.testing.assert_array_equal(got, _wrap_int32(exact))


def test_fma_f32_at_float32_midpoints():
    """a * b + c whose float64 sum rounds onto a float32 midpoint although the
    exact sum is not one -- (1 + 2^-23)(1 - 2^-23) 2^k = 2^k - 2^(k-46) added
    to a large c -- where rounding twice is wrong."""
    from fractions import Fraction

    from qnnjit.numerics import _round_fraction_to_f32, fma_f32

    a, b, c = [], [], []
    for k in range(-20, 20):
        for sign in (1, -1):
            for base in (1, 3, 5, 7):
                a.append(1 + 2.0**-23)
                b.append((1 - 2.0**-23) * 2.0 ** (k + 6) * sign)
                c.append((base * 2.0 ** (k + 30) + 2.0 ** (k + 7)) * sign)
    a, b, c = (np.array(v, np.float32) for v in (a, b, c))
    got = fma_f32(a, b, c)
    exact = [
        Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)) for x, y, z in zip(a, b, c)
    ]
    expected = np.array([_round_fraction_to_f32(e) for e in exact], np.float32)
    np.testing.assert_array_equal(got, expected)
    twice = (a.astype(np.float64) * b + c).astype(np.float32)
    assert np.any(twice != expected)  # the cases do need the correction
