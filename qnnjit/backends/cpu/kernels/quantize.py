"""quantize / dequantize (ONNX QuantizeLinear / DequantizeLinear), per-tensor
or per-axis, integer storage of 8 and 16 bits (dequantize also int32).

quantize, as `numerics.quantize` with float32 precision:

    v = f32(x / scale)                  a true float32 division, not x * (1/scale)
    y = clamp(rint(v) + zp, qmin, qmax) ties to even; NaN -> qmin
    y = min(max(y, lo), hi)             the `clamp` attribute, for x that is not NaN

dequantize: `y = f32(f32(q - zp) * scale)`.

A per-tensor quantize of an image batch [N, C, H, W] to 8 bits whose readers
are all channels-last convolutions (`conv.reads_channels_last`: a CNN's
input) writes its codes NHWC and returns the channels-last view, so the
first conv does not transpose them (ResNet-18's and MobileNetV2's input:
30 + 48 us -> 34 us).

Blocked quantization, float8/float4 storage, other float precisions and
non-float32 outputs are declined (the reference runs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .conv import reads_channels_last
from .layout import channels_last_output, interleave
from .requant import byte_codes, kernel_array, unsigned_view


@jit(inline=True)
def code_params(lims, z):
    """`quantized_code`'s constants for zero point z, from lims = (qmin, qmax, lo,
    hi, has_clamp): loaded once, outside the loops, so that they vectorize.
    Every bound is relative to z, in float32 (exact: <= 17 bits)."""
    lo_r, hi_r = np.float32(lims[0] - z), np.float32(lims[1] - z)
    lo_c, hi_c = np.float32(lims[2] - z), np.float32(lims[3] - z)
    return lo_r, hi_r, lo_c, hi_c, lims[4] != 0, np.float32(z)


@jit(inline=True)
def quantized_code(xv, s, params):
    """The code (int32) of the float32 `xv`, scale s, `params` from
    `code_params`. All in float32 until the last conversion: every value is
    an integer of at most 17 bits, so the clamps and the zero point's
    addition are exact, and the loops vectorize to one conversion and one
    narrowing per 16 codes (an int64 code cost 1.7x the time: two widenings,
    two narrowings)."""
    lo_r, hi_r, lo_c, hi_c, has_clamp, zf = params
    r = np.rint(xv / s)
    if not r >= lo_r:  # below, or NaN: qmin
        r = lo_r
    if r > hi_r:
        r = hi_r
    if has_clamp and xv == xv:
        r = min(max(r, lo_c), hi_c)
    return np.int32(r + zf)


@jit()
def quantize_flat(t0, t1, x, inner, channels, scale, zp, lims, out):
    """Rows t0..t1 of x seen as [outer * channels, inner] (row t has channel
    t % channels)."""
    for t in range(t0, t1):
        c = U(t % channels)
        s, z = scale[c], zp[c]
        params = code_params(lims, z)
        for i in range(t * inner, (t + 1) * inner):
            out[U(i)] = quantized_code(x[U(i)], s, params)


_NHWC_BLOCK = 256  # pixels per task of quantize_to_nhwc


@jit()
def quantize_to_nhwc(t0, t1, x, scale, zp, lims, out):
    """Per-tensor quantize of x [N, C, H, W] (float32, C-contiguous: the
    caller's array itself, `replay._on_run_input`) into the channels-last
    out [N, H*W, C]: task t is a block of _NHWC_BLOCK pixels of one image,
    quantized channel by channel into a small buffer (a vector loop), then
    interleaved into out, so that both sides stay in cache. This saves a
    channels-last reader `layout`'s byte transpose."""
    C, P = x.shape[1], x.shape[2] * x.shape[3]
    blocks = (P + _NHWC_BLOCK - 1) // _NHWC_BLOCK
    s, z = scale[0], zp[0]
    params = code_params(lims, z)
    xf, of = x.reshape(x.size), out.reshape(out.size)  # flat: the loops vectorize
    codes = np.empty(C * _NHWC_BLOCK, out.dtype)
    for t in range(t0, t1):
        n = t // blocks
        p0 = (t - n * blocks) * _NHWC_BLOCK
        width = min(P - p0, _NHWC_BLOCK)
        for c in range(C):
            src, row = (n * C + c) * P + p0, c * _NHWC_BLOCK
            for p in range(width):
                codes[U(row + p)] = quantized_code(xf[U(src + p)], s, params)
        interleave(codes, _NHWC_BLOCK, width, C, of[(n * P + p0) * C :])


@jit()
def dequantize_flat(t0, t1, q, flip, off, inner, channels, scale, zp, out):
    """Rows t0..t1 of q seen as [outer * channels, inner]."""
    for t in range(t0, t1):
        c = U(t % channels)
        s, z = scale[c], zp[c]
        for i in range(t * inner, (t + 1) * inner):
            out[U(i)] = np.float32(((np.int64(q[U(i)]) ^ flip) - off) - z) * s


def _per_axis(node: Node, value_rank, scale, zp):
    """(axis or None, channels) of per-axis parameters."""
    if np.asarray(scale).size == 1 and (zp is None or np.asarray(zp).size == 1):
        return None, 1
    if node.attrs.get("block_size", 0):
        raise Decline("blocked quantization")
    axis = node.attrs.get("axis", 1)
    if value_rank is None or not -value_rank <= axis < value_rank:
        raise Decline(f"axis {axis} for rank {value_rank}")
    return axis % value_rank, np.asarray(scale).size


def _inner(shape, axis) -> int:
    """Row length when the tensor is seen as [outer * channels, inner]: the
    elements after `axis`, or (per-tensor) the last dimension."""
    if axis is None:
        return max(shape[-1], 1) if shape else 1
    return max(math.prod(shape[axis + 1 :]), 1)


@dataclass(frozen=True)
class QuantizeStage:
    """A per-tensor quantize to 8 bits, for `step_fusion` to compute inside
    the kernel before it (`quantized_code` with these constants)."""

    scale: np.float32
    zero_point: int
    lims: np.ndarray  # `code_params`' lims
    dtype: dtypes.DType


@dataclass(frozen=True)
class DequantizeStage:
    """A per-tensor dequantize of 8-bit codes to float32, for `step_fusion`
    to compute inside the kernel after it: f32(f32(code - zp) * scale), the
    code `(byte ^ flip) - off`. `codes` = (flip, off, zp), made once: a kernel
    passing the same array every call can be replayed."""

    codes: np.ndarray
    scale: np.float32


def lower_quantize(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    scale = const_input(node, 1, "scale")
    zp = const_input(node, 2, "zero point")
    dtype = node.attrs["dtype"]
    if node.attrs.get("block_size", 0):
        raise Decline("blocked quantization")
    if not dtype.is_int or dtype.bits not in (8, 16):
        raise Decline(f"storage {dtype}")
    if node.attrs.get("precision", dtypes.float32) != dtypes.float32:
        raise Decline(f"division in {node.attrs['precision']}")
    if node.attrs.get("scale_op", "divide") != "divide":
        raise Decline(f"scale_op {node.attrs['scale_op']}")
    if not x.type.dtype.is_float or x.type.dtype.bits > 32:
        raise Decline(f"input of type {x.type.dtype}")
    axis, channels = _per_axis(node, x.type.rank, scale, zp)
    scale_c = kernel_array(np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)))
    zp_c = np.zeros(channels, np.int64)
    if zp is not None:
        zp_c[:] = np.asarray(zp).astype(np.int64).reshape(-1)
    clamp = node.attrs.get("clamp")
    lims = np.array(
        [dtype.qmin, dtype.qmax, *(clamp if clamp is not None else (0, 0)), clamp is not None],
        np.int64,
    )

    nhwc = (
        axis is None and dtype.bits == 8 and x.type.rank == 4
        and reads_channels_last(ctx.graph, node.outputs[0])
    )  # fmt: skip

    def run_nhwc(x_array):
        xf = kernel_array(x_array, np.float32)
        n, c, h, w = xf.shape
        out, flat = channels_last_output(xf.shape, dtype.numpy)
        tasks = n * -(-h * w // _NHWC_BLOCK)
        run_tasks(quantize_to_nhwc, tasks, 8 * xf.size, ctx.num_threads, xf, scale_c, zp_c, lims,
                  flat.reshape(n, h * w, c))  # fmt: skip
        return [out]

    def run(x_array):
        xf = kernel_array(x_array, np.float32).reshape(-1)
        out = empty(x_array.shape, dtype.numpy)
        if axis is not None and x_array.shape[axis] != channels:
            raise ValueError(f"axis {axis} has {x_array.shape[axis]} entries, {channels} scales")
        inner = _inner(x_array.shape, axis)
        run_tasks(quantize_flat, xf.size // inner, 8 * xf.size, ctx.num_threads, xf, inner,
                  channels, scale_c, zp_c, lims, unsigned_view(out).reshape(-1))  # fmt: skip
        return [out]

    if nhwc:
        return Kernel(f"quantize_to_nhwc[f32->{dtype}]", run_nhwc, [x], node.outputs, [node])
    stage = None
    if axis is None and dtype.bits == 8 and x.type.dtype == dtypes.float32:
        stage = QuantizeStage(scale_c[0], int(zp_c[0]), lims, dtype)
    return Kernel(f"quantize_flat[f32->{dtype}]", run, [x], node.outputs, [node], stage=stage)


def lower_dequantize(node: Node, ctx: LowerContext) -> Kernel:
    q = node.inputs[0]
    scale = const_input(node, 1, "scale")
    zp = const_input(node, 2, "zero point")
    if node.attrs.get("dtype", dtypes.float32) != dtypes.float32:
        raise Decline(f"output {node.attrs['dtype']}")
    if node.attrs.get("block_size", 0):
        raise Decline("blocked quantization")
    q_dt = q.type.dtype
    if not q_dt.is_int or q_dt.bits not in (8, 16, 32):
        raise Decline(f"input of type {q_dt}")
    axis, channels = _per_axis(node, q.type.rank, scale, zp)
    scale_c = kernel_array(np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)))
    zp_c = np.zeros(channels, np.int64)
    if zp is not None:
        zp_c[:] = np.asarray(zp).astype(np.int64).reshape(-1)
    flip, off = byte_codes(q_dt)

    def run(q_array):
        out = empty(q_array.shape, np.float32)
        if axis is not None and q_array.shape[axis] != channels:
            raise ValueError(f"axis {axis} has {q_array.shape[axis]} entries, {channels} scales")
        inner = _inner(q_array.shape, axis)
        run_tasks(
            dequantize_flat, out.size // inner, 4 * out.size, ctx.num_threads,
            unsigned_view(q_array).reshape(-1), flip, off, inner, channels, scale_c, zp_c,
            out.reshape(-1),
        )  # fmt: skip
        return [out]

    stage = None
    if axis is None and q_dt.bits == 8:
        stage = DequantizeStage(np.array([flip, off, zp_c[0]], np.int64), scale_c[0])
    return Kernel(f"dequantize_flat[{q_dt}->f32]", run, [q], node.outputs, [node], stage=stage)
