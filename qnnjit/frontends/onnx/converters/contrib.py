"""Converters for ONNX Runtime's com.microsoft quantized ops.

Each becomes the composition of generic IR ops that reproduces ONNX Runtime
1.31's CPU kernel bit for bit, or a dedicated op where the kernel's float32
arithmetic is its own (qlinear_contrib.py; docs/ort_numerics.md):

    QuantizeLinear / DequantizeLinear   -> quantize / dequantize (same kernels
                                           as the ONNX-domain ops)
    QLinearAdd                          -> qadd (rounding mlas_fma)
    QLinearMul                          -> qmul
    QLinearGlobalAveragePool            -> qreduce_sum + requantize(half_even_float,
                                           m = x_s / (y_s * HW))
    QLinearAveragePool                  -> the global composition when the kernel
                                           covers the unpadded image, else
                                           qaverage_pool
    QLinearSigmoid / QLinearLeakyRelu   -> lookup(x, table), the table built at
                                           compile time: quantize(f(dequantize(codes)))
    QLinearConcat                       -> lookup per input whose scale or zero
                                           point differs from the output's, concat
    QLinearSoftmax                      -> qsoftmax
    QGemm                               -> [transpose] + qmatmul [+ add(int32 C)]
                                           + requantize(half_even_float,
                                           m = (alpha * a_s * b_s) / y_s),
                                           or dequantize(acc, alpha * a_s * b_s)
                                           for a float output

Lookup tables need constant scales and zero points for QLinearSigmoid (its
function is MLAS's logistic approximation, `mlas_logistic`); QLinearLeakyRelu
and QLinearConcat build the table with IR ops at run time when they are not.
"""

from __future__ import annotations

import numpy as np

from ....ir import dtypes, ops
from ....ir.ops.qlinear_contrib import F32, fma_f32
from . import converter
from ._common import axis as normalize_axis
from ._common import rank
from .float_nn import _same_pads
from .quant import (
    dequantize_linear,
    element_count,
    multiplier,
    output_dtype,
    quantize_linear,
    requantize,
)

MS = "com.microsoft"

converter("QuantizeLinear", domain=MS)(quantize_linear)
converter("DequantizeLinear", domain=MS)(dequantize_linear)


def _is_const(*values) -> bool:
    return all(v is None or v.is_constant for v in values)


def _const_or_none(value):
    return None if value is None else value.const


# ---- QLinearAdd / QLinearMul ----------------------------------------------------


@converter("QLinearAdd", domain=MS)
def qlinear_add(ctx):
    return ctx.emit("qadd", [ctx.input(i) for i in range(8)], {"rounding": "mlas_fma"})


@converter("QLinearMul", domain=MS)
def qlinear_mul(ctx):
    return ctx.emit("qmul", [ctx.input(i) for i in range(8)], {"rounding": "mlas"})


# ---- pooling --------------------------------------------------------------------


def _spatial_axes(ctx, channels_last: bool) -> list[int]:
    n = rank(ctx, 0) - 2
    if n < 1:
        raise ctx.error("the input needs at least one spatial axis")
    return list(range(1, n + 1)) if channels_last else list(range(2, n + 2))


def _global_average(ctx, x, x_scale, x_zp, y_scale, y_zp, axes):
    """MLAS QLinearGlobalAveragePool: exact integer sum of (x - x_zp), then
    requantize with scale = f32(x_s / f32(y_s * HW))."""
    shape = x.type.shape
    sizes = [shape[a] for a in axes]
    if not all(isinstance(s, int) for s in sizes):
        raise ctx.error(f"global average pooling needs static spatial dims, got {sizes}")
    image = int(np.prod(sizes))
    acc = ctx.emit("qreduce_sum", [x, x_zp], {"axes": tuple(axes), "keepdims": True})[0]
    count = ctx.constant(np.asarray(image, dtype=y_scale.type.dtype.numpy), "image_size")
    mult = multiplier(ctx, [x_scale], ctx.emit("mul", [y_scale, count])[0])
    return requantize(ctx, acc, mult, y_zp, y_scale, output_dtype(ctx, 4, x.type.dtype), None)


