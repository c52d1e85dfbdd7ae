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
and qadd ratios so large that the sum leaves int32 (-> the low bound), and
qadd output bounds narrowed by a clamp (signed ones below and above 0),
which only the kernels that clamp take: the zmm ones saturate instead, and
`requant_kind` gives them whole-range bounds only."""

from __future__ import annotations

import functools
import zlib

import numba
import numpy as np
import pytest

from qnnjit.backends.cpu import drivers, features, gemm
from qnnjit.backends.cpu.kernels import requant as rq
from qnnjit.backends.cpu.kernels._bytetable import byte_table, lookup_bytes, vbmi_lookups
from qnnjit.backends.cpu.kernels._gemm import (
    G_DESC,
    G_KCG,
    G_KG,
    G_MR,
    G_NC,
    G_NR,
    G_PANEL_BYTES,
    G_VBMI,
    GemmPlan,
    gemm_requant_rows,
    packs_exactly,
    plan_gemm,
    requant_args,
    requant_kind,
    row_block,
    row_block_sizes,
    row_blocks,
)
from qnnjit.backends.cpu.ukernels import UkernelSpec
from qnnjit.ir import dtypes

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


def _epilogue(rng, post: str, signed_out: bool, n: int = N, clamp: str = "none", big=0.0):
    """chan_i, chan_f, sc_i, sc_f of a float requantize to 8 bits [+ qadd]
    [narrowed by a clamp: "low" (a ReLU's) or "both" bounds]; `big`: multipliers
    log-uniform from 1e-10 up to it, so some sums land in range and some far
    past it."""
    qmin, qmax = (-128, 127) if signed_out else (0, 255)
    zp = rng.integers(qmin, qmax + 1, n)
    chan_i = np.zeros((4, n), np.int64)
    chan_i[0] = rng.integers(-(2**31), 2**31, n)  # acc + bias wraps for some
    chan_i[3] = zp
    chan_f = np.zeros((4, n), np.float32)
    if big:
        chan_f[rq.FM_MULT] = np.exp(rng.uniform(np.log(1e-10), np.log(big), n))
    else:
        chan_f[rq.FM_MULT] = rng.uniform(1e-9, 1e-6, n)  # some in range, some clamp
    lo, hi = {"none": (qmin, qmax), "low": (0, qmax), "both": (qmin + 7, qmax - 20)}[clamp]
    lo = lo + 3 if clamp == "low" and not signed_out else lo
    chan_f[rq.FM_LO], chan_f[rq.FM_HI], chan_f[rq.FM_ZP] = lo - zp, hi - zp, zp
    sc_i = np.zeros(16, np.int64)
    sc_i[rq.I_ROUND], sc_i[rq.I_FAST] = rq.R_FLOAT, 1
    sc_i[rq.I_LO], sc_i[rq.I_HI], sc_i[rq.I_YQMIN] = lo, hi, qmin
    sc_f = np.zeros(8, np.float32)
    if post != "plain":
        sc_i[rq.I_POST] = rq.P_QADD
        sc_i[rq.I_YFIRST] = int(post != "qadd_other_first")
        sc_i[rq.I_OFLIP], sc_i[rq.I_OOFF] = (0x80, 128) if signed_out else (0, 0)
        sc_i[rq.I_PLO], sc_i[rq.I_PHI] = {  # the add's output bounds, narrowed by a clamp
            "qadd_clamped": (qmin + 9, qmax - 17),  # signed: still negative, packed + 128
            "qadd_relu": (5, qmax),  # signed too: only codes >= 0, packed as they are
        }.get(post, (qmin, qmax))
        ratio = 1e12 if post == "qadd_overflow" else 0.73
        sc_f[rq.F_RY], sc_f[rq.F_RO] = np.float32(ratio), np.float32(1.37)
        sc_f[rq.F_FIXED] = np.float32(-0.5 * qmin + 0.25)
    return chan_i, chan_f, sc_i, sc_f


NARROWED = ["qadd_clamped", "qadd_relu"]  # qadd bounds inside the codes' range
POSTS = ["plain", "qadd", "qadd_other_first", "qadd_overflow"]


@pytest.mark.parametrize(
    "isa, post",
    [pytest.param(isa.values[0], post, marks=isa.marks) for isa in SIMD for post in POSTS]
    + [pytest.param("avx2", post, marks=SIMD[1].marks) for post in NARROWED],
)
@pytest.mark.parametrize("signed_out", [False, True])
def test_requantizing_microkernels_store_the_epilogues_bytes(isa, post, signed_out, monkeypatch):
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    rng = np.random.default_rng(zlib.crc32(f"{isa} {post} {signed_out}".encode()))  # fixed per case
    kind = "plain" if post == "plain" else "qadd_s8" if signed_out else "qadd"
    _check_requant_rows(rng, kind, N, _epilogue(rng, post, signed_out), post == "qadd_overflow")


@pytest.mark.skipif("avx512_vnni" not in features.runnable_isas(), reason="no AVX512-VNNI")
@pytest.mark.parametrize("post", POSTS + NARROWED)
@pytest.mark.parametrize("signed_out", [False, True])
def test_ymm_panels_store_the_epilogues_bytes(post, signed_out, monkeypatch):
    """AVX-512 panels of 24 columns compute in ymm vectors (`ukernels.tile_lanes`)
    and store through the 8-lane output stages: the same bytes, with a
    partial last panel (masked columns)."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx512_vnni")
    monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=24))
    rng = np.random.default_rng(zlib.crc32(f"ymm {post} {signed_out}".encode()))
    kind = "plain" if post == "plain" else "qadd_s8" if signed_out else "qadd"
    n = 2 * 24 + 5
    plan = plan_gemm(np.zeros((K, n), np.int8), ROWS)  # what `_check_requant_rows` runs
    assert plan.config.nr == 24 and UkernelSpec("avx512_vnni", 8, 24).lanes == 8
    epilogue = _epilogue(rng, post, signed_out, n)
    assert _kind_chosen(plan, epilogue, signed_out) == kind  # ymm ones clamp: any bounds
    _check_requant_rows(rng, kind, n, epilogue, post == "qadd_overflow")


