"""Data movement without arithmetic, in NumPy:

- shape-only ops (flatten, reshape, squeeze, unsqueeze, identity) as
  reshapes: nothing to compile and no copy for the contiguous arrays the
  kernels produce. The result shape is the reference semantics' own (its
  `evaluate` runs once per input shape), then cached, so a step costs one
  `reshape` call;
- concat and transpose: the reference semantics (`np.concatenate`, a
  contiguous `np.transpose`), which are single C loops over memory already.
  They are listed as copies in the plan, not as fallbacks: no number changes
  on the way, so there is no numerics to compile."""

from __future__ import annotations

from ....ir import ops
from ....ir.graph import Node
from ._lowering import Kernel, LowerContext, const_input, numpy_kernel

SHAPE_OPS = ("flatten", "reshape", "squeeze", "unsqueeze", "identity")
COPY_OPS = ("concat", "transpose")


def lower_view(node: Node, ctx: LowerContext) -> Kernel:
    for index in range(1, len(node.inputs)):
        const_input(node, index, "shape operand")  # Decline when not constant
    opdef = ops.get(node.op)
    template = [None if v is None else v.const for v in node.inputs]
    attrs = node.attrs
    if template[0] is not None:  # a constant operand: the result is a constant too
        result = opdef.evaluate(template, attrs)[0]
        return Kernel(f"view:{node.op}", lambda: [result], [], node.outputs, [node])
    shapes: dict[tuple, tuple] = {}

    def run(x):
        shape = shapes.get(x.shape)
        if shape is None:
            args = list(template)
            args[0] = x
            shape = shapes[x.shape] = opdef.evaluate(args, attrs)[0].shape
        return [x.reshape(shape)]

    return Kernel(f"view:{node.op}", run, [node.inputs[0]], node.outputs, [node])


def lower_copy(node: Node, ctx: LowerContext) -> Kernel:
    return numpy_kernel(node, "numpy-copy")
