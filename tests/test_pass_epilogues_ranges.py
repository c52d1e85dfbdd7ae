"""Epilogue fusion (`fused` groups), accumulator-range analysis and the report.

- fusion: a QDQ conv + residual add and its QOperator twin (QLinearConv +
  QLinearAdd) become one `fused` node per conv whose outputs equal the unfused
  graph's bit for bit; an intermediate value read outside the group, or that is
  a graph output, blocks the fusion (one test per precondition);
- ranges: hand-computed goldens (exact lo/hi, width, the vpmaddubsw pair-sum
  fact), attained by the reference interpreter at the extreme inputs; int32
  overflow reported by name as a warning, or an error when strict;
- the printer shows fused bodies, deterministically;
- the zoo acceptance criterion: in the u8 QDQ and QOperator ResNet- and
  MobileNetV2-style models every conv (with its residual add) is one fused
  node and quantize/dequantize remain only at the float input and output.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import qnnjit
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.compiler.passes.accumulator_ranges import (
    AccumulatorOverflowError,
    AccumulatorOverflowWarning,
    PairSums,
    accumulator_ranges,
    pair_sum_range,
)
from qnnjit.compiler.passes.fuse_epilogues import fuse_epilogues
from qnnjit.compiler.pipeline import PIPELINE, run_pipeline
from qnnjit.errors import VerificationError
from qnnjit.frontends.onnx import load_onnx
from qnnjit.ir import Accumulator, Graph, TensorType, dtypes
from qnnjit.ir.verifier import verify

MINE = ("fuse_epilogues", "accumulator_ranges")
BEFORE_FUSION = [p for p in PIPELINE if p.name not in MINE]
CONV = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}

# ---- ONNX model builders ----------------------------------------------------------


def _init(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _scales():
    rng = np.random.default_rng(7)
    w = rng.integers(-128, 128, (4, 4, 3, 3)).astype(np.int8)
    b = rng.integers(-3000, 3000, 4).astype(np.int32)
    xs, ws = np.float32(0.05), np.float32(0.004)
    return [
        _init("xs", xs, np.float32), _init("xz", 120, np.uint8),
        _init("w", w, np.int8), _init("ws", ws, np.float32), _init("wz", 0, np.int8),
        _init("b", b, np.int32), _init("bs", xs * ws, np.float32),
        _init("cs", 0.07, np.float32), _init("cz", 131, np.uint8),
        _init("as", 0.09, np.float32), _init("az", 125, np.uint8),
    ]  # fmt: skip


def _model(nodes, extra_outputs=(), ms=False):
    outputs = [helper.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 6])]
    outputs += [helper.make_tensor_value_info(n, t, [1, 4, 6, 6]) for n, t in extra_outputs]
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 6, 6])]
    graph = helper.make_graph(nodes, "residual", inputs, outputs, _scales())
    imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] * ms)
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def qdq_residual(extra=None):
    """Q -> DQ -> Conv(DQ w, DQ bias) -> Q -> DQ -> Add(., DQ x) -> Q -> DQ.
    extra: "output" makes the conv's quantized result a graph output, "reader"
    gives it a second reader (a DequantizeLinear that is a graph output)."""
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        n("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        n("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        n("DequantizeLinear", ["b", "bs"], ["bd"]),
        n("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
        n("QuantizeLinear", ["c", "cs", "cz"], ["cq"]),
        n("DequantizeLinear", ["cq", "cs", "cz"], ["cd"]),
        n("Add", ["cd", "xd"], ["a"]),
        n("QuantizeLinear", ["a", "as", "az"], ["aq"]),
        n("DequantizeLinear", ["aq", "as", "az"], ["y"]),
    ]
    return _model(nodes, _extra(nodes, extra))


def qoperator_residual(extra=None):
    """QuantizeLinear -> QLinearConv -> QLinearAdd(., x) -> DequantizeLinear."""
    n = helper.make_node
    conv = ["xq", "xs", "xz", "w", "ws", "wz", "cs", "cz", "b"]
    add = ["cq", "cs", "cz", "xq", "xs", "xz", "as", "az"]
    nodes = [
        n("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        n("QLinearConv", conv, ["cq"], pads=[1, 1, 1, 1]),
        n("QLinearAdd", add, ["aq"], domain="com.microsoft"),
        n("DequantizeLinear", ["aq", "as", "az"], ["y"]),
    ]
    return _model(nodes, _extra(nodes, extra), ms=True)


def _extra(nodes, extra):
    """Extra graph outputs (name, type) for the `extra` variants."""
    if extra == "output":
        return [("cq", TP.UINT8)]
    if extra == "reader":
        nodes.append(helper.make_node("DequantizeLinear", ["cq", "cs", "cz"], ["c_float"]))
        return [("c_float", TP.FLOAT)]
    return []


def _input(seed=0):
    return np.random.default_rng(seed).normal(0, 2.5, (1, 4, 6, 6)).astype(np.float32)


def fuse_and_compare(model_or_graph, inputs):
    """Run the pipeline up to fusion, evaluate; fuse (and type ranges),
    evaluate again; the outputs must be identical. Returns the fused graph."""
    graph = model_or_graph
    if not isinstance(graph, Graph):
        graph = load_onnx(model_or_graph)
        run_pipeline(graph, BEFORE_FUSION, verify=True)
    expected = ReferenceExecutor(graph).run(inputs)
    fuse_epilogues(graph)
    accumulator_ranges(graph)
    verify(graph)
    actual = ReferenceExecutor(graph).run(inputs)
    for e, a in zip(expected, actual, strict=True):
        assert e.dtype == a.dtype
        np.testing.assert_array_equal(a, e)
    return graph


def top_ops(graph):
    return [node.op for node in graph.nodes]


def groups(graph):
    return [node for node in graph.nodes if node.op == "fused"]


# ---- fusion: positive -------------------------------------------------------------


@pytest.mark.parametrize("build", [qdq_residual, qoperator_residual], ids=["qdq", "qoperator"])
def test_conv_and_residual_add_become_one_fused_node(build):
    graph = fuse_and_compare(build(), [_input(s) for s in range(1)])
    assert top_ops(graph) == ["quantize", "fused", "dequantize"]
    (group,) = groups(graph)
    assert group.attrs["kind"] == "conv+requantize+add"
    assert [n.op for n in group.attrs["body"].nodes] == ["qconv", "requantize", "qadd"]
    # The group reads the quantized input once (conv operand and residual).
    assert [v.name for v in group.inputs] == [graph.nodes[0].outputs[0].name]
    for seed in range(1, 4):  # more inputs, the same integers
        x = _input(seed)
        graph_unfused = load_onnx(build())
        run_pipeline(graph_unfused, BEFORE_FUSION)
        np.testing.assert_array_equal(
            ReferenceExecutor(graph).run([x])[0], ReferenceExecutor(graph_unfused).run([x])[0]
        )


def test_qdq_and_qoperator_forms_fuse_to_the_same_group():
    a = fuse_and_compare(qdq_residual(), [_input()])
    b = fuse_and_compare(qoperator_residual(), [_input()])
    (ga,), (gb,) = groups(a), groups(b)
    assert ga.attrs["kind"] == gb.attrs["kind"]
    assert ga.outputs[0].type == gb.outputs[0].type
    body_a, body_b = ga.attrs["body"], gb.attrs["body"]
    assert [n.op for n in body_a.nodes] == [n.op for n in body_b.nodes]
    assert [v.type for n in body_a.nodes for v in n.outputs] == [
        v.type for n in body_b.nodes for v in n.outputs
    ]


def test_fusion_keeps_graph_output_names_and_is_idempotent():
    graph = fuse_and_compare(qoperator_residual(), [_input()])
    assert [v.name for v in graph.outputs] == ["y"]
    assert fuse_epilogues(graph) is False
    assert accumulator_ranges(graph) is False
    verify(graph)


def test_standalone_chains_global_pool_and_matmul_bias():
    """qreduce_sum -> requantize and qmatmul -> add(bias) -> requantize."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 3, 4, 4)))
    zp = g.constant(np.uint8(3), "zp")
    acc = g.add_node("qreduce_sum", [x, zp], {"axes": (2, 3), "keepdims": True}).outputs[0]
    pooled = _requantize(g, acc, 0.01, "pool_q")
    flat = g.add_node("flatten", [pooled], {"axis": 1}).outputs[0]
    w = g.constant(np.arange(-6, 6, dtype=np.int8).reshape(3, 4), "w")
    mm = g.add_node("qmatmul", [flat, w, zp, None], name="fc").outputs[0]
    # A folded zero-point correction, then the bias: both int32 constant adds.
    corrected = g.add_node("add", [mm, g.constant(np.array([[-7, 0, 7, 1]], np.int32), "c")])
    bias = g.constant(np.array([5, -5, 0, 9], np.int32), "b")
    biased = g.add_node("add", [bias, corrected.outputs[0]])
    y = _requantize(g, biased.outputs[0], 0.1, "fc_q", clamp=(0, 100))
    g.set_outputs([y])
    x_value = np.random.default_rng(1).integers(0, 256, (1, 3, 4, 4)).astype(np.uint8)
    graph = fuse_and_compare(g, [x_value])
    assert [n.attrs["kind"] for n in groups(graph)] == [
        "reduce_sum+requantize",
        "matmul+bias+requantize",
    ]
    assert top_ops(graph) == ["fused", "flatten", "fused"]
    assert [v.name for v in graph.outputs] == ["fc_q"]  # the group's result keeps its name
    body = groups(graph)[1].attrs["body"]
    assert [n.op for n in body.nodes] == ["qmatmul", "add", "add", "requantize"]
    assert body.nodes[-1].attrs["clamp"] == (0, 100)
    # pooled in [0, 255] (uint8), a zp 3 -> [-3, 252]; w per column (no zp),
    # K = 3; then + c + b per column: ranges see through the group and both adds.
    ranges = [n.outputs[0].type.accumulator for n in body.nodes[:3]]
    d = np.arange(-6, 6).reshape(3, 4)
    hi = np.maximum(-3 * d, 252 * d).sum(0)
    lo = np.minimum(-3 * d, 252 * d).sum(0)
    c, b = np.array([-7, 0, 7, 1]), np.array([5, -5, 0, 9])
    assert (ranges[0].lo, ranges[0].hi) == (lo.min(), hi.max())
    assert (ranges[2].lo, ranges[2].hi) == ((lo + c + b).min(), (hi + c + b).max())