@pytest.mark.skipif("avx512_vnni" not in features.runnable_isas(), reason="no AVX512-VNNI")
@pytest.mark.parametrize("post", ["qadd"] + NARROWED)
@pytest.mark.parametrize("signed_out", [False, True])
def test_zmm_qadd_kernels_take_whole_range_bounds_only(post, signed_out, monkeypatch):
    """The zmm qadd kernels clamp by the packs' saturation alone (REQUANT_DOC):
    `requant_kind` chooses them for bounds that are the codes' whole range
    and declines narrower ones (the Numba epilogue runs those)."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx512_vnni")
    rng = np.random.default_rng(zlib.crc32(f"zmm bounds {post} {signed_out}".encode()))
    plan = plan_gemm(np.zeros((K, N), np.int8), ROWS)
    assert plan.config.nr % 16 == 0
    want = "" if post in NARROWED else "qadd_s8" if signed_out else "qadd"
    assert _kind_chosen(plan, _epilogue(rng, post, signed_out), signed_out) == want


def _kind_chosen(plan, epilogue, signed_out) -> str:
    """`requant_kind` for a GEMM `plan` followed by `epilogue` (`_epilogue`)."""
    chan_i, chan_f, sc_i, sc_f = epilogue
    out = dtypes.int8 if signed_out else dtypes.uint8
    ep = rq.Epilogue(chan_i, chan_f, sc_i, sc_i, sc_f, sc_f, np.zeros(0, np.int64), out)
    return requant_kind(plan, ep, False)


@pytest.mark.skipif("avx512_vnni" not in features.runnable_isas(), reason="no AVX512-VNNI")
@pytest.mark.parametrize("nr", [16, 32, 48, 64])
@pytest.mark.parametrize("clamp", ["none", "low", "both"])
@pytest.mark.parametrize("signed_out", [False, True])
def test_packed_requantizing_microkernels_store_the_epilogues_bytes(nr, clamp, signed_out,
                                                                    monkeypatch):  # fmt: skip
    """The "packed" kernels saturate through int16 and bytes instead of
    clamping in float: sums far past the int16 range (multipliers up to
    1e-4 on sums up to 2^31), no clamp, a ReLU's, both bounds narrowed,
    signed codes (through the flipped byte range), every group width (1-4
    vectors of 16 columns, pinned by the panel width) with masked columns."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx512_vnni")
    monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=nr))
    rng = np.random.default_rng(zlib.crc32(f"packed {nr} {clamp} {signed_out}".encode()))
    n = 2 * nr + 5  # three panels, the last one partial
    ep = _epilogue(rng, "plain", signed_out, n, clamp, big=1e-4)
    assert packs_exactly("avx512_vnni", ep[1])
    want = _check_requant_rows(rng, "packed", n, ep, False)
    lo, hi = ep[2][rq.I_LO], ep[2][rq.I_HI]
    codes = want.view(np.int8) if signed_out else want
    for bound in (lo, hi):  # both bounds are reached (the saturating and clamping paths)
        assert np.count_nonzero(codes == bound) > ROWS


