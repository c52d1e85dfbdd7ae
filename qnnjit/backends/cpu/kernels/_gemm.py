"""The conv / matmul kernels' door to the int8 GEMM engine (`backends/cpu/gemm.py`).

The engine's Numba driver (`drivers.run_serial`, calling the VNNI / AVX2 /
portable microkernel through its address) is called from *inside* the fused
kernels, one tile at a time: the kernel builds its tile of operands, the
engine fills a small int32 tile of C, and the kernel's epilogue turns it into
the stored result. So C never exists as a whole tensor, and one compiled
driver serves every layer (tile sizes and addresses are run-time arguments).

Two orientations:

- matmul (`plan_gemm`, `gemm_columns`): C[rows, N] = A @ B with the activation
  rows as the u8 operand A (signed activations arrive as `code + 128`, see
  `requant.byte_codes`) and the constant weights packed once as B
  (`gemm.pack_b`); C's rows are the output's rows.
- convolution (`plan_conv_gemm`, `conv_gemm_tile`): C[M, pixels] with the
  weights as A and the im2col tile as B, packed by the conv kernel itself
  (see below), so C's rows are the NCHW output's channel rows.

Zero points are the callers' business (they fold them into per-channel
constants and per-row or per-column terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import drivers, gemm
from ..calls import call_ukernel, call_ukernel_requant
from ..ukernels import REQUANT_FIELDS, UkernelSpec, tile_lanes
from ._bytetable import lookup_bytes, vbmi_lookups
from ._numba import jit
from .requant import (
    F_RY,
    FM_MULT,
    I_FAST,
    I_HI,
    I_LO,
    I_OFLIP,
    I_OOFF,
    I_PHI,
    I_PLO,
    I_POST,
    I_ROUND,
    I_YFIRST,
    I_YQMIN,
    P_LOOKUP,
    P_NONE,
    P_QADD,
    R_FLOAT,
)  # fmt: skip

# the requantizing microkernels' epilogue argument slots (ukernels.REQUANT_FIELDS)
(EP_F, EP_LDF, EP_OUT, EP_LDO, EP_OTHER, EP_YFIRST, EP_PLO, EP_PHI, EP_RATIOS, EP_YLO, EP_YHI,
 EP_YFLIP) = range(len(REQUANT_FIELDS))  # fmt: skip
# gparams slots; G_VBMI: byte tables may use vpermi2b (`_bytetable.vbmi_lookups`)
G_DESC, G_K4, G_KG, G_NR, G_MR, G_KCG, G_PANEL_BYTES, G_NC, G_VBMI = range(9)
G_SLOTS = 9


@dataclass
class GemmPlan:
    """Packed weights of a GEMM, and the engine's parameters for it."""

    config: gemm.GemmConfig
    data: np.ndarray  # int8 [panels, k_groups, nr*4]
    init: np.ndarray  # int32 [panels*nr], zeros
    fptrs: np.ndarray  # int64 [mr]: microkernel addresses by row count (0: not compiled)
    gparams: np.ndarray  # int64, the G_* slots
    packed: object  # the PackedB (the engine picks kernels from it)
    k: int
    n: int

    @property
    def k4(self) -> int:
        return int(self.gparams[G_K4])

    @property
    def mr(self) -> int:
        return self.config.mr

    @property
    def k_blocks(self) -> int:
        """The K blocks `gemm_requant_rows` cuts K into."""
        kcg = int(self.gparams[G_KCG])
        return -(-int(self.gparams[G_KG]) // kcg)

    def ensure_rows(self, rows: int, requant: str = "", *, by_address: bool = False,
                    a_signed: bool = False) -> None:  # fmt: skip
        """Compile (or load) the microkernels a tile of `rows` rows runs: the
        drivers' (MR-row blocks and a remainder), or with `requant` those of
        `gemm_requant_rows` (`row_block`'s blocks): the requantizing ones
        of the last K block, and the plain ones of the others if there are
        others; with `by_address` and `a_signed`, the variants `kernels`
        describes. (Plain kernels for single-block GEMMs were a third of
        MobileNetV2's microkernels, each ~50 ms of a cold compile.)"""
        sizes = row_block_sizes(rows, self.mr) if requant else {rows} if rows > 0 else set()
        stages = ("",)
        if requant:
            stages = ("", requant) if self.k_blocks > 1 else (requant,)
        for stage in stages:
            for size in sizes:
                self.kernels(stage, by_address=by_address, a_signed=a_signed, rows=size)

    def kernels(self, requant: str = "", *, by_address: bool = False, a_signed: bool = False,
                rows: int | None = None) -> np.ndarray:  # fmt: skip
        """The table of microkernel addresses by row count (compiled for `rows`
        rows if given, else as `ensure_rows` left it): requantizing ones
        with `requant`; with `by_address`, those that take A's rows as a
        table of addresses (ukernels ADDRESS_DOC); with `a_signed`, those
        that flip A's bytes to u8 as they load them."""
        fptrs, _ = gemm.microkernels(self.config, self.packed, requant=requant, m=rows,
                                     a_by_address=by_address, a_signed=a_signed)  # fmt: skip
        return fptrs

    def requant_fptrs(self, requant: str) -> np.ndarray:
        """The requantizing microkernels' table (`ensure_rows` compiles them)."""
        return self.kernels(requant)

    def init_with(self, bias: np.ndarray) -> np.ndarray:
        """An `init` whose sums start at `bias` (one int32 value per column)."""
        init = self.init.copy()
        init[: self.n] = np.asarray(bias).astype(np.int32)
        return init

    def describe(self) -> str:
        return self.config.describe()


def plan_gemm(b: np.ndarray, rows_hint: int) -> GemmPlan:
    """Pack `b` (int8 [K, N]) for tiles of about `rows_hint` rows."""
    k, n = b.shape
    config = gemm.default_config(max(rows_hint, 1), n, k, threads=1)
    packed = gemm.pack_b(np.asarray(b, dtype=np.int8), config)  # any strides
    # A is u8 over its whole range; on AVX2 the engine proves (or refutes) from
    # the weights that the fast i16-pair kernel cannot saturate.
    fptrs, desc = gemm.microkernels(config, packed)
    gparams = np.zeros(G_SLOTS, np.int64)
    gparams[G_DESC] = desc
    gparams[G_K4] = packed.k_groups * 4
    gparams[G_KG] = packed.k_groups
    gparams[G_NR] = config.nr
    gparams[G_MR] = config.mr
    gparams[G_KCG] = config.kc // 4
    gparams[G_PANEL_BYTES] = packed.k_groups * config.nr * 4
    gparams[G_NC] = packed.panels * config.nr
    gparams[G_VBMI] = vbmi_lookups(config.isa)
    init = np.zeros(packed.panels * config.nr, np.int32)
    return GemmPlan(config, np.ascontiguousarray(packed.data), init, fptrs, gparams, packed, k, n)


@jit(inline=True)
def column_span(n, nr, splits):
    """Columns per split when `n` columns are cut into `splits` ranges of
    whole NR panels, as even as they come (the last range may be shorter,
    or empty)."""
    return ((n + nr - 1) // nr + splits - 1) // splits * nr


@jit()
def gemm_columns(a, rows, c, n0, n1, fptrs, data, init, gp):
    """c[:rows, :n1 - n0] = a[:rows, :K] @ B[:, n0:n1] (int32, exact modulo
    2^32), column j at c[:, j - n0]: the panels of columns n0..n1 only (n0 a
    multiple of NR). `a` is uint8 [>= rows, K4] with columns K..K4 zero; `c`
    int32 [>= rows, >= n1 - n0]."""
    nr, mr = gp[G_NR], gp[G_MR]
    n = n1 - n0
    drivers.run_serial(
        fptrs, a.ctypes.data, a.shape[1], rows, gp[G_KG],
        data.ctypes.data + (n0 // nr) * gp[G_PANEL_BYTES], gp[G_PANEL_BYTES], nr,
        c.ctypes.data, c.shape[1], n, init.ctypes.data + 4 * n0, mr, gp[G_KCG],
        ((rows + mr - 1) // mr) * mr, ((n + nr - 1) // nr) * nr, gp[G_DESC],
    )  # fmt: skip


@jit()
def gemm_requant_rows(a, lda, rows, fptrs, rq_fptrs, data, init, gp, c, n0, n1, ep, out, other,
                      ldo, table, segment):  # fmt: skip
    """out[r * ldo + j] (bytes, at address `out`) = the requantized (A @ B)[r, j],
    for rows 0..rows of A (at address `a`, row stride `lda`) and columns
    n0..n1 of B (n0 a multiple of NR): the engine's loops (`drivers._task`,
    one row block) with the panels outermost, and the last K block of each
    panel run by the requantizing microkernels (`rq_fptrs`), which store
    bytes straight from their registers. Panels outermost, each kernel's
    prefetch (ukernels PREFETCH_DOC) fetches the very block the loops run
    next; K blocks outermost, a panel's next block waited for every other
    panel's, and left L2 meanwhile: ResNet-18's 512x512x3x3 convs (two K
    blocks of 147 KB a panel, eight panels) took 581-605 us with cold
    caches, now 554-568 (warm: 504). The tile's rows x K of A stay in L2
    either way (the tile is sized for its int32 sums, `c`).

    `segment` > 0: A's rows come by address (kernels that take them so,
    ukernels ADDRESS_DOC): K is cut into segments of `segment` groups of 4
    k, and `a` is the address of int64 [segments, lda]: row r's address for
    segment s at [s, r]. A K block may cross segments: the kernels walk
    them, keeping their sums in registers. `c` (int32 [>= rows, >= n1 -
    n0], column j - n0 for column j) holds the sums between K blocks,
    `init` (`init_with`) their start: the bias; `ep` (int64,
    ukernels.REQUANT_FIELDS) the kernels' epilogue arguments, with f at
    column 0 and the qadd scalars set by the caller; `other` the residual
    operand's address (qadd), like `out`; `table` (uint8[256] or empty): a
    byte table (`_bytetable`) the block's stored bytes then go through, in
    place while they are in cache: a lookup after the requantize."""
    mr, nr, kcg, k_groups = gp[G_MR], gp[G_NR], gp[G_KCG], gp[G_KG]
    cb, bb, ib, ldc = c.ctypes.data, data.ctypes.data, init.ctypes.data, c.shape[1]
    f0 = ep[EP_F]
    ep[EP_LDO] = ldo
    # the kernels' desc: the portable ones' tile (and rows, below); by
    # address, the segments' length and table stride instead (ADDRESS_DOC)
    desc = segment | (lda * 8) << 32 if segment > 0 else gp[G_DESC]
    for nn in range(n0, n1, nr):
        panel = bb + (nn // nr) * gp[G_PANEL_BYTES]
        nvalid = min(nr, n1 - nn)
        ep[EP_F] = f0 + 4 * nn
        k0 = 0
        while True:
            kg = min(kcg, k_groups - k0)
            if segment > 0:  # the block's rows by address: its first segment's table row
                s = k0 // segment
                a0, row_step, a_arg = a + s * lda * 8, 8, (k0 - s * segment) * 4
            else:
                a0, row_step, a_arg = a + k0 * 4, lda, lda
            last = k0 + kg >= k_groups
            accumulate = 1 if k0 > 0 else 0
            bp = panel + k0 * nr * 4
            for i in range(row_blocks(rows, mr)):
                mm, r = row_block(i, rows, mr)
                kdesc = desc if segment > 0 else desc | r
                ap, cp, ip = a0 + mm * row_step, cb + (mm * ldc + nn - n0) * 4, ib + nn * 4
                kernel = rq_fptrs[r - 1] if last else fptrs[r - 1]
                if kernel == 0:  # not compiled (`ensure_rows`): an error, not a jump to 0
                    raise RuntimeError("gemm_requant_rows: no microkernel for this row count")
                if last:
                    ep[EP_OUT], ep[EP_OTHER] = out + mm * ldo + nn, other + mm * ldo + nn
                    call_ukernel_requant(kernel, ap, a_arg, bp, kg, cp, ldc, ip, nvalid,
                                         accumulate, kdesc, ep.ctypes.data)  # fmt: skip
                else:
                    call_ukernel(kernel, ap, a_arg, bp, kg, cp, ldc, ip, nvalid, accumulate,
                                 kdesc)  # fmt: skip
            k0 += kg
            if last:
                break
    ep[EP_F] = f0
    if table.size:  # the block's bytes are still in L1 / L2
        lookup_rows(out + n0, rows, n1 - n0, ldo, table, gp[G_VBMI] != 0)


@jit(inline=True)
def row_blocks(rows, mr):
    """How many blocks `gemm_requant_rows` cuts `rows` rows into: the fewest
    of at most MR rows (`row_block`)."""
    return (rows + mr - 1) // mr


@jit(inline=True)
def row_block(i, rows, mr):
    """(first row, rows) of block i of `rows` rows: blocks as even as they
    come, a row more in the first ones, rather than MR-row blocks and a
    remainder. Why: a block reads all of its K block of B, so a block of a
    row or two reads B at up to six times the rate of the dot products,
    faster than L2 delivers it. ResNet-18's 7x7 convs (tiles of 30 and 19
    pixels, B panels of 295 KB): 30 = 6 * 5, but 19 = 6+6+6+1 became
    5+5+5+4, and each conv took 13-15 us (2.5-3 %) less."""
    blocks = row_blocks(rows, mr)
    base, extra = rows // blocks, rows % blocks
    return i * base + min(i, extra), base + 1 if i < extra else base


def row_block_sizes(rows: int, mr: int) -> set[int]:
    """The row counts of `row_block`'s blocks of `rows` rows (kernels to
    compile): the same arithmetic in Python."""
    if rows <= 0:
        return set()
    blocks = -(-rows // mr)
    return {rows // blocks, -(-rows // blocks)}


@jit(inline=True)
def lookup_rows(out, rows, width, ldo, table, vbmi):
    """The byte table over `rows` rows of `width` bytes, `ldo` apart, from
    address `out`, in place (one pass where the rows are contiguous)."""
    if width == ldo:
        lookup_bytes(out, out, rows * width, table, vbmi)
        return
    for r in range(rows):
        lookup_bytes(out + r * ldo, out + r * ldo, width, table, vbmi)


def requant_kind(plan: GemmPlan, ep, need_rowsum: bool) -> str:
    """The requantizing microkernels (ukernels REQUANT_DOC) that can store the
    result of `plan`'s GEMM followed by epilogue `ep` straight from their
    registers (`gemm_requant_rows`): "plain", "packed", "qadd" or "qadd_s8"
    (the residual's codes int8); "" when none can. They need the float
    requantize to 8 bits, alone or followed by a qadd or an 8-bit lookup
    (the table stage), and nothing between the GEMM and it (`need_rowsum`:
    a per-row term of a weight zero point). A plain requantize takes the
    "packed" kernels where `packs_exactly` allows and panels are 32
    columns or wider (one vector a row: the plain store is as fast as the
    packs). A qadd on zmm vectors needs output bounds that are the codes'
    whole range (its stores saturate instead of clamping: REQUANT_DOC)."""
    sc = ep.sc_i
    kinds = {P_NONE: "plain", P_QADD: "qadd", P_LOOKUP: "plain"}  # lookup: + `byte_table`
    if (
        plan.config.isa == "portable"
        or need_rowsum
        or not (sc[I_FAST] and sc[I_ROUND] == R_FLOAT and int(sc[I_POST]) in kinds)
        or ep.out_dtype.bits != 8
        or (sc[I_POST] == P_LOOKUP and ep.byte_table.size == 0)
    ):
        return ""
    kind = kinds[int(sc[I_POST])]
    if kind == "plain" and _packs(plan.config) and packs_exactly(plan.config.isa, ep.chan_f):
        return "packed"
    if kind == "qadd":  # the residual's bytes as codes: uint8 ones, or int8 ones
        codes = (int(sc[I_OFLIP]), int(sc[I_OOFF]))
        kind = {(0, 0): "qadd", (0x80, 0x80): "qadd_s8"}.get(codes, "")
        # zmm kernels clamp by saturation alone: to the codes' whole range
        # (the add's codes are the residual's type; a table may follow)
        whole = (int(sc[I_PLO]), int(sc[I_PHI])) == _QADD_RANGES.get(kind)
        return kind if whole or not _zmm(plan.config) else ""
    return kind


# the codes of each qadd kind (its residual's and its result's type)
_QADD_RANGES = {"qadd": (0, 255), "qadd_s8": (-128, 127)}


def _packs(config) -> bool:
    """Whether the "packed" kernels fit `config`'s panels: zmm vectors
    (`ukernels.tile_lanes`), two or more a row."""
    return config.nr >= 32 and _zmm(config)


def _zmm(config) -> bool:
    """Whether `config`'s kernels compute in zmm vectors: AVX-512, a panel
    width that is a multiple of 16 (`ukernels.tile_lanes`)."""
    return config.isa == "avx512_vnni" and tile_lanes(config.isa, config.nr) == 16


def packs_exactly(isa: str, chan_f: np.ndarray) -> bool:
    """May the "packed" microkernels (ukernels REQUANT_DOC) requantize with
    these per-channel constants? They convert the scaled sums to int32
    without clamping them first, which is exact when no sum can reach
    2^31: |f32(int32) * mult| <= 2^31 * 0.5."""
    mult = chan_f[FM_MULT]
    return isa == "avx512_vnni" and bool(np.all(np.abs(mult) <= 0.5))


@jit()
def requant_args(chan_f, sc_i, sc_f):
    """The requantizing microkernels' `ep` (ukernels.REQUANT_FIELDS) at column 0."""
    ep = np.zeros(EP_YFLIP + 1, np.int64)
    ep[EP_F], ep[EP_LDF] = chan_f.ctypes.data, chan_f.shape[1]
    # (the residual's byte codes are the kernel kind's: "qadd" or "qadd_s8")
    ep[EP_YFIRST], ep[EP_PLO], ep[EP_PHI] = sc_i[I_YFIRST], sc_i[I_PLO], sc_i[I_PHI]
    ep[EP_RATIOS] = sc_f.ctypes.data + 4 * F_RY  # ry, ro, fixed: consecutive float32
    # "packed" kernels: signed codes go through the unsigned byte range + 128
    flip = 128 if sc_i[I_YQMIN] < 0 else 0
    ep[EP_YLO], ep[EP_YHI], ep[EP_YFLIP] = sc_i[I_LO] + flip, sc_i[I_HI] + flip, flip
    return ep


# ---- channel-major GEMM for convolutions ------------------------------------------
# A convolution tile runs the GEMM the other way round: the weights are the
# u8 operand A (w + 128, [M, K4], read in place), the im2col tile is the s8
# operand B (x - 128), packed straight into the microkernel layout by the
# im2col loop, so C comes out [channel, pixel]: each output channel's pixels
# are contiguous, as NCHW stores them, and the epilogue runs over contiguous
# rows. The offsets:
#
#     sum_k (w+128)(x-128) = sum_k w*x - 128 sum_k w + 128 sum_k x - 16384 K
#
# The engine's per-column start value takes -128 * sum_k x (one per pixel,
# computed by the packing loop); the weight terms are one constant per channel.

# cparams slots
C_DESC, C_K4, C_KG, C_NR, C_MR, C_KCG, C_PANEL_BYTES, C_MC, C_M, C_COL = range(10)


@dataclass
class ConvGemmPlan:
    config: gemm.GemmConfig
    wa: np.ndarray  # uint8 [groups, M_g, K4]: w + 128, zero past K
    koff: np.ndarray  # int64 [K]: byte offset of k within a panel's column
    fptrs: np.ndarray
    cparams: np.ndarray
    table: object | None

    @property
    def nr(self) -> int:
        return self.config.nr

    def ensure_rows(self) -> None:
        if self.table is None:
            return
        mr, m = self.config.mr, int(self.cparams[C_M])
        for r in {min(mr, m), m % mr}:
            if r and not self.fptrs[r - 1]:
                self.table.ensure(r)

    def describe(self) -> str:
        return self.config.describe()


def plan_conv_gemm(w_groups: list[np.ndarray], pixels_hint: int) -> ConvGemmPlan:
    """`w_groups`: int8 [M_g, K] per group."""
    mg, k = w_groups[0].shape
    config = gemm.default_config(max(mg, 1), max(pixels_hint, 1), k, threads=1)
    k4 = -(-k // 4) * 4
    wa = np.zeros((len(w_groups), max(mg, 1), k4), np.uint8)
    for g, w in enumerate(w_groups):
        wa[g, :mg, :k] = (w.astype(np.int16) + 128).astype(np.uint8)
    nr = config.nr
    # The engine's B layouts (packing.py): "k4n" data[p, g, 4n + q] for the SIMD
    # kernels, "kn" data[p, g, q*NR + n] for the portable one; column n of a
    # panel starts at n * col, tap k sits koff[k] further.
    portable = config.isa == "portable"
    col = 1 if portable else 4
    koff = np.array(
        [(q >> 2) * nr * 4 + (q & 3) * (nr if portable else 1) for q in range(k)], np.int64
    )
    table = None
    if portable:
        fptrs = gemm.portable_fptrs(config.mr)
        desc = nr << 16
    else:  # B holds activations: no proof against i16 saturation, so "exact" on AVX2
        table = gemm.kernel_table(UkernelSpec(config.isa, config.mr, nr, False, "exact"))
        fptrs, desc = table.fptrs, 0
    cparams = np.zeros(10, np.int64)
    cparams[C_DESC] = desc
    cparams[C_K4] = k4
    cparams[C_KG] = k4 // 4
    cparams[C_NR] = nr
    cparams[C_MR] = config.mr
    cparams[C_KCG] = config.kc // 4
    cparams[C_PANEL_BYTES] = (k4 // 4) * nr * 4
    cparams[C_MC] = -(-mg // config.mr) * config.mr
    cparams[C_M] = mg
    cparams[C_COL] = col
    plan = ConvGemmPlan(config, wa, koff, fptrs, cparams, table)
    plan.ensure_rows()
    return plan


@jit()
def conv_gemm_tile(wa, g, bpack, npix, c, init, fptrs, cp):
    """c[:M, :npix] = (w_g + 128) @ B + init (int32, exact modulo 2^32), B the
    packed tile `bpack` (uint8 storage of the int8 x - 128)."""
    nr = cp[C_NR]
    panels = (npix + nr - 1) // nr
    drivers.run_serial(
        fptrs, wa.ctypes.data + g * wa.shape[1] * wa.shape[2], cp[C_K4], cp[C_M], cp[C_KG],
        bpack.ctypes.data, cp[C_PANEL_BYTES], nr, c.ctypes.data, c.shape[1], npix,
        init.ctypes.data, cp[C_MR], cp[C_KCG], cp[C_MC], panels * nr, cp[C_DESC],
    )  # fmt: skip
