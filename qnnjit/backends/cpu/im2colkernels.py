"""Im2col row kernels, generated as LLVM IR text (compiled and cached like the
GEMM microkernels, by ``llvmjit``): they copy the taps of a run of output
pixels of a channels-last convolution into the GEMM's A tile.

With unit horizontal dilation, window row kh of output pixel ow is one run of
KW*C contiguous input bytes, starting SW*C bytes after the previous pixel's.
Numba's byte loop pays its loop overhead per run, which dominates when the run
is short: a 3-channel stem's runs are 9 or 21 bytes, and copying them cost
more than the stem's GEMM. Here the run length is a compile-time constant, so
each run is a few fixed-size unaligned vector moves (the tail one overlapping
the one before it, which rewrites the same bytes), flipped to u8 on the way
for signed activations:

    for i in 0 .. count-1:
        for kh in 0 .. KH-1:
            dst[i*lda + kh*run : +run] = rows[kh][i*step : +run] ^ flip

Kernel ABI (C), AVX2 (AVX-512: MASKED_DOC):

    void kernel(const uint8 *const *rows,  // KH pointers: the first byte of pixel
                                           //   0's run in window row kh (a row of
                                           //   pad bytes where that row is outside
                                           //   the image)
                int64 count,               // output pixels (>= 0)
                uint8 *dst,                // pixel i's K bytes at dst[i*lda]
                int64 lda)

The caller passes only pixels whose window lies inside the image horizontally;
border pixels, which mix pad bytes into a run, read padded copies of their
window rows (`conv_nhwc._edge_rows`).

MASKED_DOC. On AVX-512 (byte-masked loads and stores: AVX512BW) the kernel
takes every pixel of an output row, borders included, and each run is one
masked load and one masked store per 64 bytes: the load's mask leaves out
the bytes outside the image (they are not read, so a run may start before
its row or end past it, and take the pad byte instead), the store's mask
the bytes past the run (nothing outside the pixel's row of the tile is
written)::

    for i in 0 .. count-1:
        b = b0 + i*step                 # the run's first byte in its input row
        for kh in 0 .. KH-1:
            for j in 0 .. run-1:
                inside = 0 <= b + j < row_bytes
                dst[i*lda + kh*run + j] = (rows[kh][b + j] if inside else pad) ^ flip

    void kernel(const uint8 *const *rows,  // KH pointers: byte 0 of window row
                                           //   kh's input row (a row of pad
                                           //   bytes above and below the image)
                int64 count, uint8 *dst, int64 lda,
                int64 b0,                  // may be negative (left border)
                int64 row_bytes,           // W * C
                int64 pad)                 // the pad byte as stored (flipped)

Every window row of a pixel takes the same mask, computed once per pixel.

Why: a 224x224 7x7 stem's im2col (ResNet-18's, 12544 pixels of 7 21-byte
runs, tiles of 252 pixels) took 72-77 us with the overlapping moves, 18 us
of it the border copies and their walk; masked, 49 us, and ResNet-18's stem
step 629 -> 599 us. MobileNetV2's 3x3 stem (9-byte runs): 30 -> 23 us.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .llvmjit import compile_module

__all__ = ["Im2colSpec", "im2col_ir", "im2col_kernel", "VECTOR_BYTES", "MASKED_ISAS", "MAX_CHUNKS"]

VECTOR_BYTES = {"avx512_vnni": 64, "avx2": 32}
MASKED_ISAS = frozenset({"avx512_vnni"})  # byte-masked moves (MASKED_DOC)
# A run is unrolled into at most this many moves; longer runs (wide channels)
# stay with the Numba loop, which vectorizes them well (measured: no gain).
MAX_CHUNKS = 8


@dataclass(frozen=True)
class Im2colSpec:
    """What one im2col row kernel is specialized on."""

    isa: str
    kh: int  # window rows
    run: int  # bytes per window row: KW * C
    step: int  # bytes between consecutive pixels' runs: SW * C
    flip: bool  # xor 0x80 (signed activations to u8)

    def __post_init__(self):
        if self.isa not in VECTOR_BYTES:
            raise ValueError(f"no im2col kernel for ISA {self.isa!r}")
        if min(self.kh, self.run, self.step) < 1:
            raise ValueError(f"bad im2col kernel spec {self}")

    @property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        return _chunks(self.run, VECTOR_BYTES[self.isa])

    @property
    def masked(self) -> bool:
        """Whether the kernel takes border pixels too (MASKED_DOC)."""
        return self.isa in MASKED_ISAS

    @property
    def name(self) -> str:
        flip = "_flip" if self.flip else ""
        masked = "_masked" if self.masked else ""
        return f"qnnjit_im2col_{self.isa}_{self.kh}x{self.run}_s{self.step}{flip}{masked}"


def _chunks(run: int, widest: int) -> tuple[tuple[int, int], ...]:
    """(offset, bytes) moves covering [0, run): whole moves of the widest power
    of two that fits, then the rest as one power-of-two move ending at `run`,
    which overlaps the move before it (rewriting bytes with the same values)."""
    big = 1
    while big * 2 <= min(run, widest):
        big *= 2
    moves = [(offset, big) for offset in range(0, run - big + 1, big)]
    rest = run - len(moves) * big
    if rest:
        size = 1
        while size < rest:
            size *= 2
        moves.append((run - size, size))
    return tuple(moves)


def fits(isa: str, run: int) -> bool:
    """Whether a run of `run` bytes gets a kernel on `isa` (else the Numba loop)."""
    if isa in MASKED_ISAS:
        return len(_masked_chunks(run)) <= MAX_CHUNKS
    return isa in VECTOR_BYTES and len(_chunks(run, VECTOR_BYTES[isa])) <= MAX_CHUNKS


def _masked_chunks(run: int) -> tuple[tuple[int, int], ...]:
    """(offset, vector bytes) of the masked kernel's moves covering [0, run):
    64-byte vectors, the last one the narrowest power of two of 16 bytes or
    more that covers the rest (its mask leaves out the bytes past the run)."""
    moves = []
    for offset in range(0, run, 64):
        size = 16
        while size < min(64, run - offset):
            size *= 2
        moves.append((offset, size))
    return tuple(moves)


def _move_type(size: int) -> str:
    return f"i{size * 8}" if size <= 8 else f"<{size} x i8>"


def _flip_constant(size: int) -> str:
    if size <= 8:
        return str(int.from_bytes(b"\x80" * size, "little", signed=True))
    return "<" + ", ".join(["i8 -128"] * size) + ">"


def im2col_ir(spec: Im2colSpec) -> str:
    """The LLVM IR module (text) of ``spec``'s kernel."""
    if spec.masked:
        return _masked_ir(spec)
    lines: list[str] = []

    def e(line: str) -> None:
        lines.append("  " + line)

    lines.append("entry:")
    for kh in range(spec.kh):
        e(f"%rp{kh} = getelementptr ptr, ptr %rows, i64 {kh}")
        e(f"%row{kh} = load ptr, ptr %rp{kh}, align 8")
    e("%empty = icmp sle i64 %count, 0")
    e("br i1 %empty, label %exit, label %pixel")
    lines.append("pixel:")
    e("%i = phi i64 [ 0, %entry ], [ %i.next, %pixel ]")
    e(f"%src = mul i64 %i, {spec.step}")
    e("%dsto = mul i64 %i, %lda")
    e("%drow = getelementptr i8, ptr %dst, i64 %dsto")
    for kh in range(spec.kh):
        for offset, size in spec.chunks:
            t, ty = f"%m{kh}_{offset}", _move_type(size)
            e(f"{t}.so = add i64 %src, {offset}")
            e(f"{t}.sp = getelementptr i8, ptr %row{kh}, i64 {t}.so")
            e(f"{t}.v = load {ty}, ptr {t}.sp, align 1")
            value = f"{t}.v"
            if spec.flip:
                e(f"{t}.f = xor {ty} {t}.v, {_flip_constant(size)}")
                value = f"{t}.f"
            e(f"{t}.dp = getelementptr i8, ptr %drow, i64 {kh * spec.run + offset}")
            e(f"store {ty} {value}, ptr {t}.dp, align 1")
    e("%i.next = add i64 %i, 1")
    e("%done = icmp eq i64 %i.next, %count")
    e("br i1 %done, label %exit, label %pixel")
    lines.append("exit:")
    e("ret void")
    args = "ptr noalias nocapture readonly %rows, i64 %count, ptr noalias nocapture %dst, i64 %lda"
    body = "\n".join(lines)
    return f"define void @{spec.name}({args}) nounwind {{\n{body}\n}}\n"


