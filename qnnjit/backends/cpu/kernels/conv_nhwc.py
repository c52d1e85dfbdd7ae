"""qconv channels-last: 8-bit, ungrouped convolutions as GEMMs over NHWC pixels.

The activations are the GEMM engine's u8 operand A, one row per output pixel,
and the weights its packed s8 operand B, [K, M] with k = (kh, kw, c), packed
once at compile time (`_gemm.plan_gemm`). So C comes out [pixel, channel],
which *is* the NHWC output (`layout`), and the epilogue stores each pixel's
channels contiguously, like a matmul's row.

- A 1x1, stride-1, unpadded convolution of unsigned activations with a
  channel count divisible by 4 reads its A rows in place: the NHWC input
  viewed as [pixels, C] is already a row-major A. No copy at all.
- Anything else builds an im2col tile of A, one row per pixel, from the NHWC
  input: each tap is a run of C contiguous bytes (the pad byte outside the
  image), flipped to u8 on the way for signed activations.

Zero points (`x` the activation as u8: stored byte ^ flip = code + off,
`zab` its zero point likewise, `w` int8 weights, `zw` their zero point):

    sum_k (x - zab)(w - zw) = sum_k x*w - zab * sum_k w + K*zab*zw - zw * sum_k x

The middle terms are one int32 constant per output channel (folded into the
bias at compile time); only `zw[m] * sum_k x[p]` is per pixel, and only when
some `zw` is nonzero (uint8 weights, or an asymmetric weight zero point). Pad
taps hold the pad byte, so the identity holds over all K taps. Everything is
exact modulo 2^32, as the reference's int64-then-wrap.
"""

from __future__ import annotations

import numpy as np

from .. import drivers
from ._conv_geometry import GDH, GDW, GKH, GKW, GOH, GOW, GPH, GPOINT, GPT, GPW, GSH, GSW
from ._gemm import G_DESC, G_K4, G_KCG, G_KG, G_MR, G_NC, G_NR, G_PANEL_BYTES, plan_gemm
from ._numba import U, jit
from ._threads import run_tasks
from .layout import channels_last_output, nhwc_bytes
from .requant import ep_tile


