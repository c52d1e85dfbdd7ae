"""Fusion across kernels: merges consecutive steps of the CPU plan whose
intermediate tensor need not exist.

One pattern today: a depthwise convolution whose output only a 1x1
convolution reads (MobileNet's depthwise -> project pair). Both are
channels-last kernels that requantize in their generated code; merged
(`conv_nhwc.DepthwisePointwise`), a band of depthwise output rows goes
straight into the pointwise GEMM as its A rows, so the intermediate tensor
never goes through memory, and the pair is one step (one hand-off to the
helper threads instead of two).

The pass runs on the executor's list of kernels, after lowering: it sees
the values each step reads and writes (`canonical` maps a fused body's
values to the plan's), and merges a pair only when the depthwise output has
no other reader and is not a graph output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ._lowering import Kernel
from .conv_nhwc import DepthwisePointwise


def fuse_depthwise_pointwise(steps: list[Kernel], canonical: Callable, outputs) -> list[Kernel]:
    """`steps` with each qualifying (depthwise, pointwise) pair replaced by one
    kernel at the pointwise step's position. `outputs`: the graph's output
    values (canonical)."""
    readers = Counter(id(canonical(v)) for step in steps for v in step.inputs)
    kept = {id(v) for v in outputs}
    producer = {id(canonical(v)): step for step in steps for v in step.outputs}
    merged: dict[int, Kernel] = {}  # by id of the pointwise step
    absorbed: set[int] = set()  # ids of the depthwise steps merged into one
    for pw in steps:
        if pw.stage is None or not pw.inputs:
            continue
        value = canonical(pw.inputs[0])
        dw = producer.get(id(value))
        if (
            dw is None or dw.stage is None or id(dw) in absorbed
            or readers[id(value)] != 1 or id(value) in kept
            or not DepthwisePointwise.pairs(dw.stage.layer, pw.stage.layer)
        ):  # fmt: skip
            continue
        merged[id(pw)] = _merge(dw, pw)
        absorbed.add(id(dw))
    return [merged.get(id(s), s) for s in steps if id(s) not in absorbed]


def _merge(dw: Kernel, pw: Kernel) -> Kernel:
    pair = DepthwisePointwise(dw.stage.layer, pw.stage.layer, dw.stage.ep)
    dw_stage, pw_stage = dw.stage, pw.stage
    launches: dict[tuple, tuple] = {}

    def launch(x_shape, other_shape) -> tuple:
        """Everything that depends on the input shapes (computed once per shape:
        a run pays a dict lookup, not two layers' geometry, per step)."""
        dw_geo, mid_shape, _, _, _, _, _, dw_prepared = dw_stage.launched(x_shape, None)
        geo, out_shape, _, sc_i, sc_f, _, _, _ = pw_stage.launched(mid_shape, other_shape)
        pair_launch = pair.prepare(dw_geo, geo, out_shape)
        return dw_geo, dw_prepared, pair_launch, geo, out_shape, sc_i, sc_f

    def run(x4, other=None):
        key = (x4.shape, None if other is None else other.shape)
        entry = launches.get(key)
        if entry is None:
            entry = launches[key] = launch(*key)
        dw_geo, dw_prepared, pair_launch, geo, out_shape, sc_i, sc_f = entry
        pw_stage.ep.check_other(other, out_shape)
        result = pair.run(
            x4, dw_geo, dw_prepared, dw_stage.ep, pair_launch, geo, pw_stage.ep, sc_i, sc_f,
            other, out_shape,
        )  # fmt: skip
        return [result]

    name = f"depthwise+pointwise[{dw.name} -> {pw.name}]"
    return Kernel(
        name, run, dw.inputs + pw.inputs[1:], pw.outputs, dw.nodes + pw.nodes, strided_inputs=True
    )
