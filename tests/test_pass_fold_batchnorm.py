"""BatchNorm folding (qnnjit/compiler/passes/fold_batchnorm.py).

Float graphs: the folded graph agrees with the unfolded one to float32
rounding and bit for bit with a graph whose weights were folded by hand
(W' = W·γ/σ, B' = (B - μ)·γ/σ + β in float64, rounded once). QDQ graphs: γ/σ
moves into the weight's dequantization scale, the canonicalized integer unit
is bit-identical to a hand-folded QDQ graph and within 1 output LSB of the
unfolded float evaluation. One near-miss test per precondition.
"""

import collections

import numpy as np
import pytest

from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.constant_folding import constant_folding
from qnnjit.compiler.passes.cse import cse
from qnnjit.compiler.passes.dce import dead_code_elimination
from qnnjit.compiler.passes.fold_batchnorm import fold_batchnorm
from qnnjit.compiler.passes.qdq_to_integer import qdq_to_integer
from qnnjit.compiler.pattern import RuleLog
from qnnjit.ir import Graph, TensorType, dtypes
from qnnjit.ir.verifier import verify

EPS = 1e-5
F64 = np.float64
Q_U8 = {"dtype": dtypes.uint8, "axis": 1, "block_size": 0, "saturate": True,
        "precision": dtypes.float32}  # fmt: skip


def conv_attrs(group=1):
    return {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": group}


def bn_params(channels, seed=0, negative=False):
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, channels)
    if negative:
        gamma[::2] *= -1
    return [
        gamma.astype(np.float32),
        rng.normal(0, 0.2, channels).astype(np.float32),  # beta
        rng.normal(0, 0.3, channels).astype(np.float32),  # mean
        rng.uniform(0.5, 2.0, channels).astype(np.float32),  # var
    ]


def hand_g(params):
    gamma, _, _, var = params
    return gamma.astype(F64) / np.sqrt(var.astype(F64) + F64(EPS))


def hand_bias(params, b):
    _, beta, mean, _ = params
    return (np.asarray(b, F64) - mean) * hand_g(params) + beta


def add_bn(g: Graph, y, params, name="bn"):
    consts = [g.constant(p, f"{name}_{i}") for i, p in enumerate(params)]
    return g.add_node("batch_norm", [y, *consts], {"epsilon": EPS}, name=name).outputs[0]


def run(graph: Graph, *inputs) -> np.ndarray:
    return ReferenceExecutor(graph).run(list(inputs))[0]


def folds(graph: Graph) -> RuleLog:
    log = RuleLog()
    fold_batchnorm(graph, log)
    verify(graph)
    return log


def assert_kept(graph: Graph, reason: str):
    before = graph.op_counts()
    log = RuleLog()
    assert not fold_batchnorm(graph, log)
    assert graph.op_counts() == before
    (why,) = log.kept.values()
    assert reason in why, why


# ---- float conv / gemm / matmul ---------------------------------------------------------

X = np.random.default_rng(1).standard_normal((2, 6, 7, 7)).astype(np.float32)
W = np.random.default_rng(2).standard_normal((6, 6, 3, 3)).astype(np.float32)
B = np.random.default_rng(3).standard_normal(6).astype(np.float32)


def float_conv_bn(w, b, params, group=1, w_input=False) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, X.shape))
    w = g.add_input("w", TensorType(dtypes.float32, w.shape)) if w_input else g.constant(w, "w")
    inputs = [x, w] + ([] if b is None else [g.constant(b, "b")])
    y = g.add_node("conv", inputs, conv_attrs(group), name="conv").outputs[0]
    g.set_outputs([add_bn(g, y, params, name="y")])
    return g


