"""qmatmul: integer matrix products, with the epilogue fused.

- `matmul_gemm`: the second operand is a constant 2-D 8-bit matrix (a Gemm /
  linear layer): packed once, every row of the first operand (all leading
  dims flattened) goes through the GEMM engine a tile at a time, then the
  epilogue. Zero points are folded as in `conv`:

      sum_k (a - za_r)(b - zb_j)
          = sum_k a*b - zb_j * sum_k a - za_r * sum_k b + K * za_r * zb_j

  (`a` stored bytes, signed codes + 128; `b` int8, uint8 weights - 128); a
  per-tensor za makes the last two terms one constant per column. Without
  a per-row term (a per-tensor za, and zb - 128 or zb zero) the requantize,
  and a qadd after it, run in the microkernels of the last K block
  (`matmul_gemm_requant`, as the convolutions do): the bytes are stored from
  their registers, no int32 tile is written and read back (a ViT's MLP
  layers: 0.23 -> 0.17 ms).
- `matmul_batched_gemm`: anything else with 8-bit operands (both at run
  time, batched and broadcast: attention's Q @ K^T and P @ V). Per batch the
  run-time b[K, N] is packed into the engine's panel layout inside the
  kernel (`_pack_panels`, as `conv_gemm` packs its im2col tile), as the
  int8 `B = b_u - 128` (`b_u`: b's code + 128 when signed); each row tile of
  a (as the u8 `a_u`: code + 128 when signed) is copied beside its row sums,
  the engine computes `sum_k a_u * B` and the zero points, moved to those
  domains (`za' = za + 128` for signed a, `zb' = zb - 128` for unsigned b),
  are folded as above:

      sum_k (a_u - za'_r)(B - zb'_j)
          = sum_k a_u*B - zb'_j * sum_k a_u - za'_r * sum_k B + K * za'_r * zb'_j

  with a per-tensor za' the last two terms start the sums (the engine's
  per-column `init`, once per packed b). Tasks are (batch, row tile), the
  batches ordered by their b, so that each thread packs each b it meets once
  (b broadcast over a's batches: once per thread).
- `matmul_batched`: the rest (16-bit operands): per (batch, row),
  `acc_j += (a - za) * b`, then `- zb_j * sum_k (a - za)`, exact int64 sums.

Every path is exact modulo 2^32, as the reference's int64-then-wrap is: the
engine's int32 sums wrap (`vpdpbusd` does not saturate; on AVX2 the "exact"
kernels, since b is not known at compile time), and the corrections are int64
wrapped to int32, so whether the raw sum or the accumulator fits int32 does
not matter.

A step is replayed (`replay.py`): what `run` derives from the operands'
shapes (the batch index arrays, the row tiles, the engine's kernels) is
computed once per shape and the same arrays are passed on every call.

Operands follow `numpy.matmul` (1-D operands promoted, batch dims
broadcast); `a_zero_point` is per-tensor or one per row of a, `b_zero_point`
per-tensor or one per column of b.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from .. import gemm
from ..ukernels import UkernelSpec
from ._gemm import (
    G_DESC,
    G_K4,
    G_KCG,
    G_KG,
    G_MR,
    G_NC,
    G_NR,
    G_PANEL_BYTES,
    G_SLOTS,
    column_span,
    gemm_columns,
    gemm_requant_rows,
    plan_gemm,
    requant_args,
    requant_kind,
)
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import U, jit
from ._threads import run_tasks
from .requant import (
    build_epilogue,
    byte_codes,
    ep_tile,
    kernel_array,
    output_buffer,
    unsigned_view,
)


@jit()
def matmul_gemm(t0, t1, a2, flip, tile, splits, za, za_period, zb, need_rowsum, colsum, fptrs, data,
                init, gp, out, chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Tasks t0..t1 of `a2 @ B` (a2: [R, K] stored bytes, flipped to u8 by
    `flip`), zero points folded, then the epilogue (column j is channel j):
    task t is row tile t // splits, columns split t % splits of `splits`
    (whole NR panels: `_gemm.column_span`)."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    R, K = a2.shape
    N = zb.size
    K4, nr = gp[G_K4], gp[G_NR]
    span = column_span(N, nr, splits)
    a = np.zeros((tile, K4), np.uint8)  # columns K..K4 stay zero
    rowsum = np.zeros(tile, np.int64)
    c = np.empty((tile, min(span, N)), np.int32)
    for t in range(t0, t1):
        r0 = (t // splits) * tile
        n0 = (t % splits) * span
        n1 = min(N, n0 + span)
        if n0 >= n1:
            continue
        rows = min(tile, R - r0)
        for r in range(rows):
            s = 0
            for k in range(K):
                v = np.int64(a2[r0 + r, k]) ^ flip
                a[r, k] = v
                s += v
            rowsum[r] = s
        gemm_columns(a, rows, c, n0, n1, fptrs, data, init, gp)
        for r in range(rows):
            zar = za[(r0 + r) % za_period]
            rs = rowsum[r] if need_rowsum else 0
            if rs != 0 or zar != 0:
                for j in range(n0, n1):
                    c[r, j - n0] = np.int32(
                        c[r, j - n0] - zb[j] * rs - zar * colsum[j] + K * zar * zb[j]
                    )
        ep_tile(c, _0, rows, n1 - n0, out, r0 * N + n0, N, _1, n0, _0, _1, _0, N,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


@jit()
def _pack_panels(b, bx, kn, nr, kg, bpack, colsum):
    """b (uint8 [K, N], stored bytes) as the engine's B operand: the int8
    `B[k, n] = b[k, n] ^ bx` (bx = b's flip ^ 0x80: b_u - 128) in the panel
    layout of `packing.py`, flat in `bpack` (uint8 [panels * kg * nr * 4]):
    "k4n" (kn == 0), the four k of a group of column n as one little-endian
    word `4 * n` bytes into the panel's group; "kn" (kn != 0, portable), k's
    row of the group at `(k % 4) * nr`. Bytes outside B are left alone (the
    caller's zeros). colsum[n] = sum_k B[k, n]."""
    K, N = b.shape
    panels = (N + nr - 1) // nr
    colsum[:] = 0
    if kn != 0:
        for k in range(K):
            src = b[k]
            row = (k >> 2) * nr * 4 + (k & 3) * nr
            for p in range(panels):
                n0 = p * nr
                dst = p * kg * nr * 4 + row
                for q in range(min(nr, N - n0)):
                    x = np.int64(src[U(n0 + q)]) ^ bx
                    bpack[U(dst + q)] = x
                    colsum[U(n0 + q)] += x - ((x & 128) << 1)
        return
    words = bpack.view(np.uint32)
    for g in range(kg):
        k0 = 4 * g
        if k0 + 4 <= K:
            s0, s1, s2, s3 = b[k0], b[k0 + 1], b[k0 + 2], b[k0 + 3]
            for p in range(panels):
                n0 = p * nr
                dst = (p * kg + g) * nr
                for q in range(min(nr, N - n0)):
                    i = U(n0 + q)
                    x0, x1 = np.int64(s0[i]) ^ bx, np.int64(s1[i]) ^ bx
                    x2, x3 = np.int64(s2[i]) ^ bx, np.int64(s3[i]) ^ bx
                    words[U(dst + q)] = np.uint32(x0 | (x1 << 8) | (x2 << 16) | (x3 << 24))
                    high = (x0 & 128) + (x1 & 128) + (x2 & 128) + (x3 & 128)
                    colsum[i] += x0 + x1 + x2 + x3 - (high << 1)
        else:  # the last, partial group: its bytes past K stay zero
            for p in range(panels):
                n0 = p * nr
                dst = (p * kg + g) * nr
                for q in range(min(nr, N - n0)):
                    w = np.int64(0)
                    for k in range(k0, K):
                        x = np.int64(b[k, n0 + q]) ^ bx
                        w |= x << (8 * (k - k0))
                        colsum[n0 + q] += x - ((x & 128) << 1)
                    words[U(dst + q)] = np.uint32(w)


@jit()
def matmul_gemm_requant(t0, t1, a2, flip, in_place, tile, splits, fptrs, rq_fptrs, data, init, gp,
                        out, chan_f, sc_i, sc_f, other, table):  # fmt: skip
    """`matmul_gemm` whose microkernels store the output bytes themselves
    (`_gemm.gemm_requant_rows`, as `conv_nhwc.conv_gemm_nhwc_requant`): no
    int32 tile written and read back, no epilogue loop. For a per-tensor a
    zero point (folded into the bias, where the sums start: `init`) and no
    b zero point term; A's rows are read in place (`in_place`: K % 4 == 0;
    signed bytes are flipped by the kernels `fptrs`, `rq_fptrs`), else
    copied flipped into a tile."""
    R, K = a2.shape
    N = chan_f.shape[1]
    K4, nr = gp[G_K4], gp[G_NR]
    span = column_span(N, nr, splits)
    a = np.zeros((0 if in_place else tile, K4), np.uint8)  # columns K..K4 stay zero
    c = np.empty((tile, min(span, N)), np.int32)  # a split's sums between K blocks
    ep = requant_args(chan_f, sc_i, sc_f)
    # arguments typed as conv_nhwc's (no literals): one gemm_requant_rows compile
    no_segments = np.int64(0)
    for t in range(t0, t1):
        r0 = (t // splits) * tile
        n0 = (t % splits) * span
        n1 = min(N, n0 + span)
        if n0 >= n1:
            continue
        rows = min(tile, R - r0)
        if in_place:
            a_ptr, lda = a2[r0 : r0 + rows].ctypes.data, K
        else:
            for r in range(rows):
                for k in range(K):
                    a[U(r), U(k)] = a2[U(r0 + r), U(k)] ^ flip
            a_ptr, lda = a.ctypes.data, K4
        o = r0 * N
        gemm_requant_rows(a_ptr, lda, rows, fptrs, rq_fptrs, data, init, gp, c, n0, n1, ep,
                          out.ctypes.data + o, other.ctypes.data + o, N, table,
                          no_segments)  # fmt: skip


@jit()
def matmul_batched_gemm(t0, t1, a3, b3, order, ia, ib, tile, a_flip, bx, za, zb, need_rowsum, kn,
                        fptrs, gp, out, chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """Tasks t0..t1 of the broadcast batch product through the GEMM engine:
    task t is row tile t % tiles (`tile` rows) of batch `bi = order[t //
    tiles]`, i.e. of a3[ia[bi]] @ b3[ib[bi]]. a3, b3: stored bytes (uint8),
    `a_u = a ^ a_flip`, `B = b ^ bx` (int8); za: za' per row (size M) or
    per tensor (size 1); zb: zb' per column (size N). See the module doc."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    M, K = a3.shape[1], a3.shape[2]
    N = b3.shape[2]
    nr, kg = gp[G_NR], gp[G_KG]
    tiles = (M + tile - 1) // tile
    panels = (N + nr - 1) // nr
    bpack = np.zeros(panels * kg * nr * 4, np.uint8)  # k past K, n past N stay zero
    init = np.zeros(panels * nr, np.int32)
    colsum = np.empty(N, np.int64)
    a = np.zeros((tile, kg * 4), np.uint8)  # columns K..K4 stay zero
    rowsum = np.zeros(tile, np.int64)
    c = np.empty((tile, N), np.int32)
    per_row = za.size > 1
    current = -1
    for t in range(t0, t1):
        bi = order[t // tiles]
        r0 = (t % tiles) * tile
        rows = min(tile, M - r0)
        bj = ib[bi]
        if bj != current:
            _pack_panels(b3[bj], bx, kn, nr, kg, bpack, colsum)
            if not per_row:
                z = za[0]
                for j in range(N):
                    init[j] = np.int32(K * z * zb[j] - z * colsum[j])
            current = bj
        ai = ia[bi]
        for r in range(rows):
            src, dst = a3[ai, r0 + r], a[r]
            s = np.int64(0)
            for k in range(K):
                v = np.int64(src[U(k)]) ^ a_flip
                dst[U(k)] = v
                s += v
            rowsum[r] = s
        if kg > 0:
            gemm_columns(a, rows, c, 0, N, fptrs, bpack, init, gp)
        else:
            c[:rows, :] = 0
        if per_row:
            for r in range(rows):
                z, rs, cr = za[r0 + r], rowsum[r], c[r]
                for j in range(N):
                    i = U(j)
                    cr[i] = np.int32(cr[i] - zb[i] * rs - z * colsum[i] + K * z * zb[i])
        elif need_rowsum:
            for r in range(rows):
                rs, cr = rowsum[r], c[r]
                for j in range(N):
                    cr[U(j)] = np.int32(cr[U(j)] - zb[U(j)] * rs)
        ep_tile(c, _0, rows, N, out, (bi * M + r0) * N, N, _1, _0, _0, _1, _0, N,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


@jit()
def matmul_batched(
    t0, t1, a3, b3, ia, ib, codes, za, zb, out, chan_i, chan_f, sc_i, sc_f, table, other
):
    """Rows t0..t1 of the broadcast batch product: row t is row t % M of
    a3[ia[t // M]] @ b3[ib[t // M]]; codes = (a_flip, a_off, b_flip, b_off);
    za per row (size M or 1), zb per column (size N or 1). Exact int64 sums
    of `(a - za) * b`, minus `zb * sum(a - za)`."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    M, K = a3.shape[1], a3.shape[2]
    N = b3.shape[2]
    a_flip, a_off, b_flip, b_off = codes[0], codes[1], codes[2], codes[3]
    bs = np.empty((K, N), np.int64)
    current = -1
    acc = np.empty(N, np.int64)
    tile = np.empty((1, N), np.int32)
    for t in range(t0, t1):
        bi = t // M
        i = t - bi * M
        ai = ia[bi]
        bj = ib[bi]
        if bj != current:
            for k in range(K):
                for j in range(N):
                    bs[k, j] = (np.int64(b3[bj, k, j]) ^ b_flip) - b_off
            current = bj
        zar = za[i % za.size]
        for j in range(N):
            acc[j] = 0
        s = np.int64(0)
        for k in range(K):
            av = ((np.int64(a3[ai, i, k]) ^ a_flip) - a_off) - zar
            s += av
            for j in range(N):
                acc[j] += av * bs[k, j]
        for j in range(N):
            tile[0, j] = np.int32(acc[j] - zb[j % zb.size] * s)
        ep_tile(tile, _0, _1, N, out, t * N, N, _1, _0, _0, _1, _0, N,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


# ---- lowering ------------------------------------------------------------------------


def _vector_zero_points(zp, size: int, axis: int, what: str) -> np.ndarray:
    """A zero point as one value, or one value per index of `axis` (-1: a's
    rows, given as [M] or [M, 1]; -2: b's columns, given as [N] or [1, N])."""
    if zp is None:
        return np.zeros(1, np.int64)
    zp = np.asarray(zp).astype(np.int64)
    if zp.size == 1:
        return zp.reshape(1)
    if zp.size == size and (zp.ndim == 1 or zp.shape[axis] == 1):
        return zp.reshape(-1)
    raise Decline(f"{what} zero point of shape {zp.shape}")


def _row_zero_points(zp, m_dim) -> np.ndarray:
    return _vector_zero_points(zp, m_dim, -1, "a")


def _col_zero_points(zp, n_dim) -> np.ndarray:
    return _vector_zero_points(zp, n_dim, -2, "b")


def lower_qmatmul(node: Node, ctx: LowerContext) -> Kernel:
    a, b = node.inputs[0], node.inputs[1]
    a_zp_const = const_input(node, 2, "a zero point")
    b_zp_const = const_input(node, 3, "b zero point")
    a_shape, b_shape = a.type.shape, b.type.shape
    if a_shape is None or b_shape is None:
        raise Decline("operands of unknown rank")
    m_dim = 1 if len(a_shape) == 1 else a_shape[-2]
    n_dim = 1 if len(b_shape) == 1 else b_shape[-1]
    if not isinstance(n_dim, int):
        raise Decline("b has a symbolic column count")
    out_value = node.outputs[0]
    out_rank = out_value.type.rank
    channel_axis = out_rank - 1 if len(b_shape) > 1 else None
    channels = n_dim if channel_axis is not None else 1
    chain = ctx.chain_after(node)
    a_dt, b_dt = a.type.dtype, b.type.dtype
    zb = _col_zero_points(b_zp_const, n_dim)
    if not isinstance(m_dim, int) and np.asarray(a_zp_const).size > 1:
        raise Decline("per-row a zero point with a symbolic row count")
    za = _row_zero_points(a_zp_const, m_dim)

    if (
        b.is_constant
        and b.const.ndim == 2
        and a_dt.bits == 8
        and b_dt.bits == 8
        and len(a_shape) >= 2
    ):
        a_flip, a_off = byte_codes(a_dt)
        if b_dt == dtypes.uint8:
            bb, zb_s = (b.const.astype(np.int16) - 128).astype(np.int8), zb - 128
        else:
            bb, zb_s = b.const.astype(np.int8), zb
        k = bb.shape[0]
        zb_cols = kernel_array(np.broadcast_to(zb_s, (n_dim,)), np.int64)
        za_s = za + a_off
        colsum = bb.astype(np.int64).sum(axis=0)
        base_bias = np.zeros(n_dim, np.int64)
        if za_s.size == 1:  # per-tensor: the za terms are constant per column
            base_bias = -int(za_s[0]) * colsum + k * int(za_s[0]) * zb_cols
            za_s = np.zeros(1, np.int64)
        ep = build_epilogue(
            chain, out_value, channels, channel_axis, base_bias, constant_other=True,
            final_table=True,
        )  # fmt: skip
        rows_hint = int(math.prod([d for d in a_shape[:-1] if isinstance(d, int)] or [1]))
        plan = plan_gemm(bb, max(rows_hint, 1))
        need_rowsum = bool(np.any(zb_cols != 0))
        za_period = za_s.size
        # the requantizing microkernels, where nothing per row comes between
        # the GEMM and the epilogue (a per-tensor za is in the bias already)
        requant = requant_kind(plan, ep, need_rowsum) if za_period == 1 else ""
        if ep.final_table and not requant:  # only their table stage takes a lookup after a qadd
            ep = build_epilogue(
                chain, out_value, channels, channel_axis, base_bias, constant_other=True
            )
        # A's rows in place where they are whole groups of 4 bytes: signed
        # ones through the kernels that flip them (ukernels SIGNED_DOC)
        in_place = k % 4 == 0
        a_signed = bool(requant) and in_place and a_flip != 0
        if requant:
            rq_init = plan.init_with(ep.chan_i[0])  # their sums start at the bias
            fptrs = plan.kernels(a_signed=a_signed)
            rq_fptrs = plan.kernels(requant, a_signed=a_signed)

        def run(a_array, other=None):
            rows = int(math.prod(a_array.shape[:-1]))
            a2 = unsigned_view(a_array).reshape(rows, k)
            out_shape = (*a_array.shape[:-1], n_dim)
            out, flat = output_buffer(out_shape, ep.out_dtype)
            tile = _tile_rows(rows, plan, ctx.num_threads)
            plan.ensure_rows(tile, requant, a_signed=a_signed)
            plan.ensure_rows(rows % tile or tile, requant, a_signed=a_signed)
            sc_i, sc_f = ep.scalars(out_shape, None if other is None else other.shape)
            splits = _column_splits(-(-rows // tile), plan, ctx.num_threads)
            if requant:
                run_tasks(
                    matmul_gemm_requant, -(-rows // tile) * splits, rows * k * n_dim,
                    ctx.num_threads, a2, a_flip, in_place, tile, splits, fptrs, rq_fptrs,
                    plan.data, rq_init, plan.gparams, flat, ep.chan_f, sc_i, sc_f,
                    ep.other_bytes(other, out_shape), ep.byte_table,
                )  # fmt: skip
                return [out]
            run_tasks(
                matmul_gemm, -(-rows // tile) * splits, rows * k * n_dim, ctx.num_threads, a2,
                a_flip, tile, splits, za_s, za_period, zb_cols, need_rowsum, colsum, plan.fptrs,
                plan.data, plan.init, plan.gparams, flat, ep.chan_i, ep.chan_f, sc_i, sc_f,
                ep.table, ep.other_bytes(other, out_shape),
            )  # fmt: skip
            return [out]

        name = f"matmul_gemm[{a_dt}x{b_dt} K={k} N={n_dim}]"
        if requant:
            name += f"(microkernels requantize: {requant})"
        inputs = [a]
    else:
        if a_dt.bits > 16 or b_dt.bits > 16:
            raise Decline(f"operands of {a_dt} and {b_dt}")
        engine = a_dt.bits == 8 and b_dt.bits == 8
        a_flip, a_off = byte_codes(a_dt)
        b_flip, b_off = byte_codes(b_dt)
        ep = build_epilogue(chain, out_value, channels, channel_axis, constant_other=True)
        if engine:  # za' = za + 128 for signed a, zb' = zb - 128 for unsigned b
            bx = b_flip ^ 0x80
            za_k = kernel_array(za + a_off, np.int64)
            zb_k = kernel_array(np.broadcast_to(zb + b_off - 128, (n_dim,)), np.int64)
            need_rowsum = bool(np.any(zb_k != 0))
        else:
            codes = np.array([a_flip, a_off, b_flip, b_off], np.int64)
            za_k = kernel_array(za, np.int64)
            zb_k = kernel_array(zb, np.int64)
        a_rank, b_rank = len(a_shape), len(b_shape)
        b_fixed = None
        if b.is_constant:  # one array, the same on every call
            bc = b.const.reshape(*b.const.shape, 1) if b_rank == 1 else b.const
            b3_const = unsigned_view(kernel_array(bc)).reshape(_flat_batch(bc.shape))
            b_fixed = (bc.shape, b3_const)
        launches = {}

        def run(*arrays):
            arrays = list(arrays)
            a_array = arrays.pop(0)
            other = arrays.pop(-1) if ep.other is not None else None
            a3 = a_array.reshape(1, *a_array.shape) if a_rank == 1 else a_array
            if b_fixed is None:
                b_array = arrays.pop(0)
                b3 = b_array.reshape(*b_array.shape, 1) if b_rank == 1 else b_array
                b_shape3 = b3.shape
            else:
                b_shape3 = b_fixed[0]
            key = (a3.shape, b_shape3, None if other is None else other.shape)
            launch = launches.get(key)
            if launch is None:
                launch = launches[key] = _batched_launch(
                    *key, a_rank, b_rank, engine, ep, za_k.size, ctx.num_threads
                )
            a3 = unsigned_view(a3).reshape(launch.a3_shape)
            b3 = b_fixed[1] if b_fixed is not None else unsigned_view(b3).reshape(launch.b3_shape)
            out, flat = output_buffer(launch.out_shape, ep.out_dtype)
            ob = ep.other_bytes(other, launch.out_shape)
            sc_i, sc_f = launch.scalars
            if launch.tasks and engine:
                run_tasks(
                    matmul_batched_gemm, launch.tasks, launch.work, ctx.num_threads, a3, b3,
                    launch.order, launch.ia, launch.ib, launch.tile, a_flip, bx, za_k, zb_k,
                    need_rowsum, launch.kn, launch.fptrs, launch.gp, flat, ep.chan_i, ep.chan_f,
                    sc_i, sc_f, ep.table, ob,
                )  # fmt: skip
            elif launch.tasks:
                run_tasks(
                    matmul_batched, launch.tasks, launch.work, ctx.num_threads, a3, b3, launch.ia,
                    launch.ib, codes, za_k, zb_k, flat, ep.chan_i, ep.chan_f, sc_i, sc_f,
                    ep.table, ob,
                )  # fmt: skip
            return [out]

        kind = "matmul_batched_gemm" if engine else "matmul_batched"
        name = f"{kind}[{a_dt}x{b_dt}]"
        inputs = [a] + ([] if b.is_constant else [b])

    nodes = [node, *ep.nodes]
    inputs = inputs + ([ep.other] if ep.other is not None else [])
    label = f"{name}+{ep.describe()}" if ep.nodes else name
    return Kernel(label, run, inputs, nodes[-1].outputs, nodes)


class _Launch(NamedTuple):
    """What a batched product's run derives from its operands' shapes (once
    per shape: the arrays are then the same objects on every call)."""

    out_shape: tuple
    a3_shape: tuple  # [batches of a, M, K]
    b3_shape: tuple  # [batches of b, K, N]
    scalars: tuple  # the epilogue's (sc_i, sc_f)
    tasks: int
    work: int
    ia: np.ndarray  # a's batch of each batch of the result
    ib: np.ndarray  # b's batch
    # the engine's (matmul_batched_gemm):
    order: np.ndarray | None = None  # the batches, those sharing a b together
    tile: int = 0  # rows per task
    kn: int = 0  # 1: the portable "kn" panel layout
    fptrs: np.ndarray | None = None
    gp: np.ndarray | None = None  # the _gemm G_* slots


def _batched_launch(a_shape, b_shape, other_shape, a_rank, b_rank, engine, ep, za_size,
                    threads) -> _Launch:  # fmt: skip
    """The launch of a batched product of a [..., M, K] and b [..., K, N]
    (1-D operands already promoted: `a_rank`, `b_rank` are the originals')."""
    batch = np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    size = int(math.prod(batch))
    m, k = a_shape[-2:]
    n = b_shape[-1]
    if za_size > 1 and za_size != m:
        raise ValueError(f"{za_size} a zero points for {m} rows")
    out_shape = (*batch, m, n)
    if b_rank == 1:
        out_shape = out_shape[:-1]
    if a_rank == 1:
        out_shape = out_shape[:-2] + out_shape[-1:] if b_rank > 1 else out_shape[:-1]
    scalars = ep.scalars(out_shape, other_shape)
    ia, ib = (
        kernel_array(
            np.broadcast_to(np.arange(math.prod(s[:-2]), dtype=np.int64).reshape(s[:-2]), batch)
        ).reshape(-1)
        for s in (a_shape, b_shape)
    )
    work = size * m * k * n
    shapes = (out_shape, _flat_batch(a_shape), _flat_batch(b_shape), scalars)
    if not engine:
        return _Launch(*shapes, size * m, work, ia, ib)
    config = gemm.default_config(max(m, 1), max(n, 1), max(k, 1), threads=1)
    mr, nr = config.mr, config.nr
    tile = _batched_tile(m, size, mr, config.mc, threads)
    tiles = _ceil_div(m, tile)
    order = kernel_array(np.argsort(ib, kind="stable"), np.int64)
    kg = _ceil_div(k, 4)
    if config.isa == "portable":
        fptrs, desc, kn = gemm.portable_fptrs(mr), nr << 16, 1
    else:  # b is not known until run time: the "exact" kernels on AVX2 (see _gemm)
        table = gemm.kernel_table(UkernelSpec(config.isa, mr, nr, False, "exact"))
        for rows in {tile, m - (tiles - 1) * tile}:
            if rows > 0:
                table.ensure_for(rows)
        fptrs, desc, kn = table.fptrs, 0, 0
    gp = np.zeros(G_SLOTS, np.int64)  # the engine's slots (G_VBMI unused: no table stage)
    gp[G_DESC], gp[G_K4], gp[G_KG], gp[G_NR], gp[G_MR] = desc, 4 * kg, kg, nr, mr
    gp[G_KCG], gp[G_PANEL_BYTES], gp[G_NC] = config.kc // 4, kg * nr * 4, _round_up(n, nr)
    return _Launch(*shapes, size * tiles, work, ia, ib, order, tile, kn, fptrs, gp)


def _flat_batch(shape) -> tuple:
    """[..., R, C] as [batches, R, C]."""
    return (math.prod(shape[:-2]), *shape[-2:])


def _batched_tile(m: int, batches: int, mr: int, mc: int, threads: int) -> int:
    """Rows per task of a batched product: the engine's cache-sized MC, cut
    (when threads share the tasks) until the (batch, row tile) tasks split
    evenly over the threads or are many (a thread packs each b it meets)."""
    tile = min(mc, _round_up(max(m, 1), mr))
    if threads > 1:
        tiles, most = _ceil_div(m, tile), _ceil_div(m, mr)
        while tiles < most and (batches * tiles) % threads and batches * tiles < 4 * threads:
            tiles += 1
        tile = _round_up(_ceil_div(m, tiles), mr)
    return max(tile, 1)


def _tile_rows(rows: int, plan, threads: int) -> int:
    """Rows per GEMM tile: the engine's cache-sized MC, cut so that every
    thread gets a tile when there are few rows."""
    mr = plan.mr
    tile = min(plan.config.mc, max(mr, _round_up(rows, mr)))
    if _ceil_div(rows, tile) < threads and rows > mr:
        tile = max(mr, _round_up(_ceil_div(rows, threads), mr))
    return tile


def _column_splits(row_tiles: int, plan, threads: int) -> int:
    """Column ranges per row tile: 1, or one per thread when there are fewer
    row tiles than threads and enough NR panels (a batch-1 classifier: one
    row, whose weights each thread then streams only a share of)."""
    panels = _ceil_div(plan.n, plan.config.nr)
    if row_tiles >= threads or panels < threads:
        return 1
    return threads


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b
