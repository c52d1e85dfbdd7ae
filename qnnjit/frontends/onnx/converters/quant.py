"""Converters for the ONNX-domain quantization ops.

These ops kept their semantics since they appeared (opset 10, DynamicQuantizeLinear
11), later versions only adding cases (per-axis 13, saturate/float8 19, blocked
and int4 21, output_dtype/precision 23+), so each converter accepts every
opset from the first one.

QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear map one to one; the
quantized linear-algebra ops become exact integer accumulation plus an explicit
requantization, with the float32 multiplier computed the way ONNX Runtime
computes it, by IR float ops that fold when the scales are constants and run
at run time when they are graph inputs:

    QLinearConv    -> qconv(x, w, x_zp, w_zp, bias)
                      + requantize(half_even_float, m = (x_s * w_s) / y_s)
    QLinearMatMul  -> qmatmul(a, b, a_zp, b_zp)
                      + requantize(half_even_float, m = (a_s * b_s) / y_s)
    ConvInteger    -> qconv          MatMulInteger -> qmatmul

`half_even_float` is MLAS's `saturate(rne(f32(acc) * f32(m)) + zp)`; the
multiplier's association order matters in float32 and is ORT's
(docs/ort_numerics.md section 2, measured).
"""

from __future__ import annotations

import numpy as np

from ....ir import dtypes
from ..loader import onnx_dtype
from . import converter
from ._common import axis as normalize_axis
from .float_nn import _window_attrs

HALF_EVEN_FLOAT = "half_even_float"


# ---- helpers (also used by the com.microsoft converters in contrib.py) ---------


def element_count(ctx, index: int, what: str) -> int:
    """Static element count of input `index` (scales and zero points)."""
    value = ctx.input(index)
    shape = value.type.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise ctx.error(f"{what} must have a static shape, got {shape}")
    return int(np.prod(shape, dtype=np.int64))


def output_dtype(ctx, zp_index: int, default=None):
    """The quantized type a node produces: its zero point's type."""
    zp = ctx.input(zp_index)
    if zp is not None:
        return zp.type.dtype
    if default is None:
        raise ctx.error(f"input {zp_index} (the output zero point) is required")
    return default


def multiplier(ctx, factors, divisor=None):
    """f32(f32(factors[0] * factors[1] * ...) / divisor), left to right, as IR
    `mul` / `div` nodes (folded when constant)."""
    result = factors[0]
    for factor in factors[1:]:
        result = ctx.emit("mul", [result, factor])[0]
    if divisor is not None:
        result = ctx.emit("div", [result, divisor])[0]
    return result


def requantize(ctx, acc, mult, zero_point, scale, dtype, per_channel_axis):
    attrs = {"dtype": dtype, "axis": per_channel_axis, "rounding": HALF_EVEN_FLOAT}
    return ctx.emit("requantize", [acc, mult, zero_point, scale], attrs)


def _axis_if_in_range(ctx, value: int, index: int = 0):
    """Normalize a quantization axis when x's rank is known and the axis is in
    range; a per-tensor node may carry an out-of-range default axis."""
    shape = ctx.input(index).type.shape
    if shape is not None and -len(shape) <= value < len(shape):
        return value % len(shape)
    return value


# ---- QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear ----------------


def quantize_linear(ctx):
    x, scale, zero_point = ctx.input(0), ctx.input(1), ctx.input(2)
    if zero_point is not None:
        dtype = zero_point.type.dtype
        requested = ctx.attr("output_dtype", 0)
        if requested and onnx_dtype(requested, ctx.name) != dtype:
            raise ctx.error(f"output_dtype differs from the zero point's type {dtype}")
    elif ctx.attr("output_dtype", 0):
        dtype = onnx_dtype(ctx.attr("output_dtype"), ctx.name)
    else:
        dtype = dtypes.uint8
    if dtype not in dtypes.QUANTIZED_STORAGE or dtype == dtypes.int32:
        raise ctx.error(f"cannot quantize to {dtype}")
    # ONNX Runtime divides in float32 whatever the scale's type; an explicit
    # `precision` attribute (opset 23+) is honoured.
    precision = ctx.attr("precision", 0)
    precision = onnx_dtype(precision, ctx.name) if precision else dtypes.float32
    attrs = {
        "dtype": dtype,
        "axis": _axis_if_in_range(ctx, ctx.attr("axis", 1)),
        "block_size": ctx.attr("block_size", 0),
        "saturate": bool(ctx.attr("saturate", 1)),
        "precision": precision,
        "scale_op": "divide",  # the ONNX preset: x / scale, never x * (1 / scale)
    }
    return ctx.emit("quantize", [x, scale, zero_point], attrs)


