"""ONNX Runtime's own quantized kernels whose arithmetic no composition of
generic ops reproduces bit for bit (the rest of the com.microsoft QLinear* ops
are compositions: see frontends/onnx/converters/contrib.py).

Each op states the exact float32 arithmetic of the ONNX Runtime 1.31 CPU kernel
it mirrors (MLAS on x86-64; docs/ort_numerics.md has the study and the
measurements), every step in the precision named:

- `qadd`   QLinearAdd: MLAS AVX2 kernel, zero points folded into a float
  constant, fused multiply-adds whose order follows ORT's broadcasting, round
  half to even (zero point inside).
- `qmul`   QLinearMul: integer product, one float32 multiply, zero point added
  in float before rounding.
- `qaverage_pool` QLinearAveragePool: dequantize to float32, sequential float32
  window sums, divide, then `rne(avg / y_scale + y_zp)` (zero point before
  rounding, unlike QuantizeLinear).
- `qsoftmax` QLinearSoftmax: a 256-entry exp table in float32, a sequential
  float32 row sum, `rne(t * floor(1 / y_scale) / sum) + y_zp`.

The float32 -> int32 conversion is x86's `cvtps2dq`: round half to even, and
any value outside the int32 range (or NaN) becomes INT32_MIN, which the packing
instructions then saturate to the type's minimum.
"""

from __future__ import annotations

import math

import numpy as np

from ... import numerics
from .. import dtypes
from ..types import TensorType
from . import _dims, broadcast_shapes, op
from .nn import window_output_size
from .quant import quant_params

F32 = np.float32


def _scalar_f32(value) -> np.float32:
    return F32(np.asarray(value, dtype=np.float32).reshape(-1)[0])


def _scalar_int(value) -> int:
    return 0 if value is None else int(np.asarray(value).reshape(-1)[0])


def _const(ctx, index):
    return ctx.consts[index] if index < len(ctx.consts) else None


def _output_quant(ctx, scale_index, zp_index, dtype):
    """QuantParams of a result whose scale / zero point are inputs `scale_index`
    / `zp_index`, when both are constants (or the zero point is absent)."""
    scale = _const(ctx, scale_index)
    if scale is None or (ctx.has(zp_index) and _const(ctx, zp_index) is None):
        return None
    return quant_params(scale, _const(ctx, zp_index), dtype)


def _check_8bit(ctx, index, what, allowed=(dtypes.int8, dtypes.uint8)):
    t = ctx.type(index)
    if t.dtype not in allowed:
        raise ctx.error(f"{what} must be one of {[str(d) for d in allowed]}, got {t.dtype}")
    return t


# ---- float32 emulation helpers --------------------------------------------------
cvtps2dq = numerics.cvtps2dq
fma_f32 = numerics.fma_f32


def _saturate_cvt(v, dtype) -> np.ndarray:
    """cvtps2dq, then the int32 -> int16 -> T saturating packs (= saturate to T)."""
    return numerics.saturate_int(cvtps2dq(v), dtype)


# ---- QLinearAdd / QLinearMul ----------------------------------------------------


def ort_broadcast_mode(shape0, shape1) -> str:
    """Which span function ONNX Runtime's BroadcastLooper runs for two shapes:
    "scalar0" (input 0 is one value per span), "scalar1", or "general".

    ORT's Broadcaster walks dims from the innermost, skips trailing dims where
    both sizes are <= 1, and starts its first span at the first dim (within the
    common rank) where one is larger; an input whose size there is 1 is the
    per-span scalar (input 0 is checked first). A 0-d input is always scalar.
    """
    if len(shape0) == 0:
        return "scalar0"
    if len(shape1) == 0:
        return "scalar1"
    common = min(len(shape0), len(shape1))
    for i in range(common):
        a0, a1 = shape0[-1 - i], shape1[-1 - i]
        dim = max(a0, a1) if min(a0, a1) != 0 else min(a0, a1)
        if dim <= 1 and i + 1 < common:
            continue
        if a0 <= 1:
            return "scalar0"
        return "scalar1" if a1 <= 1 else "general"
    return "general"  # pragma: no cover - the loop always returns


def _binary_infer(ctx, allowed):
    a = _check_8bit(ctx, 0, "A", allowed)
    b = ctx.type(3)
    if b.dtype != a.dtype:
        raise ctx.error(f"A is {a.dtype} but B is {b.dtype}")
    shape = broadcast_shapes(ctx, a.shape, b.shape)
    return [TensorType(a.dtype, shape, _output_quant(ctx, 6, 7, a.dtype))]


