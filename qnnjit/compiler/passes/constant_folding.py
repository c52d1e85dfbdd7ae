"""Constant folding: a node whose operands are all constants becomes constants.

Rewrite, for every node n in topological order (so a chain folds in one run):

    n(c1, ..., ck)  ->  ops.evaluate(n.op, [c1, ..., ck], n.attrs)

Exact: the folded arrays are computed by the very function the reference
interpreter would run at every inference (the op's registered `evaluate`, on
the same arrays with the same attributes), so each reader sees the same bits,
once at compile time instead of once per run. A folded constant keeps the
node's declared output type (quantization and accumulator facts included);
its value keeps the node output's name.

Not folded:

- `dequantize`, in `constant_folding` (the run before QDQ canonicalization),
  as `ir.builder.NOT_FOLDED` says: DQ(w_int8, scale, zp) of a constant weight
  is how a QDQ model marks a weight as integer; folding it would hand the
  canonicalization a float weight it can no longer keep in integers.
- `constant_folding_with_dequantize` (after canonicalization) folds constant
  `dequantize` nodes too. Every unit that could become integer has by then
  been rewritten to read the integer operand itself (qconv reads w_int8, not
  DQ(w)), so a constant DQ left in the graph feeds float ops that stay float:
  they read the same float array either way, now computed once. The price is
  memory for those layers only: the float copy of a weight is 4 bytes per
  element instead of 1 (the int8 array goes away unless an integer op also
  reads it).
- a node with a graph output among its outputs: graph outputs stay named node
  outputs, never constants (the frontend's convention; output names are the
  values' names).
- a node whose evaluation raises: it is left for run time, where it raises
  only if it is live (dead-code elimination may still remove it).
"""

from __future__ import annotations

import numpy as np

from ...ir import builder, ops
from ...ir.graph import Graph, Node, Value


def constant_folding(graph: Graph) -> bool:
    """Fold every all-constant node except `dequantize`; see the module doc."""
    return _fold(graph, skip=builder.NOT_FOLDED)


def constant_folding_with_dequantize(graph: Graph) -> bool:
    """Fold every all-constant node, `dequantize` included: for after QDQ
    canonicalization, when no rewrite still needs to see DQ(w); see the module doc."""
    return _fold(graph, skip=frozenset())


def _fold(graph: Graph, skip: frozenset[str]) -> bool:
    changed = False
    for node in graph.nodes:
        if node.op in skip or not _foldable(graph, node):
            continue
        results = _evaluate(node)
        if results is None:
            continue
        replacements = [_constant(graph, value, r) for value, r in zip(node.outputs, results)]
        names = [value.name for value in node.outputs]
        for value, constant in zip(node.outputs, replacements):
            graph.replace_all_uses(value, constant)
        graph.remove_node(node)
        for name, constant in zip(names, replacements):
            graph.rename(constant, name)
        changed = True
    return changed


def _foldable(graph: Graph, node: Node) -> bool:
    present = [v for v in node.inputs if v is not None]
    return (
        bool(present)
        and all(v.is_constant for v in present)
        and not any(graph.is_output(v) for v in node.outputs)
    )


def _evaluate(node: Node) -> list[np.ndarray] | None:
    args = [v.const if v is not None else None for v in node.inputs]
    try:
        with np.errstate(all="ignore"):  # the same warnings would come at run time
            results = [np.asarray(r) for r in ops.evaluate(node.op, args, node.attrs)]
    except Exception:  # noqa: BLE001 - left for run time, see the module doc
        return None
    if len(results) != len(node.outputs):
        raise ValueError(
            f"{node.name} ({node.op}) gave {len(results)} results, not {len(node.outputs)}"
        )
    for value, result in zip(node.outputs, results):
        if result.dtype != value.type.dtype.numpy:
            raise ValueError(
                f"{node.name} ({node.op}) evaluated to {result.dtype} for {value.name}, "
                f"declared {value.type}"
            )
    return results


def _constant(graph: Graph, value: Value, array: np.ndarray) -> Value:
    """A constant holding `array`, typed as `value` was where the shapes agree
    (a declared shape may be less precise, e.g. of unknown rank)."""
    constant = graph.constant(array, f"{value.name}_folded")
    if value.type.shape == array.shape:
        constant.type = value.type
    return constant