def test_a_contested_add_joins_the_later_conv():
    """add(requant(conv1(x)), requant(conv2(x))): both chains could take the
    add; the one whose conv comes later does, the other stays conv+requantize."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 1, 3, 3)))
    w = g.constant(np.ones((1, 1, 1, 1), np.int8), "w")
    r1 = _requantize(g, g.add_node("qconv", [x, w], CONV, name="conv1").outputs[0], 0.5, "r1")
    r2 = _requantize(g, g.add_node("qconv", [x, w], CONV, name="conv2").outputs[0], 0.5, "r2")
    g.set_outputs([_qadd(g, r1, r2)])
    x_value = np.arange(9, dtype=np.uint8).reshape(1, 1, 3, 3) * 20
    graph = fuse_and_compare(g, [x_value])
    kinds = {n.name: n.attrs["kind"] for n in groups(graph)}
    assert kinds == {"conv1": "conv+requantize", "conv2": "conv+requantize+add"}
    assert "qadd joins the group of conv2" in " ".join(graph.metadata["fusion_log"].applied)


@pytest.mark.parametrize("closer", ["clip", "lookup"])
@pytest.mark.parametrize("add_reader", [False, True])
def test_a_clip_or_lookup_after_the_add_joins_the_group(closer, add_reader):
    """The relu after a residual add that stayed an integer clip (symmetric
    s8 activations), or a table of the add's codes (a transformer's GELU
    after its bias add), closes the group, unless the add's codes have
    another reader (then it stays outside)."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 1, 3, 3)))
    w = g.constant(np.ones((1, 1, 1, 1), np.int8), "w")
    r1 = _requantize(g, g.add_node("qconv", [x, w], CONV, name="conv").outputs[0], 0.5, "r1")
    added = _qadd(g, r1, x)
    if closer == "clip":
        last = g.add_node("clip", [added], {"min": 40, "max": 200}, name="relu").outputs[0]
    else:
        table = g.constant((np.arange(256) * 7 % 256).astype(np.uint8), "table")
        last = g.add_node("lookup", [added, table], name="gelu").outputs[0]
    g.set_outputs([last, added] if add_reader else [last])
    x_value = np.arange(9, dtype=np.uint8).reshape(1, 1, 3, 3) * 30
    graph = fuse_and_compare(g, [x_value])
    (group,) = groups(graph)
    if add_reader:
        assert group.attrs["kind"] == "conv+requantize+add"
        assert closer in top_ops(graph)
    else:
        assert group.attrs["kind"] == f"conv+requantize+add+{closer}"
        assert top_ops(graph) == ["fused"]


