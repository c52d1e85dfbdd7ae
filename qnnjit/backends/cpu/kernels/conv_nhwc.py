"""qconv channels-last: 8-bit ungrouped convolutions as GEMMs over NHWC pixels,
and 8-bit depthwise convolutions as vector loops over NHWC channels.

The activations are the GEMM engine's u8 operand A, one row per output pixel,
and the weights its packed s8 operand B, [K, M] with k = (kh, kw, c), packed
once at compile time (`_gemm.plan_gemm`). So C comes out [pixel, channel],
which *is* the NHWC output (`layout`), and the epilogue stores each pixel's
channels contiguously, like a matmul's row.

- A 1x1, stride-1, unpadded convolution of unsigned activations with a
  channel count divisible by 4 reads its A rows in place: the NHWC input
  viewed as [pixels, C] is already a row-major A. No copy at all.
- Where the microkernels requantize and each window row's taps (kw, c)
  are one contiguous run of KW*C bytes (unit horizontal dilation, a
  multiple of 4), A's rows are read straight from the input by address
  (`conv_gemm_nhwc_by_address`, an implicit GEMM, ukernels ADDRESS_DOC):
  K is cut into one segment per window row, and each tile gets a table of
  every pixel's run address per segment (`_row_addresses`), pointing at a
  run of pad bytes above and below the image and at small copies for
  pixels on the left and right borders. The microkernels walk the
  segments of their K block, their sums in registers, and flip signed
  bytes as they load them. ResNet-18's 3x3 convs: the im2col tile was 5-6
  % of each step (store bound); the steps went 2-3 % faster, the model
  1-2 % (one thread, whole runs). 56x56 3x3 convs with 64 outputs, 4 to
  64 input channels: 0.6-2.7 % faster than with im2col tiles.
- Anything else builds an im2col tile of A, one row per pixel, from the NHWC
  input: each tap is a run of C contiguous bytes (the pad byte outside the
  image), flipped to u8 on the way for signed activations. A row kernel
  generated per run length (`im2colkernels`) copies each window row's run:
  on AVX-512 with byte-masked moves, which take the pad byte outside the
  image, so one call covers an output row, borders included; on AVX2 the
  pixels whose window lies inside the image horizontally, border pixels
  reading padded copies of their window rows.

Zero points (`x` the activation as u8: stored byte ^ flip = code + off,
`zab` its zero point likewise, `w` int8 weights, `zw` their zero point):

    sum_k (x - zab)(w - zw) = sum_k x*w - zab * sum_k w + K*zab*zw - zw * sum_k x

The middle terms are one int32 constant per output channel (folded into the
bias at compile time); only `zw[m] * sum_k x[p]` is per pixel, and only when
some `zw` is nonzero (uint8 weights, or an asymmetric weight zero point). Pad
taps hold the pad byte, so the identity holds over all K taps. Everything is
exact modulo 2^32, as the reference's int64-then-wrap.

Depthwise (one input channel per output channel): each input row is
converted once into a ring of float32 rows `x - za` (pad taps read `pad - za`:
zero, unless a pad value other than the zero point was folded in); a row
kernel generated per window (`dwkernels`: registers hold the taps' weights
and a block of output pixels' sums) computes each output row's sums
`(w[tap, c] - zw[c]) * (x - za)`, exactly in float32; then the epilogue stores
the output row. The portable path runs the taps as Numba loops instead.
On AVX512-VNNI, where the row kernel requantizes and the window has unit
horizontal dilation, the ring holds int16 pairs of adjacent columns
(`_pair_row`) and the row kernel multiplies tap pairs in exact int32 sums
(`dwkernels` pairs): 6 multiply-adds instead of 9 for a 3x3 window, and half
the ring's bytes. MobileNetV2's depthwise+pointwise steps: 5-42 % faster
(the stride-2 ones most), the model 3.68 -> 3.02 ms (1 thread).
Where the window has at most 3 rows, unit vertical dilation and weights
that stay int8 after their zero point (symmetric int8 weights always), the
ring is one row of byte quads of 4 input rows instead (`_quad_ring`), and
the row kernel takes one `vpdpbusd` per window column (`dwkernels` quads):
3 multiply-adds for a 3x3 window. MobileNetV2's depthwise+pointwise steps:
another 0-18 % faster, the sum of its steps 2247-2337 -> 2076-2180 us (1
thread).
"""

from __future__ import annotations

import math

import numpy as np

from .. import drivers, dwkernels, im2colkernels
from ..calls import (
    call_depthwise_row,
    call_im2col_masked_row,
    call_im2col_row,
    call_pair_row,
    call_quad_row,
)  # fmt: skip
from ..features import select_isa
from ..spinteam import task_ranges
from ._conv_geometry import (
    GDH,
    GDW,
    GHP,
    GKH,
    GKW,
    GNS,
    GOH,
    GOW,
    GPH,
    GPT,
    GPW,
    GSH,
    GSW,
    GW,
    GWP,
)  # fmt: skip
from ._gemm import (
    G_DESC,
    G_K4,
    G_KCG,
    G_KG,
    G_MR,
    G_NC,
    G_NR,
    G_PANEL_BYTES,
    column_span,
    gemm_requant_rows,
    plan_gemm,
    requant_args,
    requant_kind,
)  # fmt: skip
from ._numba import U, jit
from ._threads import run_tasks
from .layout import channels_last_output, nhwc_bytes
from .requant import (
    FM_ZP,
    I_FAST,
    I_POST,
    I_ROUND,
    P_NONE,
    R_FLOAT,
    ep_tile,
)  # fmt: skip

# where a requantizing conv's A rows come from (`ChannelsLastConv.a_mode`)
A_IM2COL, A_IN_PLACE, A_BY_ADDRESS = 0, 1, 2


@jit(inline=True)
def _im2col_pixel(x, xf, n, oh, ow, geo, flip, pad, a, r):
    """a[r, :K] = the taps of output pixel (oh, ow) of image n, k = (kh, kw, c):
    C contiguous bytes per tap from the NHWC input (flipped to u8), `pad`
    outside the image. A window row that lies inside the image with unit
    dilation is one run of KW*C contiguous bytes. `xf`: x flattened."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW = geo[GKH], geo[GKW], geo[GSH], geo[GSW]
    PH, PW, DH, DW = geo[GPH], geo[GPW], geo[GDH], geo[GDW]
    fl = np.uint8(flip)
    pb = np.uint8(pad)
    run = KW * C
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
def _im2col_rows(x, n, p0, rows, geo, flip, pad, fptr, masked, a):
    """a[r, :K] = the taps of output pixel p0 + r of image n (`_im2col_pixel`).
    With an im2col row kernel (`fptr`, unit horizontal dilation: see
    `im2colkernels`), every pixel goes to the kernel: a `masked` one takes
    each output row's pixels in one call (`_masked_rows`); another in up to
    three: the pixels whose window lies inside the image horizontally read
    the input; those on either border read copies of their window rows
    with the pad byte outside the image (`_edge_rows`). Without a kernel,
    `_im2col_pixel` per pixel."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW = geo[GKH], geo[GKW], geo[GSH], geo[GSW]
    PH, PW, DH, OW = geo[GPH], geo[GPW], geo[GDH], geo[GOW]
    lda = a.shape[1]
    if fptr == 0:
        xf = x.reshape(x.size)
        for r in range(rows):
            oh = (p0 + r) // OW
            _im2col_pixel(x, xf, n, oh, p0 + r - oh * OW, geo, flip, pad, a, r)
        return
    if masked:
        _masked_rows(x, n, p0, rows, geo, pad ^ flip, fptr, a)
        return
    lo = (PW + SW - 1) // SW  # the first ow with iw0 >= 0
    hi = (W + PW - KW) // SW + 1 if W + PW >= KW else 0  # past the last inside one
    rowptrs = np.empty(KH, np.int64)
    # window rows outside the image read this row, and border pixels copies
    # in `edge` (pad bytes flipped, as the kernel flips them back)
    row_bytes = OW * SW * C + KW * C
    pad_row = np.full(row_bytes, np.uint8(pad ^ flip))
    edge = np.empty(KH * row_bytes, np.uint8)
    r = 0
    while r < rows:
        p = p0 + r
        oh = p // OW
        ow = p - oh * OW
        end = min(OW, ow + rows - r)  # this output row's pixels in the tile: ow..end
        a0 = max(ow, min(lo, end))  # ow..a0: left border; a0..a1: inside; a1..end: right
        a1 = max(a0, min(hi, end))
        for part, (s, e) in enumerate(((ow, a0), (a0, a1), (a1, end))):
            if e <= s:
                continue
            if part == 1:  # inside: the input's own rows
                for kh in range(KH):
                    ih = oh * SH - PH + kh * DH
                    if ih >= 0 and ih < H:
                        rowptrs[kh] = x.ctypes.data + ((n * H + ih) * W + s * SW - PW) * C
                    else:
                        rowptrs[kh] = pad_row.ctypes.data
            else:
                _edge_rows(x, n, oh, s, e - s, geo, pad ^ flip, edge, row_bytes, rowptrs,
                           pad_row)  # fmt: skip
            call_im2col_row(fptr, rowptrs.ctypes.data, e - s, a.ctypes.data + (r + s - ow) * lda,
                            lda)  # fmt: skip
        r += end - ow


