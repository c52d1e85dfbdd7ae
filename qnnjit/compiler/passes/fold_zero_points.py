"""Zero-point folding: the input zero point of `qconv` / `qmatmul` with a
constant weight moves into an int32 constant at compile time.

The algebra (K = the reduction: input channels x kernel window for a conv,
the inner dimension for a matmul; zx the input zero point, zw the weight zero
point, per tensor or per output channel):

    sum_K (x - zx)(w - zw) = sum_K x * (w - zw)  -  zx * sum_K (w - zw)

The second term depends only on the weight, one value per output channel (a
conv's M, a matmul's N), so it is computed once here and the node no longer
subtracts zx from every input element. Exactly these terms move:

- `fold_conv_input_zero_point`: qconv(x, w, zx, zw, b) becomes
  qconv(x, w, _, zw, b') with `b'[m] = wrap32(b[m] - zx * S[m])`,
  `S[m] = sum_{c, k} (w[m, c, k] - zw[m])` over the group's channels and the
  whole kernel window. Padding: the unfolded node pads with zx (it contributes
  (zx - zx)(w - zw) = 0), while S counts every kernel tap, padded ones
  included; so the folded node must pad x with zx itself, contributing
  zx * (w - zw), which `- zx * S` cancels. It says so with
  `pad_value = zx` (an existing pad_value is kept: the identity holds for any
  padding value p, both sides then reading (p - zx)(w - zw)).
- `fold_matmul_input_zero_point`: qmatmul(a, B, za, zb) with a constant B
  becomes qmatmul(a, B, _, zb) plus the int32 constant
  `c = -za * sum_k (B[..., k, n] - zb[n])` (shape [..., 1, N], or [..., M, N]
  for a per-row za), added to the accumulator: folded into the int32 constant
  of an `add` that is the accumulator's only reader (QGemm's bias C,
  `C' = wrap32(C + c)`), else a new `add(acc, c)` (one more node, an epilogue
  add that a fused kernel absorbs).

The weight zero point zw stays in the node: its term `zw * sum_K x` needs the
input, so it cannot move to compile time (and `w - zw` is not always
representable in w's storage type). A zero zx leaves nothing to fold.

Why exact, int32 wrap included: the ops compute in int64 and wrap the result
to int32 once, at the end (`ir/ops/quant.py`). The folded constant is stored
wrapped to int32, and two's complement wrapping is a ring homomorphism
(Z -> Z / 2^32), so `wrap32(sum' + wrap32(b - zx * S)) == wrap32(sum + b)`
for every input, overflowing or not: the result is bit-identical to the
unfolded node. The *intermediate* `sum_K x * (w - zw)` has another range than
`sum_K (x - zx)(w - zw)` (a uint8 x spans [0, 255] instead of
[-zx, 255 - zx]); the accumulator-range analysis bounds the folded form.
"""

from __future__ import annotations

import numpy as np

from ...ir import dtypes
from ...ir.graph import Graph, Node, Value
from ..pattern import Matcher, RuleLog, apply_rules

INT32_MIN = -(1 << 31)


