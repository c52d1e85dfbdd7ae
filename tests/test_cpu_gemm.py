"""The CPU int8 GEMM engine (qnnjit/backends/cpu): bit-exact against NumPy int64.

Every ISA path this host can run is forced in turn (the others are skipped, by
name). Shapes are drawn by hypothesis — M, N, K from 1 (and K = 0), odd,
non-multiples of every tile, K at 4*2**j +- 1 — with deliberately small tile
configs (KC, MC, NC of a few tiles) so the KC accumulation, MC/NC task and
remainder paths all run on small, fast shapes. The reference is
``A.astype(int64) @ B.astype(int64)`` reduced modulo 2**32.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnnjit import diskcache
from qnnjit.backends.cpu import features, gemm, llvmjit, ukernels
from qnnjit.backends.cpu.packing import pack_b, wrap_int32

RUNNABLE = features.runnable_isas()
ISA_PARAMS = [
    pytest.param(
        isa, marks=pytest.mark.skipif(isa not in RUNNABLE, reason=f"host cannot run {isa}")
    )
    for isa in features.ISAS
]
SIMD_PARAMS = [p for p in ISA_PARAMS if p.values[0] != "portable"]

# Small tiles, so small shapes cross every block boundary. Per ISA: (MR, NR).
SMALL_TILES = {
    "avx512_vnni": [(6, 64), (3, 16), (5, 32), (5, 24)],  # 24: ymm vectors
    "avx2": [(4, 16), (3, 8)],
    "portable": [(4, 16), (3, 8)],
}
K_EDGES = sorted({max(0, 4 * 2**j + d) for j in range(8) for d in (-1, 0, 1)})
HYPO = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _parallel_even_when_small(monkeypatch):
    # the shapes here are small: run threads > 1 in parallel anyway
    monkeypatch.setattr(gemm, "MIN_PARALLEL_OPS", 0)


def reference(a, b, bias=None):
    c = a.astype(np.int64) @ b.astype(np.int64)
    if bias is not None:
        c = c + bias.astype(np.int64)
    return wrap_int32(c)


def random_operands(rng, m, n, k, a_dtype, b_lo=-128, b_hi=127):
    info = np.iinfo(a_dtype)
    a = rng.integers(info.min, int(info.max) + 1, (m, k), dtype=a_dtype)
    b = rng.integers(b_lo, b_hi + 1, (k, n), dtype=np.int8)
    return a, b


def small_config(isa, tile, m, n, k, threads, kc_tiles=2):
    mr, nr = tile
    return gemm.GemmConfig(
        isa=isa, mr=mr, nr=nr, kc=4 * kc_tiles, mc=2 * mr, nc=2 * nr, threads=threads
    )


# ---------------------------------------------------------------------------
# ISA detection
# ---------------------------------------------------------------------------


def _cpu(*feats, arch="x86_64"):
    return features.HostCpu("test", frozenset(feats), "", arch)


def test_detection_picks_best_runnable_path():
    vnni = _cpu("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni")
    assert features.runnable_isas(vnni) == ("avx512_vnni", "avx2", "portable")
    assert features.host_isa(_cpu("avx2", "avx512f")) == "avx2"  # AVX-512 without VNNI
    assert features.host_isa(_cpu()) == "portable"
    assert features.host_isa(_cpu("avx2", arch="aarch64")) == "portable"
    assert features.host_isa() in RUNNABLE and RUNNABLE[-1] == "portable"


def test_isa_override_argument_then_env(monkeypatch):
    monkeypatch.setenv(features.ENV_VAR, "portable")
    assert features.select_isa() == "portable"
    assert features.select_isa("auto") == features.host_isa()
    monkeypatch.setenv(features.ENV_VAR, "auto")
    assert features.select_isa() == features.host_isa()
    if "avx2" in RUNNABLE:
        assert features.select_isa("avx2") == "avx2"
        monkeypatch.setenv(features.ENV_VAR, "avx2")
        assert gemm.default_config(10, 10, 10).isa == "avx2"


def test_isa_override_rejects_unknown_and_unrunnable(monkeypatch):
    with pytest.raises(features.IsaError, match="unknown CPU ISA 'sse9'"):
        features.select_isa("sse9")
    monkeypatch.setenv(features.ENV_VAR, "neon")
    with pytest.raises(features.IsaError, match=r"\$QNNJIT_CPU_ISA"):
        features.select_isa()
    with pytest.raises(features.IsaError, match="missing avx512bw, avx512vl, avx512vnni"):
        features.select_isa("avx512_vnni", cpu=_cpu("avx2", "avx512f"))


# ---------------------------------------------------------------------------
# Exactness over drawn shapes, every path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISA_PARAMS)
@HYPO
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 80),
    k=st.one_of(st.integers(0, 70), st.sampled_from(K_EDGES)),
    signed=st.booleans(),
    tile=st.integers(0, 3),
    threads=st.sampled_from([1, 2]),
    kc_tiles=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_exact_drawn_shapes(isa, m, n, k, signed, tile, threads, kc_tiles, seed):
    tiles = SMALL_TILES[isa]
    cfg = small_config(isa, tiles[tile % len(tiles)], m, n, k, threads, kc_tiles)
    a, b = random_operands(np.random.default_rng(seed), m, n, k, np.int8 if signed else np.uint8)
    c = gemm.gemm(a, gemm.pack_b(b, cfg), cfg)
    np.testing.assert_array_equal(c, reference(a, b))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("threads", [1, 2])
def test_default_configs_resnet_like_shapes(isa, threads):
    rng = np.random.default_rng(7)
    for m, n, k in [(49, 64, 27), (25, 64, 576), (9, 128, 1152), (4, 512, 4608 // 4)]:
        for dtype in (np.uint8, np.int8):
            a, b = random_operands(rng, m, n, k, dtype)
            cfg = gemm.default_config(m, n, k, isa=isa, threads=threads)
            c = gemm.gemm(a, gemm.pack_b(b, cfg), cfg)
            np.testing.assert_array_equal(c, reference(a, b), err_msg=f"{cfg.describe()}")


@pytest.mark.skipif("avx512_vnni" not in RUNNABLE, reason="no AVX512-VNNI")
@pytest.mark.parametrize("cpu", ["znver4", "sapphirerapids"])
def test_default_tile_takes_the_widest_unpadded_panel_at_small_k(cpu, monkeypatch):
    """Where several VNNI panel widths pad no columns, a small K (the output
    stage weighs most) takes the widest, a large K the table's first; padding
    still comes first (24 columns: the unpadded ymm panel, not a masked 32- or
    48-wide one, where ymm vectors multiply-add at the zmm rate: Zen 4; on
    cores with full 512-bit units, the masked 32-wide one)."""
    host = features.host_cpu()
    monkeypatch.setattr(
        gemm, "host_cpu", lambda: features.HostCpu(cpu, host.features, "", "x86_64")
    )
    n24 = 24 if cpu == "znver4" else 32
    wide_k, deep_k = 24, 1296
    assert gemm._WIDE_PANELS_MAX_K >= wide_k and deep_k > gemm._WIDE_PANELS_MAX_K
    widths = {
        (n, k): gemm.default_config(3136, n, k, isa="avx512_vnni", threads=1).nr
        for n in (24, 96, 144, 192) for k in (wide_k, deep_k)
    }  # fmt: skip
    assert widths == {
        (24, wide_k): n24, (24, deep_k): n24, (96, wide_k): 48, (96, deep_k): 32,
        (144, wide_k): 48, (144, deep_k): 16, (192, wide_k): 64, (192, deep_k): 64,
    }  # fmt: skip


def test_k_blocks_are_sized_for_l2_on_avx512_only():
    """`_B_PANEL_BYTES`: AVX-512 K blocks keep a 256 KiB B panel (in L2):
    ResNet-18's 3x3 convs run K in one block, or two for 4608 deep; AVX2's
    16-column panels keep 24 KiB (in L1): K = 4608 in three blocks."""

    def kc(isa, m, n, k):
        return gemm.default_config(m, n, k, isa=isa, threads=1).kc

    assert kc("avx512_vnni", 3136, 64, 576) == 576
    assert kc("avx512_vnni", 196, 256, 2304) == 2304
    assert kc("avx512_vnni", 49, 512, 4608) == 2304
    assert kc("avx2", 49, 512, 4608) == 1536


@pytest.mark.parametrize("backend", ["pool", "numba"])
def test_parallel_backends(backend, monkeypatch):
    monkeypatch.setenv("QNNJIT_GEMM_PARALLEL", backend)
    rng = np.random.default_rng(9)
    isa = RUNNABLE[0]
    for m, n, k, dtype in [(50, 33, 70, np.uint8), (7, 130, 9, np.int8), (1, 200, 64, np.uint8)]:
        a, b = random_operands(rng, m, n, k, dtype)
        cfg = small_config(isa, SMALL_TILES[isa][1], m, n, k, threads=2)
        assert gemm.drivers.task_count(m, n, cfg.mc, cfg.nc) > 1
        np.testing.assert_array_equal(gemm.gemm(a, gemm.pack_b(b, cfg), cfg), reference(a, b))
    monkeypatch.setenv("QNNJIT_GEMM_PARALLEL", "openmp")
    with pytest.raises(ValueError, match="QNNJIT_GEMM_PARALLEL"):
        gemm.gemm(a, gemm.pack_b(b, cfg), cfg)


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_every_candidate_config_is_exact(isa):
    rng = np.random.default_rng(3)
    m, n, k = 19, 40, 44
    a, b = random_operands(rng, m, n, k, np.int8)
    for cfg in gemm.candidate_configs(m, n, k, isa=isa, threads=2):
        c = gemm.gemm(a, gemm.pack_b(b, cfg), cfg)
        np.testing.assert_array_equal(c, reference(a, b), err_msg=cfg.describe())


# ---------------------------------------------------------------------------
# Extreme values and int32 wraparound
# ---------------------------------------------------------------------------

EXTREMES = [
    (np.uint8, 255, -128),  # the most negative u8*s8 products
    (np.uint8, 255, 127),  # the most positive: every vpmaddubsw pair would saturate
    (np.int8, -128, -128),  # s8*s8 maximum, through the +128 shift
    (np.int8, 127, -128),
    (np.int8, -128, 127),
    (np.uint8, 0, -128),
]


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("a_dtype,a_val,b_val", EXTREMES)
def test_extreme_values(isa, a_dtype, a_val, b_val):
    for m, n, k in [(7, 33, 131), (1, 1, 1), (13, 17, 4), (6, 64, 257)]:
        a = np.full((m, k), a_val, a_dtype)
        b = np.full((k, n), b_val, np.int8)
        cfg = small_config(isa, SMALL_TILES[isa][0], m, n, k, threads=1, kc_tiles=8)
        np.testing.assert_array_equal(gemm.gemm(a, gemm.pack_b(b, cfg), cfg), reference(a, b))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("a_dtype,a_val,b_val", [(np.uint8, 255, -128), (np.int8, -128, -128)])
def test_int32_wraparound(isa, a_dtype, a_val, b_val):
    # |sum| = K * 32640 (or 16384) > 2**31: the i32 result wraps, as in ORT's kernels
    k = 70_001 if a_dtype == np.uint8 else 140_001
    m, n = 3, 17
    a = np.full((m, k), a_val, a_dtype)
    a[1, ::3] = 0
    b = np.full((k, n), b_val, np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(exact).max() > 2**31  # the test really wraps
    cfg = gemm.default_config(m, n, k, isa=isa, threads=1)
    np.testing.assert_array_equal(gemm.gemm(a, gemm.pack_b(b, cfg), cfg), reference(a, b))


# ---------------------------------------------------------------------------
# AVX2: the saturating vpmaddubsw kernel only where the range analysis allows it
# ---------------------------------------------------------------------------


def test_pair_bounds_goldens():
    b = np.array([[127, -128, 1], [127, -128, -1], [0, 0, 0]], np.int8)  # K=3, N=3
    w = pack_b(b, 8)
    assert w.pair_bounds(0, 255) == (-65280, 64770)
    assert w.pair_bounds(0, 127) == (-32512, 32258)
    assert not w.i16_pairs_safe() and w.i16_pairs_safe(0, 127)
    seven_bit = pack_b(np.array([[-64, 63], [-64, 63]], np.int8), 8)
    assert seven_bit.pair_bounds(0, 255) == (-32640, 32130) and seven_bit.i16_pairs_safe()


@pytest.mark.parametrize("layout", ["k4n", "kn"])
@pytest.mark.parametrize("k,n,nr", [(147, 64, 64), (27, 24, 16), (6, 100, 32), (1, 1, 8)])
def test_pair_sums_from_the_packed_data(layout, k, n, nr):
    """The packed weights' distinct pair sums (recovered from the packed
    layout, on demand) are those of B itself, its K padded with zeros to
    whole groups of four, padding columns left out."""
    from qnnjit.backends.cpu.packing import _distinct_pair_sums

    b = np.random.default_rng(k + n).integers(-128, 128, (k, n)).astype(np.int8)
    padded = np.zeros((-(-k // 4) * 4, n), np.int8)
    padded[:k] = b
    np.testing.assert_array_equal(pack_b(b, nr, layout)._pair_sums, _distinct_pair_sums(padded))


def _call_kernel(spec, rows, a, packed, nvalid, lda=None, desc=0):
    """Run one microkernel on A = `a` (row stride `lda`, by default a's own;
    for a kernel that takes rows by address, `a` is the table of addresses,
    `lda` their offset and `desc` the segments), B = `packed`; returns C."""
    name = ukernels.kernel_name(spec, rows)
    mod = llvmjit.compile_module(ukernels.ukernel_ir(spec, rows), spec.isa, (name,))
    fn = ctypes.CFUNCTYPE(
        None, *[ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
    )(mod.addresses[name])
    c = np.zeros((rows, packed.nr), np.int32)
    fn(
        a.ctypes.data,
        a.strides[0] if lda is None else lda,
        packed.data.ctypes.data,
        packed.k_groups,
        c.ctypes.data,
        packed.nr,
        packed.zero_init.ctypes.data,
        nvalid,
        0,
        desc,
    )
    return c


@pytest.mark.parametrize("isa", SIMD_PARAMS)
def test_kernels_take_a_rows_by_address(isa):
    """ukernels ADDRESS_DOC: in segment s of K, row r of A starts at address
    table[s][r] (the table's rows `stride` bytes apart), the block's first
    segment `lda` bytes in, wherever the rows lie: overlapping, out of
    order, one of them twice. Every row count; one segment, and segments
    shorter than the unroll and longer, the block starting mid-segment."""
    rng = np.random.default_rng(3)
    mr, nr = SMALL_TILES[isa][0]
    source = rng.integers(0, 256, 600, dtype=np.uint8)
    for segment, segments, first in [(2 * ukernels.UNROLL + 3, 1, 5), (3, 5, 1), (6, 4, 4)]:
        k = 4 * (segment * segments - first)  # the block: all but `first` groups
        b = rng.integers(-128, 128, (k, nr)).astype(np.int8)
        packed = pack_b(b, nr)
        spec = ukernels.UkernelSpec(isa, mr, nr, a_by_address=True)
        stride = mr + 3  # table entries from one segment's row to the next's
        for rows in range(1, mr + 1):
            starts = rng.integers(0, source.size - 4 * segment, (segments, stride))
            starts[:, rows - 1] = starts[:, 0]  # the same row twice (one row: itself)
            table = source.ctypes.data + starts.astype(np.int64)
            runs = [source[s : s + 4 * segment] for s in starts[:, :rows].T.ravel()]
            a = np.stack(runs).reshape(rows, -1)[:, 4 * first :]  # each row's segments
            desc = segment | (8 * stride) << 32
            c = _call_kernel(spec, rows, table, packed, nr, lda=4 * first, desc=desc)
            np.testing.assert_array_equal(c, reference(a, b), err_msg=f"{rows} rows")


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="host cannot run avx2")
def test_avx2_i16_kernel_saturates_where_the_analysis_says():
    a = np.full((1, 8), 255, np.uint8)
    b = np.full((8, 8), 127, np.int8)
    w = pack_b(b, 8)
    fast = _call_kernel(ukernels.UkernelSpec("avx2", 1, 8, pairs="i16"), 1, a, w, 8)
    split = _call_kernel(ukernels.UkernelSpec("avx2", 1, 8, pairs="exact"), 1, a, w, 8)
    exact = reference(a, b)
    assert (fast == 4 * 32767).all() and not (fast == exact).any()  # saturated pairs
    np.testing.assert_array_equal(split, exact)
    # ... and gemm, given the whole u8 range, never picks it for such weights
    cfg = gemm.default_config(1, 8, 8, isa="avx2", threads=1)
    np.testing.assert_array_equal(gemm.gemm(a, gemm.pack_b(b, cfg), cfg), exact)


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="host cannot run avx2")
@pytest.mark.parametrize("signed", [False, True])
def test_avx2_fast_kernel_exact_when_proven(signed):
    rng = np.random.default_rng(11)
    m, n, k = 23, 40, 301
    dtype = np.int8 if signed else np.uint8
    # 7-bit weights: safe for every activation
    a, b = random_operands(rng, m, n, k, dtype, b_lo=-64, b_hi=63)
    cfg = small_config("avx2", (4, 16), m, n, k, threads=2, kc_tiles=5)
    w = gemm.pack_b(b, cfg)
    assert w.i16_pairs_safe()
    np.testing.assert_array_equal(gemm.gemm(a, w, cfg), reference(a, b))
    # full-range weights, activations proven small: safe by the caller's range
    a, b = random_operands(rng, m, n, k, dtype)
    a_range = (-128, -1) if signed else (0, 127)  # a + 128 in [0, 127] for signed
    a = np.clip(a, *a_range).astype(dtype)
    c = gemm.gemm(a, gemm.pack_b(b, cfg), cfg, a_range=a_range)
    np.testing.assert_array_equal(c, reference(a, b))
    c = gemm.gemm(a, gemm.pack_b(b, cfg), cfg, a_range=a_range, allow_i16_pairs=False)
    np.testing.assert_array_equal(c, reference(a, b))


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="host cannot run avx2")
def test_avx2_path_is_compiled_without_avx512():
    spec = ukernels.UkernelSpec("avx2", 4, 16, a_signed=True)
    import llvmlite.binding as llvm

    module = llvm.parse_assembly(ukernels.ukernel_ir(spec))
    asm = llvmjit.target_machine("avx2").emit_assembly(module)
    assert "vpmaddubsw" in asm
    assert "zmm" not in asm and "%k1" not in asm
    assert not any(f"ymm{i}" in asm for i in range(16, 32))


def test_vector_spills_are_aligned():
    """The 6x64 qadd kernel spills vectors (its epilogue's constants): to
    64-byte aligned stack slots, whatever the caller's stack alignment
    (ukernels: alignstack), so no spill or reload splits a cache line."""
    spec = ukernels.UkernelSpec("avx512_vnni", 6, 64, requant="qadd", a_by_address=True)
    asm = llvmjit.assembly(ukernels.ukernel_ir(spec, 6), spec.isa)
    offsets = re.findall(r"(-?\d*)\(%rsp\)[^\n]*zmm|zmm[^\n]*?(-?\d*)\(%rsp\)", asm)
    offsets = [int(a or b or 0) for a, b in offsets]
    assert offsets, "no spills: the check checks nothing"
    assert "andq\t$-64, %rsp" in asm, "the stack is not realigned"
    assert all(o % 64 == 0 for o in offsets), offsets


# ---------------------------------------------------------------------------
# API: bias, out views, row sums, strided A, validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_bias_out_view_and_strided_a(isa):
    rng = np.random.default_rng(5)
    m, n, k = 21, 35, 48
    big_a = rng.integers(-128, 128, (m, k + 20), dtype=np.int8)
    a = big_a[:, 5 : 5 + k]  # row stride k + 20, read in place
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    bias = rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32)  # wraps when added
    buf = np.full((m + 2, n + 9), 7, np.int32)
    out = buf[1 : m + 1, 4 : 4 + n]
    cfg = small_config(isa, SMALL_TILES[isa][-1], m, n, k, threads=2)
    result = gemm.gemm(a, gemm.pack_b(b, cfg), cfg, bias=bias, out=out)
    assert result is out
    np.testing.assert_array_equal(out, reference(a, b, bias))
    assert (buf[0] == 7).all() and (buf[-1] == 7).all()
    assert (buf[:, :4] == 7).all() and (buf[:, 4 + n :] == 7).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_row_sums(dtype):
    rng = np.random.default_rng(2)
    a, _ = random_operands(rng, 9, 1, 1001, dtype)
    np.testing.assert_array_equal(gemm.row_sums(a), a.astype(np.int64).sum(axis=1))
    assert gemm.row_sums(a[:0]).shape == (0,)


def test_empty_and_degenerate_shapes():
    cfg = gemm.default_config(0, 5, 8)
    w = gemm.pack_b(np.ones((8, 5), np.int8), cfg)
    assert gemm.gemm(np.zeros((0, 8), np.uint8), w, cfg).shape == (0, 5)
    w0 = gemm.pack_b(np.ones((3, 0), np.int8), 16)
    assert gemm.gemm(np.ones((4, 3), np.uint8), w0).shape == (4, 0)
    wk = gemm.pack_b(np.ones((0, 5), np.int8), 16)
    bias = np.arange(5, dtype=np.int32)
    np.testing.assert_array_equal(
        gemm.gemm(np.ones((4, 0), np.int8), wk, bias=bias), np.broadcast_to(bias, (4, 5))
    )


def test_validation_errors():
    with pytest.raises(ValueError, match="MC a positive multiple of MR"):
        gemm.GemmConfig("portable", mr=4, nr=16, kc=8, mc=6, nc=16)
    with pytest.raises(ValueError, match="KC a positive multiple of 4"):
        gemm.GemmConfig("portable", mr=4, nr=16, kc=6, mc=8, nc=16)
    with pytest.raises(ValueError, match="NR a positive multiple of 8"):
        gemm.GemmConfig("avx512_vnni", mr=4, nr=20, kc=8, mc=8, nc=20)
    w = gemm.pack_b(np.zeros((8, 4), np.int8), 16)
    with pytest.raises(ValueError, match="packed with NR=16"):
        gemm.gemm(np.zeros((2, 8), np.uint8), w, gemm.GemmConfig("portable", 4, 32, 8, 8, 32))
    with pytest.raises(ValueError, match="layout 'k4n'"):
        gemm.gemm(np.zeros((2, 8), np.uint8), w, gemm.GemmConfig("portable", 4, 16, 8, 8, 16))
    with pytest.raises(ValueError, match="K=7 but the packed weights have K=8"):
        gemm.gemm(np.zeros((2, 7), np.uint8), w)
    with pytest.raises(TypeError, match="uint8 or int8"):
        gemm.gemm(np.zeros((2, 8), np.int16), w)
    with pytest.raises(TypeError, match="int8 array"):
        gemm.pack_b(np.zeros((8, 4), np.uint8), 16)
    with pytest.raises(ValueError, match="out must be int32"):
        gemm.gemm(np.zeros((2, 8), np.uint8), w, out=np.zeros((2, 4), np.int64))


# ---------------------------------------------------------------------------
# Tuner interface and caching
# ---------------------------------------------------------------------------


def test_tuner_interface():
    isa = RUNNABLE[0]
    cands = gemm.candidate_configs(50, 70, 90, isa=isa, threads=2)
    assert cands[0] == gemm.default_config(50, 70, 90, isa=isa, threads=2)
    assert len(set(cands)) == len(cands) >= 3
    report = gemm.compile_config(cands[1], a_signed=True)
    assert report.ukernel_sources and set(report.ukernel_sources) <= {"compiled", "disk", "memory"}
    meas = gemm.measure_config(cands[0], 50, 70, 90, repeats=2)
    assert meas.error is None and 0 < meas.seconds_min <= meas.seconds_median and meas.gops > 0


def test_measure_scores_a_failing_config_infinite(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no")

    monkeypatch.setattr(gemm, "gemm", broken)
    meas = gemm.measure_config(gemm.default_config(8, 8, 8), 8, 8, 8, repeats=1)
    assert meas.seconds_min == float("inf") and "RuntimeError: no" in meas.error


@pytest.mark.skipif(RUNNABLE[0] == "portable", reason="no LLVM microkernel path on this host")
def test_llvm_object_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QNNJIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(llvmjit, "_MODULES", {})
    spec = ukernels.UkernelSpec(RUNNABLE[0], 2, 16 if RUNNABLE[0] == "avx512_vnni" else 8)
    text, names = ukernels.ukernel_ir(spec), spec.names()
    first = llvmjit.compile_module(text, spec.isa, names)
    assert first.source == "compiled" and len(list(tmp_path.rglob("*.o"))) == 1
    assert llvmjit.compile_module(text, spec.isa, names).source == "memory"
    monkeypatch.setattr(llvmjit, "_MODULES", {})
    assert llvmjit.compile_module(text, spec.isa, names).source == "disk"
    next(tmp_path.rglob("*.o")).write_bytes(b"garbage")
    monkeypatch.setattr(llvmjit, "_MODULES", {})
    assert llvmjit.compile_module(text, spec.isa, names).source == "compiled"
    monkeypatch.setenv("QNNJIT_CACHE_DIR", "")  # every disk cache off: compiled each time
    monkeypatch.setattr(llvmjit, "_MODULES", {})
    assert diskcache.cache_dir() is None
    assert llvmjit.compile_module(text, spec.isa, names).source == "compiled"


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mprotect"), reason="needs POSIX mprotect")
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_k_tail_never_reads_past_mapped_memory(isa):
    # A (K % 4 != 0) ends exactly where an unreadable page starts: the kernels
    # read whole groups of 4 bytes, so gemm must copy here, not read in place.
    import mmap

    libc = ctypes.CDLL(None)
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    raw = np.frombuffer(buf, np.uint8, count=page)  # the readable page only
    addr = raw.ctypes.data
    assert libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    try:
        m, k, n = 5, 27, 20
        a = raw[page - m * k : page].reshape(m, k)
        a[...] = np.random.default_rng(4).integers(0, 256, (m, k), dtype=np.uint8)
        b = np.random.default_rng(5).integers(-128, 128, (k, n), dtype=np.int8)
        cfg = small_config(isa, SMALL_TILES[isa][0], m, n, k, threads=1)
        np.testing.assert_array_equal(gemm.gemm(a, gemm.pack_b(b, cfg), cfg), reference(a, b))
        # in place when the tail stays inside the page (or the base array)
        inner = raw[: m * k].reshape(m, k)
        inner[...] = a[::-1]
        assert gemm._tail_readable(inner, 28) and not gemm._tail_readable(a, 28)
        np.testing.assert_array_equal(
            gemm.gemm(inner, gemm.pack_b(b, cfg), cfg), reference(inner, b)
        )
    finally:
        libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 3)  # the GC unmaps


def test_threadpool_runs_every_range_once():
    from qnnjit.backends.cpu import threadpool

    seen = []
    lock = __import__("threading").Lock()

    def kernel(t0, t1, tag):
        with lock:
            seen.extend((t, tag) for t in range(t0, t1))

    for tasks, threads in [(10, 2), (1, 4), (0, 2), (7, 3)]:
        seen.clear()
        threadpool.run_ranges(kernel, tasks, threads, "x")
        assert sorted(seen) == [(t, "x") for t in range(tasks)]
    calls = []
    threadpool.run_on_threads(lambda x: calls.append(x), 3, 5)
    assert calls == [5, 5, 5]
