"""Elementwise tables: an integer value that is, element by element, a
function of one integer tensor of at most 8 bits becomes one table lookup.

Why. A QDQ transformer's GELU reaches the IR as

    DQ(x) -> div(., sqrt 2) -> erf -> Q -> qadd(., 1) -> qmul(x, .) -> qmul(., 0.5)

seven nodes of float math and requantizations per element (ONNX Runtime's
erf polynomial alone, run by the reference, took 58 ms on a ViT-Tiny MLP),
yet each output code depends on x's code at the same position and on nothing
else. So do sigmoid, tanh and hard-swish chains, a qadd or qmul with a
constant, a requantize of 8-bit codes. With 2^8 possible codes the whole
function is a 256-entry table, computed at compile time by the nodes' own
reference semantics: `lookup(x, table)` is then bit-identical to the chain by
construction, and costs one load per element.

The rule. A node is *elementwise in x* when
- its op computes each output element from the same-position elements of
  its operands (`ELEMENTWISE`),
- every operand that is not a constant of one element (or a lookup's table)
  is x itself or a value elementwise in x, and at least one is,
- its output has x's shape (no broadcasting against a larger constant), and
- its result does not depend on the operands' shapes in another way: qadd's
  rounding does (ONNX Runtime hands the operands to MLAS in an order chosen
  by `ort_broadcast_mode`), so a qadd joins only when the graph's shapes
  (symbolic dims tried at sizes 1 and 2) and the table's give one mode.
x is a graph input or the output of a node that is not elementwise in
anything (a conv's requantize, a softmax, a concat...) of integer storage of
at most `MAX_TABLE_BITS` bits.

Evaluating these nodes on the vector of all x's codes, in graph order, gives
each one's table. A value elementwise in x that holds integers of at most 16
bits and is read outside the chain (or is a graph output) is replaced by
lookup(x, its table) unless it is a lookup or clip of x (or by x itself when the
table is the identity on x's type, but for a graph output, which keeps its
name); the chain's other nodes are
then dead and removed. A chain whose evaluation fails (an op that rejects the
table's shapes) is left as it was.

After this pass `requantize_pairs` composes lookups and folds shifted-clamp
tables into a preceding requantize, and `fuse_epilogues` fuses a lookup into
the epilogue of the conv or matmul before it.
"""

from __future__ import annotations

import itertools

import numpy as np

from ...ir import ops
from ...ir.graph import Graph, Node, Value
from ...ir.ops.qlinear_contrib import ort_broadcast_mode
from .fuse_activation import storage_codes
from .requantize_pairs import MAX_TABLE_BITS, lookup_like

# Ops whose every output element is a function of the same-position elements
# of their operands (NumPy broadcasting) and of their attributes only.
ELEMENTWISE = frozenset(
    {
        # float math
        "abs", "add", "ceil", "clip", "div", "erf", "exp", "floor", "gelu", "hard_sigmoid",
        "hard_swish", "leaky_relu", "log", "max", "min", "mul", "neg", "pow", "prelu",
        "reciprocal", "relu", "round", "sigmoid", "sign", "sqrt", "sub", "sum", "tanh",
        # comparisons, logic, selection, conversion
        "and", "cast", "equal", "greater", "greater_or_equal", "less", "less_or_equal", "not",
        "or", "where", "xor",
        # quantized (per-tensor parameters: one-element constants, checked below)
        "dequantize", "lookup", "qadd", "qmul", "quantize", "requantize",
    }
)  # fmt: skip
_TABLE_OPERANDS = {"lookup": (1,)}  # constants indexed, not broadcast: any size
_QADD_OPERANDS = (0, 3)
# A lookup or an integer clip reading the root is already as cheap as a table
# (and a clip may still fold into a requantize's clamp): not replaced.
_ONE_STEP_OPS = frozenset({"lookup", "clip"})
_MAX_SYMBOLIC_DIMS = 6  # the qadd check tries 2^n size combinations


def elementwise_tables(graph: Graph) -> bool:
    """Replace every integer value that is an elementwise function of one
    <= 8-bit integer tensor by a table lookup; see the module doc."""
    chains = _Chains(graph)
    for node in graph.nodes:
        chains.visit(node)
    replaced = False
    for value, root, table in chains.replacements():
        output = graph.is_output(value)
        if (
            not output
            and value.type.dtype == root.type.dtype
            and np.array_equal(table, _codes(root))
        ):
            graph.replace_all_uses(value, root)  # the identity on the root's codes
        else:
            lookup = lookup_like(graph, root, table, value.producer, value.producer.name)
            _replace_keeping_name(graph, value, lookup.outputs[0])
        replaced = True
    if replaced:
        graph.dead_code_elimination()  # the chains' nodes, so later passes see sole readers
    return replaced


