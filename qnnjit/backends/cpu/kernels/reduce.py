"""qreduce_sum (global average pooling's integer core), with its requantize
fused: `sum over axes of (x - zp)`, exact, wrapped to int32, then the
epilogue (`requant`).

The reduced axes are moved last (a copy only when they are not already the
trailing ones), so each output element is one contiguous row sum. A global
pool of 8-bit codes over H and W reads a channels-last input (a conv's
output) in place instead: every pixel is one contiguous row of C codes, so
the sums run down the columns (`reduce_columns`), C of them a vector loop,
where the row sums would first transpose the tensor and then sum rows of
only H*W codes (49 for MobileNet's head).
"""

from __future__ import annotations

import math

import numpy as np

from ....ir.graph import Node
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .layout import is_channels_last, nhwc_bytes
from .requant import (
    FM_HI,
    FM_LO,
    FM_MULT,
    FM_ZP,
    I_FAST,
    I_POST,
    P_NONE,
    build_epilogue,
    byte_codes,
    ep_tile,
    fast_row_by_column,
    fast_row_one_channel,
    output_buffer,
    unsigned_view,
)

# Channels per `reduce_columns` task: a few vectors of sums, so that a wide
# layer's head splits over threads even for one image.
_COLUMN_BLOCK = 256


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


@jit(inline=True)
def _column_sums(x3, n, c0, width, fl, shift, sums):
    """sums[:width] = sum over the P pixels of image n of (code - zp), channels
    c0.., wrapped to int32 as the int64 sum truncated would."""
    sums[:] = 0
    for p in range(x3.shape[1]):
        row = x3[n, p, c0 : c0 + width]
        for c in range(width):
            sums[U(c)] += np.int32(row[U(c)] ^ fl)
    for c in range(width):
        sums[U(c)] -= shift


@jit()
def reduce_columns_fast(t0, t1, x3, flip, off, zp, per_tensor, out, chan_i, chan_f):
    """`reduce_columns` whose epilogue is the common requantize alone, per
    tensor or one parameter per channel of x (`requant.fast_row_*`): no
    `ep_tile` to compile."""
    P, C = x3.shape[1], x3.shape[2]
    blocks = (C + _COLUMN_BLOCK - 1) // _COLUMN_BLOCK
    acc = np.empty((1, _COLUMN_BLOCK), np.int32)
    fl, shift = np.uint8(flip), np.int32(P * (zp + off))
    bias_c, mult_c = chan_i[0], chan_f[FM_MULT]
    lo_c, hi_c, zp_c = chan_f[FM_LO], chan_f[FM_HI], chan_f[FM_ZP]
    for t in range(t0, t1):
        n, b = t // blocks, t % blocks
        c0 = b * _COLUMN_BLOCK
        width = min(_COLUMN_BLOCK, C - c0)
        _column_sums(x3, n, c0, width, fl, shift, acc.reshape(_COLUMN_BLOCK))
        if per_tensor:
            fast_row_one_channel(acc, 0, width, out, n * C + c0, 0, chan_i, chan_f)
        else:
            fast_row_by_column(acc, 0, width, out, n * C + c0, c0, bias_c, mult_c, lo_c, hi_c,
                               zp_c)  # fmt: skip


@jit()
def reduce_columns(t0, t1, x3, flip, off, zp, inner, channels, out, chan_i, chan_f, sc_i, sc_f,
                   table, other):  # fmt: skip
    """Tasks t0..t1 of (image n, block of `_COLUMN_BLOCK` channels) of the
    channels-last codes x3 [N, P, C]: result (n, c) = sum over the P pixels
    of (code - zp), wrapped to int32, then the epilogue (output (n, c) at
    n * C + c, its channel ((n * C + c) // inner) % channels). The int32
    sums wrap as the int64 sum truncated would: the same result mod 2^32."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    P, C = x3.shape[1], x3.shape[2]
    blocks = (C + _COLUMN_BLOCK - 1) // _COLUMN_BLOCK
    acc = np.empty((1, _COLUMN_BLOCK), np.int32)
    fl = np.uint8(flip)
    shift = np.int32(P * (zp + off))
    for t in range(t0, t1):
        n, b = t // blocks, t % blocks
        c0 = b * _COLUMN_BLOCK
        width = min(_COLUMN_BLOCK, C - c0)
        _column_sums(x3, n, c0, width, fl, shift, acc.reshape(_COLUMN_BLOCK))
        # ep_tile's fast loops where the channels are known without its
        # per-element division: per-tensor parameters (channel 0), or one
        # parameter per channel of x (channel c0 + j)
        if channels == 1:
            ep_tile(acc, _0, _1, width, out, n * C + c0, _0, _1, _0, _0, _0, _0, _1,
                    chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip
        elif inner == 1 and channels == C:
            ep_tile(acc, _0, _1, width, out, n * C + c0, _0, _1, c0, _0, _1, _0, _1,
                    chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip
        else:
            ep_tile(acc, _0, _1, width, out, n * C + c0, _0, _1, _0, _0, _0, inner, channels,
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

    # over H and W of 8-bit codes with nothing else to read: channels-last
    # inputs are summed in place (module doc)
    pools_columns = rank == 4 and axes == [2, 3] and dt.bits == 8 and ep.other is None

    def run(x_array, other=None):
        shape = x_array.shape
        if keep:
            out_shape = tuple(1 if i in axes else d for i, d in enumerate(shape))
        else:
            out_shape = tuple(shape[i] for i in kept)
        inner = int(math.prod(out_shape[axis + 1 :])) if axis is not None else 1
        out, flat = output_buffer(out_shape, ep.out_dtype)
        sc_i, sc_f = ep.scalars(out_shape, None if other is None else other.shape)
        if pools_columns and is_channels_last(x_array):
            n, c, h, w = shape
            x3 = nhwc_bytes(x_array).reshape(n, h * w, c)
            tasks = n * -(-c // _COLUMN_BLOCK)
            if _fast_plain(sc_i) and (channels == 1 or (max(inner, 1) == 1 and channels == c)):
                run_tasks(reduce_columns_fast, tasks, x_array.size, ctx.num_threads, x3, flip,
                          off, zp, channels == 1, flat, ep.chan_i, ep.chan_f)  # fmt: skip
                return [out]
            run_tasks(reduce_columns, tasks, x_array.size, ctx.num_threads, x3, flip, off, zp,
                      max(inner, 1), channels, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table,
                      ep.other_bytes(other, out_shape))  # fmt: skip
            return [out]
        moved = np.transpose(x_array, perm) if perm != list(range(rank)) else x_array
        rows = int(math.prod([shape[i] for i in kept]))
        length = int(math.prod([shape[i] for i in axes]))
        x2 = unsigned_view(moved).reshape(rows, length)
        run_tasks(reduce_rows, rows, rows * length, ctx.num_threads, x2, flip, off, zp,
                  max(inner, 1), channels, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table,
                  ep.other_bytes(other, out_shape))  # fmt: skip
        return [out]

    nodes = [node, *ep.nodes]
    inputs = [x] + ([ep.other] if ep.other is not None else [])
    name = f"reduce_sum[{dt} axes={axes}]"
    label = f"{name}+{ep.describe()}" if ep.nodes else name
    return Kernel(label, run, inputs, nodes[-1].outputs, nodes, strided_inputs=pools_columns)


def _fast_plain(sc_i) -> bool:
    """The epilogue is the common requantize alone (`requant.fast_row_*`)."""
    return bool(sc_i[I_FAST]) and sc_i[I_POST] == P_NONE


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