def _binary_params(inputs):
    inputs = list(inputs) + [None] * (8 - len(inputs))
    a, sa, za, b, sb, zb, sc, zc = inputs
    return (
        a, _scalar_f32(sa), _scalar_int(za),
        b, _scalar_f32(sb), _scalar_int(zb),
        _scalar_f32(sc), _scalar_int(zc),
    )  # fmt: skip


def mlas_qlinear_add(a, ra, za, b, rb, zb, zc) -> np.ndarray:
    """MLAS's AVX2 QLinearAdd kernel on operands (A, B) as MLAS receives them,
    `a`, `b` the stored codes as float32, `ra`/`rb` the float32 scale ratios:

        fixed = f32(zC - fma(rA, zA, f32(rB * zB)))     (the compiler fuses rA*zA + ...)
        t     = fma(a, rA, fma(b, rB, fixed))
    """
    fixed = F32(F32(zc) - fma_f32(ra, F32(za), F32(rb * F32(zb))))
    return fma_f32(a, ra, fma_f32(b, rb, fixed))


@op("qadd", summary="ONNX Runtime QLinearAdd: (A, A_s, A_zp, B, B_s, B_zp, C_s, C_zp) -> C")
class QAdd:
    """`rounding` "mlas_fma" names the kernel reproduced: MLAS's AVX2
    QLinearAdd (x86-64, 8-bit), `mlas_qlinear_add`:

        rA = f32(sA / sC); rB = f32(sB / sC)
        y  = saturate(cvtps2dq(mlas_qlinear_add(A, B)))

    ORT's broadcasting calls the kernel per span with the operands in ONNX
    order, except where input 0 is the per-span scalar (`ort_broadcast_mode`
    "scalar0"): then input 1 is MLAS's A and input 0 its B. The fused
    multiply-adds make the two orders round differently (rarely: about one code
    pair in 65536 for one scale set in five).
    """

    def infer(ctx):
        rounding = ctx.attrs["rounding"]
        if rounding != "mlas_fma":
            raise ctx.error(f"rounding {rounding!r} is not 'mlas_fma'")
        return _binary_infer(ctx, (dtypes.int8, dtypes.uint8))

    def evaluate(inputs, attrs):
        a, sa, za, b, sb, zb, sc, zc = _binary_params(inputs)
        dtype = dtypes.from_numpy(a.dtype)
        with np.errstate(all="ignore"):
            ra, rb = F32(sa / sc), F32(sb / sc)
            af, bf = np.broadcast_arrays(a.astype(F32), b.astype(F32))
            if ort_broadcast_mode(a.shape, b.shape) == "scalar0":
                t = mlas_qlinear_add(bf, rb, zb, af, ra, za, zc)
            else:
                t = mlas_qlinear_add(af, ra, za, bf, rb, zb, zc)
        return [_saturate_cvt(t, dtype)]


@op("qmul", summary="ONNX Runtime QLinearMul: (A, A_s, A_zp, B, B_s, B_zp, C_s, C_zp) -> C")
class QMul:
    """`rounding` "mlas" (the only kernel, 8-bit):

    r = f32(f32(sA * sB) / sC)
    p = (a - zA) * (b - zB)                     exact integer
    y = saturate(cvtps2dq(f32(f32(f32(p) * r) + f32(zC))))
    """

    def infer(ctx):
        if ctx.attrs.get("rounding", "mlas") != "mlas":
            raise ctx.error(f"rounding {ctx.attrs['rounding']!r} is not 'mlas'")
        return _binary_infer(ctx, (dtypes.int8, dtypes.uint8))

    def evaluate(inputs, attrs):
        a, sa, za, b, sb, zb, sc, zc = _binary_params(inputs)
        dtype = dtypes.from_numpy(a.dtype)
        with np.errstate(all="ignore"):
            r = F32(F32(sa * sb) / sc)
            p = (a.astype(np.int64) - za) * (b.astype(np.int64) - zb)
            v = (p.astype(F32) * r).astype(F32) + F32(zc)
        return [_saturate_cvt(v, dtype)]


# ---- QLinearAveragePool ---------------------------------------------------------


def pool_output_size(size, kernel, stride, pad_begin, pad_end, ceil_mode) -> int:
    """ORT's pool output size (the ONNX rule, dilation 1)."""
    return window_output_size(size, kernel, stride, pad_begin, pad_end, 1, ceil_mode)