def _replace_keeping_name(graph: Graph, old: Value, new: Value) -> None:
    """replace_all_uses; a graph output keeps its name (callers read results by it)."""
    graph.replace_all_uses(old, new)
    if graph.is_output(new):
        name = old.name
        graph.rename(old, next(_spare_names(graph, name)))
        graph.rename(new, name)


def _spare_names(graph: Graph, name: str):
    for index in itertools.count():
        candidate = f"{name}_replaced{index}"
        if not graph.has_value(candidate):
            yield candidate


class _Chains:
    """The values elementwise in some root (`root`), and their values on the
    root's codes (`table`), found in one walk in graph order."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.root: dict[Value, Value] = {}
        self.table: dict[Value, np.ndarray] = {}
        self.members: set[Node] = set()

    def visit(self, node: Node) -> None:
        root = self._root_of(node)
        if root is None:
            return
        args = [self._argument(v, root) for v in node.inputs]
        if node.op == "qadd" and not _same_qadd_mode(node, args):
            return
        try:
            with np.errstate(all="ignore"):
                results = ops.evaluate(node.op, args, node.attrs)
        except Exception:  # noqa: BLE001 - an op that rejects the table's shapes: no table
            return
        self.members.add(node)
        for value, result in zip(node.outputs, results):
            self.root[value] = root
            self.table[value] = np.asarray(result)

    def _root_of(self, node: Node) -> Value | None:
        """The one root all of `node`'s run-time operands are elementwise in,
        or None when `node` is not elementwise in one root."""
        if node.op not in ELEMENTWISE or len(node.outputs) != 1:
            return None
        indexed = _TABLE_OPERANDS.get(node.op, ())
        roots = set()
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value.is_constant:
                if value.const.size != 1 and index not in indexed:
                    return None
                continue
            root = self.root.get(value, value)
            if not _is_root_type(root):
                return None
            roots.add(root)
        if len(roots) != 1:
            return None
        (root,) = roots
        out_shape, root_shape = node.outputs[0].type.shape, root.type.shape
        if out_shape is None or root_shape is None or tuple(out_shape) != tuple(root_shape):
            return None
        return root

    def _argument(self, value: Value | None, root: Value):
        if value is None:
            return None
        if value.is_constant:
            return value.const
        if value is root:
            return _codes(root)
        return self.table[value]

    def replacements(self):
        """(value, root, table) for each chain value to replace by a lookup."""
        for value, root in self.root.items():
            if not _wanted(self.graph, value, self.members):
                continue
            producer = value.producer
            if producer.op in _ONE_STEP_OPS and producer.inputs[0] is root:
                continue  # already one integer step from the root
            table = self.table[value].reshape(-1)  # one entry per code: shapes were checked
            yield value, root, table.astype(value.type.dtype.numpy)


def _codes(root: Value) -> np.ndarray:
    """Every code of the root's storage type, qmin first (a table's index)."""
    dtype = root.type.dtype
    return storage_codes(dtype).astype(dtype.numpy)


def _is_root_type(value: Value) -> bool:
    dtype = value.type.dtype
    return dtype.is_int and dtype.bits <= MAX_TABLE_BITS


def _wanted(graph: Graph, value: Value, members: set[Node]) -> bool:
    """Whether `value` must exist after the rewrite (read outside its chain)
    and can be a lookup's result (integers of at most 16 bits)."""
    dtype = value.type.dtype
    if not (dtype.is_int and dtype.bits <= 16):
        return False
    return graph.is_output(value) or any(user not in members for user in graph.users(value))


def _same_qadd_mode(node: Node, args: list) -> bool:
    """Whether the qadd's operand order (`ort_broadcast_mode`) is the same for
    the graph's shapes, whatever its symbolic dims are, as for the table's."""
    a, b = (node.inputs[i] for i in _QADD_OPERANDS)
    table_mode = ort_broadcast_mode(*(np.shape(args[i]) for i in _QADD_OPERANDS))
    shapes = [a.type.shape, b.type.shape]
    if any(shape is None for shape in shapes):
        return False
    symbolic = sorted({d for shape in shapes for d in shape if not isinstance(d, int)}, key=str)
    if len(symbolic) > _MAX_SYMBOLIC_DIMS:
        return False
    for sizes in itertools.product((1, 2), repeat=len(symbolic)):
        size_of = dict(zip(symbolic, sizes))
        concrete = [tuple(size_of.get(d, d) for d in shape) for shape in shapes]
        if ort_broadcast_mode(*concrete) != table_mode:
            return False
    return True


__all__ = ["ELEMENTWISE", "elementwise_tables"]
