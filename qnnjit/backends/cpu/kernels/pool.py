"""Pooling on integer tensors: max_pool (8 bits channels-last, 16 bits NCHW;
1-D and 2-D windows)
and qaverage_pool (ONNX Runtime's QLinearAveragePool, 2-D).

The maximum is taken over the window taps inside the input; padding never
wins, and a window with no tap inside gives the type's lowest value, as the
reference's padding with `iinfo.min` does. Codes are compared as stored
unsigned values with the sign bit flipped (`byte ^ 0x80` orders int8 codes
like their values), so signed and unsigned tensors share the kernel.
Float max_pool (NaN semantics) stays with the reference.

The average pool sums, per output, f32(x_scale * f32(code - x_zp)) over its
taps in the window's row-major order, as the reference does; its kernel
(`qaverage_pool_2d_nhwc`) takes the taps one at a time over a whole output
row (every output pixel with that tap inside gets its term), so the inner
loop runs over columns and channels in float32 vector lanes while each
output still adds its terms in order. It reads a conv's NHWC result in
place and writes a channels-last one; an NCHW tensor is n * c images of
one channel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ....ir.graph import Node
from ....ir.ops.nn import window_output_size
from .. import dwkernels
from ..calls import call_depthwise_row
from ..features import select_isa
from ._buffers import empty
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .layout import channels_last_output, is_channels_last, nhwc_bytes
from .requant import byte_codes, unsigned_view


@jit()
def max_pool_2d(t0, t1, x, geo, flip, out):
    """Planes t0..t1 of NCHW x; geo = (KH, KW, SH, SW, PH, PW, DH, DW, OH, OW,
    HP, WP). Each plane is copied into a buffer of the padded size filled with
    0, the lowest flipped code, so a window's maximum is branch-free; a window
    with no tap inside the input keeps 0, i.e. the type's lowest value."""
    N, C, H, W = x.shape
    KH, KW, SH, SW, PH, PW = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    DH, DW, OH, OW, HP, WP = geo[6], geo[7], geo[8], geo[9], geo[10], geo[11]
    xp = np.zeros(HP * WP, np.int32)
    best = np.empty(OW, np.int32)
    for t in range(t0, t1):
        n = t // C
        c = t - n * C
        for i in range(H):
            row = (PH + i) * WP + PW
            for j in range(W):
                xp[U(row + j)] = np.int64(x[n, c, U(i), U(j)]) ^ flip
        base = t * OH * OW
        for oh in range(OH):
            for ow in range(OW):
                best[U(ow)] = 0
            for kh in range(KH):
                for kw in range(KW):
                    src = (oh * SH + kh * DH) * WP + kw * DW
                    for ow in range(OW):
                        v = xp[U(src + ow * SW)]
                        b = best[U(ow)]
                        best[U(ow)] = v if v > b else b
            for ow in range(OW):
                out[U(base + oh * OW + ow)] = best[U(ow)] ^ flip


