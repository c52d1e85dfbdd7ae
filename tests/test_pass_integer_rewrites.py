"""The integer rewrites after QDQ canonicalization: zero-point folding
(fold_zero_points), activation fusion into clamps (fuse_activation) and
requantization pairs as tables (requantize_pairs).

Every positive test builds the same small graph twice, runs the pass on one,
and compares the reference interpreter's outputs bit for bit over inputs that
cover the whole storage range (accumulators past saturation and int32
wrap-around), with odd zero points and power-of-two scales that put values
exactly on rounding ties. Every precondition has a negative test: the rule
raises Mismatch with its reason (or the pass leaves the graph alone).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.fold_zero_points import (
    fold_conv_input_zero_point,
    fold_matmul_input_zero_point,
    fold_zero_points,
)
from qnnjit.compiler.passes.fuse_activation import (
    as_shifted_clamp,
    clamp_into_quantize,
    fold_into_requantize,
    fuse_activation,
    integer_clip,
)
from qnnjit.compiler.passes.requantize_pairs import (
    compose_lookups,
    dq_q_to_lookup,
    lookup_into_requantize,
    requantize_pairs,
)
from qnnjit.compiler.pattern import Matcher, Mismatch, RuleLog
from qnnjit.compiler.pipeline import PIPELINE
from qnnjit.errors import ModelError
from qnnjit.ir import Graph, TensorType, dtypes
from qnnjit.ir.verifier import verify

I8, U8, I16, I32, F32 = dtypes.int8, dtypes.uint8, dtypes.int16, dtypes.int32, dtypes.float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ROUNDINGS = ("half_even_float", "fixed_point_single", "fixed_point_double")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers ----------------------------------------------------------------------


def run(graph: Graph, feeds) -> list[np.ndarray]:
    return ReferenceExecutor(graph).run(list(feeds))


def check_exact(build, rewrite, feeds, *, expect_change=True) -> Graph:
    """Build twice, rewrite one copy, verify it and compare every output bit for
    bit with the untouched copy; returns the rewritten graph."""
    reference, rewritten = build(), build()
    changed = rewrite(rewritten)
    assert changed == expect_change
    verify(rewritten, context="after the rewrite")
    for want, got in zip(run(reference, feeds), run(rewritten, feeds), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    return rewritten


def codes(dtype) -> np.ndarray:
    """Every value of an integer storage type."""
    return np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy)


def storage(rng, dtype, shape) -> np.ndarray:
    """Random values over the full range, the extremes included."""
    x = rng.integers(dtype.qmin, dtype.qmax + 1, size=shape)
    flat = x.reshape(-1)
    flat[: min(2, flat.size)] = [dtype.qmin, dtype.qmax][: min(2, flat.size)]
    return x.astype(dtype.numpy)


def accumulators(multiplier: float) -> np.ndarray:
    """int32 accumulators whose requantized values sweep the 8-bit range with
    margin on both sides (every tie of a power-of-two multiplier included),
    plus the int32 extremes."""
    reach = int(np.ceil(400 / multiplier))
    step = max(1, reach // 20000)
    inner = np.arange(-reach, reach + 1, step, dtype=np.int64)
    extremes = np.array([INT32_MIN, INT32_MIN + 1, -(2**24) - 1, 2**24 + 1, INT32_MAX])
    return np.concatenate([inner, extremes]).astype(np.int32)


def scalar(graph: Graph, value, dtype, name: str):
    return graph.constant(np.asarray(value, dtype=dtype.numpy), name)


def quantize(graph, x, scale, zp, dtype, **attrs):
    base = {"dtype": dtype, "axis": 1, "block_size": 0, "saturate": True, "precision": F32}
    inputs = [x, scale, zp]
    return graph.add_node("quantize", inputs, {**base, **attrs}, name="q").outputs[0]


def dequantize(graph, q, scale, zp, name="dq"):
    attrs = {"axis": 1, "block_size": 0, "dtype": F32}
    return graph.add_node("dequantize", [q, scale, zp], attrs, name=name).outputs[0]


def requantize(graph, acc, multiplier, zp, scale, dtype, rounding="half_even_float", **attrs):
    base = {"dtype": dtype, "axis": None, "rounding": rounding}
    mult = scalar(graph, multiplier, F32, "m")
    inputs = [acc, mult, zp, scale]
    return graph.add_node("requantize", inputs, {**base, **attrs}, name="rq").outputs[0]


def activation(graph, x, kind, lo=None, hi=None):
    attrs = {} if kind == "relu" else {"min": lo, "max": hi}
    return graph.add_node(kind, [x], attrs, name=kind).outputs[0]


def apply_rule(graph: Graph, rule, op: str):
    """Apply one rule at the first node of `op` (Mismatch propagates)."""
    anchor = next(n for n in graph.nodes if n.op == op)
    rule(Matcher(graph), anchor)


def ops_of(graph: Graph) -> dict[str, int]:
    return graph.op_counts()


pow2_scales = st.integers(-9, -1).map(lambda e: np.float32(2.0**e))
any_scales = st.one_of(pow2_scales, st.floats(0.002, 0.5).map(np.float32))


# ---- quant.py attributes ------------------------------------------------------------


def test_requantize_clamp_is_validated_and_applied():
    g = Graph()
    acc = g.add_input("acc", TensorType(I32, (5,)))
    zp, s = scalar(g, 3, I8, "zp"), scalar(g, 0.5, F32, "s")
    y = requantize(g, acc, 0.5, zp, s, I8, clamp=(3, 60))
    g.set_outputs([y])
    (out,) = run(g, [np.array([-1000, 1, 2, 3, 1000], np.int32)])
    np.testing.assert_array_equal(out, [3, 3, 4, 5, 60])  # 0.5 -> 0, 1.5 -> 2 (ties even)
    for bad in [(5, 4), (-129, 0), (0, 128), (0.5, 3), (1, 2, 3)]:
        with pytest.raises(ModelError, match="clamp"):
            requantize(g, acc, 0.5, zp, s, I8, clamp=bad)


def test_quantize_clamp_keeps_nan_as_qmin():
    g = Graph()
    x = g.add_input("x", TensorType(F32, (6,)))
    y = quantize(g, x, scalar(g, 0.25, F32, "s"), scalar(g, -3, I8, "z"), I8, clamp=(-3, 20))
    g.set_outputs([y])
    feed = np.array([np.nan, -np.inf, -1.0, 0.375, 100.0, np.inf], np.float32)
    np.testing.assert_array_equal(run(g, [feed])[0], [-128, -3, -3, -1, 20, 20])
    with pytest.raises(ModelError, match="integer storage"):
        s = scalar(g, 1.0, F32, "s8")
        quantize(g, x, s, None, dtypes.float8e4m3fn, clamp=(0, 1))


def test_qconv_pad_value_default_is_the_zero_point():
    rng = np.random.default_rng(0)
    x = storage(rng, U8, (1, 2, 4, 4))
    w = storage(rng, I8, (3, 2, 3, 3))
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1], "dilations": [1, 1], "group": 1}

    def conv(zx, **extra):
        g = Graph()
        xi = g.add_input("x", TensorType(U8, x.shape))
        zp = None if zx is None else scalar(g, zx, U8, "zx")
        acc = g.add_node("qconv", [xi, g.constant(w), zp, None, None], {**attrs, **extra})
        g.set_outputs(acc.outputs)
        return run(g, [x])[0]

    np.testing.assert_array_equal(conv(7), conv(7, pad_value=7))
    # sum (x - 7) w with x padded by 7 == sum x w (x padded by 7) - 7 sum w
    np.testing.assert_array_equal(conv(7), conv(None, pad_value=7) - _zx_term(w, 7))
    assert not np.array_equal(conv(7), conv(7, pad_value=0))
    with pytest.raises(ModelError, match="pad_value"):
        conv(7, pad_value=256)


def _zx_term(w, zx):
    return zx * w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1).reshape(1, -1, 1, 1)


# ---- fold_zero_points: qconv -------------------------------------------------------


def conv_graph(x_dtype, w, zx, zw, bias, attrs, x_shape, x_zp_input=False, w_input=False):
    def build():
        g = Graph()
        x = g.add_input("x", TensorType(x_dtype, x_shape))
        if w_input:
            wv = g.add_input("w", TensorType(dtypes.from_numpy(w.dtype), w.shape))
        else:
            wv = g.constant(w, "w")
        if x_zp_input:
            zxv = g.add_input("zx", TensorType(x_dtype, ()))
        else:
            zxv = None if zx is None else scalar(g, zx, x_dtype, "zx")
        zwv = None if zw is None else g.constant(zw, "zw")
        bv = None if bias is None else g.constant(bias, "b")
        acc = g.add_node("qconv", [x, wv, zxv, zwv, bv], attrs, name="conv").outputs[0]
        g.set_outputs([acc])
        return g

    return build


@st.composite
def conv_cases(draw):
    group = draw(st.sampled_from([1, 2]))
    cin, mout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(2, 7)), draw(st.integers(2, 7))
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    strides = [draw(st.integers(1, 2)) for _ in range(2)]
    dilations = [draw(st.integers(1, 2)) for _ in range(2)]
    for size, k, d, lo, hi in ((h, kh, dilations[0], pads[0], pads[2]),
                               (w, kw, dilations[1], pads[1], pads[3])):  # fmt: skip
        assume(size + lo + hi >= d * (k - 1) + 1)
    x_dtype = draw(st.sampled_from([U8, I8]))
    w_dtype = draw(st.sampled_from([I8, U8]))
    zx = draw(st.integers(x_dtype.qmin, x_dtype.qmax - 1).map(lambda z: z or x_dtype.qmax))
    rest = (draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**16)))
    return group, cin, mout, (kh, kw), (h, w), pads, strides, dilations, x_dtype, w_dtype, zx, rest


@FAST
@given(conv_cases())
def test_fold_conv_zero_point_is_exact(case):
    group, cin, mout, kernel, hw, pads, strides, dilations, x_dtype, w_dtype, zx, rest = case
    per_channel, with_bias, seed = rest
    rng = np.random.default_rng(seed)
    w = storage(rng, w_dtype, (mout, cin // group, *kernel))
    zw = storage(rng, w_dtype, (mout,) if per_channel else (1,))
    zw = zw if per_channel else zw.reshape(())
    bias = rng.integers(INT32_MIN, INT32_MAX, size=mout, dtype=np.int64).astype(np.int32)
    attrs = {"pads": pads, "strides": strides, "dilations": dilations, "group": group}
    x_shape = (2, cin, *hw)
    build = conv_graph(x_dtype, w, zx, zw, bias if with_bias else None, attrs, x_shape)
    feeds = [storage(rng, x_dtype, x_shape)]
    g = check_exact(build, fold_zero_points, feeds)
    (conv,) = [n for n in g.nodes if n.op == "qconv"]
    assert conv.input(2) is None and conv.input(4) is not None and conv.input(3) is not None
    assert conv.attrs.get("pad_value") == (zx if any(pads) else None)
    assert len(g) == 1


def test_fold_conv_wraps_like_int32():
    """16-bit operands overflow int32 on purpose: the folded bias is stored
    wrapped, and the result stays identical modulo 2^32."""
    rng = np.random.default_rng(1)
    w = storage(rng, I16, (2, 3, 2, 2))
    w[0] = 32767
    attrs = {"pads": [1, 0, 0, 1], "strides": [1, 1], "dilations": [1, 1], "group": 1}
    bias = np.array([INT32_MAX, INT32_MIN], np.int32)
    build = conv_graph(I16, w, -32768, np.asarray(-7, np.int16), bias, attrs, (1, 3, 3, 3))
    x = storage(rng, I16, (1, 3, 3, 3))
    x[0, 0] = 32767
    g = check_exact(build, fold_zero_points, [x])
    assert len(g) == 1
    acc = run(build(), [x])[0]
    wide = _conv_int64(x, w, -32768, -7, bias, attrs)
    assert np.any(wide != acc)  # the accumulator did wrap
    np.testing.assert_array_equal((wide - acc) % 2**32, 0)


def _conv_int64(x, w, zx, zw, bias, attrs):
    from numpy.lib.stride_tricks import sliding_window_view

    pads = attrs["pads"]
    xs = np.pad(x.astype(np.int64) - zx, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    windows = sliding_window_view(xs, w.shape[2:], axis=(2, 3))
    acc = np.einsum("nchwij,mcij->nmhw", windows, w.astype(np.int64) - zw)
    return acc + bias.astype(np.int64).reshape(1, -1, 1, 1)


@pytest.mark.parametrize(
    "why, kwargs",
    [
        ("x zero point is already 0", {"zx": 0}),
        ("x zero point is absent", {"zx": None}),
        ("x zero point is not a constant", {"x_zp_input": True}),
        ("weight is not a constant", {"w_input": True}),
    ],
)
def test_fold_conv_preconditions(why, kwargs):
    rng = np.random.default_rng(2)
    w = storage(rng, I8, (2, 2, 3, 3))
    attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1], "dilations": [1, 1], "group": 1}
    zx = kwargs.pop("zx", 5)
    g = conv_graph(U8, w, zx, None, None, attrs, (1, 2, 4, 4), **kwargs)()
    with pytest.raises(Mismatch, match=why):
        apply_rule(g, fold_conv_input_zero_point, "qconv")
    log = RuleLog()
    assert not fold_zero_points(g, log) and why in log.kept["conv"]


def test_fold_conv_bias_must_be_constant():
    g = Graph()
    x = g.add_input("x", TensorType(U8, (1, 1, 3, 3)))
    b = g.add_input("b", TensorType(I32, (1,)))
    w = g.constant(np.ones((1, 1, 3, 3), np.int8))
    attrs = {"pads": [0, 0, 0, 0], "strides": [1, 1], "dilations": [1, 1], "group": 1}
    node = g.add_node("qconv", [x, w, scalar(g, 9, U8, "zx"), None, b], attrs, name="conv")
    g.set_outputs(node.outputs)
    with pytest.raises(Mismatch, match="bias is not a constant"):
        apply_rule(g, fold_conv_input_zero_point, "qconv")


# ---- fold_zero_points: qmatmul -----------------------------------------------------


def matmul_graph(a_shape, b, za, zb, *, bias=None, a_dtype=U8, b_input=False, extra=False):
    def build():
        g = Graph()
        a = g.add_input("a", TensorType(a_dtype, a_shape))
        bv = g.add_input("b", TensorType(I8, b.shape)) if b_input else g.constant(b, "B")
        zav = None if za is None else g.constant(za, "za")
        zbv = None if zb is None else g.constant(zb, "zb")
        acc = g.add_node("qmatmul", [a, bv, zav, zbv], name="mm").outputs[0]
        out = acc
        if bias is not None:
            out = g.add_node("add", [g.constant(bias, "C"), acc], name="bias").outputs[0]
        g.set_outputs([out, acc] if extra else [out])
        return g

    return build


@FAST
@given(
    batch=st.sampled_from([(), (2,)]),
    m=st.integers(1, 4),
    k=st.integers(1, 6),
    n=st.integers(1, 5),
    za=st.integers(1, 255),
    per_column=st.booleans(),
    per_row=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_matmul_zero_point_is_exact(batch, m, k, n, za, per_column, per_row, with_bias, seed):
    rng = np.random.default_rng(seed)
    b = storage(rng, I8, (*batch, k, n))
    zb = storage(rng, I8, (n,)) if per_column else np.asarray(rng.integers(-128, 128), np.int8)
    zav = rng.integers(1, 256, m).astype(np.uint8) if per_row else np.asarray(za, np.uint8)
    bias = rng.integers(INT32_MIN, INT32_MAX, size=n, dtype=np.int64).astype(np.int32)
    build = matmul_graph((*batch, m, k), b, zav, zb, bias=bias if with_bias else None)
    a = storage(rng, U8, (*batch, m, k))
    g = check_exact(build, fold_zero_points, [a])
    assert ops_of(g) == {"add": 1, "qmatmul": 1}  # the bias add absorbs it, or one new add
    (mm,) = [node for node in g.nodes if node.op == "qmatmul"]
    assert mm.input(2) is None


def test_fold_matmul_keeps_other_readers_of_the_accumulator():
    rng = np.random.default_rng(3)
    b, bias = storage(rng, I8, (4, 3)), np.array([5, -7, INT32_MAX], np.int32)
    build = matmul_graph((2, 4), b, np.asarray(131, np.uint8), None, bias=bias, extra=True)
    g = check_exact(build, fold_zero_points, [storage(rng, U8, (2, 4))])
    # The accumulator is a graph output, so the bias add cannot take the
    # correction: a new add makes the accumulator, the bias add reads it.
    assert ops_of(g) == {"add": 2, "qmatmul": 1}


@pytest.mark.parametrize(
    "why, a_shape, kwargs",
    [
        ("a zero point is already 0", (2, 4), {"za": np.asarray(0, np.uint8)}),
        ("B is not a constant", (2, 4), {"b_input": True}),
        ("a is not a matrix", (4,), {}),
    ],
)
def test_fold_matmul_preconditions(why, a_shape, kwargs):
    b = np.ones((4, 3), np.int8)
    za = kwargs.pop("za", np.asarray(3, np.uint8))
    g = matmul_graph(a_shape, b, za, None, **kwargs)()
    with pytest.raises(Mismatch, match=why):
        apply_rule(g, fold_matmul_input_zero_point, "qmatmul")
    assert not fold_zero_points(g)


# ---- fuse_activation -----------------------------------------------------------------


def requantize_activation_graph(
    n, *, dtype, zp, scale, multiplier, rounding, act, lo=None, hi=None,
    q_dtype=None, q_zp=None, q_scale=None, extra_reader=None, r_clamp=None,
):  # fmt: skip
    """acc -> requantize -> dequantize -> relu/clip -> quantize."""
    q_dtype = q_dtype or dtype
    q_zp = zp if q_zp is None else q_zp
    q_scale = scale if q_scale is None else q_scale

    def build():
        g = Graph()
        acc = g.add_input("acc", TensorType(I32, (n,)))
        s, z = scalar(g, scale, F32, "s"), scalar(g, zp, dtype, "z")
        extra = {} if r_clamp is None else {"clamp": r_clamp}
        r = requantize(g, acc, multiplier, z, s, dtype, rounding, **extra)
        d = dequantize(g, r, s, z)
        a = activation(g, d, act, lo, hi)
        y = quantize(g, a, scalar(g, q_scale, F32, "qs"), scalar(g, q_zp, q_dtype, "qz"), q_dtype)
        outputs = [y]
        if extra_reader == "requantize":
            outputs.append(r)
        elif extra_reader == "dequantize":
            outputs.append(d)
        g.set_outputs(outputs)
        return g

    return build


@FAST
@given(
    dtype=st.sampled_from([I8, U8]),
    zp=st.integers(-128, 255),
    scale=any_scales,
    multiplier=st.one_of(pow2_scales, st.floats(0.001, 0.9).map(np.float32)),
    rounding=st.sampled_from(ROUNDINGS),
    act=st.sampled_from(["relu", "clip"]),
    bounds=st.tuples(st.floats(-3, 3, width=32), st.floats(0, 6, width=32)),
    half_tie=st.booleans(),
)
def test_activation_into_requantize_is_exact(
    dtype, zp, scale, multiplier, rounding, act, bounds, half_tie
):
    zp = int(np.clip(zp, dtype.qmin, dtype.qmax))
    lo, hi = bounds
    if half_tie:  # bounds exactly on x.5 steps of the grid: Q rounds them to even
        lo, hi = ((np.round(b / scale) + 0.5) * scale for b in (lo, hi))
    acc = accumulators(float(multiplier))
    build = requantize_activation_graph(
        acc.size, dtype=dtype, zp=zp, scale=scale, multiplier=multiplier,
        rounding=rounding, act=act, lo=float(lo), hi=float(hi),
    )  # fmt: skip
    g = check_exact(build, fuse_activation, [acc])
    assert ops_of(g) == {"requantize": 1}
    (r,) = g.nodes
    clamp = r.attrs.get("clamp", (dtype.qmin, dtype.qmax))
    if act == "relu":
        assert clamp == (zp, dtype.qmax)


def test_clip_bound_between_grid_points_is_fused_exactly():
    """clip(0, 6) with a scale that does not divide 6 (6 / 0.047 = 127.66):
    Q is monotone, so clamping at Q(6) = 128 + zp after rounding is exact; a
    bound on a tie (0.5 LSB) rounds half to even in Q and in the clamp alike."""
    for lo, hi, scale in ((0.0, 6.0, 0.047), (0.0, 6.0, 0.0625), (-0.09375, 0.15625, 0.0625)):
        acc = accumulators(0.03125)
        build = requantize_activation_graph(
            acc.size, dtype=U8, zp=9, scale=scale, multiplier=0.03125,
            rounding="half_even_float", act="clip", lo=lo, hi=hi,
        )  # fmt: skip
        g = check_exact(build, fuse_activation, [acc])
        (r,) = g.nodes
        s = np.float32(scale)
        expect = tuple(int(np.rint(np.float32(b) / s)) + 9 for b in (lo, hi))
        assert r.attrs["clamp"] == expect


def test_relu_into_requantize_with_signedness_change():
    """int8 zp -5 -> relu -> uint8 zp 123 with the same scale: the map is
    q -> max(q + 128, 123), a shifted clamp: one uint8 requantize, zp + 128."""
    acc = accumulators(0.25)
    build = requantize_activation_graph(
        acc.size, dtype=I8, zp=-5, scale=0.125, multiplier=0.25, rounding="half_even_float",
        act="relu", q_dtype=U8, q_zp=123,
    )  # fmt: skip
    g = check_exact(build, fuse_activation, [acc])
    (r,) = g.nodes
    assert r.attrs["dtype"] == U8 and r.attrs["clamp"] == (123, 255)
    assert int(r.input(2).const) == 123


def test_activation_composes_with_an_existing_clamp():
    acc = accumulators(0.5)
    build = requantize_activation_graph(
        acc.size, dtype=I8, zp=-1, scale=0.5, multiplier=0.5, rounding="fixed_point_double",
        act="clip", lo=-20.0, hi=3.0, r_clamp=(-30, 100),
    )  # fmt: skip
    g = check_exact(build, fuse_activation, [acc])
    assert g.nodes[0].attrs["clamp"] == (-30, 5)


def test_activation_into_requantize_preconditions():
    acc = accumulators(0.5)
    common = dict(dtype=I8, zp=3, scale=0.5, multiplier=0.5, rounding="half_even_float")
    cases = [
        ("not a shifted clamp", dict(act="relu", q_scale=0.25)),  # rescaled: a table, not a clamp
        ("has 2 readers|graph output", dict(act="relu", extra_reader="requantize")),
        ("graph output", dict(act="relu", extra_reader="dequantize")),
    ]
    for why, kwargs in cases:
        build = requantize_activation_graph(acc.size, **common, **kwargs)
        with pytest.raises(Mismatch, match=why):
            apply_rule(build(), fold_into_requantize, "quantize")
        # The pass still removes the float relu another exact way.
        g = check_exact(build, fuse_activation, [acc])
        assert "relu" not in ops_of(g)


def test_shared_requantize_falls_back_to_an_integer_clip():
    acc = accumulators(0.5)
    build = requantize_activation_graph(
        acc.size, dtype=I8, zp=3, scale=0.5, multiplier=0.5, rounding="half_even_float",
        act="clip", lo=-1.0, hi=30.0, extra_reader="requantize",
    )  # fmt: skip
    g = check_exact(build, fuse_activation, [acc])
    assert ops_of(g) == {"clip": 1, "requantize": 1}
    (clip,) = [n for n in g.nodes if n.op == "clip"]
    assert (clip.attrs["min"], clip.attrs["max"]) == (1, 63)
    assert clip.outputs[0].type.quant is not None


def integer_activation_graph(dtype, zp, scale, act, lo=None, hi=None, q_scale=None, q_dtype=None):
    """x (integer input) -> dequantize -> relu/clip -> quantize."""

    def build():
        g = Graph()
        x = g.add_input("x", TensorType(dtype, (1 << dtype.bits,)))
        s, z = scalar(g, scale, F32, "s"), scalar(g, zp, dtype, "z")
        a = activation(g, dequantize(g, x, s, z), act, lo, hi)
        qs = s if q_scale is None else scalar(g, q_scale, F32, "qs")
        qd = q_dtype or dtype
        qz = z if qd == dtype else scalar(g, 0, qd, "qz")
        g.set_outputs([quantize(g, a, qs, qz, qd)])
        return g

    return build


@pytest.mark.parametrize("dtype", [I8, U8, I16])
@pytest.mark.parametrize("zp", [-77, 0, 1, 201])
@pytest.mark.parametrize("act, lo, hi", [("relu", None, None), ("clip", -0.3, 2.71875)])
def test_integer_clip_is_exact(dtype, zp, act, lo, hi):
    zp = int(np.clip(zp, dtype.qmin, dtype.qmax))
    build = integer_activation_graph(dtype, zp, np.float32(0.0625), act, lo, hi)
    g = check_exact(build, fuse_activation, [codes(dtype)])
    noop = act == "relu" and zp == dtype.qmin  # the grid starts at 0: relu does nothing
    assert ops_of(g) == ({} if noop else {"clip": 1})


def test_relu_on_a_grid_starting_at_zero_is_no_node():
    build = integer_activation_graph(U8, 0, np.float32(0.1), "relu")
    g = check_exact(build, fuse_activation, [codes(U8)])
    assert len(g) == 0 and g.outputs[0] is g.inputs[0]


def test_integer_clip_preconditions():
    build = integer_activation_graph(I8, 3, 0.5, "relu", q_scale=0.25)
    with pytest.raises(Mismatch, match="not a clamp of q"):
        apply_rule(build(), integer_clip, "quantize")
    build = integer_activation_graph(I8, 3, 0.5, "relu", q_dtype=U8)
    with pytest.raises(Mismatch, match="int8 in, uint8 out"):
        apply_rule(build(), integer_clip, "quantize")


def float_activation_graph(act, lo=None, hi=None, *, dtype=I8, zp=-3, scale=0.25, clamp=None):
    def build():
        g = Graph()
        x = g.add_input("x", TensorType(F32, (64,)))
        a = activation(g, x, act, lo, hi)
        extra = {} if clamp is None else {"clamp": clamp}
        s, z = scalar(g, scale, F32, "s"), scalar(g, zp, dtype, "z")
        g.set_outputs([quantize(g, a, s, z, dtype, **extra)])
        return g

    return build


def float_feed(scale: float) -> np.ndarray:
    """NaN, infinities, signed zeros, ties (k + 1/2 steps) and far values."""
    ties = (np.arange(-20, 20) + 0.5) * scale
    special = [np.nan, -np.inf, np.inf, -0.0, 0.0, 1e30, -1e30, 3.0, -3.0]
    rng = np.random.default_rng(4)
    rest = rng.normal(0, 40 * scale, 64 - len(ties) - len(special))
    return np.concatenate([ties, special, rest]).astype(np.float32)


@pytest.mark.parametrize(
    "act, lo, hi, clamp",
    [
        ("relu", None, None, None),
        ("clip", 0.0, 6.0, None),
        ("clip", -1.125, 1.375, None),  # bounds on ties
        ("clip", None, 2.0, None),
        ("clip", -4.0, None, (-20, 100)),  # composes with an existing clamp
        ("clip", 3.0, -3.0, None),  # min > max: clip gives max everywhere
    ],
)
def test_clamp_into_quantize_is_exact(act, lo, hi, clamp):
    build = float_activation_graph(act, lo, hi, clamp=clamp)
    g = check_exact(build, fuse_activation, [float_feed(0.25)])
    assert set(ops_of(g)) == {"quantize"} and "clamp" in g.nodes[0].attrs


def test_clamp_into_quantize_preconditions():
    build = float_activation_graph("clip", float("nan"), 1.0)
    with pytest.raises(Mismatch, match="NaN bound"):
        apply_rule(build(), clamp_into_quantize, "quantize")
    g = float_activation_graph("relu")()
    g.set_outputs([*g.outputs, g.nodes[0].outputs[0]])  # relu output read elsewhere
    with pytest.raises(Mismatch, match="graph output"):
        apply_rule(g, clamp_into_quantize, "quantize")
    g = Graph()  # per-axis quantize
    x = g.add_input("x", TensorType(F32, (2, 3)))
    a = activation(g, x, "relu")
    s = g.constant(np.array([0.5, 0.25], np.float32))
    z = g.constant(np.array([0, 1], np.int8))
    g.set_outputs([quantize(g, a, s, z, I8, axis=0)])
    with pytest.raises(Mismatch, match="not per-tensor"):
        apply_rule(g, clamp_into_quantize, "quantize")
    assert not fuse_activation(g)


def test_as_shifted_clamp():
    q = np.arange(-128, 128)
    assert as_shifted_clamp(q, np.clip(q + 128, 100, 200)).shift == 128
    assert as_shifted_clamp(q, np.full(256, 7)).lo == 7
    assert as_shifted_clamp(q, np.clip(q, 0, 1)) is not None
    assert as_shifted_clamp(q, np.clip(2 * q, 0, 255)) is None
    assert as_shifted_clamp(q, np.where(q < 0, 0, 5)) is None


# ---- requantize_pairs ---------------------------------------------------------------


def dq_q_graph(in_dtype, in_scale, in_zp, out_dtype, out_scale, out_zp, chain=1, shared=False):
    """x -> (DQ -> Q) x chain, with the given parameters at every step."""

    def build():
        g = Graph()
        x = g.add_input("x", TensorType(in_dtype, (1 << in_dtype.bits,)))
        value, dtype, params = x, in_dtype, (in_scale, in_zp)
        middle = None
        for step in range(chain):
            s, z = scalar(g, params[0], F32, f"s{step}"), scalar(g, params[1], dtype, f"z{step}")
            d = dequantize(g, value, s, z, name=f"dq{step}")
            os, oz = (out_scale, out_zp) if step % 2 == 0 else (in_scale, in_zp)
            od = out_dtype if step % 2 == 0 else in_dtype
            value = quantize(g, d, scalar(g, os, F32, "os"), scalar(g, oz, od, "oz"), od)
            dtype, params = od, (os, oz)
            middle = middle or value
        g.set_outputs([value, middle] if shared else [value])
        return g

    return build


@FAST
@given(
    in_dtype=st.sampled_from([I8, U8, dtypes.int4]),
    out_dtype=st.sampled_from([I8, U8, I16]),
    in_scale=any_scales,
    ratio_exp=st.integers(-3, 3),
    pow2_ratio=st.booleans(),
    in_zp=st.integers(-128, 255),
    out_zp=st.integers(-128, 255),
)
def test_dq_q_becomes_an_exact_lookup(
    in_dtype, out_dtype, in_scale, ratio_exp, pow2_ratio, in_zp, out_zp
):
    in_zp = int(np.clip(in_zp, in_dtype.qmin, in_dtype.qmax))
    out_zp = int(np.clip(out_zp, out_dtype.qmin, out_dtype.qmax))
    factor = 2.0**ratio_exp if pow2_ratio else 1.37 * 2.0**ratio_exp
    out_scale = np.float32(in_scale * factor)
    build = dq_q_graph(in_dtype, in_scale, in_zp, out_dtype, out_scale, out_zp)
    identical = in_dtype == out_dtype and in_scale == out_scale and in_zp == out_zp
    g = check_exact(build, requantize_pairs, [codes(in_dtype)])
    assert ops_of(g) == ({} if identical else {"lookup": 1})


def test_lookup_chains_compose_into_one():
    build = dq_q_graph(I8, 0.1, 3, U8, 0.0625, 130, chain=4)
    assert ops_of(build()) == {"dequantize": 4, "quantize": 4}
    g = check_exact(build, requantize_pairs, [codes(I8)])
    assert ops_of(g) == {"lookup": 1}


def test_shared_lookup_is_not_composed():
    build = dq_q_graph(I8, 0.1, 3, U8, 0.0625, 130, chain=2, shared=True)
    g = check_exact(build, requantize_pairs, [codes(I8)])
    assert ops_of(g) == {"lookup": 2}
    outer = [n for n in g.nodes if n.op == "lookup"][1]
    with pytest.raises(Mismatch, match="graph output"):
        compose_lookups(Matcher(g), outer)


def test_dq_q_preconditions():
    g = dq_q_graph(I16, 0.5, 0, I8, 0.25, 0)()
    with pytest.raises(Mismatch, match="tables are built for <= 8-bit"):
        apply_rule(g, dq_q_to_lookup, "quantize")
    g = Graph()  # per-axis dequantize
    x = g.add_input("x", TensorType(I8, (2, 4)))
    s, z = g.constant(np.array([0.5, 0.25], np.float32)), g.constant(np.zeros(2, np.int8))
    d = g.add_node("dequantize", [x, s, z], {"axis": 0, "block_size": 0, "dtype": F32})
    g.set_outputs([quantize(g, d.outputs[0], scalar(g, 0.3, F32, "os"), None, U8)])
    with pytest.raises(Mismatch, match="not per-tensor"):
        apply_rule(g, dq_q_to_lookup, "quantize")
    assert not requantize_pairs(g)


def requantize_dq_q_graph(n, *, dtype, zp, scale, out_dtype, out_zp, out_scale, rounding):
    def build():
        g = Graph()
        acc = g.add_input("acc", TensorType(I32, (n,)))
        s, z = scalar(g, scale, F32, "s"), scalar(g, zp, dtype, "z")
        r = requantize(g, acc, 0.125, z, s, dtype, rounding)
        d = dequantize(g, r, s, z)
        os, oz = scalar(g, out_scale, F32, "os"), scalar(g, out_zp, out_dtype, "oz")
        g.set_outputs([quantize(g, d, os, oz, out_dtype)])
        return g

    return build


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype, zp, out_dtype, out_zp", [(I8, -5, U8, 123), (U8, 200, I8, 72),
                                                          (I8, 7, I8, -20)])  # fmt: skip
def test_requantize_then_zero_point_change_is_one_requantize(
    rounding, dtype, zp, out_dtype, out_zp
):
    acc = accumulators(0.125)
    build = requantize_dq_q_graph(
        acc.size, dtype=dtype, zp=zp, scale=0.5, out_dtype=out_dtype, out_zp=out_zp,
        out_scale=0.5, rounding=rounding,
    )  # fmt: skip
    g = check_exact(build, requantize_pairs, [acc])
    assert ops_of(g) == {"requantize": 1}
    (r,) = g.nodes
    assert r.attrs["dtype"] == out_dtype and int(r.input(2).const) == out_zp
    assert r.outputs[0].type.quant is not None and int(r.outputs[0].type.quant.zero_point) == out_zp


def test_requantize_then_rescale_stays_requantize_then_lookup():
    """A new scale would round twice: no single requantize, a table after it."""
    acc = accumulators(0.125)
    build = requantize_dq_q_graph(
        acc.size, dtype=I8, zp=1, scale=0.5, out_dtype=I8, out_zp=1, out_scale=0.25,
        rounding="half_even_float",
    )  # fmt: skip
    g = check_exact(build, requantize_pairs, [acc])
    assert ops_of(g) == {"lookup": 1, "requantize": 1}
    with pytest.raises(Mismatch, match="not a shifted clamp"):
        apply_rule(g, lookup_into_requantize, "lookup")


def test_shared_requantize_is_not_merged_into_the_lookup():
    acc = accumulators(0.125)
    plain = requantize_dq_q_graph(
        acc.size, dtype=I8, zp=1, scale=0.5, out_dtype=U8, out_zp=129, out_scale=0.5,
        rounding="half_even_float",
    )  # fmt: skip

    def build():
        g = plain()
        (r,) = [n for n in g.nodes if n.op == "requantize"]
        g.set_outputs([*g.outputs, r.outputs[0]])
        return g

    g = check_exact(build, requantize_pairs, [acc])
    assert ops_of(g) == {"lookup": 1, "requantize": 1}
    with pytest.raises(Mismatch, match="graph output"):
        apply_rule(g, lookup_into_requantize, "lookup")


# ---- the pipeline and the model zoo -------------------------------------------------


def test_passes_run_right_after_qdq_canonicalization():
    names = [p.name for p in PIPELINE]
    at = names.index("qdq_to_integer")
    assert names[at + 1 : at + 5] == [
        "fold_zero_points", "fuse_activation", "elementwise_tables", "requantize_pairs",
    ]  # fmt: skip


ZOO_CASES = [
    ("resnet_style", "qdq_s8s8_pt_sym_pow2"),
    ("mobilenetv2_style", "qdq_s8s8_pc_sym"),
    ("inception_style", "qdq_s8s8_pt_sym"),
    ("mlp_attention", "qoperator_u8s8_pc_pow2"),
    ("resnet_style", "qoperator_s8s8_pt"),
]


@pytest.mark.parametrize("model_name, variant_name", ZOO_CASES)
def test_zoo_models_unchanged_by_the_integer_rewrites(model_zoo, model_name, variant_name):
    """The whole pipeline with and without these passes: bit-identical outputs
    (inputs scaled into saturation), and no float relu/clip left."""
    import modelzoo

    from qnnjit.compiler import run_pipeline
    from qnnjit.frontends.onnx import load_onnx

    variant = {v.name: v for v in modelzoo.all_variants()}[variant_name]
    path = str(model_zoo.build(model_name, variant))
    mine = {"fold_zero_points", "fuse_activation", "requantize_pairs"}
    full, without = load_onnx(path), load_onnx(path)
    run_pipeline(full, verify=True)
    run_pipeline(without, [p for p in PIPELINE if p.name not in mine], verify=True)
    assert not [op for op, dtype in _all_ops(full) if op in ("relu", "clip") and dtype.is_float]
    for seed in range(3):
        x = modelzoo.example_input(model_name, seed=seed) * (1 + 2 * seed)
        np.testing.assert_array_equal(run(full, [x])[0], run(without, [x])[0])


def _all_ops(graph: Graph) -> list[tuple[str, object]]:
    """(op, output dtype) of every node, inside fused groups' bodies too."""
    found = []
    for node in graph.nodes:
        found.append((node.op, node.outputs[0].type.dtype))
        for body in node.attrs.values():
            if isinstance(body, Graph):
                found += _all_ops(body)
    return found