@pytest.mark.parametrize("group", [1, 2, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_folds(group, bias):
    w = W[:, : 6 // group]
    b = B if bias else None
    params = bn_params(6, negative=True)
    g = float_conv_bn(w, b, params, group)
    unfolded = run(g, X)
    log = folds(g)
    assert log.applied == ["fold_into_conv at y"]
    assert g.op_counts() == {"conv": 1}
    assert [v.name for v in g.outputs] == ["y"]
    folded = run(g, X)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-5)

    by_hand = Graph()
    x = by_hand.add_input("x", TensorType(dtypes.float32, X.shape))
    w_hand = (w.astype(F64) * hand_g(params).reshape(-1, 1, 1, 1)).astype(np.float32)
    b_hand = hand_bias(params, 0 if b is None else b).astype(np.float32)
    inputs = [x, by_hand.constant(w_hand), by_hand.constant(b_hand)]
    by_hand.set_outputs([by_hand.add_node("conv", inputs, conv_attrs(group)).outputs[0]])
    np.testing.assert_array_equal(folded, run(by_hand, X))


A = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_folds_into_weight_and_c(trans_b):
    w = np.random.default_rng(5).standard_normal((8, 6)).astype(np.float32)
    c = np.random.default_rng(6).standard_normal((1, 6)).astype(np.float32)
    params = bn_params(6, negative=True)
    attrs = {"alpha": 0.75, "beta": 0.5, "trans_a": 0, "trans_b": trans_b}

    def build(w, c, attrs, bn=True):
        g = Graph()
        a = g.add_input("a", TensorType(dtypes.float32, A.shape))
        wc = g.constant(w.T.copy() if trans_b else w, "w")
        y = g.add_node("gemm", [a, wc, g.constant(c, "c")], attrs, name="gemm").outputs[0]
        g.set_outputs([add_bn(g, y, params, "y") if bn else y])
        return g

    g = build(w, c, attrs)
    unfolded = run(g, A)
    assert folds(g).applied == ["fold_into_gemm at y"]
    assert g.op_counts() == {"gemm": 1}
    folded = run(g, A)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-5)
    w_hand = (w.astype(F64) * hand_g(params)).astype(np.float32)
    c_hand = hand_bias(params, F64(0.5) * c.astype(F64)).astype(np.float32)
    by_hand = build(w_hand, c_hand, dict(attrs, beta=1.0), bn=False)
    np.testing.assert_array_equal(folded, run(by_hand, A))


def test_matmul_folds_into_weight_and_an_add():
    w = np.random.default_rng(5).standard_normal((8, 6)).astype(np.float32)
    params = bn_params(6)
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.float32, A.shape))
    y = g.add_node("matmul", [a, g.constant(w, "w")], name="mm").outputs[0]
    g.set_outputs([add_bn(g, y, params, "y")])
    unfolded = run(g, A)
    assert folds(g).applied == ["fold_into_matmul at y"]
    assert g.op_counts() == {"add": 1, "matmul": 1}
    folded = run(g, A)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-5)
    w_hand = (w.astype(F64) * hand_g(params)).astype(np.float32)
    expected = A @ w_hand + hand_bias(params, 0).astype(np.float32)
    np.testing.assert_array_equal(folded, expected)


def test_conv_bn_bn_folds_both():
    g = float_conv_bn(W, B, bn_params(6))
    y = add_bn(g, g.outputs[0], bn_params(6, seed=1), name="y2")
    g.set_outputs([y])
    unfolded = run(g, X)
    assert len(folds(g).applied) == 2
    assert g.op_counts() == {"conv": 1}
    np.testing.assert_allclose(run(g, X), unfolded, rtol=1e-5, atol=1e-5)


# ---- float near-misses: one per precondition ---------------------------------------------


def test_bn_with_non_constant_params_is_kept():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, X.shape))
    mean = g.add_input("mean", TensorType(dtypes.float32, (6,)))
    y = g.add_node("conv", [x, g.constant(W)], conv_attrs(), name="conv").outputs[0]
    gamma, beta, _, var = (g.constant(p) for p in bn_params(6))
    bn = g.add_node("batch_norm", [y, gamma, beta, mean, var], {"epsilon": EPS}, name="bn")
    g.set_outputs(bn.outputs)
    assert_kept(g, "BN mean is not a compile-time constant")


def test_conv_output_read_twice_is_kept():
    g = float_conv_bn(W, B, bn_params(6))
    conv_out = g.value("conv")
    g.set_outputs([g.outputs[0], g.add_node("relu", [conv_out], name="r").outputs[0]])
    assert_kept(g, "conv has 2 readers, not 1")


