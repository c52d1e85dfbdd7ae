"""Depthwise row kernels, generated as LLVM IR text (compiled and cached like
the GEMM microkernels, by ``llvmjit``): the depthwise convolution (below) and,
with ``op`` "umax" / "smax", 8-bit max pooling, which walks the same windows
over rows of bytes (64 a vector on AVX-512, 32 on AVX2) and stores the byte
maximum of each output pixel's taps.

One kernel computes one output row of a depthwise convolution over channels-last
float32 input rows:

    for each block of L channels (L = 16 on AVX-512, 8 on AVX2):
        w[t] = weights of tap t for these channels     # KH*KW vectors, held in registers
        for each block of OB output pixels ow..ow+OB-1:
            acc[o] = sum_t x[row kh(t)][(ow+o)*SW + kw(t)*DW][channels] * w[t]
            out[ow+o][channels] = int32(acc[o])

A block of outputs shares its input vectors: with unit stride, OB outputs of a
3-wide window read OB+2 vectors per input row, not 3*OB; the generator emits
each distinct load once. So a multiply-add costs one FMA and well under one
load, where a loop that keeps its sums in memory pays a load and a store of the
sum as well (the reason for this kernel).

The values are integers (``x - za`` and ``w - zw``, at most 255 in magnitude)
and every partial sum stays below 2^24 (the caller checks KH*KW*255*255), so
float32 arithmetic, fused or not, is exact and ``fptosi`` returns the integer.

Kernel ABI (C):

    void kernel(const float *const *rows,   // KH row pointers: padded input row kh,
                                            //   pixel j's channels at rows[kh][j*cp]
                const float *w,             // [KH*KW, cp]: tap t's weights at w[t*cp]
                int64 cp,                   // channel stride, a multiple of L (> 0)
                int64 ow,                   // output pixels in the row (>= 0)
                int32 *out,                 // [ow, cp]: output pixel j at out[j*cp]
                const int64 *ep)            // requant kernels only (else ignored)

Channels cp..C are padding the caller fills (with zeros): the kernel computes
them like any other and the caller ignores them.

A ``requant`` kernel stores bytes instead: ``out`` is uint8 [ow, cp] and ``ep``
= {bias, f, ldf}, the GEMM kernels' (``ukernels`` REQUANT_DOC), whose float
requantize it applies to each exact sum. Every one of its cp channels is
stored, so the caller uses it only when cp is the output's channel count.

With ``bias_in_sum`` (the caller has checked that |bias| + the largest |sum|
stays below 2^24 for every channel, so no int32 wrap can occur and every
partial sum is exact) the sums start from the bias, in float, and the
requantize takes fewer steps to the same bytes:

    v = sum * mult;  y = cvt_rn(min(max(v, lo), hi)) + zp      (in int32)

Clamping before rounding equals rounding before clamping, since lo and hi
are integers and rint is monotone; and adding the integer zp after the
conversion is exact (``ukernels.requantize_int_code``, which the int32
path uses too). That drops the float -> int -> float round trip of the
sum: 6 vector operations per output vector, not 9 (10 before the
conversion rounded), next to the window's 9 multiply-adds.

A ``pairs`` kernel (AVX512-VNNI, unit horizontal dilation) multiplies int16
tap pairs instead. Its rows hold int32 words P[e][c]: (x[2e][c] - za) in
the low half, (x[2e+1][c] - za) in the high half (the padded row's columns
2e and 2e+1: each input value once). Output o's window starts at column
o * sw; when that is even its taps pair up as (w0, w1), (w2, w3)...,
when odd as (0, w0), (w1, w2)..., so its weights are int32 words of int16
pairs in two sets by that parity (``pair_weights``), each pair's missing
half 0. One ``vpdpwssd`` adds two taps' products to an int32 sum that
starts at the bias: a 3x3 window takes 6 instead of 9 multiply-adds (both
run one zmm per cycle here, on the same pipes), and the sums are exact
int32 arithmetic, wrapping like the reference's, under no range condition.
The requantize converts the sum to float and goes on as above
(``requantize_int_code``).

A ``quads`` kernel (AVX512-VNNI, up to 3 window rows) multiplies bytes with
``vpdpbusd``, four at a time, one window column per instruction: its one
row holds, for each padded column j and channel c, the int32 word of the
u8 bytes (x ^ flip) of input rows q0..q0+3 at (j, c), q0 the even row at
or above the window's first (``quad_row``, the caller's ring). So an
output row's window is bytes s..s+KH-1 of each word, s = 0 or 1; byte
quads of weights, (w[0], w[1], w[2], 0) or (0, w[0], w[1], w[2]) per
window column (``quad_weights``, a set per s), make one ``vpdpbusd`` add a
column's KH taps: 3 multiply-adds for a 3x3 window where pairs take 6, and
each quad row serves two output rows at unit stride. The bytes are the
unshifted u8 codes, so the caller starts the sums at bias - za * sum(w)
(sum (x - za) w = sum x w - za sum w, pad taps included: they hold the pad
byte), and each w - zw must be an int8. The sums are exact int32
arithmetic, wrapping like the reference's. On MobileNetV2's rows the
kernel takes 25-30 % less time than the pairs one (8.4 against 11.2
cycles per 16 outputs at 144 channels), and building a quad row costs
what two pair rows do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .llvmjit import compile_module
from .ukernels import requant_declarations, requantize_int_code, requantize_sums_code

__all__ = [
    "DepthwiseSpec", "depthwise_ir", "depthwise_kernel", "LANES", "pair_counts", "pair_weights",
    "pair_row_kernel",
]  # fmt: skip

LANES = {"avx512_vnni": 16, "avx2": 8}
# Output pixels per register block: accumulators + the taps' weights + a window
# row's input vectors fit the 32 zmm registers for a 3x3 window; AVX2's 16 ymm
# cannot hold even the 9 weights with 8 sums, so it takes fewer.
_BLOCK = {"avx512_vnni": 8, "avx2": 4}  # powers of two


@dataclass(frozen=True)
class DepthwiseSpec:
    """What one depthwise row kernel is specialized on."""

    isa: str
    kh: int
    kw: int
    sw: int  # horizontal stride
    dw: int  # horizontal dilation
    requant: bool = False  # store requantized bytes (see the module doc)
    op: str = "fma"  # "fma": the convolution; "umax" / "smax": max pooling of bytes
    bias_in_sum: bool = False  # requant only: sums start from the bias (module doc)
    pairs: bool = False  # requant, avx512_vnni, dw 1: int16 tap pairs (module doc)
    quads: bool = False  # requant, avx512_vnni, kh <= 3: byte row quads (module doc)
    # max pooling only: bytes per vector, narrower than the ISA's (0: its
    # full width), for channel counts that fill no whole full-width vector
    max_bytes: int = 0

    def __post_init__(self):
        if self.isa not in LANES:
            raise ValueError(f"no depthwise row kernel for ISA {self.isa!r}")
        if min(self.kh, self.kw, self.sw, self.dw) < 1:
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.op not in ("fma", "umax", "smax") or (self.requant and self.op != "fma"):
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.bias_in_sum and not self.requant:
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.pairs and not (
            self.requant and self.isa == "avx512_vnni" and self.dw == 1 and not self.bias_in_sum
        ):
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.quads and not (
            self.requant and self.isa == "avx512_vnni" and self.kh <= 3
            and not (self.bias_in_sum or self.pairs)
        ):  # fmt: skip
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.max_bytes and (
            self.op == "fma"
            or self.max_bytes not in (16, 32)
            or self.max_bytes >= 4 * LANES[self.isa]
        ):
            raise ValueError(f"bad depthwise kernel spec {self}")

    @property
    def lanes(self) -> int:
        """Elements per vector: float32 sums, or bytes (four times as many, or
        `max_bytes`)."""
        if self.max_bytes:
            return self.max_bytes
        return LANES[self.isa] * (1 if self.op == "fma" else 4)

    @property
    def block(self) -> int:
        return _BLOCK[self.isa]

    @property
    def name(self) -> str:
        stage = "_rq" if self.requant else "" if self.op == "fma" else f"_{self.op}"
        stage += "b" if self.bias_in_sum else "p" if self.pairs else "q" if self.quads else ""
        stage += f"_v{self.max_bytes}" if self.max_bytes else ""
        return f"qnnjit_dw_{self.isa}_{self.kh}x{self.kw}_s{self.sw}_d{self.dw}{stage}"


def pair_counts(kw: int) -> tuple[int, int]:
    """How many tap pairs a window of width kw spans when it starts at an
    even column, and when at an odd one."""
    return (kw + 1) // 2, kw // 2 + 1


def pair_weights(w: np.ndarray) -> np.ndarray:
    """A ``pairs`` kernel's weights: int [KH, KW, C] (w - zw) as int32 words
    of int16 pairs, [KH * (pairs at even starts + pairs at odd starts), C]:
    first the even set (kh-major, (w[2i], w[2i+1]) for pair i), then the odd
    one ((w[2i-1], w[2i])); taps outside the window 0."""
    kh, kw, c = w.shape
    sets = []
    for parity, count in enumerate(pair_counts(kw)):
        padded = np.zeros((kh, 2 * count, c), np.int64)
        padded[:, parity : parity + kw] = w
        lo, hi = padded[:, 0::2] & 0xFFFF, (padded[:, 1::2] & 0xFFFF) << 16
        sets.append((lo | hi).reshape(-1, c))
    return np.concatenate(sets).astype(np.uint32).view(np.int32)


def quad_weights(w: np.ndarray) -> np.ndarray:
    """A ``quads`` kernel's weights: int [KH, KW, C] (w - zw, each in int8
    range, KH <= 3) as int32 words of 4 bytes, [2 * KW, C]: for window rows
    starting at byte s (s = 0, then 1) of the quad, byte q of word (s, kw)
    is w[q - s, kw] (0 outside the window)."""
    kh, kw, c = w.shape
    assert kh <= 3 and -128 <= w.min(initial=0) and w.max(initial=0) <= 127
    quads = np.zeros((2, kw, c, 4), np.int8)
    for start in range(2):
        quads[start, :, :, start : start + kh] = w.transpose(1, 2, 0)
    return quads.reshape(2 * kw, c, 4).view(np.int32)[..., 0]


_ARGS = (
    "ptr noalias nocapture readonly %rows, ptr noalias nocapture readonly %w, i64 %cp, "
    "i64 %ow, ptr noalias nocapture %out, ptr nocapture readonly %ep"
)


class _Emitter:
    def __init__(self, spec: DepthwiseSpec):
        self.spec = spec
        self.elem = "float" if spec.op == "fma" else "i8"
        self.vec = f"<{spec.lanes} x {self.elem}>"
        self.ivec = f"<{spec.lanes} x i32>"
        self.fma = f"@llvm.fmuladd.v{spec.lanes}f32"
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def label(self, name: str) -> None:
        self.lines.append(f"{name}:")

    def block(self, tag: str, ow0: str, coff: str, count: int) -> None:
        """Emit `count` output pixels from pixel `ow0` for the channel block at
        float offset `coff` (i64 SSA values): its taps' weights, the sums (each
        distinct input vector loaded once) and their stores."""
        s, e, vec = self.spec, self.emit, self.vec
        if s.op != "fma":
            self.max_block(tag, ow0, coff, count)
            return
        if s.pairs:
            self.pair_block(tag, ow0, coff, count)
            return
        if s.quads:
            self.quad_block(tag, ow0, coff, count)
            return
        for t in range(s.kh * s.kw):
            self.weight_row(tag, coff, t, "float", vec)
        fma = self.fma
        k = self.requant_constants(tag, coff) if s.requant else None
        start = k["bf"] if s.bias_in_sum else None  # the sums' first addend

        def tap(o: int, t: int, x: str, acc: str | None) -> str:
            w, new = f"%{tag}.w{t}", f"%{tag}.a{o}_{t}"
            acc = acc or start
            if acc is None:
                e(f"{new} = fmul {vec} {x}, {w}")
            else:
                e(f"{new} = call {vec} {fma}({vec} {x}, {vec} {w}, {vec} {acc})")
            return new

        acc = self.window(tag, ow0, coff, count, tap)
        e(f"%{tag}.y0 = mul i64 {ow0}, %cp")
        e(f"%{tag}.yb = add i64 %{tag}.y0, {coff}")
        for o in range(count):
            e(f"%{tag}.yo{o} = add i64 %{tag}.yb, %cpq{o}")
            t = f"%{tag}.rq{o}"
            if s.bias_in_sum:
                self.requantize_sum(t, acc[o], k)
            else:
                e(f"%{tag}.i{o} = fptosi {vec} {acc[o]} to {self.ivec}")
                if k is None:
                    e(f"%{tag}.q{o} = getelementptr i32, ptr %out, i64 %{tag}.yo{o}")
                    e(f"store {self.ivec} %{tag}.i{o}, ptr %{tag}.q{o}, align 4")
                    continue
                requantize_sums_code(e, t, s.lanes, f"%{tag}.i{o}", k)
            e(f"{t}.yb = trunc {self.ivec} {t}.yi to <{s.lanes} x i8>")
            e(f"%{tag}.q{o} = getelementptr i8, ptr %out, i64 %{tag}.yo{o}")
            e(f"store <{s.lanes} x i8> {t}.yb, ptr %{tag}.q{o}, align 1")

    def pair_block(self, tag: str, ow0: str, coff: str, count: int) -> None:
        """`block` of a ``pairs`` kernel: int32 sums from the bias, one
        `vpdpwssd` per tap pair, each distinct pair vector loaded once. The
        block starts at an even output (blocks of `_BLOCK` pixels), so output
        o's window starts at the block's column 0 plus o * sw, of parity
        o * sw."""
        s, e, iv = self.spec, self.emit, self.ivec
        counts = pair_counts(s.kw)
        weights: dict[tuple, str] = {}

        def weight(parity: int, kh: int, i: int) -> str:
            t = parity * s.kh * counts[0] + kh * counts[parity] + i
            if t not in weights:
                weights[t] = self.weight_row(tag, coff, t, "i32", iv)
            return weights[t]

        k = self.requant_constants(tag, coff)
        acc = [k["b"]] * count
        e(f"%{tag}.c0 = mul i64 {ow0}, {s.sw // 2 if s.sw % 2 == 0 else s.sw}")
        if s.sw % 2:  # ow0 is even: the block's first column ow0 * sw is even
            e(f"%{tag}.c0h = lshr i64 %{tag}.c0, 1")
        else:
            e(f"%{tag}.c0h = add i64 %{tag}.c0, 0")
        e(f"%{tag}.x0 = mul i64 %{tag}.c0h, %cp")
        e(f"%{tag}.xb = add i64 %{tag}.x0, {coff}")
        for kh in range(s.kh):
            loaded: dict[int, str] = {}
            for o in range(count):
                start = o * s.sw
                parity = start % 2
                for i in range(counts[parity]):
                    j = start // 2 + i  # the pair, from the block's first
                    x = self.row_vector(tag, kh, j, "i32", iv, 4, loaded)
                    new = f"%{tag}.a{o}_{kh}_{i}"
                    e(f"{new} = call {iv} @llvm.x86.avx512.vpdpwssd.512({iv} {acc[o]}, {iv} {x}, "
                      f"{iv} {weight(parity, kh, i)})")  # fmt: skip
                    acc[o] = new
        self.store_int_sums(tag, ow0, coff, acc, k)

    def quad_block(self, tag: str, ow0: str, coff: str, count: int) -> None:
        """`block` of a ``quads`` kernel: int32 sums from the (compensated)
        bias, one `vpdpbusd` per window column, each distinct quad vector
        loaded once."""
        s, e, iv = self.spec, self.emit, self.ivec
        k = self.requant_constants(tag, coff)
        weights = [self.weight_row(tag, coff, kw, "i32", iv) for kw in range(s.kw)]
        e(f"%{tag}.c0 = mul i64 {ow0}, {s.sw}")  # the block's first column
        e(f"%{tag}.x0 = mul i64 %{tag}.c0, %cp")
        e(f"%{tag}.xb = add i64 %{tag}.x0, {coff}")
        acc = [k["b"]] * count
        loaded: dict[int, str] = {}
        for kw in range(s.kw):
            for o in range(count):
                x = self.row_vector(tag, 0, o * s.sw + kw * s.dw, "i32", iv, 4, loaded)
                new = f"%{tag}.a{o}_{kw}"
                e(f"{new} = call {iv} @llvm.x86.avx512.vpdpbusd.512({iv} {acc[o]}, {iv} {x}, "
                  f"{iv} {weights[kw]})")  # fmt: skip
                acc[o] = new
        self.store_int_sums(tag, ow0, coff, acc, k)

    def store_int_sums(self, tag: str, ow0: str, coff: str, acc: list, k: dict) -> None:
        """Requantize the int32 sums `acc` of the block's output pixels from
        `ow0` (channel block at `coff`) and store their bytes."""
        s, e, iv = self.spec, self.emit, self.ivec
        e(f"%{tag}.y0 = mul i64 {ow0}, %cp")
        e(f"%{tag}.yb = add i64 %{tag}.y0, {coff}")
        for o in range(len(acc)):
            t = f"%{tag}.rq{o}"
            e(f"%{tag}.yo{o} = add i64 %{tag}.yb, %cpq{o}")
            e(f"{t}.f = sitofp {iv} {acc[o]} to {self.vec}")
            e(f"{t}.v = fmul {self.vec} {t}.f, {k['m']}")
            requantize_int_code(e, t, s.lanes, f"{t}.v", k)
            e(f"{t}.yb = trunc {iv} {t}.yi to <{s.lanes} x i8>")
            e(f"%{tag}.q{o} = getelementptr i8, ptr %out, i64 %{tag}.yo{o}")
            e(f"store <{s.lanes} x i8> {t}.yb, ptr %{tag}.q{o}, align 1")

    def weight_row(self, tag: str, coff: str, t: int, elem: str, vec: str) -> str:
        """Load `%{tag}.w{t}`: the vector of weight row t (of `elem`s, `cp`
        apart) for the channel block at element offset `coff`."""
        e = self.emit
        e(f"%{tag}.wo{t} = add i64 {coff}, %cpt{t}")
        e(f"%{tag}.wp{t} = getelementptr {elem}, ptr %w, i64 %{tag}.wo{t}")
        e(f"%{tag}.w{t} = load {vec}, ptr %{tag}.wp{t}, align 4")
        return f"%{tag}.w{t}"

    def requantize_sum(self, t: str, acc: str, k: dict) -> None:
        """`{t}.yi`, the output codes (int32) of the float sums `acc` that
        include the bias: the ``bias_in_sum`` steps of the module doc."""
        self.emit(f"{t}.v = fmul {self.vec} {acc}, {k['m']}")
        requantize_int_code(self.emit, t, self.spec.lanes, f"{t}.v", k)

    def max_block(self, tag: str, ow0: str, coff: str, count: int) -> None:
        """`block` for max pooling: each output vector the unsigned or signed
        byte maximum of its taps' vectors, stored as is."""
        s, e, vec = self.spec, self.emit, self.vec
        fn = f"@llvm.{s.op}.v{s.lanes}i8"

        def tap(o: int, t: int, x: str, acc: str | None) -> str:
            if acc is None:
                return x
            e(f"%{tag}.a{o}_{t} = call {vec} {fn}({vec} {acc}, {vec} {x})")
            return f"%{tag}.a{o}_{t}"

        acc = self.window(tag, ow0, coff, count, tap)
        e(f"%{tag}.y0 = mul i64 {ow0}, %cp")
        e(f"%{tag}.yb = add i64 %{tag}.y0, {coff}")
        for o in range(count):
            e(f"%{tag}.yo{o} = add i64 %{tag}.yb, %cpq{o}")
            e(f"%{tag}.q{o} = getelementptr i8, ptr %out, i64 %{tag}.yo{o}")
            e(f"store {vec} {acc[o]}, ptr %{tag}.q{o}, align 1")

    def window(self, tag: str, ow0: str, coff: str, count: int, tap) -> list[str]:
        """Walk the windows of `count` output pixels from `ow0` (channel block
        at element offset `coff`), loading each distinct input vector once;
        `tap(o, t, x, acc)` emits output o's step for tap t on vector x and
        returns its new accumulator (acc None at the first tap). Returns the
        accumulators."""
        s, e, vec = self.spec, self.emit, self.vec
        align = 4 if self.elem == "float" else 1
        e(f"%{tag}.c0 = mul i64 {ow0}, {s.sw}")  # the block's first input column
        e(f"%{tag}.x0 = mul i64 %{tag}.c0, %cp")
        e(f"%{tag}.xb = add i64 %{tag}.x0, {coff}")
        acc: list = [None] * count
        for kh in range(s.kh):
            loaded: dict[int, str] = {}
            for kw in range(s.kw):
                for o in range(count):
                    col = o * s.sw + kw * s.dw
                    x = self.row_vector(tag, kh, col, self.elem, vec, align, loaded)
                    acc[o] = tap(o, kh * s.kw + kw, x, acc[o])
        return acc

    def row_vector(self, tag: str, kh: int, col: int, elem: str, vec: str, align: int,
                   loaded: dict) -> str:  # fmt: skip
        """The vector at column `col` (from the block's first, in `cp` strides)
        of window row kh: emitted at its first use, then reused (`loaded`)."""
        x = loaded.get(col)
        if x is None:
            e = self.emit
            x = loaded[col] = f"%{tag}.v{kh}_{col}"
            e(f"%{tag}.o{kh}_{col} = add i64 %{tag}.xb, %cpq{col}")
            e(f"%{tag}.p{kh}_{col} = getelementptr {elem}, ptr %row{kh}, i64 %{tag}.o{kh}_{col}")
            e(f"{x} = load {vec}, ptr %{tag}.p{kh}_{col}, align {align}")
        return x

    def requant_constants(self, tag: str, coff: str) -> dict:
        """The channel block's bias, mult, lo, hi and zp vectors (`k` of the ukernels
        requantize functions), zp as int32 too, and the bias as float with
        bias_in_sum."""
        e, lanes, vec = self.emit, self.spec.lanes, self.vec
        e(f"%{tag}.pb = getelementptr i64, ptr %ep.bias, i64 {coff}")
        e(f"%{tag}.b64 = load <{lanes} x i64>, ptr %{tag}.pb, align 8")
        e(f"%{tag}.b = trunc <{lanes} x i64> %{tag}.b64 to {self.ivec}")
        k = {"b": f"%{tag}.b"}
        for row, what in enumerate(("m", "lo", "hi", "zp")):
            e(f"%{tag}.{what}o = add i64 %ep.ldf{row}, {coff}")
            e(f"%{tag}.{what}p = getelementptr float, ptr %ep.f, i64 %{tag}.{what}o")
            e(f"%{tag}.{what} = load {vec}, ptr %{tag}.{what}p, align 4")
            k[what] = f"%{tag}.{what}"
        e(f"%{tag}.zpi = fptosi {vec} %{tag}.zp to {self.ivec}")  # exact: an integer
        k["zpi"] = f"%{tag}.zpi"
        if self.spec.bias_in_sum:  # exact: |bias| < 2^24
            e(f"%{tag}.bf = sitofp {self.ivec} %{tag}.b to {vec}")
            k["bf"] = f"%{tag}.bf"
        return k

    def channel_loop(self, tag: str, ow0: str, count: int, done: str) -> None:
        """`count` pixels from `ow0`, every channel block, then branch to `done`;
        entered at the label `tag`.pre."""
        e, label, lanes = self.emit, self.label, self.spec.lanes
        label(f"{tag}.pre")  # entered from here (the phi's first edge)
        e(f"br label %{tag}")
        label(f"{tag}")
        e(f"%{tag}.i = phi i64 [ 0, %{tag}.pre ], [ %{tag}.in, %{tag} ]")
        e(f"%{tag}.coff = mul i64 %{tag}.i, {lanes}")
        self.block(f"{tag}.k", ow0, f"%{tag}.coff", count)
        e(f"%{tag}.in = add i64 %{tag}.i, 1")
        e(f"%{tag}.idone = icmp eq i64 %{tag}.in, %nb")
        e(f"br i1 %{tag}.idone, label %{done}, label %{tag}")

    def function(self) -> str:
        s, e, label = self.spec, self.emit, self.label
        lanes, ob = s.lanes, s.block
        label("entry")
        for kh in range(1 if s.quads else s.kh):  # a quads kernel reads one row
            e(f"%rp{kh} = getelementptr ptr, ptr %rows, i64 {kh}")
            e(f"%row{kh} = load ptr, ptr %rp{kh}, align 8")
        cols = max((ob - 1) * s.sw + (s.kw - 1) * s.dw + 1, ob)
        for q in range(cols):  # q * cp: column q's offset (also output q's)
            e(f"%cpq{q} = mul i64 %cp, {q}")
        for t in range(s.kh * max(s.kw, sum(pair_counts(s.kw)))):  # weight row t's offset
            e(f"%cpt{t} = mul i64 %cp, {t}")
        if s.requant:  # ep: int64 {bias, f, ldf}, as the GEMM kernels' first three
            for field, name in enumerate(("bias", "f", "ldf")):
                e(f"%ep.p{field} = getelementptr i64, ptr %ep, i64 {field}")
                e(f"%ep.{name}i = load i64, ptr %ep.p{field}, align 8")
            e("%ep.bias = inttoptr i64 %ep.biasi to ptr")
            e("%ep.f = inttoptr i64 %ep.fi to ptr")
            for row in range(4):
                e(f"%ep.ldf{row} = mul i64 %ep.ldfi, {row}")
        e(f"%nb = udiv i64 %cp, {lanes}")
        e(f"%full = and i64 %ow, {-ob}")  # ob is a power of two
        e("%none = icmp eq i64 %nb, 0")
        e("%empty = icmp eq i64 %ow, 0")
        e("%skip = or i1 %none, %empty")
        e("br i1 %skip, label %exit, label %blkchk")
        label("blkchk")
        e("%hasblk = icmp ne i64 %full, 0")
        e("br i1 %hasblk, label %blk, label %tailchk")
        # blocks of ob pixels, the pixel loop outside: the input rows stream
        # through in address order and the weights, reloaded per block, hit L1
        label("blk")
        e("%p = phi i64 [ 0, %blkchk ], [ %p.next, %blk.end ]")
        e("br label %blk.c.pre")
        self.channel_loop("blk.c", "%p", ob, "blk.end")
        label("blk.end")
        e(f"%p.next = add i64 %p, {ob}")
        e("%pdone = icmp eq i64 %p.next, %full")
        e("br i1 %pdone, label %tailchk, label %blk")
        # the last ow % ob pixels as one block of their own count
        label("tailchk")
        e("%rest = sub i64 %ow, %full")
        cases = " ".join(f"i64 {r}, label %tail{r}.pre" for r in range(1, ob))
        e(f"switch i64 %rest, label %exit [ {cases} ]")
        for r in range(1, ob):
            self.channel_loop(f"tail{r}", "%full", r, "exit")
        label("exit")
        e("ret void")
        body = "\n".join(self.lines)
        return f"define void @{s.name}({_ARGS}) nounwind {{\n{body}\n}}\n"


