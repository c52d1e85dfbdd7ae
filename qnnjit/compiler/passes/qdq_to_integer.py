"""QDQ canonicalization: DequantizeLinear -> op -> QuantizeLinear node units
become integer IR ops.

A QDQ model states its intent as float ops fenced by Q/DQ; what it *computes*
is decided by the runtime. qnnjit's ONNX preset defines it as ONNX Runtime's
optimized session does (the integer kernels its QDQ transformer fuses the
units into, docs/ort_numerics.md §9): each unit is re-expressed as the
QOperator node ORT would fuse it into (QLinearConv, QLinearMatMul, QGemm,
QLinearAdd, ...) and lowered by that node's converter — so the QDQ and the
QOperator form of a model compile to the same integer IR.

First, `quantize_float_biases` rounds the float bias of a Conv/Gemm between
DQs and a Q to int32, as ORT's WeightBiasQuantization does. Then the rules,
each anchored at a QuantizeLinear with constant parameters:

- `fuse_compute_unit`: Q(op(DQ(a), DQ(b), ...)) for op in COMPUTE_UNITS.
  Preconditions: every float operand comes from a DQ with constant scale and
  zero point, the op's output feeds only the Q, and
  for Conv/Gemm a bias is a DQ'd int32 constant whose scale equals x_s * w_s
  (the fused kernel adds the raw int32 bias to the accumulator, which equals
  the float graph only at that scale).
- `drop_qdq_around_data_movement`: Q(op(DQ(x))) with equal DQ/Q parameters for
  ops that commute with a monotone affine map (max pool, reshape, transpose...):
  `op` runs directly on the integers. Exact: the op only moves or selects
  values, and DQ/Q with equal parameters are inverse on every stored value.
- `drop_redundant_clip`: Q(relu(x)) / Q(clip(x)) -> Q(x) when the quantize's
  saturation implies the clamp (exact; ORT removes them too), so that the op
  before the clamp can form a unit with the Q.
- `remove_dq_q_pair`: Q(DQ(x)) with equal parameters is x (exact, as above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ... import numerics
from ...errors import ModelError
from ...ir import builder, dtypes
from ...ir.graph import Graph, Node, Value
from ..pattern import Matcher, Mismatch, RuleLog, apply_rules

# ---- the node units -------------------------------------------------------------


@dataclass(frozen=True)
class ComputeUnit:
    """How a float op's QDQ unit maps onto a QOperator op.

    `operands` lists, for each float input index, whether it is quantized
    ("q": needs a DQ) or a bias ("bias": an optional DQ'd int32 constant).
    `attrs` maps the QOperator op's attribute names to the float IR node's.
    """

    qop: str
    domain: str
    operands: tuple[str, ...]
    attrs: tuple[tuple[str, str], ...] = ()
    fixed_attrs: tuple[tuple[str, object], ...] = ()
    variadic: bool = False


COMPUTE_UNITS: dict[str, ComputeUnit] = {
    "conv": ComputeUnit(
        "QLinearConv", "", ("q", "q", "bias"),
        (("strides", "strides"), ("pads", "pads"), ("dilations", "dilations"), ("group", "group")),
    ),
    "matmul": ComputeUnit("QLinearMatMul", "", ("q", "q")),
    "gemm": ComputeUnit(
        "QGemm", "com.microsoft", ("q", "q", "bias"),
        (("alpha", "alpha"), ("transA", "trans_a"), ("transB", "trans_b")),
    ),
    "add": ComputeUnit("QLinearAdd", "com.microsoft", ("q", "q")),
    "mul": ComputeUnit("QLinearMul", "com.microsoft", ("q", "q")),
    "sigmoid": ComputeUnit("QLinearSigmoid", "com.microsoft", ("q",)),
    "leaky_relu": ComputeUnit("QLinearLeakyRelu", "com.microsoft", ("q",), (("alpha", "alpha"),)),
    "average_pool": ComputeUnit(
        "QLinearAveragePool", "com.microsoft", ("q",),
        (("kernel_shape", "kernel_shape"), ("strides", "strides"), ("pads", "pads"),
         ("count_include_pad", "count_include_pad"), ("ceil_mode", "ceil_mode")),
    ),
    "global_average_pool": ComputeUnit("QLinearGlobalAveragePool", "com.microsoft", ("q",)),
    "softmax": ComputeUnit(
        "QLinearSoftmax", "com.microsoft", ("q",), (("axis", "axis"),), (("opset", 13),)
    ),
    "concat": ComputeUnit("QLinearConcat", "com.microsoft", (), (("axis", "axis"),), variadic=True),
}  # fmt: skip

# Ops that only move or select values: they commute with DQ/Q of equal params.
DATA_MOVEMENT = frozenset(
    {"max_pool", "reshape", "flatten", "transpose", "squeeze", "unsqueeze", "slice", "gather",
     "expand", "global_max_pool", "identity"}
)  # fmt: skip


# ---- matching helpers -----------------------------------------------------------


@dataclass
class Dequantized:
    """A float operand that is DQ(q) with constant parameters."""

    node: Node
    q: Value
    scale: Value
    zero_point: Value | None


def quantize_params(m: Matcher, q_node: Node) -> tuple[Value, Value | None]:
    m.check(q_node.op == "quantize", f"{q_node.name} is not a quantize")
    scale, zero_point = q_node.input(1), q_node.input(2)
    m.constant(scale, f"scale of {q_node.name}")
    if zero_point is not None:
        m.constant(zero_point, f"zero point of {q_node.name}")
    m.check(q_node.outputs[0].type.dtype in (dtypes.uint8, dtypes.int8), "not an 8-bit quantize")
    m.check(not q_node.attrs.get("block_size"), "blocked quantization")
    m.check(q_node.attrs.get("clamp") is None, "quantize carries a clamp (activation fused)")
    return scale, zero_point


def dequantized(m: Matcher, value: Value | None) -> Dequantized:
    """`value` as DQ(q). The DQ may have other readers: like ONNX Runtime (which
    duplicates shared DQs before fusing), the unit reads q and leaves the DQ to
    its other readers (or to dead-code elimination)."""
    dq = m.producer(value, "dequantize")
    m.check(dq.outputs[0].type.dtype == dtypes.float32, f"{dq.name} is not float32")
    m.check(not dq.attrs.get("block_size"), f"{dq.name} is blocked")
    scale, zero_point = dq.input(1), dq.input(2)
    m.constant(scale, f"scale of {dq.name}")
    if zero_point is not None:
        m.constant(zero_point, f"zero point of {dq.name}")
    return Dequantized(dq, dq.inputs[0], scale, zero_point)


def same_params(a_scale, a_zp, b_scale, b_zp, a_dtype, b_dtype) -> bool:
    def zp(v):
        return np.zeros((), np.int64) if v is None else v.const.astype(np.int64)

    return (
        a_dtype == b_dtype
        and a_scale.const.dtype == b_scale.const.dtype
        and np.array_equal(a_scale.const, b_scale.const)
        and np.array_equal(zp(a_zp), zp(b_zp))
    )


def zero_point_or_default(graph: Graph, value: Value | None, dtype, name: str) -> Value:
    if value is not None:
        return value
    return graph.constant(np.zeros((), dtype.numpy), f"{name}_zero_point")


# ---- the lowering context --------------------------------------------------------


class UnitContext(builder.LoweringContext):
    """Presents a matched unit to a QOperator converter as if it were that ONNX
    node: positional operands, ONNX attribute names, and `emit`."""

    def error(self, message: str) -> ModelError:
        return ModelError(f"fused unit {self.name!r}: {message}")


def lower_as(graph: Graph, unit: ComputeUnit, name: str, inputs: list, attrs: dict) -> Value:
    from ...frontends.onnx import converters

    if converters.unsupported_reason(unit.domain, unit.qop, 1 if unit.domain else 21):
        raise Mismatch(f"no lowering for {unit.qop}")
    convert = converters.lookup(unit.domain, unit.qop, 1)
    ctx = UnitContext(graph, name, inputs, attrs, opset=21 if unit.domain == "" else 1)
    return convert(ctx)[0]


# ---- rules ------------------------------------------------------------------------


def fuse_compute_unit(m: Matcher, q_node: Node) -> None:
    y_scale, y_zp = quantize_params(m, q_node)
    op = m.producer(q_node.inputs[0], COMPUTE_UNITS)
    unit = COMPUTE_UNITS[op.op]
    m.sole_user(op.outputs[0])
    graph = m.graph
    out_dtype = q_node.outputs[0].type.dtype
    operands: list[Dequantized] = []
    kinds = ("q",) * len(op.inputs) if unit.variadic else unit.operands
    m.check(len(op.inputs) <= len(kinds), f"{op.name} has unexpected operands")
    for kind, value in zip(kinds, op.inputs):
        if kind == "q":
            operand = dequantized(m, value)
            m.check(operand.q.type.dtype in (dtypes.uint8, dtypes.int8), "not an 8-bit operand")
            operands.append(operand)
    if unit.qop in ("QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax",
                    "QLinearConcat"):  # fmt: skip
        m.check(
            all(o.q.type.dtype == out_dtype for o in operands), "operand and output types differ"
        )
    elif unit.qop == "QLinearMatMul":
        # ORT's MatMul selector: the activation and the output share a type; the
        # second operand may differ (u8 activations times s8 weights).
        m.check(operands[0].q.type.dtype == out_dtype, "operand and output types differ")
    for o in operands:
        if unit.qop not in ("QLinearConv", "QLinearMatMul", "QGemm") or o is operands[0]:
            m.check(o.scale.const.size == 1, f"{o.node.name} is not per-tensor")
        elif o.scale.const.size > 1:
            axis = _output_channel_axis(op, o.q.type.rank)
            m.check(
                o.node.attrs.get("axis", 1) == axis,
                f"{o.node.name} is per-channel along an axis other than the output channels",
            )
    bias = _bias(m, op, unit, operands)
    attrs = {
        onnx_name: op.attrs[ir_name] for onnx_name, ir_name in unit.attrs if ir_name in op.attrs
    }
    attrs.update(unit.fixed_attrs)
    if op.op == "gemm":
        m.check(op.attrs.get("beta", 1.0) == 1.0 or bias is None, "gemm with beta != 1 and a bias")

    def zp(o: Dequantized):
        return zero_point_or_default(graph, o.zero_point, o.q.type.dtype, o.node.name)

    y_zp = zero_point_or_default(graph, y_zp, out_dtype, q_node.name)
    if unit.variadic:
        inputs = [y_scale, y_zp]
        for o in operands:
            inputs += [o.q, o.scale, zp(o)]
    elif unit.qop == "QLinearConv":
        a, w = operands
        inputs = [a.q, a.scale, zp(a), w.q, w.scale, zp(w), y_scale, y_zp, bias]
    elif unit.qop == "QLinearMatMul":
        a, b = operands
        inputs = [a.q, a.scale, zp(a), b.q, b.scale, zp(b), y_scale, y_zp]
    elif unit.qop == "QGemm":
        a, b = operands
        inputs = [a.q, a.scale, zp(a), b.q, b.scale, zp(b), bias, y_scale, y_zp]
    elif len(operands) == 2:
        a, b = operands
        inputs = [a.q, a.scale, zp(a), b.q, b.scale, zp(b), y_scale, y_zp]
    else:
        (a,) = operands
        inputs = [a.q, a.scale, zp(a), y_scale, y_zp]
    result = lower_as(graph, unit, op.name, inputs, attrs)
    graph.replace_all_uses(q_node.outputs[0], result)


def _output_channel_axis(op: Node, rank: int | None) -> int | None:
    """The weight axis that indexes output channels: the axis a per-channel
    weight scale must run along for the integer kernel to apply it per output
    channel (conv: M of [M, C/g, k...]; matmul: the columns of b; gemm: N)."""
    if op.op == "conv":
        return 0
    if op.op == "gemm":
        return 0 if op.attrs.get("trans_b") else 1
    return None if rank is None else rank - 1


def _bias(m: Matcher, op: Node, unit: ComputeUnit, operands) -> Value | None:
    if "bias" not in unit.operands:
        return None
    index = unit.operands.index("bias")
    if op.input(index) is None:
        return None
    if op.op == "gemm":
        m.check(op.attrs.get("beta", 1.0) == 1.0, "gemm bias with beta != 1")
    b = dequantized(m, op.input(index))
    m.check(b.q.is_constant and b.q.type.dtype == dtypes.int32, "bias is not an int32 constant")
    x, w = operands
    expected = (x.scale.const.astype(np.float32) * w.scale.const.astype(np.float32)).reshape(-1)
    actual = b.scale.const.astype(np.float32).reshape(-1)
    m.check(
        actual.shape == expected.shape or actual.size == 1,
        "bias scale shape differs from x_scale * w_scale",
    )
    m.check(np.array_equal(np.broadcast_to(actual, expected.shape), expected),
            "bias scale is not x_scale * w_scale")  # fmt: skip
    m.check(b.zero_point is None or not np.any(b.zero_point.const), "bias zero point is not 0")
    return b.q


def drop_qdq_around_data_movement(m: Matcher, q_node: Node) -> None:
    y_scale, y_zp = quantize_params(m, q_node)
    op = m.producer(q_node.inputs[0], DATA_MOVEMENT)
    m.sole_user(op.outputs[0])
    m.check(len(op.outputs) == 1, f"{op.name} has several outputs")
    x = dequantized(m, op.inputs[0])
    out_dtype = q_node.outputs[0].type.dtype
    m.check(
        same_params(x.scale, x.zero_point, y_scale, y_zp, x.q.type.dtype, out_dtype),
        "DQ and Q parameters differ",
    )
    for other in op.inputs[1:]:
        m.check(other is None or other.is_constant, f"{op.name} has a non-constant operand")
    node = m.graph.add_node(
        op.op, [x.q, *op.inputs[1:]], op.attrs, name=op.name,
        output_types=[q_node.outputs[0].type.with_shape(op.outputs[0].type.shape)],
    )  # fmt: skip
    m.graph.replace_all_uses(q_node.outputs[0], node.outputs[0])


def drop_redundant_clip(m: Matcher, q_node: Node) -> None:
    """Q(relu(x)) or Q(clip(x, lo, hi)) -> Q(x) when the quantize's saturation
    already implies the clamp: relu with zero point == qmin, clip with
    Q(lo) == qmin and Q(hi) == qmax (an absent bound counts as satisfied).

    Exact for every x: Q is monotone, so Q(x) <= Q(lo) == qmin for x < lo
    (and symmetrically above hi), and clip passes NaN through as Q does. ONNX
    Runtime removes the same nodes (ReluQuantFusion / ClipQuantFusion, and
    the QDQ selectors' "redundant clip"), so the op before the clamp can then
    form a QDQ unit with the quantize."""
    y_scale, y_zp = quantize_params(m, q_node)
    act = m.producer(q_node.inputs[0], ("relu", "clip"))
    m.check(y_scale.const.size == 1, f"{q_node.name} is not per-tensor")
    m.check(not q_node.attrs.get("clamp"), f"{q_node.name} already clamps")
    x = act.inputs[0]
    m.check(x.type.dtype == dtypes.float32, f"{act.name} is not float32")
    dtype = q_node.outputs[0].type.dtype
    zp = 0 if y_zp is None else int(y_zp.const.reshape(()))
    if act.op == "relu":
        m.check(zp == dtype.qmin, f"{act.name}: zero point {zp} is not {dtype}'s minimum")
    else:
        from ...ir import ops

        def quantized(bound) -> int:
            args = [np.asarray(bound, np.float32), y_scale.const]
            args += [] if y_zp is None else [y_zp.const]
            return int(ops.evaluate("quantize", args, q_node.attrs)[0].reshape(()))

        lo, hi = act.attrs.get("min"), act.attrs.get("max")
        m.check(lo is None or quantized(lo) == dtype.qmin, f"{act.name}: min is inside the range")
        m.check(hi is None or quantized(hi) == dtype.qmax, f"{act.name}: max is inside the range")
    m.graph.set_input(q_node, 0, x)


def remove_dq_q_pair(m: Matcher, q_node: Node) -> None:
    y_scale, y_zp = quantize_params(m, q_node)
    dq = m.producer(q_node.inputs[0], "dequantize")
    x, scale, zero_point = dq.input(0), dq.input(1), dq.input(2)
    m.constant(scale, f"scale of {dq.name}")
    m.check(zero_point is None or zero_point.is_constant, f"zero point of {dq.name}")
    m.check(not dq.attrs.get("block_size") and scale.const.size == 1, "not per-tensor")
    m.check(
        same_params(scale, zero_point, y_scale, y_zp, x.type.dtype, q_node.outputs[0].type.dtype),
        "DQ and Q parameters differ",
    )
    m.graph.replace_all_uses(q_node.outputs[0], x)


RULES = [fuse_compute_unit, drop_redundant_clip, drop_qdq_around_data_movement, remove_dq_q_pair]


def _path_to_quantize(graph: Graph, node: Node) -> bool:
    """Whether `node`'s output reaches a quantize through a chain of sole
    readers that are relu / clip (ORT's IsNoBranchPathToQuantizeLinear)."""
    while True:
        if len(node.outputs) != 1 or graph.is_output(node.outputs[0]):
            return False
        users = graph.users(node.outputs[0])
        if len(users) != 1:
            return False
        if users[0].op == "quantize":
            return True
        if users[0].op not in ("relu", "clip"):
            return False
        node = users[0]


def quantize_float_biases(graph: Graph, log: RuleLog) -> bool:
    """Conv / Gemm with a dequantized input, a dequantized weight and a float
    constant 1-D bias, on a path to a quantize: the bias becomes
    DQ(int32(rne(f32(bias / f32(x_s * w_s)))), f32(x_s * w_s)).

    This is ONNX Runtime's WeightBiasQuantization (basic level), which is
    what lets it fuse such units into QLinearConv / QGemm (PyTorch PT2E
    exports keep float biases). It changes the bias to the nearest multiple
    of the accumulator scale; as ORT computes with that bias, fused or not,
    so does qnnjit. Conditions as ORT's: x per-tensor, w per-tensor or per
    output channel (conv axis 0, gemm axis 1, or 0 with trans_b), one bias
    entry per channel."""
    changed = False
    for node in list(graph.nodes):
        if node.op not in ("conv", "gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        x_dq, w_dq, bias = node.inputs[0].producer, node.inputs[1].producer, node.inputs[2]
        if x_dq is None or x_dq.op != "dequantize" or w_dq is None or w_dq.op != "dequantize":
            continue
        x_scale, w_scale = x_dq.input(1), w_dq.input(1)
        if not (x_scale.is_constant and w_scale.is_constant and bias.is_constant):
            continue
        b = bias.const
        if b.dtype != np.float32 or b.ndim != 1 or x_scale.const.size != 1:
            continue
        if w_dq.attrs.get("block_size") or not _path_to_quantize(graph, node):
            continue
        ws = w_scale.const.astype(np.float32)
        if ws.size > 1:
            rank = node.inputs[1].type.rank
            if ws.size != b.size or w_dq.attrs.get("axis", 1) != _output_channel_axis(node, rank):
                continue
        x_s = x_scale.const.astype(np.float32).reshape(())
        bias_scale = (x_s * ws.reshape(-1)).astype(np.float32)
        bias_scale = bias_scale.reshape(()) if ws.size == 1 else bias_scale
        with np.errstate(all="ignore"):
            q = numerics.cvtps2dq((b / bias_scale).astype(np.float32)).astype(np.int32)
        q_value = graph.constant(q, f"{node.name}_bias_int32")
        s_value = graph.constant(bias_scale, f"{node.name}_bias_scale")
        attrs = {"axis": 0, "block_size": 0, "dtype": dtypes.float32}
        (dq,) = builder.emit(
            graph, "dequantize", [q_value, s_value], attrs, name=f"{node.name}_bias_dq"
        )
        graph.set_input(node, 2, dq)
        log.applied.append(f"quantize_float_bias at {node.name}")
        changed = True
    return changed


def _quantize_nodes(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "quantize"]


def qdq_to_integer(graph: Graph, log: RuleLog | None = None) -> bool:
    """Rewrite every QDQ node unit that has an integer form; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("qdq_log", RuleLog())
    changed = quantize_float_biases(graph, log)
    while apply_rules(graph, _quantize_nodes, RULES, log):
        changed = True  # a fused unit may expose the next (DQ -> Q chains)
    return changed


__all__ = ["COMPUTE_UNITS", "DATA_MOVEMENT", "Mismatch", "qdq_to_integer"]