@pytest.mark.skipif("avx512_vnni" not in features.runnable_isas(), reason="no AVX512-VNNI")
@pytest.mark.parametrize("signed_out", [False, True])
def test_packed_kernels_are_exact_up_to_the_multiplier_bound(signed_out, monkeypatch):
    """At |mult| = 0.5, packs_exactly's bound, sums anywhere in int32 (biases
    that wrap) still convert without overflow: the bytes match. Past it, or on
    another ISA, the packed kernels are not chosen."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx512_vnni")
    monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=32))
    rng = np.random.default_rng(zlib.crc32(f"packed bound {signed_out}".encode()))
    ep = _epilogue(rng, "plain", signed_out, 64 + 5, "low")
    ep[1][rq.FM_MULT] = np.float32(0.5)
    assert packs_exactly("avx512_vnni", ep[1])
    _check_requant_rows(rng, "packed", 64 + 5, ep, False)
    over = ep[1].copy()
    over[rq.FM_MULT, 7] = np.nextafter(np.float32(0.5), np.float32(1))
    assert not packs_exactly("avx512_vnni", over)
    assert not packs_exactly("avx2", ep[1])


@pytest.mark.parametrize("isa", SIMD)
def test_a_single_k_block_gemm_compiles_only_the_requantizing_kernels(isa, monkeypatch):
    """`gemm_requant_rows` runs the plain kernels for the K blocks before the
    last only: for a GEMM of one block `ensure_rows` asks for none (each is
    ~50 ms of a cold compile); for one of four blocks, for both kinds."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    asked = []
    kernels = GemmPlan.kernels

    def recording(self, requant="", **kwargs):
        asked.append(requant)
        return kernels(self, requant, **kwargs)

    monkeypatch.setattr(GemmPlan, "kernels", recording)
    b = np.random.default_rng(4).integers(-128, 128, (K, N)).astype(np.int8)
    one_block = plan_gemm(b, ROWS)
    assert one_block.k_blocks == 1
    one_block.ensure_rows(ROWS, "plain")
    assert set(asked) == {"plain"}
    four_blocks = plan_gemm(b, ROWS)
    four_blocks.gparams[G_KCG] = 64
    asked.clear()
    four_blocks.ensure_rows(ROWS, "plain")
    assert set(asked) == {"", "plain"}
    sizes = row_block_sizes(ROWS, four_blocks.mr)
    for table in (kernels(four_blocks, "plain"), kernels(four_blocks)):
        assert all(table[size - 1] for size in sizes)


