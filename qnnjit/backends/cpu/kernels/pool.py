"""Pooling on integer tensors: max_pool (8 bits channels-last, 16 bits NCHW;
1-D and 2-D windows)
and qaverage_pool (ONNX Runtime's QLinearAveragePool, 2-D).

The maximum is taken over the window taps inside the input; padding never
wins, and a window with no tap inside gives the type's lowest value, as the
reference's padding with `iinfo.min` does. Codes are compared as stored
unsigned values with the sign bit flipped (`byte ^ 0x80` orders int8 codes
like their values), so signed and unsigned tensors share the kernel.
Float max_pool (NaN semantics) stays with the reference.
"""

from __future__ import annotations

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
from .layout import channels_last_output, nhwc_bytes
from .requant import byte_codes, cvt_saturate, unsigned_view


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
    """The byte-maximum row kernel's address for this window, or 0 where there
    is none (the portable path, or channels that do not fill whole vectors)."""
    isa = select_isa()
    if isa not in dwkernels.LANES:
        return 0
    spec = dwkernels.DepthwiseSpec(
        isa, kernel[0], kernel[1], strides[1], dilations[1], op="smax" if signed else "umax"
    )
    return dwkernels.depthwise_kernel(spec) if channels % spec.lanes == 0 else 0


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


@jit()
def qaverage_pool_2d(t0, t1, x, geo, codes, fl, out):
    """ONNX Runtime's QLinearAveragePool (`ir/ops/qlinear_contrib.py`), planes
    t0..t1 of NCHW x: per window, in float32 and in the kernel's row-major tap
    order, `s += f32(x_scale * (code - x_zp))` over taps inside the input
    (padding adds +0.0, which changes nothing), `a = f32(s / count)`, then
    `cvtps2dq(f32(f32(a / y_scale) + y_zp))` saturated. With `geo[10]` set the
    window is the whole unpadded image and ORT's global kernel runs instead:
    the exact integer sum, times f32(x_scale / f32(y_scale * f32(size))),
    rounded half to even, plus y_zp, saturated. geo = (KH, KW, SH, SW, PH, PW,
    OH, OW, count_include_pad, kernel size, global); codes = (flip, off,
    x_zp, y_zp, qmin, qmax); fl = (x_scale, y_scale, global scale)."""
    N, C, H, W = x.shape
    KH, KW, SH, SW, PH, PW, OH, OW = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    include_pad, ksize, is_global = geo[8], geo[9], geo[10]
    flip, off, xzp, yzp, qmin, qmax = codes[0], codes[1], codes[2], codes[3], codes[4], codes[5]
    xs, ys, gscale = fl[0], fl[1], fl[2]
    yzf = np.float32(yzp)
    for t in range(t0, t1):
        n = t // C
        c = t - n * C
        base = t * OH * OW
        if is_global != 0:
            total = np.int64(0)
            for i in range(H):
                for j in range(W):
                    total += ((np.int64(x[n, c, U(i), U(j)]) ^ flip) - off) - xzp
            r = np.rint(np.float32(total) * gscale)
            if not r >= qmin - yzp:
                y = qmin
            elif r > qmax - yzp:
                y = qmax
            else:
                y = np.int64(r) + yzp
            out[U(base)] = y
            continue
        for oh in range(OH):
            for ow in range(OW):
                s = np.float32(0.0)
                count = 0
                for kh in range(KH):
                    ih = oh * SH - PH + kh
                    if ih < 0 or ih >= H:
                        continue
                    for kw in range(KW):
                        iw = ow * SW - PW + kw
                        if iw >= 0 and iw < W:
                            code = ((np.int64(x[n, c, U(ih), U(iw)]) ^ flip) - off) - xzp
                            s = s + np.float32(xs * np.float32(code))
                            count += 1
                if include_pad != 0:
                    count = ksize
                a = s / np.float32(count)
                v = np.float32(a / ys) + yzf
                out[U(base + oh * OW + ow)] = cvt_saturate(v, qmin, qmax)


def lower_qaverage_pool(node: Node, ctx: LowerContext) -> Kernel:
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
    channels_last = bool(node.attrs.get("channels_last", False))
    flip, off = byte_codes(dt)
    codes = np.array([flip, off, xzp, yzp, dt.qmin, dt.qmax], np.int64)
    ksize = kernel[0] * kernel[1]

    def run(x_array):
        x4 = np.moveaxis(x_array, -1, 1) if channels_last else x_array
        n, c, h, w = x4.shape
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
        out = empty((n, c, oh, ow), dt.numpy)
        run_tasks(qaverage_pool_2d, n * c, n * c * oh * ow * ksize, ctx.num_threads,
                  unsigned_view(x4), geo, codes, fl, unsigned_view(out).reshape(-1))  # fmt: skip
        return [np.ascontiguousarray(np.moveaxis(out, 1, -1)) if channels_last else out]

    return Kernel(f"qaverage_pool_2d[{dt} {kernel[0]}x{kernel[1]}]", run, [x], node.outputs, [node])