def depthwise_ir(spec: DepthwiseSpec) -> str:
    """The LLVM IR module (text) of ``spec``'s kernel."""
    lanes = spec.lanes
    if spec.op != "fma":
        vec = f"<{lanes} x i8>"
        decl = f"declare {vec} @llvm.{spec.op}.v{lanes}i8({vec}, {vec})\n"
        return decl + "\n" + _Emitter(spec).function()
    decl = (
        f"declare <{lanes} x float> @llvm.fmuladd.v{lanes}f32"
        f"(<{lanes} x float>, <{lanes} x float>, <{lanes} x float>)\n"
    ) + (requant_declarations(lanes) if spec.requant else "")
    if spec.pairs or spec.quads:
        iv, op = "<16 x i32>", "vpdpwssd" if spec.pairs else "vpdpbusd"
        decl += f"declare {iv} @llvm.x86.avx512.{op}.512({iv}, {iv}, {iv})\n"
    return decl + "\n" + _Emitter(spec).function()


@functools.cache
def depthwise_kernel(spec: DepthwiseSpec) -> int:
    """The address of ``spec``'s compiled kernel (compiled once per process,
    and once per machine while the disk cache holds it; looked up here
    without regenerating and hashing the IR, which costs ~0.6 ms)."""
    return compile_module(depthwise_ir(spec), spec.isa, (spec.name,)).addresses[spec.name]