def test_shared_weight_is_kept():
    g = float_conv_bn(W, B, bn_params(6))
    w = g.value("w")
    other = g.add_node("conv", [g.inputs[0], w], conv_attrs(), name="other").outputs[0]
    g.set_outputs([g.outputs[0], other])
    assert_kept(g, "weight of conv w is shared with other")


def test_shared_bias_is_kept():
    g = float_conv_bn(W, B, bn_params(6))
    g.set_outputs([g.outputs[0], g.add_node("neg", [g.value("b")], name="other").outputs[0]])
    assert_kept(g, "conv bias b is shared with other")


def test_non_constant_weight_is_kept():
    g = float_conv_bn(W, B, bn_params(6), w_input=True)
    assert_kept(g, "weight of conv is not a constant")


def test_non_positive_variance_is_kept():
    params = bn_params(6)
    params[3][2] = -1.0
    assert_kept(float_conv_bn(W, B, params), "BN var + epsilon is not positive")


def test_batched_matmul_is_kept():
    # BN's channel axis 1 of a [2, 5, 6] product is not the features (axis 2).
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.float32, (2, 5, 8)))
    y = g.add_node("matmul", [a, g.constant(np.ones((8, 6), np.float32))], name="mm").outputs[0]
    g.set_outputs([add_bn(g, y, bn_params(5))])
    assert_kept(g, "matmul output has rank 3")


def test_gemm_with_non_constant_c_is_kept():
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.float32, A.shape))
    c = g.add_input("c", TensorType(dtypes.float32, (6,)))
    attrs = {"alpha": 1.0, "beta": 1.0, "trans_a": 0, "trans_b": 0}
    w = g.constant(np.ones((8, 6), np.float32), "w")
    y = g.add_node("gemm", [a, w, c], attrs, name="gemm").outputs[0]
    g.set_outputs([add_bn(g, y, bn_params(6))])
    assert_kept(g, "gemm C is not a constant")


# ---- QDQ: DQ(x), DQ(w_int8), [DQ(b_int32)] -> conv -> batch_norm -> Q --------------------

XQ = np.random.default_rng(7).standard_normal((2, 8, 9, 9)).astype(np.float32)
X_SCALE, X_ZP = np.float32(0.02), np.uint8(128)


def int8_weight(shape, seed=8, low=-127):
    return np.random.default_rng(seed).integers(low, 128, shape).astype(np.int8)


def qdq_conv(g, x, w_q, w_scale, w_zp, bias_q, *, axis, group=1, name="w"):
    """DQ(Q(x)) and DQ(w), [DQ(b)] -> conv; returns the conv output."""
    xs, xzp = g.constant(X_SCALE, "x_scale"), g.constant(X_ZP, "x_zp")
    q = g.add_node("quantize", [x, xs, xzp], Q_U8, name="xq").outputs[0]
    dq_attrs = {"axis": 1, "block_size": 0, "dtype": dtypes.float32}
    xd = g.add_node("dequantize", [q, xs, xzp], dq_attrs, name="xdq").outputs[0]
    w_attrs = dict(dq_attrs, axis=axis)
    wd = g.add_node(
        "dequantize",
        [g.constant(w_q, name), g.constant(w_scale, f"{name}_scale"), g.constant(w_zp)],
        w_attrs,
        name=f"{name}_dq",
    ).outputs[0]
    inputs = [xd, wd]
    if bias_q is not None:
        b_scale = (X_SCALE * np.asarray(w_scale, np.float32)).astype(np.float32)
        b_attrs = dict(dq_attrs, axis=0)
        operands = [g.constant(bias_q, "b"), g.constant(b_scale, "b_scale")]
        inputs.append(g.add_node("dequantize", operands, b_attrs, name="b_dq").outputs[0])
    return g.add_node("conv", inputs, conv_attrs(group), name="conv").outputs[0]


def output_quantize(g, y, y_scale, y_zp):
    operands = [y, g.constant(np.float32(y_scale), "y_scale"), g.constant(np.uint8(y_zp), "y_zp")]
    return g.add_node("quantize", operands, Q_U8, name="yq").outputs[0]


