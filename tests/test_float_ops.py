"""Float ops (and the data-movement ops quantized graphs run on integers):
each ONNX model is built here with onnx.helper, compiled for the reference
target and compared with ONNX Runtime. Float math compares with a small
tolerance; pure data movement (reshape, transpose, slice, concat, pad, max
pool, gather, nearest resize, ...) must match exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qnnjit
from qnnjit.errors import ModelError, QnnjitError

OPSET = 21
RNG = np.random.default_rng(0)


# ---- model building and comparison ----------------------------------------------


def rand(*shape, dtype=np.float32, low=-3.0, high=3.0):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return RNG.uniform(low, high, size=shape).astype(dtype)


def _elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def graph_model(nodes, feeds, outputs, consts=None, opset=OPSET, shapes=None):
    """A model whose graph inputs are `feeds` (name -> example array; `shapes`
    may give symbolic shapes), initializers `consts`, and `outputs`
    (name -> NumPy dtype)."""
    shapes = shapes or {}
    inputs = [
        helper.make_tensor_value_info(name, _elem(a.dtype), shapes.get(name, a.shape))
        for name, a in feeds.items()
    ]
    outs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    inits = [numpy_helper.from_array(np.asarray(a), name) for name, a in (consts or {}).items()]
    graph = helper.make_graph(nodes, "test", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    # Output types come from ONNX shape inference (the checker requires them).
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for value, dtype in zip(model.graph.output, outputs.values(), strict=True):
        assert value.type.tensor_type.elem_type == _elem(dtype), value
    return model


def node_model(
    op_type, feeds, consts=None, attrs=None, order=None, outputs=None, opset=OPSET, shapes=None
):
    """One-node model. Inputs are `order` (names, '' for omitted) or feeds
    then consts; outputs default to one named 'y' of the first input's type."""
    consts = consts or {}
    order = order if order is not None else [*feeds, *consts]
    first = {**feeds, **consts}[order[0]]
    outputs = outputs or {"y": first.dtype}
    node = helper.make_node(op_type, order, list(outputs), **(attrs or {}))
    return graph_model([node], feeds, outputs, consts, opset, shapes)


