"""Float neural-network ops: convolution, Gemm/MatMul, pooling, normalizations.

These are the float forms a quantized model carries between quantized
regions (and the ops QDQ canonicalization turns into quantized ones). Layout
is ONNX's NC[spatial...]; 1-D, 2-D and 3-D spatial ranks all work.

Attributes are normalized by the frontend: `pads` is explicit
(`[begin_0, .., begin_k, end_0, .., end_k]`, auto_pad already resolved),
`strides`/`dilations` have one entry per spatial axis, axes are positive.

Reference semantics compute in the input dtype (float32 stays float32):
convolution and pooling gather windows with a strided view of the padded
input and reduce them (einsum for convolution), which is plain to check and
fast enough for an oracle.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import dtypes
from ..types import TensorType
from . import _dims, broadcast_shapes, op

# ---- window arithmetic shared by conv and pools ------------------------------


def window_output_size(
    size: int,
    kernel: int,
    stride: int,
    pad_begin: int,
    pad_end: int,
    dilation: int,
    ceil_mode: bool = False,
) -> int:
    """Number of window positions along one axis.

    floor((size + pads - dilation*(kernel-1) - 1) / stride) + 1, or with
    ceil_mode the ceiling, minus one if the last window would start past the
    input and its begin padding (it must start inside them).
    """
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def _spatial_out(ctx, shape, kernel, attrs, ceil_mode=False) -> list:
    """Output spatial dims of a conv/pool; symbolic dims stay symbolic when
    the window map is the identity (stride 1, 'same' padding)."""
    n = len(kernel)
    pads, strides, dilations = attrs["pads"], attrs["strides"], attrs["dilations"]
    out = []
    for axis in range(n):
        size, k = shape[2 + axis], kernel[axis]
        lo, hi, s, d = pads[axis], pads[n + axis], strides[axis], dilations[axis]
        if isinstance(size, int) and isinstance(k, int):
            result = window_output_size(size, k, s, lo, hi, d, ceil_mode)
            if result <= 0:
                raise ctx.error(f"spatial axis {axis}: input {size} is smaller than the window")
            out.append(result)
        elif isinstance(k, int) and s == 1 and lo + hi == d * (k - 1):
            out.append(size)
        else:
            out.append(_dims.fresh(ctx, f"d{2 + axis}"))
    return out


def _check_spatial_attrs(ctx, rank: int, n: int):
    attrs = ctx.attrs
    if rank != n + 2:
        raise ctx.error(f"input of rank {rank} does not match {n} spatial axes")
    for name, length in (("strides", n), ("dilations", n), ("pads", 2 * n)):
        if len(attrs[name]) != length:
            raise ctx.error(f"{name} has {len(attrs[name])} entries, expected {length}")


def _pad_spatial(x: np.ndarray, pads, value, extra_end=None) -> np.ndarray:
    """Pad the spatial axes (2..) of x with `value`; `extra_end` adds more at the end."""
    n = x.ndim - 2
    extra_end = extra_end or [0] * n
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[n + i] + extra_end[i]) for i in range(n)]
    if not any(lo or hi for lo, hi in widths):
        return x
    return np.pad(x, widths, mode="constant", constant_values=value)


def _windows(padded: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """View [N, C, out..., k...] of the windows of a padded NC[spatial] array."""
    n = len(kernel)
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    view = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + n)))
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return view[index]


def _ceil_extra(x_shape, kernel, attrs, ceil_mode) -> list[int]:
    """End padding beyond `pads` that the ceil_mode output size needs."""
    n = len(kernel)
    pads, strides, dilations = attrs["pads"], attrs["strides"], attrs["dilations"]
    extra = []
    for axis in range(n):
        size = x_shape[2 + axis]
        lo, hi, s, d = pads[axis], pads[n + axis], strides[axis], dilations[axis]
        out = window_output_size(size, kernel[axis], s, lo, hi, d, ceil_mode)
        needed = (out - 1) * s + d * (kernel[axis] - 1) + 1
        extra.append(max(0, needed - (size + lo + hi)))
    return extra


# ---- convolution ---------------------------------------------------------------


@op("conv", summary="N-D convolution, groups/strides/pads/dilations; x[N,C,...] w[M,C/g,...]")
class Conv:
    def infer(ctx):
        x, w = ctx.type(0), ctx.type(1)
        if x.dtype != w.dtype:
            raise ctx.error(f"input {x.dtype} and weight {w.dtype} differ")
        if x.shape is None or w.shape is None:
            raise ctx.error("conv needs inputs of known rank")
        n = len(w.shape) - 2
        _check_spatial_attrs(ctx, len(x.shape), n)
        group = ctx.attrs["group"]
        channels, m = x.shape[1], w.shape[0]
        if isinstance(channels, int) and isinstance(w.shape[1], int):
            if channels != w.shape[1] * group:
                raise ctx.error(f"{channels} input channels != {w.shape[1]} x group {group}")
        if isinstance(m, int) and m % group:
            raise ctx.error(f"{m} output channels are not divisible by group {group}")
        if ctx.has(2):
            bias = ctx.type(2)
            if bias.shape is not None and len(bias.shape) != 1:
                raise ctx.error(f"bias must be 1-D, got {bias.shape}")
        spatial = _spatial_out(ctx, x.shape, w.shape[2:], ctx.attrs)
        return [TensorType(x.dtype, (x.shape[0], m, *spatial))]

    def evaluate(inputs, attrs):
        x, w = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        n, group = w.ndim - 2, attrs["group"]
        kernel = w.shape[2:]
        patches = _windows(
            _pad_spatial(x, attrs["pads"], 0), kernel, attrs["strides"], attrs["dilations"]
        )
        batch, channels = x.shape[:2]
        out_spatial = patches.shape[2 : 2 + n]
        patches = patches.reshape(batch, group, channels // group, *out_spatial, *kernel)
        weights = w.reshape(group, w.shape[0] // group, *w.shape[1:])
        o = "opqr"[:n]
        k = "uvwz"[:n]
        spec = f"ngc{o}{k},gmc{k}->ngm{o}"
        y = np.einsum(spec, patches, weights, optimize=True)
        y = y.reshape(batch, w.shape[0], *out_spatial)
        if bias is not None:
            y = y + bias.reshape((1, -1) + (1,) * n)
        return [y.astype(x.dtype, copy=False)]


# ---- matrix products -----------------------------------------------------------


@op("matmul", summary="NumPy matmul: batched, broadcasting, 1-D operands promoted")
class MatMul:
    def infer(ctx):
        a, b = ctx.type(0), ctx.type(1)
        if a.dtype != b.dtype:
            raise ctx.error(f"operand types differ: {a.dtype} and {b.dtype}")
        if a.shape is None or b.shape is None:
            return [TensorType(a.dtype, None)]
        if not a.shape or not b.shape:
            raise ctx.error("matmul operands must have rank >= 1")
        sa = (1, *a.shape) if len(a.shape) == 1 else a.shape
        sb = (*b.shape, 1) if len(b.shape) == 1 else b.shape
        ka, kb = sa[-1], sb[-2]
        if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
            raise ctx.error(f"inner dimensions differ: {a.shape} @ {b.shape}")
        batch = broadcast_shapes(ctx, sa[:-2], sb[:-2])
        rows = () if len(a.shape) == 1 else (sa[-2],)
        cols = () if len(b.shape) == 1 else (sb[-1],)
        return [TensorType(a.dtype, (*batch, *rows, *cols))]

    def evaluate(inputs, attrs):
        a, b = inputs
        return [np.asarray(np.matmul(a, b)).astype(a.dtype, copy=False)]


@op("gemm", summary="alpha * op(A) @ op(B) + beta * C, op = optional transpose; 2-D")
class Gemm:
    def infer(ctx):
        a, b = ctx.type(0), ctx.type(1)
        if a.dtype != b.dtype:
            raise ctx.error(f"operand types differ: {a.dtype} and {b.dtype}")
        if a.rank != 2 or b.rank != 2:
            raise ctx.error(f"gemm operands must be 2-D, got {a.shape} and {b.shape}")
        m, ka = a.shape[::-1] if ctx.attrs["trans_a"] else a.shape
        kb, n = b.shape[::-1] if ctx.attrs["trans_b"] else b.shape
        if isinstance(ka, int) and isinstance(kb, int) and ka != kb:
            raise ctx.error(f"inner dimensions differ: {ka} and {kb}")
        if ctx.has(2):
            c = ctx.type(2).shape
            if c is not None and broadcast_shapes(ctx, (m, n), c) != (m, n):
                raise ctx.error(f"C of shape {c} does not broadcast to {(m, n)}")
        return [TensorType(a.dtype, (m, n))]

    def evaluate(inputs, attrs):
        a, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        a = a.T if attrs["trans_a"] else a
        b = b.T if attrs["trans_b"] else b
        dtype = a.dtype.type
        y = a @ b
        if attrs["alpha"] != 1.0:
            y = y * dtype(attrs["alpha"])
        if c is not None and attrs["beta"] != 0.0:
            y = y + (c if attrs["beta"] == 1.0 else c * dtype(attrs["beta"]))
        return [np.asarray(y).astype(a.dtype, copy=False)]


# ---- pooling -------------------------------------------------------------------


def _pool_infer(ctx):
    x = ctx.type(0)
    if x.shape is None:
        raise ctx.error("pooling needs an input of known rank")
    kernel = ctx.attrs["kernel_shape"]
    _check_spatial_attrs(ctx, len(x.shape), len(kernel))
    spatial = _spatial_out(ctx, x.shape, kernel, ctx.attrs, ctx.attrs["ceil_mode"])
    return [TensorType(x.dtype, (*x.shape[:2], *spatial))]


def _lowest(dtype: np.dtype):
    """The padding value a max never picks."""
    return np.iinfo(dtype).min if np.issubdtype(dtype, np.integer) else -np.inf


@op("max_pool", summary="max over windows (pads never win); floats and integers")
class MaxPool:
    infer = _pool_infer

    def evaluate(inputs, attrs):
        x = inputs[0]
        kernel = attrs["kernel_shape"]
        extra = _ceil_extra(x.shape, kernel, attrs, attrs["ceil_mode"])
        padded = _pad_spatial(x, attrs["pads"], _lowest(x.dtype), extra)
        windows = _windows(padded, kernel, attrs["strides"], attrs["dilations"])
        axes = tuple(range(-len(kernel), 0))
        return [windows.max(axis=axes).astype(x.dtype, copy=False)]


@op("average_pool", summary="mean over windows; count_include_pad counts explicit pads")
class AveragePool:
    infer = _pool_infer

    def evaluate(inputs, attrs):
        x = inputs[0]
        kernel = attrs["kernel_shape"]
        n = len(kernel)
        extra = _ceil_extra(x.shape, kernel, attrs, attrs["ceil_mode"])
        axes = tuple(range(-n, 0))
        windows = _windows(
            _pad_spatial(x, attrs["pads"], 0, extra), kernel, attrs["strides"], attrs["dilations"]
        )
        sums = windows.sum(axis=axes, dtype=x.dtype)
        # Divisor: window cells inside the input (or inside input + explicit
        # pads with count_include_pad); the ceil_mode overhang never counts.
        ones = np.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        if attrs["count_include_pad"]:
            mask = _pad_spatial(_pad_spatial(ones, attrs["pads"], 1), [0] * 2 * n, 0, extra)
        else:
            mask = _pad_spatial(ones, attrs["pads"], 0, extra)
        counts = _windows(mask, kernel, attrs["strides"], attrs["dilations"]).sum(axis=axes)
        with np.errstate(invalid="ignore", divide="ignore"):
            return [(sums / counts).astype(x.dtype, copy=False)]


@op("global_average_pool", summary="mean over all spatial axes, kept as size 1")
class GlobalAveragePool:
    def infer(ctx):
        x = ctx.type(0)
        if x.shape is None or len(x.shape) < 2:
            raise ctx.error("global pooling needs an input of rank >= 2")
        return [TensorType(x.dtype, (*x.shape[:2], *(1,) * (len(x.shape) - 2)))]

    def evaluate(inputs, attrs):
        x = inputs[0]
        axes = tuple(range(2, x.ndim))
        return [x.mean(axis=axes, keepdims=True, dtype=x.dtype).astype(x.dtype, copy=False)]


@op("global_max_pool", summary="max over all spatial axes, kept as size 1")
class GlobalMaxPool:
    infer = GlobalAveragePool.infer

    def evaluate(inputs, attrs):
        x = inputs[0]
        return [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)]


# ---- normalizations ------------------------------------------------------------


@op(
    "layer_norm",
    summary="(x - mean) / sqrt(var + eps) * scale + bias over axes [axis, rank); "
    "also returns mean and 1/std (float32)",
)
class LayerNorm:
    def infer(ctx):
        x = ctx.type(0)
        if x.shape is None:
            raise ctx.error("layer_norm needs an input of known rank")
        axis = ctx.attrs["axis"]
        if not 0 <= axis < max(len(x.shape), 1):
            raise ctx.error(f"axis {axis} out of range for rank {len(x.shape)}")
        for index in (1, 2):
            if ctx.has(index) and ctx.type(index).dtype != x.dtype:
                raise ctx.error(f"input {index} is {ctx.type(index).dtype}, x is {x.dtype}")
        stats = (*x.shape[:axis], *(1,) * (len(x.shape) - axis))
        stash = dtypes.by_name(ctx.attrs.get("stash_dtype", "float32"))
        return [TensorType(x.dtype, x.shape), *[TensorType(stash, stats)] * 2]

    def evaluate(inputs, attrs):
        x, scale = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        stash = dtypes.by_name(attrs.get("stash_dtype", "float32")).numpy
        axes = tuple(range(attrs["axis"], x.ndim))
        xs = x.astype(stash)
        mean = xs.mean(axis=axes, keepdims=True, dtype=stash)
        centered = xs - mean
        variance = (centered * centered).mean(axis=axes, keepdims=True, dtype=stash)
        inv_std = (1 / np.sqrt(variance + stash.type(attrs["epsilon"]))).astype(stash)
        y = centered * inv_std * scale.astype(stash)
        if bias is not None:
            y = y + bias.astype(stash)
        return [y.astype(x.dtype, copy=False), mean, inv_std]


@op("batch_norm", summary="inference batch norm: (x - mean) / sqrt(var + eps) * scale + bias")
class BatchNorm:
    def infer(ctx):
        x = ctx.type(0)
        if x.shape is not None and len(x.shape) < 2:
            raise ctx.error(f"batch_norm needs rank >= 2, got {x.shape}")
        for index in range(1, 5):
            param = ctx.type(index)
            if param.shape is not None and len(param.shape) != 1:
                raise ctx.error(f"input {index} must be 1-D, got {param.shape}")
        return [TensorType(x.dtype, x.shape)]

    def evaluate(inputs, attrs):
        x, scale, bias, mean, var = inputs
        shape = (1, -1) + (1,) * (x.ndim - 2)
        dtype = x.dtype
        std = np.sqrt(var.astype(dtype) + dtype.type(attrs["epsilon"]))
        y = (x - mean.reshape(shape)) / std.reshape(shape) * scale.reshape(shape) + bias.reshape(
            shape
        )
        return [y.astype(dtype, copy=False)]