# ---- fusion: negative (one test per precondition) -----------------------------------


@pytest.mark.parametrize("build", [qdq_residual, qoperator_residual], ids=["qdq", "qoperator"])
@pytest.mark.parametrize("extra", ["output", "reader"])
def test_requantized_value_read_outside_blocks_the_add(build, extra):
    graph = fuse_and_compare(build(extra), [_input()])
    (group,) = groups(graph)
    assert group.attrs["kind"] == "conv+requantize"
    assert "qadd" in top_ops(graph)  # the residual add stays outside


def _conv_requantize_graph():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (1, 2, 3, 3)))
    w = g.constant(np.arange(-4, 4, dtype=np.int8).reshape(2, 2, 1, 2), "w")
    acc = g.add_node("qconv", [x, w], CONV, name="conv").outputs[0]
    return g, acc


def test_accumulator_that_is_a_graph_output_blocks_fusion():
    g, acc = _conv_requantize_graph()
    g.set_outputs([_requantize(g, acc, 0.25, "q"), acc])
    graph = fuse_and_compare(g, [_codes((1, 2, 3, 3))])
    assert groups(graph) == []
    assert "graph output" in graph.metadata["fusion_log"].kept["conv"]


def test_accumulator_with_a_second_reader_blocks_fusion():
    g, acc = _conv_requantize_graph()
    g.set_outputs([_requantize(g, acc, 0.25, "q1"), _requantize(g, acc, 0.5, "q2")])
    graph = fuse_and_compare(g, [_codes((1, 2, 3, 3))])
    assert groups(graph) == []
    assert "2 readers" in graph.metadata["fusion_log"].kept["conv"]


