"""Tests of qnnjit.numerics: hand-computed goldens at ties and saturation edges,
agreement with the onnx reference evaluator and ONNX Runtime on QuantizeLinear /
DequantizeLinear / DynamicQuantizeLinear / QLinearMatMul, and property tests over
each storage type's full range. Integer results compare exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qnnjit import numerics as nm
from qnnjit.ir import dtypes

SETTINGS = settings(max_examples=200, deadline=None)

INT_STORAGE = (
    dtypes.int2,
    dtypes.uint2,
    dtypes.int4,
    dtypes.uint4,
    dtypes.int8,
    dtypes.uint8,
    dtypes.int16,
    dtypes.uint16,
)
FLOAT8 = (
    dtypes.float8e4m3fn,
    dtypes.float8e4m3fnuz,
    dtypes.float8e5m2,
    dtypes.float8e5m2fnuz,
)
ONNX_TYPE = {
    dtypes.int2: TensorProto.INT2,
    dtypes.uint2: TensorProto.UINT2,
    dtypes.int4: TensorProto.INT4,
    dtypes.uint4: TensorProto.UINT4,
    dtypes.int8: TensorProto.INT8,
    dtypes.uint8: TensorProto.UINT8,
    dtypes.int16: TensorProto.INT16,
    dtypes.uint16: TensorProto.UINT16,
    dtypes.int32: TensorProto.INT32,
    dtypes.float8e4m3fn: TensorProto.FLOAT8E4M3FN,
    dtypes.float8e4m3fnuz: TensorProto.FLOAT8E4M3FNUZ,
    dtypes.float8e5m2: TensorProto.FLOAT8E5M2,
    dtypes.float8e5m2fnuz: TensorProto.FLOAT8E5M2FNUZ,
    dtypes.float4e2m1: TensorProto.FLOAT4E2M1,
}
F32 = np.float32


# ---------------------------------------------------------------------------
# Tiny ONNX models
# ---------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers=(), opset=21):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _vi(name, elem_type):
    return helper.make_tensor_value_info(name, elem_type, None)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _opset_for(dtype):
    return 25 if dtype in (dtypes.int2, dtypes.uint2) else 21


def quantize_model(dtype, zero_point, *, axis=1, block_size=0, saturate=1, unit_dq=False):
    """QuantizeLinear(x, s, zp) with zp an initializer (ORT's Python API cannot
    feed ml_dtypes arrays). unit_dq appends DequantizeLinear(q, 1, 0) so ORT
    returns sub-byte and float8 results as exact float32 values."""
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    if dtype.is_float:
        attrs["saturate"] = saturate
    inits = [_init("z", np.asarray(zero_point).astype(dtype.numpy))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs)]
    out = _vi("q", ONNX_TYPE[dtype])
    if unit_dq:
        inits += [_init("one", F32(1)), _init("zero", np.zeros((), dtype.numpy))]
        nodes.append(helper.make_node("DequantizeLinear", ["q", "one", "zero"], ["y"]))
        out = _vi("y", TensorProto.FLOAT)
    inputs = [_vi("x", TensorProto.FLOAT), _vi("s", TensorProto.FLOAT)]
    return _model(nodes, inputs, [out], inits, opset=_opset_for(dtype))


def dequantize_model(q, zero_point, scale_type=TensorProto.FLOAT, *, axis=1, block_size=0):
    """DequantizeLinear(q, s, zp) with q and zp as initializers, s an input."""
    storage = dtypes.from_numpy(q.dtype)
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    inits = [_init("q", q)]
    names = ["q", "s"]
    if zero_point is not None:
        inits.append(_init("z", np.asarray(zero_point).astype(q.dtype)))
        names.append("z")
    node = helper.make_node("DequantizeLinear", names, ["y"], **attrs)
    opset = _opset_for(storage)
    return _model([node], [_vi("s", scale_type)], [_vi("y", scale_type)], inits, opset=opset)


def run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_ref(model, feeds):
    return ReferenceEvaluator(model).run(None, feeds)


def assert_same_floats(actual, expected):
    """Equal values, NaN == NaN, and equal signs (so -0 != +0) off NaN."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    np.testing.assert_array_equal(actual, expected)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(np.signbit(actual[finite]), np.signbit(expected[finite]))


def probe_values(dtype, scale, rng, n=400):
    """x values whose x/scale lands on ties, next to ties, and past saturation."""
    lo, hi = (dtype.qmin, dtype.qmax) if dtype.is_int else (-dtype.max_finite, dtype.max_finite)
    k = rng.integers(int(lo) - 3, int(hi) + 3, n).astype(np.float64)
    ties = ((k + 0.5) * scale).astype(F32)
    near = np.concatenate([np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf))])
    wide = rng.uniform(2 * lo - 2, 2 * hi + 2, n) * scale
    return np.concatenate([ties, near, wide.astype(F32), F32([0.0, -0.0])])


FLOAT_SPECIALS = F32([np.nan, -np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0, 1e-30])


# ---------------------------------------------------------------------------
# Rounding goldens
# ---------------------------------------------------------------------------

TIES = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 0.49, -0.51, 7.0]


@pytest.mark.parametrize("ftype", [np.float16, np.float32, np.float64])
def test_round_half_even_goldens(ftype):
    got = nm.round_half_even(np.array(TIES, ftype))
    np.testing.assert_array_equal(got, np.array([0, 2, 2, 4, 0, -2, -2, -4, 0, -1, 7], ftype))
    assert got.dtype == ftype
    assert np.signbit(nm.round_half_even(ftype(-0.5)))  # -0.5 -> -0


@pytest.mark.parametrize("ftype", [np.float16, np.float32, np.float64])
def test_round_half_away_from_zero_goldens(ftype):
    got = nm.round_half_away_from_zero(np.array(TIES, ftype))
    np.testing.assert_array_equal(got, np.array([1, 2, 3, 4, -1, -2, -3, -4, 0, -1, 7], ftype))
    assert got.dtype == ftype


@pytest.mark.parametrize("ftype", [np.float16, np.float32, np.float64])
def test_round_half_up_goldens(ftype):
    got = nm.round_half_up(np.array(TIES, ftype))
    np.testing.assert_array_equal(got, np.array([1, 2, 3, 4, 0, -1, -2, -3, 0, -1, 7], ftype))
    assert got.dtype == ftype