@jit()
def _im2col_rows(x, n, p0, rows, geo, flip, pad, a):
    """a[r, :K] = the taps of output pixel p0 + r of image n, k = (kh, kw, c):
    C contiguous bytes per tap from the NHWC input (flipped to u8), `pad`
    outside the image. A window row that lies inside the image with unit
    dilation is one run of KW*C contiguous bytes."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW = geo[GKH], geo[GKW], geo[GSH], geo[GSW]
    PH, PW, DH, DW, OW = geo[GPH], geo[GPW], geo[GDH], geo[GDW], geo[GOW]
    xf = x.reshape(x.size)
    fl = np.uint8(flip)
    pb = np.uint8(pad)
    run = KW * C
    for r in range(rows):
        p = p0 + r
        oh = p // OW
        ow = p - oh * OW
        iw0 = ow * SW - PW
        inside_row = DW == 1 and iw0 >= 0 and iw0 + KW <= W
        for kh in range(KH):
            ih = oh * SH - PH + kh * DH
            k = kh * run
            if ih < 0 or ih >= H:
                for q in range(run):
                    a[U(r), U(k + q)] = pb
            elif inside_row:
                src = ((n * H + ih) * W + iw0) * C
                for q in range(run):
                    a[U(r), U(k + q)] = xf[U(src + q)] ^ fl
            else:
                for kw in range(KW):
                    iw = iw0 + kw * DW
                    if iw >= 0 and iw < W:
                        src = ((n * H + ih) * W + iw) * C
                        for c in range(C):
                            a[U(r), U(k + c)] = xf[U(src + c)] ^ fl
                    else:
                        for c in range(C):
                            a[U(r), U(k + c)] = pb
                    k += C


@jit()
def _row_sums(a, rows, K, rowsum):
    for r in range(rows):
        s = np.int64(0)
        for k in range(K):
            s += np.int64(a[U(r), U(k)])
        rowsum[U(r)] = s


@jit()
def conv_gemm_nhwc(t0, t1, x, geo, flip, pad, direct, zw, need_rowsum, fptrs, data, init, gp,
                   out, chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Tasks t0..t1 of (image, tile of GEMM_T output pixels): A rows in place
    (`direct`) or an im2col tile, the GEMM, the weight zero point's per-pixel
    term when `need_rowsum`, then the epilogue into the NHWC output."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    N, C = x.shape[0], x.shape[3]
    M = zw.size
    P = geo[GOH] * geo[GOW]
    Pt = geo[GPT]
    K = geo[GKH] * geo[GKW] * C
    K4 = gp[G_K4]
    mr = gp[G_MR]
    tiles = (P + Pt - 1) // Pt
    a = np.zeros((0 if direct else Pt, K4), np.uint8)  # columns K..K4 stay zero
    rowsum = np.zeros(Pt, np.int64)
    c = np.empty((Pt, M), np.int32)
    x2 = x.reshape(N * x.shape[1] * x.shape[2], C)
    for t in range(t0, t1):
        n = t // tiles
        p0 = (t - n * tiles) * Pt
        rows = min(Pt, P - p0)
        if direct:  # pointwise: pixel p of image n is row n*P + p of x2
            src = x2[n * P + p0 : n * P + p0 + rows]
            a_ptr, lda = src.ctypes.data, C
            if need_rowsum:
                _row_sums(src, rows, K, rowsum)
        else:
            _im2col_rows(x, n, p0, rows, geo, flip, pad, a)
            a_ptr, lda = a.ctypes.data, K4
            if need_rowsum:
                _row_sums(a, rows, K, rowsum)
        drivers.run_serial(
            fptrs, a_ptr, lda, rows, gp[G_KG], data.ctypes.data, gp[G_PANEL_BYTES], gp[G_NR],
            c.ctypes.data, M, M, init.ctypes.data, mr, gp[G_KCG], ((rows + mr - 1) // mr) * mr,
            gp[G_NC], gp[G_DESC],
        )  # fmt: skip
        if need_rowsum:
            for r in range(rows):
                s = rowsum[U(r)]
                for m in range(M):
                    c[U(r), U(m)] = np.int32(c[U(r), U(m)] - zw[U(m)] * s)
        ep_tile(c, _0, rows, M, out, (n * P + p0) * M, M, _1, _0, _0, _1, _0, M,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


class ChannelsLastConv:
    """The compile-time half: weights packed as B [K = (kh, kw, c), M], the
    run-time half (`run`) builds the NHWC operands and launches the tasks."""

    def __init__(self, w_int8: np.ndarray, zw: np.ndarray, pixels_hint: int, num_threads: int):
        m, c, kh, kw = w_int8.shape
        b = np.ascontiguousarray(w_int8.transpose(2, 3, 1, 0).reshape(kh * kw * c, m))
        self.plan = plan_gemm([b], max(pixels_hint, 1))
        self.zw = np.ascontiguousarray(zw, dtype=np.int64)
        self.need_rowsum = bool(np.any(self.zw != 0))
        self.channels = c
        self.num_threads = num_threads

    def direct(self, geo, flip: int) -> bool:
        return bool(geo[GPOINT]) and flip == 0 and self.channels % 4 == 0

    def tile_pixels(self, pixels: int, images: int) -> int:
        """Output pixels per task: the engine's cache-sized MC, cut so that every
        thread gets a task when there are few images."""
        mr = self.plan.mr
        tile = min(self.plan.config.mc, _round_up(pixels, mr))
        if images * _ceil_div(pixels, tile) < self.num_threads and pixels > mr:
            parts = _ceil_div(self.num_threads, images)
            tile = max(mr, _round_up(_ceil_div(pixels, parts), mr))
        return tile

    def run(self, x4, geo, flip, pad_byte, ep, sc_i, sc_f, other, out_shape):
        """The logical NCHW result (NHWC memory) of the conv and its epilogue."""
        n, m, oh, ow = out_shape
        pixels = oh * ow
        tile = int(geo[GPT])
        self.plan.ensure_rows(min(tile, pixels))
        self.plan.ensure_rows(pixels % tile or tile)
        out, flat = channels_last_output(out_shape, ep.out_dtype.numpy)
        ob = _EMPTY if other is None else nhwc_bytes(other).reshape(-1)
        tasks = n * _ceil_div(pixels, tile)
        work = n * pixels * m * int(geo[GKH] * geo[GKW]) * self.channels
        plan = self.plan
        run_tasks(
            conv_gemm_nhwc, tasks, work, self.num_threads, nhwc_bytes(x4), geo, flip, pad_byte,
            self.direct(geo, flip), self.zw, self.need_rowsum, plan.fptrs, plan.data, plan.init,
            plan.gparams, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table, ob,
        )  # fmt: skip
        return out


_EMPTY = np.zeros(0, np.uint8)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b
