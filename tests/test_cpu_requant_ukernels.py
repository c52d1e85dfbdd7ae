"""The requantizing GEMM microkernels (ukernels REQUANT_DOC) store the same
bytes as the Numba epilogue they replace (`requant.ep_tile`'s fast path,
which the model tests check against the reference interpreter).

Each case runs one row block of a GEMM both ways: the engine's driver plus
`ep_tile`, and `_gemm.gemm_requant_rows`. The shapes cross the kernels'
edges: a column count that leaves a partial vector (the masked loads and
stores), a row count that leaves a partial row tile, and a K of several KC
blocks (the last one requantizes, on top of the sums stored by the others).
The values reach the edges of the formulas: biases that wrap int32,
multipliers that clamp, both qadd operand orders (they round differently),
and qadd ratios so large that the sum leaves int32 (-> the low bound)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from qnnjit.backends.cpu import drivers, features
from qnnjit.backends.cpu.kernels import requant as rq
from qnnjit.backends.cpu.kernels._gemm import (
    G_DESC,
    G_KCG,
    G_KG,
    G_MR,
    G_NC,
    G_NR,
    G_PANEL_BYTES,
    gemm_requant_rows,
    plan_gemm,
)
from qnnjit.backends.cpu.kernels.conv_nhwc import _requant_args

SIMD = [
    pytest.param(
        isa,
        marks=pytest.mark.skipif(
            isa not in features.runnable_isas(), reason=f"host cannot run {isa}"
        ),
    )
    for isa in ("avx512_vnni", "avx2")
]
ROWS, N, K = 13, 37, 900  # N % 16 and N % 8 != 0


def _epilogue(rng, post: str, signed_out: bool):
    """chan_i, chan_f, sc_i, sc_f of a float requantize to 8 bits [+ qadd]."""
    qmin, qmax = (-128, 127) if signed_out else (0, 255)
    zp = rng.integers(qmin, qmax + 1, N)
    chan_i = np.zeros((4, N), np.int64)
    chan_i[0] = rng.integers(-(2**31), 2**31, N)  # acc + bias wraps for some
    chan_i[3] = zp
    chan_f = np.zeros((4, N), np.float32)
    chan_f[rq.FM_MULT] = rng.uniform(1e-9, 1e-6, N)  # some in range, some clamp
    chan_f[rq.FM_LO], chan_f[rq.FM_HI], chan_f[rq.FM_ZP] = qmin - zp, qmax - zp, zp
    sc_i = np.zeros(16, np.int64)
    sc_i[rq.I_ROUND], sc_i[rq.I_FAST] = rq.R_FLOAT, 1
    sc_i[rq.I_LO], sc_i[rq.I_HI], sc_i[rq.I_YQMIN] = qmin, qmax, qmin
    sc_f = np.zeros(8, np.float32)
    if post != "plain":
        sc_i[rq.I_POST] = rq.P_QADD
        sc_i[rq.I_YFIRST] = int(post != "qadd_other_first")
        sc_i[rq.I_OFLIP], sc_i[rq.I_OOFF] = (0x80, 128) if signed_out else (0, 0)
        sc_i[rq.I_PLO], sc_i[rq.I_PHI] = qmin, qmax
        ratio = 1e12 if post == "qadd_overflow" else 0.73
        sc_f[rq.F_RY], sc_f[rq.F_RO] = np.float32(ratio), np.float32(1.37)
        sc_f[rq.F_FIXED] = np.float32(-0.5 * qmin + 0.25)
    return chan_i, chan_f, sc_i, sc_f


@pytest.mark.parametrize("isa", SIMD)
@pytest.mark.parametrize("post", ["plain", "qadd", "qadd_other_first", "qadd_overflow"])
@pytest.mark.parametrize("signed_out", [False, True])
def test_requantizing_microkernels_store_the_epilogues_bytes(isa, post, signed_out, monkeypatch):
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    rng = np.random.default_rng(zlib.crc32(f"{isa} {post} {signed_out}".encode()))  # fixed per case
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    plan = plan_gemm([b], ROWS)
    kind = "plain" if post == "plain" else "qadd"
    plan.ensure_rows(ROWS, kind)
    gp = plan.gparams.copy()
    gp[G_KCG] = 64  # KC = 256: four K blocks, the last one partial
    a = np.zeros((ROWS, plan.k4), np.uint8)
    a[:, :K] = rng.integers(0, 256, (ROWS, K))
    other = rng.integers(0, 256, ROWS * N).astype(np.uint8)
    chan_i, chan_f, sc_i, sc_f = _epilogue(rng, post, signed_out)

    c = np.zeros((ROWS, N), np.int32)
    drivers.run_serial(
        plan.fptrs, a.ctypes.data, plan.k4, ROWS, gp[G_KG], plan.data.ctypes.data,
        gp[G_PANEL_BYTES], gp[G_NR], c.ctypes.data, N, N, plan.init.ctypes.data, gp[G_MR],
        gp[G_KCG], -(-ROWS // gp[G_MR]) * gp[G_MR], gp[G_NC], gp[G_DESC],
    )  # fmt: skip
    want = np.zeros(ROWS * N, np.uint8)
    z = np.int64(0)
    rq.ep_tile(c, z, ROWS, N, want, z, N, 1, z, z, 1, z, N, chan_i, chan_f, sc_i, sc_f,
               np.zeros(0, np.int64), other)  # fmt: skip

    got = np.zeros(ROWS * N, np.uint8)
    scratch = np.zeros((ROWS, N), np.int32)
    ep = _requant_args(chan_i, chan_f, sc_i, sc_f)
    gemm_requant_rows(
        a.ctypes.data, plan.k4, ROWS, plan.fptrs, plan.requant_fptrs(kind), plan.data,
        plan.init, gp, scratch, N, ep, got.ctypes.data, other.ctypes.data, N,
    )  # fmt: skip
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]
    if post == "qadd_overflow":  # the case must reach the out-of-range branch
        assert np.count_nonzero(want == np.uint8(sc_i[rq.I_PLO] & 0xFF)) > N
