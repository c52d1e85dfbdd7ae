"""qreduce_sum (global average pooling's integer core), with its requantize
fused: `sum over axes of (x - zp)`, exact, wrapped to int32, then the
epilogue (`requant`).

The reduced axes are moved last (a copy only when they are not already the
trailing ones), so each output element is one contiguous row sum.
"""

from __future__ import annotations

import math

import numpy as np

from ....ir.graph import Node
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .requant import build_epilogue, byte_codes, ep_tile, output_buffer, unsigned_view


@jit()
def reduce_rows(t0, t1, x2, flip, off, zp, inner, channels, out, chan_i, chan_f, sc_i, sc_f,
                table, other):  # fmt: skip
    """Rows t0..t1: sum of (code - zp) over the row, exact, then the epilogue
    (the channel of output r is (r // inner) % channels)."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    L = x2.shape[1]
    acc = np.empty((1, t1 - t0), np.int32)
    for r in range(t0, t1):
        s = np.int64(0)
        for k in range(L):
            s += np.int64(x2[U(r), k]) ^ flip
        acc[0, U(r - t0)] = np.int32(s - L * (zp + off))
    if channels == 1:  # per-tensor: one row of results
        ep_tile(acc, _0, _1, t1 - t0, out, t0, _0, _1, _0, _0, _0, _0, _1,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip
    else:
        ep_tile(acc, _0, _1, t1 - t0, out, t0, _0, _1, _0, _0, _0, inner, channels,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


def lower_qreduce_sum(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    zp = const_input(node, 1, "zero point")
    zp = 0 if zp is None else int(np.asarray(zp).reshape(-1)[0])
    dt = x.type.dtype
    if not dt.is_int or dt.bits not in (8, 16) or x.type.rank is None:
        raise Decline(f"input of type {dt}")
    axes = sorted(int(a) for a in node.attrs["axes"])
    keep = node.attrs.get("keepdims", True)
    rank = x.type.rank
    kept = [i for i in range(rank) if i not in axes]
    perm = kept + axes
    acc = node.outputs[0]
    chain = ctx.chain_after(node)
    axis, channels = _channel_axis(chain, acc)
    ep = build_epilogue(chain, acc, channels, axis)
    flip, off = byte_codes(dt)

    def run(x_array, other=None):
        shape = x_array.shape
        moved = np.transpose(x_array, perm) if perm != list(range(rank)) else x_array
        rows = int(math.prod([shape[i] for i in kept]))
        length = int(math.prod([shape[i] for i in axes]))
        x2 = unsigned_view(moved).reshape(rows, length)
        if keep:
            out_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
        else:
            out_shape = tuple(shape[i] for i in kept)
        inner = int(math.prod(out_shape[axis + 1 :])) if axis is not None else 1
        out, flat = output_buffer(out_shape, ep.out_dtype)
        sc_i, sc_f = ep.scalars(out_shape, None if other is None else other.shape)
        run_tasks(reduce_rows, rows, rows * length, ctx.num_threads, x2, flip, off, zp,
                  max(inner, 1), channels, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table,
                  ep.other_bytes(other, out_shape))  # fmt: skip
        return [out]

    nodes = [node, *ep.nodes]
    inputs = [x] + ([ep.other] if ep.other is not None else [])
    name = f"reduce_rows[{dt} axes={axes}]"
    label = f"{name}+{ep.describe()}" if ep.nodes else name
    return Kernel(label, run, inputs, nodes[-1].outputs, nodes)


def _channel_axis(chain, acc) -> tuple[int | None, int]:
    """The axis of the accumulator along which the epilogue's parameters (a
    per-axis requantize, a bias varying along one axis) change, and its size."""
    shape = acc.type.shape
    if shape is None:
        return None, 1
    axis = None
    if chain.bias is not None:
        node = chain.bias
        const = (node.inputs[1] if node.inputs[0] is acc else node.inputs[0]).const
        dims = (1,) * (len(shape) - const.ndim) + const.shape
        varying = [i for i, d in enumerate(dims) if d != 1]
        if len(varying) == 1:
            axis = varying[0]
    rq = chain.requantize
    if rq is not None and axis is None and rq.attrs.get("axis") is not None:
        params = [v for v in rq.inputs[1:3] if v is not None and v.is_constant]
        if any(v.const.size > 1 for v in params):
            axis = rq.attrs["axis"] % len(shape)
    if axis is None or not isinstance(shape[axis], int):
        return None, 1
    return axis, shape[axis]
