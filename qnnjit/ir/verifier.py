"""The IR verifier: checks the invariants every pass must keep. Runs after every
pass in tests and when QNNJIT_VERIFY=1; a failure names the node."""

from __future__ import annotations

from ..errors import VerificationError
from . import ops
from .graph import Graph


def verify(graph: Graph, *, context: str = "") -> None:
    """Raise VerificationError naming the first broken invariant."""
    where = f" ({context})" if context else ""

    def fail(message: str):
        raise VerificationError(f"IR verification failed{where}: {message}")

    if graph.has_cycle():
        fail("the graph has a cycle")
    defined = {id(v) for v in graph.inputs}
    defined.update(id(v) for v in graph.constants)
    for node in graph.nodes:
        if node.op not in ops.REGISTRY and not _known(node.op):
            fail(f"node {node.name!r} has unknown op {node.op!r}")
        for value in node.inputs:
            if value is None:
                continue
            if id(value) not in defined and not value.is_constant:
                fail(f"node {node.name!r} reads {value.name!r} before it is defined")
            if node not in graph.users(value):
                fail(f"use list of {value.name!r} misses node {node.name!r}")
        for value in node.outputs:
            if value.producer is not node:
                fail(f"output {value.name!r} of {node.name!r} names another producer")
            defined.add(id(value))
        try:
            inferred = ops.infer_types(node.op, node.name, node.inputs, node.attrs)
        except Exception as exc:  # noqa: BLE001 - reported with the node's name
            fail(f"type inference of {node.name!r} fails: {exc}")
        for value, expected in zip(node.outputs, inferred):
            if value.type.dtype != expected.dtype or not _shapes_agree(
                value.type, expected, node.name
            ):
                fail(f"{value.name!r} is typed {value.type}, but {node.op} gives {expected}")
        for key, body in sorted(node.attrs.items()):
            if isinstance(body, Graph):  # a fused group's body: verified like any graph
                verify(body, context=f"{context + ': ' if context else ''}{key} of {node.name!r}")
    for value in graph.outputs:
        if id(value) not in defined and not value.is_constant:
            fail(f"graph output {value.name!r} is not defined")


def _known(name: str) -> bool:
    try:
        ops.get(name)
        return True
    except NotImplementedError:
        return False


def _shapes_agree(actual, expected, node_name: str) -> bool:
    """Equal shapes, where a fresh symbol of this node (`_dims.fresh`: a dim
    inference cannot express, named after the node) matches any symbolic
    dim. A pass that rebuilds a node under a new name keeps the value's
    declared type, whose fresh symbols carry the old node's name."""
    if actual.shape is None or expected.shape is None:
        return True
    if len(actual.shape) != len(expected.shape):
        return False
    return all(
        a == e or (isinstance(a, str) and isinstance(e, str) and e.startswith(node_name + "."))
        for a, e in zip(actual.shape, expected.shape)
    )
