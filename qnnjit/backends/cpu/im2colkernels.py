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

Kernel ABI (C):

    void kernel(const uint8 *const *rows,  // KH pointers: the first byte of pixel
                                           //   0's run in window row kh (a row of
                                           //   pad bytes where that row is outside
                                           //   the image)
                int64 count,               // output pixels (>= 0)
                uint8 *dst,                // pixel i's K bytes at dst[i*lda]
                int64 lda)

The caller passes only pixels whose window lies inside the image horizontally;
border pixels, which mix pad bytes into a run, keep the Numba loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .llvmjit import compile_module

__all__ = ["Im2colSpec", "im2col_ir", "im2col_kernel", "VECTOR_BYTES", "MAX_CHUNKS"]

VECTOR_BYTES = {"avx512_vnni": 64, "avx2": 32}
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
    def name(self) -> str:
        flip = "_flip" if self.flip else ""
        return f"qnnjit_im2col_{self.isa}_{self.kh}x{self.run}_s{self.step}{flip}"


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
    return isa in VECTOR_BYTES and len(_chunks(run, VECTOR_BYTES[isa])) <= MAX_CHUNKS


def _move_type(size: int) -> str:
    return f"i{size * 8}" if size <= 8 else f"<{size} x i8>"


def _flip_constant(size: int) -> str:
    if size <= 8:
        return str(int.from_bytes(b"\x80" * size, "little", signed=True))
    return "<" + ", ".join(["i8 -128"] * size) + ">"


def im2col_ir(spec: Im2colSpec) -> str:
    """The LLVM IR module (text) of ``spec``'s kernel."""
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
