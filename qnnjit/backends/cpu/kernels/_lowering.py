"""What a CPU lowering receives and returns, and the epilogue chains it may absorb.

A lowering is `lower(node, ctx) -> Kernel` registered as
`ops.get(op).lowerings["cpu"]`. It runs once, at compile time: it reads the
node's constant operands (weights, zero points, multipliers), prepares them
(prepacked weights, zero-point terms folded into a per-channel constant) and
returns a `Kernel`, a closure over those arrays and one compiled Numba
function. Anything it cannot do exactly it refuses with `Decline(reason)`;
the executor then runs the node's reference semantics and lists it, with the
reason, in the report.

Epilogue chains (kernel-level fusion). An accumulating node (`qconv`,
`qmatmul`, `qreduce_sum`) may be followed by

    [add(acc, int32 constant)]  ->  requantize  ->  [qadd | qmul | lookup]
                                                      [-> clip | lookup after qadd / qmul]

where every intermediate value has exactly one reader, the next node of the
chain, and is not a graph output. Then one kernel computes the whole chain
per output element and no intermediate tensor (in particular no int32
accumulator) is written to memory. The same chain shape is what
`compiler/passes/fuse_epilogues.py` groups into a `fused` node; the executor
finds it both in the flat graph and inside a fused node's body. A kernel may
absorb a prefix of the chain only (`Kernel.nodes` says which nodes it covers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ....ir.graph import Graph, Node, Value

POST_OPS = {"qadd": (0, 3), "qmul": (0, 3), "lookup": (0,)}


class Decline(Exception):
    """A lowering cannot compile this node exactly; the message says why."""


@dataclass
class Kernel:
    """One step of the execution plan: `run(*arrays)` takes the arrays of
    `inputs` (run-time values, in order) and returns one array per value of
    `outputs`. `nodes` are the IR nodes it computes, `name` says how.

    Arrays arrive C-contiguous unless `strided_inputs`: a kernel that reads
    channels-last memory through transposed views (`layout`) says so, and
    the executor then passes its operands as they are. `stage`: what
    `step_fusion` needs to merge this step with a neighbour (None: it never
    merges)."""

    name: str
    run: Callable[..., list[np.ndarray]]
    inputs: list[Value]
    outputs: list[Value]
    nodes: list[Node]
    strided_inputs: bool = False
    stage: object = None


@dataclass
class Chain:
    """The epilogue nodes after an anchor (each None when absent)."""

    bias: Node | None = None
    requantize: Node | None = None
    post: Node | None = None
    clip: Node | None = None  # an integer clip of the post op's codes
    table: Node | None = None  # ... or a lookup of them (`build_epilogue`'s final_table)
    reasons: list[str] = field(default_factory=list)  # why the chain stops where it does

    @property
    def nodes(self) -> list[Node]:
        parts = (self.bias, self.requantize, self.post, self.clip, self.table)
        return [n for n in parts if n is not None]


@dataclass
class LowerContext:
    """What a lowering may ask about the graph around its node."""

    graph: Graph
    num_threads: int = 1
    taken: set = field(default_factory=set)  # nodes already covered by a kernel

    def sole_reader(self, value: Value) -> tuple[Node | None, str]:
        if self.graph.is_output(value):
            return None, f"{value.name} is a graph output"
        users = self.graph.users(value)
        if len(users) != 1:
            return None, f"{value.name} has {len(users)} readers"
        if users[0] in self.taken:
            return None, f"{users[0].name} is computed by another kernel"
        return users[0], ""

    def chain_after(self, anchor: Node, *, start: str = "acc") -> Chain:
        """The epilogue chain after `anchor`'s single output. `start="acc"`:
        anchor makes an accumulator ([bias] -> requantize -> [post]);
        `start="requantize"`: anchor is a requantize ([post] only)."""
        chain = Chain()
        value = anchor.outputs[0]
        if start == "acc":
            user, why = self.sole_reader(value)
            if user is not None and user.op == "add" and _is_bias_add(user, value):
                chain.bias = user
                value = user.outputs[0]
                user, why = self.sole_reader(value)
            if user is None:
                chain.reasons.append(why)
                return chain
            if not (
                user.op == "requantize"
                and user.inputs[0] is value
                and all(v is not value for v in user.inputs[1:])
            ):
                chain.reasons.append(f"{value.name} is read by {user.op}, not requantize")
                return chain
            chain.requantize = user
            value = user.outputs[0]
        user, why = self.sole_reader(value)
        if user is None:
            chain.reasons.append(why)
            return chain
        data = POST_OPS.get(user.op)
        if data is None:
            chain.reasons.append(f"{value.name} is read by {user.op}")
            return chain
        if not all(i in data for i, v in enumerate(user.inputs) if v is value):
            chain.reasons.append(f"{user.name} reads {value.name} as a parameter")
            return chain
        chain.post = user
        y = user.outputs[0]
        user, _ = self.sole_reader(y)
        if user is not None and user.op == "clip" and user.inputs[0] is y:
            chain.clip = user
        elif (
            user is not None and user.op == "lookup" and chain.post.op in ("qadd", "qmul")
            and user.inputs[0] is y and all(v is not y for v in user.inputs[1:])
        ):  # fmt: skip
            chain.table = user
        return chain


def _is_bias_add(node: Node, value: Value) -> bool:
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    return (
        len(node.inputs) == 2
        and other is not None
        and other is not value
        and other.is_constant
        and other.const.dtype == np.int32
        and node.outputs[0].type.dtype == value.type.dtype
    )


def const_input(node: Node, index: int, what: str) -> np.ndarray | None:
    """The constant array of operand `index` (None if absent); Decline if it is
    a run-time value."""
    value = node.input(index)
    if value is None:
        return None
    if not value.is_constant:
        raise Decline(f"{what} of {node.name} is not a compile-time constant")
    return value.const


def clip_bounds(clip: Node, dtype) -> tuple[int, int]:
    """An integer clip's (lo, hi) as the reference takes them: each bound cast
    to the codes' type (`astype`, C conversion; absent: the type's limit),
    then applied max first, min second."""
    return tuple(
        default if clip.attrs.get(key) is None
        else int(np.asarray(clip.attrs[key]).astype(dtype.numpy))
        for key, default in (("min", dtype.qmin), ("max", dtype.qmax))
    )  # fmt: skip


def static_shape(value: Value) -> tuple | None:
    shape = value.type.shape
    if shape is None:
        return None
    return tuple(shape)


def numpy_kernel(node: Node, label: str) -> Kernel:
    """A step that runs the node's registered NumPy semantics (constants bound
    once here, run-time operands passed in). Serves both the reference fallback
    and the data-movement ops NumPy already does as fast as a kernel would."""
    from ....ir import ops

    opdef = ops.get(node.op)
    template = [None if v is None else (v.const if v.is_constant else None) for v in node.inputs]
    runtime = [i for i, v in enumerate(node.inputs) if v is not None and not v.is_constant]
    attrs = node.attrs

    def run(*arrays):
        args = list(template)
        for index, array in zip(runtime, arrays):
            args[index] = array
        return [np.asarray(r) for r in opdef.evaluate(args, attrs)]

    inputs = [node.inputs[i] for i in runtime]
    return Kernel(f"{label}:{node.op}", run, inputs, node.outputs, [node])