@converter("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(ctx):
    x, x_scale, x_zp, y_scale, y_zp = (ctx.input(i) for i in range(5))
    axes = _spatial_axes(ctx, bool(ctx.attr("channels_last", 0)))
    return _global_average(ctx, x, x_scale, x_zp, y_scale, y_zp, axes)


@converter("QLinearAveragePool", domain=MS)
def qlinear_average_pool(ctx):
    x, x_scale, x_zp, y_scale, y_zp = (ctx.input(i) for i in range(5))
    channels_last = bool(ctx.attr("channels_last", 0))
    axes = _spatial_axes(ctx, channels_last)
    n = len(axes)
    kernel = tuple(ctx.attr("kernel_shape", ()))
    if len(kernel) != n:
        raise ctx.error(f"kernel_shape {list(kernel)} does not match {n} spatial axes")
    strides = tuple(ctx.attr("strides", [1] * n))
    if any(d != 1 for d in ctx.attr("dilations", [1] * n)):
        raise ctx.error("dilations are not supported by QLinearAveragePool")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    sizes = [x.type.shape[a] for a in axes]
    if auto_pad == "NOTSET":
        pads = tuple(ctx.attr("pads", [0] * 2 * n))
    elif auto_pad == "VALID":
        pads = (0,) * 2 * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(ctx, sizes, kernel, strides, (1,) * n, auto_pad == "SAME_UPPER")
    else:
        raise ctx.error(f"unknown auto_pad {auto_pad!r}")
    if tuple(sizes) == kernel and not any(pads):
        # ORT falls back to its global average pool kernel (integer sum).
        return _global_average(ctx, x, x_scale, x_zp, y_scale, y_zp, axes)
    attrs = {
        "kernel_shape": kernel,
        "strides": strides,
        "pads": pads,
        "ceil_mode": bool(ctx.attr("ceil_mode", 0)),
        "count_include_pad": bool(ctx.attr("count_include_pad", 0)),
        "channels_last": channels_last,
    }
    return ctx.emit("qaverage_pool", [x, x_scale, x_zp, y_scale, y_zp], attrs)


# ---- table lookups --------------------------------------------------------------

_LOGISTIC = {
    "lower": F32(-18.0),
    "upper": F32(18.0),
    "alpha": [F32(v) for v in (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                              8.51377133304701e-03, 2.48287947061529e-01)],
    "beta": [F32(v) for v in (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                             1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01)],
}  # fmt: skip


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """MLAS `MlasComputeLogistic` as dispatched on x86-64 (FMA3 kernel), float32:

    v = clamp(x, -18, 18); v2 = v * v
    p = v * fma(fma(fma(fma(v2, a9, a7), v2, a5), v2, a3), v2, a1)
    q = fma(fma(fma(fma(fma(v2, b10, b8), v2, b6), v2, b4), v2, b2), v2, b0)
    y = clamp(p / q + 0.5, 0, 1)
    """
    v = np.clip(np.asarray(x, dtype=F32), _LOGISTIC["lower"], _LOGISTIC["upper"])
    v2 = (v * v).astype(F32)
    a9, a7, a5, a3, a1 = _LOGISTIC["alpha"]
    p = fma_f32(v2, a9, a7)
    for coefficient in (a5, a3, a1):
        p = fma_f32(p, v2, coefficient)
    p = (p * v).astype(F32)
    b10, b8, b6, b4, b2, b0 = _LOGISTIC["beta"]
    q = fma_f32(v2, b10, b8)
    for coefficient in (b6, b4, b2, b0):
        q = fma_f32(q, v2, coefficient)
    y = ((p / q).astype(F32) + F32(0.5)).astype(F32)
    return np.clip(y, F32(0), F32(1))


def _codes(dtype) -> np.ndarray:
    """Every value of an integer storage type, qmin first (a lookup table's index)."""
    return np.arange(dtype.qmin, dtype.qmax + 1).astype(dtype.numpy)


def _table(ctx, x, x_scale, x_zp, y_scale, y_zp, y_dtype, function, emit_function=None):
    """quantize(function(dequantize(codes))) over all codes of x's type, with
    MLAS's table arithmetic (true division, round half to even). Folded to a
    constant when the scales and zero points are; otherwise built by IR nodes
    when `emit_function` can express `function` (else an error)."""
    x_dtype = x.type.dtype
    dq_attrs = {"axis": 1, "block_size": 0, "dtype": dtypes.float32}
    q_attrs = {
        "dtype": y_dtype,
        "axis": 1,
        "block_size": 0,
        "saturate": True,
        "precision": dtypes.float32,
    }
    if _is_const(x_scale, x_zp, y_scale, y_zp):
        deq = ops.evaluate(
            "dequantize", [_codes(x_dtype), x_scale.const, _const_or_none(x_zp)], dq_attrs
        )[0]
        out = function(deq)
        table = ops.evaluate("quantize", [out, y_scale.const, _const_or_none(y_zp)], q_attrs)[0]
        return ctx.constant(table, "table")
    if emit_function is None:
        raise ctx.error("the lookup table needs constant scales and zero points")
    codes = ctx.constant(_codes(x_dtype), "codes")
    deq = ctx.emit("dequantize", [codes, x_scale, x_zp], dq_attrs)[0]
    return ctx.emit("quantize", [emit_function(deq), y_scale, y_zp], q_attrs)[0]


def _lookup(ctx, x, table, y_scale, y_zp):
    return ctx.emit("lookup", [x, table, y_scale, y_zp])


@converter("QLinearSigmoid", domain=MS)
def qlinear_sigmoid(ctx):
    x, x_scale, x_zp, y_scale, y_zp = (ctx.input(i) for i in range(5))
    for index, what in ((1, "X_scale"), (2, "X_zero_point"), (3, "Y_scale"), (4, "Y_zero_point")):
        if ctx.input(index) is not None:
            ctx.const(index, what)  # the logistic table is built at compile time
    y_dtype = output_dtype(ctx, 4, x.type.dtype)
    table = _table(ctx, x, x_scale, x_zp, y_scale, y_zp, y_dtype, mlas_logistic)
    return _lookup(ctx, x, table, y_scale, y_zp)


@converter("QLinearLeakyRelu", domain=MS)
def qlinear_leaky_relu(ctx):
    x, x_scale, x_zp, y_scale, y_zp = (ctx.input(i) for i in range(5))
    alpha = F32(ctx.attr("alpha", 0.01))
    y_dtype = output_dtype(ctx, 4, x.type.dtype)

    def function(v):
        return np.where(v >= 0, v, (v * alpha).astype(F32)).astype(F32)

    def emit_function(v):
        return ctx.emit("leaky_relu", [v], {"alpha": float(alpha)})[0]

    table = _table(ctx, x, x_scale, x_zp, y_scale, y_zp, y_dtype, function, emit_function)
    return _lookup(ctx, x, table, y_scale, y_zp)


def _same_params(scale, zp, y_scale, y_zp) -> bool:
    """ORT's copy condition: equal float32 scales and equal zero points, known
    at compile time."""
    if not _is_const(scale, zp, y_scale, y_zp):
        return False
    zero = np.zeros(1, np.int64)
    zp_value = zero if zp is None else zp.const.astype(np.int64).reshape(-1)
    y_zp_value = zero if y_zp is None else y_zp.const.astype(np.int64).reshape(-1)
    same_scale = np.array_equal(
        scale.const.astype(np.float32).reshape(-1), y_scale.const.astype(np.float32).reshape(-1)
    )
    return same_scale and np.array_equal(zp_value, y_zp_value)


@converter("QLinearConcat", domain=MS)
def qlinear_concat(ctx):
    y_scale, y_zp = ctx.input(0), ctx.input(1)
    count = len(ctx.inputs) - 2
    if count < 3 or count % 3:
        raise ctx.error("inputs must be y_scale, y_zero_point, then (x, scale, zero_point) triples")
    y_dtype = output_dtype(ctx, 1)
    pieces = []
    for start in range(2, 2 + count, 3):
        x, scale, zp = ctx.input(start), ctx.input(start + 1), ctx.input(start + 2)
        if x.type.dtype != y_dtype:
            raise ctx.error(f"input {start} is {x.type.dtype}, the output is {y_dtype}")
        if _same_params(scale, zp, y_scale, y_zp):
            pieces.append(x)
            continue
        table = _table(ctx, x, scale, zp, y_scale, y_zp, y_dtype, lambda v: v, lambda v: v)
        pieces.append(_lookup(ctx, x, table, y_scale, y_zp)[0])
    axis = normalize_axis(ctx, ctx.attr("axis"), rank(ctx, 2))
    return ctx.emit("concat", pieces, {"axis": axis})


# ---- QLinearSoftmax -------------------------------------------------------------


@converter("QLinearSoftmax", domain=MS)
def qlinear_softmax(ctx):
    x, x_scale, _, y_scale, y_zp = (ctx.input(i) for i in range(5))
    opset = ctx.attr("opset")
    if opset is None:
        raise ctx.error("the `opset` attribute is required")
    flatten = opset < 13
    axis = normalize_axis(ctx, ctx.attr("axis", 1 if flatten else -1), rank(ctx, 0))
    return ctx.emit("qsoftmax", [x, x_scale, y_scale, y_zp], {"axis": axis, "flatten": flatten})


# ---- QGemm ----------------------------------------------------------------------


@converter("QGemm", domain=MS)
def qgemm(ctx):
    a, a_scale, a_zp, b, b_scale, b_zp = (ctx.input(i) for i in range(6))
    c, y_scale, y_zp = ctx.input(6), ctx.input(7), ctx.input(8)
    if rank(ctx, 0) != 2 or rank(ctx, 3) != 2:
        raise ctx.error("QGemm takes 2-D A and B")
    if ctx.attr("transA", 0):
        a = ctx.emit("transpose", [a], {"perm": (1, 0)})[0]
    if ctx.attr("transB", 0):
        b = ctx.emit("transpose", [b], {"perm": (1, 0)})[0]
    acc = ctx.emit("qmatmul", [a, b, a_zp, b_zp])[0]
    if c is not None:
        acc = ctx.emit("add", [acc, c])[0]  # int32, wraps like ORT's accumulator
    factors = [a_scale, b_scale]
    alpha = ctx.attr("alpha", 1.0)
    if alpha != 1.0:
        factors.insert(0, ctx.constant(np.asarray(alpha, dtype=a_scale.type.dtype.numpy), "alpha"))
    per_column = 1 if element_count(ctx, 4, "b_scale") > 1 else None
    if y_zp is None:  # float output: alpha * a_s * b_s [/ y_s] * acc
        mult = multiplier(ctx, factors, y_scale)
        attrs = {"axis": 1, "block_size": 0, "dtype": dtypes.float32}
        return ctx.emit("dequantize", [acc, mult], attrs)
    mult = multiplier(ctx, factors, y_scale)
    return requantize(ctx, acc, mult, y_zp, y_scale, y_zp.type.dtype, per_column)