def compare(model, feeds, *, exact=False, rtol=1e-5, atol=1e-5):
    """Run qnnjit (reference) and ONNX Runtime; returns qnnjit's outputs."""
    ours = qnnjit.compile(model, target="reference").run(feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    theirs = dict(zip(names, session.run(None, feeds), strict=True))
    for name in names:
        got, want = ours[name], theirs[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if exact:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
    return ours


def check_node(op_type, feeds, consts=None, attrs=None, *, exact=False, **kwargs):
    model_kwargs = {
        k: kwargs.pop(k) for k in ("order", "outputs", "opset", "shapes") if k in kwargs
    }
    model = node_model(op_type, feeds, consts, attrs, **model_kwargs)
    return compare(model, feeds, exact=exact, **kwargs)


def output_type(model, name="y"):
    compiled = qnnjit.compile(model, target="reference")
    return next(v.type for v in compiled.graph.outputs if v.name == name)


# ---- convolution, gemm, matmul ---------------------------------------------------

CONV_CASES = [
    # (input shape, weight shape, attrs)
    ((1, 3, 9, 9), (4, 3, 3, 3), {}),
    ((2, 3, 9, 8), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((1, 3, 10, 10), (6, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ((1, 4, 11, 11), (4, 2, 3, 3), {"group": 2, "dilations": [2, 2]}),
    ((1, 6, 8, 8), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),  # depthwise
    ((1, 3, 10, 9), (5, 3, 3, 2), {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),
    ((1, 3, 10, 9), (5, 3, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ((1, 3, 10, 9), (5, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}),
    ((1, 3, 7, 7), (2, 3, 1, 1), {"strides": [2, 2]}),
    ((2, 3, 12), (4, 3, 3), {"strides": [2], "pads": [1, 2], "dilations": [2]}),  # 1-D
    ((1, 2, 5, 6, 7), (3, 2, 3, 2, 3), {"pads": [1, 0, 1, 1, 1, 0], "strides": [1, 2, 2]}),  # 3-D
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv(x_shape, w_shape, attrs, bias):
    consts = {"w": rand(*w_shape)}
    if bias:
        consts["b"] = rand(w_shape[0])
    check_node("Conv", {"x": rand(*x_shape)}, consts, attrs, rtol=1e-4, atol=1e-4)


def test_conv_weight_as_input_and_kernel_shape_attr():
    feeds = {"x": rand(1, 2, 6, 6), "w": rand(3, 2, 3, 3)}
    check_node("Conv", feeds, attrs={"kernel_shape": [3, 3]}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "a_shape,b_shape,c_shape,attrs",
    [
        ((3, 4), (4, 5), None, {}),
        ((4, 3), (4, 5), (5,), {"transA": 1}),
        ((3, 4), (5, 4), (3, 5), {"transB": 1, "alpha": 0.5, "beta": 2.0}),
        ((4, 3), (5, 4), (), {"transA": 1, "transB": 1, "beta": -1.0}),
        ((3, 4), (4, 5), (3, 1), {"alpha": 2.0}),
    ],
)
def test_gemm(a_shape, b_shape, c_shape, attrs):
    consts = {"b": rand(*b_shape)}
    order = ["a", "b"]
    if c_shape is not None:
        consts["c"] = rand(*c_shape)
        order.append("c")
    check_node("Gemm", {"a": rand(*a_shape)}, consts, attrs, order=order, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((4,), (4,)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,)), ((3, 4), (4, 5)),
     ((2, 1, 3, 4), (5, 4, 6)), ((1, 3, 4), (2, 4, 2))],
)  # fmt: skip
def test_matmul(a_shape, b_shape):
    check_node("MatMul", {"a": rand(*a_shape), "b": rand(*b_shape)}, rtol=1e-4, atol=1e-4)


# ---- activations -----------------------------------------------------------------

UNARY_FLOAT = [
    ("Relu", {}),
    ("LeakyRelu", {}),
    ("LeakyRelu", {"alpha": 0.3}),
    ("Sigmoid", {}),
    ("HardSigmoid", {}),
    ("HardSigmoid", {"alpha": 0.5, "beta": 0.2}),
    ("HardSwish", {}),
    ("Tanh", {}),
    ("Erf", {}),
    ("Neg", {}),
    ("Abs", {}),
    ("Exp", {}),
    ("Floor", {}),
    ("Ceil", {}),
    ("Sign", {}),
    ("Softmax", {}),
    ("Softmax", {"axis": 1}),
    ("Softmax", {"axis": -3}),
    ("LogSoftmax", {"axis": 2}),
]


@pytest.mark.parametrize("op_type,attrs", UNARY_FLOAT)
def test_unary_float(op_type, attrs):
    x = rand(2, 3, 4, 5) * 3
    x[0, 0, 0, :3] = [0.0, -0.0, 3.0]
    check_node(op_type, {"x": x}, attrs=attrs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op_type", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op_type):
    check_node(op_type, {"x": rand(3, 7, low=0.1, high=9)}, rtol=1e-6, atol=1e-7)


def test_round_half_to_even():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, 2.6, -7.2], np.float32)
    check_node("Round", {"x": x}, exact=True)


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gelu(approximate):
    attrs = {} if approximate is None else {"approximate": approximate}
    check_node("Gelu", {"x": rand(3, 17) * 2}, attrs=attrs, opset=20, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int8, np.int32])
def test_relu_integer(dtype):
    check_node("Relu", {"x": rand(4, 9, dtype=dtype)}, exact=True)


@pytest.mark.parametrize(
    "lo,hi", [(None, None), (-1.0, None), (None, 0.5), (-0.5, 2.0), (1.0, -1.0)]
)
def test_clip(lo, hi):
    consts, order = {}, ["x"]
    for name, value in (("lo", lo), ("hi", hi)):
        if value is not None:
            consts[name] = np.array(value, np.float32)
        order.append(name if value is not None else "")
    while order[-1] == "":
        order.pop()
    check_node("Clip", {"x": rand(3, 8)}, consts, order=order, exact=True)


def test_clip_int8():
    consts = {"lo": np.array(-20, np.int8), "hi": np.array(100, np.int8)}
    check_node("Clip", {"x": rand(64, dtype=np.int8)}, consts, exact=True)


@pytest.mark.parametrize("slope_shape", [(1,), (4, 1, 1), (5,)])
def test_prelu(slope_shape):
    check_node("PRelu", {"x": rand(2, 4, 3, 5)}, {"s": rand(*slope_shape)}, exact=True)


# ---- normalizations --------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 1, 2, 0])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(axis, bias):
    shape = (2, 3, 8)
    norm = shape[axis:] if axis >= 0 else shape[axis:]
    consts = {"scale": rand(*norm)}
    if bias:
        consts["bias"] = rand(*norm)
    outputs = {"y": np.float32, "mean": np.float32, "inv_std": np.float32}
    check_node(
        "LayerNormalization", {"x": rand(*shape)}, consts, {"axis": axis, "epsilon": 1e-3},
        outputs=outputs, rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_layer_norm_only_y():
    consts = {"scale": rand(16), "bias": rand(16)}
    check_node("LayerNormalization", {"x": rand(4, 16)}, consts, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3), (1, 3, 6)])
def test_batch_norm(shape):
    c = shape[1]
    consts = {"s": rand(c), "b": rand(c), "m": rand(c), "v": rand(c, low=0.1, high=2)}
    check_node(
        "BatchNormalization", {"x": rand(*shape)}, consts, {"epsilon": 1e-3}, rtol=1e-4, atol=1e-5
    )


def test_batch_norm_training_mode_is_rejected():
    consts = {"s": rand(3), "b": rand(3), "m": rand(3), "v": rand(3, low=0.1, high=2)}
    outputs = {"y": np.float32, "mean": np.float32, "var": np.float32}
    model = node_model(
        "BatchNormalization", {"x": rand(2, 3, 4)}, consts, {"training_mode": 1}, outputs=outputs
    )
    with pytest.raises(ModelError, match="training_mode"):
        qnnjit.compile(model, target="reference")


# ---- pooling ---------------------------------------------------------------------

POOL_CASES = [
    ((1, 2, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((1, 2, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 9, 10), {"kernel_shape": [3, 2], "strides": [2, 3], "ceil_mode": 1}),
    (
        (1, 2, 10, 10),
        {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 0, 0], "ceil_mode": 1},
    ),
    ((1, 2, 11, 11), {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((1, 2, 10, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 10, 9), {"kernel_shape": [4, 4], "strides": [3, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 10, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"}),
    ((2, 3, 11), {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}),
    (
        (1, 2, 5, 6, 7),
        {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2], "pads": [0, 1, 1, 1, 1, 0]},
    ),
]


@pytest.mark.parametrize("shape,attrs", POOL_CASES)
def test_max_pool(shape, attrs):
    check_node("MaxPool", {"x": rand(*shape)}, attrs=attrs, exact=True)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("shape,attrs", [POOL_CASES[1], POOL_CASES[3]])
def test_max_pool_integer(shape, attrs, dtype):
    check_node("MaxPool", {"x": rand(*shape, dtype=dtype)}, attrs=attrs, exact=True)


def test_max_pool_indices_output_is_rejected():
    model = node_model("MaxPool", {"x": rand(1, 1, 4, 4)}, attrs={"kernel_shape": [2, 2]},
                       outputs={"y": np.float32, "i": np.int64})  # fmt: skip
    with pytest.raises(ModelError, match="Indices"):
        qnnjit.compile(model, target="reference")


@pytest.mark.parametrize("shape,attrs", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool(shape, attrs, count_include_pad):
    attrs = {**attrs, "count_include_pad": count_include_pad}
    check_node("AveragePool", {"x": rand(*shape)}, attrs=attrs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op_type", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 7)])
def test_global_pool(op_type, shape):
    check_node(op_type, {"x": rand(*shape)}, rtol=1e-5, atol=1e-6)


# ---- shape and data movement ---------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2, 4, -1, -4])
def test_flatten(axis):
    check_node("Flatten", {"x": rand(2, 3, 4, 5, dtype=np.int8)}, attrs={"axis": axis}, exact=True)


@pytest.mark.parametrize(
    "in_shape,target,allowzero",
    [((2, 3, 4), (4, -1), 0), ((2, 3, 4), (0, -1), 0), ((2, 3, 4), (0, 0, 2, 2), 0),
     ((2, 3, 4), (-1,), 0), ((2, 0, 4), (0, 8, 0), 1), ((2, 3, 4), (6, 4), 1)],
)  # fmt: skip
def test_reshape(in_shape, target, allowzero):
    check_node(
        "Reshape", {"x": rand(*in_shape, dtype=np.uint8)}, {"shape": np.array(target, np.int64)},
        {"allowzero": allowzero}, exact=True,
    )  # fmt: skip


@pytest.mark.parametrize("perm", [None, [0, 2, 3, 1], [3, 1, 0, 2]])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": perm}
    check_node("Transpose", {"x": rand(2, 3, 4, 5, dtype=np.int8)}, attrs=attrs, exact=True)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_concat(axis, dtype):
    shapes = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    for index, shape in enumerate(shapes):
        shape[axis] += index
    feeds = {f"x{i}": rand(*s, dtype=dtype) for i, s in enumerate(shapes)}
    check_node("Concat", feeds, attrs={"axis": axis}, exact=True)


@pytest.mark.parametrize(
    "opset,split,attrs,outputs",
    [(13, None, {"axis": 2}, 2), (13, [1, 4, 2], {"axis": 1}, 3),
     (18, None, {"axis": -1, "num_outputs": 2}, 2), (18, None, {"axis": 1, "num_outputs": 4}, 4),
     (18, [2, 0, 5], {"axis": 1}, 3)],
)  # fmt: skip
def test_split(opset, split, attrs, outputs):
    consts = {} if split is None else {"split": np.array(split, np.int64)}
    check_node(
        "Split", {"x": rand(2, 7, 4, dtype=np.int8)}, consts, attrs, exact=True, opset=opset,
        outputs={f"y{i}": np.int8 for i in range(outputs)},
    )  # fmt: skip


SLICE_CASES = [
    ([1], [3], None, None),
    ([0, 1], [2, -1], [0, 2], None),
    ([-3], [100], [1], None),
    ([-100, 2], [1000, 1000], [1, 2], [2, 1]),
    ([-1], [-1000], [2], [-1]),
    ([3, -2], [0, -100], [1, 2], [-2, -3]),
    ([10], [20], [1], None),  # clamped to empty
    ([0], [np.iinfo(np.int64).max], [-1], [1]),
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICE_CASES)
def test_slice(starts, ends, axes, steps):
    consts = {"starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64)}
    order = ["x", "starts", "ends"]
    if axes is not None:
        consts["axes"] = np.array(axes, np.int64)
        order.append("axes")
    if steps is not None:
        if axes is None:
            order.append("")
        consts["steps"] = np.array(steps, np.int64)
        order.append("steps")
    check_node("Slice", {"x": rand(4, 5, 6, dtype=np.int8)}, consts, order=order, exact=True)


@pytest.mark.parametrize("axes", [None, [1], [-1, 1]])
def test_squeeze(axes):
    consts = {} if axes is None else {"axes": np.array(axes, np.int64)}
    check_node("Squeeze", {"x": rand(2, 1, 3, 1)}, consts, exact=True, opset=13)


@pytest.mark.parametrize("axes", [[0], [1, 3], [-1], [4, 0]])
def test_unsqueeze(axes):
    check_node(
        "Unsqueeze", {"x": rand(2, 3, 4)}, {"axes": np.array(axes, np.int64)}, exact=True, opset=13
    )


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [1, 0, 0, 1, 2, 0]])
def test_pad(mode, pads):
    consts = {"pads": np.array(pads, np.int64)}
    if mode == "constant":
        consts["value"] = np.array(1.5, np.float32)
    check_node("Pad", {"x": rand(3, 4, 5)}, consts, {"mode": mode}, exact=True, opset=19)


def test_pad_negative_and_axes():
    consts = {"pads": np.array([-1, 2, 1, -2], np.int64), "value": np.array(7, np.uint8),
              "axes": np.array([2, -2], np.int64)}  # fmt: skip
    check_node("Pad", {"x": rand(3, 4, 5, dtype=np.uint8)}, consts, exact=True, opset=18)


def test_pad_opset13_int8():
    consts = {"pads": np.array([0, 1, 1, 0], np.int64)}
    check_node(
        "Pad", {"x": rand(3, 4, dtype=np.int8)}, consts, {"mode": "edge"}, exact=True, opset=13
    )


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize(
    "indices", [np.array([0, 2, -1]), np.array([[1, 0], [-2, 1]]), np.array(1)]
)
def test_gather(axis, indices):
    feeds = {"x": rand(3, 4, 3, dtype=np.int8)}
    check_node("Gather", feeds, {"i": indices.astype(np.int64)}, {"axis": axis}, exact=True)


def test_gather_runtime_indices():
    feeds = {"x": rand(5, 4), "i": np.array([[4, 0], [-1, 2]], np.int32)}
    check_node("Gather", feeds, exact=True)


def test_expand():
    check_node(
        "Expand", {"x": rand(3, 1, dtype=np.int8)}, {"s": np.array([2, 1, 4], np.int64)}, exact=True
    )


# ---- reductions ------------------------------------------------------------------


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([0, -1], 0), (None, 1), (None, 0)])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce(op_type, axes, keepdims, opset):
    feeds, consts, attrs = {"x": rand(3, 4, 5)}, {}, {"keepdims": keepdims}
    if axes is not None:
        if opset < 18:
            attrs["axes"] = axes
        else:
            consts["axes"] = np.array(axes, np.int64)
    check_node(op_type, feeds, consts, attrs, opset=opset, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes", [None, [2]])
def test_reduce_sum_noop_with_empty_axes(axes):
    consts = {} if axes is None else {"axes": np.array(axes, np.int64)}
    attrs = {"noop_with_empty_axes": 1}
    check_node("ReduceSum", {"x": rand(2, 3, 4)}, consts, attrs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type", ["ReduceMax", "ReduceMin"])
def test_reduce_integer(op_type):
    check_node(op_type, {"x": rand(3, 7, dtype=np.int8)}, attrs={"axes": [1]}, exact=True, opset=13)


# ---- elementwise ---------------------------------------------------------------


@pytest.mark.parametrize("op_type", ["Min", "Max", "Sum"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_variadic(op_type, count):
    shapes = [(2, 3, 4), (3, 1), (4,)][:count]
    feeds = {f"x{i}": rand(*s) for i, s in enumerate(shapes)}
    check_node(op_type, feeds, exact=op_type != "Sum", rtol=1e-6)


def test_min_max_int8():
    feeds = {"a": rand(3, 4, dtype=np.int8), "b": rand(4, dtype=np.int8)}
    check_node("Min", feeds, exact=True)
    check_node("Max", feeds, exact=True)


@pytest.mark.parametrize(
    "base,exponent",
    [(rand(3, 4, low=0.1, high=3), rand(3, 4)), (rand(3, 4), np.array(2.0, np.float32)),
     (rand(3, 4), np.array([1, 2, 3, 0], np.int64)),
     (np.arange(-3, 9, dtype=np.int32).reshape(3, 4), np.array(3, np.int32))],
)  # fmt: skip
def test_pow(base, exponent):
    check_node("Pow", {"x": base, "e": exponent}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_compare(op_type):
    a = rand(3, 4, dtype=np.int8) // 32
    b = rand(4, dtype=np.int8) // 32
    check_node(op_type, {"a": a, "b": b}, outputs={"y": np.bool_}, exact=True)


def test_where_and_logic():
    feeds = {"c": rand(3, 1) > 0, "x": rand(3, 4), "y0": rand(4)}
    check_node("Where", feeds, outputs={"y": np.float32}, exact=True)
    bools = {"a": rand(3, 4) > 0, "b": rand(4) > 0}
    for op_type in ("And", "Or", "Xor"):
        check_node(op_type, bools, exact=True)
    check_node("Not", {"a": bools["a"]}, exact=True)


# ---- resize --------------------------------------------------------------------

NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
TRANSFORMS = [
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "half_pixel_symmetric",
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
@pytest.mark.parametrize("scales", [(1, 1, 2.0, 3.0), (1, 1, 0.6, 1.7)])
def test_resize_nearest_scales(transform, nearest_mode, scales):
    attrs = {
        "mode": "nearest",
        "coordinate_transformation_mode": transform,
        "nearest_mode": nearest_mode,
    }
    consts = {"scales": np.array(scales, np.float32)}
    check_node(
        "Resize",
        {"x": rand(1, 2, 5, 4)},
        consts,
        attrs,
        order=["x", "", "scales"],
        exact=True,
        opset=19,
    )


@pytest.mark.parametrize("sizes", [(1, 2, 9, 7), (1, 2, 3, 2), (1, 2, 1, 1)])
@pytest.mark.parametrize("transform", ["half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize("opset", [13, 19])
def test_resize_nearest_sizes(sizes, transform, opset):
    attrs = {"coordinate_transformation_mode": transform}
    consts = {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32),
              "sizes": np.array(sizes, np.int64)}  # fmt: skip
    check_node(
        "Resize", {"x": rand(1, 2, 4, 5, dtype=np.uint8)}, consts, attrs, exact=True, opset=opset
    )


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
def test_resize_axes_and_aspect_policy(policy):
    attrs = {"axes": [3, 2], "keep_aspect_ratio_policy": policy, "nearest_mode": "floor"}
    consts = {"sizes": np.array([7, 9], np.int64)}
    check_node(
        "Resize",
        {"x": rand(1, 2, 4, 5)},
        consts,
        attrs,
        order=["x", "", "", "sizes"],
        exact=True,
        opset=19,
    )


@pytest.mark.parametrize(
    "transform", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"]
)
@pytest.mark.parametrize("scales", [(1, 1, 2.0, 1.5), (1, 1, 0.5, 0.8), (1, 1, 1.3, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int8])
def test_resize_linear(transform, scales, dtype):
    attrs = {"mode": "linear", "coordinate_transformation_mode": transform}
    consts = {"scales": np.array(scales, np.float32)}
    feeds = {"x": rand(1, 2, 6, 5, dtype=dtype)}
    check_node("Resize", feeds, consts, attrs, order=["x", "", "scales"], opset=19, exact=True)


def test_resize_trilinear_and_tf_crop():
    consts = {"scales": np.array([1, 1, 1.5, 0.7, 2.0], np.float32)}
    attrs = {"mode": "linear"}
    feeds = {"x": rand(1, 2, 4, 5, 3, dtype=np.uint8)}
    check_node("Resize", feeds, consts, attrs, order=["x", "", "scales"], opset=19, exact=True)
    consts = {"roi": np.array([0, 0, 0.2, 0.1, 1, 1, 1.2, 0.7], np.float32),
              "sizes": np.array([1, 2, 5, 4], np.int64)}  # fmt: skip
    for mode in ("nearest", "linear"):
        attrs = {"mode": mode, "coordinate_transformation_mode": "tf_crop_and_resize",
                 "extrapolation_value": 9.0}  # fmt: skip
        order = ["x", "roi", "", "sizes"]
        check_node(
            "Resize", {"x": rand(1, 2, 6, 5)}, consts, attrs, order=order, opset=19, exact=True
        )


def test_resize_cubic_is_rejected():
    consts = {"scales": np.array([1, 1, 2, 2], np.float32)}
    model = node_model(
        "Resize", {"x": rand(1, 1, 2, 2)}, consts, {"mode": "cubic"}, order=["x", "", "scales"]
    )
    with pytest.raises(ModelError, match="cubic"):
        qnnjit.compile(model, target="reference")


# ---- shape computations, constants, cast ---------------------------------------


@pytest.mark.parametrize(
    "start,end", [(None, None), (1, None), (-2, None), (0, -1), (1, 2), (3, 1), (-9, 9)]
)
def test_shape(start, end):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    out = check_node(
        "Shape", {"x": rand(2, 3, 4)}, attrs=attrs, outputs={"y": np.int64}, exact=True
    )
    assert out["y"].dtype == np.int64


def test_size_and_constant_of_shape():
    check_node("Size", {"x": rand(2, 3, 4)}, outputs={"y": np.int64}, exact=True)
    value = numpy_helper.from_array(np.array([5], np.int8))
    model = node_model("ConstantOfShape", {}, {"s": np.array([2, 3], np.int64)}, {"value": value},
                       outputs={"y": np.int8})  # fmt: skip
    compare(model, {}, exact=True)
    model = node_model(
        "ConstantOfShape", {}, {"s": np.array([4], np.int64)}, outputs={"y": np.float32}
    )
    compare(model, {}, exact=True)


@pytest.mark.parametrize(
    "attr,value,dtype",
    [("value", numpy_helper.from_array(np.arange(6, dtype=np.int8).reshape(2, 3)), np.int8),
     ("value_float", 2.5, np.float32), ("value_floats", [1.0, -2.0], np.float32),
     ("value_int", 7, np.int64), ("value_ints", [1, 2, 3], np.int64)],
)  # fmt: skip
def test_constant(attr, value, dtype):
    node = helper.make_node("Constant", [], ["y"], **{attr: value})
    compare(graph_model([node], {}, {"y": dtype}), {}, exact=True)


def test_constant_sparse():
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "v"),
        numpy_helper.from_array(np.array([1, 5], np.int64), "i"),
        [2, 3],
    )
    node = helper.make_node("Constant", [], ["y"], sparse_value=sparse)
    (out,) = qnnjit.compile(graph_model([node], {}, {"y": np.float32})).run({}).values()
    np.testing.assert_array_equal(out, [[0, 1.5, 0], [0, 0, -2.0]])


@pytest.mark.parametrize(
    "src,dst",
    [(np.float32, np.int32), (np.float32, np.uint8), (np.float32, np.float16), (np.int32, np.int8),
     (np.int64, np.float32), (np.float32, np.bool_), (np.bool_, np.float32), (np.uint8, np.int64),
     (np.float16, np.float32), (np.float32, np.float64)],
)  # fmt: skip
def test_cast(src, dst):
    x = (rand(4, 6, low=-100, high=100) if src != np.bool_ else rand(4, 6) > 0).astype(src)
    check_node("Cast", {"x": x}, attrs={"to": _elem(dst)}, outputs={"y": dst}, exact=True)


@pytest.mark.parametrize(
    "target", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2]
)
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_float8(target, saturate):
    # Cast there and back: ONNX Runtime's Python API cannot return float8 arrays.
    x = np.array([0.3, -1.7, 100.0, 239.0, 241.0, 447.0, 449.0, 500.0, -1e5, 57344.0, 70000.0,
                  np.inf, -np.inf, np.nan, -0.0], np.float32)  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["x"], ["f8"], to=target, saturate=saturate),
        helper.make_node("Cast", ["f8"], ["y"], to=TensorProto.FLOAT),
    ]
    compare(graph_model(nodes, {"x": x}, {"y": np.float32}), {"x": x}, exact=True)


@pytest.mark.parametrize(
    "start,limit,delta", [(0, 10, 3), (10, 4, -2), (1.5, 4.0, 0.5), (3, 3, 1), (-2.0, 5.0, 1.25)]
)
def test_range(start, limit, delta):
    dtype = np.float32 if isinstance(start, float) else np.int64
    consts = {n: np.array(v, dtype) for n, v in (("s", start), ("l", limit), ("d", delta))}
    compare(node_model("Range", {}, consts, outputs={"y": dtype}), {}, exact=True)


def test_cast_like_and_range_need_constants():
    check_node(
        "CastLike",
        {"x": rand(3)},
        {"t": np.array([1], np.int32)},
        outputs={"y": np.int32},
        exact=True,
    )
    feeds = {"s": np.array(0, np.int64)}
    model = node_model("Range", feeds, {"l": np.array(5, np.int64), "d": np.array(1, np.int64)})
    with pytest.raises(QnnjitError, match="start"):
        qnnjit.compile(model, target="reference")


def test_non_constant_attribute_input_names_the_input():
    model = node_model("Reshape", {"x": rand(2, 3), "shape": np.array([3, 2], np.int64)})
    with pytest.raises(QnnjitError, match="shape"):
        qnnjit.compile(model, target="reference")


# ---- symbolic batch: one model per family ---------------------------------------


def _symbolic(nodes, feeds, outputs, consts, shapes, opset=OPSET):
    model = graph_model(nodes, feeds, outputs, consts, opset, shapes)
    compare(model, feeds, rtol=1e-4, atol=1e-4)
    for batch in (1, 3):  # the same compiled model serves other batch sizes
        other = {k: np.repeat(v[:1], batch, axis=0) for k, v in feeds.items()}
        compare(model, other, rtol=1e-4, atol=1e-4)
    return model


def test_symbolic_batch_nn():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["c2"], auto_pad="SAME_UPPER", group=4),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    consts = {
        "w": rand(4, 3, 3, 3),
        "b": rand(4),
        "w2": rand(4, 1, 3, 3),
        "fc": rand(5, 4),
        "fb": rand(5),
    }
    feeds = {"x": rand(2, 3, 8, 8)}
    model = _symbolic(nodes, feeds, {"y": np.float32}, consts, {"x": ["N", 3, 8, 8]})
    assert output_type(model).shape == ("N", 5)


def test_symbolic_spatial_same_conv_keeps_symbols():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER")]
    feeds = {"x": rand(1, 2, 6, 7)}
    model = _symbolic(
        nodes, feeds, {"y": np.float32}, {"w": rand(3, 2, 3, 3)}, {"x": ["N", 2, "H", "W"]}
    )
    assert output_type(model).shape == ("N", 3, "H", "W")


def test_symbolic_batch_shape_ops():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Concat", ["s", "r"], ["c"], axis=1),
        helper.make_node("Unsqueeze", ["c", "ax"], ["u"]),
        helper.make_node("Pad", ["u", "pads"], ["y"]),
    ]
    consts = {
        "shape": np.array([0, -1, 3], np.int64),
        "starts": np.array([1], np.int64),
        "ends": np.array([-1], np.int64),
        "axes": np.array([1], np.int64),
        "ax": np.array([1], np.int64),
        "pads": np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64),
    }
    feeds = {"x": rand(2, 3, 4, 5, dtype=np.int8)}
    model = _symbolic(nodes, feeds, {"y": np.int8}, consts, {"x": ["N", 3, 4, 5]})
    assert output_type(model).shape == ("N", 1, 39, 5)


def test_symbolic_batch_reduce_softmax_norm():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"]),
        helper.make_node("MatMul", ["n", "w"], ["m"]),
        helper.make_node("Softmax", ["m"], ["s"]),
        helper.make_node("ReduceMean", ["s", "axes"], ["y"], keepdims=0),
    ]
    consts = {"g": rand(8), "b": rand(8), "w": rand(8, 6), "axes": np.array([1], np.int64)}
    feeds = {"x": rand(2, 5, 8)}
    model = _symbolic(nodes, feeds, {"y": np.float32}, consts, {"x": ["N", 5, 8]}, opset=18)
    assert output_type(model).shape == ("N", 6)


def test_symbolic_batch_resize_and_shape():
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest"),
        helper.make_node("Shape", ["y"], ["s"], start=1),
    ]
    consts = {"scales": np.array([1, 1, 2, 2], np.float32)}
    feeds = {"x": rand(2, 3, 4, 4, dtype=np.uint8)}
    outputs = {"y": np.uint8, "s": np.int64}
    model = _symbolic(nodes, feeds, outputs, consts, {"x": ["N", 3, 4, 4]})
    assert output_type(model).shape == ("N", 3, 8, 8)


def test_symbolic_auto_pad_with_stride_needs_static_dims():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])]
    model = graph_model(nodes, {"x": rand(1, 2, 6, 6)}, {"y": np.float32}, {"w": rand(3, 2, 3, 3)},
                        shapes={"x": ["N", 2, "H", "W"]})  # fmt: skip
    with pytest.raises(ModelError, match="static spatial size"):
        qnnjit.compile(model, target="reference")


# ---- ONNX Runtime's float32 kernels, bit for bit ------------------------------------
# Float islands of quantized models (LayerNorm, GELU's Erf, ReduceMean between a
# DequantizeLinear and a QuantizeLinear) feed a rounding step: their last bits
# decide quantized values, so the ONNX frontend selects ORT's own arithmetic.


@pytest.mark.parametrize("size", [8, 11, 12, 13, 16, 21, 36, 64, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_is_ort_bit_exact(size, bias):
    scale = rand(size, low=0.5, high=1.5)
    consts = {"scale": scale, "bias": rand(size)} if bias else {"scale": scale}
    x = (rand(3, 5, size) * 2 + 0.5).astype(np.float32)
    ours = check_node(
        "LayerNormalization", {"x": x}, consts, {"axis": -1, "epsilon": 1e-5},
        outputs={"y": np.float32, "mean": np.float32, "inv_std": np.float32}, exact=True,
    )  # fmt: skip
    assert set(ours) == {"y", "mean", "inv_std"}


def test_layer_norm_over_two_axes_is_ort_bit_exact():
    consts = {"scale": rand(4, 6, low=0.5, high=1.5), "bias": rand(4, 6)}
    check_node("LayerNormalization", {"x": rand(2, 3, 4, 6)}, consts, {"axis": 2}, exact=True)


def test_erf_and_gelu_are_ort_bit_exact():
    x = np.concatenate([rand(4000, low=-5, high=5), [0, -0.0, 0.921875, 3.925, 9, -np.inf]])
    x = x.astype(np.float32).reshape(-1, 2)
    check_node("Erf", {"x": x}, exact=True)
    check_node("Gelu", {"x": x}, opset=20, exact=True)


@pytest.mark.parametrize(
    "shape,axes",
    [((2, 16, 7, 7), [2, 3]), ((1, 197, 64), [-1]), ((1, 49, 32), [1]), ((2, 49, 32), [1]),
     ((3, 5, 7), [0, 2]), ((2, 3, 4, 5), [1, 3]), ((300,), [0]), ((3, 10, 6, 1), [2]),
     ((4, 9, 11), [0, 1, 2]), ((6, 4, 5, 3), [0, 1])],
)  # fmt: skip
@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceSum"])
def test_float_reductions_are_ort_bit_exact(op_type, shape, axes):
    """ORT's summation orders: Eigen's vectorized sum over contiguous rows,
    row after row over leading axes, MLAS's M=1 SGEMM over middle axes, its
    generic loop otherwise (ir/ops/reduce.py)."""
    x = (rand(*shape) * 2 + 0.3).astype(np.float32)
    check_node(op_type, {"x": x}, {"axes": np.array(axes, np.int64)}, exact=True)


# ---- shapes computed from a dynamic batch ------------------------------------------


def _batch_shape_nodes(tail):
    """Nodes computing Concat(Shape(x)[0:1], tail) as 'target'."""
    return [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero1"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "tail"], ["target"], axis=0),
    ], {"zero": np.array(0, np.int64), "zero1": np.array([0], np.int64),
        "tail": np.array(tail, np.int64)}  # fmt: skip


def test_reshape_to_a_shape_computed_from_the_batch():
    nodes, consts = _batch_shape_nodes([4, 2, 3])
    nodes.append(helper.make_node("Reshape", ["x", "target"], ["y"]))
    x = rand(5, 4, 6)
    model = graph_model(nodes, {"x": x}, {"y": np.float32}, consts, shapes={"x": ["B", 4, 6]})
    compiled = qnnjit.compile(model, target="reference")
    assert compiled.graph.outputs[0].type.shape == ("B", 4, 2, 3)
    for batch in (1, 3):
        xb = rand(batch, 4, 6)
        np.testing.assert_array_equal(compiled.run({"x": xb})["y"], xb.reshape(batch, 4, 2, 3))


def test_expand_to_a_shape_computed_from_the_batch():
    """ViT's class token: cls.expand(x.shape[0], -1, -1)."""
    nodes, consts = _batch_shape_nodes([1, 6])
    nodes.append(helper.make_node("Expand", ["cls", "target"], ["y"]))
    consts["cls"] = rand(1, 1, 6)
    x = rand(2, 4, 6)
    model = graph_model(nodes, {"x": x}, {"y": np.float32}, consts, shapes={"x": ["B", 4, 6]})
    compiled = qnnjit.compile(model, target="reference")
    assert compiled.graph.outputs[0].type.shape == ("B", 1, 6)
    y = compiled.run({"x": rand(3, 4, 6)})["y"]
    np.testing.assert_array_equal(y, np.broadcast_to(consts["cls"], (3, 1, 6)))


def test_reshape_of_data_dependent_shape_is_an_error():
    nodes = [helper.make_node("Cast", ["s"], ["t"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "t"], ["y"])]  # fmt: skip
    model = graph_model(nodes, {"x": rand(2, 6), "s": np.array([3, 4], np.float32)},
                        {"y": np.float32})  # fmt: skip
    with pytest.raises(ModelError, match="must be a constant"):
        qnnjit.compile(model, target="reference")


def test_cast_to_the_same_type_is_no_node():
    model = node_model("Cast", {"x": rand(3, 4)}, attrs={"to": TensorProto.FLOAT})
    compiled = qnnjit.compile(model, target="reference")
    assert "cast" not in compiled.graph.op_counts()
