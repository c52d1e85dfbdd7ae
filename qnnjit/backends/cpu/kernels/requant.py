"""requantize, and the accumulator epilogue every accumulating kernel shares.

An `Epilogue` is the compile-time form of a chain `[bias add] -> requantize
-> [qadd | qmul | lookup]` (see `_lowering`): per-channel arrays and scalars
packed into four small arrays of fixed types, so one compiled kernel serves
every layer (Numba compiles per argument *types*, and these never change):

    chan_i  int64[4, C]   bias (int32 values), fixed-point multiplier, shift, zp
    chan_f  float32[4, C] float multiplier, clamp bounds minus zp, zp (FM_* rows)
    sc_i    int64[16]     rounding, clamp lo/hi, post op, operand codes (below)
    sc_f    float32[8]    post-op ratios and constants
    table   int64[T]      lookup table (post op), else empty

`ep_tile(acc, ...)` maps a tile of raw accumulators (exact modulo 2^32) to
stored results; each element has a channel (its row, its column, or a
function of its flat index) and a flat output index, where a qadd/qmul post
op also reads its other operand. The formulas are those of `qnnjit.numerics`
and `ir/ops/qlinear_contrib.py`, step by step in the same precision:

- bias: `acc + bias` wrapped to int32 (`np.int32` truncates, as int32 C code);
- half_even_float: `v = f32(f32(acc) * m)`, `r = rint(v)` (ties to even),
  `y = clamp(r + zp, lo, hi)` with NaN -> lo;
- fixed_point_double: gemmlowp's SRDHM on `wrap32(acc << left)`, then
  RoundingDivideByPOT by `right`; fixed_point_single: `(acc*m + 2^(t-1)) >> t`,
  t = 31 - shift; both then `clamp(y + zp, lo, hi)`;
  [lo, hi] is the storage range, narrowed by the requantize `clamp` attribute;
- qadd: MLAS's `fma(A, rA, fma(B, rB, fixed))` with llvm.fma.f32, operands in
  the order ONNX Runtime's broadcasting passes them; qmul: `f32(f32(p) * r) +
  zc` on the exact integer product; both then x86 `cvtps2dq` (out of range ->
  INT32_MIN) and saturation;
- lookup: `table[y - qmin]`.

Every 8-bit tensor reaches a kernel as bytes (`uint8` views): a signed code s
is the byte `s & 0xFF`, and `(byte ^ 0x80) - 128` gives s back; results are
stored by truncation to the byte (`y & 0xFF`), the two's complement pattern.
So signed and unsigned tensors share one compiled kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .... import numerics
from ....ir import dtypes
from ....ir.graph import Node, Value
from ....ir.ops.qlinear_contrib import ort_broadcast_mode
from ._buffers import empty
from ._bytetable import byte_table
from ._lowering import Chain, Decline, Kernel, LowerContext, clip_bounds, const_input
from ._numba import U, fma_f32, jit
from ._threads import run_tasks
from .layout import UNSIGNED

# sc_i slots
R_NONE, R_FLOAT, R_FIXED_DOUBLE, R_FIXED_SINGLE = 0, 1, 2, 3
P_NONE, P_QADD, P_QMUL, P_LOOKUP = 0, 1, 2, 3
(I_ROUND, I_LO, I_HI, I_POST, I_OFLIP, I_OOFF, I_YFIRST, I_ZY, I_ZO, I_PLO, I_PHI, I_YQMIN,
 I_FAST) = range(13)  # fmt: skip
# sc_f slots
F_RY, F_RO, F_FIXED, F_RMUL, F_ZC = range(5)
# chan_f rows: the float path's per-channel constants, precomputed so its
# loops only load them (bounds and zero points of at most 16 bits are exact)
FM_MULT, FM_LO, FM_HI, FM_ZP = range(4)

ROUNDING_CODES = {
    "half_even_float": R_FLOAT,
    "fixed_point_double": R_FIXED_DOUBLE,
    "fixed_point_single": R_FIXED_SINGLE,
}

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
F32 = np.float32


def byte_codes(dtype) -> tuple[int, int]:
    """(flip, offset) with `code = (stored ^ flip) - offset` for a tensor of
    `dtype` read through an unsigned view of its width."""
    dt = dtypes.from_numpy(dtype) if not isinstance(dtype, dtypes.DType) else dtype
    if not dt.is_int:
        raise Decline(f"{dt} is not an integer type")
    if dt.qmin < 0:
        top = 1 << (dt.bits - 1)
        return top, top
    return 0, 0


def unsigned_view(array: np.ndarray) -> np.ndarray:
    """The same bytes as a writable, C-contiguous unsigned integer array of the
    element width. (Numba types read-only arrays apart: passing one would
    compile a kernel a second time, so those are copied.)"""
    flags = array.flags
    if not (flags.c_contiguous and flags.writeable):
        array = np.array(array, order="C")
    return array.view(UNSIGNED[array.dtype.itemsize])


def kernel_array(array: np.ndarray, dtype=None) -> np.ndarray:
    """`array` as a writable, C-contiguous array (of `dtype`), for a kernel."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


