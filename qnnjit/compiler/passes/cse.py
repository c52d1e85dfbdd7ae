"""Common-subexpression elimination: two nodes computing the same function of
the same operands are one node.

Rewrite: for nodes n1 before n2 in topological order with

    op(n2) == op(n1),
    operands pairwise the same value, or constants equal bit for bit
      (same dtype, shape, type and bytes),
    attributes equal structurally (`attr_key`: arrays by dtype, shape and
      bytes; floats by their bits; ints, bools and floats never equal to each
      other; DTypes and other hashable values by `==`; sequences (a tuple
      equals a list) and dicts element by element),
    declared output types equal,

every reader of n2's outputs (graph outputs included) reads n1's instead and
n2 is removed. Readers of merged nodes then have equal operands in turn, so
chains merge in the same topological sweep.

Exact: an IR op is a pure function of its operands and attributes (its
reference semantics is `evaluate(inputs, attrs)`, no state, no randomness),
so equal operands and attributes give the same bits; comparing constants and
float attributes by their bits (not `==`) keeps that true for NaN and -0.0.

Graph outputs keep their names: a node with a graph output among its outputs
is kept and its twin merged into it; two such twins both stay. A node whose
attributes cannot be compared (an unhashable value of unknown kind, an object
array) is never merged.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from ...ir.graph import Graph, Node, Value


class Incomparable(Exception):
    """An attribute value this pass cannot compare exactly."""


def attr_key(value) -> tuple:
    """A hashable key, equal for two attribute values exactly when they are
    interchangeable for an op's semantics; raises Incomparable if unknown."""
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise Incomparable(f"object array {array!r}")
        return ("array", array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if value is None or isinstance(value, (str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):  # ops read both as sequences
        return ("sequence", tuple(attr_key(v) for v in value))
    if isinstance(value, dict):
        items = sorted((attr_key(k), attr_key(v)) for k, v in value.items())
        return ("dict", tuple(items))
    if isinstance(value, np.dtype):
        return ("dtype", value.str)
    try:
        hash(value)  # frozen values: DType, QuantParams, TensorType ...
    except TypeError:
        raise Incomparable(f"{type(value).__name__} {value!r}") from None
    return (type(value).__module__, type(value).__qualname__, value)


def cse(graph: Graph) -> bool:
    """Merge equal nodes until none are left; see the module doc."""
    changed = False
    while _sweep(graph):
        changed = True
    return changed


def _sweep(graph: Graph) -> bool:
    digests: dict[int, bytes] = {}
    seen: dict[tuple, list[Node]] = {}
    changed = False
    for node in graph.nodes:
        try:
            key = _node_key(node, digests)
        except Incomparable:
            continue
        bucket = seen.setdefault(key, [])
        twin = next((n for n in bucket if _same(n, node)), None)
        if twin is None:
            bucket.append(node)
            continue
        keep, drop = twin, node
        if _has_graph_output(graph, drop):
            if _has_graph_output(graph, keep):
                continue  # two named outputs computing the same thing: both stay
            keep, drop = drop, keep  # no cycle: both read the same operands
            bucket[bucket.index(twin)] = keep
        for old, new in zip(drop.outputs, keep.outputs):
            graph.replace_all_uses(old, new)
        graph.remove_node(drop)
        changed = True
    return changed


def _node_key(node: Node, digests: dict[int, bytes]) -> tuple:
    """A hash key: constants by digest (confirmed byte for byte in `_same`)."""
    operands = []
    for value in node.inputs:
        if value is None:
            operands.append(None)
        elif value.is_constant:
            if id(value) not in digests:
                data = np.ascontiguousarray(value.const)
                digests[id(value)] = hashlib.blake2b(data.view(np.uint8).reshape(-1)).digest()
            operands.append(("const", value.type, digests[id(value)]))
        else:
            operands.append(("value", id(value)))
    attrs = tuple(sorted((name, attr_key(v)) for name, v in node.attrs.items()))
    types = tuple(v.type for v in node.outputs)
    return (node.op, tuple(operands), attrs, types)


def _same(a: Node, b: Node) -> bool:
    return len(a.inputs) == len(b.inputs) and all(
        _same_operand(x, y) for x, y in zip(a.inputs, b.inputs)
    )


def _same_operand(x: Value | None, y: Value | None) -> bool:
    if x is y:
        return True
    if x is None or y is None or not (x.is_constant and y.is_constant):
        return False
    return (
        x.type == y.type
        and x.const.dtype == y.const.dtype
        and x.const.shape == y.const.shape
        and np.ascontiguousarray(x.const).tobytes() == np.ascontiguousarray(y.const).tobytes()
    )


def _has_graph_output(graph: Graph, node: Node) -> bool:
    return any(graph.is_output(v) for v in node.outputs)