# The ring rows of a ``pairs`` kernel, built from the input's bytes: for each
# pair e of columns inside the image, 16 channels at a time, both columns'
# bytes widened to int16 minus the zero point and interleaved (low half the
# even column). Numba's loop for this (int64 arithmetic, strided int16
# stores) took twice as long as the float32 rows' conversion, which cancelled
# what the pairs kernel saves; this is one load, widen, subtract per column
# and one interleaving shuffle per 16 pairs.
#
#     void pair_row(const uint8 *src,   // the pairs' first column: pair e at src + 2*e*c
#                   int64 pairs,        // how many
#                   int64 c,            // channels, a multiple of 16
#                   int64 flip,         // 0, or 0x80 for signed activations
#                   int64 za,           // the zero point as u8 (byte ^ flip)
#                   int16 *dst)         // pair e, channel k at dst[2*(e*c + k)]
_PAIR_ROW = """
define void @qnnjit_dw_pair_row_avx512(ptr noalias nocapture readonly %src, i64 %pairs, i64 %c,
                                      i64 %flip, i64 %za, ptr noalias nocapture %dst) nounwind {
entry:
  %fb = trunc i64 %flip to i8
  %fi = insertelement <16 x i8> undef, i8 %fb, i64 0
  %fv = shufflevector <16 x i8> %fi, <16 x i8> undef, <16 x i32> zeroinitializer
  %zw = trunc i64 %za to i16
  %zi = insertelement <16 x i16> undef, i16 %zw, i64 0
  %zv = shufflevector <16 x i16> %zi, <16 x i16> undef, <16 x i32> zeroinitializer
  %none = icmp eq i64 %pairs, 0
  %noc = icmp eq i64 %c, 0
  %skip = or i1 %none, %noc
  br i1 %skip, label %exit, label %pair
pair:
  %e = phi i64 [ 0, %entry ], [ %en, %pair.end ]
  %e2c = mul i64 %e, %c
  %eo = shl i64 %e2c, 1
  %pe = getelementptr i8, ptr %src, i64 %eo
  %de = getelementptr i32, ptr %dst, i64 %e2c
  br label %chan
chan:
  %k = phi i64 [ 0, %pair ], [ %kn, %chan ]
  %pa = getelementptr i8, ptr %pe, i64 %k
  %pb = getelementptr i8, ptr %pa, i64 %c
  %va = load <16 x i8>, ptr %pa, align 1
  %vb = load <16 x i8>, ptr %pb, align 1
  %xa = xor <16 x i8> %va, %fv
  %xb = xor <16 x i8> %vb, %fv
  %wa = zext <16 x i8> %xa to <16 x i16>
  %wb = zext <16 x i8> %xb to <16 x i16>
  %sa = sub <16 x i16> %wa, %zv
  %sb = sub <16 x i16> %wb, %zv
  %il = shufflevector <16 x i16> %sa, <16 x i16> %sb, <32 x i32> <<INTERLEAVE>>
  %pd = getelementptr i32, ptr %de, i64 %k
  store <32 x i16> %il, ptr %pd, align 2
  %kn = add i64 %k, 16
  %kdone = icmp uge i64 %kn, %c
  br i1 %kdone, label %pair.end, label %chan
pair.end:
  %en = add i64 %e, 1
  %done = icmp eq i64 %en, %pairs
  br i1 %done, label %exit, label %pair
exit:
  ret void
}
""".replace("<INTERLEAVE>", ", ".join(f"i32 {k // 2 + 16 * (k % 2)}" for k in range(32)))