def test_rounding_just_below_half_is_not_carried_up():
    # 0.5 - 2^-25 in float32: x + 0.5 would round to 1.0 and give a wrong answer.
    x = F32(0.5) - F32(2.0**-25)
    assert nm.round_half_away_from_zero(x) == 0
    assert nm.round_half_away_from_zero(-x) == 0
    assert nm.round_half_up(x) == 0
    assert nm.round_half_up(F32(-1.5) + F32(2.0**-23)) == -1
    big = F32(2.0**23 + 1)  # odd integers stay put
    assert nm.round_half_away_from_zero(big) == big and nm.round_half_up(big) == big


# ---------------------------------------------------------------------------
# saturate_int / expand_param
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INT_STORAGE + (dtypes.int32,), ids=str)
def test_saturate_int_edges(dtype):
    lo, hi = dtype.qmin, dtype.qmax
    x = np.array([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 10**12, -(10**12)], np.int64)
    got = nm.saturate_int(x, dtype)
    assert got.dtype == dtype.numpy
    expected = [lo, lo, lo + 1, hi - 1, hi, hi, hi, lo]
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    floats = nm.saturate_int(np.array([np.inf, -np.inf, np.nan, 1e20, -1e20, 1.0]), dtype)
    np.testing.assert_array_equal(floats.astype(np.int64), [hi, lo, lo, hi, lo, 1])


def test_expand_param_cases():
    shape = (2, 5, 3)
    assert nm.expand_param(np.float32(0.5), shape, 1).shape == ()
    assert nm.expand_param(np.array([0.5]), shape, 1).shape == ()
    per_axis = nm.expand_param(np.arange(5), shape, 1)
    assert per_axis.shape == (1, 5, 1)
    np.testing.assert_array_equal(nm.expand_param(np.arange(3), shape, -1).ravel(), [0, 1, 2])
    blocked = nm.expand_param(np.array([[10, 20, 30], [40, 50, 60]]), (2, 7), axis=1, block_size=3)
    np.testing.assert_array_equal(
        blocked, [[10, 10, 10, 20, 20, 20, 30], [40, 40, 40, 50, 50, 50, 60]]
    )
    blocked0 = nm.expand_param(np.array([[1, 2]]), (3, 2), axis=-2, block_size=4)
    np.testing.assert_array_equal(blocked0, [[1, 2], [1, 2], [1, 2]])


@pytest.mark.parametrize(
    "param, shape, axis, block_size, message",
    [
        (np.arange(4), (2, 5), 1, 0, "4 entries"),
        (np.arange(5), (2, 5), 2, 0, "out of range"),
        (np.ones((2, 5)), (2, 5), 1, 0, "1-D"),
        (np.ones((2, 2)), (2, 7), 1, 3, "must be"),
        (np.ones((3, 3)), (2, 7), 1, 3, "must be"),
        (np.ones(3), (2, 7), 1, 3, "must be"),
        (np.ones(3), (), 0, 0, "0-d"),
        (np.ones(3), (3,), 0, -1, "block_size"),
    ],
)
def test_expand_param_rejects_inconsistent_shapes(param, shape, axis, block_size, message):
    with pytest.raises(ValueError, match=message):
        nm.expand_param(param, shape, axis, block_size)


