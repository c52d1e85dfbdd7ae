"""Fold inference BatchNormalization into the conv / gemm / matmul before it.

`batch_norm` is a per-channel affine map (channel axis 1):

    BN(y) = (y - μ) / σ · γ + β = y·g + (β - μ·g),   σ = sqrt(var + ε),  g = γ/σ

and conv, gemm and matmul are linear in their weight with one weight slice per
output channel, so the map moves into the weight and the bias:

    BN(conv(x, W) + B) = conv(x, W') + B',   W'[c] = W[c]·g[c],  B' = (B - μ)·g + β

Rules, each anchored at a `batch_norm` whose parameters are compile-time
constants (constants, or `dequantize` of constants) with var + ε > 0 and one
entry per output channel, and whose operand is made by a node read only by it:

- `fold_into_conv`: float conv with a constant weight W[M, C/group, k...]. The
  output channel is axis 0 of W for every `group` (depthwise included).
- `fold_into_gemm`: gemm(A, W, C) with a constant W; BN's channel axis is the
  gemm's output column n (W's axis 1, or 0 with trans_b):
  W'[:, n] = W[:, n]·g[n], C' = (beta·C - μ)·g + β, beta' = 1 (alpha stays).
- `fold_into_matmul`: matmul(A, W) with a constant 2-D W and a 2-D output, so
  that BN's channel axis is W's axis 1: matmul(A, W') + (β - μ·g) (the BN
  becomes a bias `add`). A batched output's axis 1 is not the features: kept.
- `fold_into_quantized_conv`: the QDQ form DQ(x), DQ(w_int, s, zp), [bias] ->
  conv -> batch_norm [-> Q]. The weight is integer, so g moves into its
  dequantization scale, per output channel (a per-tensor scale becomes
  per-channel, axis 0):

      (w - zp)·s·g = (w' - zp)·s'   with  s' = s·|g|,  w' = w if g > 0,
                                                   w' = 2·zp - w if g < 0

  exact in real arithmetic. Negation is exact unless 2·zp - w leaves the
  storage range (w = -128 with zp = 0 in int8, whose negation 128 is not an
  int8): then the rule does not fire. g = 0 would need a zero scale: kept.
  The weight must be quantized per tensor or along axis 0 (not blocked).

Not folded: BN after a quantized conv output (conv -> Q -> DQ -> BN, what
ONNX Runtime's quantizer writes when it quantizes the BN itself): folding
would drop the rounding step of that Q, which the model computes. QDQ gemm /
matmul (a DQ'd weight) are not folded yet: the scale fold would be the same
along their output-feature axis, but no model at hand needs it.

Preconditions shared by all rules, each a check with a reason: the producer's
output is read only by the BN; the weight (and bias) operand is read by no
node outside the match, so the fold never has to duplicate a weight (the new
weights are always new constants; nothing is overwritten).

Numerics (the docstring's promise, DESIGN.md "Numerics"):

- Float rules: W', B', C' are computed in float64 from the parameters as
  written above and rounded once to the weight's type. The unfolded graph
  rounds in float32 after each of conv, subtract, divide, multiply and add;
  the folded one rounds W' and B' and then runs one conv. Both approximate
  the same real-valued function: outputs agree to float32 rounding, not bit
  for bit (no rewrite that reassociates float arithmetic can promise that);
  the tests compare bit for bit with a graph folded by these formulas.
- Quantized conv: the unfolded unit DQ -> conv -> BN -> Q computes in float32
  (the canonicalization cannot make a conv followed by BN integer), so
  "bit-identical" has no integer reference to be identical to. When the BN's
  only reader is an 8-bit `quantize` and x comes from a per-tensor DQ (the
  unit will become an integer qconv + requantize), the new bias is an int32
  multiple of the scale the canonicalization requires, b_q' = round_half_even
  (B' / (x_s·s')) with x_s·s' the float32 product, as ONNX Runtime's
  quantizer quantizes every conv bias. What is then preserved exactly: the
  integer weights up to that exact negation, every zero point, the output's
  quantization (Q's scale and zero point, its rounding and saturation), and
  the real-valued function of the unit. What changes: s' is rounded to
  float32 (relative error 2^-24), the bias to within half an accumulator unit
  (x_s·s'/2), and the accumulation becomes exact int32 with one rounding in
  the requantization, instead of float32 rounding in the conv's sums and in
  each of BN's four operations. Both forms are within
  a small fraction of an output LSB of the real-valued result, so the
  quantized outputs differ by at most 1 LSB, only where that result lies
  that close to a rounding boundary (the tests assert <= 1 LSB, >= 99% exact).
  Otherwise (no Q, or x not DQ'd) the conv stays float and the bias stays a
  float constant B', rounded once from float64: exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir import dtypes, ops
from ...ir.graph import Graph, Node, Value
from ..pattern import Matcher, RuleLog, apply_rules

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# ---- matching helpers ------------------------------------------------------------


def compile_time(m: Matcher, value: Value | None, what: str) -> np.ndarray:
    """The value of a constant, or of `dequantize` of constants (kept as a node
    before QDQ canonicalization; evaluated here as the interpreter would)."""
    m.check(value is not None, f"{what} is absent")
    if value.is_constant:
        return value.const
    dq = value.producer
    m.check(
        dq is not None
        and dq.op == "dequantize"
        and all(v is None or v.is_constant for v in dq.inputs),
        f"{what} is not a compile-time constant",
    )
    return ops.evaluate("dequantize", [v if v is None else v.const for v in dq.inputs], dq.attrs)[0]


def private(m: Matcher, value: Value, reader: Node, what: str):
    """`value` is read by `reader` only: folding never duplicates or changes
    what another node reads."""
    others = sorted({n.name for n in m.graph.users(value)} - {reader.name})
    m.check(not m.graph.is_output(value), f"{what} {value.name} is a graph output")
    m.check(not others, f"{what} {value.name} is shared with {', '.join(others)}")


@dataclass
class BatchNormAffine:
    """BN(y) = (y - mean)·g + beta along axis 1, in float64."""

    g: np.ndarray
    mean: np.ndarray
    beta: np.ndarray

    def bias(self, b) -> np.ndarray:
        """B' = (B - μ)·g + β."""
        return (np.asarray(b, np.float64) - self.mean) * self.g + self.beta