def test_bias_add_read_outside_blocks_fusion():
    g, acc = _conv_requantize_graph()
    biased = g.add_node("add", [acc, g.constant(np.array([1, 2], np.int32).reshape(1, 2, 1, 1))])
    g.set_outputs([_requantize(g, biased.outputs[0], 0.25, "q"), biased.outputs[0]])
    graph = fuse_and_compare(g, [_codes((1, 2, 3, 3))])
    assert groups(graph) == []


def test_accumulator_without_requantize_is_not_fused():
    g, acc = _conv_requantize_graph()
    g.set_outputs([g.add_node("relu", [acc]).outputs[0]])
    graph = fuse_and_compare(g, [_codes((1, 2, 3, 3))])
    assert groups(graph) == []
    assert "not requantize" in graph.metadata["fusion_log"].kept["conv"]


# ---- the fused op itself ---------------------------------------------------------


def test_fused_operands_must_match_the_body():
    graph = fuse_and_compare(qoperator_residual(), [_input()])
    (group,) = groups(graph)
    body = group.attrs["body"]
    with pytest.raises(qnnjit.QnnjitError, match="operand 0"):
        graph.add_node("fused", [graph.inputs[0]], {"body": body, "kind": "x"})


def test_verifier_checks_fused_bodies():
    graph = fuse_and_compare(qoperator_residual(), [_input()])
    (group,) = groups(graph)
    qconv = next(n for n in group.attrs["body"].nodes if n.op == "qconv")
    qconv.outputs[0].type = TensorType(dtypes.int16, qconv.outputs[0].type.shape)
    with pytest.raises(VerificationError, match="body of"):
        verify(graph)


def test_printer_shows_fused_bodies_deterministically():
    def build():
        g = Graph("g")
        x = g.add_input("x", TensorType(dtypes.uint8, (1, 1, 2, 2)))
        w = g.constant(np.full((2, 1, 1, 1), 3, np.int8), "w")
        acc = g.add_node("qconv", [x, w, g.constant(np.uint8(1), "xz")], CONV, name="conv")
        g.set_outputs([_requantize(g, acc.outputs[0], 0.5, "y")])
        fuse_epilogues(g)
        accumulator_ranges(g)
        return g

    text = str(build())
    assert text == str(build())
    assert text == "\n".join(
        [
            "graph g(%x: uint8[1x1x2x2]) -> (%y) {",
            "  %y = fused(%x) {kind=conv+requantize} : uint8[1x2x2x2] q<uint8:float32, 1:0>",
            "    graph conv(%x: uint8[1x1x2x2]) -> (%y) {",
            "      %conv = qconv(%x, %w=[3,3], %xz=[1]) {dilations=[1,1], group=1, "
            "i16_pairs=pairs<[0, 765], fits>, pads=[0,0,0,0], strides=[1,1]} "
            ": int32[1x2x2x2] acc<i16, range=[-3, 762]>",
            "      %y = requantize(%conv, %y_m=[0.5], %y_zp=[0], %y_s=[1.]) "
            "{axis=None, dtype=uint8, rounding=half_even_float} "
            ": uint8[1x2x2x2] q<uint8:float32, 1:0>",
            "    }",
            "}",
        ]
    )