# ---------------------------------------------------------------------------
# quantize: goldens
# ---------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_after_division():
    x = F32([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    np.testing.assert_array_equal(
        nm.quantize(x, 1.0, np.int8(0), dtypes.int8), [0, 2, 2, 4, 0, -2, -2, -4]
    )
    # zero point is added after rounding: round(2.5) + 3 = 5, not round(5.5) = 6
    np.testing.assert_array_equal(
        nm.quantize(x, 1.0, np.uint8(3), dtypes.uint8), [3, 5, 5, 7, 3, 1, 1, 0]
    )
    # scale 0.5: 1.25 / 0.5 = 2.5 -> 2
    np.testing.assert_array_equal(
        nm.quantize(F32([1.25, 1.75]), F32(0.5), None, dtypes.int8), [2, 4]
    )


def test_quantize_divides_instead_of_multiplying_by_reciprocal():
    x, s = F32("10.542313"), F32("0.28112835")
    assert x / s == F32(37.5)  # a true tie after division...
    assert np.rint(x * (F32(1) / s)) == 37  # ...which the reciprocal misses
    assert nm.quantize(x, s, None, dtypes.int8) == 38


@pytest.mark.parametrize("dtype", INT_STORAGE + (dtypes.int32,), ids=str)
def test_quantize_saturation_edges(dtype):
    lo, hi = dtype.qmin, dtype.qmax
    zp = (lo + hi) // 2 if dtype.bits < 32 else 0
    x = np.array(
        [hi - zp, hi - zp + 0.5, hi - zp + 1, lo - zp, lo - zp - 0.5, lo - zp - 1],
        np.float64,
    )
    if dtype.bits < 32:
        got = nm.quantize(x.astype(F32), 1.0, zp, dtype).astype(np.int64)
        np.testing.assert_array_equal(got, [hi, hi, hi, lo, lo, lo])
    specials = nm.quantize(F32([np.inf, -np.inf, np.nan, 3e38, -3e38]), 1.0, zp, dtype)
    assert specials.dtype == dtype.numpy
    np.testing.assert_array_equal(specials.astype(np.int64), [hi, lo, lo, hi, lo])


def test_quantize_int32_target_saturates_in_int64():
    got = nm.quantize(F32([2.0**31, -(2.0**31), 2.0**30, 1e12]), 1.0, None, dtypes.int32)
    np.testing.assert_array_equal(got, [2**31 - 1, -(2**31), 2**30, 2**31 - 1])


def test_quantize_per_axis_golden():
    x = F32([[1.0, 1.0, 1.0], [-3.0, 2.5, 5.0]])
    scale = F32([0.5, 2.0, 1.0])
    zp = np.uint8([0, 10, 128])
    got = nm.quantize(x, scale, zp, dtypes.uint8, axis=1)
    np.testing.assert_array_equal(got, [[2, 10, 129], [0, 11, 133]])
    got_rows = nm.quantize(x, F32([1.0, 2.0]), np.int8([0, -1]), dtypes.int8, axis=0)
    np.testing.assert_array_equal(got_rows, [[1, 1, 1], [-3, 0, 1]])
    np.testing.assert_array_equal(nm.quantize(x, scale, zp, dtypes.uint8, axis=-1), got)


def test_quantize_blocked_golden_with_remainder_block():
    x = np.arange(10, dtype=F32).reshape(2, 5)
    scale = F32([[1.0, 2.0], [4.0, 0.5]])  # blocks of 3 columns: [0:3], [3:5]
    zp = np.int8([[0, 1], [-1, 0]])
    got = nm.quantize(x, scale, zp, dtypes.int8, axis=1, block_size=3)
    # row 0: 0,1,2 /1 ; 3/2=1.5->2 +1, 4/2=2 +1 ; row 1: 5/4=1.25->1 -1, 1.5->2 -1, 1.75->2 -1,
    # 8/0.5=16, 9/0.5=18
    np.testing.assert_array_equal(got, [[0, 1, 2, 3, 3], [0, 1, 1, 16, 18]])


def test_quantize_zero_point_none_is_zero_of_the_type():
    x = F32([-3.0, 3.0])
    np.testing.assert_array_equal(nm.quantize(x, 1.0, None, dtypes.uint8), [0, 3])
    assert nm.quantize(x, 1.0, None, dtypes.uint4).dtype == ml_dtypes.uint4


def test_quantize_rejects_bad_zero_point_and_target():
    with pytest.raises(ValueError, match="outside the range"):
        nm.quantize(F32([1.0]), 1.0, 300, dtypes.uint8)
    with pytest.raises(ValueError, match="cannot quantize"):
        nm.quantize(F32([1.0]), 1.0, None, dtypes.float32)


@pytest.mark.parametrize("ftype", [np.float16, ml_dtypes.bfloat16])
def test_quantize_half_precision_inputs_compute_in_float32(ftype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(2000) * 40).astype(ftype)
    scale = F32(0.3)
    np.testing.assert_array_equal(
        nm.quantize(x, scale, np.int8(2), dtypes.int8),
        nm.quantize(x.astype(F32), scale, np.int8(2), dtypes.int8),
    )


def test_quantize_precision_float16_divides_in_float16():
    # 20.64 / 5.9 is 3.49934 in float32 but rounds to 3.5 in float16 -> 4 (tie to even)
    x, s = np.float16(20.64), np.float16(5.9)
    assert F32(x) / F32(s) < 3.5 and x / s == np.float16(3.5)
    assert nm.quantize(x, s, None, dtypes.int8) == 3
    assert nm.quantize(x, s, None, dtypes.int8, precision=dtypes.float16) == 4


# ---------------------------------------------------------------------------
# quantize: float8 / float4
# ---------------------------------------------------------------------------


def bits(a):
    return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_special_values(dtype):
    mx = F32(dtype.max_finite)
    fnuz = dtype.name.endswith("fnuz")
    x = F32([np.inf, -np.inf, 2 * mx, -2 * mx, np.nan, 0.0, -0.0, mx])
    sat = nm.quantize(x, 1.0, None, dtype, saturate=True).astype(F32)
    assert_same_floats(sat[:4], [mx, -mx, mx, -mx])
    assert np.isnan(sat[4])
    assert_same_floats(sat[5:], [0.0, 0.0 if fnuz else -0.0, mx])
    raw = nm.quantize(x, 1.0, None, dtype, saturate=False).astype(F32)
    if dtype == dtypes.float8e5m2:
        assert_same_floats(raw[:4], [np.inf, -np.inf, np.inf, -np.inf])
    else:
        assert np.all(np.isnan(raw[:4]))
    assert np.isnan(raw[4])
    assert_same_floats(raw[5:], [0.0, 0.0 if fnuz else -0.0, mx])


def test_float8_nan_sign_is_kept_where_encodable():
    neg_nan = -F32(np.nan)
    assert bits(nm.quantize(neg_nan, 1.0, None, dtypes.float8e4m3fn)) == 0xFF
    assert bits(nm.quantize(F32(-np.inf), 1.0, None, dtypes.float8e4m3fn, saturate=False)) == 0xFF
    assert bits(nm.quantize(neg_nan, 1.0, None, dtypes.float8e4m3fnuz)) == 0x80  # the only NaN


def test_float8_overflow_boundary_is_after_rounding():
    # e4m3fn: 448 is the max; the next grid point would be 480, so values below
    # the midpoint 464 round to 448 and are not overflow; 464 ties to even (448).
    below = nm.quantize(F32([463.9, 464.0, 464.1]), 1.0, None, dtypes.float8e4m3fn, saturate=False)
    assert_same_floats(below.astype(F32)[:2], [448, 448])
    assert np.isnan(below.astype(F32)[2])
    e5 = nm.quantize(F32([61439.0, 61440.0]), 1.0, None, dtypes.float8e5m2, saturate=False)
    assert_same_floats(e5.astype(F32), [57344, np.inf])  # 61440 ties to even: 2^16 = inf


@pytest.mark.parametrize("dtype", FLOAT8 + (dtypes.float4e2m1,), ids=str)
def test_small_float_rounding_is_nearest_even_exhaustively(dtype):
    """Every midpoint between neighbouring grid values rounds to the neighbour
    with an even significand (bit pattern ending in 0); points just off the
    midpoint round to the nearer one."""
    codes = np.arange(2**dtype.bits, dtype=np.uint8)
    values = codes.view(dtype.numpy).astype(np.float64)
    keep = np.isfinite(values) & ~np.signbit(values)
    codes_pos, values = codes[keep], values[keep]
    order = np.argsort(values)
    codes_pos, values = codes_pos[order], values[order]
    mid = ((values[:-1] + values[1:]) / 2).astype(F32)
    assert np.all(mid.astype(np.float64) == (values[:-1] + values[1:]) / 2)
    even_is_upper = (codes_pos[1:] & 1) == 0
    expected = np.where(even_is_upper, values[1:], values[:-1])
    got = nm.quantize(mid, 1.0, None, dtype).astype(np.float64)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(nm.quantize(-mid, 1.0, None, dtype).astype(np.float64), -expected)
    up = nm.quantize(np.nextafter(mid, F32(np.inf)), 1.0, None, dtype).astype(np.float64)
    np.testing.assert_array_equal(up, values[1:])
    down = nm.quantize(np.nextafter(mid, F32(-np.inf)), 1.0, None, dtype).astype(np.float64)
    np.testing.assert_array_equal(down, values[:-1])


def test_float4_follows_the_onnx_float4_cast_table():
    x = F32([np.nan, np.inf, -np.inf, 7.0, -100.0, -0.0, 0.25, 0.75, 2.5, 5.0, -5.0])
    for saturate in (True, False):
        got = nm.quantize(x, 1.0, None, dtypes.float4e2m1, saturate=saturate).astype(F32)
        assert_same_floats(got, [6, 6, -6, 6, -6, -0.0, 0, 1, 2, 4, -4])


@pytest.mark.parametrize("dtype", FLOAT8 + (dtypes.float4e2m1,), ids=str)
def test_small_float_dequantize_quantize_roundtrip_is_bit_exact(dtype):
    codes = np.arange(2**dtype.bits, dtype=np.uint8).view(dtype.numpy)
    finite = np.isfinite(codes.astype(F32))
    codes = codes[finite]
    for scale in (F32(1.0), F32(0.25), F32(8.0)):
        x = nm.dequantize(codes, scale, None)
        back = nm.quantize(x, scale, None, dtype)
        np.testing.assert_array_equal(bits(back), bits(codes))


def test_float8_zero_point_zero_keeps_negative_zero():
    q = nm.quantize(F32([-0.0]), 1.0, np.zeros((), ml_dtypes.float8_e4m3fn), dtypes.float8e4m3fn)
    assert bits(q)[0] == 0x80


# ---------------------------------------------------------------------------
# quantize: agreement with the onnx reference evaluator and ONNX Runtime
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", INT_STORAGE, ids=str)
def test_quantize_matches_onnx_reference_int(dtype):
    rng = np.random.default_rng(dtype.bits * 7 + dtype.signed)
    scale = F32(2.0**-3)  # power of two: (k + 0.5) * scale is exact, a true tie
    zp = np.array((dtype.qmin + dtype.qmax + 1) // 2)
    x = probe_values(dtype, float(scale), rng)
    expected = run_ref(quantize_model(dtype, zp), {"x": x, "s": np.array(scale)})[0]
    assert expected.dtype == dtype.numpy
    np.testing.assert_array_equal(nm.quantize(x, scale, zp, dtype), expected)
    scale = F32(rng.uniform(0.01, 3))
    x = probe_values(dtype, float(scale), rng)
    expected = run_ref(quantize_model(dtype, zp), {"x": x, "s": np.array(scale)})[0]
    np.testing.assert_array_equal(nm.quantize(x, scale, zp, dtype), expected)


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("saturate", [1, 0])
def test_quantize_matches_onnx_reference_float8(dtype, saturate):
    rng = np.random.default_rng(saturate)
    for scale in (F32(1.0), F32(0.125), F32(rng.uniform(0.01, 3))):
        x = np.concatenate([probe_values(dtype, float(scale), rng), FLOAT_SPECIALS])
        model = quantize_model(dtype, 0, saturate=saturate)
        expected = run_ref(model, {"x": x, "s": np.array(scale)})[0]
        got = nm.quantize(x, scale, None, dtype, saturate=bool(saturate))
        np.testing.assert_array_equal(bits(got), bits(expected))


def test_quantize_matches_onnx_reference_float4():
    """The reference evaluator maps NaN to +-0 through ml_dtypes while the ONNX
    float4 spec says 6 (we follow the spec), and it adds a +0 zero point
    (turning -0 into +0); both are left out here and pinned by goldens above."""
    rng = np.random.default_rng(4)
    dtype = dtypes.float4e2m1
    attrs = {"output_dtype": TensorProto.FLOAT4E2M1}
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], **attrs)
    model = _model(
        [node],
        [_vi("x", TensorProto.FLOAT), _vi("s", TensorProto.FLOAT)],
        [_vi("q", ONNX_TYPE[dtype])],
    )
    for scale in (F32(1.0), F32(0.5), F32(rng.uniform(0.01, 3))):
        x = np.concatenate([probe_values(dtype, float(scale), rng), FLOAT_SPECIALS])
        x = x[~np.isnan(x)]
        expected = run_ref(model, {"x": x, "s": np.array(scale)})[0]
        got = nm.quantize(x, scale, None, dtype)
        np.testing.assert_array_equal(bits(got), bits(expected))


def _ort_deviation(dtype, saturate, v):
    """ONNX Runtime 1.31 results that break the spec (found by a dense scan):
    saturate=False E4M3FN gives +-448 for |v| in [480, 496) (spec: NaN), E5M2
    gives NaN for |v| in [61440, 65536) (spec: +-Inf); int2/uint2 give qmin for
    every |v| >= 2^31 and +-inf (an unsaturated int32 cast; spec: saturate).
    NaN -> integer is undefined by the spec; ORT gives qmin, as we do."""
    a = np.abs(v)
    if dtype == dtypes.float8e4m3fn and not saturate:
        return (a >= 480) & (a < 496)
    if dtype == dtypes.float8e5m2 and not saturate:
        return (a >= 61440) & (a < 65536)
    if dtype in (dtypes.int2, dtypes.uint2):
        return a >= 2.0**31
    return np.zeros(v.shape, bool)


ORT_QUANTIZE_CASES = [(d, 1) for d in INT_STORAGE] + [(d, s) for d in FLOAT8 for s in (1, 0)]


@pytest.mark.parametrize("dtype, saturate", ORT_QUANTIZE_CASES, ids=str)
def test_quantize_matches_onnxruntime(dtype, saturate):
    rng = np.random.default_rng(11)
    zp = np.array(0 if dtype.is_float else (dtype.qmin + dtype.qmax + 1) // 2)
    model = quantize_model(dtype, zp, saturate=saturate, unit_dq=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for scale in (F32(0.25), F32(rng.uniform(0.01, 3))):
        x = np.concatenate([probe_values(dtype, float(scale), rng), FLOAT_SPECIALS])
        with np.errstate(all="ignore"):
            keep = ~_ort_deviation(dtype, saturate, x / scale)
        x = x[keep]
        got = session.run(None, {"x": x, "s": np.array(scale)})[0]
        zpv = zp if dtype.is_int else None
        ours = nm.quantize(x, scale, zpv, dtype, saturate=bool(saturate))
        assert_same_floats(ours.astype(F32), got)


def test_quantize_per_axis_and_blocked_match_reference_and_onnxruntime():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 8, 5)) * 20).astype(F32)
    for dtype in (dtypes.int8, dtypes.uint8, dtypes.int4, dtypes.uint4, dtypes.int16):
        lo, hi = dtype.qmin, dtype.qmax
        scale = (2.0 ** rng.integers(-3, 2, 8)).astype(F32)
        zp = rng.integers(lo, hi + 1, 8)
        model = quantize_model(dtype, zp, axis=1, unit_dq=True)
        ours = nm.quantize(x, scale, zp.astype(dtype.numpy), dtype, axis=1)
        np.testing.assert_array_equal(ours.astype(F32), run_ort(model, {"x": x, "s": scale})[0])
        model = quantize_model(dtype, zp, axis=1)
        np.testing.assert_array_equal(ours, run_ref(model, {"x": x, "s": scale})[0])
        # blocked along the last axis, block 2 over 5 -> 3 blocks, last one short
        bscale = (2.0 ** rng.integers(-3, 2, (3, 8, 3))).astype(F32)
        bzp = rng.integers(lo, hi + 1, (3, 8, 3))
        model = quantize_model(dtype, bzp, axis=-1, block_size=2)
        ours = nm.quantize(x, bscale, bzp, dtype, axis=-1, block_size=2)
        np.testing.assert_array_equal(ours, run_ref(model, {"x": x, "s": bscale})[0])


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------