def batchnorm_affine(m: Matcher, bn: Node, channels: int) -> BatchNormAffine:
    gamma, beta, mean, var = (
        compile_time(m, bn.input(i), f"BN {what}").astype(np.float64).reshape(-1)
        for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))
    )
    m.check(
        all(p.size in (1, channels) for p in (gamma, beta, mean, var)),
        f"BN parameters do not have one entry per output channel ({channels})",
    )
    gamma, beta, mean, var = (np.broadcast_to(p, (channels,)) for p in (gamma, beta, mean, var))
    with np.errstate(all="ignore"):
        variance = var + np.float64(bn.attrs["epsilon"])
        m.check(bool(np.all(variance > 0)), "BN var + epsilon is not positive")
        g = gamma / np.sqrt(variance)
    affine = BatchNormAffine(g, mean, beta)
    m.check(
        bool(np.all(np.isfinite(g)) and np.all(np.isfinite(affine.bias(0)))),
        "BN parameters are not finite",
    )
    return affine


def producer_read_only_by_bn(m: Matcher, bn: Node, kinds: str | tuple[str, ...]) -> Node:
    node = m.producer(bn.inputs[0], kinds)
    m.check(len(node.outputs) == 1, f"{node.name} has several outputs")
    m.sole_user(node.outputs[0])  # the BN
    return node


def constant_weight(m: Matcher, node: Node, index: int, what: str) -> np.ndarray:
    value = node.input(index)
    weight = m.constant(value, what)
    m.check(value.type.dtype.is_float, f"{what} is {value.type.dtype}, not a float")
    private(m, value, node, what)
    return weight


def replace_bn(graph: Graph, bn: Node, result: Value):
    """Readers of the BN (graph outputs included) read `result`, which takes
    the BN output's name."""
    name = bn.outputs[0].name
    graph.replace_all_uses(bn.outputs[0], result)
    graph.remove_node(bn)
    graph.rename(result, name)