def storage_dtype(dtype: dtypes.DType) -> np.dtype:
    if not dtype.is_int or dtype.bits not in (8, 16, 32):
        raise Decline(f"cannot store {dtype} from a CPU kernel")
    return np.dtype(dtype.numpy)


# ---- the element epilogue ---------------------------------------------------------
# The per-element helpers take scalars only: Numba reference-counts array
# arguments at every call of a jitted function that is not optimized away,
# which cost 20-80 ns per element when arrays went through them.


@jit(inline=True)
def cvt_saturate(v, qmin, qmax):
    """x86 cvtps2dq (round half even; NaN or outside int32 -> INT32_MIN), then
    saturation to [qmin, qmax]."""
    r = np.rint(v)
    if not (r >= -2147483648.0 and r < 2147483648.0):
        return qmin
    y = np.int64(r)
    if y < qmin:
        return qmin
    if y > qmax:
        return qmax
    return y


@jit(inline=True)
def requantize_scalar(a, mode, mf, mi, sh, zp, lo, hi):
    """int32 accumulator value `a` (already biased) -> clamped integer result."""
    if mode == R_FLOAT:
        r = np.rint(np.float32(a) * mf)
        if r != r:
            return lo
        if r < lo - zp:
            return lo
        if r > hi - zp:
            return hi
        return np.int64(r) + zp
    if mode == R_FIXED_DOUBLE:
        left = sh if sh > 0 else 0
        right = -sh if sh < 0 else 0
        x = np.int64(np.int32(a << left))
        if x == INT32_MIN and mi == INT32_MIN:
            h = np.int64(INT32_MAX)
        else:
            ab = x * mi
            t = ab + (1 << 30) if ab >= 0 else ab + (1 - (1 << 30))
            h = t >> 31 if t >= 0 else -((-t) >> 31)
        mask = (np.int64(1) << right) - 1
        rem = h & mask
        thr = (mask >> 1) + (1 if h < 0 else 0)
        y = (h >> right) + (1 if rem > thr else 0)
    else:  # R_FIXED_SINGLE
        total = 31 - sh
        y = (a * mi + (np.int64(1) << (total - 1))) >> total
    y = y + zp
    if y < lo:
        return lo
    if y > hi:
        return hi
    return y


@jit(inline=True)
def qadd_scalar(a, b, ra, rb, fixed, qmin, qmax):
    """MLAS QLinearAdd on codes a (MLAS's A) and b: fma(A, rA, fma(B, rB, fixed))."""
    t = fma_f32(np.float32(a), ra, fma_f32(np.float32(b), rb, fixed))
    return cvt_saturate(t, qmin, qmax)


@jit(inline=True)
def qmul_scalar(p, r, zc, qmin, qmax):
    """MLAS QLinearMul on the exact integer product p = (a - za)(b - zb)."""
    return cvt_saturate(np.float32(np.float32(p) * r) + zc, qmin, qmax)


@jit(inline=True)
def _fast_post(acc, bias, mf, zp, lof, hif, o, post, yfirst, ry, ro, fixed, zy, zo, rmul, zc,
               plo, phi):  # fmt: skip
    """One element of the vectorized requantize -> qadd / qmul path: float
    requantization (`lof`/`hif` the clamp bounds minus the zero point), then
    with the other operand's code `o` the post op's formula and saturation.
    The bias add wraps to int32, as everywhere. (Scalars, not the sc_* arrays:
    loads from an array inside the loop are not hoisted past the stores.)"""
    v = np.rint(np.float32(np.int32(acc + bias)) * mf)
    v = min(max(v, lof), hif)
    y = np.int32(v) + zp
    if post == P_QADD:
        if yfirst:
            t = fma_f32(np.float32(y), ry, fma_f32(np.float32(o), ro, fixed))
        else:
            t = fma_f32(np.float32(o), ro, fma_f32(np.float32(y), ry, fixed))
    else:
        p = (y - zy) * (o - zo)
        t = np.float32(np.float32(p) * rmul) + zc
    q = np.rint(t)
    ok = q >= np.float32(-2147483648.0) and q < np.float32(2147483648.0)
    q = min(max(q, plo), phi)
    return np.int32(q) if ok else np.int32(plo)


