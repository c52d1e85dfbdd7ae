"""qmatmul: integer matrix products, with the epilogue fused.

- `matmul_gemm`: the second operand is a constant 2-D 8-bit matrix (a Gemm /
  linear layer): packed once, every row of the first operand (all leading
  dims flattened) goes through the GEMM engine a tile at a time, then the
  epilogue. Zero points are folded as in `conv`:

      sum_k (a - za_r)(b - zb_j)
          = sum_k a*b - zb_j * sum_k a - za_r * sum_k b + K * za_r * zb_j

  (`a` stored bytes, signed codes + 128; `b` int8, uint8 weights - 128); a
  per-tensor za makes the last two terms one constant per column.
- `matmul_batched`: anything else (both operands at run time, batched and
  broadcast, up to 16 bits): per (batch, row), `acc_j += (a - za) * b`, then
  `- zb_j * sum_k (a - za)`, exact int64 sums.

Operands follow `numpy.matmul` (1-D operands promoted, batch dims
broadcast); `a_zero_point` is per-tensor or one per row of a, `b_zero_point`
per-tensor or one per column of b.
"""

from __future__ import annotations

import math

import numpy as np

from ....ir import dtypes
from ....ir.graph import Node
from ._gemm import G_K4, G_NR, column_span, gemm_columns, plan_gemm
from ._lowering import Decline, Kernel, LowerContext, const_input
from ._numba import jit
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
        ep = build_epilogue(chain, out_value, channels, channel_axis, base_bias)
        rows_hint = int(math.prod([d for d in a_shape[:-1] if isinstance(d, int)] or [1]))
        plan = plan_gemm(bb, max(rows_hint, 1))
        need_rowsum = bool(np.any(zb_cols != 0))
        za_period = za_s.size

        def run(a_array, other=None):
            rows = int(math.prod(a_array.shape[:-1]))
            a2 = unsigned_view(a_array).reshape(rows, k)
            out_shape = (*a_array.shape[:-1], n_dim)
            out, flat = output_buffer(out_shape, ep.out_dtype)
            tile = _tile_rows(rows, plan, ctx.num_threads)
            plan.ensure_rows(tile)
            plan.ensure_rows(rows % tile or tile)
            sc_i, sc_f = ep.scalars(out_shape, None if other is None else other.shape)
            splits = _column_splits(-(-rows // tile), plan, ctx.num_threads)
            run_tasks(
                matmul_gemm, -(-rows // tile) * splits, rows * k * n_dim, ctx.num_threads, a2,
                a_flip, tile, splits, za_s, za_period, zb_cols, need_rowsum, colsum, plan.fptrs,
                plan.data, plan.init, plan.gparams, flat, ep.chan_i, ep.chan_f, sc_i, sc_f,
                ep.table, ep.other_bytes(other, out_shape),
            )  # fmt: skip
            return [out]

        name = f"matmul_gemm[{a_dt}x{b_dt} K={k} N={n_dim}]"
        inputs = [a]
    else:
        if a_dt.bits > 16 or b_dt.bits > 16:
            raise Decline(f"operands of {a_dt} and {b_dt}")
        a_flip, a_off = byte_codes(a_dt)
        b_flip, b_off = byte_codes(b_dt)
        codes = np.array([a_flip, a_off, b_flip, b_off], np.int64)
        ep = build_epilogue(chain, out_value, channels, channel_axis)
        zb_cols = np.ascontiguousarray(zb, dtype=np.int64)
        za_rows = np.ascontiguousarray(za, dtype=np.int64)
        a_rank, b_rank = len(a_shape), len(b_shape)
        b_const = b.const if b.is_constant else None

        def run(*arrays):
            arrays = list(arrays)
            a_array = arrays.pop(0)
            b_array = b_const if b_const is not None else arrays.pop(0)
            other = arrays.pop(0) if arrays else None
            a3 = a_array.reshape(1, *a_array.shape) if a_rank == 1 else a_array
            b3 = b_array.reshape(*b_array.shape, 1) if b_rank == 1 else b_array
            batch = np.broadcast_shapes(a3.shape[:-2], b3.shape[:-2])
            size = int(math.prod(batch))
            ia = np.broadcast_to(
                np.arange(int(math.prod(a3.shape[:-2])), dtype=np.int64).reshape(a3.shape[:-2]),
                batch,
            ).reshape(-1)
            ib = np.broadcast_to(
                np.arange(int(math.prod(b3.shape[:-2])), dtype=np.int64).reshape(b3.shape[:-2]),
                batch,
            ).reshape(-1)
            m_, k_ = a3.shape[-2:]
            n_ = b3.shape[-1]
            a3 = unsigned_view(a3).reshape(-1, m_, k_)
            b3 = unsigned_view(b3).reshape(-1, k_, n_)
            full = (*batch, m_, n_)
            out_shape = full
            if b_rank == 1:
                out_shape = out_shape[:-1]
            if a_rank == 1:
                out_shape = out_shape[:-2] + out_shape[-1:] if b_rank > 1 else out_shape[:-1]
            out, flat = output_buffer(out_shape, ep.out_dtype)
            sc_i, sc_f = ep.scalars(out_shape, None if other is None else other.shape)
            if size:
                run_tasks(
                    matmul_batched, size * m_, size * m_ * k_ * n_, ctx.num_threads, a3, b3,
                    kernel_array(ia), kernel_array(ib), codes, za_rows, zb_cols, flat, ep.chan_i,
                    ep.chan_f, sc_i, sc_f, ep.table, ep.other_bytes(other, out_shape),
                )  # fmt: skip
            return [out]

        name = f"matmul_batched[{a_dt}x{b_dt}]"
        inputs = [a] + ([] if b.is_constant else [b])

    nodes = [node, *ep.nodes]
    inputs = inputs + ([ep.other] if ep.other is not None else [])
    label = f"{name}+{ep.describe()}" if ep.nodes else name
    return Kernel(label, run, inputs, nodes[-1].outputs, nodes)


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