def global_average_requantize(total, image_size, x_scale, y_scale, y_zp, dtype):
    """MLAS QLinearGlobalAveragePool's last step: `total` is the exact integer
    sum of (x - x_zp) over `image_size` elements, then

        scale = f32(x_scale / f32(y_scale * f32(image_size)))
        y = requantize_float(total, scale, y_zp)
    """
    scale = F32(x_scale / F32(y_scale * F32(image_size)))
    return numerics.requantize_float(total, scale, y_zp, dtype)


@op("qaverage_pool", summary="ONNX Runtime QLinearAveragePool: (x, x_s, x_zp, y_s, y_zp) -> y")
class QAveragePool:
    """Attributes: `kernel_shape`, `strides`, `pads` (explicit), `ceil_mode`,
    `count_include_pad`, `channels_last` (NHWC layout). Per output:

        xf = f32(x_scale * f32(x - x_zp))           (valid taps only)
        s  = xf[0] + xf[1] + ...                    float32, row-major window order
        a  = f32(s / count)     count = kernel size (count_include_pad) or valid taps
        y  = saturate(cvtps2dq(f32(f32(a / y_scale) + y_zp)))

    When the kernel covers the whole (unpadded) image ORT runs the global
    average pool instead: an exact integer sum and `global_average_requantize`.
    """

    def infer(ctx):
        x = _check_8bit(ctx, 0, "x")
        if x.shape is None:
            raise ctx.error("qaverage_pool needs an input of known rank")
        attrs = ctx.attrs
        kernel = attrs["kernel_shape"]
        n = len(kernel)
        if len(x.shape) != n + 2:
            raise ctx.error(f"input of rank {len(x.shape)} does not match {n} spatial axes")
        spatial_axes = range(1, n + 1) if attrs.get("channels_last") else range(2, n + 2)
        out = list(x.shape)
        for i, axis in enumerate(spatial_axes):
            size = x.shape[axis]
            if not isinstance(size, int):
                out[axis] = _dims.fresh(ctx, f"d{axis}")
                continue
            out[axis] = pool_output_size(
                size, kernel[i], attrs["strides"][i], attrs["pads"][i], attrs["pads"][n + i],
                attrs.get("ceil_mode", False),
            )  # fmt: skip
        return [TensorType(x.dtype, tuple(out), _output_quant(ctx, 3, 4, x.dtype))]

    def evaluate(inputs, attrs):
        inputs = list(inputs) + [None] * (5 - len(inputs))
        x, xs, xzp, ys, yzp = inputs
        xs, ys, xzp, yzp = _scalar_f32(xs), _scalar_f32(ys), _scalar_int(xzp), _scalar_int(yzp)
        dtype = dtypes.from_numpy(x.dtype)
        kernel, pads = attrs["kernel_shape"], attrs["pads"]
        n = len(kernel)
        channels_last = attrs.get("channels_last", False)
        if channels_last:
            x = np.moveaxis(x, -1, 1)
        if tuple(x.shape[2:]) == tuple(kernel) and not any(pads):
            image = int(np.prod(kernel))
            total = (x.astype(np.int64) - xzp).sum(axis=tuple(range(2, n + 2)), keepdims=True)
            y = global_average_requantize(total, image, xs, ys, yzp, dtype)
        else:
            y = _average_pool_float(x, xs, xzp, ys, yzp, dtype, attrs)
        return [np.ascontiguousarray(np.moveaxis(y, 1, -1)) if channels_last else y]