def test_dequantize_goldens():
    q = np.array([-128, 0, 127], np.int8)
    np.testing.assert_array_equal(nm.dequantize(q, F32(0.5), np.int8(-1)), F32([-63.5, 0.5, 64]))
    q32 = np.array([2**31 - 1, -(2**31), 2**24 + 1], np.int32)
    np.testing.assert_array_equal(
        nm.dequantize(q32, F32(1.0), None), F32([2.0**31, -(2.0**31), 2.0**24])
    )
    # uint16 - zp done in int64, never wrapping
    q16 = np.array([0, 65535], np.uint16)
    np.testing.assert_array_equal(nm.dequantize(q16, 1.0, np.uint16(65535)), F32([-65535, 0]))
    assert nm.dequantize(q, np.float16(0.5), np.int8(0), out_dtype=None).dtype == np.float16
    assert nm.dequantize(q, np.float16(0.5), np.int8(0)).dtype == np.float32


def test_dequantize_per_axis_and_blocked():
    q = np.arange(12, dtype=np.uint8).reshape(3, 4)
    got = nm.dequantize(q, F32([1, 2, 4]), np.uint8([0, 1, 2]), axis=0)
    np.testing.assert_array_equal(got, (q - np.array([[0], [1], [2]])) * np.array([[1], [2], [4]]))
    got = nm.dequantize(q, F32([[1, 10], [2, 20], [3, 30]]), None, axis=1, block_size=3)
    np.testing.assert_array_equal(got, q * np.array([[1, 1, 1, 10], [2, 2, 2, 20], [3, 3, 3, 30]]))


