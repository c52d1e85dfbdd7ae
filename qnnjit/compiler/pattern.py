"""A small matcher for rooted chains in the IR.

Patterns in NN graphs are short chains (DQ -> Conv -> Q), so a rule walks them
with the graph API and states each precondition as a check that fails *with a
reason*. A rule raises `Mismatch` at the first failed check; the pass driver
records the reason, so `report()` can say why a QDQ pair was kept.

    m = Matcher(graph)
    op = m.producer(q.inputs[0], "conv")            # Mismatch: "x is made by relu, not conv"
    m.check(len(graph.users(op.outputs[0])) == 1, "conv output has other readers")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..ir.graph import Graph, Node, Value


class Mismatch(Exception):
    """A precondition of a rule does not hold; the message says which."""


class Matcher:
    def __init__(self, graph: Graph):
        self.graph = graph

    def check(self, condition: bool, reason: str):
        if not condition:
            raise Mismatch(reason)

    def producer(self, value: Value | None, ops: str | Iterable[str]) -> Node:
        """The node making `value`, which must be one of `ops`."""
        wanted = {ops} if isinstance(ops, str) else set(ops)
        if value is None:
            raise Mismatch(f"operand is absent, expected the output of {sorted(wanted)}")
        node = value.producer
        if node is None or node.op not in wanted:
            made_by = "a graph input or constant" if node is None else node.op
            raise Mismatch(f"{value.name} is {made_by}, not {' or '.join(sorted(wanted))}")
        return node

    def sole_user(self, value: Value) -> Node:
        """The only node reading `value` (which must not be a graph output)."""
        users = self.graph.users(value)
        self.check(not self.graph.is_output(value), f"{value.name} is a graph output")
        self.check(len(users) == 1, f"{value.name} has {len(users)} readers, not 1")
        return users[0]

    def constant(self, value: Value | None, what: str) -> np.ndarray:
        self.check(value is not None and value.is_constant, f"{what} is not a constant")
        return value.const


@dataclass
class RuleLog:
    """What the rules of one pass did: rewrites, and near-misses with reasons."""

    applied: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # anchor name -> why no rule applied


def apply_rules(
    graph: Graph,
    anchors: Callable[[Graph], list[Node]],
    rules: list[Callable[[Matcher, Node], None]],
    log: RuleLog | None = None,
) -> bool:
    """Try `rules` in order at each anchor node; the first that matches rewrites.

    A rule raises Mismatch when it does not apply; when no rule applies the
    reasons of all of them are logged against the anchor."""
    matcher = Matcher(graph)
    changed = False
    for anchor in anchors(graph):
        if not graph.contains(anchor):
            continue  # removed by an earlier rewrite
        reasons = []
        for rule in rules:
            try:
                rule(matcher, anchor)
            except Mismatch as why:
                reasons.append(f"{rule.__name__}: {why}")
                continue
            changed = True
            if log is not None:
                log.applied.append(f"{rule.__name__} at {anchor.name}")
                log.kept.pop(anchor.name, None)
            break
        else:
            if log is not None and reasons:
                log.kept[anchor.name] = "; ".join(reasons)
    if changed:
        graph.dead_code_elimination()
    return changed
