"""The reference interpreter: runs every node's registered NumPy semantics in
topological order. It is the numerics oracle: every other backend must match it
bit for bit, so it favours plainness over speed."""

from __future__ import annotations

import numpy as np

from ...errors import QnnjitError
from ...ir import ops
from ...ir.graph import Graph


class ReferenceExecutor:
    """Executes a graph; `run` maps input arrays (graph input order) to outputs."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.schedule = graph.nodes
        self.opdefs = [ops.get(node.op) for node in self.schedule]

    def run(self, arrays: list[np.ndarray], observe=None) -> list[np.ndarray]:
        """Run the graph. `observe(node, args, results)`, if given, sees every
        node's operands and results (for tools that study the numerics)."""
        env: dict[int, np.ndarray] = {}
        for value, array in zip(self.graph.inputs, arrays):
            env[id(value)] = array

        def read(value):
            if value is None:
                return None
            if value.is_constant:
                return value.const
            return env[id(value)]

        for node, opdef in zip(self.schedule, self.opdefs):
            args = [read(v) for v in node.inputs]
            try:
                results = opdef.evaluate(args, node.attrs)
            except QnnjitError:
                raise
            except Exception as exc:
                raise QnnjitError(
                    f"reference evaluation of node {node.name!r} ({node.op}) failed: {exc}"
                ) from exc
            if observe is not None:
                observe(node, args, results)
            for value, result in zip(node.outputs, results):
                result = np.asarray(result)
                if result.dtype != value.type.dtype.numpy:
                    raise QnnjitError(
                        f"node {node.name!r} ({node.op}) produced {result.dtype} for "
                        f"{value.name!r}, declared {value.type}"
                    )
                env[id(value)] = result
        return [read(v) for v in self.graph.outputs]