@pytest.mark.parametrize("dtype", INT_STORAGE + (dtypes.int32,), ids=str)
def test_dequantize_matches_reference_and_onnxruntime_int(dtype):
    rng = np.random.default_rng(dtype.bits)
    if dtype.bits <= 16:
        q = np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy)
    else:
        q = np.concatenate([rng.integers(dtype.qmin, dtype.qmax, 2000), [dtype.qmin, dtype.qmax]])
        q = q.astype(dtype.numpy)
    zp = None if dtype == dtypes.int32 else np.array(rng.integers(dtype.qmin, dtype.qmax + 1))
    scale = np.array(F32(rng.uniform(0.001, 2)))
    ours = nm.dequantize(q, scale, zp)
    model = dequantize_model(q, zp)
    np.testing.assert_array_equal(ours, run_ref(model, {"s": scale})[0])
    np.testing.assert_array_equal(ours, run_ort(model, {"s": scale})[0])


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_dequantize_matches_reference_and_onnxruntime_float8(dtype):
    q = np.arange(256, dtype=np.uint8).view(dtype.numpy)
    scale = np.array(F32(0.375))
    ours = nm.dequantize(q, scale, np.zeros((), dtype.numpy))
    model = dequantize_model(q, np.zeros((), dtype.numpy))
    assert_same_floats(ours, run_ref(model, {"s": scale})[0])
    assert_same_floats(ours, run_ort(model, {"s": scale})[0])


def test_dequantize_float16_scale_matches_onnxruntime():
    q = np.arange(-32768, 32768).astype(np.int16)
    scale = np.array(np.float16(0.0123))
    ours = nm.dequantize(q, scale, np.int16(7), out_dtype=None)
    model = dequantize_model(q, np.int16(7), TensorProto.FLOAT16)
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours, run_ort(model, {"s": scale})[0])
    np.testing.assert_array_equal(ours, run_ref(model, {"s": scale})[0])


def test_dequantize_sub_byte_and_float4_match_reference():
    q4 = np.arange(-8, 8).astype(ml_dtypes.int4)
    scale = np.array(F32(0.75))
    model = dequantize_model(q4, np.array(-3))
    np.testing.assert_array_equal(
        nm.dequantize(q4, scale, np.array(-3)), run_ref(model, {"s": scale})[0]
    )
    f4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -6], ml_dtypes.float4_e2m1fn)
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"])
    model = _model(
        [node], [_vi("s", TensorProto.FLOAT)], [_vi("y", TensorProto.FLOAT)], [_init("q", f4)]
    )
    assert_same_floats(nm.dequantize(f4, scale, None), run_ref(model, {"s": scale})[0])


# ---------------------------------------------------------------------------
# requantize_float (ONNX Runtime's MLAS path)
# ---------------------------------------------------------------------------


def test_requantize_float_goldens():
    acc = np.array([1, 3, 5, -1, -3, -5, 7, 1000, -1000], np.int32)
    got = nm.requantize_float(acc, 0.5, 0, dtypes.int8)
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2, -2, 4, 127, -128])
    got = nm.requantize_float(acc, 0.5, 10, dtypes.uint8)
    np.testing.assert_array_equal(got, [10, 12, 12, 10, 8, 8, 14, 255, 0])
    # float32(acc) rounds above 2^24: 2^24 + 1 -> 2^24 before the multiply
    got = nm.requantize_float(np.array([2**24 + 1, 2**24 + 3]), 1.0, 0, dtypes.int32)
    np.testing.assert_array_equal(got, [2**24, 2**24 + 4])
    # the multiplier is a float32: 25 * float32(0.1) = 2.50000003725 exactly, which the
    # float32 multiply rounds to 2.5, a tie -> 2; in float64 it would round to 3
    assert nm.requantize_float(np.array([25]), 0.1, 0, dtypes.int8)[0] == 2
    assert np.rint(25 * np.float64(F32(0.1))) == 3


