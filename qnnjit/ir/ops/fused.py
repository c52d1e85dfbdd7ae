"""`fused`: a group of nodes that a backend compiles into one kernel.

The node's attribute `body` is a small `Graph`: its inputs are the group's
(non-constant) inputs, in the fused node's operand order; the constants the
group reads (weights, bias, scales, tables) live inside the body; its outputs
are the group's outputs. `kind` names the pattern for reports and kernel
selection, e.g. "conv+requantize+add".

Semantics are the body's, run by the reference interpreter: a group computes
the same integers as its nodes did unfused, by construction, so a fusion pass
can never change a value — only which nodes a kernel covers. Type inference
returns the body's output types (after checking that the operands match the
body's inputs); the verifier verifies the body too, and the printer shows it
indented under the fused node.

`fuse_nodes` builds a group from nodes of a graph; fusion passes use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..graph import Graph, Node, Value
from . import op


@op("fused", summary="a fused group: runs its `body` graph (the same integers as unfused)")
class Fused:
    """Attributes: `body` (Graph), `kind` (str: the pattern, for reports)."""

    def infer(ctx):
        body = ctx.attrs.get("body")
        if not isinstance(body, Graph):
            raise ctx.error("attribute `body` must be a Graph")
        if len(ctx.types) != len(body.inputs):
            raise ctx.error(f"{len(ctx.types)} operands for a body of {len(body.inputs)} inputs")
        for index, inner in enumerate(body.inputs):
            outer = ctx.type(index)
            if outer.dtype != inner.type.dtype or (
                outer.shape is not None
                and inner.type.shape is not None
                and outer.shape != inner.type.shape
            ):
                raise ctx.error(
                    f"operand {index} is {outer}, body input %{inner.name} is {inner.type}"
                )
        return [value.type for value in body.outputs]

    def evaluate(inputs, attrs):
        return _executor(attrs["body"]).run(list(inputs))


def _executor(body: Graph):
    """The body's reference executor, kept in its metadata while the body's
    nodes and their operands stay the same (the schedule is a topological
    sort: not free at every evaluation)."""
    from ...backends.reference import ReferenceExecutor

    def signature(schedule):
        return len(body), [(n, [id(v) for v in n.inputs]) for n in schedule if body.contains(n)]

    cached = body.metadata.get("_reference_executor")
    if cached is not None and signature(cached[0].schedule) == cached[1]:
        return cached[0]
    executor = ReferenceExecutor(body)
    body.metadata["_reference_executor"] = (executor, signature(executor.schedule))
    return executor


def fuse_nodes(graph: Graph, nodes: Sequence[Node], kind: str, name: str | None = None) -> Node:
    """Replace `nodes` (in topological order, a convex set: no path leaves the
    group and comes back) by one `fused` node named `name` (default: the
    first node's name) whose body holds copies of them.

    The group's outputs are the values read outside it or that are graph
    outputs; they keep their names, so graph outputs and readers see no
    change but the producer. Returns the fused node.
    """
    inside = set(nodes)
    name = name or nodes[0].name
    order = nodes[0].order
    outputs = [
        value
        for node in nodes
        for value in node.outputs
        if graph.is_output(value) or any(user not in inside for user in graph.users(value))
    ]
    produced = {id(value) for node in nodes for value in node.outputs}
    external: list[Value] = []
    for node in nodes:
        for value in node.inputs:
            if (
                value is not None
                and not value.is_constant
                and id(value) not in produced
                and all(value is not seen for seen in external)
            ):
                external.append(value)

    body = Graph(name)
    mapping: dict[int, Value] = {
        id(value): body.add_input(value.name, value.type) for value in external
    }
    for node in nodes:
        inputs = []
        for value in node.inputs:
            if value is not None and id(value) not in mapping:  # a constant
                mapping[id(value)] = body.constant(value.const, value.name)
            inputs.append(None if value is None else mapping[id(value)])
        copy = body.add_node(
            node.op,
            inputs,
            node.attrs,
            name=node.name,
            output_names=[value.name for value in node.outputs],
            output_types=[value.type for value in node.outputs],
        )
        mapping.update((id(old), new) for old, new in zip(node.outputs, copy.outputs))
    body.set_outputs([mapping[id(value)] for value in outputs])

    attrs = {"body": body, "kind": kind}
    names = [value.name for value in outputs]
    # Add the group, move the readers over, drop the nodes; then add it once
    # more so that it takes the freed node and value names.
    staging = graph.add_node("fused", external, attrs, name=f"{name}/staging")
    for old, new in zip(outputs, staging.outputs):
        graph.replace_all_uses(old, new)
    for node in reversed(nodes):
        graph.remove_node(node)
    fused = graph.add_node("fused", external, attrs, name=name, output_names=names)
    for old, new in zip(staging.outputs, fused.outputs):
        graph.replace_all_uses(old, new)
    graph.remove_node(staging)
    graph.place(fused, order)  # keep the group where its first node was in the printed order
    return fused
