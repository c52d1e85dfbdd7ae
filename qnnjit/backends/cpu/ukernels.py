"""The int8 GEMM microkernels, generated as LLVM IR text and compiled by llvmlite.

One microkernel computes a tile ``C[rows, NR]`` (i32) of ``A[rows, K] (u8) @
B[K, NR] (s8)`` over ``kg`` groups of four k, keeping the whole tile in vector
registers (``rows * NR/16`` zmm, or ``rows * NR/8`` ymm, accumulators; AVX-512
panels whose NR is not a multiple of 16 use ymm too: ``tile_lanes``):

    for g in range(kg):                       # 4 consecutive k per step
        for r: a_r = broadcast(u32 A[r, 4g:4g+4])   # 4 bytes to every lane
        for j: b_j = packed B vector j of group g   # 16 (or 8) columns x 4 k
        for r, j: acc[r][j] = dot4(acc[r][j], a_r, b_j)

``dot4`` is ``vpdpbusd`` on ``avx512_vnni`` (wrapping i32, exact). On ``avx2``
it is ``vpmaddwd(vpmaddubsw(a, b), 1) + acc``; ``vpmaddubsw`` adds each pair of
u8*s8 products into a *saturating* i16, so two variants exist:

- ``pairs="i16"``: one ``vpmaddubsw``; exact only where no pair sum
  ``a0*b0 + a1*b1`` can leave [-32768, 32767] (the caller proves it from the
  weights and the activation range: ``packing.i16_pairs_safe``);
- ``pairs="exact"``: ``a = (a & 0x7f) + (a & 0x80)``; each half's pair sums
  stay within i16 (|127*b0 + 127*b1| <= 32512 and 128*b0 + 128*b1 in
  [-32768, 32512]), so two ``vpmaddubsw`` + two ``vpmaddwd`` are exact, at
  twice the cost.

Signed activations (``a_signed``): the kernel flips each A byte's top bit
(``a ^ 0x80 = a + 128`` as u8) right after loading; the caller's accumulator
init carries ``-128 * sum_k B[k, n]`` (``packing``), so the result is exact.
SIGNED_DOC. The flip is one ``vpxord`` on the broadcast vector, written as
inline asm: an ``xor`` that LLVM sees it moves onto the scalar before the
broadcast, which then comes from a general register instead of memory, and
the kernel spilled all of its broadcasts (ResNet-18's 3x3 convs at 72% of
peak instead of 93%); an ``xor`` of the vector sent LLVM's code generator
into an endless loop.

Why IR text compiled by llvmlite, rather than ``numba.extending.intrinsic``
emitting the vector code inside the Numba driver: the kernel is specialized on
(rows, NR, ISA, signedness, pairs) and compiled by its own target machine, so
the AVX2 path is compiled without AVX-512 on an AVX-512 host (testable here),
the code is small, inspectable (``assembly()``) and its object file is cached
on disk by hash, independently of Numba; the Numba driver that does the
blocking loops stays one generic function (tile sizes are run-time arguments)
cached by Numba once, calling kernels through a function pointer
(``calls.call_ukernel``). The price, one indirect call per tile, is about 1% of
a tile's work for KC >= 64.

Kernel ABI (C, all pointers unaligned-safe):

    void kernel(const uint8 *a, int64 lda,      // A[r, 4g + q] at a[r*lda + 4g + q]
                const int8 *b,                  // group g at b[g * NR*4], column n's
                                                //   4 k at bytes 4n..4n+3
                int64 kg,                       // groups of 4 k (>= 0)
                int32 *c, int64 ldc,            // C[r, n] at c[r*ldc + n]
                const int32 *init,              // NR initial values (if !accumulate)
                int64 nvalid,                   // columns stored: n < nvalid <= NR
                int64 accumulate,               // 0: acc = init; else acc = C
                int64 desc)                     // rows | NR << 16 | a_xor << 32, for
                                                //   generic kernels; the segments by
                                                //   address (ADDRESS_DOC); else ignored

``drivers.portable_ukernel`` implements the same ABI in plain Numba code.

ADDRESS_DOC. An ``a_by_address`` kernel reads A's rows by address, K cut
into segments of ``S`` groups (``desc = S | T << 32``; no rows field): in
segment s of its block, row r at ``table[s][r]``, where ``a`` points to
``table[0][0]`` (int64 addresses, ``T`` bytes from one segment's row of
them to the next's), the block starting ``lda`` bytes (a multiple of 4,
< 4*S) into segment 0's rows. The kernel walks the segments its ``kg``
groups cross, loading the next row of addresses at each segment's end and
keeping its sums in registers, while B runs on contiguously. This lets a
convolution's GEMM read its A rows straight from the NHWC input (an
implicit GEMM, ``conv_nhwc.conv_gemm_nhwc_by_address``) instead of from
an im2col copy: for window row kh of a pixel, the taps (kw, c) are one
contiguous run of KW*C input bytes, one segment of K, and consecutive
pixels' runs may overlap. The first version ended every K block at a
segment's end instead: the extra int32 round trips of the sums cost more
than the im2col they saved for up to 48 input channels (56x56 3x3 convs,
64 outputs); walking the segments, rows by address are 0.6-2.7 % faster
than im2col from 4 channels up, and ResNet-18's 56x56 3x3 convs 1.3-1.7 %
faster than before.

PREFETCH_DOC. The packed B is one contiguous panel per NR columns over all of
K. While a kernel runs groups g.. of its block, it prefetches into L2
(``prefetcht1``) the bytes ``kg`` groups on: the same groups of its
panel's next K block or, after the panel's last block, of the next
panel's first (past the last panel, bytes outside B, which a prefetch may
touch). The convolutions' loops (`kernels/_gemm.gemm_requant_rows`) run
the panels outermost, so that is the block they run next; the drivers'
(`drivers._task`) run every panel's block k0 before any panel's next,
which the prefetch serves while the blocks of all panels fit in L2 (the
L1-sized blocks of AVX2). Between two runs of a model the weights of
ResNet-18's last stage (2.4 MB a conv) leave the caches, and its convs
wait on memory: with the caches flushed first, one 512x512x3x3 conv took
587-616 us without the prefetch, 546-570 with, 518-527 with warm caches
(measured with L1-sized K blocks; again 581-605, 554-568 and 504 with
AVX-512's L2-sized ones, before and after the conv loops put the panels
outermost). Every row tile of a panel block prefetches it again: the
redundant prefetches hit L1/L2 and cost nothing measurable with warm
caches.

REQUANT_DOC. A ``requant`` kernel (the last K block of a GEMM whose epilogue
is the plain float requantize to bytes) takes one more argument, ``const
int64 *ep``, the fields ``REQUANT_FIELDS`` (f, ldf, out, ldo; then qadd's;
then "packed"'s): instead of storing C it stores, for column n (its channel),

    v = rint(f32(acc) * mult[n]);  y = min(max(v, lo[n]), hi[n]) + zp[n]
    out[r*ldo + n] = i32(y) truncated to a byte

where the sums ``acc`` started at the bias: the caller's ``init`` holds it
(int32 addition wraps alike whenever it is added), ``mult, lo, hi, zp``
float32 rows of ``f`` ``ldf`` apart (lo, hi: the clamp bounds minus zp). These
are the steps, in the same precision, of ``kernels/requant.ep_tile``'s fast
path, so the bytes are identical. The tile never goes through memory as int32.

- ``"plain"`` clamps first, then rounds to nearest even while converting to
  int32, and adds zp as an integer: the same bytes in two fewer operations
  (``requantize_int_code``).
- ``"packed"`` (AVX-512) converts ``f32(acc) * mult`` to int32 unclamped
  (the caller guarantees |mult| <= 0.5, so no value reaches 2^31), then
  saturates while packing: ``vpackssdw`` pairs of vectors to int16, adds
  ``zp + yflip`` with int16 saturation, ``vpackuswb`` to bytes, restores the
  column order (one ``vpermd``), clamps the bytes to [ylo, yhi] when that is
  narrower than [0, 255], and flips them back (``^ yflip``) when ``yflip``
  is not 0: it is 128 for signed codes (they go through the unsigned byte
  range as code + 128) and ``ylo``, ``yhi`` are the code bounds plus it. A
  value saturated to int16 stays past both byte bounds after the zero
  point, so the bytes are those of the clamp. Per 16 outputs, 2 to 3.5
  vector operations fewer than "plain", and one store per row of up to 64
  columns.
- ``"qadd"`` then adds the residual operand's byte at ``other[r*ldo + n]`` as
  ``requant._fast_post`` does: its code ``o`` (the byte as uint8; as int8
  for ``"qadd_s8"``: one extension rather than ``(byte ^ flip) -
  offset``, two operations a vector more, ResNet-18's 56x56 residual steps
  6 us each), MLAS's
  ``fma(A, rA, fma(B, rB, fixed))`` (``yfirst``: the code is A; ``ratios``
  points at float32 {ry, ro, fixed}), rint, out-of-int32-range -> ``plo``,
  saturation to [plo, phi]. The FMA order is a run-time flag: the stores
  are emitted once per order, so each computes only its own. ``vcvtps2dq``
  does the rint and the range check at once (out of range it gives
  INT32_MIN, which the saturation makes ``plo``). With AVX-512 the codes
  are stored like "packed"'s, up to 64 bytes a store, and [plo, phi] must
  be the codes' whole range: the packs' saturation is the clamp (int8
  codes go through the unsigned byte range + 128; uint8 ones need neither
  the add nor the xor back, 1.25 vector operations fewer per 16 outputs:
  ResNet-18's 56x56 residual conv steps 535 -> 532 us). At ResNet-18's
  56x56 residual convs, the per-vector masked byte stores took 29% of the
  stage's samples. Its loads of the residual bytes waited on L2: the
  kernel prefetches its tile of them into L1 first thing, before the K
  loop (`prefetch_other`). ResNet-18's 56x56 residual conv steps took
  594-598 us, now 557-562 (the plain 56x56 convs: 530-540); the deeper
  ones gained 8-14 us each (per-step minima within whole runs, one
  thread; whole runs did not resolve it). Prefetching the output bytes
  for writing gained nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "UkernelSpec", "ukernel_ir", "kernel_name", "UNROLL", "REQUANT_FIELDS", "requantize_code",
    "requant_declarations", "requantize_int_code", "requantize_sums_code",
]  # fmt: skip

UNROLL = 4  # k-groups per main-loop iteration
# The requantizing kernels' ``ep`` argument: int64 fields, in this order
# (REQUANT_DOC); the qadd fields only for the qadd kinds.
REQUANT_FIELDS = (
    "f", "ldf", "out", "ldo",
    "other", "yfirst", "plo", "phi", "ratios",
    "ylo", "yhi", "yflip",
)  # fmt: skip

_ARGS = (
    "ptr noalias nocapture readonly %a, i64 %lda, ptr noalias nocapture readonly %b, "
    "i64 %kg, ptr noalias nocapture %c, i64 %ldc, ptr noalias nocapture readonly %init, "
    "i64 %nvalid, i64 %accumulate, i64 %desc"
)


@dataclass(frozen=True)
class UkernelSpec:
    """What one compiled microkernel module is specialized on. The module holds
    one function per row count 1..mr (the last, partial row tile of M)."""

    isa: str  # "avx512_vnni" | "avx2"
    mr: int
    nr: int
    a_signed: bool = False
    pairs: str = "exact"  # avx2 only: "exact" | "i16"
    # "": store C; "plain" / "qadd" / "qadd_s8" / "packed": store bytes (REQUANT_DOC)
    requant: str = ""
    a_by_address: bool = False  # A rows by address (ADDRESS_DOC)

    def __post_init__(self):
        if self.isa not in _LANES:
            raise ValueError(f"no LLVM microkernel for ISA {self.isa!r}")
        if self.mr < 1 or self.nr < MIN_NR or self.nr % MIN_NR:
            raise ValueError(
                f"bad tile {self.mr}x{self.nr} for {self.isa} (NR a multiple of {MIN_NR})"
            )
        if self.pairs not in ("exact", "i16"):
            raise ValueError(f"pairs must be 'exact' or 'i16', not {self.pairs!r}")
        if self.isa != "avx2" and self.pairs != "exact":
            raise ValueError("pairs='i16' exists only on the avx2 path")
        if self.requant not in ("", "plain", "qadd", "qadd_s8", "packed"):
            raise ValueError(
                f"requant must be '', 'plain', 'qadd', 'qadd_s8' or 'packed', not {self.requant!r}"
            )
        if self.requant == "packed" and self.lanes != 16:
            raise ValueError("requant='packed' exists only on the avx512_vnni path, NR % 16 == 0")

    @property
    def lanes(self) -> int:
        return tile_lanes(self.isa, self.nr)

    @property
    def qadd(self) -> bool:
        """A residual qadd's kernel (its residual's codes uint8, or int8)."""
        return self.requant in ("qadd", "qadd_s8")

    def names(self) -> tuple[str, ...]:
        return tuple(kernel_name(self, rows) for rows in range(1, self.mr + 1))


_LANES = {"avx512_vnni": 16, "avx2": 8}  # the widest vector's i32 lanes
MIN_NR = 8  # every NR is a multiple of 8: the narrowest vector's lanes


def tile_lanes(isa: str, nr: int) -> int:
    """The i32 lanes of the vectors a tile of width ``nr`` computes in: the
    ISA's widest that divides ``nr``. An AVX-512 panel of 24 columns (a
    MobileNetV2 projection's N) runs as three ymm vectors a row rather
    than two zmm with 8 columns wasted: Zen 4 executes a zmm ``vpdpbusd`` as
    two ymm halves, so ymm ones issue twice as often and the multiply-add
    rate is the same (measured: 234 GMAC/s both ways, one core)."""
    lanes = _LANES[isa]
    return lanes if nr % lanes == 0 else MIN_NR


_MADDUBS = "@llvm.x86.avx2.pmadd.ub.sw"
_MADDWD = "@llvm.x86.avx2.pmadd.wd"


def kernel_name(spec: UkernelSpec, rows: int) -> str:
    sign = "s8" if spec.a_signed else "u8"
    variant = "" if spec.isa != "avx2" else f"_{spec.pairs}"
    stage = f"_rq_{spec.requant}" if spec.requant else ""
    rows_by = "_byaddr" if spec.a_by_address else ""
    return f"qnnjit_gemm_{spec.isa}{variant}_{sign}_{rows}x{spec.nr}{stage}{rows_by}"


def _splat(ty: str, lanes: int, value: int) -> str:
    return "<" + ", ".join(f"{ty} {value}" for _ in range(lanes)) + ">"


def requant_declarations(lanes: int) -> str:
    """The intrinsics the requantizing output stages call (GEMM and depthwise)."""
    return (
        f"declare <{lanes} x float> @llvm.rint.v{lanes}f32(<{lanes} x float>)\n"
        f"declare <{lanes} x i64> @llvm.masked.load.v{lanes}i64.p0(ptr, i32, <{lanes} x i1>, "
        f"<{lanes} x i64>)\n"
        f"declare <{lanes} x float> @llvm.masked.load.v{lanes}f32.p0(ptr, i32, <{lanes} x i1>, "
        f"<{lanes} x float>)\n"
        f"declare void @llvm.masked.store.v{lanes}i8.p0(<{lanes} x i8>, ptr, i32, <{lanes} x i1>)\n"
        f"declare <{lanes} x i8> @llvm.masked.load.v{lanes}i8.p0(ptr, i32, <{lanes} x i1>, "
        f"<{lanes} x i8>)\n"
        f"declare <{lanes} x float> @llvm.fma.v{lanes}f32(<{lanes} x float>, <{lanes} x float>, "
        f"<{lanes} x float>)\n"
    ) + _CVT_RN_DECL[lanes]


def _vpdpbusd(lanes: int) -> str:
    return f"@llvm.x86.avx512.vpdpbusd.{32 * lanes}"


def _declarations(isa: str, lanes: int) -> str:
    vec, mask = f"<{lanes} x i32>", f"<{lanes} x i1>"
    masked = (
        f"declare {vec} @llvm.masked.load.v{lanes}i32.p0(ptr, i32, {mask}, {vec})\n"
        f"declare void @llvm.masked.store.v{lanes}i32.p0({vec}, ptr, i32, {mask})\n"
    )
    if isa == "avx512_vnni":
        return f"declare {vec} {_vpdpbusd(lanes)}({vec}, {vec}, {vec})\n" + masked
    return (
        "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)\n"
        "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)\n"
    ) + masked


class _Emitter:
    """Builds one kernel function's body line by line with unique SSA names."""

    def __init__(self, spec: UkernelSpec, rows: int):
        self.spec = spec
        self.rows = rows
        self.nj = spec.nr // spec.lanes
        self.lines: list[str] = []
        self.vec = f"<{spec.lanes} x i32>"
        # B's group 0 for the K loops: the segment's first group by address
        self.b = "%bseg" if spec.a_by_address else "%b"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def label(self, name: str) -> None:
        self.lines.append(f"{name}:")

    def step(self, tag: str, group: str, acc: dict) -> dict:
        """One group of 4 k at index ``group`` (an i64 SSA value): returns the new
        accumulator names."""
        spec, vec, lanes = self.spec, self.vec, self.spec.lanes
        e = self.emit
        e(f"%{tag}.ao = shl i64 {group}, 2")
        e(f"%{tag}.bo = mul i64 {group}, {spec.nr * 4}")
        a_vals = []
        for r in range(self.rows):
            e(f"%{tag}.pa{r} = getelementptr i8, ptr %arow{r}, i64 %{tag}.ao")
            e(f"%{tag}.x{r} = load i32, ptr %{tag}.pa{r}, align 1")
            e(f"%{tag}.i{r} = insertelement {vec} poison, i32 %{tag}.x{r}, i64 0")
            splat = f"{vec} poison, {vec} zeroinitializer"
            e(f"%{tag}.bc{r} = shufflevector {vec} %{tag}.i{r}, {splat}")
            a_vals.append(f"%{tag}.bc{r}")
            if spec.a_signed:  # a + 128 as u8: flip each byte's top bit (SIGNED_DOC)
                # EVEX (vpxord) on AVX-512, where ymm vectors may live in ymm16-31
                op = "vpxord" if spec.isa == "avx512_vnni" else "vpxor"
                flip = _splat("i32", lanes, -0x7F7F7F80)
                e(f'%{tag}.bs{r} = call {vec} asm "{op} $2, $1, $0", "=v,v,v"'
                  f"({vec} %{tag}.bc{r}, {vec} {flip})")  # fmt: skip
                a_vals[-1] = f"%{tag}.bs{r}"
        b_vals = []
        for j in range(self.nj):
            e(f"%{tag}.bo{j} = add i64 %{tag}.bo, {j * lanes * 4}")
            e(f"%{tag}.pb{j} = getelementptr i8, ptr {self.b}, i64 %{tag}.bo{j}")
            e(f"%{tag}.b{j} = load {vec}, ptr %{tag}.pb{j}, align 1")
            b_vals.append(f"%{tag}.b{j}")
        out = {}
        if spec.isa == "avx512_vnni":
            for r in range(self.rows):
                for j in range(self.nj):
                    e(
                        f"%{tag}.acc{r}_{j} = call {vec} {_vpdpbusd(lanes)}("
                        f"{vec} {acc[r, j]}, {vec} {a_vals[r]}, {vec} {b_vals[j]})"
                    )
                    out[r, j] = f"%{tag}.acc{r}_{j}"
            return out
        # avx2
        b8 = []
        for j in range(self.nj):
            e(f"%{tag}.b8_{j} = bitcast {vec} {b_vals[j]} to <32 x i8>")
            b8.append(f"%{tag}.b8_{j}")
        ones = _splat("i16", 16, 1)
        for r in range(self.rows):
            e(f"%{tag}.a8_{r} = bitcast {vec} {a_vals[r]} to <32 x i8>")
            if spec.pairs == "i16":
                halves = [f"%{tag}.a8_{r}"]
            else:
                e(f"%{tag}.alo{r} = and <32 x i8> %{tag}.a8_{r}, {_splat('i8', 32, 127)}")
                e(f"%{tag}.ahi{r} = and <32 x i8> %{tag}.a8_{r}, {_splat('i8', 32, -128)}")
                halves = [f"%{tag}.alo{r}", f"%{tag}.ahi{r}"]
            for j in range(self.nj):
                cur = acc[r, j]
                for h, a8 in enumerate(halves):
                    p = f"%{tag}.p{r}_{j}_{h}"
                    e(f"{p} = call <16 x i16> {_MADDUBS}(<32 x i8> {a8}, <32 x i8> {b8[j]})")
                    e(f"{p}w = call <8 x i32> {_MADDWD}(<16 x i16> {p}, <16 x i16> {ones})")
                    e(f"%{tag}.acc{r}_{j}_{h} = add <8 x i32> {cur}, {p}w")
                    cur = f"%{tag}.acc{r}_{j}_{h}"
                out[r, j] = cur
        return out

    def prefetch_next_block(self, group: str) -> None:
        """Prefetch into L2 the bytes of the next K block of this panel that
        correspond to main-loop groups ``group``.. ``group + UNROLL`` of this
        one: ``kg`` groups on, as the panel is contiguous over K (PREFETCH_DOC)."""
        e, row = self.emit, self.spec.nr * 4
        e(f"%pf.next = mul i64 %kg, {row}")
        e(f"%pf.g = mul i64 {group}, {row}")
        e("%pf.base = add i64 %pf.g, %pf.next")
        for i in range(UNROLL * row // 64):  # one per 64-byte line
            e(f"%pf.o{i} = add i64 %pf.base, {i * 64}")
            e(f"%pf.p{i} = getelementptr i8, ptr {self.b}, i64 %pf.o{i}")
            e(f"call void @llvm.prefetch.p0(ptr %pf.p{i}, i32 0, i32 2, i32 1)")  # prefetcht1

    def phis(self, tag: str, incoming: list[tuple[dict, str]]) -> dict:
        out = {}
        for r in range(self.rows):
            for j in range(self.nj):
                srcs = ", ".join(f"[ {acc[r, j]}, %{blk} ]" for acc, blk in incoming)
                self.emit(f"%{tag}{r}_{j} = phi {self.vec} {srcs}")
                out[r, j] = f"%{tag}{r}_{j}"
        return out

    def loop_phis(self, at: int, name: str, entry: tuple, back: tuple) -> None:
        """Insert at line `at` (a loop header's first) the accumulator phis
        `%{name}r_j`: from `entry` = (values, block) on entry, from `back` on the
        back edge (whose values the body emitted after the header)."""
        (first, first_block), (last, last_block) = entry, back
        self.lines[at:at] = [
            f"  %{name}{r}_{j} = phi {self.vec} [ {first[r, j]}, %{first_block} ], "
            f"[ {last[r, j]}, %{last_block} ]"
            for r in range(self.rows)
            for j in range(self.nj)
        ]

    def function(self) -> str:
        spec, vec, lanes, rows, nj = self.spec, self.vec, self.spec.lanes, self.rows, self.nj
        e, label = self.emit, self.label
        suffix = f"v{lanes}i32"
        iota = "<" + ", ".join(f"i32 {i}" for i in range(lanes)) + ">"
        label("entry")
        e("%nv32 = trunc i64 %nvalid to i32")
        e(f"%nvi = insertelement {vec} poison, i32 %nv32, i64 0")
        e(f"%nvs = shufflevector {vec} %nvi, {vec} poison, {vec} zeroinitializer")
        for j in range(nj):
            e(f"%col{j} = add {vec} {iota}, {_splat('i32', lanes, j * lanes)}")
            e(f"%mask{j} = icmp slt {vec} %col{j}, %nvs")
        for r in range(rows):
            if not spec.a_by_address:  # (by address: per segment, `segments`)
                e(f"%aoff{r} = mul i64 %lda, {r}")
                e(f"%arow{r} = getelementptr i8, ptr %a, i64 %aoff{r}")
            for j in range(nj):
                e(f"%coff{r}_{j} = mul i64 %ldc, {r}")
                e(f"%coffj{r}_{j} = add i64 %coff{r}_{j}, {j * lanes}")
                e(f"%cp{r}_{j} = getelementptr i32, ptr %c, i64 %coffj{r}_{j}")
        if spec.qadd:
            self.prefetch_other()
        e("%isacc = icmp ne i64 %accumulate, 0")
        e("br i1 %isacc, label %fromc, label %frominit")

        label("fromc")
        from_c = {}
        for r in range(rows):
            for j in range(nj):
                e(
                    f"%lc{r}_{j} = call {vec} @llvm.masked.load.{suffix}.p0(ptr %cp{r}_{j}, i32 4, "
                    f"<{lanes} x i1> %mask{j}, {vec} zeroinitializer)"
                )
                from_c[r, j] = f"%lc{r}_{j}"
        e("br label %start")

        label("frominit")
        from_init = {}
        for j in range(nj):
            e(f"%ip{j} = getelementptr i32, ptr %init, i64 {j * lanes}")
            e(f"%li{j} = load {vec}, ptr %ip{j}, align 4")
        for r in range(rows):
            for j in range(nj):
                from_init[r, j] = f"%li{j}"
        e("br label %start")

        label("start")
        acc0 = self.phis("acc0_", [(from_c, "fromc"), (from_init, "frominit")])
        if spec.a_by_address:
            final = self.segments(acc0)
            label("store")
        else:
            final = self.k_loops(acc0, "start", "%kg", "store")
        if spec.requant:
            self.requantize_store(final)
        else:
            for r in range(rows):
                for j in range(nj):
                    e(
                        f"call void @llvm.masked.store.{suffix}.p0({vec} {final[r, j]}, "
                        f"ptr %cp{r}_{j}, i32 4, <{lanes} x i1> %mask{j})"
                    )
        e("ret void")
        body = "\n".join(self.lines)
        name = kernel_name(spec, rows)
        args = _ARGS + (", ptr nocapture readonly %ep" if spec.requant else "")
        # alignstack(64): kernels that spill vectors (qadd's epilogue holds
        # more constants than registers) spill them to 64-byte aligned
        # slots. Without it the slots were only as aligned as the caller's
        # stack happened to be, which varies by process (stack ASLR), and in
        # three processes of four each zmm spill and reload split a cache
        # line: ResNet-18's 56x56 residual convs took 583-589 us there, 543-
        # 550 in the others; now 543-549 in every process.
        return f"define void @{name}({args}) nounwind alignstack(64) {{\n{body}\n}}\n"

    def k_loops(self, acc: dict, block: str, count: str, exit_label: str) -> dict:
        """The K loops over groups 0..`count` (an i64 SSA value) from block
        `block`, where the sums are `acc`: UNROLL groups an iteration, then
        one at a time; they end by branching to `exit_label`, which they
        open, with its phis of the final sums (returned)."""
        e, label = self.emit, self.label
        e(f"%nmain = udiv i64 {count}, {UNROLL}")
        e("%hasmain = icmp ne i64 %nmain, 0")
        e("br i1 %hasmain, label %main, label %mid")

        # main loop: UNROLL groups per iteration
        label("main")
        e(f"%it = phi i64 [ 0, %{block} ], [ %it.next, %main ]")
        # accumulator phis refer to the loop's last values, known after the body
        phi_at = len(self.lines)
        e("%g0 = mul i64 %it, " + str(UNROLL))
        self.prefetch_next_block("%g0")
        cur = {k: f"%accm_{k[0]}_{k[1]}" for k in acc}
        for u in range(UNROLL):
            g = f"%g{u}" if u == 0 else f"%gu{u}"
            if u:
                e(f"%gu{u} = add i64 %g0, {u}")
            cur = self.step(f"m{u}", g, cur)
        main_out = cur
        e("%it.next = add i64 %it, 1")
        e("%mdone = icmp eq i64 %it.next, %nmain")
        e("br i1 %mdone, label %mid, label %main")
        self.loop_phis(phi_at, "accm_", (acc, block), (main_out, "main"))

        label("mid")
        mid = self.phis("accd_", [(acc, block), (main_out, "main")])
        e(f"%kdone = mul i64 %nmain, {UNROLL}")
        e(f"%hasrem = icmp ult i64 %kdone, {count}")
        e(f"br i1 %hasrem, label %rem, label %{exit_label}")

        label("rem")
        e("%gr = phi i64 [ %kdone, %mid ], [ %gr.next, %rem ]")
        phi_at = len(self.lines)
        cur = {k: f"%accr_{k[0]}_{k[1]}" for k in acc}
        rem_out = self.step("r", "%gr", cur)
        e("%gr.next = add i64 %gr, 1")
        e(f"%rdone = icmp eq i64 %gr.next, {count}")
        e(f"br i1 %rdone, label %{exit_label}, label %rem")
        self.loop_phis(phi_at, "accr_", (mid, "mid"), (rem_out, "rem"))

        label(exit_label)
        return self.phis("accf_", [(mid, "mid"), (rem_out, "rem")])

    def segments(self, acc0: dict) -> dict:
        """By address (ADDRESS_DOC): the K loops once per segment of K that
        the block's ``kg`` groups cross, each segment's rows at the table's
        next row of addresses; the sums stay in registers throughout.
        Returns the final sums, in block "segtail" (which branches to
        "store")."""
        e, label = self.emit, self.label
        e("%seg.len = and i64 %desc, 4294967295")  # groups per segment
        e("%seg.stride = lshr i64 %desc, 32")  # table bytes between segments
        e("%seg.off0 = lshr i64 %lda, 2")  # the block's first group in its segment
        e("br label %seghead")

        label("seghead")
        e("%seg.t = phi ptr [ %a, %start ], [ %seg.tnext, %segtail ]")
        e("%seg.off = phi i64 [ %seg.off0, %start ], [ 0, %segtail ]")
        e("%seg.done = phi i64 [ 0, %start ], [ %seg.donenext, %segtail ]")
        phi_at = len(self.lines)
        acc = {k: f"%accs_{k[0]}_{k[1]}" for k in acc0}
        e("%seg.abyte = shl i64 %seg.off, 2")
        for r in range(self.rows):
            e(f"%aslot{r} = getelementptr i64, ptr %seg.t, i64 {r}")
            e(f"%abase{r} = load ptr, ptr %aslot{r}, align 8")
            e(f"%arow{r} = getelementptr i8, ptr %abase{r}, i64 %seg.abyte")
        e(f"%seg.bbyte = mul i64 %seg.done, {self.spec.nr * 4}")
        e("%bseg = getelementptr i8, ptr %b, i64 %seg.bbyte")
        e("%seg.left = sub i64 %kg, %seg.done")
        e("%seg.room = sub i64 %seg.len, %seg.off")
        e("%seg.less = icmp ult i64 %seg.left, %seg.room")
        e("%seg.n = select i1 %seg.less, i64 %seg.left, i64 %seg.room")
        out = self.k_loops(acc, "seghead", "%seg.n", "segtail")
        e("%seg.donenext = add i64 %seg.done, %seg.n")
        e("%seg.tnext = getelementptr i8, ptr %seg.t, i64 %seg.stride")
        e("%seg.more = icmp ult i64 %seg.donenext, %kg")
        e("br i1 %seg.more, label %seghead, label %store")
        self.loop_phis(phi_at, "accs_", (acc0, "start"), (out, "segtail"))
        return out

    def requantize_store(self, final: dict) -> None:
        """Store the tile requantized to bytes (REQUANT_DOC), masked to nvalid columns."""
        e, lanes, vec = self.emit, self.spec.lanes, self.vec
        fv, i1 = f"<{lanes} x float>", f"<{lanes} x i1>"
        for field, name in enumerate(REQUANT_FIELDS):
            e(f"%ep.p{field} = getelementptr i64, ptr %ep, i64 {field}")
            e(f"%ep.{name} = load i64, ptr %ep.p{field}, align 8")
        e("%ep.fp = inttoptr i64 %ep.f to ptr")
        e("%ep.op = inttoptr i64 %ep.out to ptr")
        if self.spec.qadd:
            self.qadd_constants()
        consts = {}
        for j in range(self.nj):
            m = f"%mask{j}"
            for row, what in enumerate(("m", "lo", "hi", "zp")):
                e(f"%rq.{what}o{j} = mul i64 %ep.ldf, {row}")
                e(f"%rq.{what}oj{j} = add i64 %rq.{what}o{j}, {j * lanes}")
                e(f"%rq.{what}p{j} = getelementptr float, ptr %ep.fp, i64 %rq.{what}oj{j}")
                e(f"%rq.{what}{j} = call {fv} @llvm.masked.load.v{lanes}f32.p0(ptr "
                  f"%rq.{what}p{j}, i32 4, {i1} {m}, {fv} zeroinitializer)")  # fmt: skip
            e(f"%rq.zpi{j} = fptosi {fv} %rq.zp{j} to {vec}")
            consts[j] = {w: f"%rq.{w}{j}" for w in ("m", "lo", "hi", "zp", "zpi")}
        if self.spec.requant != "packed":  # (its stores compute their own offsets)
            for r in range(self.rows):  # before qadd's branch: both copies use them
                e(f"%rq.oo{r} = mul i64 %ep.ldo, {r}")
        if self.spec.requant == "packed":  # (it reads neither lo nor hi: LLVM drops their loads)
            self.packed_store(final, consts)
        elif self.spec.qadd:
            # The operand order of the two FMAs is a run-time flag: one copy
            # of the stores per order, so each computes only its own.
            if self.spec.lanes == 16:
                self.qadd_pack_constants()
            e("br i1 %qa.yfirst, label %qa.yfirst.rows, label %qa.ofirst.rows")
            for yfirst in (True, False):
                self.label("qa.yfirst.rows" if yfirst else "qa.ofirst.rows")
                self.byte_rows(f"%rq{'y' if yfirst else 'o'}", final, consts, yfirst)
                e("br label %qa.done")
            self.label("qa.done")
        else:
            self.byte_rows("%rq", final, consts)

    def byte_rows(self, tag: str, final: dict, consts: dict, yfirst: bool | None = None) -> None:
        """Each row's vectors requantized (qadd's when `yfirst` is not None)
        and stored as bytes: with AVX-512, a qadd row's codes are packed to
        one store per group of up to 4 vectors (`pack_store`), else one
        masked store per vector."""
        e, lanes, vec = self.emit, self.spec.lanes, self.vec
        for r in range(self.rows):
            codes = {}
            for j in range(self.nj):
                k, t = consts[j], f"{tag}{r}_{j}"
                e(f"{t}.oo = add i64 %rq.oo{r}, {j * lanes}")  # out (and other) offset
                if yfirst is None:
                    requantize_sums_code(e, t, lanes, final[r, j], k)
                    codes[j] = f"{t}.yi"
                    continue
                requantize_code(e, t, lanes, final[r, j], k)
                codes[j] = self.qadd(t, j, yfirst)
            if yfirst is not None and lanes == 16:
                # signed codes go through the unsigned byte range + 128
                # (`qadd_pack_constants`); unsigned ones need neither step
                signed = self.spec.requant == "qadd_s8"
                add16 = (lambda h: "%qa.flip16") if signed else None
                for g, js in enumerate(self.groups()):
                    self.pack_store(f"{tag}{r}_g{g}", r, g, js, codes, add16, None,
                                    "%qa.flip8v" if signed else None)  # fmt: skip
                continue
            for j, code in codes.items():
                t = f"{tag}{r}_{j}"
                e(f"{t}.yb = trunc {vec} {code} to <{lanes} x i8>")
                e(f"{t}.op = getelementptr i8, ptr %ep.op, i64 {t}.oo")
                e(f"call void @llvm.masked.store.v{lanes}i8.p0(<{lanes} x i8> {t}.yb, "
                  f"ptr {t}.op, i32 1, <{lanes} x i1> %mask{j})")  # fmt: skip

    def groups(self) -> list[list[int]]:
        """The row's vectors by store group: up to 4 (64 columns) each."""
        return [list(range(j0, min(j0 + 4, self.nj))) for j0 in range(0, self.nj, 4)]

    def group_masks(self) -> None:
        """%pk.mask{g}: group g's byte mask, its columns 64 * g + i < nvalid."""
        e = self.emit
        for g, js in enumerate(self.groups()):
            e(f"%pk.nv{g} = sub i64 %nvalid, {16 * js[0]}")
            e(f"%pk.nvh{g} = call i64 @llvm.smin.i64(i64 %pk.nv{g}, i64 64)")
            e(f"%pk.nvc{g} = call i64 @llvm.smax.i64(i64 %pk.nvh{g}, i64 1)")
            e(f"%pk.sh{g} = sub i64 64, %pk.nvc{g}")
            e(f"%pk.ones{g} = lshr i64 -1, %pk.sh{g}")
            e(f"%pk.any{g} = icmp sgt i64 %pk.nv{g}, 0")
            e(f"%pk.mb{g} = select i1 %pk.any{g}, i64 %pk.ones{g}, i64 0")
            e(f"%pk.mask{g} = bitcast i64 %pk.mb{g} to <64 x i1>")

    def packed_store(self, final: dict, consts: dict) -> None:
        """The "packed" kind's store (REQUANT_DOC): per row, each group of up to
        four vectors (64 columns) becomes one 64-byte store."""
        e = self.emit
        groups = self.groups()
        e("%pk.flip32 = trunc i64 %ep.yflip to i32")
        self.splat("%pk.flip", "i32", "%pk.flip32")
        zp16 = {}  # per pair of vectors: (zp + flip) as the pack leaves the pair's i16
        for j in range(self.nj):
            e(f"%pk.zpf{j} = add <16 x i32> {consts[j]['zpi']}, %pk.flip")
        for g, js in enumerate(groups):
            for h, (a, b) in enumerate(_pack_pairs(js)):
                e(f"%pk.zp{g}_{h} = call <32 x i16> @llvm.x86.avx512.packssdw.512("
                  f"<16 x i32> %pk.zpf{a}, <16 x i32> %pk.zpf{b})")  # fmt: skip
                zp16[g, h] = f"%pk.zp{g}_{h}"
        self.group_masks()
        for bound in ("ylo", "yhi", "yflip"):
            e(f"%pk.{bound}8 = trunc i64 %ep.{bound} to i8")
            self.splat(f"%pk.{bound}v", "i8", f"%pk.{bound}8", lanes=64)
        # The stores come in three variants, chosen once a call: "bare" for
        # unsigned codes of the whole byte range (the saturating packs alone:
        # a ReLU's or a plain uint8 output), "flipped" for signed ones (the
        # xor back from the unsigned range), "clamped" for narrower bounds.
        e("%pk.lo0 = icmp ne i64 %ep.ylo, 0")
        e("%pk.hi255 = icmp ne i64 %ep.yhi, 255")
        e("%pk.clamp = or i1 %pk.lo0, %pk.hi255")
        e("%pk.flips = icmp ne i64 %ep.yflip, 0")
        e("br i1 %pk.clamp, label %pk.clamped, label %pk.full")
        self.label("pk.full")
        e("br i1 %pk.flips, label %pk.flipped, label %pk.bare")
        for variant, clamp, flip in (("bare", False, False), ("flipped", False, True),
                                     ("clamped", True, True)):  # fmt: skip
            self.label(f"pk.{variant}")
            bounds = ("%pk.ylov", "%pk.yhiv") if clamp else None
            for r in range(self.rows):
                for g, js in enumerate(groups):
                    t, codes = f"%pk.{variant}{r}_{g}", {}
                    for j in js:  # the rounded scaled sums (int32), before the zero point
                        _scaled_sums(e, f"{t}_{j}", 16, final[r, j], consts[j])
                        e(f"{t}_{j}.ri = call <16 x i32> {_CVT_RN[16][0]}(<16 x float> "
                          f"{t}_{j}.v{_CVT_RN[16][1]})")  # fmt: skip
                        codes[j] = f"{t}_{j}.ri"
                    self.pack_store(t, r, g, js, codes, lambda h, g=g: zp16[g, h], bounds,
                                    "%pk.yflipv" if flip else None)  # fmt: skip
            e("br label %pk.done")
        self.label("pk.done")

    def pack_store(self, t, r, g, js, codes, add16, bounds, flip) -> None:
        """Row r's int32 vectors `codes[j]` (j in `js`, group g) as one masked
        store of 16, 32 or 64 bytes: packed to int16 with saturation, plus
        the int16 vector `add16(h)` (pair h's; None: nothing) with
        saturation, to bytes with unsigned saturation, back in column order,
        clamped to the byte vectors `bounds` (lo, hi; None: no clamp),
        `^ flip` (None: as they are)."""
        e = self.emit
        halves = []
        for h, (a, b) in enumerate(_pack_pairs(js)):
            e(f"{t}.p{h} = call <32 x i16> @llvm.x86.avx512.packssdw.512("
              f"<16 x i32> {codes[a]}, <16 x i32> {codes[b]})")  # fmt: skip
            if add16 is None:
                halves.append(f"{t}.p{h}")
                continue
            e(f"{t}.z{h} = call <32 x i16> @llvm.sadd.sat.v32i16(<32 x i16> {t}.p{h}, "
              f"<32 x i16> {add16(h)})")  # fmt: skip
            halves.append(f"{t}.z{h}")
        high = halves[1] if len(halves) > 1 else halves[0]
        e(f"{t}.u = call <64 x i8> @llvm.x86.avx512.packuswb.512(<32 x i16> {halves[0]}, "
          f"<32 x i16> {high})")  # fmt: skip
        # The packs interleave by 128-bit lane: dword 4L + i holds vector i's
        # columns 4L..4L+3. Transpose the 4x4 dwords back to column order.
        e(f"{t}.ud = bitcast <64 x i8> {t}.u to <16 x i32>")
        e(f"{t}.od = shufflevector <16 x i32> {t}.ud, <16 x i32> poison, {_TRANSPOSE_4X4}")
        e(f"{t}.ob = bitcast <16 x i32> {t}.od to <64 x i8>")
        y = f"{t}.ob"
        if bounds is not None:
            e(f"{t}.c1 = call <64 x i8> @llvm.umax.v64i8(<64 x i8> {y}, <64 x i8> {bounds[0]})")
            e(f"{t}.c2 = call <64 x i8> @llvm.umin.v64i8(<64 x i8> {t}.c1, <64 x i8> {bounds[1]})")
            y = f"{t}.c2"
        if flip is not None:
            e(f"{t}.yb = xor <64 x i8> {y}, {flip}")
            y = f"{t}.yb"
        e(f"{t}.oo = mul i64 %ep.ldo, {r}")
        e(f"{t}.ooj = add i64 {t}.oo, {16 * js[0]}")
        e(f"{t}.op = getelementptr i8, ptr %ep.op, i64 {t}.ooj")
        # no wider than the group: a masked store still pays for the lines it spans
        width = _store_bytes(len(js))
        if width < 64:
            first = "<" + ", ".join(f"i32 {i}" for i in range(width)) + ">"
            e(f"{t}.ys = shufflevector <64 x i8> {y}, <64 x i8> poison, <{width} x i32> {first}")
            e(f"{t}.ms = shufflevector <64 x i1> %pk.mask{g}, <64 x i1> poison, "
              f"<{width} x i32> {first}")  # fmt: skip
            e(f"call void @llvm.masked.store.v{width}i8.p0(<{width} x i8> {t}.ys, ptr {t}.op, "
              f"i32 1, <{width} x i1> {t}.ms)")  # fmt: skip
        else:
            e(f"call void @llvm.masked.store.v64i8.p0(<64 x i8> {y}, ptr {t}.op, i32 1, "
              f"<64 x i1> %pk.mask{g})")  # fmt: skip

    def splat(self, name: str, ty: str, scalar: str, lanes: int = 0) -> str:
        """`name` = a vector of `lanes` (default: the ISA's) copies of the
        scalar `scalar` of type `ty`."""
        lanes = lanes or self.spec.lanes
        e = self.emit
        e(f"{name}.i = insertelement <{lanes} x {ty}> poison, {ty} {scalar}, i64 0")
        e(f"{name} = shufflevector <{lanes} x {ty}> {name}.i, <{lanes} x {ty}> poison, "
          f"<{lanes} x i32> zeroinitializer")  # fmt: skip
        return name

    def prefetch_other(self) -> None:
        """Prefetch into L1 the residual operand's bytes of the tile (its
        first and last column per row: a prefetch never faults) before the
        K loop, so the epilogue's loads of them hit L1 (REQUANT_DOC)."""
        e = self.emit
        for field, name in enumerate(REQUANT_FIELDS):
            if name in ("other", "ldo"):
                e(f"%pfo.p{name} = getelementptr i64, ptr %ep, i64 {field}")
                e(f"%pfo.{name} = load i64, ptr %pfo.p{name}, align 8")
        e("%pfo.base = inttoptr i64 %pfo.other to ptr")
        for r in range(self.rows):
            e(f"%pfo.o{r} = mul i64 %pfo.ldo, {r}")
            for end, offset in (("a", 0), ("z", self.spec.nr - 1)):
                e(f"%pfo.o{r}{end} = add i64 %pfo.o{r}, {offset}")
                e(f"%pfo.q{r}{end} = getelementptr i8, ptr %pfo.base, i64 %pfo.o{r}{end}")
                e(f"call void @llvm.prefetch.p0(ptr %pfo.q{r}{end}, i32 0, i32 3, i32 1)")

    def qadd_constants(self) -> None:
        """The residual qadd's scalars (REQUANT_DOC), as vectors."""
        e = self.emit
        e("%qa.other = inttoptr i64 %ep.other to ptr")
        e("%qa.yfirst = icmp ne i64 %ep.yfirst, 0")
        for name in ("plo", "phi"):
            e(f"%qa.{name}32 = trunc i64 %ep.{name} to i32")
            self.splat(f"%qa.{name}i", "i32", f"%qa.{name}32")
        e("%qa.rp = inttoptr i64 %ep.ratios to ptr")
        for k, name in enumerate(("ry", "ro", "fixed")):
            e(f"%qa.{name}p = getelementptr float, ptr %qa.rp, i64 {k}")
            e(f"%qa.{name}s = load float, ptr %qa.{name}p, align 4")
            self.splat(f"%qa.{name}", "float", f"%qa.{name}s")

    def qadd_pack_constants(self) -> None:
        """The AVX-512 qadd store's constants (`pack_store`). Its bounds
        [plo, phi] are the codes' whole range (`_gemm.requant_kind` checks),
        which the saturating packs give without a clamp: uint8 codes
        ("qadd") as they are, int8 codes ("qadd_s8") through the unsigned
        byte range + 128 (a saturating int16 add before the unsigned pack,
        the xor after it). Saturation is monotone, so these are the codes
        clamped (INT32_MIN, an out-of-range sum, becomes plo)."""
        self.group_masks()
        if self.spec.requant == "qadd_s8":
            self.splat("%qa.flip16", "i16", "128", lanes=32)
            self.splat("%qa.flip8v", "i8", "-128", lanes=64)

    def qadd(self, t: str, j: int, yfirst: bool) -> str:
        """The qadd of the code {t}.y with the other operand's byte at the
        same place, as `requant._fast_post` computes it, the FMAs in the
        order `yfirst` says: the name of the int32 codes (with AVX-512 not
        yet saturated: `pack_store` does it)."""
        e, lanes = self.emit, self.spec.lanes
        fv, iv, i1 = f"<{lanes} x float>", f"<{lanes} x i32>", f"<{lanes} x i1>"
        fma = f"@llvm.fma.v{lanes}f32"
        e(f"{t}.ap = getelementptr i8, ptr %qa.other, i64 {t}.oo")
        e(f"{t}.ab = call <{lanes} x i8> @llvm.masked.load.v{lanes}i8.p0(ptr {t}.ap, i32 1, "
          f"{i1} %mask{j}, <{lanes} x i8> zeroinitializer)")  # fmt: skip
        # the residual's codes: its bytes as uint8, or as int8 ("qadd_s8"),
        # one extension (not (byte ^ flip) - offset: two operations more)
        ext = "sext" if self.spec.requant == "qadd_s8" else "zext"
        e(f"{t}.ai = {ext} <{lanes} x i8> {t}.ab to {iv}")
        e(f"{t}.of = sitofp {iv} {t}.ai to {fv}")
        # yfirst: fma(y, ry, fma(o, ro, fixed)); else fma(o, ro, fma(y, ry, fixed))
        first, second = ((f"{t}.of", "%qa.ro"), (f"{t}.y", "%qa.ry"))[:: 1 if yfirst else -1]
        e(f"{t}.in = call {fv} {fma}({fv} {first[0]}, {fv} {first[1]}, {fv} %qa.fixed)")
        e(f"{t}.t = call {fv} {fma}({fv} {second[0]}, {fv} {second[1]}, {fv} {t}.in)")
        # rint and the conversion in one: out of int32's range (or NaN) the
        # conversion gives INT32_MIN, which the saturation turns into plo, as
        # the reference does; in range it is exact, and so is the clamp.
        cvt, extra = _CVT_RN[lanes]
        e(f"{t}.qi = call {iv} {cvt}({fv} {t}.t{extra})")
        if lanes == 16:  # `pack_store` saturates and clamps the bytes: the same codes
            return f"{t}.qi"
        e(f"{t}.qgt = icmp sgt {iv} {t}.qi, %qa.ploi")
        e(f"{t}.q1 = select {i1} {t}.qgt, {iv} {t}.qi, {iv} %qa.ploi")
        e(f"{t}.qlt = icmp slt {iv} {t}.q1, %qa.phii")
        e(f"{t}.zi = select {i1} {t}.qlt, {iv} {t}.q1, {iv} %qa.phii")
        return f"{t}.zi"


def _store_bytes(vectors: int) -> int:
    """The store width (bytes) of a packed group of 1-4 vectors."""
    return {1: 16, 2: 32}.get(vectors, 64)


def _pack_pairs(js: list[int]) -> list[tuple[int, int]]:
    """The `packssdw` operand pairs of a group of 1-4 vectors (a missing
    partner repeats the last vector: its bytes land past the group's end)."""
    padded = js + [js[-1]] * (len(js) % 2)
    return [(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)]


# dword D = 4i + L of the column-ordered bytes <- dword 4L + i of the packed ones
_TRANSPOSE_4X4 = "<16 x i32> <" + ", ".join(f"i32 {4 * (d % 4) + d // 4}" for d in range(16)) + ">"

_PACKED_DECL = (
    "declare <32 x i16> @llvm.x86.avx512.packssdw.512(<16 x i32>, <16 x i32>)\n"
    "declare <64 x i8> @llvm.x86.avx512.packuswb.512(<32 x i16>, <32 x i16>)\n"
    "declare <32 x i16> @llvm.sadd.sat.v32i16(<32 x i16>, <32 x i16>)\n"
    "declare <64 x i8> @llvm.umax.v64i8(<64 x i8>, <64 x i8>)\n"
    "declare <64 x i8> @llvm.umin.v64i8(<64 x i8>, <64 x i8>)\n"
    "declare i64 @llvm.smin.i64(i64, i64)\n"
    "declare i64 @llvm.smax.i64(i64, i64)\n"
    "declare void @llvm.masked.store.v64i8.p0(<64 x i8>, ptr, i32, <64 x i1>)\n"
    "declare void @llvm.masked.store.v32i8.p0(<32 x i8>, ptr, i32, <32 x i1>)\n"
)


def requantize_code(emit, t: str, lanes: int, acc: str, k: dict) -> None:
    """Emit `{t}.y`, the requantized code (a float holding an integer) of the
    int32 sums `acc` (<lanes x i32>): REQUANT_DOC's steps, with `k` naming the
    per-lane bias (i32), mult, lo, hi and zp (float) vectors ("b", "m", "lo",
    "hi", "zp"). Shared by the GEMM and depthwise (``dwkernels``) kernels."""
    fv, i1 = f"<{lanes} x float>", f"<{lanes} x i1>"
    _scaled_sums(emit, t, lanes, acc, k)
    emit(f"{t}.r = call {fv} @llvm.rint.v{lanes}f32({fv} {t}.v)")
    # finite values only (the fast path's condition): select = min / max
    emit(f"{t}.gt = fcmp ogt {fv} {t}.r, {k['lo']}")
    emit(f"{t}.c1 = select {i1} {t}.gt, {fv} {t}.r, {fv} {k['lo']}")
    emit(f"{t}.lt = fcmp olt {fv} {t}.c1, {k['hi']}")
    emit(f"{t}.c2 = select {i1} {t}.lt, {fv} {t}.c1, {fv} {k['hi']}")
    emit(f"{t}.y = fadd {fv} {t}.c2, {k['zp']}")  # exact: the code y, in float


def _scaled_sums(emit, t: str, lanes: int, acc: str, k: dict) -> None:
    """`{t}.v` = f32(i32(acc + bias)) * mult (REQUANT_DOC's first steps); with
    no bias vector `k["b"]`, the sums `acc` already started at the bias."""
    vec, fv = f"<{lanes} x i32>", f"<{lanes} x float>"
    if "b" in k:
        emit(f"{t}.s = add {vec} {acc}, {k['b']}")  # wraps, as i32(acc + bias)
        acc = f"{t}.s"
    emit(f"{t}.f = sitofp {vec} {acc} to {fv}")
    emit(f"{t}.v = fmul {fv} {t}.f, {k['m']}")


def requantize_sums_code(emit, t: str, lanes: int, acc: str, k: dict) -> None:
    """Emit `{t}.yi`, the output codes as int32 of the int32 sums `acc`: the
    same codes as `requantize_code` (then `fptosi`), by `requantize_int_code`."""
    _scaled_sums(emit, t, lanes, acc, k)
    requantize_int_code(emit, t, lanes, f"{t}.v", k)


def requantize_int_code(emit, t: str, lanes: int, v: str, k: dict) -> None:
    """Emit `{t}.yi`, the output codes as int32, of `v`, the scaled sums
    (float): clamp to [lo, hi], round to nearest even, add the zero point in
    int32 (`k["zpi"]`). The same codes as `requantize_code`'s steps, in two
    fewer operations: clamping before rounding equals rounding before
    clamping (lo and hi are integers and rint is monotone), and adding the
    integer zp after the conversion is exact."""
    fv, i1, vec = f"<{lanes} x float>", f"<{lanes} x i1>", f"<{lanes} x i32>"
    cvt, extra = _CVT_RN[lanes]
    emit(f"{t}.gt = fcmp ogt {fv} {v}, {k['lo']}")
    emit(f"{t}.c1 = select {i1} {t}.gt, {fv} {v}, {fv} {k['lo']}")
    emit(f"{t}.lt = fcmp olt {fv} {t}.c1, {k['hi']}")
    emit(f"{t}.c2 = select {i1} {t}.lt, {fv} {t}.c1, {fv} {k['hi']}")
    emit(f"{t}.ri = call {vec} {cvt}({fv} {t}.c2{extra})")
    emit(f"{t}.yi = add {vec} {t}.ri, {k['zpi']}")


# float32 -> int32 rounding to nearest even, by lanes (AVX-512, AVX2): AVX-512
# names the rounding ({rn-sae}); AVX2's conversion uses MXCSR's,
# round-to-nearest-even unless a program changed it (which `llvm.rint`, in
# `requantize_code`, assumes too).
_CVT_RN = {
    16: ("@llvm.x86.avx512.mask.cvtps2dq.512", ", <16 x i32> zeroinitializer, i16 -1, i32 8"),
    8: ("@llvm.x86.avx.cvt.ps2dq.256", ""),
}
_CVT_RN_DECL = {
    16: "declare <16 x i32> @llvm.x86.avx512.mask.cvtps2dq.512(<16 x float>, <16 x i32>, i16, "
    "i32)\n",
    8: "declare <8 x i32> @llvm.x86.avx.cvt.ps2dq.256(<8 x float>)\n",
}


def ukernel_ir(spec: UkernelSpec, rows: int | None = None) -> str:
    """The LLVM IR module (text) of ``spec``: the one function for a tile of
    ``rows`` rows (``kernel_name(spec, rows)``), or all of ``spec.names()``."""
    if rows is not None and not 1 <= rows <= spec.mr:
        raise ValueError(f"rows must be in 1..{spec.mr}, got {rows}")
    counts = range(1, spec.mr + 1) if rows is None else (rows,)
    funcs = [_Emitter(spec, r).function() for r in counts]
    decl = _declarations(spec.isa, spec.lanes)
    decl += "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)\n"
    decl += requant_declarations(spec.lanes) if spec.requant else ""
    packs = spec.requant == "packed" or (spec.qadd and spec.lanes == 16)
    decl += _PACKED_DECL if packs else ""
    return decl + "\n" + "\n".join(funcs)