def test_requantize_float_per_channel():
    acc = np.array([[3, 3, 3], [-3, -3, -3]], np.int32)
    got = nm.requantize_float(acc, F32([0.5, 1.0, 2.0]), np.array([0, 1, 2]), dtypes.int8, axis=1)
    np.testing.assert_array_equal(got, [[2, 4, 8], [-2, -2, -4]])
    with pytest.raises(ValueError, match="needs an axis"):
        nm.requantize_float(acc, F32([0.5, 1.0, 2.0]), 0, dtypes.int8)


def _qlinear_matmul(a, b, a_s, a_zp, b_s, b_zp, y_s, y_zp):
    names = ["a", "a_s", "a_zp", "b", "b_s", "b_zp", "y_s", "y_zp"]
    values = dict(a_s=a_s, a_zp=a_zp, b=b, b_s=b_s, b_zp=b_zp, y_s=y_s, y_zp=y_zp)
    inits = [_init(k, v) for k, v in values.items()]
    node = helper.make_node("QLinearMatMul", names, ["y"])
    model = _model([node], [_vi("a", TensorProto.UINT8)], [_vi("y", TensorProto.UINT8)], inits)
    return run_ort(model, {"a": a})[0]


@pytest.mark.parametrize("power_of_two", [True, False])
def test_requantize_float_matches_onnxruntime_qlinearmatmul(power_of_two):
    rng = np.random.default_rng(int(power_of_two))
    a = rng.integers(0, 32, (64, 4)).astype(np.uint8)
    b = rng.integers(0, 32, (4, 48)).astype(np.uint8)
    a_zp, b_zp = (np.uint8(v) for v in rng.integers(0, 32, 2))
    y_zp = np.uint8(100)
    if power_of_two:  # a_s * b_s / y_s = 2^-5: every acc = 16 mod 32 is a tie
        a_s, b_s, y_s = F32(2.0**-3), F32(2.0**-4), F32(2.0**-2)
    else:
        a_s, b_s, y_s = rng.uniform(0.001, 0.1, 3).astype(F32)
    y = _qlinear_matmul(a, b, a_s, a_zp, b_s, b_zp, y_s, y_zp)
    acc = (a.astype(np.int64) - a_zp) @ (b.astype(np.int64) - b_zp)
    multiplier = F32(a_s * b_s) / y_s  # ORT: a_scale * b_scale / y_scale in float32
    if power_of_two:
        assert np.sum(acc % 32 == 16) > 50
    np.testing.assert_array_equal(nm.requantize_float(acc, multiplier, y_zp, dtypes.uint8), y)


# ---------------------------------------------------------------------------
# Fixed point: quantize_multiplier, SRDHM, RDBPOT, requantize_fixed_point
# ---------------------------------------------------------------------------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def test_quantize_multiplier_goldens():
    assert nm.quantize_multiplier(0.0) == (0, 0)
    assert nm.quantize_multiplier(0.5) == (2**30, 0)
    assert nm.quantize_multiplier(1.0) == (2**30, 1)
    assert nm.quantize_multiplier(0.25) == (2**30, -1)
    assert nm.quantize_multiplier(0.75) == (3 * 2**29, 0)
    assert nm.quantize_multiplier(3.0) == (3 * 2**29, 2)
    # q * 2^31 rounds up to 2^31: halve and bump the shift
    assert nm.quantize_multiplier(1 - 2.0**-40) == (2**30, 1)
    # tiny multipliers flush to zero
    assert nm.quantize_multiplier(2.0**-33) == (0, 0)
    assert nm.quantize_multiplier(2.0**-32) == (2**30, -31)
    assert nm.quantize_multiplier(-0.5) == (-(2**30), 0)
    # single rounding caps the shift at 30
    assert nm.quantize_multiplier(2.0**31, single_rounding=True) == (INT32_MAX, 30)
    with pytest.raises(ValueError):
        nm.quantize_multiplier(-0.5, single_rounding=True)
    with pytest.raises(ValueError):
        nm.quantize_multiplier(np.inf)


def test_quantize_multiplier_vectorized_equals_scalar():
    reals = np.array([0.0, 1e-12, 0.3, 0.5, 1 - 2.0**-40, 7.25, 2.0**-32, 1234.5])
    m, s = nm.quantize_multiplier(reals)
    assert m.dtype == np.int32 and m.shape == reals.shape
    assert [(int(a), int(b)) for a, b in zip(m, s, strict=True)] == [
        nm.quantize_multiplier(r) for r in reals
    ]


