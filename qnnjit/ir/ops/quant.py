"""Quantization ops: the generic integer core every quantized model lowers to.

- `quantize` / `dequantize`: ONNX QuantizeLinear / DequantizeLinear (per-tensor,
  per-axis, blocked; integer, float8 and float4 storage), formulas in
  `qnnjit.numerics`.
- `dynamic_quantize`: DynamicQuantizeLinear (uint8, scale and zero point
  computed from the data).
- `qconv`, `qmatmul`, `qreduce_sum`: exact integer products and sums of
  zero-point-shifted operands, producing an int32 *accumulator* value.
- `requantize`: accumulator -> quantized storage, with the rounding mode named
  in an attribute (never guessed): `half_even_float` (ONNX Runtime / MLAS:
  float32 multiply, round half to even), `fixed_point_double` (gemmlowp /
  classic TFLite) and `fixed_point_single` (TFLite single rounding).
- Fused forms that compiler passes create, each an optional attribute whose
  absence is the plain op: `clamp=(lo, hi)` on `requantize` / `quantize` (a
  relu/clip folded into the saturation), `pad_value` on `qconv` (the stored
  value the padding stands for once the x zero point is folded into the bias).

Integer semantics of the accumulator ops: every product and sum is computed
exactly (in float64 BLAS when K * max|a| * max|b| < 2^53 bounds every partial
sum below 2^53, so that any summation order is exact; else in int64), then the
result is wrapped to int32 (two's complement),
which is what ONNX Runtime's int32 accumulators do in hardware (MLAS uses the
non-saturating `vpdpbusd` / `vpaddd`). A model whose accumulators can leave the
int32 range is the range analysis' business to report, not the interpreter's
to hide.

Operands that only *type* the result (the output scale of `requantize`, the
scale/zero point of `lookup`'s table) are optional trailing inputs; the
arithmetic never reads them. A result carries `QuantParams` when its scale and
zero point are compile-time constants, else `quant=None`.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ... import numerics
from .. import dtypes
from ..types import Accumulator, QuantParams, TensorType
from . import broadcast_shapes, op
from .nn import conv_float64, spatial_out

INT32_MIN = -(1 << 31)

ROUNDINGS = ("half_even_float", "fixed_point_single", "fixed_point_double")


# ---- helpers shared by the quantization ops ------------------------------------


def quant_params(scale, zero_point, dtype, *, axis=None, block_size=0, rank=None):
    """`QuantParams` for constant `scale` / `zero_point` arrays, or None when they
    do not form valid parameters (unknown, non-positive scale, odd shapes).

    A one-element scale is per-tensor; otherwise 1-D is per-axis along `axis`
    and a full-rank scale with `block_size` is blocked.
    """
    if scale is None or dtype not in dtypes.QUANTIZED_STORAGE:
        return None
    scale = np.asarray(scale)
    try:
        expressed = dtypes.from_numpy(scale.dtype)
    except TypeError:
        return None
    if expressed not in dtypes.EXPRESSED:
        return None
    if zero_point is None:
        zero_point = np.zeros(scale.shape, dtype=np.float64 if dtype.is_float else np.int64)
    zero_point = np.asarray(zero_point)
    if zero_point.size != scale.size:
        return None
    try:
        if scale.size == 1 and not block_size:
            return QuantParams(
                scale.reshape(()), zero_point.reshape(()), dtype, expressed=expressed
            )
        if axis is None:
            return None
        if rank is not None:
            if not -rank <= axis < rank:
                return None
            axis %= rank
        return QuantParams(
            scale, zero_point.reshape(scale.shape), dtype, axis, block_size, expressed
        )
    except (ValueError, TypeError):
        return None


def _const(ctx, index):
    return ctx.consts[index] if index < len(ctx.consts) else None


def _wrap_int32(values: np.ndarray) -> np.ndarray:
    """Two's complement wrap of exact int64 results to int32 (C int32 arithmetic)."""
    values = np.asarray(values, dtype=np.int64)
    return (((values - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN).astype(np.int32)


def _fits_float64(k: int, a_max: int, b_max: int) -> bool:
    """Whether a sum of k products of integers bounded by a_max and b_max is
    exact in float64 in any order: every partial sum stays below 2^53."""
    return k * a_max * b_max < 1 << 53


def _zero_point(zp, default_dtype=np.int64) -> np.ndarray:
    if zp is None:
        return np.zeros((), default_dtype)
    return np.asarray(zp).astype(np.int64)


def _accumulator(shape) -> TensorType:
    return TensorType(dtypes.int32, shape, accumulator=Accumulator(32))


def check_clamp(ctx, dtype) -> None:
    """Validate the optional `clamp=(lo, hi)` attribute of an op storing `dtype`:
    two integers with qmin <= lo <= hi <= qmax."""
    clamp = ctx.attrs.get("clamp")
    if clamp is None:
        return
    if not dtype.is_int:
        raise ctx.error(f"clamp needs integer storage, got {dtype}")
    if len(clamp) != 2 or not all(isinstance(b, (int, np.integer)) for b in clamp):
        raise ctx.error(f"clamp must be two integers (lo, hi), got {clamp!r}")
    lo, hi = (int(b) for b in clamp)
    if not dtype.qmin <= lo <= hi <= dtype.qmax:
        raise ctx.error(f"clamp ({lo}, {hi}) is not an interval of {dtype}'s range")


def apply_clamp(y: np.ndarray, clamp) -> np.ndarray:
    """`min(max(y, lo), hi)` in y's dtype; `clamp=None` leaves y unchanged."""
    if clamp is None:
        return y
    lo, hi = (int(b) for b in clamp)
    return np.clip(y, lo, hi).astype(y.dtype, copy=False)


def _check_int_operand(ctx, index, what):
    t = ctx.type(index)
    if not t.dtype.is_int or t.dtype.bits > 16:
        raise ctx.error(f"{what} must be an integer tensor of at most 16 bits, got {t.dtype}")
    return t


# ---- quantize / dequantize -------------------------------------------------------


@op("quantize", summary="saturate(round_half_even(x / scale) + zero_point) (QuantizeLinear)")
class Quantize:
    """Inputs: x (float), scale, zero_point (optional). Attributes: `dtype` (the
    storage DType), `axis`, `block_size`, `saturate` (float8 only), `precision`
    (the float type of the division; float32 is what ONNX Runtime does), and
    `clamp` (optional, integer storage only): `(lo, hi)` with
    qmin <= lo <= hi <= qmax, then

        y = min(max(quantize(x), lo), hi)    for every x that is not NaN,
        y = qmin                             for NaN x (as without a clamp).

    The clamp is a float relu/clip moved past the quantize
    (compiler/passes/fuse_activation.py): quantize is monotone, so
    quantize(clip(x, a, b)) == min(max(quantize(x), quantize(a)), quantize(b));
    the float clip passes NaN through, and quantize(NaN) is qmin, hence the NaN
    case."""

    def infer(ctx):
        x, scale = ctx.type(0), ctx.type(1)
        if not x.dtype.is_float or not scale.dtype.is_float:
            raise ctx.error(f"x and scale must be floats, got {x.dtype} and {scale.dtype}")
        dtype = ctx.attrs["dtype"]
        if dtype not in dtypes.QUANTIZED_STORAGE:
            raise ctx.error(f"{dtype} is not a quantized storage type")
        if ctx.has(2) and ctx.type(2).dtype != dtype:
            raise ctx.error(f"zero point is {ctx.type(2).dtype}, output is {dtype}")
        check_clamp(ctx, dtype)
        if ctx.attrs.get("scale_op", "divide") not in numerics.SCALE_OPS:
            raise ctx.error(f"scale_op must be one of {numerics.SCALE_OPS}")
        quant = None
        if _const(ctx, 1) is not None and (not ctx.has(2) or _const(ctx, 2) is not None):
            quant = quant_params(
                _const(ctx, 1),
                _const(ctx, 2),
                dtype,
                axis=ctx.attrs.get("axis", 1),
                block_size=ctx.attrs.get("block_size", 0),
                rank=x.rank,
            )
        return [TensorType(dtype, x.shape, quant)]

    def evaluate(inputs, attrs):
        x, scale = inputs[0], inputs[1]
        zero_point = inputs[2] if len(inputs) > 2 else None
        y = numerics.quantize(
            x,
            scale,
            zero_point,
            attrs["dtype"],
            axis=attrs.get("axis", 1),
            block_size=attrs.get("block_size", 0),
            saturate=attrs.get("saturate", True),
            precision=attrs.get("precision", dtypes.float32),
            scale_op=attrs.get("scale_op", "divide"),
        )
        if attrs.get("clamp") is not None:
            y = np.where(np.isnan(x), y, apply_clamp(y, attrs["clamp"]))
        return [y]


@op("dequantize", summary="(q - zero_point) * scale as float `dtype` (ONNX DequantizeLinear)")
class Dequantize:
    """Inputs: q (quantized storage or int32), scale, zero_point (optional).
    Attributes: `axis`, `block_size`, `dtype` (the float output type)."""

    def infer(ctx):
        q, scale = ctx.type(0), ctx.type(1)
        if q.dtype not in dtypes.QUANTIZED_STORAGE:
            raise ctx.error(f"cannot dequantize {q.dtype}")
        if not scale.dtype.is_float:
            raise ctx.error(f"scale must be a float, got {scale.dtype}")
        dtype = ctx.attrs.get("dtype", dtypes.float32)
        if not dtype.is_float:
            raise ctx.error(f"output type must be a float type, got {dtype}")
        return [TensorType(dtype, q.shape)]

    def evaluate(inputs, attrs):
        q, scale = inputs[0], inputs[1]
        zero_point = inputs[2] if len(inputs) > 2 else None
        return [
            numerics.dequantize(
                q,
                scale,
                zero_point,
                axis=attrs.get("axis", 1),
                block_size=attrs.get("block_size", 0),
                out_dtype=attrs.get("dtype", dtypes.float32),
            )
        ]


@op("dynamic_quantize", summary="(y, scale, zero_point) = uint8 quantization over x's own range")
class DynamicQuantize:
    """ONNX DynamicQuantizeLinear; the scale and zero point are run-time values,
    so `y` carries no QuantParams."""

    def infer(ctx):
        x = ctx.type(0)
        if not x.dtype.is_float:
            raise ctx.error(f"x must be a float tensor, got {x.dtype}")
        return [
            TensorType(dtypes.uint8, x.shape),
            TensorType(dtypes.float32, ()),
            TensorType(dtypes.uint8, ()),
        ]

    def evaluate(inputs, attrs):
        y, scale, zero_point = numerics.dynamic_quantize_uint8(inputs[0])
        return [y, np.asarray(scale, np.float32), np.asarray(zero_point, np.uint8)]


# ---- integer accumulating ops ----------------------------------------------------


def _conv_spatial(ctx, x_shape, kernel, attrs) -> list:
    """Output spatial dims of an integer conv: the float conv's window arithmetic."""
    n = len(kernel)
    for name, length in (("strides", n), ("dilations", n), ("pads", 2 * n)):
        if len(attrs[name]) != length:
            raise ctx.error(f"{name} has {len(attrs[name])} entries, expected {length}")
    return spatial_out(ctx, x_shape, kernel, attrs)


@op("qconv", summary="int32 acc = sum (x - x_zp) * (w - w_zp) over conv windows, + bias")
class QConv:
    """Inputs: x [N, C, ...], w [M, C/group, ...] (8/16-bit integers),
    x_zero_point (per-tensor), w_zero_point (per-tensor or one per output
    channel M), bias (int32 [M]); the last three optional. Attributes:
    `strides`, `pads` (explicit, [begins..., ends...]), `dilations`, `group`,
    and `pad_value` (optional): the stored x value the padding stands for,
    contributing (pad_value - x_zp) * (w - w_zp). By default it is x_zp
    (padding contributes 0, as in QLinearConv / ConvInteger); zero-point
    folding (compiler/passes/fold_zero_points.py) drops x_zp and sets
    pad_value to the old x_zp. Exact in int64, then wrapped to int32."""

    def infer(ctx):
        x = _check_int_operand(ctx, 0, "x")
        w = _check_int_operand(ctx, 1, "w")
        if x.shape is None or w.shape is None:
            raise ctx.error("qconv needs inputs of known rank")
        if len(x.shape) != len(w.shape) or len(x.shape) < 3:
            raise ctx.error(f"x {x.shape} and w {w.shape} do not form a convolution")
        group = ctx.attrs["group"]
        channels, m = x.shape[1], w.shape[0]
        if (
            isinstance(channels, int)
            and isinstance(w.shape[1], int)
            and (channels != w.shape[1] * group)
        ):
            raise ctx.error(f"{channels} input channels != {w.shape[1]} x group {group}")
        if isinstance(m, int) and m % group:
            raise ctx.error(f"{m} output channels are not divisible by group {group}")
        if ctx.has(4) and ctx.type(4).dtype != dtypes.int32:
            raise ctx.error(f"bias must be int32, got {ctx.type(4).dtype}")
        pad_value = ctx.attrs.get("pad_value")
        if pad_value is not None and (
            not isinstance(pad_value, (int, np.integer))
            or not x.dtype.qmin <= pad_value <= x.dtype.qmax
        ):
            raise ctx.error(f"pad_value {pad_value!r} is not a {x.dtype} value")
        spatial = _conv_spatial(ctx, x.shape, w.shape[2:], ctx.attrs)
        return [_accumulator((x.shape[0], m, *spatial))]

    def evaluate(inputs, attrs):
        inputs = list(inputs) + [None] * (5 - len(inputs))
        x, w, x_zp, w_zp, bias = inputs
        n, group = w.ndim - 2, attrs["group"]
        m, kernel = w.shape[0], w.shape[2:]
        x_zp = _zero_point(x_zp).reshape(())
        xs = x.astype(np.int64) - x_zp
        pad_value = attrs.get("pad_value")
        shifted_pad = 0 if pad_value is None else int(pad_value) - int(x_zp)
        w_zp = _zero_point(w_zp)
        w_zp = w_zp.reshape((-1,) + (1,) * (n + 1)) if w_zp.size > 1 else w_zp.reshape(())
        ws = w.astype(np.int64) - w_zp
        pads = attrs["pads"]
        k_size = (x.shape[1] // group) * int(np.prod(kernel, dtype=np.int64))
        x_max = max(int(np.abs(xs).max(initial=0)), abs(shifted_pad))
        if _fits_float64(k_size, x_max, int(np.abs(ws).max(initial=0))):
            acc = conv_float64(
                xs, ws, pads, attrs["strides"], attrs["dilations"], group, float(shifted_pad)
            ).astype(np.int64)
            if bias is not None:
                acc = acc + bias.astype(np.int64).reshape((1, -1) + (1,) * n)
            return [_wrap_int32(acc)]
        widths = [(0, 0), (0, 0)] + [(pads[i], pads[n + i]) for i in range(n)]
        xs = np.pad(xs, widths, constant_values=shifted_pad)  # pad_value - x_zp
        spans = [d * (k - 1) + 1 for k, d in zip(kernel, attrs["dilations"], strict=True)]
        view = sliding_window_view(xs, spans, axis=tuple(range(2, 2 + n)))
        index = (slice(None), slice(None))
        index += tuple(slice(None, None, s) for s in attrs["strides"])
        index += tuple(slice(None, None, d) for d in attrs["dilations"])
        windows = view[index]
        batch, channels = x.shape[:2]
        out_spatial = windows.shape[2 : 2 + n]
        windows = windows.reshape(batch, group, channels // group, int(np.prod(out_spatial)), -1)
        weights = ws.reshape(group, m // group, channels // group, -1)
        acc = np.einsum("ngcok,gmck->ngmo", windows, weights)
        acc = acc.reshape(batch, m, *out_spatial)
        if bias is not None:
            acc = acc + bias.astype(np.int64).reshape((1, -1) + (1,) * n)
        return [_wrap_int32(acc)]


def matmul_shape(ctx, a_shape, b_shape):
    """Output shape of numpy matmul (1-D operands promoted and dropped)."""
    if a_shape is None or b_shape is None:
        return None
    if not a_shape or not b_shape:
        raise ctx.error("matmul operands must have rank >= 1")
    a2 = (1, *a_shape) if len(a_shape) == 1 else tuple(a_shape)
    b2 = (*b_shape, 1) if len(b_shape) == 1 else tuple(b_shape)
    k_a, k_b = a2[-1], b2[-2]
    if isinstance(k_a, int) and isinstance(k_b, int) and k_a != k_b:
        raise ctx.error(f"inner dimensions differ: {a_shape} @ {b_shape}")
    batch = broadcast_shapes(ctx, a2[:-2], b2[:-2])
    shape = [*batch, a2[-2], b2[-1]]
    if len(b_shape) == 1:
        shape.pop(-1)
    if len(a_shape) == 1:
        shape.pop(-2 if len(b_shape) > 1 else -1)
    return tuple(shape)


@op("qmatmul", summary="int32 acc = (a - a_zp) @ (b - b_zp), numpy matmul broadcasting")
class QMatMul:
    """Inputs: a, b (8/16-bit integers), a_zero_point (scalar, or per row of a:
    [M] or [..., M, 1]), b_zero_point (scalar, or per column of b: [N] or
    [..., 1, N]); the zero points are optional. Exact in int64, then wrapped to
    int32."""

    def infer(ctx):
        a = _check_int_operand(ctx, 0, "a")
        b = _check_int_operand(ctx, 1, "b")
        return [_accumulator(matmul_shape(ctx, a.shape, b.shape))]

    def evaluate(inputs, attrs):
        inputs = list(inputs) + [None] * (4 - len(inputs))
        a, b, a_zp, b_zp = inputs
        a_zp, b_zp = _zero_point(a_zp), _zero_point(b_zp)
        if a_zp.size == 1:
            a_zp = a_zp.reshape(())
        elif a_zp.ndim == 1:
            a_zp = a_zp.reshape(-1, 1)  # one per row of a
        if b_zp.size == 1:
            b_zp = b_zp.reshape(())
        a_s, b_s = a.astype(np.int64) - a_zp, b.astype(np.int64) - b_zp
        k_size = a.shape[-1]
        if _fits_float64(k_size, int(np.abs(a_s).max(initial=0)), int(np.abs(b_s).max(initial=0))):
            acc = np.matmul(a_s.astype(np.float64), b_s.astype(np.float64)).astype(np.int64)
        else:
            acc = np.matmul(a_s, b_s)
        return [_wrap_int32(acc)]


@op("qreduce_sum", summary="int32 acc = sum over `axes` of (x - x_zp)")
class QReduceSum:
    """Inputs: x (8/16-bit integers), x_zero_point (per-tensor, optional).
    Attributes: `axes` (non-negative), `keepdims`. Exact, wrapped to int32."""

    def infer(ctx):
        x = _check_int_operand(ctx, 0, "x")
        if x.shape is None:
            return [_accumulator(None)]
        axes, keep = ctx.attrs["axes"], ctx.attrs.get("keepdims", True)
        if any(not 0 <= a < len(x.shape) for a in axes):
            raise ctx.error(f"axes {axes} out of range for rank {len(x.shape)}")
        if keep:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return [_accumulator(shape)]

    def evaluate(inputs, attrs):
        x = inputs[0]
        zp = _zero_point(inputs[1] if len(inputs) > 1 else None).reshape(())
        axes = tuple(attrs["axes"])
        total = (x.astype(np.int64) - zp).sum(axis=axes, keepdims=attrs.get("keepdims", True))
        return [_wrap_int32(total)]


# ---- requantize -----------------------------------------------------------------


@op("requantize", summary="int32 acc -> `dtype` with an explicitly named rounding")
class Requantize:
    """Inputs: acc (integer, normally an int32 accumulator), multiplier (float:
    the real factor input_scale / output_scale, per-tensor or 1-D along
    `axis`), zero_point (output zero point, optional), scale (the output scale:
    typing only, optional). Attributes: `dtype`, `axis` (None: per-tensor),
    `rounding`:

    - "half_even_float": saturate(round_half_even(f32(acc) * f32(m)) + zp),
      ONNX Runtime / MLAS (`numerics.requantize_float`);
    - "fixed_point_double" / "fixed_point_single": m decomposed by
      `numerics.quantize_multiplier` into an int32 multiplier and shift, then
      gemmlowp's two roundings or TFLite's single rounding
      (`numerics.requantize_fixed_point`).

    `clamp` (optional): `(lo, hi)` with qmin <= lo <= hi <= qmax; the result
    is then `min(max(y, lo), hi)`, i.e. saturation to [lo, hi] instead of the
    storage range (a fused relu/clip: compiler/passes/fuse_activation.py).
    Every rounding computes `y = clamp(rounded + zp, qmin, qmax)` with
    `rounded` independent of zp, so with the clamp the result is
    `clamp(rounded + zp, lo, hi)`.
    """

    def infer(ctx):
        acc, multiplier = ctx.type(0), ctx.type(1)
        if not acc.dtype.is_int:
            raise ctx.error(f"accumulator must be an integer tensor, got {acc.dtype}")
        if not multiplier.dtype.is_float:
            raise ctx.error(f"multiplier must be a float, got {multiplier.dtype}")
        dtype, rounding = ctx.attrs["dtype"], ctx.attrs["rounding"]
        if rounding not in ROUNDINGS:
            raise ctx.error(f"rounding {rounding!r} is not one of {ROUNDINGS}")
        if not dtype.is_int or dtype.bits > 32:
            raise ctx.error(f"cannot requantize to {dtype}")
        if ctx.has(2) and ctx.type(2).dtype != dtype:
            raise ctx.error(f"zero point is {ctx.type(2).dtype}, output is {dtype}")
        check_clamp(ctx, dtype)
        quant = None
        if _const(ctx, 3) is not None and (not ctx.has(2) or _const(ctx, 2) is not None):
            quant = quant_params(
                _const(ctx, 3), _const(ctx, 2), dtype, axis=ctx.attrs.get("axis"), rank=acc.rank
            )
        return [TensorType(dtype, acc.shape, quant)]

    def evaluate(inputs, attrs):
        acc, multiplier = inputs[0], inputs[1]
        zero_point = inputs[2] if len(inputs) > 2 and inputs[2] is not None else 0
        dtype, rounding, axis = attrs["dtype"], attrs["rounding"], attrs.get("axis")
        if rounding == "half_even_float":
            y = numerics.requantize_float(acc, multiplier, zero_point, dtype, axis=axis)
        else:
            single = rounding == "fixed_point_single"
            m, shift = numerics.quantize_multiplier(multiplier, single_rounding=single)
            y = numerics.requantize_fixed_point(
                acc, m, shift, zero_point, dtype, double_rounding=not single, axis=axis
            )
        return [apply_clamp(y, attrs.get("clamp"))]


# ---- table lookup ---------------------------------------------------------------


@op("lookup", summary="y = table[x - qmin(x)]: a full table over x's storage range")
class Lookup:
    """Inputs: x (integer storage of at most 16 bits), table (1-D, one entry
    per value of x's type, ordered from qmin to qmax), then optionally the
    output's scale and zero point (typing only). The output has the table's
    dtype and x's shape. ONNX Runtime's QLinearSigmoid / QLinearLeakyRelu /
    QLinearConcat are tables built at compile time."""

    def infer(ctx):
        x, table = ctx.type(0), ctx.type(1)
        if not x.dtype.is_int or x.dtype.bits > 16:
            raise ctx.error(f"lookup index must be an integer of at most 16 bits, got {x.dtype}")
        entries = 1 << x.dtype.bits
        if table.shape is not None and tuple(table.shape) != (entries,):
            raise ctx.error(f"table must have shape ({entries},) for {x.dtype}, got {table.shape}")
        quant = None
        if _const(ctx, 2) is not None and (not ctx.has(3) or _const(ctx, 3) is not None):
            quant = quant_params(_const(ctx, 2), _const(ctx, 3), table.dtype)
        return [TensorType(table.dtype, x.shape, quant)]

    def evaluate(inputs, attrs):
        x, table = inputs[0], inputs[1]
        qmin = dtypes.from_numpy(x.dtype).qmin
        return [np.take(table, x.astype(np.int64) - qmin)]