def _per_channel(g: np.ndarray, rank: int, axis: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return g.reshape(shape)


# ---- float rules -------------------------------------------------------------------


def fold_into_conv(m: Matcher, bn: Node) -> None:
    # W'[c] = W[c]·g[c], B' = (B - μ)·g + β; W's axis 0 is the output channel for any group.
    conv = producer_read_only_by_bn(m, bn, "conv")
    w = constant_weight(m, conv, 1, f"weight of {conv.name}")
    bn_ = batchnorm_affine(m, bn, w.shape[0])
    b = np.zeros(()) if conv.input(2) is None else constant_weight(m, conv, 2, "conv bias")
    graph = m.graph
    w_new = graph.constant(
        (w.astype(np.float64) * _per_channel(bn_.g, w.ndim, 0)).astype(w.dtype), f"{conv.name}_w"
    )
    b_new = graph.constant(bn_.bias(b).astype(w.dtype), f"{conv.name}_b")
    node = graph.add_node("conv", [conv.inputs[0], w_new, b_new], conv.attrs, name=conv.name)
    replace_bn(graph, bn, node.outputs[0])


def fold_into_gemm(m: Matcher, bn: Node) -> None:
    # Y = alpha·A·op(W) + beta·C: op(W)[:, n]·g[n], C' = (beta·C - μ)·g + β, beta' = 1.
    gemm = producer_read_only_by_bn(m, bn, "gemm")
    w = constant_weight(m, gemm, 1, f"weight of {gemm.name}")
    axis = 0 if gemm.attrs["trans_b"] else 1
    bn_ = batchnorm_affine(m, bn, w.shape[axis])
    beta = gemm.attrs.get("beta", 1.0)
    c = np.zeros(())
    if gemm.input(2) is not None and beta != 0.0:
        c = np.float64(beta) * constant_weight(m, gemm, 2, "gemm C").astype(np.float64)
    graph = m.graph
    w_new = graph.constant(
        (w.astype(np.float64) * _per_channel(bn_.g, 2, axis)).astype(w.dtype), f"{gemm.name}_w"
    )
    c_new = graph.constant(bn_.bias(c).astype(w.dtype), f"{gemm.name}_c")
    attrs = dict(gemm.attrs, beta=1.0)
    node = graph.add_node("gemm", [gemm.inputs[0], w_new, c_new], attrs, name=gemm.name)
    replace_bn(graph, bn, node.outputs[0])


def fold_into_matmul(m: Matcher, bn: Node) -> None:
    # (A @ W)[:, n] -> A @ W' + (β - μ·g) with W'[:, n] = W[:, n]·g[n]; 2-D output only.
    matmul = producer_read_only_by_bn(m, bn, "matmul")
    rank = matmul.outputs[0].type.rank
    m.check(rank == 2, f"matmul output has rank {rank}: BN's axis 1 is not its features")
    w = constant_weight(m, matmul, 1, f"weight of {matmul.name}")
    m.check(w.ndim == 2, f"matmul weight has rank {w.ndim}, not 2")
    bn_ = batchnorm_affine(m, bn, w.shape[1])
    graph = m.graph
    w_new = graph.constant(
        (w.astype(np.float64) * bn_.g.reshape(1, -1)).astype(w.dtype), f"{matmul.name}_w"
    )
    b_new = graph.constant(bn_.bias(0).astype(w.dtype), f"{matmul.name}_b")
    product = graph.add_node("matmul", [matmul.inputs[0], w_new], name=matmul.name).outputs[0]
    node = graph.add_node("add", [product, b_new], name=f"{matmul.name}_bias")
    replace_bn(graph, bn, node.outputs[0])


# ---- the QDQ rule --------------------------------------------------------------------


def fold_into_quantized_conv(m: Matcher, bn: Node) -> None:
    # (w - zp)·s·g = (w' - zp)·s', s' = s·|g|, w' = w (g > 0) or 2·zp - w (g < 0).
    conv = producer_read_only_by_bn(m, bn, "conv")
    graph = m.graph
    w_dq = m.producer(conv.input(1), "dequantize")
    private(m, w_dq.outputs[0], conv, "dequantized weight")
    w_value, scale_value, zp_value = w_dq.input(0), w_dq.input(1), w_dq.input(2)
    w = m.constant(w_value, "quantized weight")
    private(m, w_value, w_dq, "quantized weight")
    storage = w_value.type.dtype
    m.check(storage.is_int, f"weight storage {storage} is not an integer type")
    m.check(not w_dq.attrs.get("block_size"), "blocked weight quantization")
    scale = m.constant(scale_value, "weight scale")
    zero_point = np.zeros((), np.int64) if zp_value is None else m.constant(zp_value, "zero point")
    channels = w.shape[0]
    if scale.size != 1:
        axis = w_dq.attrs.get("axis", 1)
        m.check(axis % w.ndim == 0, f"weight quantized along axis {axis}, not its output channels")
    bn_ = batchnorm_affine(m, bn, channels)
    m.check(bool(np.all(bn_.g != 0)), "BN scale is 0 in some channel: the weight scale would be 0")
    new_scale = _folded_scale(m, scale, bn_.g)
    zp = np.broadcast_to(zero_point.reshape(-1).astype(np.int64), (channels,))
    negated = _negated_weight(m, w, zp, bn_.g < 0, storage)
    b_real = np.zeros((channels,))
    if conv.input(2) is not None:
        private(m, conv.input(2), conv, "conv bias")
        b_real = compile_time(m, conv.input(2), "conv bias").astype(np.float64)
    b_folded = bn_.bias(b_real)
    x_scale = _integer_unit_x_scale(graph, conv, bn)
    b_quantized = None if x_scale is None else _quantized_bias(m, b_folded, x_scale, new_scale)

    # Every check passed: build.
    if negated is not None:
        w_value = graph.constant(negated, f"{w_value.name}_bn")
    s_new = graph.constant(new_scale, f"{scale_value.name}_bn")
    zp_new = graph.constant(zp.astype(storage.numpy), f"{w_dq.name}_zero_point_bn")
    w_attrs = dict(w_dq.attrs, axis=0)
    weight = graph.add_node("dequantize", [w_value, s_new, zp_new], w_attrs, name=w_dq.name)
    out_dtype = conv.outputs[0].type.dtype
    if b_quantized is None:
        bias = graph.constant(b_folded.astype(out_dtype.numpy), f"{conv.name}_b")
    else:
        b_q, b_s = b_quantized
        operands = [graph.constant(b_q, f"{conv.name}_b_quantized"),
                    graph.constant(b_s, f"{conv.name}_b_scale")]  # fmt: skip
        attrs = {"axis": 0, "block_size": 0, "dtype": out_dtype}
        bias = graph.add_node("dequantize", operands, attrs, name=f"{conv.name}_b").outputs[0]
    node = graph.add_node(
        "conv", [conv.inputs[0], weight.outputs[0], bias], conv.attrs, name=conv.name
    )
    replace_bn(graph, bn, node.outputs[0])


def _folded_scale(m: Matcher, scale: np.ndarray, g: np.ndarray) -> np.ndarray:
    """s' = s·|g| per output channel, rounded once (from float64) to s's type."""
    folded = np.broadcast_to(scale.astype(np.float64).reshape(-1), g.shape) * np.abs(g)
    folded = folded.astype(scale.dtype)
    as_float = folded.astype(np.float64)
    m.check(
        bool(np.all(np.isfinite(as_float) & (as_float > 0))),
        "folded weight scale s·|γ/σ| is not a finite positive number in its type",
    )
    return folded


def _negated_weight(m: Matcher, w, zp, negative, storage) -> np.ndarray | None:
    """w' = 2·zp - w in the channels where γ/σ < 0 (so w' - zp = -(w - zp)),
    or None when no channel needs it."""
    if not negative.any():
        return None
    flip = _per_channel(negative, w.ndim, 0)
    negated = np.where(flip, 2 * _per_channel(zp, w.ndim, 0) - w.astype(np.int64), w)
    bad = (negated < storage.qmin) | (negated > storage.qmax)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        m.check(
            False,
            f"γ/σ < 0 in channel {at[0]}: weight {int(w[at])} with zero point {int(zp[at[0]])} "
            f"negates to {int(negated[at])}, outside {storage}",
        )
    return negated.astype(w.dtype)


def _integer_unit_x_scale(graph: Graph, conv: Node, bn: Node) -> np.ndarray | None:
    """x's per-tensor scale when the folded conv will become an integer unit:
    its output (the BN's) is read only by an 8-bit quantize and x is an 8-bit
    DQ with a constant per-tensor scale; else None."""
    out = bn.outputs[0]
    readers = graph.users(out)
    if graph.is_output(out) or len(readers) != 1 or readers[0].op != "quantize":
        return None
    if readers[0].outputs[0].type.dtype not in (dtypes.int8, dtypes.uint8):
        return None
    x_dq = conv.inputs[0].producer
    if x_dq is None or x_dq.op != "dequantize" or x_dq.input(1) is None:
        return None
    x_scale = x_dq.input(1)
    if not x_scale.is_constant or x_scale.const.size != 1:
        return None
    if x_dq.inputs[0].type.dtype not in (dtypes.int8, dtypes.uint8):
        return None
    return x_scale.const


def _quantized_bias(m: Matcher, b_folded, x_scale, w_scale) -> tuple[np.ndarray, np.ndarray]:
    """(b_q', scale): b_q' = round_half_even(B' / (x_s·s')), int32, at the float32
    product x_s·s' that QDQ canonicalization requires of a conv bias."""
    bias_scale = x_scale.astype(np.float32).reshape(()) * w_scale.astype(np.float32)
    with np.errstate(all="ignore"):
        quantized = np.rint(b_folded / bias_scale.astype(np.float64))
    m.check(
        bool(np.all((quantized >= INT32_MIN) & (quantized <= INT32_MAX))),
        "folded bias does not fit int32 at scale x_scale·w_scale'",
    )
    return quantized.astype(np.int32), bias_scale


RULES = [fold_into_conv, fold_into_gemm, fold_into_matmul, fold_into_quantized_conv]


def _batch_norms(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "batch_norm"]


def fold_batchnorm(graph: Graph, log: RuleLog | None = None) -> bool:
    """Fold every foldable BatchNormalization; see the module doc."""
    log = log if log is not None else graph.metadata.setdefault("batchnorm_log", RuleLog())
    changed = False
    while apply_rules(graph, _batch_norms, RULES, log):
        changed = True  # conv -> BN -> BN: the second folds into the new conv
    return changed
