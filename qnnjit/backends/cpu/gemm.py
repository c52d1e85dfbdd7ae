"""The int8 GEMM engine: ``C[M, N] (int32) = A[M, K] (u8 | s8) @ B[K, N] (s8)``, exactly.

"Exactly" means bit for bit the int32 two's-complement result, i.e. the exact
sum modulo 2**32, on every path (``features``): AVX-512 VNNI, AVX2, portable.

Use:

    cfg = default_config(M, N, K)                 # or a tuned GemmConfig
    w = pack_b(B, cfg)                            # once, at compile time
    C = gemm(A, w, cfg)                           # A: uint8 or int8 [M, K]
    C = gemm(A, w, cfg, bias=b32, out=buf)        # + per-column int32, into buf

- Weights are packed once (``packing``: groups of 4 consecutive k x NR
  columns, K padded to 4, N to NR, zeros; the portable path's own layout).
- A is read in place when its rows have unit stride (a strided view is fine),
  even when K % 4 != 0: the kernels read whole groups of four bytes, the bytes
  past K meet zero weights, and ``_tail_readable`` checks the over-read of the
  last row stays in mapped memory (else A is copied once, K padded to 4).
- Signed A runs as ``a + 128`` (u8) with ``-128 * sum_k B[k, n]`` precomputed
  at pack time as the accumulators' initial value, together with ``bias``:
  both cost nothing.
- Zero points are the caller's (fold them); ``row_sums(A)`` gives the
  ``sum_k A[m, k]`` a weight zero point needs.
- AVX2: ``vpmaddubsw`` saturates pair sums to i16. ``gemm`` uses the fast
  single-``vpmaddubsw`` kernel only when ``packed.i16_pairs_safe`` proves no
  pair can saturate for the activation range ``a_range`` (default: A's whole
  dtype range; pass the range analysis' bounds to unlock it, or
  ``allow_i16_pairs=False`` to refuse it); otherwise the exact split kernel
  (half the speed).
- ``threads > 1``: C is cut into about four MC x NC tasks per thread, which
  threads claim one at a time from an atomic counter inside the GIL-free
  driver (``parallel_backend``: helper threads kept off the caller's CPU,
  ``threadpool``, by default; or Numba's ``prange``). GEMMs under
  ``MIN_PARALLEL_OPS`` stay on the calling thread.

Tile sizes are a frozen ``GemmConfig`` (isa, MR, NR, KC, MC, NC, threads);
``default_config`` is the shape heuristic, and the tuner drives
``candidate_configs`` / ``compile_config`` / ``measure_config``. Fused kernels
call the driver themselves: ``microkernels(config, packed)`` gives the
``(fptrs, desc)`` pair that ``drivers.run_serial`` / ``run_tasks`` take.

What is compiled, and cached: each microkernel (``UkernelSpec`` x row count)
once per process and on disk (``llvmjit``); the Numba drivers and the portable
kernel once, on disk (``cache=True``); nothing per shape.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from . import drivers
from .features import host_cpu, select_isa
from .llvmjit import compile_module
from .packing import PackedB, wrap_int32
from .packing import pack_b as _pack_b
from .threadpool import run_on_threads
from .ukernels import MIN_NR, UkernelSpec, kernel_name, tile_lanes, ukernel_ir

__all__ = [
    "GemmConfig",
    "Measurement",
    "default_config",
    "candidate_configs",
    "compile_config",
    "measure_config",
    "pack_b",
    "gemm",
    "row_sums",
    "max_threads",
    "microkernels",
    "kernel_table",
    "portable_fptrs",
    "KernelTable",
    "PackedB",
    "parallel_backend",
]


def _lanes(isa: str, nr: int) -> int:
    """The i32 lanes of the vectors a tile of width ``nr`` computes in."""
    return 8 if isa == "portable" else tile_lanes(isa, nr)


# Register-feasible microkernel tiles per ISA (accumulators + B vectors + one
# broadcast fit the 32 zmm / 16 ymm registers), preferred first. On Zen 4 the
# first five VNNI tiles measured within noise of each other (~430-440 GOPS on
# the ResNet-18 shapes, one thread); 8x48 and 7x48 trailed by ~10% then, by
# 1.5-2% at K >= 576 with today's kernels, and lead at small K
# (`_WIDE_PANELS_MAX_K`). 8x24 (ymm vectors, `ukernels.tile_lanes`) is for
# N = 24, where every zmm tile pads 8 of 32 columns (`_heuristic_tiles`).
# fmt: off
_TILES = {
    "avx512_vnni": (
        (6, 64), (4, 64), (8, 32), (12, 32), (12, 16), (8, 48), (16, 16), (7, 48), (8, 24),
    ),
    "avx2": ((6, 16), (4, 16), (4, 24), (2, 32), (3, 16), (8, 8)),
    "portable": ((4, 64), (4, 128), (2, 128), (4, 32), (4, 16)),
}
# fmt: on

# Cores that execute a zmm `vpdpbusd` as two ymm halves: there a ymm one issues
# twice as often, so ymm tiles multiply-add at the zmm rate (Zen 4: 234 GMAC/s
# both ways, one core). Cores with full 512-bit units run ymm at half the zmm
# rate, where the 8x24 tile would lose to a padded 8x32: the heuristic offers
# it only here (the tuner measures every tile anyway).
_HALF_WIDTH_ZMM_CPUS = frozenset({"znver4"})


def _heuristic_tiles(isa: str) -> tuple[tuple[int, int], ...]:
    """`default_config`'s tiles: `_TILES`, less the ymm AVX-512 tiles where
    they would be slower than zmm ones."""
    tiles = _TILES[isa]
    if isa == "avx512_vnni" and host_cpu().name not in _HALF_WIDTH_ZMM_CPUS:
        tiles = tuple(t for t in tiles if tile_lanes(isa, t[1]) == 16)
    return tiles


# Up to this K a GEMM's output stage weighs as much as its dot products, and
# the widest panel that pads no more columns wins: one broadcast of A feeds
# more vpdpbusd, and each row stores more bytes at once. Measured on Zen 4,
# one thread, M = 3136: 8x48 over 12x16 +20% at K = 24 (N = 144, 240), +4%
# at K = 144, +2% at K = 240; 8x48 over 8x32 +2% at K = 16 and +7% at K = 96
# (N = 96), but -2% at K = 576 and -1.5% at K = 1296, where the table's
# order stands.
_WIDE_PANELS_MAX_K = 256

_TASKS_PER_THREAD = 4
# Below this many int8 ops (2*M*N*K) a GEMM runs on the calling thread: a pool
# hand-off costs 20-40 us here, the work of ~10-20 MOPs at 400-450 GOPS.
MIN_PARALLEL_OPS = 1 << 24
# The KC x NR B micro-panel a kernel call streams. With AVX-512 it is kept
# in L2, not L1: a K block end stores a tile's int32 sums and the next
# block reloads them, which costs more than reading B from L2. Zen 4, one
# thread, ResNet-18's convs (A rows by address, per-step minima): 24 KiB
# (K blocks of 384 at 64 columns) 5807 us, 40 KiB 5763, 64 KiB 5738, 128
# KiB 5692, 256 KiB 5594 (every conv of ResNet-18 one K block), 1 MiB
# 5596; whole runs 1-2 % faster. The AVX2 kernels, 16 columns wide, lost
# 3 % at 256 KiB (ResNet-18 whole runs, on the same host): they keep the
# L1-sized panel.
_B_PANEL_BYTES = {"avx512_vnni": 256 * 1024}
_B_PANEL_BYTES_L1 = 24 * 1024  # the other ISAs': kept in L1
_L2_A_BYTES = 256 * 1024  # the MC x KC A block kept in L2


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of one GEMM, all explicit. KC counts k (a multiple of 4); MC is
    a multiple of MR and NC of NR; ``threads`` is how many Numba threads run it."""

    isa: str
    mr: int
    nr: int
    kc: int
    mc: int
    nc: int
    threads: int = 1

    def __post_init__(self):
        if self.isa not in _TILES:
            raise ValueError(f"unknown ISA {self.isa!r}")
        problems = []
        if self.mr < 1:
            problems.append("MR >= 1")
        if self.nr < MIN_NR or self.nr % MIN_NR:
            problems.append(f"NR a positive multiple of {MIN_NR}")
        if self.kc < 4 or self.kc % 4:
            problems.append("KC a positive multiple of 4")
        if self.mc < self.mr or self.mc % self.mr:
            problems.append("MC a positive multiple of MR")
        if self.nc < self.nr or self.nc % self.nr:
            problems.append("NC a positive multiple of NR")
        if self.threads < 1:
            problems.append("threads >= 1")
        if problems:
            raise ValueError(f"invalid {self}: needs " + ", ".join(problems))

    def describe(self) -> str:
        return (
            f"{self.isa} {self.mr}x{self.nr} kc={self.kc} mc={self.mc} nc={self.nc} "
            f"t={self.threads}"
        )