# The common requantize (`ep_tile`'s fast path, `sc_i[I_FAST]` and no post
# op), as loops LLVM vectorizes: float rounding, finite multipliers, bounds
# exact in float32 (results of at most 16 bits), a row of the tile stored
# contiguously at out[row..]. Kernels whose epilogue is always this one call
# these alone: `ep_tile`, with every other case besides, took 1.8 s of a
# cold compile.


@jit(inline=True)
def fast_row_one_channel(acc, r, cols, out, row, c, chan_i, chan_f):
    """Row r of `acc`, every element in channel `c`."""
    ch = U(c)
    bias, mf, zp = np.int32(chan_i[0, ch]), chan_f[FM_MULT, ch], np.int32(chan_i[3, ch])
    lof, hif = chan_f[FM_LO, ch], chan_f[FM_HI, ch]
    for j in range(cols):
        v = np.rint(np.float32(np.int32(acc[U(r), U(j)] + bias)) * mf)
        v = min(max(v, lof), hif)
        out[U(row + j)] = np.int32(v) + zp


@jit(inline=True)
def fast_row_by_column(acc, r, cols, out, row, c1, bias_c, mult_c, lo_c, hi_c, zp_c):
    """Row r of `acc`, column j in channel c1 + j (the chan_i / chan_f rows
    passed as views, made once per tile)."""
    for j in range(cols):
        c = U(c1 + j)
        v = np.rint(np.float32(np.int32(acc[U(r), U(j)] + bias_c[c])) * mult_c[c])
        v = min(max(v, lo_c[c]), hi_c[c]) + zp_c[c]  # exact: 16-bit values
        out[U(row + j)] = np.int32(v)