class QdqCase:
    def __init__(self, per_channel, negative, bias, group=1, seed=0):
        self.per_channel, self.group = per_channel, group
        m, c = 16, 8 // group
        self.w = int8_weight((m, c, 3, 3), seed=8 + seed)
        rng = np.random.default_rng(20 + seed)
        self.w_scale = (
            rng.uniform(0.002, 0.01, m).astype(np.float32) if per_channel else np.float32(0.005)
        )
        self.w_zp = np.zeros(m, np.int8) if per_channel else np.int8(0)
        self.bias = rng.integers(-3000, 3000, m).astype(np.int32) if bias else None
        self.params = bn_params(m, seed=seed, negative=negative)
        unquantized = self.graph(quantize=False)
        y = run(unquantized, XQ)
        self.y_scale = np.float32((y.max() - y.min()) / 255)
        self.y_zp = int(np.clip(np.rint(-y.min() / self.y_scale), 0, 255))

    def graph(self, quantize=True) -> Graph:
        g = Graph()
        x = g.add_input("x", TensorType(dtypes.float32, XQ.shape))
        axis = 0 if self.per_channel else 1
        y = qdq_conv(g, x, self.w, self.w_scale, self.w_zp, self.bias, axis=axis, group=self.group)
        y = add_bn(g, y, self.params, name="bn")
        g.set_outputs([output_quantize(g, y, self.y_scale, self.y_zp) if quantize else y])
        return g

    def hand_folded(self) -> Graph:
        """The same unit with w', s', b_q' computed here (module-doc formulas)."""
        g_ = hand_g(self.params)
        m = g_.size
        s_new = (np.broadcast_to(np.float64(self.w_scale), (m,)) * np.abs(g_)).astype(np.float32)
        w_new = np.where(g_.reshape(-1, 1, 1, 1) < 0, -self.w.astype(np.int64), self.w)
        b_real = np.zeros(m)
        if self.bias is not None:
            b_scale = (X_SCALE * np.asarray(self.w_scale, np.float32)).astype(np.float32)
            b_real = (self.bias.astype(np.float32) * b_scale).astype(F64)
        b_scale_new = X_SCALE * s_new
        b_q = np.rint(hand_bias(self.params, b_real) / b_scale_new.astype(F64)).astype(np.int32)
        g = Graph()
        x = g.add_input("x", TensorType(dtypes.float32, XQ.shape))
        zp = np.zeros(m, np.int8)
        y = qdq_conv(g, x, w_new.astype(np.int8), s_new, zp, None, axis=0, group=self.group)
        conv = g.producer(y)
        b_attrs = {"axis": 0, "block_size": 0, "dtype": dtypes.float32}
        operands = [g.constant(b_q), g.constant(b_scale_new)]
        b = g.add_node("dequantize", operands, b_attrs, name="b_dq").outputs[0]
        y = g.add_node("conv", [*conv.inputs, b], conv.attrs, name="conv_b").outputs[0]
        g.set_outputs([output_quantize(g, y, self.y_scale, self.y_zp)])
        return g


def canonicalized(g: Graph) -> Graph:
    qdq_to_integer(g)
    dead_code_elimination(g)
    verify(g)
    return g


@pytest.mark.parametrize(
    "per_channel, negative, bias, group",
    [(False, False, False, 1), (True, False, True, 1), (False, True, True, 1),
     (True, True, False, 1), (True, True, True, 8)],
)  # fmt: skip
def test_qdq_conv_folds_into_the_weight_scale(per_channel, negative, bias, group):
    case = QdqCase(per_channel, negative, bias, group)
    unfolded = run(canonicalized(case.graph()), XQ)

    g = case.graph()
    assert folds(g).applied == ["fold_into_quantized_conv at bn"]
    assert "batch_norm" not in g.op_counts()
    canonicalized(g)
    assert g.op_counts() == {"qconv": 1, "quantize": 1, "requantize": 1}  # an integer unit
    folded = run(g, XQ)
    np.testing.assert_array_equal(folded, run(canonicalized(case.hand_folded()), XQ))

    lsb = np.abs(folded.astype(np.int64) - unfolded.astype(np.int64))
    assert lsb.max() <= 1
    assert np.mean(lsb == 0) >= 0.99