@jit(inline=True)
def _row_run(p, left, OW):
    """(oh, ow, count): output pixel p's row and column, and how many of the
    `left` pixels from p on (a tile's rest) lie in that output row."""
    oh = p // OW
    ow = p - oh * OW
    return oh, ow, min(OW - ow, left)


@jit(inline=True)
def _masked_rows(x, n, p0, rows, geo, stored_pad, fptr, a):
    """`_im2col_rows` with a masked row kernel (`im2colkernels` MASKED_DOC):
    one call per output row, its window rows outside the image pointing at
    a row of pad bytes (flipped as the kernel flips them back)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, SH, SW = geo[GKH], geo[GSH], geo[GSW]
    PH, PW, DH, OW = geo[GPH], geo[GPW], geo[GDH], geo[GOW]
    lda = a.shape[1]
    rowptrs = np.empty(KH, np.int64)
    pad_row = np.full(W * C, np.uint8(stored_pad))
    r = 0
    while r < rows:
        oh, ow, count = _row_run(p0 + r, rows - r, OW)
        for kh in range(KH):
            ih = oh * SH - PH + kh * DH
            if ih >= 0 and ih < H:
                rowptrs[kh] = x.ctypes.data + (n * H + ih) * W * C
            else:
                rowptrs[kh] = pad_row.ctypes.data
        call_im2col_masked_row(fptr, rowptrs.ctypes.data, count, a.ctypes.data + r * lda, lda,
                               (ow * SW - PW) * C, W * C, stored_pad)  # fmt: skip
        r += count


@jit(inline=True)
def _edge_rows(x, n, oh, first, count, geo, pad, edge, row_bytes, rowptrs, pad_row):
    """rowptrs[kh] = window row kh's bytes for output pixels first..first +
    count of output row oh (unit horizontal dilation): a copy in `edge`
    (`row_bytes` apart) of the input row's bytes those pixels' windows span,
    the byte `pad` outside the image; `pad_row` for rows above or below it.
    For the pixels on the borders: a row kernel then copies their taps as
    it does inside pixels'. (Copying them tap by tap, a byte at a time,
    took half of ResNet-18's stem im2col: 3 pixels of 112 a row.)"""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW = geo[GKH], geo[GKW], geo[GSH], geo[GSW]
    PH, PW, DH = geo[GPH], geo[GPW], geo[GDH]
    xf = x.reshape(x.size)
    b0 = (first * SW - PW) * C  # the first window's first byte in its input row
    length = (count - 1) * SW * C + KW * C
    j0 = min(length, max(0, -b0))  # bytes before the image
    j1 = max(j0, min(length, W * C - b0))  # ... and up to its end
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        if ih < 0 or ih >= H:
            rowptrs[kh] = pad_row.ctypes.data
            continue
        dst, src = kh * row_bytes, (n * H + ih) * W * C + b0
        for j in range(j0):
            edge[U(dst + j)] = pad
        for j in range(j0, j1):
            edge[U(dst + j)] = xf[U(src + j)]
        for j in range(j1, length):
            edge[U(dst + j)] = pad
        rowptrs[kh] = edge.ctypes.data + dst


@jit(inline=True)
def _im2col_tile(rows, K, K4):
    """An im2col tile of `rows` rows of K4 bytes whose columns K..K4 are zero
    (the weights there are zero too, but the zero keeps every A row's bytes
    defined); the rest is left for `_a_rows` to fill. np.zeros of the whole
    tile cleared up to 0.9 MB per call for nothing."""
    a = np.empty((rows, K4), np.uint8)
    for r in range(rows):
        for k in range(K, K4):
            a[U(r), U(k)] = 0
    return a


@jit()
def _row_sums(a, rows, K, rowsum):
    for r in range(rows):
        s = np.int64(0)
        for k in range(K):
            s += np.int64(a[U(r), U(k)])
        rowsum[U(r)] = s


@jit(inline=True)
def _a_rows(x, x2, a, direct, n, p0, rows, geo, flip, pad, im2col, masked):
    """(address, row stride) of the A rows of output pixels p0.. p0 + rows of
    image n: the input itself (`direct`: pointwise, pixel p of image n is row
    n*P + p of x2) or the im2col tile `a`, filled here (with the row kernel
    `im2col` where nonzero, `masked` or not)."""
    if direct:
        P = geo[GOH] * geo[GOW]
        return x2[n * P + p0 : n * P + p0 + rows].ctypes.data, x2.shape[1]
    _im2col_rows(x, n, p0, rows, geo, flip, pad, im2col, masked, a)
    return a.ctypes.data, a.shape[1]


