"""Epilogue fusion: each integer accumulation and the elementwise work on its
result become one `fused` group — one kernel in a backend.

A group is a rooted chain, anchored at an accumulating op:

    qconv | qmatmul | qreduce_sum          (int32 accumulator)
      [-> add(acc, int32 constant)]...     the bias, when it is a separate node (or
                                           a folded zero-point correction)
      -> requantize                        with its clamp, if activation fusion set one
      [-> qadd | qmul | lookup]            at most one elementwise op on the result
        [-> clip | lookup]                 after qadd / qmul: an integer clip of its codes,
                                           or a table of them (a transformer's bias add
                                           then its GELU table)

giving kinds such as "conv+requantize+add" (the residual block: conv, bias,
requantize, relu as clamp, residual add with its own rescale),
"matmul+bias+requantize" or "reduce_sum+requantize" (global average pool).
The clip is the relu after a residual add when activation fusion could not
move it into a requantize (`fuse_activation`'s `integer_clip`: symmetric s8
activations): a backend folds it into the add's saturation bounds, where
alone it would cost a pass over the tensor.

Preconditions (each check fails with a reason, logged for the report in
`graph.metadata["fusion_log"]`):
- every intermediate value (the accumulator, the biased accumulator, the
  requantized result when an elementwise op follows) has exactly one reader,
  the next op of the chain, and is not a graph output: the group's only result
  is its last value;
- the requantize reads the accumulator as its operand 0 (the others are its
  multiplier, zero point, scale); the elementwise op reads the requantized
  value only as data (qadd/qmul operand A or B, lookup's index).

The elementwise op's other operands (the residual, a table) are computed
outside the group: since no intermediate has an outside reader, none of them
can depend on the group, so the group is convex and the graph stays acyclic.
When one qadd could close two chains (both operands are sole-use requantized
results, as in a block with a downsample branch) the chain whose anchor comes
later in topological order takes it: the other operand is then the one already
computed, the classic "add the residual in the epilogue" schedule.

Soundness: a `fused` node evaluates its body — copies of exactly these nodes —
with the reference interpreter, so every output integer is unchanged by
construction; only the node boundaries move.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir import dtypes
from ...ir.graph import Graph, Node
from ...ir.ops.fused import fuse_nodes
from ..pattern import Matcher, Mismatch, RuleLog

ANCHORS = {"qconv": "conv", "qmatmul": "matmul", "qreduce_sum": "reduce_sum"}
# Elementwise epilogue ops and the operand positions that take data.
EPILOGUES = {"qadd": (0, 3), "qmul": (0, 3), "lookup": (0,)}


@dataclass
class Chain:
    nodes: list[Node]
    kind: list[str]
    epilogue_reason: str = ""


def _main_chain(m: Matcher, anchor: Node) -> Chain:
    """anchor [-> bias add(s)] -> requantize."""
    nodes, kind = [anchor], [ANCHORS[anchor.op]]
    value = anchor.outputs[0]
    user = m.sole_user(value)
    while user.op == "add":  # the bias, and/or a folded zero-point correction
        other = user.inputs[1] if user.inputs[0] is value else user.inputs[0]
        m.check(
            other is not None
            and other is not value
            and other.is_constant
            and other.type.dtype == dtypes.int32,
            f"{user.name} adds a non-constant or non-int32 operand",
        )
        nodes.append(user)
        if kind[-1] != "bias":
            kind.append("bias")
        value = user.outputs[0]
        user = m.sole_user(value)
    m.check(user.op == "requantize", f"{value.name} is read by {user.op}, not requantize")
    m.check(
        user.inputs[0] is value and all(v is not value for v in user.inputs[1:]),
        f"{user.name} reads {value.name} as more than its accumulator",
    )
    nodes.append(user)
    kind.append("requantize")
    return Chain(nodes, kind)


def _epilogue(m: Matcher, chain: Chain) -> Node:
    """The elementwise op that may close `chain`, or Mismatch."""
    value = chain.nodes[-1].outputs[0]
    user = m.sole_user(value)
    m.check(user.op in EPILOGUES, f"{value.name} is read by {user.op}, not {sorted(EPILOGUES)}")
    data = EPILOGUES[user.op]
    m.check(
        all(index in data for index, v in enumerate(user.inputs) if v is value),
        f"{user.name} reads {value.name} as a parameter, not as data",
    )
    m.check(len(user.outputs) == 1, f"{user.name} has several outputs")
    return user


def _closer_after(m: Matcher, op: Node) -> Node | None:
    """The node that alone reads the qadd / qmul `op`'s result and closes the
    group: an integer clip of it, or a lookup with it as the index; None if
    there is none."""
    if op.op not in ("qadd", "qmul"):
        return None
    try:
        user = m.sole_user(op.outputs[0])
    except Mismatch:
        return None
    y = op.outputs[0]
    if user.inputs[0] is not y or any(v is y for v in user.inputs[1:]) or len(user.outputs) != 1:
        return None
    if user.op == "clip" and len(user.inputs) == 1 and user.outputs[0].type.dtype.is_int:
        return user
    return user if user.op == "lookup" else None


def fuse_epilogues(graph: Graph, log: RuleLog | None = None) -> bool:
    """Group every anchor with its epilogue; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("fusion_log", RuleLog())
    m = Matcher(graph)
    order = {node: index for index, node in enumerate(graph.nodes)}
    chains: list[Chain] = []
    for node in order:
        if node.op not in ANCHORS:
            continue
        try:
            chains.append(_main_chain(m, node))
        except Mismatch as why:
            log.kept[node.name] = f"not fused: {why}"

    claims: dict[Node, list[Chain]] = {}
    for chain in chains:
        try:
            claims.setdefault(_epilogue(m, chain), []).append(chain)
        except Mismatch as why:
            chain.epilogue_reason = str(why)
    for op, claimants in claims.items():
        winner = max(claimants, key=lambda c: order[c.nodes[0]])
        winner.nodes.append(op)
        winner.kind.append(op.op.removeprefix("q"))
        last = _closer_after(m, op)
        if last is not None:
            winner.nodes.append(last)
            winner.kind.append(last.op)
        for chain in claimants:
            if chain is not winner:
                chain.epilogue_reason = f"{op.name} joins the group of {winner.nodes[0].name}"

    for chain in chains:
        kind = "+".join(chain.kind)
        fuse_nodes(graph, chain.nodes, kind)
        note = f" ({chain.epilogue_reason})" if chain.epilogue_reason else ""
        log.applied.append(f"{kind} at {chain.nodes[0].name}{note}")
        log.kept.pop(chain.nodes[0].name, None)
    return bool(chains)