def max_threads() -> int:
    """Threads a GEMM may use: ``$QNNJIT_NUM_THREADS`` if set, else every Numba thread."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    env = os.environ.get("QNNJIT_NUM_THREADS", "").strip()
    return max(1, min(limit, int(env))) if env else limit


# ---------------------------------------------------------------------------
# Configs: the heuristic, the tuner's candidates
# ---------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _max_rows(isa: str, nr: int) -> int:
    """The most rows whose accumulators, NR's B vectors and a broadcast fit the
    vector registers (32 zmm, 16 ymm), at most 8."""
    vectors = nr // _lanes(isa, nr)
    registers = {"avx512_vnni": 32, "avx2": 16}.get(isa, 32)
    return max(1, min(8, (registers - vectors - 2) // vectors))


def _blocking(
    isa: str, mr: int, nr: int, m: int, n: int, k: int, threads: int, kc: int | None = None
) -> GemmConfig:
    """MC, NC, KC for a tile: KC so the B micro-panel stays in cache
    (`_B_PANEL_BYTES`; K split into equal blocks), MC so the A block stays
    in L2; with threads, C is cut into about ``_TASKS_PER_THREAD`` tasks per
    thread (threads take them dynamically, so a thread slowed by a
    neighbour does less), along M when M >= N (each task then reads all of
    B, the smaller operand), else along N."""
    k4 = max(4, _round_up(k, 4))
    if kc is None:
        kc_max = max(4, (_B_PANEL_BYTES.get(isa, _B_PANEL_BYTES_L1) // nr) // 4 * 4)
        blocks = -(-k4 // kc_max)
        kc = _round_up(-(-k4 // blocks), 4)
    kc = min(kc, k4)
    m_tiles = max(1, -(-m // mr))
    n_panels = max(1, -(-n // nr))
    mc_cache = max(mr, (_L2_A_BYTES // kc) // mr * mr)
    mc = min(mc_cache, m_tiles * mr)
    nc = n_panels * nr
    if threads > 1:
        want = _TASKS_PER_THREAD * threads
        if (m >= n and m_tiles >= threads) or n_panels < threads:
            mc = min(mc_cache, -(-m_tiles // min(want, m_tiles)) * mr)
        else:
            nc = -(-n_panels // min(want, n_panels)) * nr
    return GemmConfig(isa, mr, nr, kc, mc, nc, threads)


def default_config(
    m: int,
    n: int,
    k: int,
    isa: str | None = None,
    threads: int | None = None,
    nr: int | None = None,
) -> GemmConfig:
    """A good config for the shape without measuring. ``nr`` pins the panel width
    (to match weights already packed)."""
    isa = select_isa(isa)
    threads = max_threads() if threads is None else max(1, threads)
    tiles = _heuristic_tiles(isa)
    if nr is not None:
        fitting = [t for t in tiles if t[1] == nr]
        mr = fitting[0][0] if fitting else _max_rows(isa, nr)
    else:
        # least column padding, then (at small K) the widest panel, then the
        # first (best) tile in the table
        def waste(t):
            return _round_up(max(n, 1), t[1]) - n

        def rank(t):
            wide = -t[1] if k <= _WIDE_PANELS_MAX_K else 0
            return waste(t) > 0.15 * max(n, 1), waste(t), wide, tiles.index(t)

        mr, nr = min(tiles, key=rank)
    return _blocking(isa, mr, nr, m, n, k, threads)


def candidate_configs(
    m: int, n: int, k: int, isa: str | None = None, threads: int | None = None
) -> list[GemmConfig]:
    """Configs worth measuring for this shape, default first: every register-
    feasible tile, three KC choices, the heuristic's MC/NC. Pruned: no tile with
    more than half its columns padding, no duplicate."""
    isa = select_isa(isa)
    threads = max_threads() if threads is None else max(1, threads)
    out = [default_config(m, n, k, isa, threads)]
    k4 = max(4, _round_up(k, 4))
    for mr, nr in _TILES[isa]:
        if _round_up(max(n, 1), nr) - n > max(nr // 2, 0) and nr > _lanes(isa, nr):
            continue
        mr = min(mr, max(1, m)) if m < mr else mr
        base = _blocking(isa, mr, nr, m, n, k, threads)
        for kc in (base.kc, min(k4, base.kc * 2), max(4, _round_up(base.kc // 2, 4))):
            out.append(_blocking(isa, mr, nr, m, n, k, threads, kc=kc))
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


# ---------------------------------------------------------------------------
# Compiled kernels
# ---------------------------------------------------------------------------


class KernelTable:
    """The microkernels of one ``UkernelSpec``, by row count, compiled on demand.

    ``fptrs[rows - 1]`` is the address of the kernel for a tile of ``rows``
    rows (0 until ``ensure(rows)``): the array the drivers take. One table per
    spec per process (``kernel_table``), shared by every GEMM that uses it."""

    def __init__(self, spec: UkernelSpec):
        self.spec = spec
        self.fptrs = np.zeros(spec.mr, dtype=np.int64)  # 0: not compiled yet

    def ensure(self, rows: int) -> tuple[str, float]:
        """Make the ``rows``-row kernel available; returns how ("compiled", "disk"
        or "memory") and the seconds it took."""
        if self.fptrs[rows - 1]:
            return "memory", 0.0
        name = kernel_name(self.spec, rows)
        module = compile_module(ukernel_ir(self.spec, rows), self.spec.isa, (name,))
        self.fptrs[rows - 1] = module.addresses[name]
        return module.source, module.seconds

    def ensure_for(self, m: int) -> None:
        """The kernels a GEMM of ``m`` rows runs: full tiles and the remainder."""
        mr = self.spec.mr
        self.ensure(min(mr, max(m, 1)))
        if m > mr and m % mr:
            self.ensure(m % mr)


_PORTABLE_FPTRS: dict[int, np.ndarray] = {}


def portable_fptrs(mr: int) -> np.ndarray:
    """The ``fptrs`` array of the portable path: its one generic kernel for every
    row count (pass ``desc = NR << 16 | a_xor << 32`` to the drivers)."""
    fptrs = _PORTABLE_FPTRS.get(mr)
    if fptrs is None:
        from .portable import portable_ukernel  # compiles (or loads) the cfunc

        fptrs = _PORTABLE_FPTRS[mr] = np.full(mr, portable_ukernel.address, np.int64)
    return fptrs


_TABLES: dict[UkernelSpec, KernelTable] = {}
_TABLES_BY_KEY: dict[tuple, KernelTable] = {}  # the same tables, by a cheaper key
_TABLES_LOCK = threading.Lock()


def kernel_table(spec: UkernelSpec) -> KernelTable:
    """The process-wide kernel table of ``spec``."""
    with _TABLES_LOCK:
        table = _TABLES.get(spec)
        if table is None:
            table = _TABLES[spec] = KernelTable(spec)
        return table


def microkernels(
    config: GemmConfig, packed: PackedB, *, a_signed: bool = False,
    a_range: tuple[int, int] | None = None, allow_i16_pairs: bool = True, m: int | None = None,
    requant: str = "", a_by_address: bool = False,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """``(fptrs, desc)`` for the drivers: the kernels running ``config`` on these
    weights (compiled for ``m`` rows if given). On AVX2 the saturating
    ``vpmaddubsw`` kernel is chosen only when ``packed.i16_pairs_safe`` proves it
    exact for ``a_range`` (A's own values; default its whole dtype range).
    ``requant`` ("plain" / "qadd" / "qadd_s8" / "packed"): the kernels that store bytes
    (``ukernels`` REQUANT_DOC; not on the portable path). ``a_by_address``:
    the kernels that take A's rows as a table of addresses (ADDRESS_DOC;
    not on the portable path either)."""
    if config.isa == "portable" and requant:
        raise ValueError("the portable path has no requantizing microkernels")
    if config.isa == "portable" and a_by_address:
        raise ValueError("the portable path has no microkernels that take A rows by address")
    if config.isa == "portable":
        return portable_fptrs(config.mr), (config.nr << 16) | ((0x80 if a_signed else 0) << 32)
    pairs = "exact"
    if config.isa == "avx2" and allow_i16_pairs:
        lo, hi = a_range if a_range is not None else ((-128, 127) if a_signed else (0, 255))
        if a_signed:
            lo, hi = lo + 128, hi + 128
        if 0 <= lo <= hi <= 255 and packed.i16_pairs_safe(lo, hi):
            pairs = "i16"
    key = (config.isa, config.mr, config.nr, a_signed, pairs, requant, a_by_address)
    table = _TABLES_BY_KEY.get(key)
    if table is None:
        table = _TABLES_BY_KEY[key] = kernel_table(UkernelSpec(*key))
    if m is not None:
        table.ensure_for(m)
    return table.fptrs, 0


# the names kernels/_gemm.py was first written against
_KernelTable, _table, _portable_fptrs = KernelTable, kernel_table, portable_fptrs


@dataclass(frozen=True)
class CompileReport:
    config: GemmConfig
    ukernel_seconds: float  # llvmlite: compile or load from disk, this call
    driver_seconds: float  # Numba: compile or load from disk (first use in the process)
    ukernel_sources: tuple[str, ...]  # "compiled" | "disk" | "memory" per kernel


_DRIVERS_READY: set[tuple] = set()


def _warm_drivers(config: GemmConfig, a_dtype) -> float:
    """Compile (or load from Numba's disk cache) the drivers ``config`` uses."""
    key = (config.isa == "portable", config.threads > 1, parallel_backend())
    if key in _DRIVERS_READY:
        return 0.0
    t0 = time.perf_counter()
    a = np.zeros((config.mr, 4), a_dtype)
    gemm(a, pack_b(np.zeros((4, 1), np.int8), config), replace(config, kc=4, threads=1))
    if config.threads > 1:  # the parallel entry points, on an empty task range
        noop = (np.zeros(1, np.int64), *([0] * 13), 1, 1, 0)  # m = n = 0, mc = nc = 1
        if key[2] == "numba":
            drivers.run_parallel(*noop)
        else:
            drivers.run_claimed(np.zeros(1, np.int64), 0, *noop)
    _DRIVERS_READY.add(key)
    return time.perf_counter() - t0


def compile_config(
    config: GemmConfig,
    *,
    a_signed: bool = False,
    i16_pairs: bool = False,
    rows: tuple[int, ...] | None = None,
) -> CompileReport:
    """Make ``config`` ready to run: the microkernels for ``rows`` (default: a
    full MR tile; remainders compile on first use) and the Numba drivers."""
    t_uk = 0.0
    sources = []
    if config.isa != "portable":
        spec = UkernelSpec(
            config.isa, config.mr, config.nr, a_signed, "i16" if i16_pairs else "exact"
        )
        table = kernel_table(spec)
        for r in rows or (config.mr,):
            source, seconds = table.ensure(r)
            t_uk += seconds
            sources.append(source)
    t_drv = _warm_drivers(config, np.int8 if a_signed else np.uint8)
    return CompileReport(config, t_uk, t_drv, tuple(sources))


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def pack_b(b: np.ndarray, config: GemmConfig | int, isa: str | None = None) -> PackedB:
    """Pack weights ``b`` (int8 [K, N]) for ``config`` (or a panel width NR and
    the ISA path, default ``select_isa()``): the portable path has its own
    layout."""
    if isinstance(config, int):
        nr, isa = config, select_isa(isa)
    else:
        nr, isa = config.nr, config.isa
    return _pack_b(b, nr, _layout(isa))


def _layout(isa: str) -> str:
    return "kn" if isa == "portable" else "k4n"


def row_sums(a: np.ndarray) -> np.ndarray:
    """``sum_k a[m, k]`` (int32 [M]) of a 2-D uint8/int8 array, in A's own values."""
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype not in (np.uint8, np.int8):
        raise TypeError(f"A must be a 2-D uint8 or int8 array, got {a.dtype} {a.shape}")
    return drivers.row_sums(a)


def parallel_backend() -> str:
    """How ``threads > 1`` runs, from ``$QNNJIT_GEMM_PARALLEL``: ``"pool"``
    (default: helper threads pinned to the other CPUs claim tasks inside the
    GIL-free driver; nothing spins, no extra compile; ``threadpool``) or
    ``"numba"`` (``prange`` over Numba's threading layer: fastest on an idle
    machine, erratic on a loaded one, where OpenMP's spinning threads fight
    other processes)."""
    choice = os.environ.get("QNNJIT_GEMM_PARALLEL", "pool").strip().lower() or "pool"
    if choice not in ("pool", "numba"):
        raise ValueError(f"QNNJIT_GEMM_PARALLEL must be 'pool' or 'numba', not {choice!r}")
    return choice


def _run_on_pool(tasks: int, parts: int, args: tuple) -> None:
    """The tasks on ``parts`` threads (the caller and ``parts - 1`` helpers pinned
    to other CPUs, ``threadpool``), each claiming the next task from a shared
    atomic counter until none is left, inside the GIL-free driver
    (``drivers.run_claimed``)."""
    counter = np.zeros(1, np.int64)
    run_on_threads(drivers.run_claimed, parts, counter, tasks, *args)


def _threads_scope(threads: int):
    import numba

    class _Scope:
        def __enter__(self):
            self.before = numba.get_num_threads()
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

        def __exit__(self, *exc):
            numba.set_num_threads(self.before)

    return _Scope()


_PAGE = 4096


def _tail_readable(a: np.ndarray, row_bytes: int, address: int | None = None) -> bool:
    """May the kernels read ``row_bytes`` >= K bytes from the start of each row of
    ``a`` (unit column stride)? The bytes past K multiply zero weight padding,
    so their values never matter; they only have to be mapped memory. Rows
    before the last one run into the next row (or the row's own padding); the
    last row's over-read (< 4 bytes) is safe when it stays in the page of the
    row's last byte, or inside the array's base buffer."""
    m, k = a.shape
    if row_bytes == k or m == 0 or k == 0:
        return True
    last_row = (a.ctypes.data if address is None else address) + (m - 1) * a.strides[0]
    if (last_row + k - 1) // _PAGE == (last_row + row_bytes - 1) // _PAGE:
        return True
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds
    return last_row + row_bytes <= bounds(base)[1]


def gemm(
    a: np.ndarray,
    packed: PackedB,
    config: GemmConfig | None = None,
    *,
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
    a_range: tuple[int, int] | None = None,
    allow_i16_pairs: bool = True,
) -> np.ndarray:
    """``out[M, N] = a @ B + bias`` in int32 (exact modulo 2**32).

    ``a``: uint8 or int8 [M, K], unit stride along K. ``packed``: ``pack_b(B, ...)``
    with the same NR as ``config``. ``bias``: int32 [N] or None. ``out``: int32
    [M, N] with unit column stride (a view into a larger buffer is fine), else a
    new array. ``a_range``: proven bounds of ``a``'s values (enables the AVX2
    fast kernel when they exclude i16 saturation).
    """
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    if a.ndim != 2 or a.dtype.char not in "Bb":
        raise TypeError(f"A must be a 2-D uint8 or int8 array, got {a.dtype} {a.shape}")
    m, k = a.shape
    n = packed.n
    if k != packed.k:
        raise ValueError(f"A has K={k} but the packed weights have K={packed.k}")
    if config is None:
        isa = select_isa() if packed.layout == "k4n" else "portable"
        config = default_config(m, n, k, isa=isa, nr=packed.nr)
    if config.nr != packed.nr or _layout(config.isa) != packed.layout:
        raise ValueError(
            f"config {config.isa} NR={config.nr} but the weights were packed with "
            f"NR={packed.nr}, layout {packed.layout!r} (pack_b(B, config) matches)"
        )
    if out is None:
        out = np.empty((m, n), np.int32)
    elif (
        out.dtype != np.int32
        or out.shape != (m, n)
        or (m and n and out.strides[1] != 4)
        or out.strides[0] % 4
    ):
        raise ValueError(
            f"out must be int32 {(m, n)} with unit column stride, got "
            f"{out.dtype} {out.shape} strides {out.strides}"
        )
    if m == 0 or n == 0:
        return out
    signed = a.dtype.char == "b"
    a_addr = a.ctypes.data
    row_bytes = packed.k_groups * 4
    if a.strides[1] != 1 or a.strides[0] < 0 or not _tail_readable(a, row_bytes, a_addr):
        padded = np.zeros((m, row_bytes), a.dtype)
        padded[:, :k] = a
        a = padded
        a_addr = a.ctypes.data

    b_addr, zero_addr, s8_addr = packed.addresses
    init_addr = s8_addr if signed else zero_addr
    base = packed.s8_init if signed else packed.zero_init
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (n,) or bias.dtype.kind not in "iu":
            raise ValueError(
                f"bias must be an integer array of shape ({n},), got {bias.dtype} {bias.shape}"
            )
        init = base.copy()
        init[:n] = wrap_int32(base[:n].astype(np.int64) + bias.astype(np.int64))
        init_addr = init.ctypes.data

    kcg = config.kc // 4
    fptrs, desc = microkernels(
        config, packed, a_signed=signed, a_range=a_range, allow_i16_pairs=allow_i16_pairs, m=m
    )
    mc = min(config.mc, _round_up(m, config.mr))
    args = (
        fptrs,
        a_addr,
        a.strides[0],
        m,
        packed.k_groups,
        b_addr,
        packed.k_groups * packed.nr * 4,
        packed.nr,
        out.ctypes.data,
        out.strides[0] // 4,
        n,
        init_addr,
        config.mr,
        kcg,
        mc,
        config.nc,
        desc,
    )
    tasks = drivers.task_count(m, n, mc, config.nc)
    if config.threads > 1 and tasks > 1 and 2 * m * n * k >= MIN_PARALLEL_OPS:
        if parallel_backend() == "numba":
            with _threads_scope(config.threads):
                drivers.run_parallel(*args)
        else:
            _run_on_pool(tasks, min(config.threads, tasks), args)
    else:
        drivers.run_serial(*args)
    return out


# ---------------------------------------------------------------------------
# Measuring (the tuner's objective)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    config: GemmConfig
    seconds_min: float  # inf when the config failed
    seconds_median: float
    gops: float  # 2*M*N*K / seconds_min / 1e9
    error: str | None = None


def measure_config(
    config: GemmConfig,
    m: int,
    n: int,
    k: int,
    repeats: int = 10,
    *,
    a_dtype=np.uint8,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> Measurement:
    """Time ``config`` on random data of this shape (after a warm-up run that
    compiles). Each repeat runs the GEMM enough times to last ``min_seconds``.
    A config that fails to compile or run scores infinity, with the error."""
    try:
        rng = np.random.default_rng(seed)
        info = np.iinfo(a_dtype)
        a = rng.integers(info.min, info.max + 1, (m, k), dtype=a_dtype)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        w = pack_b(b, config)
        out = np.empty((m, n), np.int32)
        compile_config(config, a_signed=np.dtype(a_dtype) == np.int8)
        gemm(a, w, config, out=out)
        inner = 1
        if min_seconds > 0:
            t0 = time.perf_counter()
            gemm(a, w, config, out=out)
            one = max(time.perf_counter() - t0, 1e-7)
            inner = max(1, int(min_seconds / one))
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for _ in range(inner):
                gemm(a, w, config, out=out)
            times.append((time.perf_counter() - t0) / inner)
        best, med = min(times), statistics.median(times)
        return Measurement(config, best, med, 2.0 * m * n * k / best / 1e9)
    except Exception as exc:  # a failing config is a data point, not a crash
        return Measurement(config, float("inf"), float("inf"), 0.0, f"{type(exc).__name__}: {exc}")