def test_qdq_bn_params_may_be_dequantized_constants():
    # ONNX Runtime quantizes BN's γ and β (DQ of constants): still compile-time values.
    case = QdqCase(True, False, True)

    def build():
        g = case.graph()
        bn = g.producer(g.outputs[0]).inputs[0].producer
        gamma = bn.inputs[1].const
        scale = np.float32(np.abs(gamma).max() / 127)
        q = np.rint(gamma / scale).astype(np.int8)
        attrs = {"axis": 0, "block_size": 0, "dtype": dtypes.float32}
        dq = g.add_node("dequantize", [g.constant(q), g.constant(scale)], attrs, name="gamma_dq")
        g.set_input(bn, 1, dq.outputs[0])
        return g

    unfolded = run(canonicalized(build()), XQ)
    g = build()
    assert folds(g).applied == ["fold_into_quantized_conv at bn"]
    folded = run(canonicalized(g), XQ)
    lsb = np.abs(folded.astype(np.int64) - unfolded.astype(np.int64))
    assert lsb.max() <= 1 and np.mean(lsb == 0) >= 0.99


def test_qdq_conv_without_a_following_quantize_keeps_a_float_bias():
    case = QdqCase(True, True, True)
    g = case.graph(quantize=False)
    unfolded = run(g, XQ)
    assert folds(g).applied == ["fold_into_quantized_conv at bn"]
    (conv,) = [n for n in g.nodes if n.op == "conv"]
    assert conv.inputs[2].is_constant and conv.inputs[2].type.dtype == dtypes.float32
    np.testing.assert_allclose(run(g, XQ), unfolded, rtol=1e-5, atol=1e-4)


# ---- QDQ near-misses ------------------------------------------------------------------


def test_minus_128_weight_with_negative_gamma_is_kept():
    case = QdqCase(True, True, False)
    case.w[0, 0, 0, 0] = -128  # channel 0 has γ < 0
    assert_kept(case.graph(), "weight -128 with zero point 0 negates to 128, outside int8")


def test_minus_128_weight_with_positive_gamma_folds():
    case = QdqCase(True, False, False)
    case.w[0, 0, 0, 0] = -128
    assert folds(case.graph()).applied == ["fold_into_quantized_conv at bn"]


def test_zero_gamma_is_kept():
    case = QdqCase(True, False, False)
    case.params[0][3] = 0.0
    assert_kept(case.graph(), "BN scale is 0 in some channel")


def test_shared_dequantized_weight_is_kept():
    case = QdqCase(True, False, False)
    g = case.graph()
    w_dq, x_dq = g.value("w_dq"), g.value("xdq")
    other = g.add_node("conv", [x_dq, w_dq], conv_attrs(), name="other").outputs[0]
    g.set_outputs([g.outputs[0], other])
    assert_kept(g, "dequantized weight w_dq is shared with other")


def test_shared_integer_weight_is_kept():
    case = QdqCase(True, False, False)
    g = case.graph()
    dq = g.producer(g.value("w_dq"))
    other = g.add_node("dequantize", dq.inputs, dq.attrs, name="other").outputs[0]
    g.set_outputs([g.outputs[0], other])
    assert_kept(g, "quantized weight w is shared with other")


def test_weight_quantized_along_input_channels_is_kept():
    case = QdqCase(False, False, False)
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, XQ.shape))
    scale = np.full(8, 0.005, np.float32)  # one per input channel (axis 1)
    y = qdq_conv(g, x, case.w, scale, np.zeros(8, np.int8), None, axis=1)
    g.set_outputs([output_quantize(g, add_bn(g, y, case.params), case.y_scale, case.y_zp)])
    assert_kept(g, "weight quantized along axis 1, not its output channels")


def test_qdq_conv_output_read_twice_is_kept():
    case = QdqCase(True, False, False)
    g = case.graph()
    g.set_outputs([g.outputs[0], g.add_node("relu", [g.value("conv")], name="r").outputs[0]])
    assert_kept(g, "conv has 2 readers, not 1")


# ---- the model zoo with BatchNormalization kept ------------------------------------------

FRONT = [constant_folding, cse, dead_code_elimination]


def compile_graph(source, passes) -> Graph:
    from qnnjit.frontends.onnx import load_onnx

    g = load_onnx(source)
    for step in passes:
        step(g)
        verify(g)
    return g


