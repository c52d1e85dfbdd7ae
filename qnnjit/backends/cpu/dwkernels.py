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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .llvmjit import compile_module
from .ukernels import requant_declarations, requantize_int_code, requantize_sums_code

__all__ = ["DepthwiseSpec", "depthwise_ir", "depthwise_kernel", "LANES"]

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

    def __post_init__(self):
        if self.isa not in LANES:
            raise ValueError(f"no depthwise row kernel for ISA {self.isa!r}")
        if min(self.kh, self.kw, self.sw, self.dw) < 1:
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.op not in ("fma", "umax", "smax") or (self.requant and self.op != "fma"):
            raise ValueError(f"bad depthwise kernel spec {self}")
        if self.bias_in_sum and not self.requant:
            raise ValueError(f"bad depthwise kernel spec {self}")

    @property
    def lanes(self) -> int:
        """Elements per vector: float32 sums, or bytes (four times as many)."""
        return LANES[self.isa] * (1 if self.op == "fma" else 4)

    @property
    def block(self) -> int:
        return _BLOCK[self.isa]

    @property
    def name(self) -> str:
        stage = "_rq" if self.requant else "" if self.op == "fma" else f"_{self.op}"
        stage += "b" if self.bias_in_sum else ""
        return f"qnnjit_dw_{self.isa}_{self.kh}x{self.kw}_s{self.sw}_d{self.dw}{stage}"


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
        for t in range(s.kh * s.kw):
            e(f"%{tag}.wo{t} = add i64 {coff}, %cpt{t}")
            e(f"%{tag}.wp{t} = getelementptr float, ptr %w, i64 %{tag}.wo{t}")
            e(f"%{tag}.w{t} = load {vec}, ptr %{tag}.wp{t}, align 4")
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
                    x = loaded.get(col)
                    if x is None:
                        x = loaded[col] = f"%{tag}.v{kh}_{col}"
                        e(f"%{tag}.o{kh}_{col} = add i64 %{tag}.xb, %cpq{col}")
                        e(f"%{tag}.p{kh}_{col} = getelementptr {self.elem}, ptr %row{kh}, "
                          f"i64 %{tag}.o{kh}_{col}")  # fmt: skip
                        e(f"{x} = load {vec}, ptr %{tag}.p{kh}_{col}, align {align}")
                    acc[o] = tap(o, kh * s.kw + kw, x, acc[o])
        return acc

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
        for kh in range(s.kh):
            e(f"%rp{kh} = getelementptr ptr, ptr %rows, i64 {kh}")
            e(f"%row{kh} = load ptr, ptr %rp{kh}, align 8")
        cols = max((ob - 1) * s.sw + (s.kw - 1) * s.dw + 1, ob)
        for q in range(cols):  # q * cp: column q's offset (also output q's)
            e(f"%cpq{q} = mul i64 %cp, {q}")
        for t in range(s.kh * s.kw):  # tap t's weight row offset
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
    return decl + "\n" + _Emitter(spec).function()


@functools.cache
def depthwise_kernel(spec: DepthwiseSpec) -> int:
    """The address of ``spec``'s compiled kernel (compiled once per process,
    and once per machine while the disk cache holds it; looked up here
    without regenerating and hashing the IR, which costs ~0.6 ms)."""
    return compile_module(depthwise_ir(spec), spec.isa, (spec.name,)).addresses[spec.name]