# ---- range analysis: hand-computed goldens ------------------------------------------


def _codes(shape, dtype=np.uint8, seed=0):
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(dtype)


def _requantize(g, acc, multiplier, name, clamp=None, dtype=dtypes.uint8):
    inputs = [
        acc,
        g.constant(np.float32(multiplier), f"{name}_m"),
        g.constant(np.zeros((), dtype.numpy), f"{name}_zp"),
        g.constant(np.float32(1.0), f"{name}_s"),
    ]
    attrs = {"dtype": dtype, "axis": None, "rounding": "half_even_float"}
    if clamp is not None:
        attrs["clamp"] = clamp
    return g.add_node("requantize", inputs, attrs, name=name, output_names=[name]).outputs[0]


def _qadd(g, a, b):
    def c(value, dtype):
        return g.constant(np.asarray(value, dtype))

    inputs = [a, c(0.5, np.float32), c(0, np.uint8), b, c(0.5, np.float32), c(0, np.uint8)]
    inputs += [c(1.0, np.float32), c(0, np.uint8)]
    return g.add_node("qadd", inputs, {"rounding": "mlas_fma"}).outputs[0]


def _conv_case(w, *, x_dtype=dtypes.uint8, x_zp=None, w_zp=None, bias=None, x_shape=None):
    g = Graph()
    w = np.asarray(w)
    x = g.add_input("x", TensorType(x_dtype, x_shape or (1, w.shape[1], *w.shape[2:])))
    inputs = [x, g.constant(w, "w")]
    inputs.append(None if x_zp is None else g.constant(np.asarray(x_zp, x_dtype.numpy), "xz"))
    inputs.append(None if w_zp is None else g.constant(np.asarray(w_zp, w.dtype), "wz"))
    inputs.append(None if bias is None else g.constant(np.asarray(bias, np.int32), "bias"))
    node = g.add_node("qconv", inputs, CONV, name="conv")
    g.set_outputs(node.outputs)
    return g, node


def _extreme_input(node, channel, upper, x_range, zp):
    """The x that drives channel `channel` to its max (upper) or min: each
    tap at the end of x's range that maximizes/minimizes (x - zp) * d."""
    d = node.inputs[1].const.astype(np.int64)[channel]
    if node.input(3) is not None:
        d = d - node.input(3).const.astype(np.int64).reshape(-1)[channel % node.input(3).const.size]
    high = (d > 0) if upper else (d < 0)
    x = np.where(high, x_range[1], x_range[0])
    return x[None].astype(node.inputs[0].type.dtype.numpy)


def test_qconv_range_golden():
    """x: uint8, zp 10 -> x - zp in [-10, 245]; bias [5, -7].
    ch0 d = [1, -2, 3, 0]: max 245 + 20 + 735 + 0 + 5 = 1005, min -10 - 490 - 30 + 5 = -525
    ch1 d = [-1]*4:        max 4*10 - 7 = 33,               min -4*245 - 7 = -987
    vpmaddubsw pairs (u = x in [0, 255]): ch0 taps [0,255], [-510,0], [0,765], [0,0]
    -> any two: [-510, 1020]; ch1 taps [-255, 0] -> [-510, 0]."""
    w = np.array([[[[1, -2], [3, 0]]], [[[-1, -1], [-1, -1]]]], np.int8)
    g, node = _conv_case(w, x_zp=10, bias=[5, -7])
    assert accumulator_ranges(g) is True
    assert node.outputs[0].type.accumulator == Accumulator(16, -987, 1005)
    assert node.attrs["i16_pairs"] == PairSums(-510, 1020)
    assert not node.attrs["i16_pairs"].saturates
    run = ReferenceExecutor(g).run
    assert run([_extreme_input(node, 0, True, (0, 255), 10)])[0][0, 0].item() == 1005
    assert run([_extreme_input(node, 1, False, (0, 255), 10)])[0][0, 1].item() == -987