@pytest.mark.parametrize(
    "model_name", ["resnet_style", "mobilenetv2_style", "inception_style", "mlp_attention"]
)
def test_zoo_float_models_fold_every_batchnorm(model_zoo, model_name):
    import modelzoo

    path = str(model_zoo.float_onnx(model_name, fold_batchnorm=False))
    unfolded = compile_graph(path, FRONT)
    folded = compile_graph(path, [*FRONT, fold_batchnorm])
    bns = unfolded.op_counts().get("batch_norm", 0)
    assert "batch_norm" not in folded.op_counts()
    assert len(folded) == len(unfolded) - bns
    x = modelzoo.example_input(model_name)
    np.testing.assert_allclose(run(folded, x), run(unfolded, x), rtol=1e-4, atol=1e-5)


def _bypass_conv_output_qdq(model):
    """conv -> Q -> DQ -> BN becomes conv -> BN: the QDQ form of tools that
    quantize a conv's inputs and the BN's output only (TensorRT-style)."""
    nodes = model.graph.node
    made_by = {out: n for n in nodes for out in n.output}
    readers = collections.Counter(name for n in nodes for name in n.input)
    dropped = set()
    for node in nodes:
        dq = made_by.get(node.input[0]) if node.op_type == "BatchNormalization" else None
        q = (
            made_by.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear"
            else None
        )
        conv = made_by.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if conv is not None and conv.op_type == "Conv" and readers[q.output[0]] == 1:
            if readers[dq.output[0]] == 1:
                node.input[0] = conv.output[0]
                dropped |= {dq.name, q.name}
    kept = [n for n in nodes if n.name not in dropped]
    del nodes[:]
    nodes.extend(kept)
    return model


@pytest.fixture(scope="module")
def resnet_qdq_with_bn(model_zoo, tmp_path_factory):
    """resnet_style with BatchNormalization kept, quantized by ONNX Runtime (QDQ,
    u8 activations, s8 per-tensor weights): ORT quantizes the conv output and
    the BN itself (conv -> Q -> DQ -> BN(DQ(γ), DQ(β)) -> Q)."""
    import modelzoo
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    where = tmp_path_factory.mktemp("qdq_bn")
    float_path = model_zoo.float_onnx("resnet_style", fold_batchnorm=False)
    prep = where / "prep.onnx"
    quant_pre_process(modelzoo.tidy(onnx.load(str(float_path))), str(prep), skip_optimization=True)
    return modelzoo.quantize(prep, where / "qdq.onnx", "resnet_style", modelzoo.Variant(), None)


def test_zoo_qdq_batchnorm_after_a_quantized_conv_output_is_kept(resnet_qdq_with_bn):
    # Folding across conv -> Q -> DQ -> BN would drop a rounding step: not exact.
    g = compile_graph(str(resnet_qdq_with_bn), FRONT)
    log = RuleLog()
    assert not fold_batchnorm(g, log)
    assert g.op_counts()["batch_norm"] == 6
    assert all("is dequantize, not conv" in why for why in log.kept.values())


def test_zoo_qdq_batchnorm_between_conv_and_quantize_folds(resnet_qdq_with_bn):
    import modelzoo
    import onnx

    model = _bypass_conv_output_qdq(onnx.load(str(resnet_qdq_with_bn)))
    source = model.SerializeToString()
    unfolded = compile_graph(source, [*FRONT, qdq_to_integer, dead_code_elimination])
    folded = compile_graph(source, [*FRONT, fold_batchnorm, qdq_to_integer, dead_code_elimination])
    assert unfolded.op_counts()["batch_norm"] == 6 and unfolded.op_counts()["conv"] == 6
    assert "batch_norm" not in folded.op_counts() and "conv" not in folded.op_counts()
    assert len(folded) < len(unfolded)
    scale, _ = modelzoo.output_quantization(model)
    for seed in range(3):
        x = modelzoo.example_input("resnet_style", seed=seed)
        (ort,) = modelzoo.ort_run(source, {"input": x}, optimized=True)
        assert np.abs(run(folded, x) - run(unfolded, x)).max() / scale <= 1 + 1e-6
        assert np.abs(run(folded, x) - ort).max() / scale <= 1 + 1e-6
