"""Adding nodes with compile-time evaluation: `emit` folds a node whose inputs
are all constant into constants (shape arithmetic, scale ratios, weight
transforms) — except `dequantize`, which stays visible so the compiler can keep
quantized weights in integers."""

from __future__ import annotations

import numpy as np

from . import ops
from .graph import Graph, Value

NOT_FOLDED = frozenset({"dequantize"})


def emit(graph: Graph, op: str, inputs, attrs=None, *, name: str) -> list[Value]:
    """Add `op` (or its folded result) to `graph`; returns the output values."""
    inputs = list(inputs)
    attrs = dict(attrs or {})
    present = [v for v in inputs if v is not None]
    if op not in NOT_FOLDED and present and all(v.is_constant for v in present):
        results = ops.evaluate(op, [v.const if v is not None else None for v in inputs], attrs)
        return [graph.constant(np.asarray(r), f"{name}_folded") for r in results]
    return graph.add_node(op, inputs, attrs, name=name).outputs


class LoweringContext:
    """What a lowering function (an ONNX converter) sees of the node it lowers:
    positional operands, attributes by name, and `emit` into the graph.

    The ONNX frontend lowers real ONNX nodes through it; the QDQ
    canonicalization pass lowers matched DQ->op->Q units through the very same
    converters, presenting each unit as the QOperator node it stands for.
    Subclasses say how errors name the culprit.
    """

    def __init__(self, graph: Graph, name: str, inputs: list, attrs: dict, opset: int):
        self.graph = graph
        self.name = name
        self.inputs = inputs
        self.attrs = attrs
        self.opset = opset
        self.created: list[Value] = []  # values this lowering made

    def input(self, index: int) -> Value | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def const(self, index: int, what: str) -> np.ndarray:
        value = self.input(index)
        if value is None or not value.is_constant:
            raise self.not_constant(index, what, value)
        return value.const

    def optional_const(self, index: int, what: str):
        return None if self.input(index) is None else self.const(index, what)

    def not_constant(self, index: int, what: str, value: Value | None) -> Exception:
        return self.error(f"operand {index} ({what}) must be a constant")

    def error(self, message: str) -> Exception:
        return ValueError(f"{self.name!r}: {message}")

    def constant(self, array, name: str = "c") -> Value:
        return self.graph.constant(array, f"{self.name}_{name}")

    def emit(self, op: str, inputs, attrs=None) -> list[Value]:
        """Add one IR node for this lowering (folded when all inputs are constant)."""
        outputs = emit(self.graph, op, inputs, attrs, name=self.name)
        self.created += outputs
        return outputs