def _average_pool_float(x, xs, xzp, ys, yzp, dtype, attrs):
    kernel, strides, pads = attrs["kernel_shape"], attrs["strides"], attrs["pads"]
    ceil_mode = attrs.get("ceil_mode", False)
    n = len(kernel)
    sizes = x.shape[2:]
    outs = [
        pool_output_size(sizes[i], kernel[i], strides[i], pads[i], pads[n + i], ceil_mode)
        for i in range(n)
    ]
    xf = (xs * (x.astype(np.int64) - xzp).astype(F32)).astype(F32)
    # Pad enough for every window (ceil_mode windows may overhang the end pads).
    ends = [max(0, (outs[i] - 1) * strides[i] + kernel[i] - sizes[i] - pads[i]) for i in range(n)]
    widths = [(0, 0), (0, 0)] + [(pads[i], ends[i]) for i in range(n)]
    padded = np.pad(xf, widths)
    valid = np.pad(np.ones(sizes, dtype=np.int64), widths[2:])
    total = np.zeros(x.shape[:2] + tuple(outs), dtype=F32)
    count = np.zeros(tuple(outs), dtype=np.int64)
    for offset in np.ndindex(*kernel):  # row-major: the kernel's summation order
        index = tuple(
            slice(o, o + (outs[i] - 1) * strides[i] + 1, strides[i]) for i, o in enumerate(offset)
        )
        total = (total + padded[(slice(None), slice(None)) + index]).astype(F32)
        count += valid[index]
    if attrs.get("count_include_pad", False):
        count = np.full_like(count, int(np.prod(kernel)))
    with np.errstate(all="ignore"):
        average = (total / count.astype(F32)).astype(F32)
        v = ((average / ys).astype(F32) + F32(yzp)).astype(F32)
    return _saturate_cvt(v, dtype)


# ---- QLinearSoftmax -------------------------------------------------------------


def softmax_exp_table(x_scale: float, reduce_len: int) -> np.ndarray:
    """ORT's QLinearSoftmax table, entry i for i in 0..255 (float32 of a double
    computation):

        shift = max(0, f32(ln(f32(FLT_MAX / D))) - 5) / x_scale
        table[i] = f32(exp((i - 255 + shift) * x_scale))

    so table[255 - (xmax - x)] is exp((x - xmax) * x_scale) scaled so that a sum
    of D entries stays below FLT_MAX. The logarithm is float32 (C++ `log` of a
    float argument is `logf`); a double one moves every entry by a common
    factor that flips rare rounding ties (seen with power-of-two scales)."""
    x_scale = float(F32(x_scale))
    limit = float(F32(F32(np.finfo(np.float32).max) / F32(reduce_len)))
    shift = max(0.0, float(F32(math.log(limit))) - 5.0) / x_scale
    return np.array([math.exp((i - 255 + shift) * x_scale) for i in range(256)], dtype=F32)


@op("qsoftmax", summary="ONNX Runtime QLinearSoftmax: (x, x_s, y_s, y_zp) -> y over `axis`")
class QSoftmax:
    """Attributes: `axis` (non-negative), `flatten` (opset < 13 semantics: the
    softmax runs over all dims from `axis` on). x's zero point does not matter
    (softmax is shift invariant; ORT ignores it). Per row of D elements:

        t_j = table[255 - (xmax - x_j)]             (`softmax_exp_table`)
        s   = t_0 + t_1 + ...                       float32, in order
        Y   = f32(floor(f32(1 / y_scale)))
        y_j = saturate(rne(f32(f32(t_j * Y) / s)) + y_zp)
    """

    def infer(ctx):
        x = _check_8bit(ctx, 0, "x")
        if x.shape is not None and not 0 <= ctx.attrs["axis"] < max(len(x.shape), 1):
            raise ctx.error(f"axis {ctx.attrs['axis']} out of range for rank {len(x.shape)}")
        return [TensorType(x.dtype, x.shape, _output_quant(ctx, 2, 3, x.dtype))]

    def evaluate(inputs, attrs):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        x, xs, ys, yzp = inputs
        dtype = dtypes.from_numpy(x.dtype)
        axis = attrs["axis"]
        if attrs.get("flatten", False):
            rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
        else:
            rows = np.moveaxis(x, axis, -1)
            rows = rows.reshape(-1, rows.shape[-1])
        reduce_len = rows.shape[1]
        table = softmax_exp_table(_scalar_f32(xs), reduce_len)
        codes = rows.astype(np.int64)
        t = table[255 - (codes.max(axis=1, keepdims=True) - codes)]
        total = np.zeros(len(rows), dtype=F32)
        for j in range(reduce_len):  # sequential float32 sum, as the kernel loops
            total = (total + t[:, j]).astype(F32)
        big = F32(np.floor(F32(1) / _scalar_f32(ys)))
        with np.errstate(all="ignore"):
            q = ((t * big).astype(F32) / total[:, None]).astype(F32)
        y = numerics.saturate_int(cvtps2dq(q) + _scalar_int(yzp), dtype)
        if attrs.get("flatten", False):
            return [y.reshape(x.shape)]
        moved = np.moveaxis(x, axis, -1).shape
        return [np.ascontiguousarray(np.moveaxis(y.reshape(moved), -1, axis))]
