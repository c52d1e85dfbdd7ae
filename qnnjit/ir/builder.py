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