@SETTINGS
@given(st.floats(min_value=2.0**-32, max_value=2.0**31, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_reconstructs_real(real):
    m, shift = nm.quantize_multiplier(real)
    assert 2**30 <= m < 2**31
    rebuilt = Fraction(m) * Fraction(2) ** (shift - 31)
    assert abs(rebuilt - Fraction(real)) <= Fraction(real) * Fraction(1, 2**31)


def test_srdhm_goldens():
    srdhm = nm.saturating_rounding_doubling_high_mul
    assert srdhm(INT32_MIN, INT32_MIN) == INT32_MAX  # the single overflow case
    assert srdhm(INT32_MIN, INT32_MAX) == -INT32_MAX
    assert srdhm(INT32_MAX, INT32_MAX) == INT32_MAX - 1
    half = 2**30  # multiplier 0.5
    np.testing.assert_array_equal(
        srdhm(np.array([1, 3, 5, -1, -3, -5, 7, -7]), half), [1, 2, 3, 0, -1, -2, 4, -3]
    )  # ties go towards +inf: 0.5 -> 1, -0.5 -> 0, -1.5 -> -1
    assert srdhm(np.array([5]), np.array([3 * 2**29])).dtype == np.int32  # 3.75 -> 4
    assert srdhm(5, 3 * 2**29) == 4


def test_rounding_divide_by_pot_goldens():
    rdbpot = nm.rounding_divide_by_pot
    x = np.array([5, -5, 6, -6, 7, -7, 4, -4, 0], np.int32)
    np.testing.assert_array_equal(rdbpot(x, 1), [3, -3, 3, -3, 4, -4, 2, -2, 0])
    np.testing.assert_array_equal(rdbpot(x, 2), [1, -1, 2, -2, 2, -2, 1, -1, 0])
    np.testing.assert_array_equal(rdbpot(x, 0), x)
    assert rdbpot(np.int32(INT32_MIN), 31) == -1
    assert rdbpot(np.int32(INT32_MAX), 31) == 1
    np.testing.assert_array_equal(rdbpot(np.array([12, 12, 12]), np.array([1, 2, 3])), [6, 3, 2])
    with pytest.raises(ValueError):
        rdbpot(x, -1)


def test_requantize_fixed_point_goldens():
    m, s = nm.quantize_multiplier(0.5)
    acc = np.array([1, 3, -1, -3, 5, -5, 300, -300], np.int32)
    # double rounding: SRDHM by 0.5 with shift 0 -> ties towards +inf
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(acc, m, s, 0, dtypes.int8), [1, 2, 0, -1, 3, -2, 127, -128]
    )
    m, s = nm.quantize_multiplier(0.25)  # m = 2^30, shift = -1: SRDHM (exact /2) then RDBPOT
    # exact: 0.25 0.75 -0.25 -0.75 1.25 -1.25 75 -75. Double rounding rounds twice:
    # 1 -> SRDHM 0.5 -> 1 -> RDBPOT 0.5 -> 1, and 5 -> 2.5 -> 3 -> 1.5 -> 2.
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(acc, m, s, 0, dtypes.int8), [1, 1, 0, -1, 2, -1, 75, -75]
    )
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(acc, m, s, 0, dtypes.int8, double_rounding=False),
        [0, 1, 0, -1, 1, -1, 75, -75],
    )
    # the classic double-rounding discrepancy: acc=6 * 0.25 = 1.5
    # double: SRDHM(6, 2^30) = 3 (exact), RDBPOT(3, 1) = 2 ; single: floor(1.5 + .5) = 2
    # acc=-6: double: -3 -> RDBPOT away from zero -> -2 ; single: floor(-1.5+.5) = -1
    acc = np.array([6, -6, 10, -10], np.int32)
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(acc, m, s, 0, dtypes.int8), [2, -2, 3, -3]
    )
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(acc, m, s, 0, dtypes.int8, double_rounding=False), [2, -1, 3, -2]
    )
    # zero point and saturation
    np.testing.assert_array_equal(
        nm.requantize_fixed_point(np.array([1000, -1000, 4]), m, s, 100, dtypes.uint8),
        [255, 0, 101],
    )


def test_requantize_fixed_point_left_shift_and_per_channel():
    m, s = nm.quantize_multiplier(3.0)  # shift 2: acc << 2 then SRDHM by 0.75
    assert s == 2
    got = nm.requantize_fixed_point(np.array([1, -1, 10, 50]), m, s, 0, dtypes.int8)
    np.testing.assert_array_equal(got, [3, -3, 30, 127])
    ms, ss = nm.quantize_multiplier(np.array([0.5, 0.25]))
    acc = np.array([[6, 6], [-6, -6]], np.int32)
    got = nm.requantize_fixed_point(acc, ms, ss, np.array([0, 1]), dtypes.int8, axis=1)
    np.testing.assert_array_equal(got, [[3, 3], [-3, -1]])


def test_requantize_fixed_point_rejects_out_of_range():
    with pytest.raises(ValueError, match="int32"):
        nm.requantize_fixed_point(np.array([2**31]), 2**30, 0, 0, dtypes.int8)
    with pytest.raises(ValueError, match="shift"):
        nm.requantize_fixed_point(np.array([1]), 2**30, 31, 0, dtypes.int8, double_rounding=False)


def _exact_round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def _exact_round_half_away(value: Fraction) -> int:
    r = math.floor(abs(value) + Fraction(1, 2))
    return r if value >= 0 else -r


REAL_MULTIPLIERS = st.one_of(
    st.floats(min_value=2.0**-24, max_value=4.0, allow_nan=False),
    st.sampled_from([2.0**-k for k in range(0, 20)] + [0.75, 1.5, 3.0]),
)


@SETTINGS
@given(
    real=REAL_MULTIPLIERS, accs=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=8)
)
def test_requantize_fixed_point_matches_exact_rationals(real, accs):
    m, shift = nm.quantize_multiplier(real)
    left, right = max(shift, 0), max(-shift, 0)
    accs = [a >> left for a in accs]  # keep acc << left inside int32 (no wrap)
    acc = np.array(accs, np.int64)
    single = nm.requantize_fixed_point(acc, m, shift, 0, dtypes.int32, double_rounding=False)
    double = nm.requantize_fixed_point(acc, m, shift, 0, dtypes.int32)
    for a, got_single, got_double in zip(accs, single.tolist(), double.tolist(), strict=True):
        exact_q = Fraction(a * m) * Fraction(2) ** (shift - 31)
        # single rounding: round half up of the exact rational with the quantized multiplier
        assert got_single == min(max(_exact_round_half_up(exact_q), INT32_MIN), INT32_MAX)
        # double rounding: round half up to 31 bits, then half away from zero by 2^right
        step1 = _exact_round_half_up(Fraction(a * 2**left * m, 2**31))
        assert got_double == _exact_round_half_away(Fraction(step1, 2**right))
        # both stay within 1 of the real-valued result
        if abs(a * real) < 2**30:
            target = _exact_round_half_away(Fraction(a) * Fraction(real))
            assert abs(got_single - target) <= 1 and abs(got_double - target) <= 1


# ---------------------------------------------------------------------------
# DynamicQuantizeLinear
# ---------------------------------------------------------------------------