def dequantize_linear(ctx):
    q, scale, zero_point = ctx.input(0), ctx.input(1), ctx.input(2)
    requested = ctx.attr("output_dtype", 0)
    if requested:
        dtype = onnx_dtype(requested, ctx.name)
    elif scale.type.dtype in dtypes.EXPRESSED:
        dtype = scale.type.dtype
    else:
        dtype = dtypes.float32
    attrs = {
        "axis": _axis_if_in_range(ctx, ctx.attr("axis", 1)),
        "block_size": ctx.attr("block_size", 0),
        "dtype": dtype,
    }
    return ctx.emit("dequantize", [q, scale, zero_point], attrs)


converter("QuantizeLinear", since=10)(quantize_linear)
converter("DequantizeLinear", since=10)(dequantize_linear)


@converter("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx):
    return ctx.emit("dynamic_quantize", [ctx.input(0)])


# ---- convolutions ---------------------------------------------------------------


def _conv_attrs(ctx, w_index: int) -> dict:
    w = ctx.input(w_index)
    if w.type.shape is None:
        raise ctx.error("the weight must have a known rank")
    kernel = ctx.attr("kernel_shape") or w.type.shape[2:]
    if len(kernel) != len(w.type.shape) - 2 or not all(isinstance(k, int) for k in kernel):
        raise ctx.error(f"kernel shape {list(kernel)} does not match the weight")
    attrs = _window_attrs(ctx, tuple(kernel))
    attrs["group"] = ctx.attr("group", 1)
    return attrs


@converter("QLinearConv", since=10)
def qlinear_conv(ctx):
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (ctx.input(i) for i in range(8))
    bias = ctx.input(8)
    acc = ctx.emit("qconv", [x, w, x_zp, w_zp, bias], _conv_attrs(ctx, 3))[0]
    mult = multiplier(ctx, [x_scale, w_scale], y_scale)
    per_channel = 1 if element_count(ctx, 4, "w_scale") > 1 else None
    return requantize(ctx, acc, mult, y_zp, y_scale, output_dtype(ctx, 7), per_channel)


@converter("ConvInteger", since=10)
def conv_integer(ctx):
    x, w = ctx.input(0), ctx.input(1)
    return ctx.emit("qconv", [x, w, ctx.input(2), ctx.input(3)], _conv_attrs(ctx, 1))


# ---- matrix products ------------------------------------------------------------


@converter("QLinearMatMul", since=10)
def qlinear_matmul(ctx):
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = (ctx.input(i) for i in range(8))
    if element_count(ctx, 1, "a_scale") != 1:
        raise ctx.error("per-row a_scale is not supported (ONNX Runtime needs a scalar)")
    acc = ctx.emit("qmatmul", [a, b, a_zp, b_zp])[0]
    mult = multiplier(ctx, [a_scale, b_scale], y_scale)
    per_column = None
    if element_count(ctx, 4, "b_scale") > 1:
        per_column = normalize_axis(ctx, -1, len(acc.type.shape))
    return requantize(ctx, acc, mult, y_zp, y_scale, output_dtype(ctx, 7), per_column)


@converter("MatMulInteger", since=10)
def matmul_integer(ctx):
    return ctx.emit("qmatmul", [ctx.input(i) for i in range(4)])
