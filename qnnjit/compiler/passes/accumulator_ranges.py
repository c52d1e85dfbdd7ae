"""Accumulator-range analysis: the worst-case value of every integer
accumulator, proven from operand ranges, zero points, K and the constant
weights, and recorded in its type as `Accumulator(bits, lo, hi)`.

For an accumulating node the exact sum is, per output channel m,

    acc_m = sum_k (x_k - zx) * (w_mk - zw_m) + bias_m

With every x_k free in its range [xl, xh] (the padding, which stands for the
stored value `pad_value`, default zx, is one more possible value), each term
is extreme at an end of that range, independently of the others:

    hi_m = bias_m + sum_k max((xl - zx) * d_mk, (xh - zx) * d_mk),   d = w - zw
    lo_m = bias_m + sum_k min(...)

and [lo, hi] = [min_m lo_m, max_m hi_m]. Each bound is attained by some input
(in any window that sees no padding, when x takes its whole range), so this is
the tightest interval that holds for every input. A non-constant operand uses
its range instead of exact weights (K times the extreme product);
`qreduce_sum` is count * (x - zx); `add(acc, int32 constant)` (a separate bias,
or a folded zero-point correction) adds the constant per channel. With zero
points folded into the bias (fold_zero_points: x_zp dropped, `pad_value` set)
the same formula reads sum_k x_k * d_mk + bias'_m — the node's current
operands and attributes say which form it has, so the range is that of the
sum the node computes.

Operand ranges: a constant's own min/max; the storage range of its type,
narrowed by a `clamp` (requantize, quantize) or a lookup table's values, and
carried through ops that only move values (max pool, reshape, concat...).

Width: `bits` = 16 where every partial sum fits int16 — in any order and
whether the bias starts the sum or ends it: [sum_k min(0, lo_mk) (+ bias),
sum_k max(0, hi_mk) (+ bias)] within int16 — else 32. An accumulator whose
range leaves int32 wraps (the reference interpreter's defined semantics);
it is reported by node name with `AccumulatorOverflowWarning`, or raises
`AccumulatorOverflowError` when strict (`compile(..., strict_ranges=True)` or
QNNJIT_STRICT_RANGES=1, which set `graph.metadata["strict_ranges"]`).

AVX2 `vpmaddubsw` fact: the instruction multiplies u8 by s8 and adds adjacent
pairs with *signed 16-bit saturation*. For 8-bit x and constant int8 weights
the node gets attribute `i16_pairs = PairSums(lo, hi)`: the range of
u_j * w_j + u_k * w_k over any two taps j != k of one output channel, where u
is the stored x (x + 128 for int8 x, the usual shift to unsigned) — so the fact
holds for whatever packing decides which taps are adjacent. `saturates` is
True where that range leaves int16; a backend must then not use pairwise i16
sums (or must check its own packing with `pair_sum_range`).

Fused groups are analyzed through: a `fused` node's body is analyzed with its
inputs' ranges, and the node's outputs take the body outputs' types. The pass
runs after fuse_epilogues, last, so that it sees the final form of every node
(zero points folded, clamps fused) and types the very nodes a backend
compiles; it works as well on an unfused graph. It changes no value, only
types and the `i16_pairs` fact (the verifier compares dtypes and shapes, which
stay), and lists what it found in `graph.metadata["accumulators"]`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

from ...errors import AccumulatorOverflowError, AccumulatorOverflowWarning
from ...ir import dtypes
from ...ir.graph import Graph, Node, Value
from ...ir.types import Accumulator

INT16 = (-(1 << 15), (1 << 15) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)

# Ops whose integer outputs are values of their input 0 (data movement), or of
# any of their inputs (HULL_OF_INPUTS).
VALUE_PRESERVING = frozenset(
    {"max_pool", "reshape", "flatten", "transpose", "squeeze", "unsqueeze", "slice", "gather",
     "expand", "global_max_pool", "identity", "split"}
)  # fmt: skip
HULL_OF_INPUTS = frozenset({"concat", "max", "min"})


# The warning and error classes live with the other qnnjit errors.
@dataclass(frozen=True)
class PairSums:
    """Range of one vpmaddubsw pair sum u_j*w_j + u_k*w_k (before saturation)."""

    lo: int
    hi: int

    @property
    def saturates(self) -> bool:
        return self.lo < INT16[0] or self.hi > INT16[1]

    def __str__(self) -> str:
        return f"pairs<[{self.lo}, {self.hi}], {'saturates' if self.saturates else 'fits'}>"


@dataclass
class Bounds:
    """Per-channel bounds, arrays broadcastable against the output: the final
    value [lo, hi] and every partial sum [plo, phi]."""

    lo: np.ndarray
    hi: np.ndarray
    plo: np.ndarray
    phi: np.ndarray

    def add(self, lo, hi) -> Bounds:
        """The bounds of acc + b for b in [lo, hi] (per channel)."""
        return Bounds(
            self.lo + lo,
            self.hi + hi,
            np.minimum(self.plo, self.plo + lo),
            np.maximum(self.phi, self.phi + hi),
        )

    @staticmethod
    def uniform(k: int, tmin: int, tmax: int) -> Bounds:
        """K equal terms, each in [tmin, tmax] (Python ints: K may be huge)."""

        def one(v):
            return np.array([v], dtype=object)

        return Bounds(one(k * tmin), one(k * tmax), one(k * min(tmin, 0)), one(k * max(tmax, 0)))

    def reshape(self, shape) -> Bounds:
        return Bounds(
            *(np.asarray(a).reshape(shape) for a in (self.lo, self.hi, self.plo, self.phi))
        )

    def collapse(self) -> Bounds:
        """One channel holding the hull of all channels."""
        lo, hi, plo, phi = (np.min(self.lo), np.max(self.hi), np.min(self.plo), np.max(self.phi))
        return Bounds(*(np.array([v], dtype=object) for v in (lo, hi, plo, phi)))

    def interval(self) -> tuple[int, int]:
        return int(np.min(self.lo)), int(np.max(self.hi))

    def bits(self) -> int:
        fits16 = int(np.min(self.plo)) >= INT16[0] and int(np.max(self.phi)) <= INT16[1]
        return 16 if fits16 else 32


def _sum(terms: np.ndarray, axis: int) -> np.ndarray:
    """Exact integer sum (Python ints where int64 could overflow)."""
    if terms.size and terms.shape[axis] * float(np.max(np.abs(terms))) >= 2.0**62:
        terms = terms.astype(object)
    return terms.sum(axis=axis, keepdims=True)


def _terms(lo: int, hi: int, d: np.ndarray):
    """Per-term extremes of t * d for t in [lo, hi]."""
    a, b = lo * d, hi * d
    return np.minimum(a, b), np.maximum(a, b)


def _reduce(tmin: np.ndarray, tmax: np.ndarray, axis: int) -> Bounds:
    return Bounds(
        _sum(tmin, axis),
        _sum(tmax, axis),
        _sum(np.minimum(tmin, 0), axis),
        _sum(np.maximum(tmax, 0), axis),
    )


def _weighted(lo: int, hi: int, d: np.ndarray, axis: int) -> Bounds:
    """The bounds of sum_k t_k * d_k, every t_k free in [lo, hi] (an end of
    the range per term) -- `_reduce(*_terms(lo, hi, d), axis)` without a term
    array. With L <= H the ends in order, the extreme term is L*d for d >= 0
    and H*d for d < 0 at the low side (the other end at the high side), so
    per row, S+ = sum max(d, 0) and S- = sum min(d, 0):

        lo  = L*S+ + H*S-                    hi  = H*S+ + L*S-
        plo = min(L, 0)*S+ + max(H, 0)*S-    phi = max(H, 0)*S+ + min(L, 0)*S-

    (the partial sums: each term's extreme clipped at 0). One pass of d and
    two sums instead of four int64 arrays of d's size: the conv weights of a
    ResNet are ~11M taps."""
    low, high = min(lo, hi), max(lo, hi)
    total = _sum(d, axis)
    plus = _sum(np.maximum(d, 0), axis)
    minus = total - plus
    extreme = max(abs(low), abs(high)) * max(_magnitude(plus), _magnitude(minus))
    if extreme >= 2**62:  # a product could leave int64: exact Python ints
        plus, minus = plus.astype(object), minus.astype(object)
    low0, high0 = min(low, 0), max(high, 0)
    return Bounds(
        low * plus + high * minus,
        high * plus + low * minus,
        low0 * plus + high0 * minus,
        high0 * plus + low0 * minus,
    )


def _magnitude(a: np.ndarray) -> int:
    return int(np.max(np.abs(a), initial=0))


def _shifted(weights: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """weights - zero_point exactly: in int16 where both are 8-bit (a quarter
    of the memory traffic of int64), else in int64."""
    small = weights.dtype.itemsize == 1 and zero_point.dtype.itemsize == 1
    dtype = np.int16 if small else np.int64
    return weights.astype(dtype) - zero_point.astype(dtype)


def _products(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    corners = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return min(corners), max(corners)


def pair_sum_range(u: tuple[int, int], weights: np.ndarray, adjacent: bool = False) -> PairSums:
    """Range of u_j * w_j + u_k * w_k for u in `u` over the rows of `weights`
    [M, K]: over any two taps j != k of a row, or (`adjacent`) over the pairs
    (2i, 2i+1) of the row as packed (an odd K pairs the last tap with 0)."""
    w = np.asarray(weights).reshape(weights.shape[0], -1)
    if not adjacent and w.shape[1] >= 2 and min(u) >= 0 and _is_integer(w.dtype):
        # For u >= 0 a term's extremes over u are nondecreasing in w: a row's
        # two smallest (largest) terms are those of its two smallest
        # (largest) weights.
        low, high = _two_ends(w)
        low2 = _terms(u[0], u[1], low)[0].sum(axis=1)
        high2 = _terms(u[0], u[1], high)[1].sum(axis=1)
        return PairSums(int(low2.min()), int(high2.max()))
    w = w.astype(np.int64)
    tmin, tmax = _terms(u[0], u[1], w)
    if adjacent:
        if w.shape[1] % 2:
            pad = np.zeros((w.shape[0], 1), np.int64)
            tmin, tmax = np.hstack([tmin, pad]), np.hstack([tmax, pad])
        lo = tmin[:, 0::2] + tmin[:, 1::2]
        hi = tmax[:, 0::2] + tmax[:, 1::2]
        return PairSums(int(lo.min()), int(hi.max()))
    if w.shape[1] < 2:
        return PairSums(int(min(tmin.min(), 0)), int(max(tmax.max(), 0)))
    low2 = np.sort(tmin, axis=1)[:, :2].sum(axis=1)  # u < 0: no order in w
    high2 = np.sort(tmax, axis=1)[:, -2:].sum(axis=1)
    return PairSums(int(low2.min()), int(high2.max()))


def _is_integer(dtype: np.dtype) -> bool:
    return dtype.kind in "iu" and np.can_cast(dtype, np.int64)


def _two_ends(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of an integer [M, K >= 2] matrix: its two smallest and two
    largest entries (repeats count), as int64 [M, 2] -- the first from argmin
    / argmax, the second from the row with that one entry masked. Linear
    scans instead of a sort of every row."""
    rows, info = np.arange(w.shape[0]), np.iinfo(w.dtype)

    def ends(first: np.ndarray, fill: int, reduce) -> np.ndarray:
        rest = w.copy()
        rest[rows, first] = fill  # drop one occurrence of the extreme
        return np.stack([w[rows, first], reduce(rest, axis=1)], axis=1).astype(np.int64)

    return ends(w.argmin(axis=1), info.max, np.min), ends(w.argmax(axis=1), info.min, np.max)


# ---- value ranges ---------------------------------------------------------------


class Ranges:
    """Known integer ranges of values (by identity), defaulting to storage."""

    def __init__(self):
        self.known: dict[int, tuple[int, int]] = {}

    def __call__(self, value: Value | None) -> tuple[int, int] | None:
        if value is None:
            return None
        if value.is_constant:
            if not value.type.dtype.is_int or value.const.size == 0:
                return None
            return int(value.const.min()), int(value.const.max())
        if id(value) in self.known:
            return self.known[id(value)]
        dtype = value.type.dtype
        return (dtype.qmin, dtype.qmax) if dtype.is_int and dtype.bits <= 32 else None

    def set(self, value: Value, interval: tuple[int, int] | None):
        if interval is not None:
            self.known[id(value)] = (int(interval[0]), int(interval[1]))


def _clamped(node: Node) -> tuple[int, int] | None:
    """A requantize / quantize result: its storage range, narrowed by `clamp`."""
    dtype = node.outputs[0].type.dtype
    if not dtype.is_int:
        return None
    lo, hi = dtype.qmin, dtype.qmax
    clamp = node.attrs.get("clamp")
    if clamp is not None:
        lo, hi = max(lo, int(clamp[0])), min(hi, int(clamp[1]))
    return lo, hi


def _zero_point_range(ranges: Ranges, value: Value | None) -> tuple[int, int]:
    return (0, 0) if value is None else ranges(value)


# ---- the accumulating ops -------------------------------------------------------


@dataclass
class Analysis:
    bounds: Bounds | None
    pairs: PairSums | None = None
    why_unknown: str = ""


def _u8_operand(x: Value, x_range, pad=None) -> tuple[int, int] | None:
    """The unsigned operand vpmaddubsw sees for 8-bit x (stored values, and the
    stored padding value `pad` if any): x, or x + 128 for int8."""
    dtype = x.type.dtype
    if dtype.bits != 8 or not dtype.is_int:
        return None
    lo, hi = x_range if pad is None else (min(x_range[0], pad[0]), max(x_range[1], pad[1]))
    shift = 128 if dtype.signed else 0
    return lo + shift, hi + shift


def _qconv(node: Node, ranges: Ranges) -> Analysis:
    x, w, x_zp, w_zp, bias = (node.input(i) for i in range(5))
    x_range = ranges(x)
    zx = _zero_point_range(ranges, x_zp)
    t = (x_range[0] - zx[1], x_range[1] - zx[0])
    pad = None  # the stored value padding stands for: pad_value, else x_zp
    if any(node.attrs.get("pads", ())):
        value = node.attrs.get("pad_value")
        pad = zx if value is None else (int(value), int(value))
        t = (min(t[0], pad[0] - zx[1]), max(t[1], pad[1] - zx[0]))
    m = w.type.shape[0]
    pairs = None
    if w.is_constant:
        weights = w.const.reshape(m, -1)
        if w_zp is None or w_zp.is_constant:
            zw = np.zeros(1, weights.dtype) if w_zp is None else w_zp.const
            bounds = _weighted(t[0], t[1], _shifted(weights, zw.reshape(-1, 1)), axis=1)
        else:
            weights = weights.astype(np.int64)
            zw_range = ranges(w_zp)
            d_lo = weights - zw_range[1]
            d_hi = weights - zw_range[0]
            tmin = np.minimum.reduce([t[0] * d_lo, t[0] * d_hi, t[1] * d_lo, t[1] * d_hi])
            tmax = np.maximum.reduce([t[0] * d_lo, t[0] * d_hi, t[1] * d_lo, t[1] * d_hi])
            bounds = _reduce(tmin, tmax, axis=1)
        bounds = bounds.reshape(-1)
        u = _u8_operand(x, x_range, pad)
        if u is not None and w.type.dtype.name == "int8":
            pairs = pair_sum_range(u, weights)
    else:
        if not all(isinstance(d, int) for d in w.type.shape[1:]):
            return Analysis(None, why_unknown=f"weight shape {w.type.shape} is not static")
        w_range, zw = ranges(w), _zero_point_range(ranges, w_zp)
        tmin, tmax = _products(t, (w_range[0] - zw[1], w_range[1] - zw[0]))
        bounds = Bounds.uniform(math.prod(w.type.shape[1:]), tmin, tmax)
    if bias is not None:
        b = bias.const.astype(np.int64).reshape(-1) if bias.is_constant else None
        bounds = bounds.add(*((b, b) if b is not None else ranges(bias)))
    if bounds.lo.size > 1:  # one entry per output channel: align with axis 1
        bounds = bounds.reshape((1, -1) + (1,) * (node.outputs[0].type.rank - 2))
    return Analysis(bounds, pairs)


def _qmatmul(node: Node, ranges: Ranges) -> Analysis:
    a, b, a_zp, b_zp = (node.input(i) for i in range(4))
    k = a.type.shape[-1] if a.type.shape else None

    def shifted(value, zp):
        r, z = ranges(value), _zero_point_range(ranges, zp)
        return r[0] - z[1], r[1] - z[0]

    def exact(const: Value, zp: Value | None, along: int):
        """const - zp with the zero point per row (along=-2) / column (-1)."""
        values = const.const.astype(np.int64)
        if zp is None:
            return values
        z = zp.const.astype(np.int64)
        if z.size > 1 and z.ndim == 1:
            z = z.reshape(-1, 1) if along == -2 else z.reshape(1, -1)
        return values - z

    pairs = None
    if b.is_constant and (b_zp is None or b_zp.is_constant) and b.type.rank >= 2:
        t = shifted(a, a_zp)
        bounds = _weighted(t[0], t[1], exact(b, b_zp, -1), axis=-2)  # [..., 1, N]
        u = _u8_operand(a, ranges(a))
        if u is not None and b.type.dtype.name == "int8":
            weights = np.moveaxis(b.const, -1, -2).reshape(-1, b.const.shape[-2])
            pairs = pair_sum_range(u, weights)
    elif a.is_constant and (a_zp is None or a_zp.is_constant) and a.type.rank >= 2:
        t = shifted(b, b_zp)
        bounds = _weighted(t[0], t[1], exact(a, a_zp, -2), axis=-1)  # [..., M, 1]
    elif isinstance(k, int):
        tmin, tmax = _products(shifted(a, a_zp), shifted(b, b_zp))
        bounds = Bounds.uniform(k, tmin, tmax)
    else:
        return Analysis(None, why_unknown=f"K = {k} is not static")
    if node.outputs[0].type.rank is None or node.outputs[0].type.rank < 2:
        bounds = bounds.collapse()  # a 1-D operand: channels no longer align
    return Analysis(bounds, pairs)


def _qreduce_sum(node: Node, ranges: Ranges) -> Analysis:
    x, x_zp = node.input(0), node.input(1)
    sizes = [x.type.shape[axis] for axis in node.attrs["axes"]] if x.type.shape else [None]
    if not all(isinstance(s, int) for s in sizes):
        return Analysis(None, why_unknown=f"reduced dims {sizes} are not static")
    r, z = ranges(x), _zero_point_range(ranges, x_zp)
    t = (r[0] - z[1], r[1] - z[0])
    return Analysis(Bounds.uniform(math.prod(sizes), t[0], t[1]))


def _bias_add(node: Node, ranges: Ranges, known: dict[int, Bounds]) -> Analysis | None:
    """add(acc, int32 constant) where acc is an analyzed accumulator."""
    lhs, rhs = node.input(0), node.input(1)
    acc, other = (lhs, rhs) if id(lhs) in known else (rhs, lhs)
    if id(acc) not in known or other is None or id(other) in known:
        return None
    if other.is_constant:
        b = other.const.astype(np.int64)
        return Analysis(known[id(acc)].add(b, b))
    r = ranges(other)
    return None if r is None else Analysis(known[id(acc)].add(*r))


ANALYSES = {"qconv": _qconv, "qmatmul": _qmatmul, "qreduce_sum": _qreduce_sum}


# ---- the pass -------------------------------------------------------------------


@dataclass
class Finding:
    """One accumulator, as `graph.metadata["accumulators"]` lists them."""

    node: str
    op: str
    group: str | None  # the fused node whose body holds it
    accumulator: Accumulator
    pairs: PairSums | None
    overflows: bool = False
    unknown: str = ""  # why no range could be proven


def _analyze(graph: Graph, ranges: Ranges, findings: list[Finding], group: str | None) -> bool:
    changed = False
    known: dict[int, Bounds] = {}
    for node in graph.nodes:
        if node.op == "fused":
            body = node.attrs["body"]
            for outer, inner in zip(node.inputs, body.inputs):
                ranges.set(inner, ranges(outer))
            changed |= _analyze(body, ranges, findings, node.name)
            for outer, inner in zip(node.outputs, body.outputs):
                ranges.set(outer, ranges(inner))
                if outer.type != inner.type:
                    outer.type, changed = inner.type, True
            continue
        analysis = None
        if node.op in ANALYSES:
            analysis = ANALYSES[node.op](node, ranges)
        elif node.op == "add" and node.outputs[0].type.dtype == dtypes.int32:
            analysis = _bias_add(node, ranges, known)
        if analysis is not None:
            changed |= _record(node, analysis, ranges, known, findings, group)
        elif node.op in ("requantize", "quantize"):
            ranges.set(node.outputs[0], _clamped(node))
        elif node.op == "lookup" and node.input(1) is not None:
            ranges.set(node.outputs[0], ranges(node.input(1)))
        elif node.op in VALUE_PRESERVING | HULL_OF_INPUTS and node.outputs[0].type.dtype.is_int:
            sources = node.inputs if node.op in HULL_OF_INPUTS else node.inputs[:1]
            inputs = [ranges(v) for v in sources if v is not None]
            if inputs and all(r is not None for r in inputs):
                hull = (min(r[0] for r in inputs), max(r[1] for r in inputs))
                for value in node.outputs:
                    ranges.set(value, hull)
    return changed


def _record(node, analysis: Analysis, ranges, known, findings, group) -> bool:
    value = node.outputs[0]
    old_type, old_pairs = value.type, node.attrs.get("i16_pairs")
    fits = True
    if analysis.bounds is None:
        accumulator = Accumulator(32)
    else:
        known[id(value)] = analysis.bounds
        lo, hi = analysis.bounds.interval()
        accumulator = Accumulator(analysis.bounds.bits(), lo, hi)
        fits = INT32[0] <= lo and hi <= INT32[1]
        ranges.set(value, (lo, hi) if fits else INT32)  # stored values wrap
    value.type = replace(value.type, accumulator=accumulator)
    if analysis.pairs is not None:
        node.attrs["i16_pairs"] = analysis.pairs
    else:
        node.attrs.pop("i16_pairs", None)
    findings.append(
        Finding(
            node.name, node.op, group, accumulator, analysis.pairs, not fits, analysis.why_unknown
        )
    )
    return value.type != old_type or node.attrs.get("i16_pairs") != old_pairs


def accumulator_ranges(graph: Graph, strict: bool | None = None) -> bool:
    """Type every accumulator with its proven range; report int32 overflows.
    See the module doc."""
    findings: list[Finding] = []
    changed = _analyze(graph, Ranges(), findings, None)
    graph.metadata["accumulators"] = findings
    overflows = [f for f in findings if f.overflows]
    if overflows:
        strict = graph.metadata.get("strict_ranges", False) if strict is None else strict
        lines = [f"{len(overflows)} accumulator(s) can leave int32 and wrap:"]
        for f in overflows:
            where = f", in group {f.group!r}" if f.group and f.group != f.node else ""
            lines.append(
                f"  node {f.node!r} ({f.op}{where}): range [{f.accumulator.lo}, {f.accumulator.hi}]"
            )
        message = "\n".join(lines)
        if strict:
            raise AccumulatorOverflowError(message)
        warnings.warn(message, AccumulatorOverflowWarning, stacklevel=2)
    return changed
