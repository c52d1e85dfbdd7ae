"""Activation fusion: a float relu/clip in front of a quantize becomes an
integer clamp (the requantize's saturation bounds, an integer clip, or the
quantize's own clamp).

The algebra. Q (quantize: divide, round half to even, add zp, saturate) is
monotone non-decreasing, and every monotone f commutes with min and max:
f(max(x, a)) = max(f(x), f(a)). Hence, for every x that is not NaN,

    Q(relu(x))       = max(Q(x), Q(0))          = max(Q(x), zp)
    Q(clip(x, a, b)) = min(max(Q(x), Q(a)), Q(b))

with Q(-inf) = qmin and Q(+inf) = qmax standing for an absent bound. So a
bound need not be a multiple of the scale: its *integer image* Q(a) is the
exact clamp, whatever rounding took it there (clip(0, 6) with s = 0.047
clamps at round(6 / 0.047) + zp and agrees with the float graph on every
input). The rules:

- `fold_into_requantize`: Q(act(DQ(r))) with r = requantize(acc) becomes one
  requantize with `clamp`. On integers the chain is a map T over r's storage
  range, computed here exhaustively from the nodes' own semantics (at most
  2^16 codes). When T(q) == clip(q + d, lo, hi) on every code the requantize
  can produce (d = 0 when DQ and Q share parameters; d shifts the zero point
  when only the zero point or the signedness changes), the requantize takes
  zero point zp + d, the Q's storage type and clamp (lo, hi): every rounding
  computes `clamp(rounded + zp, qmin, qmax)` with `rounded` independent of
  zp, so `T(clamp(rounded + zp, l1, h1)) == clamp(rounded + zp + d, T(l1),
  T(h1))` (see `fold_map_into_requantize`). Needs r, DQ(r) and act(...) each
  read by the next node only.
- `integer_clip`: Q(act(DQ(q))) for any other integer q (a qadd, a max pool,
  a requantize with other readers) whose T is clip(q, lo, hi) over the whole
  storage range becomes the integer `clip(q, lo, hi)` (TVM's "relu becomes
  max(x, zp)"), or q itself when T is the identity (a relu after a
  quantization whose zero point is qmin). The DQ may keep other readers.
- `clamp_into_quantize`: Q(act(x)) for a float x becomes
  quantize(x) with clamp (Q(a), Q(b)) (composed with a clamp Q already had),
  the bounds computed by Q itself. NaN: act passes NaN through and Q(NaN) is
  qmin; the quantize clamp keeps exactly that (see the quantize op).
  Refused for a NaN clip bound (the float graph then yields qmin everywhere).

Preconditions common to all: act's output is read only by the Q and is no
graph output, Q and DQ are per-tensor with constant parameters and integer
storage. A T that is no clamp (DQ and Q scales differ) fails the first two
rules with that reason; `clamp_into_quantize` still removes the float op,
leaving DQ -> Q(clamp), which requantize_pairs turns into a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir import dtypes, ops
from ...ir.graph import Graph, Node, Value
from ..pattern import Matcher, RuleLog, apply_rules

ACTIVATIONS = ("relu", "clip")
CLIP_DTYPES = (dtypes.int8, dtypes.uint8, dtypes.int16, dtypes.uint16)


# ---- integer maps that are a shifted clamp ----------------------------------------


@dataclass(frozen=True)
class ShiftedClamp:
    """The integer map q -> min(max(q + shift, lo), hi)."""

    shift: int
    lo: int
    hi: int

    def __call__(self, q: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(q, np.int64) + self.shift, self.lo, self.hi)


def as_shifted_clamp(codes: np.ndarray, image: np.ndarray) -> ShiftedClamp | None:
    """The ShiftedClamp equal to `image` on the consecutive ascending `codes`,
    or None. Checked on every code, so the answer is exact by construction."""
    codes = np.asarray(codes, np.int64)
    image = np.asarray(image, np.int64)
    lo, hi = int(image[0]), int(image[-1])
    if lo == hi:
        shift = 0  # a constant map: every shift gives it
    else:
        first = int(np.argmax(image > lo))
        shift = int(image[first]) - int(codes[first])
    candidate = ShiftedClamp(shift, lo, hi)
    return candidate if np.array_equal(candidate(codes), image) else None


def storage_codes(dtype, clamp=None) -> np.ndarray:
    """Every value of an integer storage type (within `clamp`), ascending, int64."""
    lo, hi = (dtype.qmin, dtype.qmax) if clamp is None else clamp
    return np.arange(int(lo), int(hi) + 1, dtype=np.int64)


def _zero_point_value(value: Value | None) -> int:
    return 0 if value is None else int(np.asarray(value.const).reshape(-1)[0])


def fold_map_into_requantize(m: Matcher, r_node: Node, table, replaced: Value) -> Value:
    """requantize followed by the integer map `table` (a function of r's codes),
    as one requantize producing `replaced`'s type, when the map is a shifted
    clamp on every code r can produce.

    r = clamp(rounded + z1, l1, h1) and T = clip(. + d, L, H) on [l1, h1] give
    T(r) = clamp(rounded + z1 + d, T(l1), T(h1)): inside [l1, h1] by T's form;
    below l1, r = l1 and rounded + z1 + d < l1 + d <= T(l1) unless T is
    constant; likewise above h1. So the new requantize keeps the multiplier,
    rounding and axis, and takes zp z1 + d, the output type, clamp (L, H).
    """
    graph = m.graph
    m.check(r_node.op == "requantize", f"{r_node.name} is not a requantize")
    r = r_node.outputs[0]
    in_dtype, out = r.type.dtype, replaced.type
    m.check(in_dtype.is_int and in_dtype.bits <= 16, f"{r.name} is not a <=16-bit integer")
    zp = r_node.input(2)
    m.check(zp is None or zp.is_constant, f"zero point of {r_node.name} is not constant")
    m.check(zp is None or zp.const.size == 1, f"{r_node.name} has a per-channel zero point")
    codes = storage_codes(in_dtype, r_node.attrs.get("clamp"))
    image = np.asarray(table(codes.astype(in_dtype.numpy)), np.int64)
    fn = as_shifted_clamp(codes, image)
    m.check(fn is not None, "the integer map is not a shifted clamp on the requantize's range")
    m.check(out.dtype.is_int and out.dtype.bits <= 32, f"{replaced.name} is not integer storage")
    m.check(r.type.shape == out.shape, f"{replaced.name} has another shape than {r.name}")
    m.check(out.quant is None or out.quant.per_tensor, f"{replaced.name} is per-axis")
    target = None if out.quant is None else int(out.quant.zero_point)
    if fn.lo == fn.hi:  # constant: any zero point gives it
        new_zp = target if target is not None else fn.lo
    else:
        new_zp = _zero_point_value(zp) + fn.shift
        m.check(target is None or new_zp == target, "shifted zero point differs from the output's")
    m.check(out.dtype.qmin <= new_zp <= out.dtype.qmax, f"zero point {new_zp} outside {out.dtype}")
    attrs = dict(r_node.attrs, dtype=out.dtype)
    attrs.pop("clamp", None)
    if (fn.lo, fn.hi) != (out.dtype.qmin, out.dtype.qmax):
        attrs["clamp"] = (fn.lo, fn.hi)
    scale = None
    if out.quant is not None:
        scale = graph.constant(out.quant.scale, f"{r_node.name}_scale")
    zp_value = graph.constant(np.asarray(new_zp, out.dtype.numpy), f"{r_node.name}_zero_point")
    node = graph.add_node(
        "requantize", [r_node.inputs[0], r_node.inputs[1], zp_value, scale], attrs,
        name=r_node.name,
    )  # fmt: skip
    return node.outputs[0]


# ---- matching the Q(act(.)) chain --------------------------------------------------


def evaluate_on(node: Node, first: np.ndarray) -> np.ndarray:
    """`node`'s own semantics with its first operand replaced by `first`
    (the other operands must be constants)."""
    args = [first] + [None if v is None else v.const for v in node.inputs[1:]]
    return ops.evaluate(node.op, args, node.attrs)[0]


def check_per_tensor(m: Matcher, node: Node) -> None:
    scale, zero_point = node.input(1), node.input(2)
    m.constant(scale, f"scale of {node.name}")
    m.check(zero_point is None or zero_point.is_constant, f"zero point of {node.name}")
    m.check(scale.const.size == 1, f"{node.name} is not per-tensor")
    m.check(not node.attrs.get("block_size"), f"{node.name} is blocked")


def _quantize_of_activation(m: Matcher, q_node: Node) -> Node:
    m.check(q_node.op == "quantize", f"{q_node.name} is not a quantize")
    check_per_tensor(m, q_node)
    out = q_node.outputs[0].type.dtype
    m.check(out.is_int and out.bits <= 32, f"{q_node.name} does not store integers")
    act = m.producer(q_node.inputs[0], ACTIVATIONS)
    m.sole_user(act.outputs[0])
    return act


def _dequantized_integer(m: Matcher, act: Node) -> Node:
    dq = m.producer(act.inputs[0], "dequantize")
    check_per_tensor(m, dq)
    q = dq.inputs[0].type.dtype
    m.check(q.is_int and q.bits <= 16, f"{dq.name} reads no <=16-bit integer")
    return dq


def _chain(q_node: Node, act: Node, dq: Node):
    """T(codes) = Q(act(DQ(codes))) by the nodes' own semantics."""

    def table(codes):
        return evaluate_on(q_node, evaluate_on(act, evaluate_on(dq, codes)))

    return table


# ---- rules ------------------------------------------------------------------------


def fold_into_requantize(m: Matcher, q_node: Node) -> None:
    act = _quantize_of_activation(m, q_node)
    dq = _dequantized_integer(m, act)
    m.sole_user(dq.outputs[0])
    r_node = m.producer(dq.inputs[0], "requantize")
    m.sole_user(r_node.outputs[0])
    fused = fold_map_into_requantize(m, r_node, _chain(q_node, act, dq), q_node.outputs[0])
    m.graph.replace_all_uses(q_node.outputs[0], fused)


def integer_clip(m: Matcher, q_node: Node) -> None:
    act = _quantize_of_activation(m, q_node)
    dq = _dequantized_integer(m, act)
    x, out = dq.inputs[0], q_node.outputs[0]
    m.check(x.type.dtype == out.type.dtype, f"{x.type.dtype} in, {out.type.dtype} out")
    m.check(x.type.dtype in CLIP_DTYPES, f"no integer clip on {x.type.dtype}")
    codes = storage_codes(x.type.dtype)
    image = _chain(q_node, act, dq)(codes.astype(x.type.dtype.numpy))
    fn = as_shifted_clamp(codes, image)
    m.check(fn is not None and fn.shift == 0, "Q(act(DQ(q))) is not a clamp of q")
    dtype = x.type.dtype
    if (fn.lo, fn.hi) == (dtype.qmin, dtype.qmax):
        m.graph.replace_all_uses(out, x)  # the activation does nothing on this grid
        return
    bounds = {
        "min": fn.lo if fn.lo > dtype.qmin else None,
        "max": fn.hi if fn.hi < dtype.qmax else None,
    }
    node = m.graph.add_node("clip", [x], bounds, name=act.name, output_types=[out.type])
    m.graph.replace_all_uses(out, node.outputs[0])


def _activation_bounds(m: Matcher, act: Node, dtype) -> np.ndarray:
    """[a, b] in x's float type: relu (0, +inf), clip (min, max), absent = -+inf."""
    if act.op == "relu":
        low, high = 0.0, np.inf
    else:
        low = act.attrs.get("min")
        high = act.attrs.get("max")
        low, high = (-np.inf if low is None else low), (np.inf if high is None else high)
    bounds = np.asarray([low, high]).astype(dtype.numpy)
    m.check(not np.any(np.isnan(bounds.astype(np.float64))), f"{act.name} has a NaN bound")
    return bounds


def clamp_into_quantize(m: Matcher, q_node: Node) -> None:
    act = _quantize_of_activation(m, q_node)
    x = act.inputs[0]
    m.check(x.type.dtype.is_float, f"{x.name} is not a float")
    lo, hi = (int(b) for b in evaluate_on(q_node, _activation_bounds(m, act, x.type.dtype)))
    # min > max: clip gives max everywhere, and min(max(y, lo), hi) == hi too.
    attrs = dict(q_node.attrs, clamp=(min(lo, hi), hi))
    node = m.graph.add_node(
        "quantize", [x, *q_node.inputs[1:]], attrs, name=q_node.name,
        output_types=[q_node.outputs[0].type],
    )  # fmt: skip
    m.graph.replace_all_uses(q_node.outputs[0], node.outputs[0])


RULES = [fold_into_requantize, integer_clip, clamp_into_quantize]


def _quantize_nodes(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "quantize"]


def fuse_activation(graph: Graph, log: RuleLog | None = None) -> bool:
    """Fuse every relu/clip in front of a quantize that has an exact integer
    form; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("fuse_activation_log", RuleLog())
    return apply_rules(graph, _quantize_nodes, RULES, log)


__all__ = [
    "ShiftedClamp",
    "as_shifted_clamp",
    "check_per_tensor",
    "evaluate_on",
    "fold_map_into_requantize",
    "fuse_activation",
    "storage_codes",
]