def wrap_int32(values) -> np.ndarray:
    """Two's complement wrap of exact integers to int32."""
    values = np.asarray(values, dtype=np.int64)
    return (((values - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN).astype(np.int32)


def _input_zero_point(m: Matcher, value: Value | None, what: str) -> np.ndarray:
    m.check(value is not None, f"{what} is absent (0): nothing to fold")
    zero_point = m.constant(value, what).astype(np.int64)
    m.check(bool(np.any(zero_point != 0)), f"{what} is already 0")
    return zero_point


def _weight_zero_point(m: Matcher, value: Value | None) -> np.ndarray:
    if value is None:
        return np.zeros((), np.int64)
    return m.constant(value, "weight zero point").astype(np.int64)


# ---- qconv ------------------------------------------------------------------------


def conv_weight_sums(w: np.ndarray, w_zp: np.ndarray) -> np.ndarray:
    """S[m] = sum over w's axes 1.. of (w - zw), zw per tensor or per channel m."""
    wide = w.astype(np.int64)
    zw = w_zp.reshape((-1,) + (1,) * (w.ndim - 1)) if w_zp.size > 1 else w_zp.reshape(())
    return (wide - zw).reshape(w.shape[0], -1).sum(axis=1)


def fold_conv_input_zero_point(m: Matcher, conv: Node) -> None:
    m.check(conv.op == "qconv", f"{conv.name} is not a qconv")
    graph = m.graph
    x, w, x_zp, w_zp, bias = (conv.input(i) for i in range(5))
    zx = _input_zero_point(m, x_zp, "x zero point")
    m.check(zx.size == 1, "x zero point is not per-tensor")
    zx = int(zx.reshape(-1)[0])
    weight = m.constant(w, "weight")
    sums = conv_weight_sums(weight, _weight_zero_point(m, w_zp))
    old_bias = np.zeros(sums.shape, np.int64)
    if bias is not None:
        old_bias = m.constant(bias, "bias").astype(np.int64).reshape(-1)
        m.check(old_bias.shape == sums.shape, "bias does not have one entry per output channel")
    attrs = dict(conv.attrs)
    if any(attrs["pads"]) and attrs.get("pad_value") is None:
        attrs["pad_value"] = zx
    folded = graph.constant(wrap_int32(old_bias - zx * sums), f"{conv.name}_bias_zp_folded")
    node = graph.add_node(
        "qconv", [x, w, None, w_zp, folded], attrs, name=conv.name,
        output_types=[conv.outputs[0].type],
    )  # fmt: skip
    graph.replace_all_uses(conv.outputs[0], node.outputs[0])


# ---- qmatmul ----------------------------------------------------------------------


def matmul_correction(b: np.ndarray, a_zp: np.ndarray, b_zp: np.ndarray) -> np.ndarray:
    """c = -za * sum_k (B - zb): shape [..., 1, N] (per-tensor za) or
    [..., M, N] (per-row za); exact in int64."""
    zb = b_zp.reshape(()) if b_zp.size == 1 else b_zp
    column_sums = (b.astype(np.int64) - zb).sum(axis=-2, keepdims=True)
    za = a_zp.reshape(()) if a_zp.size == 1 else a_zp
    if za.ndim == 1:
        za = za.reshape(-1, 1)  # one per row of a, as qmatmul reads it
    return -(za * column_sums)


def _broadcasts_into(shape, target) -> bool:
    """Whether a static `shape` broadcasts to `target` without growing it."""
    if target is None or len(shape) > len(target):
        return False
    tail = target[len(target) - len(shape) :]
    return all(d == 1 or d == t for d, t in zip(shape, tail))


def _bias_add(graph: Graph, acc: Value) -> tuple[Node, int] | None:
    """The `add` reading `acc` with an int32 constant, when it is acc's only reader."""
    users = graph.users(acc)
    if graph.is_output(acc) or len(users) != 1 or users[0].op != "add":
        return None
    add = users[0]
    if add.inputs.count(acc) != 1:
        return None
    other = 1 - add.inputs.index(acc)
    constant = add.inputs[other]
    if constant is None or not constant.is_constant or constant.type.dtype != dtypes.int32:
        return None
    return add, other


def fold_matmul_input_zero_point(m: Matcher, mm: Node) -> None:
    m.check(mm.op == "qmatmul", f"{mm.name} is not a qmatmul")
    graph = m.graph
    a, b, a_zp, b_zp = (mm.input(i) for i in range(4))
    za = _input_zero_point(m, a_zp, "a zero point")
    weight = m.constant(b, "B")
    m.check(a.type.rank is not None and a.type.rank >= 2, "a is not a matrix (rank < 2)")
    m.check(weight.ndim >= 2, "B is not a matrix (rank < 2)")
    correction = matmul_correction(weight, za, _weight_zero_point(m, b_zp))
    acc = mm.outputs[0]
    m.check(
        _broadcasts_into(correction.shape, acc.type.shape),
        f"correction of shape {correction.shape} does not broadcast to {acc.type.shape}",
    )
    node = graph.add_node(
        "qmatmul", [a, b, None, b_zp], mm.attrs, name=mm.name, output_types=[acc.type]
    )
    found = _bias_add(graph, acc)
    if found is not None:
        add, index = found
        merged = wrap_int32(add.inputs[index].const.astype(np.int64) + correction)
        constant = graph.constant(merged, f"{add.name}_zp_folded")
        inputs = [node.outputs[0], constant] if index == 1 else [constant, node.outputs[0]]
        old = add.outputs[0]
    else:
        constant = graph.constant(wrap_int32(correction), f"{mm.name}_zp_folded")
        inputs, old = [node.outputs[0], constant], acc
    new_add = graph.add_node("add", inputs, name=f"{mm.name}_zp", output_types=[old.type])
    graph.replace_all_uses(old, new_add.outputs[0])


# ---- the pass ---------------------------------------------------------------------

RULES = [fold_conv_input_zero_point, fold_matmul_input_zero_point]


def _accumulating_nodes(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op in ("qconv", "qmatmul")]


def fold_zero_points(graph: Graph, log: RuleLog | None = None) -> bool:
    """Fold every foldable input zero point; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("fold_zero_points_log", RuleLog())
    return apply_rules(graph, _accumulating_nodes, RULES, log)


__all__ = ["fold_zero_points", "wrap_int32"]
