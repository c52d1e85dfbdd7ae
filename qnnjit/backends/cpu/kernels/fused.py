"""`fused` nodes (compiler/passes/fuse_epilogues.py): the body graph is
compiled by a nested `CpuExecutor`, whose kernel-level fusion turns the
usual bodies (conv / matmul / reduce_sum + bias + requantize [+ qadd | qmul |
lookup]) into one kernel; any other body runs as a sequence of CPU kernels
(and, for ops without one, reference steps)."""

from __future__ import annotations

from ....ir.graph import Node
from ._lowering import Kernel, LowerContext


def lower_fused(node: Node, ctx: LowerContext) -> Kernel:
    from ..executor import CpuExecutor

    body = node.attrs["body"]
    inner = CpuExecutor(body, num_threads=ctx.num_threads)
    steps = "; ".join(step.name for step in inner.steps)
    fallback = inner.fallbacks()

    def run(*arrays):
        return inner.run(list(arrays))

    kind = node.attrs.get("kind", "?")
    note = f" (reference: {', '.join(fallback)})" if fallback else ""
    name = f"fused[{kind}]: {steps}{note}"
    return Kernel(name, run, list(node.inputs), node.outputs, [node])
