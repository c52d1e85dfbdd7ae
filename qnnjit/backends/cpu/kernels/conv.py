"""qconv: integer convolution, with its epilogue fused (bias, requantize, clamp,
and a residual qadd / qmul / lookup when the chain has one).

Three kernels, chosen at compile time:

- `conv_gemm`: 8-bit operands, any group count. Per (image, group, tile of
  output pixels) the im2col tile (k = (c, kh, kw) as the weights are laid
  out) is packed straight into the GEMM engine's B layout, the engine
  computes the channel-major tile C[m, p] = (w + 128) @ (x - 128) (weights
  as its u8 operand, see `_gemm`), and the epilogue stores each channel's row
  of pixels contiguously (NCHW). Zero points are folded:

      sum_k (x - za)(w - zw) = sum_k x*w - zw * sum_k x - za * sum_k w + K*za*zw

  with `x` the stored activation byte (signed codes + 128), `w` the weight as
  int8 (uint8 weights - 128, zw likewise), so the terms in za and
  `sum_k w` are one int32 constant per output channel (compile time) and only
  `zw[m] * sum_k x[p]` is computed per pixel, when some zw != 0. Padding taps
  hold the pad byte (x's zero point, or the `pad_value` attribute), so the
  identity holds over all K taps. All of it is exact modulo 2^32, which is
  what the reference's int64-then-wrap gives. A 1x1, stride-1, unpadded
  convolution packs its taps straight from x (no padded copy).
- `conv_depthwise`: one input channel per group (depthwise, any channel
  multiplier): direct, vectorized loops over a zero-point-shifted, padded
  plane.
- `conv_direct`: any integer operands up to 16 bits (the slow, exact path:
  int64 products of shifted operands).

1-D convolutions run as 2-D with a height of 1; 3-D ones are declined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ._conv_geometry import (
    GCG,
    GDH,
    GDW,
    GG,
    GH,
    GHP,
    GKH,
    GKW,
    GMG,
    GOH,
    GOW,
    GPH,
    GPOINT,
    GPT,
    GPW,
    GSH,
    GSW,
    GW,
    GWP,
    conv_geometry,
    is_pointwise,
)  # fmt: skip
from ._gemm import C_COL, C_KG, C_NR, conv_gemm_tile, plan_conv_gemm
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .conv_nhwc import A_BY_ADDRESS, ChannelsLastConv, ChannelsLastDepthwise
from .requant import (
    build_epilogue,
    byte_codes,
    ep_tile,
    kernel_array,
    output_buffer,
    unsigned_view,
)

# The kinds computed channels-last (conv_nhwc.py), whose results are NHWC views.
CHANNELS_LAST = ("conv_nhwc", "conv_depthwise_nhwc")


def conv_kind(x_dt, w_dt, group: int, weight_shape) -> str:
    """Which kernel computes a qconv (`lower_qconv`), from its operand types,
    group count and weight shape [M, C/group, *window]."""
    m, cg = weight_shape[0], weight_shape[1]
    taps = math.prod(weight_shape[2:])
    if x_dt.bits != 8 or w_dt.bits != 8:
        return "conv_direct"
    if group == 1:  # a single input channel too: a GEMM with K = the taps, NHWC out
        return "conv_nhwc"
    if cg > 1:
        return "conv_gemm"
    if group == m and ChannelsLastDepthwise.fits(taps):
        return "conv_depthwise_nhwc"
    return "conv_depthwise"


def reads_channels_last(graph, value) -> bool:
    """Whether every reader of `value` is a 2-D qconv computed channels-last
    (`conv_kind`) taking it as its input, directly or as the anchor of a
    fused group. A producer that then writes NHWC saves the transpose at that
    edge; a wrong guess (a lowering that declines) costs a copy, never a bit:
    the executor hands other kernels a C-contiguous copy."""
    if graph.is_output(value):
        return False
    users = graph.users(value)
    for user in users:
        if user.op == "fused":
            body = user.attrs.get("body")
            if body is None:
                return False
            inner = [b for b, v in zip(body.inputs, user.inputs) if v is value]
            if not inner or not all(reads_channels_last(body, b) for b in inner):
                return False
        elif not _channels_last_input(user, value):
            return False
    return bool(users)


def _channels_last_input(node: Node, value) -> bool:
    if node.op != "qconv" or node.inputs[0] is not value:
        return False
    w = node.inputs[1]
    if any(v is value for v in node.inputs[1:]) or w is None or w.type.rank != 4:
        return False
    group = int(node.attrs.get("group", 1))
    return conv_kind(value.type.dtype, w.type.dtype, group, w.type.shape) in CHANNELS_LAST


# ---- kernels -------------------------------------------------------------------------


@jit()
def _pad_image(x, n, c0, geo, flip, pad, xp):
    """xp[c, i, j] (flat, [Cg, HP, WP]) = the stored byte of x[n, c0 + c]
    flipped to u8, at offset (PH, PW); `pad` elsewhere."""
    H, W, Cg = geo[GH], geo[GW], geo[GCG]
    PH, PW, HP, WP = geo[GPH], geo[GPW], geo[GHP], geo[GWP]
    xp[:] = pad
    for c in range(Cg):
        for i in range(H):
            row = (c * HP + PH + i) * WP + PW
            for j in range(W):
                xp[U(row + j)] = np.int64(x[n, U(c0 + c), i, j]) ^ flip


@jit()
def _pack_taps(xp, geo, toff, koff, p0, rows, nr, kg, col, bflat, init, colsum):
    """The im2col tile, packed as the GEMM's B operand: for output pixel
    p0 + r and tap k = (c, kh, kw), the padded image's byte v (u8 domain) is
    stored as the int8 v - 128 at column r of the microkernel layout
    (`bflat[panel, ...]` at column offset `col * (r % nr)` plus `koff[k]`);
    init[r] = -128 * sum_k v, the column's start value (see `_gemm`), and
    colsum[r] = sum_k v."""
    SH, SW, WP, OW = geo[GSH], geo[GSW], geo[GWP], geo[GOW]
    K = toff.size
    for r in range(rows):
        p = p0 + r
        oh = p // OW
        src = oh * SH * WP + (p - oh * OW) * SW
        panel = r // nr
        dst = panel * kg * nr * 4 + col * (r - panel * nr)
        s = np.int64(0)
        for k in range(K):
            v = np.int64(xp[U(src + toff[k])])
            s += v
            bflat[U(dst + koff[k])] = v ^ 0x80
        init[U(r)] = np.int32(-128 * s)
        colsum[U(r)] = s


@jit()
def _pack_taps_1x1(x, n, c0, geo, flip, koff, p0, rows, nr, kg, col, bflat, init, colsum):
    """`_pack_taps` for a 1x1, stride-1, unpadded convolution: the taps of
    pixel p are x[n, c0:c0 + Cg, p], read along the pixels."""
    Cg = geo[GCG]
    x3 = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    for r in range(rows):
        colsum[U(r)] = 0
    panel_bytes = kg * nr * 4
    for k in range(Cg):
        kk = koff[k]
        for pb in range(0, rows, nr):  # one panel of nr pixels at a time
            dst = (pb // nr) * panel_bytes + kk
            for q in range(min(nr, rows - pb)):
                v = np.int64(x3[n, U(c0 + k), U(p0 + pb + q)]) ^ flip
                colsum[U(pb + q)] += v
                bflat[U(dst + col * q)] = v ^ 0x80
    for r in range(rows):
        init[U(r)] = np.int32(-128 * colsum[U(r)])


@jit()
def conv_gemm(t0, t1, x, geo, toff, flip, pad, zw, need_rowsum, wa, koff, fptrs, cp, out,
              chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Tasks t0..t1 of (image, group, tile of output pixels): pack the im2col
    tile, run the channel-major GEMM (`_gemm.conv_gemm_tile`), subtract the
    weight zero point's `zw[m] * sum_k x` when some zw != 0, then the epilogue
    over rows of contiguous pixels."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    G, Mg = geo[GG], geo[GMG]
    P = geo[GOH] * geo[GOW]
    Pt = geo[GPT]
    Cg = geo[GCG]
    M = G * Mg
    nr, kg, col = cp[C_NR], cp[C_KG], cp[C_COL]
    tiles = (P + Pt - 1) // Pt
    panels = (Pt + nr - 1) // nr
    bflat = np.zeros(panels * kg * nr * 4, np.uint8)  # k past K stays zero
    init = np.zeros(panels * nr, np.int32)
    colsum = np.empty(Pt, np.int64)
    c = np.empty((Mg, Pt), np.int32)
    xp = np.empty(Cg * geo[GHP] * geo[GWP], np.uint8)
    padded = -1
    for t in range(t0, t1):
        n = t // (G * tiles)
        rest = t - n * (G * tiles)
        g = rest // tiles
        p0 = (rest - g * tiles) * Pt
        rows = min(Pt, P - p0)
        if geo[GPOINT] != 0:
            _pack_taps_1x1(
                x, n, g * Cg, geo, flip, koff, p0, rows, nr, kg, col, bflat, init, colsum
            )
        else:
            if n * G + g != padded:
                _pad_image(x, n, g * Cg, geo, flip, pad, xp)
                padded = n * G + g
            _pack_taps(xp, geo, toff, koff, p0, rows, nr, kg, col, bflat, init, colsum)
        conv_gemm_tile(wa, g, bflat, rows, c, init, fptrs, cp)
        if need_rowsum:
            for m in range(Mg):
                z = zw[U(g * Mg + m)]
                for r in range(rows):
                    c[U(m), U(r)] = np.int32(c[U(m), U(r)] - z * colsum[U(r)])
        ep_tile(c, _0, Mg, rows, out, (n * M + g * Mg) * P + p0, P, _1, g * Mg, _1, _0, _0, M,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


@jit()
def conv_depthwise(t0, t1, x, geo, flip, off, za, pad_shift, ws, out,
                   chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """One input channel per group (depthwise, any channel multiplier), tasks
    t0..t1 = (image, output channel) planes: the channel's plane, shifted by
    its zero point, is copied into a padded buffer (pad taps hold
    pad_value - za), then each tap adds `w * shifted x` to an int32 plane.
    With unit strides the output is computed on rows of the padded width, so
    a tap is one long contiguous loop `acc[i] += w * xp[i + offset]` (the
    columns past OW are computed and dropped); with strides, each output row
    is computed at unit stride and every SW-th column kept, so the inner loops
    stay contiguous (and vectorized) at SW times the work."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    H, W = geo[GH], geo[GW]
    M = geo[GG] * geo[GMG]
    mult = geo[GMG]
    KH, KW = geo[GKH], geo[GKW]
    SH, SW, PH, PW, DH, DW = geo[GSH], geo[GSW], geo[GPH], geo[GPW], geo[GDH], geo[GDW]
    OH, OW, HP, WP = geo[GOH], geo[GOW], geo[GHP], geo[GWP]
    P = OH * OW
    wide = SH == 1 and SW == 1
    W1 = (OW - 1) * SW + 1  # the output row at stride 1
    rs = WP if wide else W1  # accumulator row stride
    xp = np.empty(HP * WP + WP, np.int32)
    acc = np.empty(OH * rs, np.int32)
    acc2 = acc.reshape(OH, rs)
    picked = np.empty((OH, OW), np.int32)
    for t in range(t0, t1):
        n = t // M
        m = t - n * M
        c = m // mult
        xp[:] = pad_shift
        for i in range(H):
            row = (PH + i) * WP + PW
            for j in range(W):
                xp[U(row + j)] = ((np.int64(x[n, c, i, j]) ^ flip) - off) - za
        acc[:] = 0
        for kh in range(KH):
            for kw in range(KW):
                wv = ws[m, kh, kw]
                if wide:
                    shift = kh * DH * WP + kw * DW
                    for i in range(OH * WP):
                        acc[i] += wv * xp[U(i + shift)]
                else:  # unit-stride rows of width W1, every SW-th kept below
                    for oh in range(OH):
                        src = (oh * SH + kh * DH) * WP + kw * DW
                        dst = oh * W1
                        for j in range(W1):
                            acc[U(dst + j)] += wv * xp[U(src + j)]
        if wide:  # rows of the accumulator (stride rs) are the output rows
            ep_tile(acc2, _0, OH, OW, out, (n * M + m) * P, OW, _1, m, _0, _0, _0, M,
                    chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip
        else:
            for oh in range(OH):
                for ow in range(OW):
                    picked[U(oh), U(ow)] = acc2[U(oh), U(ow * SW)]
            ep_tile(picked, _0, OH, OW, out, (n * M + m) * P, OW, _1, m, _0, _0, _0, M,
                    chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


@jit()
def conv_direct(t0, t1, xs, geo, ws, out, chan_i, chan_f, sc_i, sc_f, table, other):
    """Any operands: xs (int64, zero-point-shifted, padded [N, C, HP, WP]),
    ws (int64, shifted [M, Cg, KH, KW]); exact int64 sums."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    Mg, Cg = geo[GMG], geo[GCG]
    M = geo[GG] * Mg
    KH, KW = geo[GKH], geo[GKW]
    SH, SW, DH, DW = geo[GSH], geo[GSW], geo[GDH], geo[GDW]
    OH, OW = geo[GOH], geo[GOW]
    P = OH * OW
    acc = np.empty((1, P), np.int32)
    for t in range(t0, t1):
        n = t // M
        m = t - n * M
        c0 = (m // Mg) * Cg
        for oh in range(OH):
            for ow in range(OW):
                s = np.int64(0)
                for c in range(Cg):
                    for kh in range(KH):
                        for kw in range(KW):
                            s += (
                                xs[n, c0 + c, oh * SH + kh * DH, ow * SW + kw * DW]
                                * ws[m, c, kh, kw]
                            )
                acc[0, oh * OW + ow] = np.int32(s)
        ep_tile(acc, _0, _1, P, out, (n * M + m) * P, P, _1, m, _0, _0, _0, M,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


# ---- lowering ------------------------------------------------------------------------


def _as_2d(attrs: dict, rank: int) -> dict:
    """Conv attributes of a 1-D (rank 3) conv as those of a 2-D one of height 1."""
    if rank == 4:
        return attrs
    (s,), (d,), (b, e) = attrs["strides"], attrs["dilations"], attrs["pads"]
    return {**attrs, "strides": (1, s), "dilations": (1, d), "pads": (0, b, 0, e)}


def _scalar_zp(zp, what) -> int:
    if zp is None:
        return 0
    zp = np.asarray(zp)
    if zp.size != 1:
        raise Decline(f"{what} is not per-tensor")
    return int(zp.reshape(-1)[0])


def lower_qconv(node: Node, ctx: LowerContext) -> Kernel:
    x, w = node.inputs[0], node.inputs[1]
    weights = const_input(node, 1, "weights")
    x_zp = _scalar_zp(const_input(node, 2, "x zero point"), "x zero point")
    w_zp = const_input(node, 3, "w zero point")
    bias = const_input(node, 4, "bias")
    rank = weights.ndim
    if rank not in (3, 4) or x.type.rank != rank:
        raise Decline(f"{rank - 2}-D convolution (the kernels do 1-D and 2-D)")
    attrs = _as_2d(node.attrs, rank)
    group = int(attrs["group"])
    w4 = weights if rank == 4 else weights[:, :, None, :]
    m, cg, kh, kw = w4.shape
    pad_value = node.attrs.get("pad_value")
    pad_code = x_zp if pad_value is None else int(pad_value)
    m_zp = np.zeros(m, np.int64)
    if w_zp is not None:
        w_zp = np.asarray(w_zp).astype(np.int64).reshape(-1)
        if w_zp.size not in (1, m):
            raise Decline(f"w zero point of size {w_zp.size} for {m} channels")
        m_zp[:] = w_zp
    base_bias = np.zeros(m, np.int64) if bias is None else bias.astype(np.int64).reshape(-1)
    chain = ctx.chain_after(node)
    x_dt, w_dt = x.type.dtype, w.type.dtype
    x_flip, x_off = byte_codes(x_dt)
    k = cg * kh * kw
    plan = None
    kind = conv_kind(x_dt, w_dt, group, w4.shape)

    if kind in ("conv_nhwc", "conv_gemm"):
        za = x_zp + x_off  # zero point and pad as stored bytes (+128 when signed)
        pad_byte = pad_code + x_off
        if w_dt == dtypes.uint8:
            wb, zw = (w4.astype(np.int16) - 128).astype(np.int8), m_zp - 128
        else:
            wb, zw = w4.astype(np.int8), m_zp
        mg = m // group
        w_groups = [wb[g * mg : (g + 1) * mg].reshape(mg, k) for g in range(group)]
        wsum = np.concatenate([w_.sum(axis=1, dtype=np.int64) for w_ in w_groups])
        pixels = _static_pixels(x, w4.shape, attrs, group)
        if kind == "conv_nhwc":
            # sum_k (x - za)(w - zw) = sum_k x w - za sum w + K za zw - zw sum x
            base_bias = base_bias - za * wsum + k * za * zw
            channels_last = ChannelsLastConv(
                wb, zw, flip=x_flip, pad_byte=pad_byte, pointwise=is_pointwise((kh, kw), attrs),
                unit_dilation=int(attrs["dilations"][-1]) == 1, pixels_hint=pixels,
                num_threads=ctx.num_threads,
            )  # fmt: skip
        else:
            # sum_k (x - za)(w - zw) = C + 128 sum w + 16384 K - za sum w + K za zw - zw sum x
            base_bias = base_bias + (128 - za) * wsum + 16384 * k + k * za * zw
            need_rowsum = bool(np.any(zw != 0))
            zw = kernel_array(zw, np.int64)
            plan = plan_conv_gemm(w_groups, pixels)
    elif kind == "conv_depthwise_nhwc":
        shifted = w4.reshape(m, kh, kw).astype(np.int64) - m_zp[:, None, None]
        channels_last = ChannelsLastDepthwise(
            shifted, flip=x_flip, za=x_zp + x_off, pad_shift=pad_code - x_zp,
            unit_dilation=int(attrs["dilations"][-1]) == 1,
            unit_row_dilation=int(attrs["dilations"][0]) == 1, num_threads=ctx.num_threads,
        )  # fmt: skip
    elif kind == "conv_depthwise":
        ws = kernel_array((w4.reshape(m, kh, kw).astype(np.int64) - m_zp[:, None, None]), np.int32)
    else:
        ws = kernel_array(w4.astype(np.int64) - m_zp[:, None, None, None])
    # a lookup after a residual add: only the requantizing microkernels take it
    ep = build_epilogue(chain, node.outputs[0], m, 1, base_bias, final_table=kind == "conv_nhwc")
    if kind in CHANNELS_LAST:
        channels_last.fuse_epilogue(ep)
    if ep.final_table and not channels_last.fused:  # the lookup: a step of its own
        ep = build_epilogue(chain, node.outputs[0], m, 1, base_bias)
        channels_last.fuse_epilogue(ep)
    launches = {}

    def launch(x_shape, other_shape):
        """Everything that depends on the input shape, computed once per shape."""
        geo = conv_geometry(x_shape, w4.shape, attrs, group)
        n, oh, ow = x_shape[0], int(geo[GOH]), int(geo[GOW])
        out_shape = (n, m, oh, ow)
        final_shape = out_shape if rank == 4 else (n, m, ow)
        sc_i, sc_f = ep.scalars(final_shape, other_shape)
        if kind in CHANNELS_LAST:
            tasks, extra = 0, channels_last.prepare(geo, n)
        elif kind == "conv_gemm":
            p = oh * ow
            geo[GPT] = tile = _tile_pixels(p, n * group, plan.nr, ctx.num_threads)
            tasks = n * group * -(-p // tile)
            extra = (_tap_offsets(geo),)
        else:
            tasks, extra = n * m, ()
        work = n * m * oh * ow * k
        return geo, out_shape, final_shape, sc_i, sc_f, tasks, work, extra

    def launched(x_shape, other_shape):
        """`launch`'s result for these shapes (computed once per shape)."""
        key = (x_shape, other_shape)
        entry = launches.get(key)
        if entry is None:
            entry = launches[key] = launch(*key)
        return entry

    def run(x_array, other=None):
        x4 = x_array if rank == 4 else x_array[:, :, None, :]
        entry = launched(x4.shape, None if other is None else other.shape)
        geo, out_shape, final_shape, sc_i, sc_f, tasks, work, extra = entry
        if kind in CHANNELS_LAST:
            ep.check_other(other, final_shape)
            other4 = other if other is None or rank == 4 else other[:, :, None, :]
            result = channels_last.run(x4, geo, extra, ep, sc_i, sc_f, other4, out_shape)
            return [result.reshape(final_shape) if rank == 3 else result]
        out, flat = output_buffer(out_shape, ep.out_dtype)
        ob = ep.other_bytes(other, final_shape)
        threads = ctx.num_threads
        if kind == "conv_gemm":
            run_tasks(
                conv_gemm, tasks, work, threads, unsigned_view(x4), geo, extra[0], x_flip,
                pad_byte, zw, need_rowsum, plan.wa, plan.koff, plan.fptrs, plan.cparams, flat,
                ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table, ob,
            )  # fmt: skip
        elif kind == "conv_depthwise":
            run_tasks(
                conv_depthwise, tasks, work, threads, unsigned_view(x4), geo, x_flip, x_off, x_zp,
                pad_code - x_zp, ws, flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table, ob,
            )  # fmt: skip
        else:
            ph, pw, hp, wp = (int(geo[i]) for i in (GPH, GPW, GHP, GWP))
            h, w_ = x4.shape[2:]
            xs = np.full((x4.shape[0], x4.shape[1], hp, wp), pad_code - x_zp, np.int64)
            xs[:, :, ph : ph + h, pw : pw + w_] = x4.astype(np.int64) - x_zp
            run_tasks(
                conv_direct, tasks, work, threads, xs, geo, ws, flat, ep.chan_i, ep.chan_f,
                sc_i, sc_f, ep.table, ob,
            )  # fmt: skip
        return [out.reshape(final_shape) if rank == 3 else out]

    nodes = [node, *ep.nodes]
    inputs = [x] + ([ep.other] if ep.other is not None else [])
    name = f"{kind}[{_describe(x_dt, w_dt, group, w4.shape)}]"
    if kind == "conv_nhwc" and channels_last.in_place:
        name += "(A in place)"
    if kind == "conv_nhwc" and channels_last.fused:
        name += f"(microkernels requantize: {channels_last.requant})"
    if kind == "conv_nhwc" and channels_last.a_mode == A_BY_ADDRESS:
        name += "(A rows by address)"
    if kind == "conv_depthwise_nhwc" and channels_last.fused:
        name += "(row kernels requantize)"
    if kind == "conv_depthwise_nhwc" and channels_last.bias_in_sum:
        name += "(bias in sum)"
    if kind == "conv_depthwise_nhwc" and channels_last.pairs:
        name += "(int16 tap pairs)"
    if kind == "conv_depthwise_nhwc" and channels_last.quads:
        name += "(byte row quads)"
    label = f"{name}+{ep.describe()}" if ep.nodes else name
    stage = ConvStage(channels_last, ep, launched) if kind in CHANNELS_LAST and rank == 4 else None
    return Kernel(
        label, run, inputs, nodes[-1].outputs, nodes, strided_inputs=kind in CHANNELS_LAST,
        stage=stage,
    )  # fmt: skip


@dataclass(frozen=True)
class ConvStage:
    """What fusing a 2-D channels-last conv step with its neighbour needs
    (`kernels/step_fusion.py`): the layer, its epilogue, and `launched(x_shape,
    other_shape)`: the per-shape geometry, scalars and prepared state that its
    own `run` uses."""

    layer: ChannelsLastConv | ChannelsLastDepthwise
    ep: object
    launched: Callable


def _tap_offsets(geo) -> np.ndarray:
    """Offset of tap k = (c, kh, kw) in a padded image, from its window origin."""
    cg, kh, kw = (int(geo[i]) for i in (GCG, GKH, GKW))
    dh, dw, hp, wp = (int(geo[i]) for i in (GDH, GDW, GHP, GWP))
    c, i, j = np.meshgrid(np.arange(cg), np.arange(kh), np.arange(kw), indexing="ij")
    return (c * hp * wp + i * dh * wp + j * dw).reshape(-1).astype(np.int64)


def _static_pixels(x, w_shape, attrs, group) -> int:
    """Output pixels per image when x's spatial shape is static (else a guess)."""
    shape = x.type.shape
    spatial = shape[2:] if len(shape) == 4 else (1, *shape[2:])
    if not all(isinstance(d, int) for d in spatial):
        return 256
    geo = conv_geometry((1, shape[1], *spatial), w_shape, attrs, group)
    return int(geo[GOH] * geo[GOW])


def _tile_pixels(pixels: int, images: int, nr: int, threads: int) -> int:
    """Output pixels per GEMM tile: a multiple of the panel width NR, about
    256 pixels (an L1/L2-sized im2col tile for common K), cut so that every
    thread gets a tile when there are few images."""
    tile = min(_round_up(pixels, nr), _round_up(256, nr))
    if images * _ceil_div(pixels, tile) < threads and pixels > nr:
        parts = _ceil_div(threads, images)
        tile = min(tile, max(nr, _round_up(_ceil_div(pixels, parts), nr)))
    return tile


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _describe(x_dt, w_dt, group, w_shape) -> str:
    m, cg, kh, kw = w_shape
    g = f" g={group}" if group > 1 else ""
    return f"{x_dt}x{w_dt} {m}x{cg}x{kh}x{kw}{g}"