DYNAMIC_MODEL = _model(
    [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
    [_vi("x", TensorProto.FLOAT)],
    [_vi("y", TensorProto.UINT8), _vi("s", TensorProto.FLOAT), _vi("z", TensorProto.UINT8)],
)


def _dynamic_inputs():
    rng = np.random.default_rng(9)
    return [
        F32([0.0, 0.1, -0.3, 5.0, 7.7]),
        F32([1.0, 2.0, 3.0]),  # all positive: range is [0, 3]
        F32([-1.0, -2.0]),  # all negative: zp = 255
        F32([-1.0, 1.0, 0.5, -0.5]),
        (rng.standard_normal((4, 33)) * 3).astype(F32),
        rng.uniform(-0.01, 100, 500).astype(F32),
        F32([-2.0, 0.0, 2.0 * 255.0 / 2.0]),
    ]


@pytest.mark.parametrize("case", range(len(_dynamic_inputs())))
def test_dynamic_quantize_matches_onnxruntime_and_reference(case):
    x = _dynamic_inputs()[case]
    y, scale, zp = nm.dynamic_quantize_uint8(x)
    assert y.dtype == np.uint8 and scale.dtype == np.float32 and zp.dtype == np.uint8
    for expected in (run_ort(DYNAMIC_MODEL, {"x": x}), run_ref(DYNAMIC_MODEL, {"x": x})):
        np.testing.assert_array_equal(y, expected[0])
        assert scale == expected[1]
        assert zp == expected[2]


def test_dynamic_quantize_all_zeros():
    """ONNX Runtime returns scale 1.0, the onnx reference evaluator 1/255."""
    x = np.zeros((2, 3), F32)
    y, scale, zp = nm.dynamic_quantize_uint8(x)
    ort_y, ort_scale, ort_zp = run_ort(DYNAMIC_MODEL, {"x": x})
    np.testing.assert_array_equal(y, ort_y)
    assert scale == ort_scale == F32(1.0) and zp == ort_zp == 0
    ref_y, ref_scale, ref_zp = run_ref(DYNAMIC_MODEL, {"x": x})
    y2, scale2, zp2 = nm.dynamic_quantize_uint8(x, zero_range_scale=F32(1.0) / F32(255.0))
    np.testing.assert_array_equal(y2, ref_y)
    assert scale2 == ref_scale and zp2 == ref_zp


# ---------------------------------------------------------------------------
# Property tests over each storage type's full range
# ---------------------------------------------------------------------------

SCALES = st.floats(min_value=2.0**-20, max_value=2.0**20, allow_nan=False).map(F32)


@SETTINGS
@given(dtype=st.sampled_from(INT_STORAGE), scale=SCALES, zp_frac=st.floats(0, 1))
def test_dequantize_then_quantize_is_identity(dtype, scale, zp_frac):
    zp = dtype.qmin + round(zp_frac * (dtype.qmax - dtype.qmin))
    q = np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy)
    x = nm.dequantize(q, scale, np.array(zp))
    np.testing.assert_array_equal(nm.quantize(x, scale, np.array(zp), dtype), q)


@SETTINGS
@given(dtype=st.sampled_from(INT_STORAGE), scales=st.lists(SCALES, min_size=3, max_size=3))
def test_dequantize_then_quantize_is_identity_per_axis(dtype, scales):
    q = np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy)
    q = np.stack([q, q[::-1], q])  # (3, N), channels along axis 0
    scale = F32(scales)
    zp = np.array([dtype.qmin, dtype.qmax, (dtype.qmin + dtype.qmax) // 2])
    x = nm.dequantize(q, scale, zp, axis=0)
    np.testing.assert_array_equal(nm.quantize(x, scale, zp, dtype, axis=0), q)


INT32_ARRAYS = st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=64)


@SETTINGS
@given(dtype=st.sampled_from(INT_STORAGE + (dtypes.int32,)), values=INT32_ARRAYS)
def test_requantize_float_unit_multiplier_is_saturate(dtype, values):
    acc = np.array(values, np.int32)
    if dtype == dtypes.int32:  # float32(acc) is exact only up to 2^24
        acc = acc >> 7
    np.testing.assert_array_equal(
        nm.requantize_float(acc, 1.0, 0, dtype), nm.saturate_int(acc, dtype)
    )


@SETTINGS
@given(dtype=st.sampled_from(INT_STORAGE), values=INT32_ARRAYS)
def test_requantize_fixed_point_unit_multiplier_is_saturate(dtype, values):
    acc = np.array(values, np.int32) >> 1  # multiplier 1.0 is 2^30 with shift 1: acc << 1
    m, s = nm.quantize_multiplier(1.0)
    assert (m, s) == (2**30, 1)
    for double_rounding in (True, False):
        got = nm.requantize_fixed_point(acc, m, s, 0, dtype, double_rounding=double_rounding)
        np.testing.assert_array_equal(got, nm.saturate_int(acc, dtype))


@SETTINGS
@given(
    values=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=32),
    b=st.integers(INT32_MIN, INT32_MAX),
)
def test_srdhm_is_round_half_up_of_the_doubled_high_product(values, b):
    got = nm.saturating_rounding_doubling_high_mul(np.array(values), b)
    for a, g in zip(values, got.tolist(), strict=True):
        if a == b == INT32_MIN:
            assert g == INT32_MAX
        else:
            assert g == _exact_round_half_up(Fraction(a * b, 2**31))


@SETTINGS
@given(
    values=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=32),
    e=st.integers(0, 31),
)
def test_rounding_divide_by_pot_is_round_half_away(values, e):
    got = nm.rounding_divide_by_pot(np.array(values, np.int32), e)
    assert got.dtype == np.int32
    assert got.tolist() == [_exact_round_half_away(Fraction(v, 2**e)) for v in values]


def test_reciprocal_multiply_is_pytorchs_convention_and_differs_from_divide():
    """x / s (ONNX) and x * f32(1/s) (PyTorch) differ in the quotient's last
    bit; where that bit decides a tie, the integers differ."""
    scale = np.float32(0.63732475)  # a scale whose reciprocal is inexact enough to flip ties
    x = (np.arange(-3000, 3000, dtype=np.float32) + np.float32(0.5)) * scale
    divide = nm.quantize(x, scale, None, dtypes.int16)
    multiply = nm.quantize(x, scale, None, dtypes.int16, scale_op="reciprocal_multiply")
    inverse = np.float32(1.0) / scale
    expected = np.clip(np.rint(x * inverse), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(multiply, expected)
    np.testing.assert_array_equal(divide, np.rint(x / scale).astype(np.int16))
    assert np.any(divide != multiply)
    with pytest.raises(ValueError, match="scale_op"):
        nm.quantize(x, scale, None, dtypes.int8, scale_op="guess")
