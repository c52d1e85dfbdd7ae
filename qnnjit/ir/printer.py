"""Deterministic text form of a graph: one line per node with its types, so a
person can see what the compiler did (and tests can compare text).

A graph-valued attribute (a `fused` node's `body`) is not printed inline: the
body follows its node, indented, as a nested graph with its own ops and types.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node, Value


def _format_attr(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, np.ndarray):
        if value.size <= 4:
            return np.array2string(value.reshape(-1), separator=",", precision=6)
        return f"<{value.dtype}{list(value.shape)}>"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_attr(v) for v in value) + "]"
    return str(value)


def _operand(value: Value | None) -> str:
    if value is None:
        return "_"
    if value.is_constant and value.const.size <= 4:
        data = np.array2string(value.const.reshape(-1), separator=",", precision=6)
        return f"%{value.name}={data}"
    return f"%{value.name}"


def _subgraphs(node: Node) -> list[tuple[str, Graph]]:
    return [(k, v) for k, v in sorted(node.attrs.items()) if isinstance(v, Graph)]


def format_node(node: Node) -> str:
    """The node's line (graph-valued attributes are left to `print_graph`)."""
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    args = ", ".join(_operand(v) for v in node.inputs)
    attrs = ", ".join(
        f"{k}={_format_attr(v)}" for k, v in sorted(node.attrs.items()) if not isinstance(v, Graph)
    )
    types = ", ".join(str(v.type) for v in node.outputs)
    attr_text = f" {{{attrs}}}" if attrs else ""
    return f"{outs} = {node.op}({args}){attr_text} : {types}"


def print_graph(graph: Graph, indent: str = "") -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    outs = ", ".join(f"%{v.name}" for v in graph.outputs)
    lines = [f"{indent}graph {graph.name}({ins}) -> ({outs}) {{"]
    large = [c for c in graph.constants if c.const.size > 4]
    for value in large:
        lines.append(f"{indent}  %{value.name} = constant : {value.type}")
    for node in graph.nodes:
        lines.append(f"{indent}  {format_node(node)}")
        for key, body in _subgraphs(node):
            text = print_graph(body, indent + "    ")
            if key != "body":  # name any other graph attribute before its graph
                text = text.replace("graph ", f"{key} = graph ", 1)
            lines.append(text)
    lines.append(f"{indent}}}")
    return "\n".join(lines)