@jit(inline=True)
def _max_pixel(x, n, oh, ow, geo, fl, best, out, dst):
    """out[dst : dst + C] = output pixel (n, oh, ow): the running maximum of its
    taps inside the input over C contiguous channels, on flipped codes starting
    at 0, the lowest (a window with no tap inside gives the type's lowest)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(x.size)
    KH, KW, SH, SW, PH, PW = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    DH, DW = geo[6], geo[7]
    best[:] = 0
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        if ih < 0 or ih >= H:
            continue
        for kw in range(KW):
            iw = ow * SW - PW + kw * DW
            if iw < 0 or iw >= W:
                continue
            src = ((n * H + ih) * W + iw) * C
            for c in range(C):
                v = xf[U(src + c)] ^ fl
                b = best[U(c)]
                best[U(c)] = v if v > b else b
    for c in range(C):
        out[U(dst + c)] = best[U(c)] ^ fl


@jit()
def max_pool_2d_nhwc(t0, t1, x, geo, flip, out, fptr):
    """Output rows t0..t1 (image, oh) of a channels-last 8-bit x [N, H, W, C]
    into out [N, OH, OW, C] (flat). With `fptr`, a byte-maximum row kernel
    (`dwkernels`, unsigned or signed as the codes are), the output pixels
    whose windows lie inside the image's columns are one kernel call per
    output row, reading the input rows in place (a window row outside the
    image is replaced by one inside: the maximum does not change); the others,
    and everything without `fptr`, take the per-pixel loop."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW, PH, PW = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    DH, DW, OH, OW = geo[6], geo[7], geo[8], geo[9]
    fl = np.uint8(flip)
    best = np.empty(C, np.uint8)
    # interior output columns: the window's taps all in [0, W)
    lo = min(OW, (PW + SW - 1) // SW)
    hi = max(lo, min(OW, (W - 1 - (KW - 1) * DW + PW) // SW + 1))
    rows = np.empty(KH, np.int64)
    base = np.int64(x.ctypes.data)
    for t in range(t0, t1):
        n = t // OH
        oh = t - n * OH
        inside = -1  # a window row inside the image
        for kh in range(KH):
            ih = oh * SH - PH + kh * DH
            if ih >= 0 and ih < H:
                inside = ih
        by_kernel = fptr != 0 and inside >= 0 and hi > lo
        if by_kernel:
            for kh in range(KH):
                ih = oh * SH - PH + kh * DH
                ih = ih if ih >= 0 and ih < H else inside
                rows[kh] = base + ((n * H + ih) * W + lo * SW - PW) * C
            dst = np.int64(out.ctypes.data) + (t * OW + lo) * C
            call_depthwise_row(fptr, rows.ctypes.data, 0, C, hi - lo, dst, 0)
        for ow in range(OW):  # one call site: _max_pixel is inlined
            if not (by_kernel and lo <= ow < hi):
                _max_pixel(x, n, oh, ow, geo, fl, best, out, (t * OW + ow) * C)


def _max_row_kernel(kernel, strides, dilations, signed: bool, channels: int) -> int:
    """The byte-maximum row kernel's address for this window, with the widest
    vectors (64, 32 or 16 bytes) the channels fill whole (Inception's 144:
    16-byte ones, 37 -> 8 us for a 28x28 map), or 0 where there is none (the
    portable path, or fewer or other than a multiple of 16 channels)."""
    isa = select_isa()
    if isa not in dwkernels.LANES:
        return 0
    op = "smax" if signed else "umax"
    full = dwkernels.DepthwiseSpec(isa, kernel[0], kernel[1], strides[1], dilations[1], op=op)
    for width in (full.lanes, 32, 16):
        if width <= full.lanes and channels % width == 0:
            narrow = 0 if width == full.lanes else width
            spec = dataclasses.replace(full, max_bytes=narrow)
            return dwkernels.depthwise_kernel(spec)
    return 0


def lower_max_pool(node: Node, ctx: LowerContext) -> Kernel:
    x = node.inputs[0]
    dt = x.type.dtype
    if not dt.is_int or dt.bits not in (8, 16):
        raise Decline(f"{dt} input (float max_pool runs in NumPy)")
    if len(node.outputs) != 1:
        raise Decline("max_pool with indices")
    kernel = list(node.attrs["kernel_shape"])
    if len(kernel) not in (1, 2):
        raise Decline(f"{len(kernel)}-D pooling")
    strides, pads, dilations = node.attrs["strides"], node.attrs["pads"], node.attrs["dilations"]
    ceil_mode = bool(node.attrs.get("ceil_mode", False))
    if len(kernel) == 1:
        kernel, strides, dilations = [1, kernel[0]], [1, strides[0]], [1, dilations[0]]
        pads = [0, pads[0], 0, pads[1]]
    flip, _ = byte_codes(dt)
    one_d = len(node.attrs["kernel_shape"]) == 1
    # 8-bit maps run channels-last (the convolutions around them do); 16-bit NCHW
    channels_last = dt.bits == 8

    launches = {}

    def launch(shape):
        """Everything that depends on the input shape, computed once per shape."""
        n, c, h, w = shape
        oh = window_output_size(h, kernel[0], strides[0], pads[0], pads[2], dilations[0], ceil_mode)
        ow = window_output_size(w, kernel[1], strides[1], pads[1], pads[3], dilations[1], ceil_mode)
        hp = max(h + pads[0] + pads[2], (oh - 1) * strides[0] + (kernel[0] - 1) * dilations[0] + 1)
        wp = max(w + pads[1] + pads[3], (ow - 1) * strides[1] + (kernel[1] - 1) * dilations[1] + 1)
        geo = np.array([*kernel, *strides, pads[0], pads[1], *dilations, oh, ow, hp, wp], np.int64)
        fptr = _max_row_kernel(kernel, strides, dilations, flip != 0, c) if channels_last else 0
        return oh, ow, geo, fptr

    def run(x_array):
        x4 = x_array[:, :, None, :] if one_d else x_array
        n, c, h, w = x4.shape
        entry = launches.get(x4.shape)
        if entry is None:
            entry = launches[x4.shape] = launch(x4.shape)
        oh, ow, geo, fptr = entry
        work = n * c * oh * ow * kernel[0] * kernel[1]
        if channels_last:
            out, flat = channels_last_output((n, c, oh, ow), x_array.dtype)
            run_tasks(
                max_pool_2d_nhwc, n * oh, work, ctx.num_threads, nhwc_bytes(x4), geo, flip, flat,
                fptr,
            )  # fmt: skip
            return [out[:, :, 0, :] if one_d else out]
        out = empty((n, c, oh, ow), x_array.dtype)
        run_tasks(
            max_pool_2d,
            n * c,
            work,
            ctx.num_threads,
            unsigned_view(x4),
            geo,
            flip,
            unsigned_view(out).reshape(-1),
        )
        return [out[:, :, 0, :] if one_d else out]

    name = f"max_pool_2d{'_nhwc' if channels_last else ''}[{dt} {'x'.join(map(str, kernel))}]"
    return Kernel(name, run, [x], node.outputs, [node], strided_inputs=channels_last)


@jit(inline=True)
def _global_code(total, gscale, yzp, qmin, qmax):
    """ORT's global average of one plane: the exact integer sum `total` of
    (code - x_zp), times f32(x_scale / f32(y_scale * f32(size))), rounded half
    to even, plus y_zp, saturated (`global_average_requantize`)."""
    r = np.rint(np.float32(total) * gscale)
    if not r >= qmin - yzp:
        return qmin
    if r > qmax - yzp:
        return qmax
    return np.int64(r) + yzp


@jit(inline=True)
def _average_code(s, count, ys, yzf, lo, hi, big):
    """`cvtps2dq(f32(f32(f32(s / count) / ys) + yzf))` saturated to [lo, hi]
    (qmin, qmax as float32; big = 2^31): `requant.cvt_saturate`, whose NaN
    and out-of-int32 results are qmin, written as float selects so that a
    loop over channels vectorizes (below -2^31 the clamp gives qmin too)."""
    r = np.rint(np.float32(np.float32(s / count) / ys) + yzf)
    r = r if r < big else lo  # NaN compares false
    r = lo if r < lo else r
    r = hi if r > hi else r
    return np.int32(r)


@jit(inline=True)
def _accumulate(xf, src, step, acc, dst, count, width, xs, zero, top):
    """acc[dst + i * width + c] += f32(xs * f32(code - x_zp)) of the stored
    byte b = xf[src + i * step + c], for i < count and c < width, where
    `f32(code - x_zp) = f32(b) - zero`, less 256 when b >= top (signed codes:
    top = 128; unsigned: top = 256, never), exact on these small integers
    and all in float32 lanes. One tap of `count` outputs: each acc element
    gets one addition, so the taps' order per output is the caller's.
    Contiguous runs (step == width) are one loop."""
    if step == width:
        for i in range(count * width):
            b = np.float32(xf[U(src + i)])
            d = b - zero
            d = d - np.float32(256.0) if b >= top else d
            acc[U(dst + i)] += np.float32(xs * d)
        return
    for k in range(count):
        s0, d0 = src + k * step, dst + k * width
        for c in range(width):
            b = np.float32(xf[U(s0 + c)])
            d = b - zero
            d = d - np.float32(256.0) if b >= top else d
            acc[U(d0 + c)] += np.float32(xs * d)


@jit(inline=True)
def _tap_columns(kw, SW, PW, W, OW):
    """[lo, hi): the output columns whose window tap `kw` lies inside [0, W)."""
    lo = max(0, -((kw - PW) // SW))  # ceil((PW - kw) / SW)
    hi = min(OW, (W - 1 + PW - kw) // SW + 1)
    return lo, max(lo, hi)


@jit(inline=True)
def _inside(start, k, size):
    """How many of the taps start .. start + k - 1 lie inside [0, size)."""
    return max(0, min(k, size - start) - max(0, -start))


@jit()
def qaverage_pool_2d_nhwc(t0, t1, x, geo, codes, fl, out):
    """ONNX Runtime's QLinearAveragePool (`ir/ops/qlinear_contrib.py`) on
    channels-last x [N, H, W, C] into out [N, OH, OW, C] (flat), output rows
    t0..t1 (image, oh), reading the NHWC bytes in place. Per window, in
    float32 and in the kernel's row-major tap order, `s += f32(x_scale *
    (code - x_zp))` over taps inside the input (padding adds +0.0, which
    changes nothing), `a = f32(s / count)`, then `cvtps2dq(f32(f32(a /
    y_scale) + y_zp))` saturated: per output row the taps each add one term
    to the sums of every output pixel that has it inside the input, channels
    innermost (so the loops vectorize over channels and columns, and each
    sum keeps the reference's order). An NCHW tensor is the same with C = 1
    and N * C images. With `geo[10]` set the window is the whole unpadded
    image and ORT's global kernel runs instead (`_global_code`, a task per
    image, exact integer sums). geo = (KH, KW, SH, SW, PH, PW, OH, OW,
    count_include_pad, kernel size, global); codes = (flip, off, x_zp, y_zp,
    qmin, qmax); fl = (x_scale, y_scale, global scale)."""
    N, H, W, C = x.shape
    xf = x.reshape(x.size)
    KH, KW, SH, SW, PH, PW, OH, OW = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    include_pad, ksize, is_global = geo[8], geo[9], geo[10]
    flip, off, xzp, yzp, qmin, qmax = codes[0], codes[1], codes[2], codes[3], codes[4], codes[5]
    xs, ys, gscale = fl[0], fl[1], fl[2]
    yzf, lo, hi, big = np.float32(yzp), np.float32(qmin), np.float32(qmax), np.float32(2.0**31)
    zero, top = np.float32(xzp), np.float32(128.0 if flip else 256.0)
    if is_global != 0:
        total = np.empty(C, np.int64)
        for t in range(t0, t1):
            total[:] = 0
            for p in range(t * H * W, (t + 1) * H * W):
                for c in range(C):
                    total[U(c)] += ((np.int64(xf[U(p * C + c)]) ^ flip) - off) - xzp
            for c in range(C):
                out[U(t * C + c)] = _global_code(total[U(c)], gscale, yzp, qmin, qmax)
        return
    acc = np.empty(OW * C, np.float32)
    for t in range(t0, t1):
        n = t // OH
        oh = t - n * OH
        h0 = oh * SH - PH
        acc[:] = 0
        for kh in range(max(0, -h0), min(KH, H - h0)):
            row = (n * H + h0 + kh) * W - PW
            for kw in range(KW):
                c0, c1 = _tap_columns(kw, SW, PW, W, OW)
                src = (row + c0 * SW + kw) * C
                _accumulate(xf, src, SW * C, acc, c0 * C, c1 - c0, C, xs, zero, top)
        rows = _inside(h0, KH, H)
        for ow in range(OW):
            count = ksize if include_pad != 0 else rows * _inside(ow * SW - PW, KW, W)
            cf = np.float32(count)
            dst, a = (t * OW + ow) * C, ow * C
            for c in range(C):
                out[U(dst + c)] = _average_code(acc[U(a + c)], cf, ys, yzf, lo, hi, big)


def lower_qaverage_pool(node: Node, ctx: LowerContext) -> Kernel:
    """Channels-last inputs (a conv's result view, or the node's own NHWC
    layout) run `qaverage_pool_2d_nhwc` on their memory in place and give a
    channels-last result; other inputs, C-contiguous NCHW, run it as n * c
    images of one channel. Either way the step's only work is its recorded
    kernel call (no operand copy), so a replayed run repeats it."""
    x = node.inputs[0]
    dt = x.type.dtype
    kernel = list(node.attrs["kernel_shape"])
    if len(kernel) != 2:
        raise Decline(f"{len(kernel)}-D pooling")
    params = [const_input(node, i, "scale/zero point") for i in (1, 2, 3, 4)]
    if params[0] is None or params[2] is None:
        raise Decline("missing scale")
    xs, ys = (np.float32(np.asarray(p, np.float32).reshape(-1)[0]) for p in (params[0], params[2]))
    xzp, yzp = (
        0 if p is None else int(np.asarray(p).reshape(-1)[0]) for p in (params[1], params[3])
    )
    strides, pads = node.attrs["strides"], node.attrs["pads"]
    ceil_mode = bool(node.attrs.get("ceil_mode", False))
    include_pad = bool(node.attrs.get("count_include_pad", False))
    nhwc_node = bool(node.attrs.get("channels_last", False))  # the node's own layout
    flip, off = byte_codes(dt)
    codes = np.array([flip, off, xzp, yzp, dt.qmin, dt.qmax], np.int64)
    ksize = kernel[0] * kernel[1]
    launches = {}

    def launch(n, c, h, w):
        """(oh, ow, geo, fl, work) of an [n, c, h, w] input, once per shape (the
        same arrays every call: what replaying needs)."""
        is_global = (h, w) == tuple(kernel) and not any(pads)
        oh = window_output_size(h, kernel[0], strides[0], pads[0], pads[2], 1, ceil_mode)
        ow = window_output_size(w, kernel[1], strides[1], pads[1], pads[3], 1, ceil_mode)
        if is_global:
            oh = ow = 1
        geo = np.array([*kernel, *strides, pads[0], pads[1], oh, ow, include_pad, ksize,
                        is_global], np.int64)  # fmt: skip
        with np.errstate(all="ignore"):
            gscale = np.float32(xs / np.float32(ys * np.float32(h * w)))
        fl = np.array([xs, ys, gscale], np.float32)
        return oh, ow, geo, fl, n * c * oh * ow * (h * w if is_global else ksize)

    def shaped(n, c, h, w):
        entry = launches.get((n, c, h, w))
        if entry is None:
            entry = launches[(n, c, h, w)] = launch(n, c, h, w)
        return entry

    def pool_nhwc(x_hwc, flat_out, n, c, h, w):
        oh, _, geo, fl, work = shaped(n, c, h, w)
        run_tasks(qaverage_pool_2d_nhwc, n * oh, work, ctx.num_threads, x_hwc, geo, codes, fl,
                  flat_out)  # fmt: skip

    def run(x_array):
        if nhwc_node:  # logical [N, H, W, C]
            n, h, w, c = x_array.shape
            oh, ow = shaped(n, c, h, w)[:2]
            out = empty((n, oh, ow, c), dt.numpy)
            pool_nhwc(unsigned_view(x_array), unsigned_view(out).reshape(-1), n, c, h, w)
            return [out]
        n, c, h, w = x_array.shape
        oh, ow, geo, fl, work = shaped(n, c, h, w)
        if is_channels_last(x_array) and x_array.flags.writeable:
            out, flat = channels_last_output((n, c, oh, ow), dt.numpy)
            pool_nhwc(nhwc_bytes(x_array), flat, n, c, h, w)  # a view, no copy
            return [out]
        out = empty((n, c, oh, ow), dt.numpy)  # NCHW: n * c images of one channel
        planes = unsigned_view(x_array).reshape(n * c, h, w, 1)
        pool_nhwc(planes, unsigned_view(out).reshape(-1), n * c, 1, h, w)
        return [out]

    name = f"qaverage_pool_2d[{dt} {kernel[0]}x{kernel[1]}]"
    return Kernel(name, run, [x], node.outputs, [node], strided_inputs=True)