def test_partial_sums_decide_the_width():
    """sum of 200 taps x * 1 in [0, 51000], bias -40000: the result [-40000,
    11000] fits int16, a partial sum does not -> 32 bits."""
    g, node = _conv_case(np.ones((1, 1, 1, 200), np.int8), bias=[-40000])
    accumulator_ranges(g)
    assert node.outputs[0].type.accumulator == Accumulator(32, -40000, 11000)


def test_padding_and_folded_zero_point():
    """pad_value (zero-point folding: x_zp dropped, padding is the stored old
    zp) with a clamped producer: x in [0, 100], pad 120 -> taps in [0, 120]."""
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.int32, (1, 1, 2, 2)))
    x = _requantize(g, a, 1.0, "x", clamp=(0, 100))
    w = g.constant(np.array([[[[2]]], [[[-1]]]], np.int8), "w")
    attrs = dict(CONV, pads=[1, 1, 1, 1], pad_value=120)
    node = g.add_node("qconv", [x, w], attrs, name="conv")
    g.set_outputs(node.outputs)
    accumulator_ranges(g)
    assert node.outputs[0].type.accumulator == Accumulator(16, -120, 240)
    assert node.attrs["i16_pairs"] == PairSums(-120, 240)  # one tap: paired with nothing


def test_qmatmul_per_column_zero_points_and_separate_bias():
    """a: uint8 zp 128 -> [-128, 127]; b - zb: col0 [1, 2, -3], col1 [-2, -1, 3]
    -> each column [-765, 765]; bias [1000, -2000] -> [-2765, 1765]."""
    g = Graph()
    a = g.add_input("a", TensorType(dtypes.uint8, (2, 3)))
    b = g.constant(np.array([[1, -1], [2, 0], [-3, 4]], np.int8), "b")
    zb = g.constant(np.array([0, 1], np.int8), "zb")
    mm = g.add_node("qmatmul", [a, b, g.constant(np.uint8(128), "za"), zb], name="mm")
    add = g.add_node("add", [mm.outputs[0], g.constant(np.array([1000, -2000], np.int32))])
    g.set_outputs(add.outputs)
    accumulator_ranges(g)
    assert mm.outputs[0].type.accumulator == Accumulator(16, -765, 765)
    assert add.outputs[0].type.accumulator == Accumulator(16, -2765, 1765)
    # a = [255, 255, 0]: col0 at its max (d > 0 taps high), col1 at its min.
    acc = ReferenceExecutor(g).run([np.array([[255, 255, 0]] * 2, np.uint8)])[0]
    assert acc[0, 0] == 1765 and acc[1, 1] == -2765