@functools.cache
def im2col_kernel(spec: Im2colSpec) -> int:
    """The address of ``spec``'s compiled kernel (compiled once per process,
    and once per machine while the disk cache holds it)."""
    return compile_module(im2col_ir(spec), spec.isa, (spec.name,)).addresses[spec.name]


def _masked_ir(spec: Im2colSpec) -> str:
    """The IR of a masked kernel (MASKED_DOC)."""
    lines: list[str] = []

    def e(line: str) -> None:
        lines.append("  " + line)

    widths = sorted({size for _, size in _masked_chunks(spec.run)})
    lines.append("entry:")
    for kh in range(spec.kh):
        e(f"%rp{kh} = getelementptr ptr, ptr %rows, i64 {kh}")
        e(f"%row{kh} = load ptr, ptr %rp{kh}, align 8")
    e("%pad8 = trunc i64 %pad to i8")
    for w in widths:
        e(f"%padi{w} = insertelement <{w} x i8> poison, i8 %pad8, i64 0")
        e(f"%pad{w} = shufflevector <{w} x i8> %padi{w}, <{w} x i8> poison, "
          f"<{w} x i32> zeroinitializer")  # fmt: skip
    e("%empty = icmp sle i64 %count, 0")
    e("br i1 %empty, label %exit, label %pixel")
    lines.append("pixel:")
    e("%i = phi i64 [ 0, %entry ], [ %i.next, %pixel ]")
    e(f"%step = mul i64 %i, {spec.step}")
    e("%b = add i64 %b0, %step")
    # the run's bytes inside its row: [lo, hi) (empty where hi <= lo)
    e("%negb = sub i64 0, %b")
    e("%lo.pos = icmp sgt i64 %negb, 0")
    e("%lo = select i1 %lo.pos, i64 %negb, i64 0")
    e("%room = sub i64 %rowbytes, %b")
    e("%dsto = mul i64 %i, %lda")
    e("%drow = getelementptr i8, ptr %dst, i64 %dsto")
    for offset, size in _masked_chunks(spec.run):
        t, vt = f"%c{offset}", f"<{size} x i8>"
        stored = min(size, spec.run - offset)
        # this move's lanes [clo, chi) inside the row, as a bit mask
        e(f"{t}.lo0 = sub i64 %lo, {offset}")
        e(f"{t}.hi0 = sub i64 %room, {offset}")
        e(f"{t}.lo = call i64 @llvm.smax.i64(i64 {t}.lo0, i64 0)")
        e(f"{t}.hi1 = call i64 @llvm.smax.i64(i64 {t}.hi0, i64 0)")
        e(f"{t}.hi = call i64 @llvm.smin.i64(i64 {t}.hi1, i64 {stored})")
        e(f"{t}.lo1 = call i64 @llvm.smin.i64(i64 {t}.lo, i64 {stored})")
        e(f"{t}.below = call i64 @{_LOW_BITS}(i64 {t}.hi)")
        e(f"{t}.before = call i64 @{_LOW_BITS}(i64 {t}.lo1)")
        e(f"{t}.nbefore = xor i64 {t}.before, -1")
        e(f"{t}.bits = and i64 {t}.below, {t}.nbefore")
        e(f"{t}.so = add i64 %b, {offset}")
        narrow = f"{t}.bits"
        if size < 64:
            e(f"{t}.tb = trunc i64 {t}.bits to i{size}")
            narrow = f"{t}.tb"
        e(f"{t}.m = bitcast i{size} {narrow} to <{size} x i1>")
        lanes = ", ".join(f"i1 {'true' if j < stored else 'false'}" for j in range(size))
        store_mask = f"<{size} x i1> <{lanes}"
        for kh in range(spec.kh):
            u = f"{t}k{kh}"
            # no inbounds: the address may lie before the row (masked-off lanes are not read)
            e(f"{u}.sp = getelementptr i8, ptr %row{kh}, i64 {t}.so")
            e(f"{u}.v = call {vt} @llvm.masked.load.v{size}i8.p0(ptr {u}.sp, i32 1, "
              f"<{size} x i1> {t}.m, {vt} %pad{size})")  # fmt: skip
            value = f"{u}.v"
            if spec.flip:
                e(f"{u}.f = xor {vt} {u}.v, {_flip_constant(size)}")
                value = f"{u}.f"
            e(f"{u}.dp = getelementptr i8, ptr %drow, i64 {kh * spec.run + offset}")
            e(f"call void @llvm.masked.store.v{size}i8.p0({vt} {value}, ptr {u}.dp, i32 1, "
              f"{store_mask}>)")  # fmt: skip
    e("%i.next = add i64 %i, 1")
    e("%done = icmp eq i64 %i.next, %count")
    e("br i1 %done, label %exit, label %pixel")
    lines.append("exit:")
    e("ret void")
    args = (
        "ptr noalias nocapture readonly %rows, i64 %count, ptr noalias nocapture %dst, "
        "i64 %lda, i64 %b0, i64 %rowbytes, i64 %pad"
    )
    declarations = [
        "declare i64 @llvm.smax.i64(i64, i64)",
        "declare i64 @llvm.smin.i64(i64, i64)",
        _LOW_BITS_IR,
    ]
    for w in widths:
        declarations += [
            f"declare <{w} x i8> @llvm.masked.load.v{w}i8.p0(ptr, i32, <{w} x i1>, <{w} x i8>)",
            f"declare void @llvm.masked.store.v{w}i8.p0(<{w} x i8>, ptr, i32, <{w} x i1>)",
        ]
    body = "\n".join(lines)
    return "\n".join(declarations) + f"\ndefine void @{spec.name}({args}) nounwind {{\n{body}\n}}\n"


_LOW_BITS = "qnnjit_low_bits"
# the n lowest bits set, n in [0, 64] (a shift by 64 would be poison)
_LOW_BITS_IR = f"""define internal i64 @{_LOW_BITS}(i64 %n) alwaysinline {{
  %all = icmp uge i64 %n, 64
  %s = and i64 %n, 63
  %one = shl i64 1, %s
  %low = sub i64 %one, 1
  %r = select i1 %all, i64 -1, i64 %low
  ret i64 %r
}}"""
