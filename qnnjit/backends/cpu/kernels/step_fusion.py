"""Fusion across kernels: merges consecutive steps of the CPU plan whose
intermediate tensors need not exist.

- A depthwise convolution whose output only a 1x1 convolution reads
  (MobileNet's depthwise -> project pair). Both are channels-last kernels
  that requantize in their generated code; merged
  (`conv_nhwc.DepthwisePointwise`), a band of depthwise output rows goes
  straight into the pointwise GEMM as its A rows, so the intermediate tensor
  never goes through memory, and the pair is one step (one hand-off to the
  helper threads instead of two).
- dequantize -> layer_norm -> quantize (a QDQ transformer's every layer
  norm): one kernel from codes to codes (`normalize.layer_norm_mlas_codes`),
  the float tensors only row buffers (ViT-Tiny's five: about 46 us each as
  three steps, 41 us as one; and two float tensors fewer in memory).

The pass runs on the executor's list of kernels, after lowering: it sees
the values each step reads and writes (`canonical` maps a fused body's
values to the plan's), and merges steps only when the tensors between them
have no other reader and are not graph outputs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from ._lowering import Kernel
from .conv import ConvStage
from .conv_nhwc import DepthwisePointwise
from .normalize import LayerNormStage, layer_norm_on_codes
from .quantize import DequantizeStage, QuantizeStage


def fuse_steps(steps: list[Kernel], canonical: Callable, outputs) -> list[Kernel]:
    """Every fusion of the module doc, on the executor's `steps`."""
    steps = fuse_depthwise_pointwise(steps, canonical, outputs)
    return fuse_quantized_layer_norms(steps, canonical, outputs)


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
        if not isinstance(pw.stage, ConvStage) or not pw.inputs:
            continue
        value = canonical(pw.inputs[0])
        dw = producer.get(id(value))
        if (
            dw is None or not isinstance(dw.stage, ConvStage) or id(dw) in absorbed
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


def fuse_quantized_layer_norms(steps: list[Kernel], canonical: Callable, outputs) -> list[Kernel]:
    """`steps` with each (dequantize, layer_norm, quantize) chain whose float
    tensors (and the layer norm's mean and 1/std) nothing else reads
    replaced by one kernel at the quantize step's position."""
    readers = Counter(id(canonical(v)) for step in steps for v in step.inputs)
    kept = {id(v) for v in outputs}
    producer = {id(canonical(v)): step for step in steps for v in step.outputs}
    reader = {id(canonical(v)): step for step in steps for v in step.inputs}

    def sole_reader(value) -> Kernel | None:
        key = id(canonical(value))
        return reader[key] if readers[key] == 1 and key not in kept else None

    merged: dict[int, Kernel] = {}  # by id of the quantize step
    absorbed: set[int] = set()
    for ln in steps:
        if not isinstance(ln.stage, LayerNormStage) or len(ln.outputs) != 3:
            continue
        norm = (ln.inputs[0].type.shape or ())[ln.stage.axis :]
        if all(isinstance(d, int) for d in norm) and math.prod(norm) < 8:
            continue  # rows the reference normalizes in two passes: no codes kernel
        dq = producer.get(id(canonical(ln.inputs[0])))
        q = sole_reader(ln.outputs[0])
        if (
            dq is None or not isinstance(dq.stage, DequantizeStage)
            or sole_reader(dq.outputs[0]) is not ln
            or q is None or not isinstance(q.stage, QuantizeStage)
            or any(readers[id(canonical(v))] or id(canonical(v)) in kept for v in ln.outputs[1:])
        ):  # fmt: skip
            continue
        merged[id(q)] = _merge_layer_norm(dq, ln, q)
        absorbed.update((id(dq), id(ln)))
    return [merged.get(id(s), s) for s in steps if id(s) not in absorbed]


def _merge_layer_norm(dq: Kernel, ln: Kernel, q: Kernel) -> Kernel:
    def run(codes):
        out = layer_norm_on_codes(ln.stage, dq.stage, q.stage, codes)
        if out is None:  # (a symbolic row length under 8) the two-pass steps as they are
            return q.run(ln.run(dq.run(codes)[0])[0])
        return [out]

    name = f"dequantize+layer_norm+quantize[{ln.name}]"
    return Kernel(name, run, dq.inputs, q.outputs, dq.nodes + ln.nodes + q.nodes)