@jit()
def conv_gemm_nhwc(t0, t1, x, geo, flip, pad, direct, im2col, masked, zw, need_rowsum, fptrs, data,
                   init, gp, out, chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Tasks t0..t1 of (image, tile of GEMM_T output pixels): A rows in place
    (`direct`) or an im2col tile, the GEMM, the weight zero point's per-pixel
    term when `need_rowsum`, then the epilogue into the NHWC output."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    N, C = x.shape[0], x.shape[3]
    M = zw.size
    P = geo[GOH] * geo[GOW]
    Pt = geo[GPT]
    K = geo[GKH] * geo[GKW] * C
    mr = gp[G_MR]
    tiles = (P + Pt - 1) // Pt
    a = _im2col_tile(0 if direct else Pt, K, gp[G_K4])
    rowsum = np.zeros(Pt, np.int64)
    c = np.empty((Pt, M), np.int32)
    x2 = x.reshape(N * x.shape[1] * x.shape[2], C)
    for t in range(t0, t1):
        n = t // tiles
        p0 = (t - n * tiles) * Pt
        rows = min(Pt, P - p0)
        a_ptr, lda = _a_rows(x, x2, a, direct, n, p0, rows, geo, flip, pad, im2col, masked)
        if need_rowsum:
            _row_sums(x2[n * P + p0 : n * P + p0 + rows] if direct else a, rows, K, rowsum)
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


@jit()
def conv_gemm_nhwc_requant(t0, t1, x, geo, flip, pad, direct, im2col, masked, M, fptrs, rq_fptrs,
                           data, init, gp, out, chan_f, sc_i, sc_f, other, table):  # fmt: skip
    """`conv_gemm_nhwc` whose microkernels store the output bytes themselves
    (`_gemm.gemm_requant_rows`): no int32 tile pass, no epilogue loop (and
    none of their code to compile). Tasks as `_requant_task` cuts them."""
    N, C = x.shape[0], x.shape[3]
    Pt = geo[GPT]
    a = _im2col_tile(0 if direct else Pt, geo[GKH] * geo[GKW] * C, gp[G_K4])
    c = np.empty((Pt, min(column_span(M, gp[G_NR], geo[GNS]), M)), np.int32)  # K blocks' sums
    ep = requant_args(chan_f, sc_i, sc_f)
    x2 = x.reshape(N * x.shape[1] * x.shape[2], C)
    no_segments = np.int64(0)  # not a literal: one gemm_requant_rows compile
    for t in range(t0, t1):
        n, p0, rows, n0, n1, o = _requant_task(t, N, M, geo, gp)
        if n0 < n1:
            a_ptr, lda = _a_rows(x, x2, a, direct, n, p0, rows, geo, flip, pad, im2col, masked)
            gemm_requant_rows(a_ptr, lda, rows, fptrs, rq_fptrs, data, init, gp, c, n0, n1, ep,
                              out.ctypes.data + o, other.ctypes.data + o, M, table,
                              no_segments)  # fmt: skip


@jit()
def conv_gemm_nhwc_by_address(t0, t1, x, geo, pad, border_rows, M, fptrs, rq_fptrs, data, init,
                              gp, out, chan_f, sc_i, sc_f, other, table):  # fmt: skip
    """`conv_gemm_nhwc_requant` whose microkernels (`fptrs`, `rq_fptrs`)
    take A's rows by address: each tile's table of them (`_row_addresses`,
    with `border_rows` rows of scratch for its border copies) instead of an
    im2col tile. K's segments are the window rows. The input's bytes as
    stored, `pad` too: the kernels flip signed ones. A kernel of its own: a
    model without such convs never compiles it (MobileNetV2's cold
    compile: 1 s)."""
    N, C = x.shape[0], x.shape[3]
    Pt, KH, run = geo[GPT], geo[GKH], geo[GKW] * C  # run: a window row's taps
    table_rows = np.empty(KH * Pt, np.int64)
    pad_run = np.full(run, np.uint8(pad))
    border = np.empty(border_rows * run, np.uint8)
    c = np.empty((Pt, min(column_span(M, gp[G_NR], geo[GNS]), M)), np.int32)  # K blocks' sums
    ep = requant_args(chan_f, sc_i, sc_f)
    segment = run // 4
    for t in range(t0, t1):
        n, p0, rows, n0, n1, o = _requant_task(t, N, M, geo, gp)
        if n0 < n1:
            _row_addresses(x, n, p0, rows, geo, pad_run, table_rows, border)
            gemm_requant_rows(table_rows.ctypes.data, Pt, rows, fptrs, rq_fptrs, data, init, gp,
                              c, n0, n1, ep, out.ctypes.data + o, other.ctypes.data + o, M,
                              table, segment)  # fmt: skip


@jit(inline=True)
def _requant_task(t, N, M, geo, gp):
    """Task t of a requantizing conv: output channel split s = t // T of GNS
    (whole NR panels), pixel tile t % T of the T = N * ceil(P / GPT) tiles.
    Split-major, so that with GNS = threads each thread's contiguous range
    is its own split over every pixel (an even share, and only its half of
    the weights in its cache). Returns (image, first pixel, pixels,
    columns n0..n1 (none if n1 <= n0), the tile's output offset)."""
    P, Pt, splits = geo[GOH] * geo[GOW], geo[GPT], geo[GNS]
    tiles = (P + Pt - 1) // Pt
    span = column_span(M, gp[G_NR], splits)
    s, tile = t // (N * tiles), t % (N * tiles)
    n = tile // tiles
    p0 = (tile - n * tiles) * Pt
    return n, p0, min(Pt, P - p0), s * span, min(M, (s + 1) * span), (n * P + p0) * M


def inside_columns(geo) -> tuple[int, int]:
    """(lo, hi): the output columns lo..hi are those whose window lies inside
    the image horizontally (unit horizontal dilation); empty when hi <= lo."""
    W, KW, SW, PW, OW = (int(geo[i]) for i in (GW, GKW, GSW, GPW, GOW))
    lo = min(OW, (PW + SW - 1) // SW)  # the first ow with ow * SW - PW >= 0
    hi = min(OW, (W + PW - KW) // SW + 1) if W + PW >= KW else 0
    return lo, max(lo, hi)


def border_runs(geo, Pt: int) -> int:
    """How many window-row copies `_row_addresses` may make for a tile of Pt
    output pixels: KH for each pixel whose window leaves the image
    horizontally. Any OW consecutive pixels hold one output row's worth of
    those, wherever they start, so a tile holds at most ceil(Pt / OW) of
    them."""
    OW = int(geo[GOW])
    lo, hi = inside_columns(geo)
    per_row = OW - (hi - lo)
    return min(Pt, -(-Pt // OW) * per_row) * int(geo[GKH])


@jit()
def _row_addresses(x, n, p0, rows, geo, pad_run, table_rows, border):
    """table_rows[kh * GPT + i] = the address of window row kh's taps (kw, c),
    KW*C contiguous bytes, of output pixel p0 + i of image n (unit
    horizontal dilation): the input itself where that window row lies
    inside the image; `pad_run` (KW*C pad bytes) where it lies above or
    below it; for a pixel whose window leaves the image horizontally, a
    copy in `border` (KW*C bytes each) with the pad byte in place of the
    missing taps. Returns how many copies it made. The walk goes output
    row by output row: no division per pixel. Flat indices and addresses,
    no array views: this is compiled in every cold compile that uses it."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, SH, SW, PH = geo[GKH], geo[GKW], geo[GSH], geo[GSW], geo[GPH]
    PW, DH, OW, Pt = geo[GPW], geo[GDH], geo[GOW], geo[GPT]
    run = KW * C
    # lo..hi: the output columns whose window lies inside the image horizontally
    lo = min(OW, (PW + SW - 1) // SW)
    hi = max(lo, min(OW, (W + PW - KW) // SW + 1) if W + PW >= KW else 0)
    base, pad_address = np.int64(x.ctypes.data), np.int64(pad_run.ctypes.data)
    border_address = np.int64(border.ctypes.data)
    xf = x.reshape(x.size)
    copies = 0
    r = 0
    while r < rows:
        oh, ow, count = _row_run(p0 + r, rows - r, OW)
        for kh in range(KH):
            ih = oh * SH - PH + kh * DH
            slot = kh * Pt + r  # output column ow + q's slot at slot + q
            if ih < 0 or ih >= H:
                for q in range(count):
                    table_rows[U(slot + q)] = pad_address
                continue
            row_start = (n * H + ih) * W * C
            first = base + row_start + (ow * SW - PW) * C  # column ow's run
            for q in range(count):
                table_rows[U(slot + q)] = first + q * SW * C
            # the border columns get copies: q < left, and q >= right (no
            # pass over the inside ones: it took a third of the walk's time)
            left = min(count, max(0, lo - ow))
            right = max(left, min(count, hi - ow))
            for i in range(left + count - right):
                q = i if i < left else right + i - left
                iw0 = (ow + q) * SW - PW
                dst = copies * run
                for kw in range(KW):
                    iw, k = iw0 + kw, kw * C
                    if 0 <= iw < W:
                        for ch in range(C):
                            border[U(dst + k + ch)] = xf[U(row_start + iw * C + ch)]
                    else:
                        for ch in range(C):
                            border[U(dst + k + ch)] = pad_run[U(k + ch)]
                table_rows[U(slot + q)] = border_address + dst
                copies += 1
        r += count
    return copies


@jit()
def _window_row(x, n, ih, flip, za, pad, xr, dst, PW, CP):
    """xr[dst] = input row ih of image n as float32 `code - za`, CP floats per
    pixel (channels C..CP stay as they are), `pad` in the PW columns left of
    it, right of it, and for rows outside."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    row_len = xr.shape[1]
    if ih < 0 or ih >= H:
        xr[dst, :] = pad
        return
    xr[dst, : PW * CP] = pad
    xr[dst, (PW + W) * CP :] = pad
    xf = x.reshape(x.size)
    src = (n * H + ih) * W * C
    # u8 -> f32, then the zero point subtracted in float32 (exact: small
    # integers); int32 arithmetic would be widened to int64 by Numba's typing
    # and vectorize at half the width.
    fl, z = np.uint8(flip), np.float32(za)
    o = PW * CP
    row = xr[dst]
    if CP == C:
        seg = row[o : o + min(W * C, row_len - o)]
        xs = xf[src : src + seg.size]
        for q in range(seg.size):
            seg[q] = np.float32(xs[q] ^ fl) - z
        return
    for iw in range(W):
        for c in range(C):
            row[U(o + iw * CP + c)] = np.float32(xf[U(src + iw * C + c)] ^ fl) - z


@jit()
def _pair_row(x, n, ih, flip, za, pad, xr, dst, PW, C, builder, edge):
    """xr[dst], as int16 pairs: input row ih of image n as a ``pairs`` row
    kernel reads it (`dwkernels`): pair e holds columns 2e and 2e + 1 of the
    padded row, channel by channel, low half first, each `code - za` (`pad`
    = pad - za outside the image), built by the generated `builder`
    (`dwkernels.pair_row_kernel`): the pairs inside the image straight from
    x, each border pair from a copy of its two columns with the pad byte
    (the byte whose code - za is `pad`) in the padding, made in `edge` (2C
    bytes, the caller's: one allocation per row cost as much as a 7x7
    layer's whole row of pairs)."""
    H, W = x.shape[1], x.shape[2]
    row = xr[dst].view(np.int16)
    pairs = (row.size // (2 * C) + 1) // 2  # the padded width's columns, in pairs
    if ih < 0 or ih >= H:
        row[: 2 * pairs * C] = np.int16(pad)
        return
    xf = x.reshape(x.size)
    base = (n * H + ih) * W * C
    e0 = (PW + 1) // 2  # the first pair whose low column is in the image
    e1 = max(e0, min(pairs, (W + PW) // 2))  # past the last with both inside
    call_pair_row(builder, xf[base + (2 * e0 - PW) * C :].ctypes.data, e1 - e0, C, flip, za,
                  row[2 * e0 * C :].ctypes.data)  # fmt: skip
    pad_byte = np.uint8((np.int64(pad) + za) & 0xFF) ^ np.uint8(flip)
    for b in range(e0 + pairs - e1):  # the border pairs only: 0..e0 and e1..pairs
        e = b if b < e0 else e1 + b - e0
        for half in range(2):
            col = 2 * e - PW + half
            o = half * C
            # Element loops, not slice assignments: an array-to-array slice
            # assignment costs ~1.7 s of Numba compile time (its shape-error
            # message formatting), for a copy of a few dozen bytes. Unsigned
            # indices: no negative-index wrap, so the loops vectorize.
            if 0 <= col < W:
                src = base + col * C
                for ch in range(C):
                    edge[U(o + ch)] = xf[U(src + ch)]
            else:
                for ch in range(C):
                    edge[U(o + ch)] = pad_byte
        call_pair_row(builder, edge.ctypes.data, 1, C, flip, za, row[2 * e * C :].ctypes.data)


@jit(inline=True)
def _quad_ring(x, n, oh, geo, flip, xr, held, srcs, pad_row, builder) -> int:
    """Make the ring `xr` (one row) hold the quad of output row oh of image n
    for a ``quads`` row kernel (`dwkernels`): padded input rows q0..q0 + 3,
    q0 the even one at or above the window's first, interleaved by the
    kernel at address `builder`, rows outside the image from `pad_row` (W*C
    stored pad bytes); the padding columns hold the pad byte since the
    ring's allocation (`_requant_ring`). Returns the window's first row's
    byte in the quad (0 or 1), which selects the kernel's weight set."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    first = oh * geo[GSH]  # the window's first padded row
    q0 = first - first % 2
    key = n * geo[GHP] + q0
    if held[0] != key:
        for q in range(4):
            ih = q0 + q - geo[GPH]
            if 0 <= ih < H:
                srcs[q] = x.ctypes.data + np.uint64((n * H + ih) * W * C)
            else:
                srcs[q] = pad_row.ctypes.data
        dst = xr.ctypes.data + np.uint64(4 * geo[GPW] * C)
        call_quad_row(builder, srcs.ctypes.data, W * C, flip, dst)
        held[0] = key
    return first - q0


@jit(inline=True)
def _ring_rows(x, n, oh, geo, flip, za, pad, xr, held, slot, pairs, edge):
    """Make the ring `xr` hold the input rows of output row oh of image n
    (converting those it lacks: `_window_row`, or `_pair_row` for a pairs
    row kernel, `pairs` then the address of its row builder, `edge` its
    scratch); slot[kh] = tap row kh's slot."""
    KH, SH, PH, PW, DH = geo[GKH], geo[GSH], geo[GPH], geo[GPW], geo[GDH]
    span = xr.shape[0]
    for kh in range(KH):
        ih = oh * SH - PH + kh * DH
        s_ = (ih + PH) % span  # ih + PH in [0, HP): the padded row
        key = n * geo[GHP] + ih + PH
        if held[s_] != key:
            if pairs:
                _pair_row(x, n, ih, flip, za, pad, xr, s_, PW, x.shape[3], pairs, edge)
            else:
                _window_row(x, n, ih, flip, za, pad, xr, s_, PW, xr.shape[1] // geo[GWP])
            held[s_] = key
        slot[kh] = s_


@jit()
def depthwise_nhwc(t0, t1, x, geo, flip, za, pad_shift, ws, wrow, fptr, out,
                   chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Output rows t0..t1 (image, oh) of a depthwise convolution of the NHWC
    bytes x [N, H, W, C]; `ws` float32 [KH*KW, CP] the shifted weights (CP >=
    C: channels padded with zeros to the row kernel's vector width); `za` the
    activation zero point as u8 (stored byte ^ flip), `pad_shift` = pad - za.

    Input rows are converted once each into a ring of float32 rows `xr`
    (code - za, padded to WP columns with pad_shift), as many as one window
    spans, so consecutive output rows reuse them. Then `fptr`, the row kernel
    (`dwkernels`), computes the output row's sums, and the epilogue stores it.
    Without one (the portable path), each tap is a float multiply-add loop
    over the output row: with unit stride one loop of OW*C (weights from
    `wrow`, `ws` repeated OW times), else one loop of C per output pixel. The
    float32 sums are exact: every product and partial sum is an integer below
    2^24 in magnitude (the lowering checks KH*KW*255*255)."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    C, CP = x.shape[3], ws.shape[1]
    KH, OH, OW = geo[GKH], geo[GOH], geo[GOW]
    span = (KH - 1) * geo[GDH] + 1
    xr = np.zeros((span, geo[GWP] * CP), np.float32)
    held = np.full(span, -1, np.int64)  # the (image, row) each ring slot holds
    edge = np.empty(0, np.uint8)  # float rows have no border pairs
    acc = np.empty(OW * CP, np.float32)
    sums = np.empty(OW * CP, np.int32)
    tile = sums.reshape(OW, CP)
    slot = np.empty(KH, np.int64)
    rows = np.empty(KH, np.int64)  # the row kernel's row addresses
    for t in range(t0, t1):
        n = t // OH
        _ring_rows(x, n, t - n * OH, geo, flip, za, np.float32(pad_shift), xr, held, slot, 0, edge)
        if fptr != 0:
            for kh in range(KH):
                rows[kh] = xr[slot[kh]].ctypes.data
            call_depthwise_row(fptr, rows.ctypes.data, ws.ctypes.data, CP, OW, sums.ctypes.data, 0)
        else:
            _depthwise_taps(xr, slot, ws, wrow, geo, acc)
            for q in range(OW * C):
                sums[U(q)] = np.int32(acc[U(q)])
        ep_tile(tile, _0, OW, C, out, t * OW * C, C, _1, _0, _0, _1, _0, C,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


@jit()
def depthwise_nhwc_requant(t0, t1, x, geo, flip, za, pad_shift, ws, fptr, builder, quads, out,
                           chan_i, chan_f):  # fmt: skip
    """`depthwise_nhwc` whose row kernel (`fptr`, a requant one) stores the
    output bytes itself: no epilogue loop (and none of its code to compile).
    The channels fill whole vectors (CP == C). `builder` nonzero: the ring
    rows' builder of a pairs row kernel (`_pair_row`; `ws` its weight
    pairs) or, with `quads`, of a quads one (`_quad_ring`; `ws` its weight
    quads, `chan_i`'s bias compensated for the zero point)."""
    C, OH, OW = x.shape[3], geo[GOH], geo[GOW]
    xr, held, edge, slot, rows = _requant_ring(x, geo, flip, za, pad_shift, quads)
    ep = _depthwise_requant_args(chan_i, chan_f)
    for t in range(t0, t1):
        n = t // OH
        dst = out.ctypes.data + t * OW * C
        _depthwise_row_requant(x, n, t - n * OH, geo, flip, za, pad_shift, ws, fptr, builder,
                               quads, xr, held, edge, slot, rows, ep, dst)  # fmt: skip


@jit()
def depthwise_pointwise_nhwc(t0, t1, x, geo, flip, za, pad_shift, ws, fptr, builder, quads,
                             dw_i, dw_f, band, M, fptrs, rq_fptrs, data, init, gp, out, chan_f,
                             sc_i, sc_f, other, table):  # fmt: skip
    """A depthwise convolution (`depthwise_nhwc_requant`) and the pointwise one
    that reads its output (`conv_gemm_nhwc_requant`, A in place), as one: task
    t is a band of `band` output pixels of one image (`geo` the depthwise
    window's), usually whole rows. The depthwise rows the band touches are
    stored in a buffer that is at once the pointwise GEMM's A rows, so the
    intermediate tensor is never written out, and read back, whole. A band
    that starts or ends inside a row computes that row's depthwise outputs
    for its neighbour too (`DepthwisePointwise.prepare`). `dw_i`, `dw_f`: the
    depthwise requantize's per-channel constants (`dw_i` the row kernel's:
    for a quads one, the bias carries the zero point's term); the rest as
    `conv_gemm_nhwc_requant`'s."""
    C, OH, OW = x.shape[3], geo[GOH], geo[GOW]
    P = OH * OW
    bands = (P + band - 1) // band
    xr, held, edge, slot, rows = _requant_ring(x, geo, flip, za, pad_shift, quads)
    dw_ep = _depthwise_requant_args(dw_i, dw_f)
    # the band's depthwise rows (one more when it starts inside a row): the GEMM's A
    mid = np.empty((((band + OW - 1) // OW + 1) * OW, C), np.uint8)
    c = np.empty((band, M), np.int32)  # the GEMM's sums between K blocks
    ep = requant_args(chan_f, sc_i, sc_f)
    # from column 0, no K segments; arguments typed as the conv kernels'
    # (no literals, A's address a uint64): one gemm_requant_rows compile
    all_columns = np.int64(0)
    for t in range(t0, t1):
        n = t // bands
        p0 = (t - n * bands) * band
        count = min(band, P - p0)
        oh0, oh1 = p0 // OW, (p0 + count - 1) // OW
        for j in range(oh1 - oh0 + 1):
            dst = mid.ctypes.data + j * OW * C
            _depthwise_row_requant(x, n, oh0 + j, geo, flip, za, pad_shift, ws, fptr, builder,
                                   quads, xr, held, edge, slot, rows, dw_ep, dst)  # fmt: skip
        o = (n * P + p0) * M
        a = mid.ctypes.data + np.uint64((p0 - oh0 * OW) * C)
        gemm_requant_rows(a, C, count, fptrs, rq_fptrs, data, init, gp, c, all_columns, M, ep,
                          out.ctypes.data + o, other.ctypes.data + o, M, table,
                          all_columns)  # fmt: skip


@jit()
def _depthwise_requant_args(chan_i, chan_f):
    """The requantizing row kernels' `ep` (`dwkernels`): bias, f, ldf."""
    ep = np.zeros(3, np.int64)
    ep[0], ep[1], ep[2] = chan_i.ctypes.data, chan_f.ctypes.data, chan_f.shape[1]
    return ep


@jit(inline=True)
def _requant_ring(x, geo, flip, za, pad_shift, quads):
    """The ring of a requantizing row kernel's input rows and its scratch:
    (ring, the (image, row) each ring slot holds, a border pair's two columns
    (`_pair_row`) or a quads kernel's row of pad bytes, the slots of the
    window's rows (a quads kernel's 4 row addresses), the row kernel's row
    addresses)."""
    C, KH = x.shape[3], geo[GKH]
    if quads:
        xr = np.empty((1, geo[GWP] * C), np.float32)
        pad_byte = np.uint8((za + pad_shift) & 0xFF)  # as the kernel reads it (flipped)
        ring = xr[0].view(np.uint8)
        ring[: 4 * geo[GPW] * C] = pad_byte
        ring[4 * (geo[GPW] + x.shape[2]) * C :] = pad_byte
        edge = np.full(x.shape[2] * C, pad_byte ^ np.uint8(flip), np.uint8)  # as stored
        held = np.full(1, -1, np.int64)
        return xr, held, edge, np.empty(4, np.int64), np.empty(1, np.int64)
    span = (KH - 1) * geo[GDH] + 1
    xr = np.zeros((span, geo[GWP] * C), np.float32)
    held = np.full(span, -1, np.int64)
    return xr, held, np.empty(2 * C, np.uint8), np.empty(KH, np.int64), np.empty(KH, np.int64)


@jit(inline=True)
def _depthwise_row_requant(x, n, oh, geo, flip, za, pad_shift, ws, fptr, builder, quads, xr,
                           held, edge, slot, rows, ep, dst):  # fmt: skip
    """Output row oh of image n, requantized, to the address `dst`: the ring's
    input rows (`_ring_rows`, or `_quad_ring` with `quads`), then the
    requantizing row kernel `fptr`."""
    w = ws.ctypes.data
    if quads:
        start = _quad_ring(x, n, oh, geo, flip, xr, held, slot, edge, builder)
        rows[0] = xr.ctypes.data
        w += np.uint64(start * geo[GKW] * ws.shape[1] * 4)  # the weight set of that start
    else:
        _ring_rows(x, n, oh, geo, flip, za, np.float32(pad_shift), xr, held, slot, builder, edge)
        for kh in range(geo[GKH]):
            rows[kh] = xr[slot[kh]].ctypes.data
    call_depthwise_row(fptr, rows.ctypes.data, w, x.shape[3], geo[GOW], dst,
                       ep.ctypes.data)  # fmt: skip


@jit()
def _depthwise_taps(xr, slot, ws, wrow, geo, acc):
    """acc[:OW*C] = one output row's sums, tap by tap (the portable path)."""
    C = ws.shape[1]
    KH, KW, SW, DW, OW = geo[GKH], geo[GKW], geo[GSW], geo[GDW], geo[GOW]
    acc[:] = 0
    for kh in range(KH):
        row = xr[slot[kh]]
        for kw in range(KW):
            tap = kh * KW + kw
            if wrow.shape[0] > 0:  # unit stride: one loop over the output row
                wt = wrow[tap]
                xrow = row[kw * C :]
                for q in range(OW * C):
                    acc[U(q)] += wt[U(q)] * xrow[U(q)]
            else:
                for ow in range(OW):
                    src = (ow * SW + kw * DW) * C
                    dst = ow * C
                    for c in range(C):
                        acc[U(dst + c)] += ws[U(tap), U(c)] * row[U(src + c)]


class ChannelsLastConv:
    """A GEMM convolution over NHWC pixels. Built once per layer (weights packed
    as B [K = (kh, kw, c), M]); `prepare` once per input shape (tile size,
    microkernels), `run` per call. `pixel_rows`: A's rows are the input's
    pixels as they are, once flipped (a 1x1, stride-1, unpadded conv with
    C % 4 == 0); `in_place`: besides, they need no flip (unsigned
    activations), so A is the input itself."""

    def __init__(self, w_int8: np.ndarray, zw: np.ndarray, *, flip: int, pad_byte: int,
                 pointwise: bool, unit_dilation: bool, pixels_hint: int,
                 num_threads: int):  # fmt: skip
        m, c, kh, kw = w_int8.shape
        # B as the transpose of [M, K]: packing reads it row by row (`pack_b`)
        b = w_int8.transpose(0, 2, 3, 1).reshape(m, kh * kw * c).T
        self.plan = plan_gemm(b, max(pixels_hint, 1))
        self.zw = np.ascontiguousarray(zw, dtype=np.int64)
        self.need_rowsum = bool(np.any(self.zw != 0))
        self.channels = c
        self.window_row_bytes = kw * c if unit_dilation else 0  # 0: not contiguous
        self.flip, self.pad_byte = flip, pad_byte
        self.pixel_rows = pointwise and c % 4 == 0
        self.in_place = self.pixel_rows and flip == 0
        self.num_threads = num_threads
        self.requant = ""  # the requantizing microkernels' kind, once chosen
        self.rq_fptrs = _EMPTY_I64
        self.rq_init = self.plan.init  # their sums' start (the first K block's)

    def fuse_epilogue(self, ep) -> None:
        """Let the microkernels store the output bytes when `ep` is the float
        requantize to 8 bits, alone or followed by a residual qadd
        (ukernels REQUANT_DOC) or an 8-bit lookup (`gemm_requant_rows`'
        table stage), and nothing comes between the GEMM and it (no
        per-pixel weight zero point term). A plain requantize uses the
        "packed" kernels where `packs_exactly` allows and panels are 32
        columns or wider; every kind's sums start at the bias (`rq_init`)."""
        self.requant = requant_kind(self.plan, ep, self.need_rowsum)
        if self.requant:
            # the requantizing kernels' sums start at the bias (they wrap alike)
            self.rq_init = self.plan.init_with(ep.chan_i[0])
            self.rq_fptrs = self.plan.requant_fptrs(self.requant)

    @property
    def fused(self) -> bool:
        return self.rq_fptrs.size > 0

    def tile_pixels(self, pixels: int, images: int) -> int:
        """Output pixels per task: at most the engine's cache-sized MC and what
        keeps the int32 C tile (which the epilogue reads back) in L1/L2; with
        several threads, the tile that shares the work out most evenly
        (`balanced_tile`)."""
        cap = self._single_thread_tile(pixels)
        if self.num_threads == 1:
            return cap
        return balanced_tile(pixels, images, self.plan.mr, cap, self.num_threads)

    def column_split(self, pixels: int, images: int, tile: int) -> tuple[int, int]:
        """(tile, splits): the pixel tile and the number of output channel
        splits per tile that leave the busiest thread the least work
        (`_busiest_thread`): `tile` and 1, or the single-thread tile cut into
        `num_threads` column ranges. Why: a 7x7 layer has one or two pixel
        tiles, so the threads split 49 pixels unevenly and each streams all
        of the layer's weights (ResNet-18's 512x512x3x3: 2.4 MB) through its
        cache; split by channels, each reads its own half."""
        mr, threads = self.plan.mr, self.num_threads
        panels = _ceil_div(self.plan.n, self.plan.config.nr)
        if panels < threads:
            return tile, 1
        nr = self.plan.config.nr
        cap = self._single_thread_tile(pixels, _ceil_div(panels, threads) * nr)
        by_pixels = _busiest_thread(pixels, images, mr, tile, 1, panels, threads)
        by_columns = _busiest_thread(pixels, images, mr, cap, threads, panels, threads)
        # each split also builds its tile's im2col rows: ask for a clear gain
        return (cap, threads) if by_columns < 0.9 * by_pixels else (tile, 1)

    def _single_thread_tile(self, pixels: int, columns: int | None = None) -> int:
        """The largest tile (a multiple of MR) within the engine's MC whose
        int32 sums over `columns` (all the output channels by default) stay
        within `_C_TILE_BYTES`."""
        mr = self.plan.mr
        c_rows = max(mr, _C_TILE_BYTES // (4 * (columns or self.plan.n)) // mr * mr)
        return max(mr, min(self.plan.config.mc, c_rows, _round_up(pixels, mr)) // mr * mr)

    def prepare(self, geo, images: int) -> tuple:
        """Per input shape: the work split (tile size and column splits, into
        `geo`; only the requantizing kernel splits columns) and what `run`
        takes: (the im2col row kernel (`im2col_kernel`) or, with A's rows
        by address, the rows of border scratch a tile
        needs (`border_runs`); the microkernels' tables, compiled)."""
        pixels = int(geo[GOH] * geo[GOW])
        tile, splits = self.tile_pixels(pixels, images), 1
        if self.fused and self.num_threads > 1:
            tile, splits = self.column_split(pixels, images, tile)
        geo[GPT], geo[GNS] = tile, splits
        by_address = self.a_mode == A_BY_ADDRESS
        # by address, the bytes as stored: signed ones flipped to u8 by the kernels
        access = {"by_address": by_address, "a_signed": by_address and self.flip != 0}
        for rows in (min(tile, pixels), pixels % tile or tile):
            self.plan.ensure_rows(rows, self.requant, **access)
        if not by_address:
            return self.im2col_kernel(geo), self.plan.fptrs, self.rq_fptrs
        fptrs, rq_fptrs = self.plan.kernels(**access), self.plan.kernels(self.requant, **access)
        return border_runs(geo, tile), fptrs, rq_fptrs

    @property
    def a_mode(self) -> int:
        """Where the requantizing kernel's A rows come from: the input itself
        (`in_place`); by address (A_BY_ADDRESS: straight from the input, no
        im2col copy) where the kernels store bytes (`fused`) and have a
        variant that takes rows by address (not the portable path), and
        each window row's taps are contiguous (unit horizontal dilation)
        whole groups of 4 bytes; else an im2col tile. Signed activations
        too: those kernels flip the bytes as they load them (ukernels
        SIGNED_DOC)."""
        run = self.window_row_bytes
        if self.in_place:
            return A_IN_PLACE
        if self.fused and self.plan.config.isa != "portable" and run > 0 and run % 4 == 0:
            return A_BY_ADDRESS
        return A_IM2COL

    def im2col_kernel(self, geo) -> tuple[int, bool]:
        """(address, masked) of the im2col row kernel for this window: address
        0 when A is read in place, or the window or ISA has none (the Numba
        loop); masked where it takes border pixels too (`im2colkernels`
        MASKED_DOC)."""
        isa, c = self.plan.config.isa, self.channels
        run = int(geo[GKW]) * c
        if self.in_place or geo[GDW] != 1 or not im2colkernels.fits(isa, run):
            return 0, False
        spec = im2colkernels.Im2colSpec(isa, int(geo[GKH]), run, int(geo[GSW]) * c, self.flip != 0)
        return im2colkernels.im2col_kernel(spec), spec.masked

    def work(self, geo, out_shape) -> int:
        """A call's `run_tasks` work: multiply-adds, im2col bytes, outputs."""
        n, m, oh, ow = out_shape
        taps = n * oh * ow * int(geo[GKH] * geo[GKW]) * self.channels
        copied = taps if self.a_mode == A_IM2COL else 0
        return taps * m // _GEMM_MACS_PER_WORK + copied + _WORK_PER_OUTPUT * n * m * oh * ow

    def run(self, x4, geo, prepared, ep, sc_i, sc_f, other, out_shape):
        """The logical NCHW result (NHWC memory) of the conv and its epilogue."""
        n, m, oh, ow = out_shape
        out, flat, ob = _channels_last_io(ep, other, out_shape)
        tasks = n * _ceil_div(oh * ow, int(geo[GPT])) * int(geo[GNS])
        work = self.work(geo, out_shape)
        plan = self.plan
        x = nhwc_bytes(x4)
        if self.fused and self.a_mode == A_BY_ADDRESS:
            border_rows, fptrs, rq_fptrs = prepared
            stored_pad = self.pad_byte ^ self.flip  # the kernels flip it back
            run_tasks(
                conv_gemm_nhwc_by_address, tasks, work, self.num_threads, x, geo, stored_pad,
                border_rows, m, fptrs, rq_fptrs, plan.data, self.rq_init, plan.gparams, flat,
                ep.chan_f, sc_i, sc_f, ob, ep.byte_table,
            )  # fmt: skip
            return out
        (im2col, masked), fptrs, rq_fptrs = prepared
        if self.fused:
            run_tasks(
                conv_gemm_nhwc_requant, tasks, work, self.num_threads, x, geo, self.flip,
                self.pad_byte, self.in_place, im2col, masked, m, fptrs, rq_fptrs, plan.data,
                self.rq_init, plan.gparams, flat, ep.chan_f, sc_i, sc_f, ob, ep.byte_table,
            )  # fmt: skip
            return out
        run_tasks(
            conv_gemm_nhwc, tasks, work, self.num_threads, x, geo, self.flip, self.pad_byte,
            self.in_place, im2col, masked, self.zw, self.need_rowsum, plan.fptrs, plan.data,
            plan.init, plan.gparams, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table, ob,
        )  # fmt: skip
        return out


class ChannelsLastDepthwise:
    """A depthwise convolution (one input channel per output channel) over
    NHWC rows, with the same build / `prepare` / `run` stages as
    `ChannelsLastConv`: weights shifted by their zero points, as float32
    [taps, CP] (exact: see `depthwise_nhwc`; `fits` says whether a window
    qualifies); `za` the activation zero point as u8, `pad_shift` pad - za.
    On the SIMD paths a generated row kernel (`dwkernels`) computes each
    output row; the portable path runs Numba loops. Where the row kernel
    requantizes on AVX512-VNNI, it multiplies byte quads of window rows
    where they fit (`quads`: its weights `w_quads`, its ring `_quad_ring`'s,
    its bias `chan_i`), else, with unit horizontal dilation, int16 tap pairs
    (`pairs`: its weights `w_pairs`, its ring rows `_pair_row`'s)."""

    @staticmethod
    def fits(taps: int) -> bool:
        return taps * 255 * 255 < 1 << 24

    def __init__(self, w_shifted: np.ndarray, *, flip: int, za: int, pad_shift: int,
                 unit_dilation: bool, unit_row_dilation: bool, num_threads: int):  # fmt: skip
        m, kh, kw = w_shifted.shape
        assert self.fits(kh * kw) and np.abs(w_shifted).max(initial=0) <= 255
        self.isa = select_isa()
        self.channels = m
        lanes = dwkernels.LANES.get(self.isa, 1)
        self.ws = np.zeros((kh * kw, _round_up(m, lanes)), np.float32)
        self.ws[:, :m] = w_shifted.reshape(m, kh * kw).T
        # as float32 bits: the kernels take one weight array type
        self.w_pairs = dwkernels.pair_weights(w_shifted.transpose(1, 2, 0)).view(np.float32)
        # byte quads: up to 3 window rows, each tap's weight an int8
        self.quads_fit = bool(
            kh <= 3 and (kh == 1 or unit_row_dilation)
            and -128 <= w_shifted.min(initial=0) and w_shifted.max(initial=0) <= 127
        )  # fmt: skip
        self.w_quads = _EMPTY_ROWS
        if self.quads_fit:
            self.w_quads = dwkernels.quad_weights(w_shifted.transpose(1, 2, 0)).view(np.float32)
        self.tap_sums = w_shifted.reshape(m, kh * kw).sum(axis=1)
        self.flip, self.za, self.pad_shift = flip, za, pad_shift
        self.unit_dilation = unit_dilation
        self.num_threads = num_threads
        self.fused = False
        self.bias_in_sum = False
        self.pairs = False
        self.quads = False
        self.chan_i = None  # the row kernels' per-channel integers (`fuse_epilogue`)

    @property
    def kernel_weights(self) -> np.ndarray:
        """The weights the row kernels take: `w_quads`, `w_pairs` or `ws`."""
        return self.w_quads if self.quads else self.w_pairs if self.pairs else self.ws

    def fuse_epilogue(self, ep) -> None:
        """Let the row kernels store the output bytes when `ep` is the plain
        float requantize to 8 bits and the kernels' channel blocks are exactly
        the output's channels (no padding channels to store); and start their
        sums from the bias when every channel's |bias| + |sum| stays below
        2^24 (`dwkernels` bias_in_sum: exact in float32, no int32 wrap)."""
        sc, m = ep.sc_i, self.ws.shape[1]  # m: the channels rounded up to whole vectors
        self.fused = bool(
            self.isa in dwkernels.LANES
            and m == self.channels
            and sc[I_FAST] and sc[I_ROUND] == R_FLOAT and sc[I_POST] == P_NONE
            and ep.out_dtype.bits == 8
        )  # fmt: skip
        self.quads = self.fused and self.isa in QUADS_ISAS and self.quads_fit
        self.pairs = (
            self.fused and not self.quads and self.isa in PAIRS_ISAS and self.unit_dilation
        )  # fmt: skip
        # |x - za| <= 255 on every tap, pad taps included (pad_shift)
        largest_sum = 255 * np.abs(self.ws[:, : self.channels].astype(np.int64)).sum(axis=0)
        bias = np.abs(ep.chan_i[0].astype(np.int64))
        fits = bool(np.all(bias + largest_sum < 1 << 24))
        self.bias_in_sum = self.fused and not (self.pairs or self.quads) and fits
        self.chan_i = ep.chan_i
        if self.quads:  # sum (x - za) w = sum x w - za sum w: the last term in the bias
            self.chan_i = ep.chan_i.copy()
            self.chan_i[0] -= self.za * self.tap_sums

    def prepare(self, geo, images: int) -> tuple:
        """Per input shape: the row kernel's address (0 on the portable path);
        for the portable loops with unit stride, `ws` repeated along an output
        row of OW pixels."""
        if self.isa in dwkernels.LANES:
            spec = dwkernels.DepthwiseSpec(
                self.isa, int(geo[GKH]), int(geo[GKW]), int(geo[GSW]), int(geo[GDW]),
                requant=self.fused, bias_in_sum=self.bias_in_sum, pairs=self.pairs,
                quads=self.quads,
            )  # fmt: skip
            builder = 0
            if self.pairs or self.quads:
                builder = dwkernels.quad_row_kernel() if self.quads else dwkernels.pair_row_kernel()
            return dwkernels.depthwise_kernel(spec), _EMPTY_ROWS, builder
        if not (geo[GSW] == 1 and geo[GDW] == 1):
            return 0, _EMPTY_ROWS, 0
        return 0, np.ascontiguousarray(np.tile(self.ws, (1, int(geo[GOW])))), 0

    def work(self, out_shape) -> int:
        """A call's `run_tasks` work: multiply-adds and outputs."""
        outputs = math.prod(out_shape)  # not np.prod: ~3 us a call, per step
        return outputs * self.ws.shape[0] // _DEPTHWISE_MACS_PER_WORK + _WORK_PER_OUTPUT * outputs

    def run(self, x4, geo, prepared, ep, sc_i, sc_f, other, out_shape):
        n, m, oh, ow = out_shape
        out, flat, ob = _channels_last_io(ep, other, out_shape)
        fptr, weight_rows, builder = prepared
        work = self.work(out_shape)
        if self.fused:
            run_tasks(
                depthwise_nhwc_requant, n * oh, work, self.num_threads, nhwc_bytes(x4), geo,
                self.flip, self.za, self.pad_shift, self.kernel_weights, fptr, builder,
                self.quads, flat, self.chan_i, ep.chan_f,
            )  # fmt: skip
            return out
        run_tasks(
            depthwise_nhwc, n * oh, work, self.num_threads, nhwc_bytes(x4), geo, self.flip,
            self.za, self.pad_shift, self.ws, weight_rows, fptr, flat, ep.chan_i, ep.chan_f,
            sc_i, sc_f, ep.table, ob,
        )  # fmt: skip
        return out


class DepthwisePointwise:
    """A depthwise convolution and the 1x1 convolution that alone reads its
    output, run as one kernel (`depthwise_pointwise_nhwc`): both requantize in
    their kernels, and the pointwise one's A rows are its input's pixels
    (`pixel_rows`), so a band of depthwise output rows can be the GEMM's A as
    it is. Signed activations, which the GEMM reads flipped to u8 (code ^
    0x80 = code + 128), are stored flipped by the depthwise row kernel
    itself: its requantize adds the zero point last, in float, so adding 128
    more there (`mid_f`) yields code + 128 in [0, 255], whose byte is the
    flipped code."""

    @staticmethod
    def pairs(dw, pw) -> bool:
        return (
            isinstance(dw, ChannelsLastDepthwise) and dw.fused
            and isinstance(pw, ChannelsLastConv) and pw.pixel_rows and pw.fused
            and pw.channels == dw.channels
        )  # fmt: skip

    def __init__(self, dw: ChannelsLastDepthwise, pw: ChannelsLastConv, dw_ep):
        assert self.pairs(dw, pw)
        self.dw, self.pw = dw, pw
        self.mid_f = dw_ep.chan_f
        if pw.flip:
            self.mid_f = dw_ep.chan_f.copy()
            self.mid_f[FM_ZP] += np.float32(128)

    def prepare(self, dw_geo, pw_geo, out_shape) -> tuple[int, int, int]:
        """Per input shape: output pixels per band, whole rows about the
        pointwise layer's own tile of pixels (and its microkernels for the
        bands' row counts); the call's tasks (bands) and its `run_tasks` work.

        With several threads, bands that the threads cannot share evenly
        are cut into pixels instead (`even_bands`): MobileNetV2's 7x7 layers
        were bands of 4 and 3 rows, 28 and 21 pixels, on two threads; as 25
        and 24 pixels, each thread computes 4 depthwise rows (one of them
        twice) and the even half of the far larger pointwise GEMM."""
        n, m, oh, ow = out_shape
        pixels = oh * ow
        band = max(1, min(oh, int(pw_geo[GPT]) // ow)) * ow
        if self.pw.num_threads > 1:
            band = even_bands(pixels, n, band, self.pw.num_threads)
        self.pw.plan.ensure_rows(band, self.pw.requant)
        self.pw.plan.ensure_rows(pixels % band or band, self.pw.requant)
        work = self.dw.work((n, self.dw.channels, oh, ow)) + self.pw.work(pw_geo, out_shape)
        return band, n * _ceil_div(pixels, band), work

    def run(self, x4, dw_geo, dw_prepared, dw_ep, launch, pw_geo, ep, sc_i, sc_f, other,
            out_shape):  # fmt: skip
        """The pointwise layer's logical NCHW result (NHWC memory); `launch`
        is `prepare`'s."""
        m = out_shape[1]
        band, tasks, work = launch
        out, flat, ob = _channels_last_io(ep, other, out_shape)
        pw, plan = self.pw, self.pw.plan
        run_tasks(
            depthwise_pointwise_nhwc, tasks, work, pw.num_threads,
            nhwc_bytes(x4), dw_geo, self.dw.flip, self.dw.za, self.dw.pad_shift,
            self.dw.kernel_weights, dw_prepared[0], dw_prepared[2], self.dw.quads,
            self.dw.chan_i, self.mid_f,
            band, m, plan.fptrs, pw.rq_fptrs,
            plan.data, pw.rq_init, plan.gparams, flat, ep.chan_f, sc_i, sc_f, ob, ep.byte_table,
        )  # fmt: skip
        return out


def even_bands(pixels: int, images: int, band: int, threads: int) -> int:
    """The band (pixels) that cuts each of `images` images of `pixels` into
    as few bands as `band` does, or a few more, such that `threads`
    contiguous ranges of the tasks get an even share: `band` itself when its
    bands are already even (whole rows, no overlap)."""
    per_image = _ceil_div(pixels, band)
    if pixels % band == 0 and images * per_image % threads == 0:
        return band
    while images * per_image % threads:
        per_image += 1
    return _ceil_div(pixels, per_image)


def balanced_tile(pixels: int, images: int, mr: int, cap: int, threads: int) -> int:
    """The tile of output pixels (a multiple of `mr`, at most `cap`) whose
    tasks, `images` times ceil(pixels / tile) of them cut into `threads`
    contiguous ranges as `run_tasks` cuts them, leave the busiest thread the
    least work: its microkernel row tiles (a partial one costs a whole one),
    plus half a row tile per task (each task streams the weights through L2
    once more); ties go to the larger tile.

    Why: the largest tile that fits is rarely even. ResNet-18's 14x14 layers
    (196 pixels, tile 60: tasks of 60, 60, 60, 16 pixels) gave one thread
    120 pixels and the other 76, so two threads ran them 1.6x faster, not
    1.9x."""
    best, best_cost = cap, None
    for tile in range(cap, mr - 1, -mr):
        per_image = _ceil_div(pixels, tile)
        full, last = tile // mr, _ceil_div(pixels - (per_image - 1) * tile, mr)
        bounds = task_ranges(images * per_image, threads)
        cost = 0.0
        for lo, hi in zip(bounds, bounds[1:]):
            lasts = hi // per_image - lo // per_image  # image-final (short) tasks in range
            rows = (hi - lo) * full - lasts * (full - last)
            cost = max(cost, rows + 0.5 * (hi - lo))
        if best_cost is None or cost < best_cost:
            best, best_cost = tile, cost
    return best


def _busiest_thread(pixels, images, mr, tile, splits, panels, threads) -> float:
    """The work of the busiest of `threads` over the tasks of `tile` pixels
    and `splits` column ranges of `panels` weight panels, in `balanced_tile`'s
    units (microkernel row tiles over all panels, half a row tile per task
    for streaming its weights), cut into contiguous ranges as `run_tasks`
    cuts them."""
    per_image = _ceil_div(pixels, tile)
    span = _ceil_div(panels, splits)
    bounds = task_ranges(images * per_image * splits, threads)
    busiest = 0.0
    for lo, hi in zip(bounds, bounds[1:]):
        work = 0.0
        for t in range(lo, hi):
            s, p = divmod(t, images * per_image)  # as conv_gemm_nhwc_requant
            rows = min(tile, pixels - (p % per_image) * tile)
            share = max(0, min(panels, (s + 1) * span) - s * span) / panels
            work += (_ceil_div(rows, mr) + 0.5) * share
        busiest = max(busiest, work)
    return busiest


def _channels_last_io(ep, other, out_shape):
    """(logical result, its flat NHWC bytes, the post op's operand as NHWC bytes)."""
    out, flat = channels_last_output(out_shape, ep.out_dtype.numpy)
    ob = _EMPTY if other is None else nhwc_bytes(other).reshape(-1)
    return out, flat, ob


# A call's `run_tasks` work, in units of roughly 60 ps on one thread here
# (MobileNetV2's layers: 1 M units ~ 60 us):
# multiply-adds / 16 for the GEMM (~200 GMAC/s), / 2 for depthwise ones, plus
# one per im2col byte and _WORK_PER_OUTPUT per output (requantize and store).
# A second thread costs ~10 us per call (`spinteam`), so a call goes parallel
# only above _threads.MIN_PARALLEL_WORK units. Checked per layer on
# MobileNetV2 and ResNet-18, 1 vs 2 threads.
# The ISAs whose requantizing depthwise row kernels multiply int16 tap pairs
# (`dwkernels` pairs; tests empty it to run the float32 kernels there too).
PAIRS_ISAS = {"avx512_vnni"}
# The ISAs whose requantizing depthwise row kernels multiply byte quads of
# window rows (`dwkernels` quads), where the weights allow; tests empty it
# to run the pairs kernels there too.
QUADS_ISAS = {"avx512_vnni"}
_GEMM_MACS_PER_WORK = 16
_DEPTHWISE_MACS_PER_WORK = 2
_WORK_PER_OUTPUT = 4
_EMPTY = np.zeros(0, np.uint8)
_EMPTY_I64 = np.zeros(0, np.int64)
_EMPTY_ROWS = np.zeros((0, 0), np.float32)
# The GEMM's int32 output tile, written by the microkernels and read back by
# the epilogue; sized to stay in L2 next to the A tile (swept on MobileNetV2's
# pointwise layers: 32-128 KiB within noise, 4.8 MiB (a whole image) 3x slower).
_C_TILE_BYTES = 64 * 1024


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b