@jit()
def ep_tile(acc, r0, r1, cols, out, base, stride_r, stride_c, c0, cs_r, cs_c, inner, channels,
            chan_i, chan_f, sc_i, sc_f, table, other):  # fmt: skip
    """The epilogue of rows r0..r1 of an int32 accumulator tile `acc[:, :cols]`
    (exact modulo 2^32): element (r, j) is stored at
    `idx = base + r*stride_r + j*stride_c`; its channel is
    `c0 + r*cs_r + j*cs_c`, or `(idx // inner) % channels` when `inner > 0`.
    See the module doc."""
    mode = sc_i[I_ROUND]
    lo, hi = sc_i[I_LO], sc_i[I_HI]
    post = sc_i[I_POST]
    oflip, ooff = sc_i[I_OFLIP], sc_i[I_OOFF]
    plo, phi = sc_i[I_PLO], sc_i[I_PHI]
    yfirst = sc_i[I_YFIRST] != 0
    zy, zo, yqmin = sc_i[I_ZY], sc_i[I_ZO], sc_i[I_YQMIN]
    ry, ro, fixed, rmul, zc = sc_f[F_RY], sc_f[F_RO], sc_f[F_FIXED], sc_f[F_RMUL], sc_f[F_ZC]
    if sc_i[I_FAST] != 0 and (post == P_QADD or post == P_QMUL) and inner == 0 and stride_c == 1:
        # A residual qadd / qmul after the requantize, each row of the tile
        # stored contiguously: the same formulas as `qadd_scalar` /
        # `qmul_scalar`, written as selects so the loops vectorize.
        oflip32, ooff32 = np.int32(oflip), np.int32(ooff)
        zy32, zo32 = np.int32(zy), np.int32(zo)
        plof, phif = np.float32(plo), np.float32(phi)
        if cs_c == 0:  # one channel per row (a channel-major conv tile)
            for r in range(r0, r1):
                c = U(c0 + r * cs_r)
                bias, mf, zp = np.int32(chan_i[0, c]), chan_f[FM_MULT, c], np.int32(chan_i[3, c])
                lof, hif = chan_f[FM_LO, c], chan_f[FM_HI, c]
                row = base + r * stride_r
                for j in range(cols):
                    i = U(row + j)
                    o = (np.int32(other[i]) ^ oflip32) - ooff32
                    out[i] = _fast_post(
                        acc[U(r), U(j)], bias, mf, zp, lof, hif, o, post, yfirst, ry, ro, fixed,
                        zy32, zo32, rmul, zc, plof, phif,
                    )  # fmt: skip
            return
        if cs_c == 1:  # one channel per column (a matmul or channels-last tile)
            for r in range(r0, r1):
                c1 = c0 + r * cs_r
                row = base + r * stride_r
                for j in range(cols):
                    c = U(c1 + j)
                    i = U(row + j)
                    o = (np.int32(other[i]) ^ oflip32) - ooff32
                    out[i] = _fast_post(
                        acc[U(r), U(j)], np.int32(chan_i[0, c]), chan_f[FM_MULT, c],
                        np.int32(chan_i[3, c]), chan_f[FM_LO, c], chan_f[FM_HI, c], o, post,
                        yfirst, ry, ro, fixed, zy32, zo32, rmul, zc, plof, phif,
                    )  # fmt: skip
            return
    if sc_i[I_FAST] != 0 and post == P_NONE and inner == 0 and stride_c == 1:
        if cs_c == 0:  # one channel per row (a conv tile: rows are channels)
            for r in range(r0, r1):
                fast_row_one_channel(acc, r, cols, out, base + r * stride_r, c0 + r * cs_r,
                                     chan_i, chan_f)  # fmt: skip
        else:  # one channel per column (a matmul or channels-last tile)
            bias_c, mult_c = chan_i[0], chan_f[FM_MULT]
            lo_c, hi_c, zp_c = chan_f[FM_LO], chan_f[FM_HI], chan_f[FM_ZP]
            for r in range(r0, r1):
                fast_row_by_column(acc, r, cols, out, base + r * stride_r, c0 + r * cs_r,
                                   bias_c, mult_c, lo_c, hi_c, zp_c)  # fmt: skip
        return
    for r in range(r0, r1):
        for j in range(cols):
            idx = U(base + r * stride_r + j * stride_c)
            c = U((idx // inner) % channels if inner > 0 else c0 + r * cs_r + j * cs_c)
            a = np.int64(np.int32(acc[U(r), j] + chan_i[0, c]))
            if mode == R_NONE:
                out[idx] = a
                continue
            y = requantize_scalar(
                a, mode, chan_f[FM_MULT, c], chan_i[1, c], chan_i[2, c], chan_i[3, c], lo, hi
            )
            if post == P_NONE:
                out[idx] = y
            elif post == P_LOOKUP:
                out[idx] = table[U(y - yqmin)]
            else:
                o = (np.int64(other[idx]) ^ oflip) - ooff
                if post == P_QADD:
                    if yfirst:
                        out[idx] = qadd_scalar(y, o, ry, ro, fixed, plo, phi)
                    else:
                        out[idx] = qadd_scalar(o, y, ro, ry, fixed, plo, phi)
                else:
                    out[idx] = qmul_scalar((y - zy) * (o - zo), rmul, zc, plo, phi)


@jit()
def requantize_flat(t0, t1, acc, inner, channels, out, chan_i, chan_f, sc_i, sc_f, table, other):
    """Standalone requantize (and its post op) over a flat accumulator seen as
    [outer, channels, inner]: tasks t0..t1 are (outer, channel) rows."""
    _0, _1 = np.int64(0), np.int64(1)  # not literals: one ep_tile compile
    a2 = acc.reshape(acc.size // inner, inner)
    for t in range(t0, t1):
        ep_tile(a2, t, t + 1, inner, out, _0, inner, _1, t % channels, _0, _0, _0, channels,
                chan_i, chan_f, sc_i, sc_f, table, other)  # fmt: skip


# ---- compile-time packing ----------------------------------------------------------


@dataclass
class Epilogue:
    """A packed epilogue and what it covers."""

    chan_i: np.ndarray
    chan_f: np.ndarray
    sc_i: np.ndarray  # operand order "general" (ONNX input 0 is MLAS's A)
    sc_i_swapped: np.ndarray  # qadd with ORT's "scalar0" order
    sc_f: np.ndarray
    sc_f_swapped: np.ndarray
    table: np.ndarray
    out_dtype: dtypes.DType
    nodes: list[Node] = field(default_factory=list)
    other: Value | None = None  # the post op's other operand (run-time input)
    other_const: np.ndarray | None = None  # ... or a constant, broadcast to the result
    y_index: int = 0  # which qadd/qmul operand (0 or 3) the requantized value is
    # the lookup as a table by stored byte (`_bytetable`), where its index and
    # result are 8-bit: the requantizing microkernels' table stage
    byte_table: np.ndarray = field(default_factory=lambda: _EMPTY_U8)
    # the table looks up the qadd / qmul's result (a lookup after the post op,
    # `build_epilogue`'s final_table): only the table stage computes it
    final_table: bool = False
    notes: list[str] = field(default_factory=list)
    _broadcast: dict = field(default_factory=dict, repr=False)  # shape -> other_const's bytes

    @property
    def requantizes(self) -> bool:
        return int(self.sc_i[I_ROUND]) != R_NONE

    def describe(self) -> str:
        parts = [n.op if n.op != "add" else "bias" for n in self.nodes]
        if self.requantizes:
            rq = next(n for n in self.nodes if n.op == "requantize")
            parts[parts.index("requantize")] = f"requantize[{rq.attrs['rounding']}]"
            if rq.attrs.get("clamp") is not None:
                parts.insert(parts.index(f"requantize[{rq.attrs['rounding']}]") + 1, "clamp")
        return "+".join(parts)

    def scalars(self, out_shape, other_shape=None):
        """(sc_i, sc_f) for a run: qadd's operand order follows the run-time
        shapes (ORT's broadcast mode), everything else is fixed."""
        if other_shape is None and self.other_const is not None:
            other_shape = self.other_const.shape
        if other_shape is None or self.sc_i[I_POST] != P_QADD:
            return self.sc_i, self.sc_f
        shapes = (out_shape, other_shape) if self.y_index == 0 else (other_shape, out_shape)
        if ort_broadcast_mode(*shapes) == "scalar0":
            return self.sc_i_swapped, self.sc_f_swapped
        return self.sc_i, self.sc_f

    def check_other(self, other: np.ndarray | None, out_shape) -> None:
        """The post op's operand must have the result's shape (no broadcasting)."""
        if other is not None and other.shape != tuple(out_shape):
            raise ValueError(
                f"fused {self.nodes[-1].op} operand has shape {other.shape}, "
                f"the result {tuple(out_shape)}"
            )

    def other_bytes(self, other: np.ndarray | None, out_shape) -> np.ndarray:
        """The post op's operand as flat bytes in the result's (C) order; a
        constant one broadcast once per result shape (the same array every
        call: the step stays replayable)."""
        self.check_other(other, out_shape)
        if other is None and self.other_const is not None:
            key = tuple(out_shape)
            found = self._broadcast.get(key)
            if found is None:
                whole = np.ascontiguousarray(np.broadcast_to(self.other_const, key))
                found = self._broadcast[key] = unsigned_view(whole).reshape(-1)
            return found
        if other is None:
            return _EMPTY_U8
        return unsigned_view(other).reshape(-1)


_EMPTY_U8 = np.zeros(0, np.uint8)
_EMPTY_I64 = np.zeros(0, np.int64)


def _channel_vector(values, channels: int, what: str) -> np.ndarray:
    v = np.asarray(values).reshape(-1)
    if v.size == 1:
        return np.full(channels, v[0], dtype=v.dtype)
    if v.size != channels:
        raise Decline(f"{what} has {v.size} entries for {channels} channels")
    return v.copy()


def bias_vector(node: Node, acc: Value, channels: int, axis: int | None) -> np.ndarray:
    """The int32 constant of a bias `add` as one value per channel, or Decline
    when it varies along another axis."""
    other = node.inputs[1] if node.inputs[0] is acc else node.inputs[0]
    const = other.const
    rank = acc.type.rank
    if const.ndim > rank:
        raise Decline(f"{node.name}: bias of rank {const.ndim} > {rank}")
    shape = (1,) * (rank - const.ndim) + const.shape
    for i, d in enumerate(shape):
        if d != 1 and i != axis:
            raise Decline(f"{node.name}: bias varies along axis {i}, not the channel axis")
    return _channel_vector(const, channels, f"{node.name} bias").astype(np.int64)


def _axis_of(node: Node, rank: int | None) -> int | None:
    axis = node.attrs.get("axis")
    if axis is None or rank is None:
        return axis
    return axis % rank if -rank <= axis < rank else axis


def build_epilogue(
    chain: Chain,
    acc: Value,
    channels: int,
    axis: int | None,
    base_bias: np.ndarray | None = None,
    *,
    constant_other: bool = False,
    final_table: bool = False,
) -> Epilogue:
    """Pack `chain` (after the accumulator value `acc`, whose channel axis is
    `axis` with `channels` entries; None: no channel axis) into an Epilogue.

    Takes the longest prefix of the chain it can compute exactly; what it
    leaves (and why) is in `notes`. `base_bias` (int64 per channel) is the
    anchor's own constant term, added (mod 2^32) to the bias node's.
    `constant_other`: the caller takes a qadd / qmul whose other operand is a
    constant broadcast to the result (`Epilogue.other_bytes`), as a
    transformer's quantized bias add after a matmul is. `final_table`: the
    caller can take a lookup after the qadd / qmul (a transformer's GELU
    after its bias add) as the requantizing microkernels' table stage
    (`Epilogue.final_table`; `ep_tile` cannot)."""
    bias = np.zeros(channels, np.int64) if base_bias is None else base_bias.astype(np.int64)
    nodes: list[Node] = []
    notes = list(chain.reasons)
    if chain.bias is not None:
        try:
            bias = bias + bias_vector(chain.bias, acc, channels, axis)
            nodes.append(chain.bias)
        except Decline as why:
            notes.append(str(why))
            return _raw_epilogue(bias, channels, nodes, notes)
    rq = chain.requantize
    if rq is None:
        return _raw_epilogue(bias, channels, nodes, notes)
    try:
        ep = _requantize_part(rq, acc, channels, axis, bias)
    except Decline as why:
        notes.append(str(why))
        return _raw_epilogue(bias, channels, nodes, notes)
    ep.nodes = nodes + [rq]
    ep.notes = notes
    if chain.post is not None:
        try:
            _add_post(ep, chain.post, rq.outputs[0], constant_other)
            ep.nodes.append(chain.post)
        except Decline as why:
            ep.notes.append(str(why))
            return ep
    if chain.clip is not None:
        try:
            _add_clip(ep, chain.clip)
            ep.nodes.append(chain.clip)
        except Decline as why:
            ep.notes.append(str(why))
    if chain.table is not None and final_table and ep.nodes[-1] is chain.post:
        try:
            _add_final_table(ep, chain.table)
            ep.nodes.append(chain.table)
        except Decline as why:
            ep.notes.append(str(why))
    return ep


def _raw_epilogue(bias, channels, nodes, notes) -> Epilogue:
    """No requantize: the kernel stores the (biased) int32 accumulator."""
    chan_i = np.zeros((4, channels), np.int64)
    chan_i[0] = _wrap32(bias)
    sc_i = np.zeros(16, np.int64)
    sc_i[I_ROUND] = R_NONE
    sc_f = np.zeros(8, np.float32)
    return Epilogue(
        chan_i, np.zeros((4, channels), np.float32), sc_i, sc_i, sc_f, sc_f, _EMPTY_I64,
        dtypes.int32, nodes, notes=notes,
    )  # fmt: skip


def _wrap32(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.int64)
    return ((v - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN


def _requantize_part(rq: Node, acc: Value, channels: int, axis, bias) -> Epilogue:
    multiplier = const_input(rq, 1, "multiplier")
    zero_point = const_input(rq, 2, "zero point")
    dtype = rq.attrs["dtype"]
    rounding = rq.attrs["rounding"]
    if rounding not in ROUNDING_CODES:
        raise Decline(f"{rq.name}: rounding {rounding!r} has no CPU kernel")
    storage_dtype(dtype)
    if acc.type.dtype.bits > 32 or acc.type.dtype == dtypes.uint32:
        raise Decline(f"{rq.name}: accumulator of type {acc.type.dtype}")
    rq_axis = _axis_of(rq, acc.type.rank)
    per_channel = np.asarray(multiplier).size > 1 or (
        zero_point is not None and np.asarray(zero_point).size > 1
    )
    if per_channel and (rq_axis is None or rq_axis != axis):
        raise Decline(
            f"{rq.name}: per-axis parameters along axis {rq_axis}, the kernel's channels are "
            f"along axis {axis}"
        )
    mult = _channel_vector(np.asarray(multiplier, dtype=np.float32), channels, "multiplier")
    zp = _channel_vector(
        np.zeros(1, np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64),
        channels,
        "zero point",
    )
    chan_i = np.zeros((4, channels), np.int64)
    chan_i[0] = _wrap32(bias)
    chan_i[3] = zp
    if rounding != "half_even_float":
        single = rounding == "fixed_point_single"
        m, shift = numerics.quantize_multiplier(mult.astype(np.float64), single_rounding=single)
        m, shift = np.asarray(m, np.int64), np.asarray(shift, np.int64)
        # The reference raises on these; the kernel would compute garbage.
        if single and (np.any(shift > 30) or np.any(shift < -31) or np.any(m < 0)):
            raise Decline(f"{rq.name}: multiplier outside the single-rounding range")
        if not single and (np.any(shift > 31) or np.any(shift < -62)):
            raise Decline(f"{rq.name}: multiplier outside the double-rounding range")
        chan_i[1], chan_i[2] = m, shift
    lo, hi = dtype.qmin, dtype.qmax
    clamp = rq.attrs.get("clamp")
    if clamp is not None:
        lo, hi = max(lo, int(clamp[0])), min(hi, int(clamp[1]))
    sc_i = np.zeros(16, np.int64)
    sc_i[I_ROUND] = ROUNDING_CODES[rounding]
    sc_i[I_LO], sc_i[I_HI] = lo, hi
    sc_i[I_YQMIN] = dtype.qmin
    fast = rounding == "half_even_float" and dtype.bits <= 16 and np.all(np.isfinite(mult))
    sc_i[I_FAST] = int(bool(fast))
    sc_f = np.zeros(8, np.float32)
    chan_f = np.zeros((4, channels), np.float32)
    chan_f[FM_MULT] = mult
    chan_f[FM_LO], chan_f[FM_HI], chan_f[FM_ZP] = lo - zp, hi - zp, zp  # used when `fast`
    return Epilogue(chan_i, chan_f, sc_i, sc_i.copy(), sc_f, sc_f.copy(), _EMPTY_I64, dtype)


def _scalar_f32(value) -> np.float32:
    return F32(np.asarray(value, dtype=np.float32).reshape(-1)[0])


def _scalar_int(value) -> int:
    return 0 if value is None else int(np.asarray(value).reshape(-1)[0])


def _add_post(ep: Epilogue, post: Node, y: Value, constant_other: bool) -> None:
    """Extend `ep` with the qadd / qmul / lookup `post` that reads `y`."""
    if post.op == "lookup":
        table = const_input(post, 1, "table")
        out = post.outputs[0].type.dtype
        if not out.is_int or out.bits not in (8, 16, 32):
            raise Decline(f"{post.name}: table of type {out}")
        if table.shape != (1 << ep.out_dtype.bits,):
            raise Decline(f"{post.name}: table of shape {table.shape}")
        ep.table = np.ascontiguousarray(table.astype(np.int64))
        if out.bits == 8 and ep.out_dtype.bits == 8:
            ep.byte_table = byte_table(table, byte_codes(ep.out_dtype)[0])
        ep.sc_i[I_POST] = ep.sc_i_swapped[I_POST] = P_LOOKUP
        ep.out_dtype = out
        return
    if len(post.inputs) < 8 or any(post.inputs[i] is None for i in (1, 4, 6)):
        raise Decline(f"{post.name}: missing scale operands")
    params = [const_input(post, i, "scale/zero point") for i in (1, 2, 4, 5, 6, 7)]
    sa, za, sb, zb, sc, zc = (
        _scalar_f32(params[0]), _scalar_int(params[1]), _scalar_f32(params[2]),
        _scalar_int(params[3]), _scalar_f32(params[4]), _scalar_int(params[5]),
    )  # fmt: skip
    y_index = 0 if post.inputs[0] is y else 3
    other = post.inputs[3] if y_index == 0 else post.inputs[0]
    if other is y:
        raise Decline(f"{post.name} reads the requantized value twice")
    if other.is_constant and not (constant_other and _broadcasts_to(other.const.shape, y)):
        raise Decline(f"{post.name}: constant operand (not fused here)")
    if not other.is_constant and (
        other.type.shape is None or tuple(other.type.shape) != tuple(y.type.shape or ())
    ):
        raise Decline(f"{post.name}: operands of shapes {other.type.shape} and {y.type.shape}")
    dtype = post.outputs[0].type.dtype
    if dtype.bits != 8 or other.type.dtype != dtype or ep.out_dtype != dtype:
        raise Decline(f"{post.name}: operands must be 8-bit of one type")
    flip, off = byte_codes(dtype)
    for sc_i in (ep.sc_i, ep.sc_i_swapped):
        sc_i[I_POST] = P_QADD if post.op == "qadd" else P_QMUL
        sc_i[I_OFLIP], sc_i[I_OOFF] = flip, off
        sc_i[I_PLO], sc_i[I_PHI] = dtype.qmin, dtype.qmax
    with np.errstate(all="ignore"):
        if post.op == "qadd":
            ra, rb = F32(sa / sc), F32(sb / sc)
            # fixed = f32(zc - fma(rA, zA, f32(rB * zB))) for MLAS's (A, B)
            fixed_ab = F32(F32(zc) - numerics.fma_f32(ra, F32(za), F32(rb * F32(zb))))
            fixed_ba = F32(F32(zc) - numerics.fma_f32(rb, F32(zb), F32(ra * F32(za))))
            r_y, r_o = (ra, rb) if y_index == 0 else (rb, ra)
            for sc_f in (ep.sc_f, ep.sc_f_swapped):
                sc_f[F_RY], sc_f[F_RO] = r_y, r_o
            # general order: MLAS A = ONNX input 0; "scalar0": MLAS A = input 1
            ep.sc_f[F_FIXED] = fixed_ab
            ep.sc_f_swapped[F_FIXED] = fixed_ba
            ep.sc_i[I_YFIRST] = 1 if y_index == 0 else 0
            ep.sc_i_swapped[I_YFIRST] = 0 if y_index == 0 else 1
        else:
            r = F32(F32(sa * sb) / sc)
            zy, zo = (za, zb) if y_index == 0 else (zb, za)
            for sc_i in (ep.sc_i, ep.sc_i_swapped):
                sc_i[I_ZY], sc_i[I_ZO] = zy, zo
            for sc_f in (ep.sc_f, ep.sc_f_swapped):
                sc_f[F_RMUL], sc_f[F_ZC] = r, F32(zc)
    if other.is_constant:
        ep.other_const = other.const
    else:
        ep.other = other
    ep.y_index = y_index
    ep.out_dtype = dtype


def _add_final_table(ep: Epilogue, lookup: Node) -> None:
    """Extend `ep` (ending in a qadd / qmul) with the 8-bit `lookup` of its
    result, as a byte table."""
    table = const_input(lookup, 1, "table")
    out = lookup.outputs[0].type.dtype
    if not (out.is_int and out.bits == 8 and ep.out_dtype.bits == 8):
        raise Decline(f"{lookup.name}: a table of {ep.out_dtype} codes to {out}")
    if table.shape != (256,):
        raise Decline(f"{lookup.name}: table of shape {table.shape}")
    ep.byte_table = byte_table(table, byte_codes(ep.out_dtype)[0])
    ep.final_table = True
    ep.out_dtype = out


def _broadcasts_to(shape: tuple, y: Value) -> bool:
    """Whether a constant of `shape` broadcasts to `y`'s shape without
    enlarging it (its dims 1 or equal to y's, symbolic dims taking 1s only)."""
    target = y.type.shape
    if target is None or len(shape) > len(target):
        return False
    return all(d == 1 or d == t for d, t in zip(shape[::-1], tuple(target)[::-1]))


def _add_clip(ep: Epilogue, clip: Node) -> None:
    """Fold the integer `clip` of the qadd / qmul result into the post op's
    saturation: clamp(clamp(q, qmin, qmax), lo, hi) = clamp(q, max(qmin, lo),
    min(qmax, hi)) for bounds inside [qmin, qmax] (the clip casts them to the
    codes' type, as the reference does) with lo <= hi. The post op's
    out-of-int32 result, qmin, then becomes max(qmin, lo) = clip(qmin) too."""
    if ep.sc_i[I_POST] not in (P_QADD, P_QMUL):
        raise Decline(f"{clip.name}: a clip after a non-saturating epilogue")
    dtype = ep.out_dtype
    if clip.outputs[0].type.dtype != dtype:
        raise Decline(f"{clip.name}: clip of {clip.outputs[0].type.dtype} codes")
    lo, hi = clip_bounds(clip, dtype)
    if lo > hi:
        raise Decline(f"{clip.name}: empty clip interval ({lo}, {hi})")
    for sc_i in (ep.sc_i, ep.sc_i_swapped):
        sc_i[I_PLO], sc_i[I_PHI] = max(sc_i[I_PLO], lo), min(sc_i[I_PHI], hi)


def output_buffer(shape, dtype: dtypes.DType):
    """(result array, flat unsigned view the kernel writes)."""
    out = empty(shape, dtype.numpy)
    return out, out.view(UNSIGNED[out.dtype.itemsize]).reshape(-1)


# ---- standalone requantize ---------------------------------------------------------


def lower_requantize(node: Node, ctx: LowerContext) -> Kernel:
    acc = node.inputs[0]
    if acc.type.shape is None:
        raise Decline("input of unknown rank")
    rank = acc.type.rank
    axis = _axis_of(node, rank)
    multiplier = const_input(node, 1, "multiplier")
    zero_point = const_input(node, 2, "zero point")
    per_channel = np.asarray(multiplier).size > 1 or (
        zero_point is not None and np.asarray(zero_point).size > 1
    )
    if per_channel:
        if axis is None or not 0 <= axis < rank or not isinstance(acc.type.shape[axis], int):
            raise Decline(f"per-axis requantize along axis {axis} of {acc.type.shape}")
        channels = int(acc.type.shape[axis])
    else:
        axis, channels = None, 1
    chain = ctx.chain_after(node, start="requantize")
    chain.requantize = node
    ep = build_epilogue(chain, acc, channels, axis)
    if not ep.requantizes:
        raise Decline("; ".join(ep.notes) or "not supported")
    acc_dtype = acc.type.dtype.numpy

    def run(acc_array, other=None):
        if acc_array.dtype != acc_dtype:
            raise ValueError(f"accumulator is {acc_array.dtype}, expected {acc_dtype}")
        a = kernel_array(acc_array).reshape(-1)
        if a.dtype != np.int32:
            a = a.astype(np.int32)
        shape = acc_array.shape
        if axis is not None:
            inner = max(math.prod(shape[axis + 1 :]), 1)
        else:  # per-tensor: rows of the last dimension
            inner = max(shape[-1], 1) if shape else 1
        out, flat = output_buffer(shape, ep.out_dtype)
        sc_i, sc_f = ep.scalars(shape, None if other is None else other.shape)
        run_tasks(
            requantize_flat, a.size // inner, 8 * a.size, ctx.num_threads, a, inner, channels,
            flat, ep.chan_i, ep.chan_f, sc_i, sc_f, ep.table,
            ep.other_bytes(other, shape),
        )  # fmt: skip
        return [out]

    inputs = [acc] + ([ep.other] if ep.other is not None else [])
    last = ep.nodes[-1]
    return Kernel(f"requantize_flat[{ep.describe()}]", run, inputs, last.outputs, ep.nodes)
