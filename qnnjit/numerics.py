"""Every rounding and quantization formula of qnnjit, in one place.

The reference interpreter, the constant folder and the kernel generators all call
(or reproduce bit for bit) the functions here; nothing else in the project
rounds, clamps or decomposes a multiplier on its own. Each docstring states the
formula and the precision every step runs in, because peers differ exactly
there:

- ONNX `QuantizeLinear` divides, `y = saturate(round_half_even(x / scale) + zp)`;
  PyTorch, FBGEMM and XNNPACK multiply by `1/scale` instead (not done here).
- ONNX Runtime (MLAS) requantizes an int32 accumulator with a float32
  multiplier: `saturate(round_half_even(float32(acc) * float32(m)) + zp)`.
- TFLite / gemmlowp requantize with an int32 fixed-point multiplier and a shift,
  with two roundings (gemmlowp, the classic TFLite) or one (TFLite built with
  `TFLITE_SINGLE_ROUNDING`).

All functions are vectorized NumPy. Integer arithmetic runs in int64, so no
intermediate wraps unless a docstring says it does on purpose (mirroring a
C kernel that wraps). Sub-byte integers and the small float formats use the
ml_dtypes container types of `qnnjit.ir.dtypes` (one element per byte).

ONNX Runtime 1.31 deviates from the ONNX spec in a few corners; the spec wins
here and the deviations are listed where they apply (`quantize`,
`dynamic_quantize_uint8`).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from .ir import dtypes
from .ir.dtypes import DType

__all__ = [
    "round_half_even",
    "round_half_away_from_zero",
    "round_half_up",
    "saturate_int",
    "expand_param",
    "quantize",
    "dequantize",
    "requantize_float",
    "quantize_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "requantize_fixed_point",
    "dynamic_quantize_uint8",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1

_PRECISIONS = (dtypes.float32, dtypes.float16, dtypes.bfloat16)


# --------------------------------------------------------------------------
# Rounding of float arrays to integral values (the result keeps the float type)
# --------------------------------------------------------------------------


def round_half_even(x):
    """Round to nearest, ties to even: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, -0.5 -> -0.

    IEEE 754 roundTiesToEven, what `np.rint`, x86 `cvtps2dq` (default MXCSR)
    and ARM `fcvtns` do. Exact in the input's float type: no float addition.
    """
    return np.rint(np.asarray(x))


def round_half_away_from_zero(x):
    """Round to nearest, ties away from zero: 2.5 -> 3, -2.5 -> -3, -0.5 -> -1.

    C's `std::round` / TfLiteRound. Computed as `t = trunc(x)`,
    `t + sign(x) * (|x - t| >= 0.5)`; `x - trunc(x)` is exact, whereas the
    common `floor(|x| + 0.5)` is not (0.49999997 + 0.5 rounds up to 1.0 in
    float32).
    """
    x = np.asarray(x)
    t = np.trunc(x)
    up = np.abs(x - t) >= 0.5
    return np.where(up, t + np.sign(x), t).astype(x.dtype, copy=False)


def round_half_up(x):
    """Round to nearest, ties towards +inf: 2.5 -> 3, -2.5 -> -2, -0.5 -> 0.

    `f = floor(x)`, `f + (x - f >= 0.5)`; exact for the same reason as
    `round_half_away_from_zero` (`floor(x + 0.5)` is not).
    """
    x = np.asarray(x)
    f = np.floor(x)
    return np.where(x - f >= 0.5, f + 1, f).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------
# Saturation and parameter broadcasting
# --------------------------------------------------------------------------


def _check_int_target(dtype: DType) -> None:
    if not dtype.is_int or dtype.bits > 32:
        raise ValueError(f"{dtype} is not an integer type of at most 32 bits")


def _finish_int(rounded, zero_point, dtype: DType) -> np.ndarray:
    """`saturate(rounded + zero_point)` for an already integral float array.

    Clamps `rounded` to `[qmin - zp, qmax - zp]` in float64 (exact: both are
    integers below 2^33), then adds zp in int64. Clamping before adding is what
    MLAS does and is equal to clamping after, because the bounds are integers.
    +-inf saturate; NaN becomes qmin, as in MLAS (`maxps` returns its second
    operand, the lower bound, when the first is NaN).
    """
    zp = np.asarray(zero_point, dtype=np.int64)
    lo = dtype.qmin - zp
    hi = dtype.qmax - zp
    r = np.asarray(rounded, dtype=np.float64)
    r = np.where(np.isnan(r), lo, np.clip(r, lo, hi))
    return (r.astype(np.int64) + zp).astype(dtype.numpy)


def saturate_int(x, dtype: DType) -> np.ndarray:
    """Clamp to `[dtype.qmin, dtype.qmax]` and store as `dtype.numpy`.

    Integer inputs are clamped exactly (in int64). Float inputs must already be
    integral (round first); +-inf saturate and NaN becomes qmin.
    """
    _check_int_target(dtype)
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        return np.clip(x.astype(np.int64), dtype.qmin, dtype.qmax).astype(dtype.numpy)
    return _finish_int(x, 0, dtype)


def _normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def expand_param(param, shape, axis: int = 1, block_size: int = 0) -> np.ndarray:
    """Reshape a scale or zero point so that it broadcasts against `shape`.

    - per-tensor: `param` is 0-d or has one element -> returned 0-d;
    - per-axis (`block_size == 0`): `param` is 1-D of length `shape[axis]` ->
      reshaped to `[1, .., shape[axis], .., 1]`;
    - blocked (`block_size > 0`): `param` has the rank of `shape`, equal dims
      except `param.shape[axis] == ceil(shape[axis] / block_size)`; entry `j`
      covers elements `[j*B, (j+1)*B)` along `axis`, so it is repeated
      `block_size` times along `axis` and the last block is cut to
      `shape[axis]` -> returned with exactly `shape`.

    A negative `axis` counts from the end. Inconsistent shapes raise ValueError.
    """
    param = np.asarray(param)
    shape = tuple(int(d) for d in shape)
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    if param.size == 1:
        return param.reshape(())
    rank = len(shape)
    if rank == 0:
        raise ValueError(f"a parameter of shape {param.shape} cannot apply to a 0-d tensor")
    ax = _normalize_axis(axis, rank)
    if not block_size:
        if param.ndim != 1:
            raise ValueError(
                f"per-axis parameters must be 1-D, got shape {param.shape} "
                "(blocked quantization needs block_size > 0)"
            )
        if param.shape[0] != shape[ax]:
            raise ValueError(
                f"per-axis parameter has {param.shape[0]} entries but axis {axis} "
                f"of shape {shape} has {shape[ax]}"
            )
        dims = [1] * rank
        dims[ax] = shape[ax]
        return param.reshape(dims)
    blocks = -(-shape[ax] // block_size)
    expected = shape[:ax] + (blocks,) + shape[ax + 1 :]
    if param.shape != expected:
        raise ValueError(
            f"blocked parameter has shape {param.shape}; for a tensor of shape {shape} "
            f"with block_size {block_size} along axis {axis} it must be {expected}"
        )
    return np.repeat(param, block_size, axis=ax)[(slice(None),) * ax + (slice(0, shape[ax]),)]


def _int_zero_point(zero_point, dtype: DType, shape, axis, block_size) -> np.ndarray:
    if zero_point is None:
        return np.zeros((), np.int64)
    zp = np.asarray(zero_point)
    if not (np.issubdtype(zp.dtype, np.integer) or dtypes.from_numpy(zp.dtype).is_int):
        raise ValueError(f"zero point of an integer type must be integer, got {zp.dtype}")
    zp = zp.astype(np.int64)
    if np.any(zp < dtype.qmin) or np.any(zp > dtype.qmax):
        raise ValueError(f"zero point {zp} outside the range of {dtype}")
    return expand_param(zp, shape, axis, block_size)


def _float_zero_point(zero_point, shape, axis, block_size) -> np.ndarray:
    if zero_point is None:
        return np.zeros((), np.float32)
    zp = np.asarray(zero_point).astype(np.float32)
    return expand_param(zp, shape, axis, block_size)


def _float_dtype_of(array: np.ndarray, default: DType = dtypes.float32) -> DType:
    try:
        dt = dtypes.from_numpy(array.dtype)
    except TypeError:
        return default
    return dt if dt in _PRECISIONS else default


# --------------------------------------------------------------------------
# QuantizeLinear / DequantizeLinear
# --------------------------------------------------------------------------


def _to_small_float(v: np.ndarray, dtype: DType, saturate: bool) -> np.ndarray:
    """float32 -> float8/float4 with the ONNX Cast rules; grid rounding is RNE.

    float8, saturate=True (|[v]| > max means after rounding to the grid):

        v        E4M3FN  E4M3FNUZ  E5M2   E5M2FNUZ
        NaN      NaN     NaN       NaN    NaN
        +-Inf    +-max   +-max     +-max  +-max
        |[v]|>max  +-max +-max     +-max  +-max
        -0       -0      +0        -0     +0

    saturate=False: +-Inf and overflow become NaN, except E5M2 which keeps
    +-Inf (its only format with an infinity); -NaN stays -NaN where a sign bit
    exists (E4M3FN, E5M2).

    float4e2m1 has neither Inf nor NaN and always saturates (ONNX float4 doc):
    |v| > 6 and +-Inf -> +-6, NaN -> +6, -0 -> -0. `saturate` is ignored.

    Saturation clamps to +-max before the cast: anything whose rounding would
    exceed max is >= max already, so this equals "round, then saturate".
    ml_dtypes' `astype` rounds float32 to the grid with round-to-nearest-even
    in one step (checked exhaustively in tests/test_numerics.py).
    """
    if dtype == dtypes.float4e2m1:
        v = np.where(np.isnan(v), np.float32(6.0), v)
        return np.clip(v, -6.0, 6.0).astype(dtype.numpy)
    if saturate:
        top = np.float32(dtype.max_finite)
        v = np.clip(v, -top, top)  # NaN passes through np.clip unchanged
    return v.astype(dtype.numpy)


SCALE_OPS = ("divide", "reciprocal_multiply")


def quantize(
    x,
    scale,
    zero_point,
    dtype: DType,
    *,
    axis: int = 1,
    block_size: int = 0,
    saturate: bool = True,
    precision: DType = dtypes.float32,
    scale_op: str = "divide",
) -> np.ndarray:
    """ONNX QuantizeLinear (opsets 10-25), and PyTorch's variant.

    `scale_op` names how x meets the scale: "divide" (ONNX, ONNX Runtime:
    `x / scale`) or "reciprocal_multiply" (PyTorch, FBGEMM, XNNPACK:
    `x * f32(1 / scale)`, integer storage and float32 only). The two differ in
    the last bit of the quotient and so flip rounding ties.

    Integer storage (int2 .. uint16; int32 allowed too):

        y = saturate(round_half_even(x / scale) + zero_point)

    - `x / scale` is a true IEEE division in `precision` (float32 by default:
      x and scale are converted to float32 first, exact for float16/bfloat16
      inputs). Not `x * (1 / scale)`: that differs in the last bit and flips
      ties. The ONNX spec says the division runs in the scale's type (so in
      float16 for a float16 scale) unless the `precision` attribute says
      otherwise; ONNX Runtime 1.31 divides in float32 even then (checked), and
      the onnx reference evaluator in float16. Pass `precision=float16` to
      follow the spec literally.
    - round_half_even of the float32 quotient, zp added as an exact integer,
      clamp to [qmin, qmax]. +-inf saturate; NaN -> qmin (MLAS behaviour; the
      spec leaves it undefined). The onnx reference evaluator instead wraps
      through int32 for |x/scale| >= 2^31 and +-inf (giving qmin for +inf);
      ONNX Runtime saturates as here, except for int2/uint2 where it gives qmin
      for +-inf and every |x/scale| >= 2^31.

    float8 / float4 storage:

        y = cast(x / scale + zero_point)   with the Cast rules of `_to_small_float`

    where the zero point (0 in practice) is added in float32 only where it is
    nonzero, so `-0.0` keeps its sign. `saturate` selects the float8 Cast
    table; float4e2m1 always saturates (NaN -> 6 per the ONNX float4 doc; the
    onnx reference evaluator gives +-0 for NaN). ONNX Runtime 1.31 deviates
    with saturate=False: E5M2 values in [61440, 65536) give NaN instead of Inf,
    and E4M3FN values in [480, 496) give +-448 instead of NaN.

    `scale`/`zero_point` are per-tensor, per-axis or blocked, see
    `expand_param`. `zero_point=None` means 0.
    """
    x = np.asarray(x)
    if dtype not in dtypes.QUANTIZED_STORAGE and not (dtype.is_int and dtype.bits <= 32):
        raise ValueError(f"cannot quantize to {dtype}")
    if precision not in _PRECISIONS:
        raise ValueError(f"quantize precision must be one of {_PRECISIONS}, got {precision}")
    if scale_op not in SCALE_OPS:
        raise ValueError(f"scale_op must be one of {SCALE_OPS}, got {scale_op!r}")
    if scale_op == "reciprocal_multiply" and (not dtype.is_int or precision != dtypes.float32):
        raise ValueError("reciprocal_multiply quantizes float32 to integer storage only")
    s = expand_param(np.asarray(scale), x.shape, axis, block_size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if scale_op == "reciprocal_multiply":
            inverse = np.float32(1.0) / s.astype(np.float32)
            v = (x.astype(np.float32) * inverse).astype(np.float32)
        else:
            v = (x.astype(precision.numpy) / s.astype(precision.numpy)).astype(np.float32)
        if dtype.is_int:
            zp = _int_zero_point(zero_point, dtype, x.shape, axis, block_size)
            return _finish_int(round_half_even(v), zp, dtype)
        zpf = _float_zero_point(zero_point, x.shape, axis, block_size)
        if np.any(zpf != 0):
            v = np.where(zpf != 0, v + zpf, v)
        return _to_small_float(v, dtype, saturate)


def _storage_dtype(q: np.ndarray) -> DType:
    try:
        return dtypes.from_numpy(q.dtype)
    except TypeError:
        raise ValueError(f"cannot dequantize an array of dtype {q.dtype}") from None


def dequantize(
    q,
    scale,
    zero_point=None,
    *,
    axis: int = 1,
    block_size: int = 0,
    out_dtype: DType | None = dtypes.float32,
) -> np.ndarray:
    """ONNX DequantizeLinear: `y = (q - zero_point) * scale`.

    - integer q: `q - zp` is exact in int64 (int32 q minus an int32 zp cannot
      wrap), then converted to float32 (exact below 2^24; an int32 difference
      beyond that rounds to nearest even, as ONNX Runtime's conversion does);
    - float8 / float4 q: converted to float32 (exact) minus the zero point as
      float32 (0 in practice; -0 - 0 keeps -0, NaN/Inf pass through);
    - the product with `float32(scale)` is one float32 multiplication, then
      cast to `out_dtype`. For a float16/bfloat16 scale the spec says the output
      type (default: the scale's type) sets the multiplication's precision; ONNX
      Runtime and the onnx reference both multiply in float32 and round once to
      float16, which is what is done here.

    `out_dtype=None` means the scale's type (the spec's default when
    `output_dtype` is absent); the default float32 is what the IR uses.
    """
    q = np.asarray(q)
    storage = _storage_dtype(q)
    scale = np.asarray(scale)
    out = _float_dtype_of(scale) if out_dtype is None else out_dtype
    if not out.is_float:
        raise ValueError(f"dequantize output type must be a float type, got {out}")
    s = expand_param(scale, q.shape, axis, block_size).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        if storage.is_int:
            zp = _int_zero_point(zero_point, storage, q.shape, axis, block_size)
            v = (q.astype(np.int64) - zp).astype(np.float32)
        elif storage.is_float:
            v = q.astype(np.float32)
            if zero_point is not None:
                v = v - _float_zero_point(zero_point, q.shape, axis, block_size)
        else:
            raise ValueError(f"cannot dequantize {storage}")
        return (v * s).astype(out.numpy)


# --------------------------------------------------------------------------
# Requantization of integer accumulators
# --------------------------------------------------------------------------


def _integer_array(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array, got {x.dtype}")
    return x


def _check_int32(x: np.ndarray, what: str) -> np.ndarray:
    x = x.astype(np.int64)
    if x.size and (x.min() < INT32_MIN or x.max() > INT32_MAX):
        raise ValueError(f"{what} must lie in the int32 range")
    return x


def _per_axis(param, shape, axis):
    param = np.asarray(param)
    if axis is None:
        if param.size != 1:
            raise ValueError(
                f"per-channel parameter of shape {param.shape} needs an axis (axis=None)"
            )
        return param.reshape(())
    return expand_param(param, shape, axis)


def requantize_float(acc, multiplier, zero_point, dtype: DType, *, axis: int | None = None):
    """ONNX Runtime's (MLAS `MlasRequantizeOutput`) int32 -> int8/uint8 step.

        y = saturate(round_half_even(float32(acc) * float32(multiplier)) + zp)

    Steps and precisions, exactly:
    1. `float32(acc)`: int -> float32 conversion, round to nearest even (exact
       for |acc| <= 2^24; above that it is the first rounding, as in
       `cvtdq2ps`);
    2. `multiplier` is stored as float32 (a float64 value is rounded to float32
       first, as ONNX Runtime holds `a_scale * b_scale / y_scale` in float32);
    3. one float32 multiplication (round to nearest even);
    4. clamp to `[qmin - zp, qmax - zp]`, round half to even, add zp exactly.
       MLAS clamps in float before `cvtps2dq`; clamping first or last is the
       same since the bounds are integers.

    `multiplier` and `zero_point` are scalars, or 1-D per-channel along `axis`.
    """
    _check_int_target(dtype)
    acc = _integer_array(acc, "accumulator")
    m = _per_axis(np.asarray(multiplier, dtype=np.float32), acc.shape, axis)
    zp = _per_axis(np.asarray(zero_point, dtype=np.int64), acc.shape, axis)
    with np.errstate(over="ignore", invalid="ignore"):
        product = acc.astype(np.float32) * m
    return _finish_int(round_half_even(product), zp, dtype)


def quantize_multiplier(real_multiplier, *, single_rounding: bool = False):
    """gemmlowp / TFLite `QuantizeMultiplier`: real = m * 2^(shift - 31).

    With `q, e = frexp(real)` (q in [0.5, 1), real = q * 2^e):

        m = round_half_away_from_zero(q * 2^31)   (q * 2^31 is exact in float64)
        shift = e
        if m == 2^31: m = 2^30, shift += 1        (q rounded up to 1.0)
        if shift < -31: m = 0, shift = 0          (real < ~2^-32 flushes to 0)
        real == 0: m = 0, shift = 0

    so |m| in [2^30, 2^31) and |m * 2^(shift-31) - real| <= 2^-31 * |real|.
    Positive shift means a left shift. With `single_rounding=True` (TFLite
    built with TFLITE_SINGLE_ROUNDING) negative multipliers are rejected and a
    shift above 30 saturates to `m = 2^31 - 1, shift = 30`.

    A scalar input gives `(int, int)`; an array gives `(int32 array, int32
    array)` of its shape.
    """
    real = np.asarray(real_multiplier, dtype=np.float64)
    if not np.all(np.isfinite(real)):
        raise ValueError(f"multiplier must be finite, got {real_multiplier}")
    if single_rounding and np.any(real < 0):
        raise ValueError("single-rounding requantization needs non-negative multipliers")
    q, e = np.frexp(real)
    m = round_half_away_from_zero(q * float(1 << 31))
    carry = np.abs(m) == float(1 << 31)
    m = np.where(carry, m / 2, m)
    e = e.astype(np.int64) + carry
    tiny = e < -31
    m = np.where(tiny, 0.0, m)
    e = np.where(tiny, 0, e)
    if single_rounding:
        big = e > 30
        m = np.where(big, float(INT32_MAX), m)
        e = np.where(big, 30, e)
    m = m.astype(np.int64).astype(np.int32)
    e = e.astype(np.int32)
    if real.ndim == 0:
        return int(m), int(e)
    return m, e


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values.

        srdhm(a, b) = INT32_MAX                    if a == b == INT32_MIN
                    = round(a * b / 2^31)          otherwise

    where the rounding is gemmlowp's nudge: `(ab + 2^30) / 2^31` for ab >= 0 and
    `(ab + 1 - 2^30) / 2^31` for ab < 0, C division truncating towards zero.
    Both cases work out to round to nearest, ties towards +inf (-0.5 -> 0,
    -1.5 -> -1, 0.5 -> 1). Computed in int64 (|ab| <= 2^62); returns int32.
    """
    a = _check_int32(_integer_array(a, "a"), "a")
    b = _check_int32(_integer_array(b, "b"), "b")
    overflow = (a == b) & (a == INT32_MIN)
    ab = a * b
    t = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C's truncating t / 2^31
    return np.where(overflow, INT32_MAX, high).astype(np.int32)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero.

        mask = 2^e - 1;  remainder = x & mask
        threshold = (mask >> 1) + (x < 0)
        result = (x >> e) + (remainder > threshold)     (>> is arithmetic)

    2.5 -> 3, -2.5 -> -3, 1.5 -> 2. gemmlowp allows 0 <= e <= 31; int64 math
    here allows up to 62. The result has x's integer dtype (it always fits).
    """
    x = _integer_array(x, "x")
    e = _integer_array(exponent, "exponent").astype(np.int64)
    if np.any(e < 0) or np.any(e > 62):
        raise ValueError("rounding_divide_by_pot needs 0 <= exponent <= 62")
    xi = x.astype(np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = xi & mask
    threshold = (mask >> 1) + (xi < 0)
    result = (xi >> e) + (remainder > threshold)
    return result.astype(x.dtype)


def _wrap_int32(x: np.ndarray) -> np.ndarray:
    """Two's complement wrap of int64 values to int32, kept in int64."""
    return ((x - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN


def requantize_fixed_point(
    acc,
    multiplier,
    shift,
    zero_point,
    dtype: DType,
    *,
    double_rounding: bool = True,
    axis: int | None = None,
):
    """TFLite MultiplyByQuantizedMultiplier, then `saturate(. + zero_point)`.

    `acc` must lie in int32; `(multiplier, shift)` come from
    `quantize_multiplier` (real = multiplier * 2^(shift-31)).

    double_rounding=True, the classic gemmlowp / TFLite path:

        left = max(shift, 0); right = max(-shift, 0)
        y = rounding_divide_by_pot(srdhm(wrap32(acc << left), multiplier), right)

    i.e. round half up to a 31-bit fixed point, then round half away from zero
    by 2^right. `acc << left` wraps to int32 like the C code (left is 0 for
    multipliers below 1).

    double_rounding=False, TFLite's TFLITE_SINGLE_ROUNDING path (shift must be
    in [-31, 30], multiplier >= 0):

        total = 31 - shift
        y = (acc * multiplier + 2^(total-1)) >> total     (int64, arithmetic >>)

    one rounding, half towards +inf, of the exact rational
    `acc * multiplier * 2^(shift-31)`.

    Finally `y + zero_point` is clamped to [qmin, qmax] in int64 (TFLite adds
    the output offset in int32 and clamps to the activation range, which is
    within [qmin, qmax]). `multiplier`, `shift`, `zero_point` are scalars or
    1-D per-channel along `axis`.
    """
    _check_int_target(dtype)
    acc = _check_int32(_integer_array(acc, "accumulator"), "accumulator")
    m = _per_axis(
        _check_int32(_integer_array(multiplier, "multiplier"), "multiplier"), acc.shape, axis
    )
    s = _per_axis(_integer_array(shift, "shift").astype(np.int64), acc.shape, axis)
    zp = _per_axis(np.asarray(zero_point, dtype=np.int64), acc.shape, axis)
    if double_rounding:
        if np.any(s > 31) or np.any(s < -62):
            raise ValueError("double-rounding requantization needs -62 <= shift <= 31")
        left = np.maximum(s, 0)
        right = np.maximum(-s, 0)
        y = saturating_rounding_doubling_high_mul(_wrap_int32(acc << left), m)
        y = rounding_divide_by_pot(y.astype(np.int64), right)
    else:
        if np.any(s > 30) or np.any(s < -31):
            raise ValueError("single-rounding requantization needs -31 <= shift <= 30")
        if np.any(m < 0):
            raise ValueError("single-rounding requantization needs multiplier >= 0")
        total = 31 - s
        y = (acc * m + (np.int64(1) << (total - 1))) >> total
    return np.clip(y + zp, dtype.qmin, dtype.qmax).astype(dtype.numpy)


# --------------------------------------------------------------------------
# DynamicQuantizeLinear
# --------------------------------------------------------------------------


def dynamic_quantize_uint8(x, *, zero_range_scale: float = 1.0):
    """ONNX DynamicQuantizeLinear (uint8), every step in float32:

        hi = max(0, max(x));  lo = min(0, min(x))        (range includes 0)
        scale = (hi - lo) / 255                          (float32 sub, div)
        zp = uint8(round_half_even(clamp(0 - lo / scale, 0, 255)))
        y = quantize(x, scale, zp, uint8)                (x / scale, RNE, +zp)

    All-zero (or empty) x makes hi == lo; the spec is silent. ONNX Runtime
    1.31 returns scale = 1.0 (its C++ `max == min ? 1.0f : ...`) and that is
    the default here; the onnx reference evaluator returns scale = 1/255
    (pass `zero_range_scale=1/255`). Both give y = 0, zp = 0. x must be finite.

    Returns `(y uint8 array, float32 scale, uint8 zero point)`, the last two as
    NumPy scalars.
    """
    xf = np.asarray(x).astype(np.float32)
    zero = np.float32(0.0)
    hi = np.maximum(zero, xf.max()) if xf.size else zero
    lo = np.minimum(zero, xf.min()) if xf.size else zero
    if hi == lo:
        scale = np.float32(zero_range_scale)
    else:
        scale = np.float32(hi - lo) / np.float32(255.0)
    initial_zp = zero - lo / scale
    zp = np.uint8(round_half_even(np.clip(initial_zp, np.float32(0), np.float32(255))))
    y = quantize(xf, scale, zp, dtypes.uint8)
    return y, np.float32(scale), zp


# ---- x86 float arithmetic that ONNX Runtime's MLAS kernels rely on ------------


def cvtps2dq(v: np.ndarray) -> np.ndarray:
    """x86 `cvtps2dq` (default MXCSR): round half to even to int32; values
    outside [-2^31, 2^31) and NaN give INT32_MIN ("integer indefinite").
    Returned as int64."""
    v = np.asarray(v, dtype=np.float32)
    r = round_half_even(v).astype(np.float64)
    bad = ~((r >= -(2.0**31)) & (r < 2.0**31))
    return np.where(bad, -(1 << 31), np.where(bad, 0, r).astype(np.int64))


def _round_fraction_to_f32(value: Fraction) -> np.float32:
    """Correctly rounded (half to even) float32 of an exact rational (the
    reference the FMA emulation is tested against)."""
    guess = np.float32(float(value))  # may be off by one ulp (double rounding)
    best = None
    for cand in (
        np.nextafter(guess, np.float32(-np.inf)),
        guess,
        np.nextafter(guess, np.float32(np.inf)),
    ):
        if not np.isfinite(cand):
            continue
        err = abs(Fraction(float(cand)) - value)
        key = (err, int(cand.view(np.uint32)) & 1)  # ties: even mantissa
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


def fma_f32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add `round32(a * b + c)`, one rounding.

    float32 products are exact in float64 (24 + 24 bits), so `s = f64(p + c)`
    carries one rounding and TwoSum gives its exact error `err`. Rounding `s`
    to float32 is the fused result except when `s` lies exactly halfway
    between two float32 values while `err != 0` (double rounding): a float32
    midpoint is itself a float64, so no other rounding boundary can separate
    `s` from the exact sum. There the sign of `err` says on which side the
    exact sum lies, and that neighbour is the result."""
    a, b, c = (np.asarray(v, dtype=np.float32) for v in (a, b, c))
    shape = np.broadcast_shapes(a.shape, b.shape, c.shape)
    p = a.astype(np.float64) * b.astype(np.float64)
    cc = c.astype(np.float64)
    s = p + cc
    out = np.asarray(s.astype(np.float32))
    with np.errstate(invalid="ignore", over="ignore"):
        bb = s - p
        err = (p - (s - bb)) + (cc - bb)
        finite = np.isfinite(s) & np.isfinite(out)
        rounded = out.astype(np.float64)
        toward = np.nextafter(out, np.where(s > rounded, np.inf, -np.inf).astype(np.float32))
        midpoint = finite & (rounded != s) & ((rounded + toward.astype(np.float64)) * 0.5 == s)
        fix = midpoint & (err != 0)
        if np.any(fix):
            # The exact sum is s + err: take the neighbour on err's side of s.
            up = np.maximum(out, toward)
            down = np.minimum(out, toward)
            out = np.where(fix, np.where(err > 0, up, down), out)
    return np.broadcast_to(out, shape).astype(np.float32).reshape(shape)