@functools.cache
def pair_row_kernel() -> int:
    """The address of the ``pairs`` ring-row builder (AVX-512; ABI above)."""
    name = "qnnjit_dw_pair_row_avx512"
    return compile_module(_PAIR_ROW, "avx512_vnni", (name,)).addresses[name]


# The ring row of a ``quads`` kernel: four consecutive (padded) input rows'
# bytes interleaved, byte q of word i from row q's byte i (flipped to u8):
# 16 bytes of each row make one 64-byte vector.
#
#     void quad_row(const uint8 *const *src,   // the 4 rows' first bytes
#                   int64 n,                   // bytes per row, a multiple of 16
#                   int64 flip,                // 0, or 0x80 for signed activations
#                   uint8 *dst)                // row q's byte i at dst[4*i + q]
_QUAD_ROW = """
define void @qnnjit_dw_quad_row_avx512(ptr noalias nocapture readonly %src, i64 %n, i64 %flip,
                                      ptr noalias nocapture %dst) nounwind {
entry:
  %fb = trunc i64 %flip to i8
  %fi = insertelement <64 x i8> undef, i8 %fb, i64 0
  %fv = shufflevector <64 x i8> %fi, <64 x i8> undef, <64 x i32> zeroinitializer
  %p1 = getelementptr ptr, ptr %src, i64 1
  %p2 = getelementptr ptr, ptr %src, i64 2
  %p3 = getelementptr ptr, ptr %src, i64 3
  %r0 = load ptr, ptr %src, align 8
  %r1 = load ptr, ptr %p1, align 8
  %r2 = load ptr, ptr %p2, align 8
  %r3 = load ptr, ptr %p3, align 8
  %none = icmp ult i64 %n, 16
  br i1 %none, label %exit, label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %in, %loop ]
  %a0 = getelementptr i8, ptr %r0, i64 %i
  %a1 = getelementptr i8, ptr %r1, i64 %i
  %a2 = getelementptr i8, ptr %r2, i64 %i
  %a3 = getelementptr i8, ptr %r3, i64 %i
  %v0 = load <16 x i8>, ptr %a0, align 1
  %v1 = load <16 x i8>, ptr %a1, align 1
  %v2 = load <16 x i8>, ptr %a2, align 1
  %v3 = load <16 x i8>, ptr %a3, align 1
  %v01 = shufflevector <16 x i8> %v0, <16 x i8> %v1, <32 x i32> <CAT32>
  %v23 = shufflevector <16 x i8> %v2, <16 x i8> %v3, <32 x i32> <CAT32>
  %q = shufflevector <32 x i8> %v01, <32 x i8> %v23, <64 x i32> <QUADS>
  %qx = xor <64 x i8> %q, %fv
  %i4 = shl i64 %i, 2
  %d = getelementptr i8, ptr %dst, i64 %i4
  store <64 x i8> %qx, ptr %d, align 1
  %in = add i64 %i, 16
  %next = add i64 %in, 16
  %more = icmp ule i64 %next, %n
  br i1 %more, label %loop, label %exit
exit:
  ret void
}
""".replace("<CAT32>", "<" + ", ".join(f"i32 {k}" for k in range(32)) + ">").replace(
    "<QUADS>", "<" + ", ".join(f"i32 {16 * (k % 4) + k // 4}" for k in range(64)) + ">"
)


@functools.cache
def quad_row_kernel() -> int:
    """The address of the ``quads`` ring-row builder (AVX-512; ABI above)."""
    name = "qnnjit_dw_quad_row_avx512"
    return compile_module(_QUAD_ROW, "avx512_vnni", (name,)).addresses[name]
