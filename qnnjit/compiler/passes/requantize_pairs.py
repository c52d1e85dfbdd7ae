"""Requantization pairs: DQ -> Q with different parameters on 8-bit storage
becomes one integer table lookup, chains of lookups compose, and a
requantize followed by a lookup becomes one requantize where that is
provably the same map.

The algebra. On a storage type with at most 2^8 values, any elementwise
per-tensor map of the stored integers is a table:

- `dq_q_to_lookup`: Q2(DQ1(q)) == lookup(q, t) with
  `t[i] = Q2(DQ1(qmin + i))` for every code, computed at compile time by the
  dequantize and quantize nodes' own semantics (`qnnjit.numerics`: float32
  product, true division, round half to even, saturate). Exact by
  construction: the lookup returns, for each code, what the two nodes return
  for it. (A table that is the identity on the same storage type is no node
  at all.) The DQ may have other readers; they keep it.
- `compose_lookups`: lookup(lookup(x, t1), t2) == lookup(x, t2[t1 - qmin])
  (function composition, entry by entry), when the inner lookup is read only
  by the outer one.
- `lookup_into_requantize`: lookup(requantize(acc), t) is one requantize
  when t is a *shifted clamp*, t[q] = clip(q + d, lo, hi), on every code the
  requantize can produce: the requantize then takes zero point zp + d, the
  table's storage type and clamp (lo, hi) (proof in
  `fuse_activation.fold_map_into_requantize`). That covers zero-point and
  signedness changes (int8 zp z -> uint8 zp z + 128) and clamps. A change of
  scale is *not* folded into the multiplier: round(round(acc * m1) * r)
  differs from round(acc * m1 * r) (two roundings against one), so
  requantize -> lookup stays, which is still one integer op per element.
  Needs the requantize's output read only by the lookup.

Preconditions: constant per-tensor parameters and no blocking on the DQ and
the Q; integer storage of at most 8 bits on the DQ's input (a table of 2^8
entries; 16-bit tables are not built); constant tables. A per-axis pair would
need one table per channel and is kept.
"""

from __future__ import annotations

import numpy as np

from ...ir.graph import Graph, Node
from ..pattern import Matcher, RuleLog, apply_rules
from .fuse_activation import (
    check_per_tensor,
    evaluate_on,
    fold_map_into_requantize,
    storage_codes,
)

MAX_TABLE_BITS = 8


def lookup_like(graph: Graph, x, table: np.ndarray, like: Node, name: str) -> Node:
    """lookup(x, table) typed like `like`'s output (its scale and zero point
    as the typing operands)."""
    out = like.outputs[0].type
    typing = [None, None]
    if out.quant is not None and out.quant.per_tensor:
        typing = [
            graph.constant(out.quant.scale, f"{name}_scale"),
            graph.constant(np.asarray(out.quant.zero_point, out.dtype.numpy), f"{name}_zp"),
        ]
    table_value = graph.constant(np.asarray(table, out.dtype.numpy), f"{name}_table")
    return graph.add_node("lookup", [x, table_value, *typing], name=name, output_types=[out])


# ---- rules ------------------------------------------------------------------------


def dq_q_to_lookup(m: Matcher, q_node: Node) -> None:
    m.check(q_node.op == "quantize", f"{q_node.name} is not a quantize")
    check_per_tensor(m, q_node)
    out = q_node.outputs[0].type.dtype
    m.check(out.is_int and out.bits <= 32, f"{q_node.name} does not store integers")
    dq = m.producer(q_node.inputs[0], "dequantize")
    check_per_tensor(m, dq)
    x = dq.inputs[0]
    m.check(
        x.type.dtype.is_int and x.type.dtype.bits <= MAX_TABLE_BITS,
        f"{x.name} is {x.type.dtype}, tables are built for <= {MAX_TABLE_BITS}-bit integers",
    )
    codes = storage_codes(x.type.dtype)
    table = evaluate_on(q_node, evaluate_on(dq, codes.astype(x.type.dtype.numpy)))
    graph = m.graph
    if x.type.dtype == out and np.array_equal(table.astype(np.int64), codes):
        graph.replace_all_uses(q_node.outputs[0], x)  # Q2(DQ1(q)) == q on every code
        return
    node = lookup_like(graph, x, table, q_node, q_node.name)
    graph.replace_all_uses(q_node.outputs[0], node.outputs[0])


def compose_lookups(m: Matcher, outer: Node) -> None:
    m.check(outer.op == "lookup", f"{outer.name} is not a lookup")
    inner = m.producer(outer.inputs[0], "lookup")
    m.sole_user(inner.outputs[0])
    t1 = m.constant(inner.input(1), f"table of {inner.name}")
    t2 = m.constant(outer.input(1), f"table of {outer.name}")
    index_type = inner.outputs[0].type.dtype
    composed = np.take(t2, t1.astype(np.int64) - index_type.qmin)
    graph = m.graph
    table = graph.constant(composed, f"{outer.name}_composed")
    node = graph.add_node(
        "lookup", [inner.inputs[0], table, *outer.inputs[2:]], outer.attrs, name=outer.name,
        output_types=[outer.outputs[0].type],
    )  # fmt: skip
    graph.replace_all_uses(outer.outputs[0], node.outputs[0])


def lookup_into_requantize(m: Matcher, lookup: Node) -> None:
    m.check(lookup.op == "lookup", f"{lookup.name} is not a lookup")
    r_node = m.producer(lookup.inputs[0], "requantize")
    m.sole_user(r_node.outputs[0])
    table = m.constant(lookup.input(1), f"table of {lookup.name}")
    qmin = r_node.outputs[0].type.dtype.qmin

    def apply(codes):
        return np.take(table, codes.astype(np.int64) - qmin)

    fused = fold_map_into_requantize(m, r_node, apply, lookup.outputs[0])
    m.graph.replace_all_uses(lookup.outputs[0], fused)


RULES = [dq_q_to_lookup, compose_lookups, lookup_into_requantize]


def _anchors(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op in ("quantize", "lookup")]


def requantize_pairs(graph: Graph, log: RuleLog | None = None) -> bool:
    """Rewrite every DQ -> Q pair, lookup chain and requantize -> lookup that
    has an exact integer form; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("requantize_pairs_log", RuleLog())
    changed = False
    while apply_rules(graph, _anchors, RULES, log):
        changed = True  # a new lookup may compose with the next one
    return changed


__all__ = ["MAX_TABLE_BITS", "lookup_like", "requantize_pairs"]
