"""quantize / dequantize (ONNX QuantizeLinear / DequantizeLinear), per-tensor
or per-axis, integer storage of 8 and 16 bits (dequantize also int32).

quantize, as `numerics.quantize` with float32 precision:

    v = f32(x / scale)                  a true float32 division, not x * (1/scale)
    y = clamp(rint(v) + zp, qmin, qmax) ties to even; NaN -> qmin
    y = min(max(y, lo), hi)             the `clamp` attribute, for x that is not NaN

dequantize: `y = f32(f32(q - zp) * scale)`.

Blocked quantization, float8/float4 storage, other float precisions and
non-float32 outputs are declined (the reference runs them).
"""

from __future__ import annotations

import math

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .requant import byte_codes, kernel_array, unsigned_view


@jit()
def quantize_flat(t0, t1, x, inner, channels, scale, zp, lims, out):
    """Rows t0..t1 of x seen as [outer * channels, inner] (row t has channel
    t % channels); lims = (qmin, qmax, lo, hi, has_clamp)."""
    qmin, qmax, lo, hi, has_clamp = lims[0], lims[1], lims[2], lims[3], lims[4]
    for t in range(t0, t1):
        c = U(t % channels)
        s, z = scale[c], zp[c]
        lo_r, hi_r = np.float32(qmin - z), np.float32(qmax - z)  # exact: <= 17 bits
        for i in range(t * inner, (t + 1) * inner):
            xv = x[U(i)]
            r = np.rint(xv / s)
            if not r >= lo_r:  # below, or NaN: qmin
                r = lo_r
            if r > hi_r:
                r = hi_r
            y = np.int64(r) + z
            if has_clamp != 0 and xv == xv:
                y = min(max(y, lo), hi)
            out[U(i)] = y


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

    def run(x_array):
        xf = kernel_array(x_array, np.float32).reshape(-1)
        out = np.empty(x_array.shape, dtype.numpy)
        if axis is not None and x_array.shape[axis] != channels:
            raise ValueError(f"axis {axis} has {x_array.shape[axis]} entries, {channels} scales")
        inner = _inner(x_array.shape, axis)
        run_tasks(quantize_flat, xf.size // inner, 8 * xf.size, ctx.num_threads, xf, inner,
                  channels, scale_c, zp_c, lims, unsigned_view(out).reshape(-1))  # fmt: skip
        return [out]

    return Kernel(f"quantize_flat[f32->{dtype}]", run, [x], node.outputs, [node])


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
        out = np.empty(q_array.shape, np.float32)
        if axis is not None and q_array.shape[axis] != channels:
            raise ValueError(f"axis {axis} has {q_array.shape[axis]} entries, {channels} scales")
        inner = _inner(q_array.shape, axis)
        run_tasks(
            dequantize_flat, out.size // inner, 4 * out.size, ctx.num_threads,
            unsigned_view(q_array).reshape(-1), flip, off, inner, channels, scale_c, zp_c,
            out.reshape(-1),
        )  # fmt: skip
        return [out]

    return Kernel(f"dequantize_flat[{q_dt}->f32]", run, [q], node.outputs, [node])