def _check_requant_rows(rng, kind, n, epilogue, overflow, table=None, vbmi=None):
    """One row block through `gemm_requant_rows` with `kind` kernels against
    the engine's int32 sums plus `ep_tile`; returns the expected bytes.
    `table` (an IR lookup table over the requantized codes): the lookup
    after the requantize, by the table stage (`vbmi`: on its vpermi2b path
    or not) where `ep_tile` looks it up per element."""
    b = rng.integers(-128, 128, (K, n)).astype(np.int8)
    plan = plan_gemm(b, ROWS)
    plan.gparams[G_KCG] = 64  # KC = 256: four K blocks, the last one partial
    assert plan.k_blocks == 4
    plan.ensure_rows(ROWS, kind)  # gemm_requant_rows' blocks (plain ones too: 4 K blocks)
    plan.ensure_rows(ROWS)  # the drivers' (the int32 sums below)
    gp = plan.gparams.copy()
    a = np.zeros((ROWS, plan.k4), np.uint8)
    a[:, :K] = rng.integers(0, 256, (ROWS, K))
    other = rng.integers(0, 256, ROWS * n).astype(np.uint8)
    chan_i, chan_f, sc_i, sc_f = epilogue
    tables = np.zeros(0, np.int64), np.zeros(0, np.uint8)  # ep_tile's, the table stage's
    if table is not None:
        sc_i = sc_i.copy()
        sc_i[rq.I_POST] = rq.P_LOOKUP
        tables = table.astype(np.int64), byte_table(table, 0x80 if sc_i[rq.I_YQMIN] < 0 else 0)
        gp[G_VBMI] = vbmi

    c = np.zeros((ROWS, n), np.int32)
    drivers.run_serial(
        plan.fptrs, a.ctypes.data, plan.k4, ROWS, gp[G_KG], plan.data.ctypes.data,
        gp[G_PANEL_BYTES], gp[G_NR], c.ctypes.data, n, n, plan.init.ctypes.data, gp[G_MR],
        gp[G_KCG], -(-ROWS // gp[G_MR]) * gp[G_MR], gp[G_NC], gp[G_DESC],
    )  # fmt: skip
    want = np.zeros(ROWS * n, np.uint8)
    z = np.int64(0)
    rq.ep_tile(c, z, ROWS, n, want, z, n, 1, z, z, 1, z, n, chan_i, chan_f, sc_i, sc_f,
               tables[0], other)  # fmt: skip

    init = plan.init_with(chan_i[0])  # the requantizing kernels' sums start at the bias
    got = np.zeros(ROWS * n, np.uint8)
    scratch = np.zeros((ROWS, n), np.int32)
    ep = requant_args(chan_f, sc_i, sc_f)
    gemm_requant_rows(
        a.ctypes.data, plan.k4, ROWS, plan.fptrs, plan.requant_fptrs(kind), plan.data,
        init, gp, scratch, 0, n, ep, got.ctypes.data, other.ctypes.data, n, tables[1], 0,
    )  # fmt: skip
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:10]
    # the same with A's rows by address, K in segments of 75 groups, each
    # segment's bytes elsewhere (garbage after them): the 64-group K blocks
    # cross segment ends, where the kernels must go on at the table's next
    # row of addresses
    segment = 75
    segments = plan.k4 // (4 * segment)
    assert plan.k4 == segments * segment * 4
    apart = np.full((segments, ROWS, segment * 4 + 64), 0xA5, np.uint8)
    apart[:, :, : segment * 4] = a.reshape(ROWS, segments, segment * 4).transpose(1, 0, 2)
    table_rows = np.array([[apart[s, r].ctypes.data for r in range(ROWS)]
                           for s in range(segments)], np.int64)  # fmt: skip
    by_address = np.zeros(ROWS * n, np.uint8)
    plan.ensure_rows(ROWS, kind, by_address=True)
    gemm_requant_rows(
        table_rows.ctypes.data, ROWS, ROWS, plan.kernels(by_address=True),
        plan.kernels(kind, by_address=True), plan.data, init, gp, scratch, 0, n, ep,
        by_address.ctypes.data, other.ctypes.data, n, tables[1], segment,
    )  # fmt: skip
    assert np.array_equal(by_address, want), np.flatnonzero(by_address != want)[:10]
    # the same in two column ranges, as a conv split over threads by channels
    # runs it: each with its own narrower sums
    nr = int(gp[G_NR])
    half = -(-n // nr // 2) * nr
    if 0 < half < n:
        split = np.zeros(ROWS * n, np.uint8)
        for n0, n1 in ((0, half), (half, n)):
            gemm_requant_rows(
                a.ctypes.data, plan.k4, ROWS, plan.fptrs, plan.requant_fptrs(kind), plan.data,
                init, gp, np.zeros((ROWS, n1 - n0), np.int32), n0, n1, ep, split.ctypes.data,
                other.ctypes.data, n, tables[1], 0,
            )  # fmt: skip
        assert np.array_equal(split, want), np.flatnonzero(split != want)[:10]
    if overflow:  # the case must reach the out-of-range branch
        assert np.count_nonzero(want == np.uint8(sc_i[rq.I_PLO] & 0xFF)) > n
    return want


TABLE_CASES = [
    pytest.param(isa, kind, vbmi, marks=pytest.mark.skipif(
        isa not in features.runnable_isas() or (vbmi and not vbmi_lookups(isa)),
        reason=f"host cannot run {isa}" + (" with AVX512_VBMI" if vbmi else ""),
    ))
    for isa, kind, vbmi in [
        ("avx512_vnni", "packed", True), ("avx512_vnni", "packed", False),
        ("avx512_vnni", "plain", True), ("avx2", "plain", False),
    ]
]  # fmt: skip


@pytest.mark.parametrize("isa, kind, vbmi", TABLE_CASES)
@pytest.mark.parametrize("signed_y", [False, True])
def test_table_stage_looks_up_the_requantized_codes(isa, kind, vbmi, signed_y, monkeypatch):
    """A lookup after the requantize (Inception's concat rescale, a GELU)
    runs as a byte table over the stored block: the bytes `ep_tile`'s
    per-element `table[y - qmin]` stores, for signed and unsigned codes,
    on the vpermi2b path and the scalar one, over whole rows (one pass) and
    column ranges (a pass per row, `_check_requant_rows`' split)."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    if kind == "packed":  # (the packed kernels need zmm panels)
        monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=32))
    rng = np.random.default_rng(zlib.crc32(f"table {isa} {kind} {vbmi} {signed_y}".encode()))
    n = 2 * 32 + 5 if kind == "packed" else N
    ep = _epilogue(rng, "plain", signed_y, n, "both", big=1e-4 if kind == "packed" else 0.0)
    table = rng.integers(-128, 128, 256)  # codes of the lookup's (here signed) type
    _check_requant_rows(rng, kind, n, ep, False, table, vbmi)


@pytest.mark.parametrize("vbmi", [
    False, pytest.param(True, marks=pytest.mark.skipif(
        not vbmi_lookups("avx512_vnni"), reason="no AVX512_VBMI")),
])  # fmt: skip
def test_lookup_bytes_every_length_in_place_and_not(vbmi):
    """`lookup_bytes` maps exactly the n bytes asked for (whole 64-byte steps,
    the masked last one, none), into another buffer or in place, and leaves
    the bytes after them alone."""
    rng = np.random.default_rng(7)
    table = rng.integers(0, 256, 256).astype(np.uint8)
    for n in (0, 1, 31, 63, 64, 65, 128, 200):
        src = rng.integers(0, 256, n + 70).astype(np.uint8)
        dst = np.full_like(src, 7)
        _lookup(src, dst, n, table, vbmi)
        assert np.array_equal(dst[:n], table[src[:n]]) and np.all(dst[n:] == 7), n
        same = src.copy()
        _lookup(same, same, n, table, vbmi)
        assert np.array_equal(same[:n], table[src[:n]]) and np.array_equal(same[n:], src[n:]), n


@numba.njit
def _lookup(src, dst, n, table, vbmi):
    lookup_bytes(src.ctypes.data, dst.ctypes.data, n, table, vbmi)


def test_row_blocks_are_even():
    """`gemm_requant_rows` cuts a tile's rows into the fewest blocks of at
    most MR rows, as even as they come (sizes differ by at most one), in
    order and without gaps; `row_block_sizes` names exactly their sizes
    (the kernels `ensure_rows` compiles)."""
    for mr in (1, 4, 6, 8):
        for rows in range(1, 60):
            blocks = [row_block(i, rows, mr) for i in range(row_blocks(rows, mr))]
            assert len(blocks) == -(-rows // mr)
            assert [b[0] for b in blocks] == list(np.cumsum([0] + [b[1] for b in blocks[:-1]]))
            assert sum(b[1] for b in blocks) == rows
            sizes = {b[1] for b in blocks}
            assert max(sizes) <= mr and max(sizes) - min(sizes) <= 1
            assert sizes == row_block_sizes(rows, mr)
    assert [row_block(i, 19, 6)[1] for i in range(4)] == [5, 5, 5, 4]


@pytest.mark.skipif("avx512_vnni" not in features.runnable_isas(), reason="no AVX512-VNNI")
def test_a_kernel_not_compiled_is_an_error_not_a_crash(monkeypatch):
    """A row count whose kernel `ensure_rows` did not compile (the tables
    here lack the kernel of the smallest of the blocks 13 rows are cut
    into) raises instead of calling address 0."""
    monkeypatch.setenv("QNNJIT_CPU_ISA", "avx512_vnni")
    rng = np.random.default_rng(0)
    plan = plan_gemm(rng.integers(-128, 128, (64, 64)).astype(np.int8), 13)
    plan.ensure_rows(13, "packed")
    fptrs, rq_fptrs = plan.kernels("").copy(), plan.kernels("packed").copy()
    missing = min(row_block_sizes(13, plan.mr)) - 1
    fptrs[missing] = rq_fptrs[missing] = 0
    ep = requant_args(np.zeros((4, 64), np.float32), np.zeros(16, np.int64),
                      np.zeros(8, np.float32))  # fmt: skip
    a, out = np.zeros((13, 64), np.uint8), np.zeros(13 * 64, np.uint8)
    with pytest.raises(RuntimeError, match="no microkernel"):
        gemm_requant_rows(
            a.ctypes.data, 64, 13, fptrs, rq_fptrs, plan.data, plan.init, plan.gparams,
            np.zeros((13, 64), np.int32), 0, 64, ep, out.ctypes.data, out.ctypes.data, 64,
            np.zeros(0, np.uint8), 0,
        )  # fmt: skip