def test_qreduce_sum_range():
    """int8 x, zp -3: x - zp in [-125, 130], 25 terms -> [-3125, 3250]."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.int8, (1, 4, 5, 5)))
    node = g.add_node("qreduce_sum", [x, g.constant(np.int8(-3))], {"axes": (2, 3)})
    g.set_outputs(node.outputs)
    accumulator_ranges(g)
    assert node.outputs[0].type.accumulator == Accumulator(16, -3125, 3250)


@pytest.mark.parametrize("seed", range(8))
def test_conv_ranges_hold_and_are_attained(seed):
    """Random convs (storage types, zero points, per-channel zw, groups,
    padding with a pad_value): every output lies in [lo, hi], and the extreme
    inputs reach both bounds (a 3x3 input with a 3x3 kernel has a window
    without padding)."""
    rng = np.random.default_rng(seed)
    x_dtype = [dtypes.uint8, dtypes.int8][seed % 2]
    group, m = (1, 4) if seed % 3 else (2, 4)
    channels = 2 * group
    w = rng.integers(-128, 128, (m, channels // group, 3, 3)).astype(np.int8)
    g = Graph()
    x = g.add_input("x", TensorType(x_dtype, (1, channels, 3, 3)))
    xz = g.constant(np.asarray(rng.integers(x_dtype.qmin, x_dtype.qmax + 1), x_dtype.numpy))
    wz = g.constant(rng.integers(-5, 6, m).astype(np.int8))
    bias = g.constant(rng.integers(-5000, 5000, m).astype(np.int32))
    attrs = dict(CONV, group=group, pads=[1, 1, 1, 1])
    if seed % 4 == 3:
        attrs["pad_value"] = int(rng.integers(x_dtype.qmin, x_dtype.qmax + 1))
    node = g.add_node("qconv", [x, g.constant(w), xz, wz, bias], attrs, name="conv")
    g.set_outputs(node.outputs)
    accumulator_ranges(g)
    acc = node.outputs[0].type.accumulator
    run = ReferenceExecutor(g).run
    seen = []
    ends = np.array([x_dtype.qmin, x_dtype.qmax], x_dtype.numpy)
    for trial in range(200):
        values = ends[rng.integers(0, 2, (1, channels, 3, 3))] if trial % 2 else None
        if values is None:
            values = rng.integers(x_dtype.qmin, x_dtype.qmax + 1, (1, channels, 3, 3))
        seen.append(run([values.astype(x_dtype.numpy)])[0])
    zx, d = int(xz.const), w.astype(np.int64) - wz.const.reshape(-1, 1, 1, 1)
    for upper in (True, False):  # drive each channel's centre window to its bound
        for channel in range(m):
            want_high = (d[channel] > 0) == upper
            taps = np.where(want_high, x_dtype.qmax, x_dtype.qmin).astype(x_dtype.numpy)
            values = np.full((1, channels, 3, 3), zx, x_dtype.numpy)
            first = (channel // (m // group)) * (channels // group)
            values[0, first : first + channels // group] = taps
            seen.append(run([values])[0])
    seen = np.stack(seen)
    assert acc.lo <= seen.min() and seen.max() <= acc.hi
    assert seen.min() == acc.lo and seen.max() == acc.hi


def test_pairwise_saturation_hand_case():
    """w = [127, 127, -128, 5], u8 x in [0, 255]: two taps 255*127 = 64770 >
    32767 (saturates); a producer clamped to [0, 128] gives 2*128*127 = 32512
    (fits). int8 x is shifted to u = x + 128: the same u range."""
    w = np.array([[[[127, 127, -128, 5]]]], np.int8)
    g, node = _conv_case(w)
    accumulator_ranges(g)
    assert node.attrs["i16_pairs"] == PairSums(-32640, 64770)
    assert node.attrs["i16_pairs"].saturates

    g = Graph()
    a = g.add_input("a", TensorType(dtypes.int32, (1, 1, 1, 4)))
    x = _requantize(g, a, 1.0, "x", clamp=(0, 128))
    node = g.add_node("qconv", [x, g.constant(w, "w")], CONV, name="conv")
    g.set_outputs(node.outputs)
    accumulator_ranges(g)
    assert node.attrs["i16_pairs"] == PairSums(-16384, 32512)
    assert not node.attrs["i16_pairs"].saturates

    g, node = _conv_case(w, x_dtype=dtypes.int8)
    accumulator_ranges(g)
    assert node.attrs["i16_pairs"] == PairSums(-32640, 64770)


def test_adjacent_pairs_depend_on_the_packing():
    w = np.array([[127, -128, 127, -128]], np.int8)
    assert pair_sum_range((0, 255), w) == PairSums(-65280, 64770)  # any two taps
    assert pair_sum_range((0, 255), w, adjacent=True) == PairSums(-32640, 32385)
    assert pair_sum_range((0, 255), np.array([[100, 100, 100]]), adjacent=True).hi == 51000


# ---- overflow: reported by name ---------------------------------------------------


def _overflowing(case):
    """(graph, node, exact range) of an accumulator that leaves int32."""
    if case == "int16_weights":  # 4 taps of (-32768) * (-32768) = 2^30
        graph, node = _conv_case(np.full((1, 1, 2, 2), -32768, np.int16), x_dtype=dtypes.int16)
        return graph, node, (4 * 32767 * -32768, 1 << 32)
    graph = Graph()
    x = graph.add_input("x", TensorType(dtypes.uint8, (1, 1, 4096, 4096)))  # K = 2^24
    node = graph.add_node("qreduce_sum", [x], {"axes": (2, 3)}, name="huge_pool")
    graph.set_outputs(node.outputs)
    return graph, node, (0, 255 << 24)


@pytest.mark.parametrize("case", ["int16_weights", "huge_k"])
def test_int32_overflow_is_reported_by_name(case):
    graph, node, (lo, hi) = _overflowing(case)
    with pytest.warns(AccumulatorOverflowWarning, match=repr(node.name)):
        accumulator_ranges(graph)
    assert node.outputs[0].type.accumulator == Accumulator(32, lo, hi)
    graph, node, _ = _overflowing(case)
    with pytest.raises(AccumulatorOverflowError, match=repr(node.name)):
        accumulator_ranges(graph, strict=True)


def conv_integer_model(k: int):
    """ConvInteger with K = k input channels of uint8 x and int8 w = -128."""
    w = numpy_helper.from_array(np.full((1, k, 1, 1), -128, np.int8), "w")
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="wide_conv")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TP.UINT8, [1, k, 1, 1])],
        [helper.make_tensor_value_info("y", TP.INT32, [1, 1, 1, 1])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_compile_warns_or_fails_under_the_strict_flag(monkeypatch):
    model = conv_integer_model(66000)  # 66000 * 255 * 128 > 2^31
    monkeypatch.delenv("QNNJIT_STRICT_RANGES", raising=False)
    with pytest.warns(AccumulatorOverflowWarning, match="'wide_conv'"):
        qnnjit.compile(model, target="reference")
    with pytest.raises(AccumulatorOverflowError, match="'wide_conv'"):
        qnnjit.compile(model, target="reference", strict_ranges=True)
    monkeypatch.setenv("QNNJIT_STRICT_RANGES", "1")
    with pytest.raises(AccumulatorOverflowError, match="'wide_conv'"):
        qnnjit.compile(model, target="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qnnjit.compile(conv_integer_model(60000), target="reference")  # fits: silent


# ---- the report -----------------------------------------------------------------


def test_report_shows_groups_qdq_log_accumulators_and_both_irs(tmp_path, capsys):
    import onnx

    from qnnjit import cli

    path = tmp_path / "residual.onnx"
    onnx.save(qdq_residual(), path)
    report = qnnjit.compile(str(path), target="reference").report()
    for expected in (
        "node counts (frontend -> optimized)",
        "fused groups (1):",
        ": conv+requantize+add (qconv -> requantize -> qadd)",
        "QDQ units rewritten to integer ops",
        "quantize nodes kept (1)",
        "accumulators (1, 0 provably 16-bit safe",
        "(qconv): i32 [",
        "IR before (frontend output):",
        "IR after (optimized):",
        "= fused(",
    ):
        assert expected in report, expected
    assert cli.main(["inspect", str(path), "--target", "reference"]) == 0
    assert capsys.readouterr().out.strip() == report.strip()


# ---- the model zoo: the acceptance criterion ------------------------------------------


def _zoo_cases():
    import modelzoo

    return [
        pytest.param(model, variant, id=f"{model}-{variant}")
        for model in ("resnet_style", "mobilenetv2_style")
        for variant in modelzoo.all_variants()
        if variant.activation_type.name == "QUInt8"
    ]


@pytest.mark.parametrize("model_name, variant", _zoo_cases())
def test_zoo_convs_are_fused_and_only_boundary_qdq_remains(model_zoo, model_name, variant):
    import modelzoo

    graph = load_onnx(str(model_zoo.build(model_name, variant)))
    run_pipeline(graph, BEFORE_FUSION)
    convs = graph.op_counts().get("qconv", 0)
    adds = graph.op_counts().get("qadd", 0)
    graph = fuse_and_compare(graph, [modelzoo.example_input(model_name)])
    counts = graph.op_counts()
    for op in ("qconv", "qadd", "requantize", "qmatmul", "qreduce_sum"):
        assert op not in counts, f"a standalone {op} is left"
    bodies = [g.attrs["body"].op_counts() for g in groups(graph)]
    assert sum(b.get("qconv", 0) for b in bodies) == convs
    assert all(b.get("qconv", 0) <= 1 for b in bodies)  # one fused node per conv
    assert sum(b.get("qadd", 0) for b in bodies) == adds  # residual adds in conv groups
    for node in graph.nodes:
        if node.op == "quantize":
            assert node.inputs[0] in graph.inputs, f"{node.name} quantizes an inner value"
        if node.op == "dequantize":
            assert graph.is_output(node.outputs[0]), f"{node.name} is not at an output"
    for group in groups(graph):
        for inner in group.attrs["body"].nodes:
            if inner.op in ("qconv", "qmatmul", "qreduce_sum"):
                accumulator = inner.outputs[0].type.accumulator
                assert accumulator.lo is not None and accumulator.bits in (16, 32)
