"""target="cpu" (Numba kernels, qnnjit/backends/cpu/) against target="reference",
bit for bit.

Every test builds a model (a one-node ONNX model through the frontend, or an
IR graph by hand where ONNX cannot express the case: fixed-point rounding,
clamps, 16-bit operands, epilogue chains), runs it with both executors on the
same inputs and compares with `assert_array_equal`. Hypothesis draws the
shapes, strides, pads, dilations, groups, zero points and scales; scales come
random or as powers of two (which put requantized values exactly on .5, where
rounding conventions differ). Kernels are compiled once per process, so the
examples after the first of each kind cost milliseconds.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_pipeline_fuzz import quantized_cnn, run_ort

import qnnjit
from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.ops.nn import window_output_size
from qnnjit.ir.types import TensorType

MS = "com.microsoft"
FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- harness -------------------------------------------------------------------------


def one_node_model(
    op_type, inputs, consts, attrs=None, *, domain="", out=None, opset=21, out_rank=None
):
    """A one-node ONNX model. `inputs`: {name: array} fed at run time;
    `consts`: {name: array or None} initializers (None: omitted). Node inputs
    follow `order` in attrs (default: inputs then consts). The output is
    declared with `out_rank` symbolic dims (default: the largest input rank)."""
    attrs = dict(attrs or {})
    order = attrs.pop("order", list(inputs) + list(consts))
    names = [n if (n in inputs or consts.get(n) is not None) else "" for n in order]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node(op_type, names, ["y"], domain=domain, **attrs)
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for n, a in inputs.items()
    ]
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items() if a is not None]
    out_type = helper.np_dtype_to_tensor_dtype(np.dtype(out))
    if out_rank is None:
        out_rank = max(np.ndim(a) for a in inputs.values())
    dims = [f"y{i}" for i in range(out_rank)]
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_tensor_value_info("y", out_type, dims)], inits
    )
    imports = [helper.make_opsetid("", opset)] + (
        [helper.make_opsetid(domain, 1)] if domain else []
    )
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def check_model(model, feeds: dict, **compile_kwargs) -> qnnjit.runtime.CompiledModel:
    """Compile `model` for cpu and reference, run both, assert equal outputs."""
    cpu = qnnjit.compile(model, target="cpu", **compile_kwargs)
    ref = qnnjit.compile(model, target="reference")
    got, want = cpu.run(feeds), ref.run(feeds)
    for name in ref.output_names:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    return cpu


def check_graph(graph: Graph, arrays: list[np.ndarray]) -> CpuExecutor:
    cpu = CpuExecutor(graph)
    got = cpu.run(list(arrays))
    want = ReferenceExecutor(graph).run(list(arrays))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    return cpu


def kernel_names(executor) -> str:
    return "\n".join(step.name for step in executor.steps)


def _use_isa(isa: str, monkeypatch) -> None:
    """Run the test on `isa` ("host": the host's best), or skip it where the
    host cannot."""
    from qnnjit.backends.cpu.features import runnable_isas

    if isa != "host" and isa not in runnable_isas():
        pytest.skip(reason=f"host cannot run {isa}")
    if isa != "host":
        monkeypatch.setenv("QNNJIT_CPU_ISA", isa)


def codes(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape, dtype=np.int64).astype(dtype)


def scalar(dtype, value):
    return np.array(value, dtype=dtype)


def scale_of(rng, pow2: bool, low=-7.0, high=-1.0) -> np.float32:
    exponent = rng.uniform(low, high)
    return np.float32(2.0 ** round(exponent) if pow2 else 2.0**exponent)


def scales_of(rng, pow2: bool, n: int, low=-7.0, high=-1.0) -> np.ndarray:
    return np.array([scale_of(rng, pow2, low, high) for _ in range(n)], np.float32)


SEEDS = st.integers(0, 2**31 - 1)
INT8 = st.sampled_from([np.uint8, np.int8])


# ---- qconv ---------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "depthwise_x2", "1d"]))
    groups = {"dense": 1, "1d": 1}.get(kind) or draw(st.integers(2, 3))
    cin_g = 1 if kind.startswith("depthwise") else draw(st.integers(1, 4))
    m_g = 2 if kind == "depthwise_x2" else (1 if kind == "depthwise" else draw(st.integers(1, 5)))
    spatial = 1 if kind == "1d" else 2
    size = [draw(st.integers(1, 7)) for _ in range(spatial)]
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 2)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) for _ in range(spatial)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * spatial)]
    for i in range(spatial):
        out = window_output_size(
            size[i], kernel[i], strides[i], pads[i], pads[spatial + i], dilations[i]
        )
        assume(out >= 1)
    return dict(
        batch=draw(st.integers(1, 2)), groups=groups, cin_g=cin_g, m_g=m_g, size=size,
        kernel=kernel, strides=strides, dilations=dilations, pads=pads,
        x_dtype=draw(INT8), w_dtype=draw(st.sampled_from([np.int8, np.int8, np.uint8])),
        w_zp=draw(st.sampled_from(["zero", "tensor", "channel"])),
        per_channel=draw(st.booleans()), bias=draw(st.booleans()), pow2=draw(st.booleans()),
        seed=draw(SEEDS),
    )  # fmt: skip


def _conv_model(case, *, integer=False):
    rng = np.random.default_rng(case["seed"])
    g, cin_g, m_g = case["groups"], case["cin_g"], case["m_g"]
    c, m = g * cin_g, g * m_g
    x = codes(rng, case["x_dtype"], (case["batch"], c, *case["size"]))
    w = codes(rng, case["w_dtype"], (m, cin_g, *case["kernel"]))
    info_x, info_w = np.iinfo(case["x_dtype"]), np.iinfo(case["w_dtype"])
    w_zp = {
        "zero": scalar(case["w_dtype"], 0),
        "tensor": scalar(case["w_dtype"], rng.integers(info_w.min, info_w.max + 1)),
        "channel": codes(rng, case["w_dtype"], (m,)),
    }[case["w_zp"]]
    attrs = {
        "strides": case["strides"], "dilations": case["dilations"], "pads": case["pads"],
        "group": g,
    }  # fmt: skip
    x_zp = scalar(case["x_dtype"], rng.integers(info_x.min, info_x.max + 1))
    if integer:
        consts = {"w": w, "xz": x_zp, "wz": w_zp}
        model = one_node_model(
            "ConvInteger", {"x": x}, consts, dict(attrs, order=["x", "w", "xz", "wz"]),
            out=np.int32,
        )  # fmt: skip
        return model, {"x": x}
    pow2 = case["pow2"]
    ws = scales_of(rng, pow2, m) if case["per_channel"] else scale_of(rng, pow2)
    consts = {
        "xs": scale_of(rng, pow2), "xz": x_zp, "w": w, "ws": ws, "wz": w_zp,
        "ys": scale_of(rng, pow2, -3, 3),
        "yz": scalar(case["x_dtype"], rng.integers(info_x.min, info_x.max + 1)),
        "b": rng.integers(-5000, 5000, m).astype(np.int32) if case["bias"] else None,
    }  # fmt: skip
    attrs["order"] = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    return one_node_model("QLinearConv", {"x": x}, consts, attrs, out=case["x_dtype"]), {"x": x}


@settings(FAST, max_examples=60)
@given(conv_cases())
def test_qlinear_conv(case):
    model, feeds = _conv_model(case)
    cpu = check_model(model, feeds)
    names = kernel_names(cpu._executor)
    assert "conv_" in names and "+requantize" in names, names


@settings(FAST, max_examples=12)
@given(conv_cases())
def test_conv_integer(case):
    """No requantize: the kernel stores the int32 accumulator itself."""
    model, feeds = _conv_model(case, integer=True)
    cpu = check_model(model, feeds)
    assert "conv_" in kernel_names(cpu._executor)


def _busiest_thread(pixels, images, mr, tile, threads):
    """(row tiles, tasks) of the busiest of `threads` contiguous task ranges,
    by enumerating the tasks (as `run_ranges_spinning` cuts them)."""
    from qnnjit.backends.cpu.spinteam import task_ranges

    sizes = [min(tile, pixels - p0) for _ in range(images) for p0 in range(0, pixels, tile)]
    bounds = task_ranges(len(sizes), threads)
    loads = [sizes[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    return max(sum(-(-r // mr) for r in load) + 0.5 * len(load) for load in loads)


@pytest.mark.parametrize(
    "pixels,images,cap", [(196, 1, 60), (49, 1, 30), (784, 1, 126), (3136, 1, 252), (196, 8, 60),
                          (7, 1, 6), (12544, 2, 252), (100, 3, 48)],
)  # fmt: skip
@pytest.mark.parametrize("threads", [2, 3])
def test_conv_tiles_share_the_work_out_evenly(pixels, images, cap, threads):
    """The channels-last conv's tile with several threads: a multiple of MR
    no larger than the cap, no candidate leaving the busiest thread less
    work; ResNet-18's 14x14 layers no longer split 120 / 76 pixels."""
    from qnnjit.backends.cpu.kernels.conv_nhwc import balanced_tile

    mr = 6
    tile = balanced_tile(pixels, images, mr, cap, threads)
    assert tile % mr == 0 and mr <= tile <= cap
    cost = _busiest_thread(pixels, images, mr, tile, threads)
    for other in range(mr, cap + 1, mr):
        assert cost <= _busiest_thread(pixels, images, mr, other, threads), other
    if (pixels, images, cap, threads) == (196, 1, 60, 2):
        assert cost < _busiest_thread(pixels, images, mr, cap, threads)


@pytest.mark.parametrize("pixels,images,tile", [(196, 1, 60), (49, 1, 30), (3136, 2, 252)])
@pytest.mark.parametrize("threads", [2, 3])
def test_column_split_cost_model(pixels, images, tile, threads):
    """`conv_nhwc._busiest_thread`, which `column_split` compares the two
    splits by: unsplit, the enumeration above; split, by hand for a 7x7
    layer (8 panels, or 7 with a partial last range)."""
    from qnnjit.backends.cpu.kernels.conv_nhwc import _busiest_thread as cost

    mr = 6
    assert cost(pixels, images, mr, tile, 1, 8, threads) == _busiest_thread(
        pixels, images, mr, tile, threads
    )
    # 49 pixels in one 54-pixel tile (9 row tiles + 0.5), columns in two
    assert cost(49, 1, mr, 54, 2, 8, 2) == pytest.approx(9.5 * 4 / 8)
    assert cost(49, 1, mr, 54, 2, 7, 2) == pytest.approx(9.5 * 4 / 7)  # ranges of 4 and 3 panels
    # in 30 + 19 pixels, unsplit: 5.5 and 4.5 row tiles
    assert cost(49, 1, mr, 30, 1, 8, 2) == 5.5
    # split too: tasks run split-major, each thread its half of the columns
    # over both tiles, (5.5 + 4.5) / 2; pixel-major it would be 5.5 and 4.5
    assert cost(49, 1, mr, 30, 2, 8, 2) == 5.0


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("kernel,m", [(3, 200), (1, 136)])
def test_small_layers_split_their_output_channels_over_threads(x_dtype, kernel, m, monkeypatch):
    """A 7x7 layer on two threads is one pixel tile whose output channels
    are split in two (whole NR panels, the last one partial: 16-column
    panels pinned, 9 or 13 of them), each thread with its own narrower
    sums: the same bits."""
    import functools

    import numba

    from qnnjit.backends.cpu import gemm
    from qnnjit.backends.cpu.kernels import _threads, conv_nhwc

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core: compiled models run on one thread")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=16))
    chosen = []
    split = conv_nhwc.ChannelsLastConv.column_split

    def recorded(self, *args):
        chosen.append(split(self, *args))
        return chosen[-1]

    monkeypatch.setattr(conv_nhwc.ChannelsLastConv, "column_split", recorded)
    case = dict(
        batch=1, groups=1, cin_g=16, m_g=m, size=[7, 7], kernel=[kernel, kernel], strides=[1, 1],
        dilations=[1, 1], pads=[kernel // 2] * 4, x_dtype=x_dtype, w_dtype=np.int8, w_zp="zero",
        per_channel=True, bias=True, pow2=True, seed=5,
    )  # fmt: skip
    check_model(*_conv_model(case), num_threads=2)
    assert chosen and all(splits == 2 for _, splits in chosen), chosen


def test_split_conv_tasks_run_split_major(monkeypatch):
    """With its output channels split in two, a conv's tasks run split-major:
    the first half of them (the first thread's range) computes the first
    split's channels for every pixel of both images and nothing else, so
    each thread reads only its half of the weights and gets an even share."""
    import functools
    import inspect

    from qnnjit.backends.cpu import gemm
    from qnnjit.backends.cpu.kernels import conv_nhwc

    monkeypatch.setattr(gemm, "default_config", functools.partial(gemm.default_config, nr=16))
    monkeypatch.setattr(conv_nhwc.ChannelsLastConv, "column_split", lambda *_: (12, 2))
    calls = []

    def run_on_one_thread(kernel, tasks, work, threads, *args):
        if kernel is conv_nhwc.conv_gemm_nhwc_requant:
            calls.append((tasks, args))
        kernel(0, tasks, *args)

    monkeypatch.setattr(conv_nhwc, "run_tasks", run_on_one_thread)
    case = dict(
        batch=2, groups=1, cin_g=8, m_g=96, size=[7, 7], kernel=[1, 1], strides=[1, 1],
        dilations=[1, 1], pads=[0, 0, 0, 0], x_dtype=np.uint8, w_dtype=np.int8, w_zp="zero",
        per_channel=True, bias=True, pow2=True, seed=9,
    )  # fmt: skip
    check_model(*_conv_model(case), num_threads=2)
    tasks, args = calls[-1]
    assert tasks == 2 * 5 * 2  # images x 12-pixel tiles of 49 x splits
    kernel = conv_nhwc.conv_gemm_nhwc_requant
    out = args[list(inspect.signature(kernel.py_func).parameters).index("out") - 2]
    kernel(0, tasks, *args)
    want = out.reshape(2 * 49, 96).copy()
    out[:] = ~out  # every byte differs from its result
    kernel(0, tasks // 2, *args)
    got = out.reshape(2 * 49, 96)
    np.testing.assert_array_equal(got[:, :48], want[:, :48])  # 3 of 6 panels of 16
    np.testing.assert_array_equal(got[:, 48:], ~want[:, 48:])


def test_conv_uses_depthwise_nhwc_and_grouped_gemm_kernels():
    base = dict(
        batch=1, size=[5, 6], kernel=[3, 3], strides=[1, 1], dilations=[1, 1],
        pads=[1, 1, 1, 1], x_dtype=np.uint8, w_dtype=np.int8, w_zp="channel",
        per_channel=True, bias=True, pow2=True, seed=3,
    )  # fmt: skip
    depthwise = check_model(*_conv_model(dict(base, groups=4, cin_g=1, m_g=1)))
    dense = check_model(*_conv_model(dict(base, groups=1, cin_g=3, m_g=4)))
    grouped = check_model(*_conv_model(dict(base, groups=2, cin_g=3, m_g=4)))
    # one input channel (a grayscale image's first conv): a GEMM with K = 9
    one_channel = check_model(*_conv_model(dict(base, groups=1, cin_g=1, m_g=4)))
    assert "conv_depthwise" in kernel_names(depthwise._executor)
    assert "conv_nhwc" in kernel_names(dense._executor)
    assert "conv_nhwc[uint8xint8 4x1x3x3]" in kernel_names(one_channel._executor)
    assert "conv_gemm" in kernel_names(grouped._executor)


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("w_dtype,w_zp", [(np.int8, "zero"), (np.uint8, "channel")])
def test_pointwise_conv_channels_last(x_dtype, w_dtype, w_zp):
    """1x1 convolutions with C % 4 == 0: unsigned activations are read in
    place as the GEMM's A rows, signed ones copied; a weight zero point adds
    the per-pixel row sums. Two images, so tiles start at image offsets."""
    case = dict(
        batch=2, groups=1, cin_g=8, m_g=20, size=[5, 7], kernel=[1, 1], strides=[1, 1],
        dilations=[1, 1], pads=[0, 0, 0, 0], x_dtype=x_dtype, w_dtype=w_dtype, w_zp=w_zp,
        per_channel=True, bias=True, pow2=True, seed=11,
    )  # fmt: skip
    cpu = check_model(*_conv_model(case))
    names = kernel_names(cpu._executor)
    assert "conv_nhwc" in names
    assert ("(A in place)" in names) == (x_dtype == np.uint8), names


# channels, (H, W), kernel, strides, pads, dilations, x dtype, A rows by address
ADDRESSED_CONVS = [
    (16, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), np.uint8, True),
    (16, (10, 13), (3, 3), (2, 2), (2, 1, 0, 2), (2, 1), np.uint8, True),  # row dilation
    (32, (7, 9), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), np.uint8, True),  # 1x1, stride 2
    (12, (8, 6), (5, 3), (1, 2), (2, 0, 1, 2), (1, 1), np.uint8, True),  # 36-byte rows
    (16, (2, 3), (3, 3), (1, 1), (2, 2, 2, 2), (1, 1), np.uint8, True),  # all border
    (12, (8, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 2), np.uint8, False),  # column dilation
    (16, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), np.int8, True),  # flipped by the kernels
    (32, (6, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), np.int8, True),  # 1x1 signed: no copy
    (7, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), np.uint8, False),  # 21-byte rows
]


@pytest.mark.parametrize("case", ADDRESSED_CONVS, ids=lambda c: f"c{c[0]}k{c[2][0]}x{c[2][1]}")
@pytest.mark.parametrize(
    "threads,tile,splits,panel",
    [(1, None, 1, None), (1, 7, 1, None), (2, None, 1, None), (2, 7, 2, None), (1, None, 1, 20)],
)  # fmt: skip
@pytest.mark.parametrize("isa", ["host", "avx2"])
def test_conv_reads_a_rows_by_address(case, threads, tile, splits, panel, isa, monkeypatch):
    """Requantizing convs whose window rows are whole groups of 4 bytes read
    A's rows straight from the input (`a_mode`), signed bytes flipped by
    the kernels: the same bits as the reference for tiles that start and
    end mid-row (`tile` = 7), two threads, with and without column splits,
    K blocks of `panel` k that start and end mid-segment (the kernels walk
    the segments), every border, two images; the others still build
    im2col tiles."""
    from qnnjit.backends.cpu import gemm
    from qnnjit.backends.cpu.features import select_isa
    from qnnjit.backends.cpu.kernels import conv_nhwc

    _use_isa(isa, monkeypatch)
    if tile is not None:
        monkeypatch.setattr(conv_nhwc.ChannelsLastConv, "tile_pixels", lambda *_: tile)
    if splits > 1:
        monkeypatch.setattr(
            conv_nhwc.ChannelsLastConv, "column_split", lambda self, p, i, tile: (tile, splits)
        )
    configs = []
    if panel is not None:  # K blocks of `panel` k, whatever NR is
        blocking = gemm._blocking

        def small_blocks(isa, mr, nr, m, n, k, threads, kc=None):
            config = blocking(isa, mr, nr, m, n, k, threads, kc=kc or panel)
            configs.append((config.kc, k))
            return config

        monkeypatch.setattr(gemm, "_blocking", small_blocks)
    channels, size, kernel, strides, pads, dilations, x_dtype, by_address = case
    spec = dict(
        batch=2, groups=1, cin_g=channels, m_g=80, size=list(size), kernel=list(kernel),
        strides=list(strides), dilations=list(dilations), pads=list(pads), x_dtype=x_dtype,
        w_dtype=np.int8, w_zp="zero", per_channel=True, bias=True, pow2=False, seed=channels,
    )  # fmt: skip
    cpu = check_model(*_conv_model(spec), num_threads=threads)
    names = kernel_names(cpu._executor)
    assert "(microkernels requantize:" in names, names
    expected = by_address and select_isa() != "portable"
    assert ("(A rows by address)" in names) == expected, names
    if panel is not None:  # the conv's K took several blocks
        assert (panel, channels * kernel[0] * kernel[1]) in configs, configs


@pytest.mark.parametrize("x_dtype", [dtypes.uint8, dtypes.int8])
@pytest.mark.parametrize("groups,strides", [(6, 1), (6, 2), (1, 1), (1, 2)])
def test_conv_pad_value_other_than_the_zero_point(x_dtype, groups, strides):
    """Zero-point folding leaves `pad_value` (padding holds a code other than
    x's zero point): the channels-last depthwise kernel's pad rows and the
    GEMM kernel's pad bytes, against the reference, int32 accumulators."""
    rng = np.random.default_rng(groups * 10 + strides)
    info = np.iinfo(x_dtype.numpy)
    g = Graph()
    x = g.add_input("x", TensorType(x_dtype, (2, 6, 5, 7)))
    w = g.constant(rng.integers(-128, 128, (6, 6 // groups, 3, 3)).astype(np.int8), "w")
    x_zp = g.constant(x_dtype.numpy.type(info.min + 3), "x_zp")
    attrs = {"strides": [strides] * 2, "pads": [1, 2, 2, 1], "dilations": [1, 1],
             "group": groups, "pad_value": int(info.max - 5)}  # fmt: skip
    node = g.add_node("qconv", [x, w, x_zp], attrs, name="conv")
    g.set_outputs(node.outputs)
    feed = rng.integers(info.min, info.max + 1, (2, 6, 5, 7)).astype(x_dtype.numpy)
    cpu = check_graph(g, [feed])
    kind = "conv_depthwise_nhwc" if groups == 6 else "conv_nhwc"
    assert kind in kernel_names(cpu), kernel_names(cpu)


@pytest.mark.parametrize("x_dtype", [dtypes.uint8, dtypes.int8])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("quads", [True, False])
def test_depthwise_row_kernels_pad_with_a_value_other_than_the_zero_point(
    x_dtype, strides, quads, monkeypatch
):
    """`pad_value` other than x's zero point, through the requantizing
    depthwise row kernels (32 channels: on AVX512-VNNI the byte-quad ones,
    whose padding rows and columns hold the pad byte and whose bias carries
    the zero point's term, or the int16-pair ones, whose border pairs take
    the pad byte), against the reference."""
    from qnnjit.backends.cpu.features import select_isa
    from qnnjit.backends.cpu.kernels import conv_nhwc

    if not quads:
        monkeypatch.setattr(conv_nhwc, "QUADS_ISAS", set())
    rng = np.random.default_rng(40 + strides)
    info = np.iinfo(x_dtype.numpy)
    c = 32
    g = Graph()
    x = g.add_input("x", TensorType(x_dtype, (2, c, 6, 9)))
    w = g.constant(rng.integers(-128, 128, (c, 1, 3, 3)).astype(np.int8), "w")
    x_zp = g.constant(x_dtype.numpy.type(info.min + 3), "x_zp")
    attrs = {"strides": [strides] * 2, "pads": [1, 2, 2, 1], "dilations": [1, 1],
             "group": c, "pad_value": int(info.max - 5)}  # fmt: skip
    acc = g.add_node("qconv", [x, w, x_zp], attrs, name="conv").outputs[0]
    mult = g.constant((2.0 ** rng.uniform(-14, -10, c)).astype(np.float32))
    zp = g.constant(x_dtype.numpy.type(info.min + 100))
    requant = {"dtype": x_dtype, "rounding": "half_even_float", "axis": 1}
    g.set_outputs(g.add_node("requantize", [acc, mult, zp], requant).outputs)
    feed = rng.integers(info.min, info.max + 1, (2, c, 6, 9)).astype(x_dtype.numpy)
    names = kernel_names(check_graph(g, [feed]))
    assert "(row kernels requantize)" in names, names
    quadded = quads and select_isa() in conv_nhwc.QUADS_ISAS
    paired = not quadded and select_isa() in conv_nhwc.PAIRS_ISAS
    assert ("(byte row quads)" in names) == quadded, names
    assert ("(int16 tap pairs)" in names) == paired, names


def test_conv_bias_wraps_int32():
    """bias + sum beyond int32 wraps (two's complement), before requantizing."""
    x = np.full((1, 2, 3, 3), 255, np.uint8)
    w = np.full((2, 2, 3, 3), 127, np.int8)
    consts = {
        "xs": np.float32(2.0**-8), "xz": scalar(np.uint8, 0), "w": w,
        "ws": np.float32(2.0**-8), "wz": scalar(np.int8, 0), "ys": np.float32(2.0**-4),
        "yz": scalar(np.uint8, 128), "b": np.array([2**31 - 1000, -(2**31)], np.int32),
    }  # fmt: skip
    attrs = {"pads": [1, 1, 1, 1], "order": ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]}
    check_model(one_node_model("QLinearConv", {"x": x}, consts, attrs, out=np.uint8), {"x": x})


@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("big_bias", [False, True])
@pytest.mark.parametrize("rows", ["quads", "pairs", "float"])
def test_depthwise_row_kernels_start_their_sums_from_the_bias(
    x_dtype, strides, big_bias, rows, monkeypatch
):
    """The requantizing depthwise row kernels start their sums from the bias:
    the byte-quad and int16-pair kernels always (exact int32 sums; the
    quads' bias also carries -za * sum w), the float32 ones when
    |bias| + |sum| < 2^24 for every channel (then clamp, round to nearest
    even, add the zero point in int32); one channel's bias past that keeps
    the float kernels' int32 path for the layer. Power-of-two scales make
    ties (multiplier 2^-6: every 64th sum ends in .5), small weights keep
    most outputs inside the clamp. All bit-exact against the reference."""
    from qnnjit.backends.cpu.features import select_isa
    from qnnjit.backends.cpu.kernels import conv_nhwc

    if rows != "quads":
        monkeypatch.setattr(conv_nhwc, "QUADS_ISAS", set())
    if rows == "float":
        monkeypatch.setattr(conv_nhwc, "PAIRS_ISAS", set())
    rng = np.random.default_rng(7 + strides)
    c = 32  # whole vectors on both SIMD paths: the row kernels requantize
    x = codes(rng, x_dtype, (2, c, 9, 11))
    w = rng.integers(-8, 9, (c, 1, 3, 3)).astype(np.int8)
    b = rng.integers(-3000, 3000, c).astype(np.int32)
    if big_bias:
        b[5] = 2**24 - 1000  # + up to 9 * 255 * 8 from the taps: past 2^24
    consts = {
        "xs": np.float32(2.0**-2), "xz": scalar(x_dtype, 3), "w": w,
        "ws": np.full(c, 2.0**-5, np.float32), "wz": np.zeros(c, np.int8),
        "ys": np.float32(2.0),
        "yz": scalar(x_dtype, -5 if x_dtype == np.int8 else 131), "b": b,
    }  # fmt: skip
    attrs = {
        "pads": [1, 1, 1, 1], "strides": [strides] * 2, "group": c,
        "order": ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
    }  # fmt: skip
    model = one_node_model("QLinearConv", {"x": x}, consts, attrs, out=x_dtype)
    names = kernel_names(check_model(model, {"x": x})._executor)
    assert "(row kernels requantize)" in names, names
    quadded = rows == "quads" and select_isa() in conv_nhwc.QUADS_ISAS
    paired = rows == "pairs" and select_isa() in conv_nhwc.PAIRS_ISAS
    assert ("(byte row quads)" in names) == quadded, names
    assert ("(int16 tap pairs)" in names) == paired, names
    assert ("(bias in sum)" in names) == (not big_bias and not (paired or quadded)), names


@pytest.mark.parametrize(
    "kernel,strides,dilations,pads",
    [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1)),
     ((5, 5), (1, 1), (1, 1), (2, 2, 2, 2)), ((5, 5), (2, 2), (1, 1), (1, 2, 2, 0)),
     ((2, 2), (1, 1), (1, 1), (0, 1, 1, 0)), ((3, 4), (3, 2), (2, 1), (2, 0, 1, 3)),
     ((1, 3), (1, 3), (1, 1), (0, 2, 0, 1)), ((3, 1), (2, 1), (1, 1), (1, 0, 1, 0)),
     ((3, 3), (1, 1), (1, 2), (1, 1, 1, 1))],
)  # fmt: skip
@pytest.mark.parametrize("x_dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("rows", ["quads", "pairs"])
def test_depthwise_tap_pairs_and_row_quads(kernel, strides, dilations, pads, x_dtype, rows,
                                           monkeypatch):  # fmt: skip
    """The integer depthwise row kernels (AVX512-VNNI): odd and even window
    widths, strides 1 to 3, dilation, pads on every side, pixels past the
    last block, two images, a weight zero point.
    - Byte quads (up to 3 window rows, unit vertical dilation, w - zw in
      int8: small weights and zero points here): odd and even first window
      rows (the two weight sets), rows past the image's end in the quad.
      Taller windows and vertical dilation take the pairs kernels.
    - Int16 pairs (the quads turned off; a weight zero point of any size):
      the last pair's second weight 0, even strides keeping only even
      columns' pairs, pair halves in the padding; horizontal dilation takes
      the float32 kernels.
    Bit-exact against the reference."""
    from qnnjit.backends.cpu.features import select_isa
    from qnnjit.backends.cpu.kernels import conv_nhwc

    if rows == "pairs":
        monkeypatch.setattr(conv_nhwc, "QUADS_ISAS", set())
    rng = np.random.default_rng(sum(kernel) * 7 + strides[1])
    c = 48  # three vectors of channels
    x = codes(rng, x_dtype, (2, c, 9, 21))
    if rows == "quads":  # w - zw within int8, both ends reached
        w = rng.integers(-100, 101, (c, 1, *kernel)).astype(np.int8)
        wz = rng.integers(-27, 28, c).astype(np.int8)
        w[0, 0, 0, 0], wz[0] = -128, 0
        w[1, 0, -1, -1], wz[1] = 100, -27
    else:
        w, wz = codes(rng, np.int8, (c, 1, *kernel)), codes(rng, np.int8, (c,))
    consts = {
        "xs": np.float32(0.05), "xz": scalar(x_dtype, 7), "w": w,
        "ws": scales_of(rng, False, c, -9, -6), "wz": wz,
        "ys": np.float32(0.07), "yz": scalar(x_dtype, -3 if x_dtype == np.int8 else 120),
        "b": rng.integers(-20000, 20000, c).astype(np.int32),
    }  # fmt: skip
    attrs = {
        "pads": list(pads), "strides": list(strides), "dilations": list(dilations),
        "group": c, "order": ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
    }  # fmt: skip
    model = one_node_model("QLinearConv", {"x": x}, consts, attrs, out=x_dtype)
    names = kernel_names(check_model(model, {"x": x})._executor)
    quadded = (
        rows == "quads" and select_isa() in conv_nhwc.QUADS_ISAS
        and kernel[0] <= 3 and (kernel[0] == 1 or dilations[0] == 1)
    )  # fmt: skip
    paired = not quadded and select_isa() in conv_nhwc.PAIRS_ISAS and dilations[1] == 1
    assert ("(byte row quads)" in names) == quadded, names
    assert ("(int16 tap pairs)" in names) == paired, names


def test_depthwise_weights_past_int8_after_their_zero_point_take_the_pairs():
    """A weight minus its zero point outside int8 (-128 - 1, 127 + 3) fits
    no byte quad: the layer takes the int16-pair kernels, with the same
    bits as the reference."""
    from qnnjit.backends.cpu.features import select_isa
    from qnnjit.backends.cpu.kernels import conv_nhwc

    rng = np.random.default_rng(5)
    c = 32
    x = codes(rng, np.uint8, (1, c, 7, 10))
    w = rng.integers(-20, 21, (c, 1, 3, 3)).astype(np.int8)
    wz = np.zeros(c, np.int8)
    w[3, 0, 1, 1], wz[3] = -128, 1
    w[9, 0, 2, 0], wz[9] = 127, -3
    consts = {
        "xs": np.float32(0.05), "xz": scalar(np.uint8, 9), "w": w,
        "ws": scales_of(rng, False, c, -9, -6), "wz": wz, "ys": np.float32(0.07),
        "yz": scalar(np.uint8, 120), "b": rng.integers(-20000, 20000, c).astype(np.int32),
    }  # fmt: skip
    attrs = {"pads": [1, 1, 1, 1], "group": c,
             "order": ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]}  # fmt: skip
    model = one_node_model("QLinearConv", {"x": x}, consts, attrs, out=np.uint8)
    names = kernel_names(check_model(model, {"x": x})._executor)
    assert "(byte row quads)" not in names, names
    assert ("(int16 tap pairs)" in names) == (select_isa() in conv_nhwc.PAIRS_ISAS), names


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("layer", ["dense", "depthwise", "max_pool"])
def test_conv_and_pool_on_every_isa_path(isa, layer, monkeypatch):
    """The other ISA paths (when the host runs them) give the same bits: the
    GEMM engine's, and the depthwise and max-pool row kernels' (channels that
    leave a partial vector, stride 2 with dilation, a row narrower than one
    block, padding on every side)."""
    from qnnjit.backends.cpu.features import runnable_isas

    if isa not in runnable_isas():
        pytest.skip(reason=f"host cannot run {isa}")
    monkeypatch.setenv("QNNJIT_CPU_ISA", isa)
    if layer == "dense":
        case = dict(
            batch=2, groups=1, cin_g=7, m_g=20, size=[6, 5], kernel=[3, 3], strides=[1, 1],
            dilations=[1, 1], pads=[1, 1, 1, 1], x_dtype=np.int8, w_dtype=np.int8,
            w_zp="channel", per_channel=True, bias=True, pow2=False, seed=11,
        )  # fmt: skip
        check_model(*_conv_model(case))
        return
    if layer == "max_pool":
        for dtype, strides, dilations in ((np.uint8, [2, 2], [1, 1]), (np.int8, [1, 2], [2, 1])):
            x = codes(np.random.default_rng(13), dtype, (2, 64, 9, 21))
            attrs = {"kernel_shape": [3, 3], "strides": strides, "pads": [1, 1, 1, 1],
                     "dilations": dilations}  # fmt: skip
            check_model(one_node_model("MaxPool", {"x": x}, {}, attrs, out=dtype), {"x": x})
        return
    # 21 channels leave a partial vector (the sums go through the epilogue);
    # 32 fill whole vectors on both SIMD paths (the row kernels requantize).
    # Signed activations: the ring's bytes are flipped, the zero point's term
    # folded into the bias differs.
    for channels, strides, dilations, size, x_dtype in (
        (21, [1, 1], [1, 1], [7, 19], np.uint8), (21, [2, 2], [2, 2], [9, 11], np.int8),
        (32, [1, 1], [1, 1], [5, 13], np.int8), (32, [2, 1], [1, 2], [6, 9], np.uint8),
    ):  # fmt: skip
        case = dict(
            batch=2, groups=channels, cin_g=1, m_g=1, size=size, kernel=[3, 3], strides=strides,
            dilations=dilations, pads=[1, 2, 1, 0], x_dtype=x_dtype, w_dtype=np.int8,
            w_zp="channel", per_channel=True, bias=True, pow2=False, seed=12,
        )  # fmt: skip
        names = kernel_names(check_model(*_conv_model(case))._executor)
        assert "conv_depthwise_nhwc" in names
        fused = channels == 32 and isa != "portable"
        assert ("(row kernels requantize)" in names) == fused, names


# ---- qmatmul -------------------------------------------------------------------------


@st.composite
def matmul_cases(draw):
    k, n = draw(st.integers(1, 40)), draw(st.integers(1, 33))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    m = draw(st.integers(1, 9))
    a_shape = (*lead, m, k) if lead or draw(st.booleans()) else (k,)
    b_const = draw(st.booleans())
    b_batch = () if b_const else draw(st.sampled_from([(), (1,), lead[-1:] if lead else ()]))
    b_shape = (*b_batch, k, n)
    return dict(
        a_shape=a_shape, b_shape=b_shape, b_const=b_const, a_dtype=draw(INT8),
        b_dtype=draw(st.sampled_from([np.int8, np.uint8])), per_column=draw(st.booleans()),
        pow2=draw(st.booleans()), seed=draw(SEEDS),
    )  # fmt: skip


@settings(FAST, max_examples=40)
@given(matmul_cases())
def test_qlinear_matmul(case):
    rng = np.random.default_rng(case["seed"])
    at, bt = case["a_dtype"], case["b_dtype"]
    if not case["b_const"]:
        bt = at  # run-time operands: one activation type
    a, b = codes(rng, at, case["a_shape"]), codes(rng, bt, case["b_shape"])
    n = case["b_shape"][-1]
    pow2 = case["pow2"]
    per_column = case["per_column"] and len(case["b_shape"]) == 2
    ia, ib = np.iinfo(at), np.iinfo(bt)
    consts = {
        "as": scale_of(rng, pow2), "az": scalar(at, rng.integers(ia.min, ia.max + 1)),
        "bs": scales_of(rng, pow2, n) if per_column else scale_of(rng, pow2),
        "bz": codes(rng, bt, (n,)) if per_column else scalar(bt, rng.integers(ib.min, ib.max + 1)),
        "ys": scale_of(rng, pow2, -2, 4), "yz": scalar(at, rng.integers(ia.min, ia.max + 1)),
    }  # fmt: skip
    feeds = {"a": a}
    if case["b_const"]:
        consts["b"] = b
    else:
        feeds["b"] = b
    attrs = {"order": ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]}
    cpu = check_model(one_node_model("QLinearMatMul", feeds, consts, attrs, out=at), feeds)
    assert "matmul_" in kernel_names(cpu._executor)


def test_matmul_integer_row_and_column_zero_points():
    rng = np.random.default_rng(5)
    for b_const in (True, False):
        a, b = (
            codes(rng, np.uint8, (6, 9)),
            codes(rng, np.uint8 if not b_const else np.int8, (9, 4)),
        )
        consts = {"az": codes(rng, np.uint8, (6,)), "bz": codes(rng, b.dtype, (4,))}
        feeds = {"a": a}
        if b_const:
            consts["b"] = b
        else:
            feeds["b"] = b
        attrs = {"order": ["a", "b", "az", "bz"]}
        check_model(one_node_model("MatMulInteger", feeds, consts, attrs, out=np.int32), feeds)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_of_few_rows_splits_its_columns_over_threads(rows, threads, monkeypatch):
    """A classifier's matmul at batch 1 has one row tile: on two threads
    each takes a range of whole NR panels (the last one partial), with the
    row and column zero points folded per column range (MatMulInteger: no
    epilogue) and a requantize with a per-column scale (QLinearMatMul)."""
    from qnnjit.backends.cpu.kernels import _threads, matmul

    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    chosen = []
    split = matmul._column_splits
    monkeypatch.setattr(
        matmul, "_column_splits", lambda *args: chosen.append(split(*args)) or chosen[-1]
    )
    rng = np.random.default_rng(rows * 10 + threads)
    n = 203  # several panels of any width, the last partial
    a, b = codes(rng, np.uint8, (rows, 40)), codes(rng, np.int8, (40, n))
    consts = {"b": b, "az": codes(rng, np.uint8, (rows,)), "bz": codes(rng, np.int8, (n,))}
    attrs = {"order": ["a", "b", "az", "bz"]}
    model = one_node_model("MatMulInteger", {"a": a}, consts, attrs, out=np.int32)
    check_model(model, {"a": a}, num_threads=threads)
    consts = {
        "as": np.float32(0.02), "az": scalar(np.uint8, 7), "b": b,
        "bs": rng.uniform(1e-3, 2e-3, n).astype(np.float32), "bz": np.zeros(n, np.int8),
        "ys": np.float32(0.05), "yz": scalar(np.uint8, 120),
    }  # fmt: skip
    attrs = {"order": ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]}
    model = one_node_model("QLinearMatMul", {"a": a}, consts, attrs, out=np.uint8)
    check_model(model, {"a": a}, num_threads=threads)
    assert chosen and set(chosen) == {threads}, chosen


def test_matmul_accumulator_wraps_at_large_k():
    """K = 70000 products of 255 * 127 leave int32: the sum wraps, exactly as
    the reference's int64-then-wrap does, on the GEMM engine's path."""
    k = 70000
    a = np.full((2, k), 255, np.uint8)
    a[1, ::3] = 0
    b = np.full((k, 3), 127, np.int8)
    b[:, 1] = -128
    consts = {"b": b, "az": scalar(np.uint8, 0), "bz": scalar(np.int8, 0)}
    attrs = {"order": ["a", "b", "az", "bz"]}
    model = one_node_model("MatMulInteger", {"a": a}, consts, attrs, out=np.int32)
    cpu = check_model(model, {"a": a})
    out = cpu.run({"a": a})["y"]
    assert out[0, 0] == np.int64(255 * 127 * k - 2**32)  # really wrapped


@pytest.mark.parametrize("dtype", [dtypes.int16, dtypes.uint16])
def test_qmatmul_16_bit_batched(dtype):
    """16-bit operands (no ONNX op makes them): the batched kernel, exact int64
    sums wrapped to int32, per-row and per-column zero points."""
    rng = np.random.default_rng(8)
    a_val = codes(rng, dtype.numpy, (3, 4, 50))
    b_val = codes(rng, dtype.numpy, (1, 50, 6))
    g = Graph()
    a, b = (
        g.add_input("a", TensorType(dtype, a_val.shape)),
        g.add_input("b", TensorType(dtype, b_val.shape)),
    )
    zps = [g.constant(codes(rng, dtype.numpy, (4,))), g.constant(codes(rng, dtype.numpy, (6,)))]
    node = g.add_node("qmatmul", [a, b, *zps])
    g.set_outputs(node.outputs)
    cpu = check_graph(g, [a_val, b_val])
    assert "matmul_batched" in kernel_names(cpu)


# ---- requantize (every rounding mode), clamps, epilogue chains: IR graphs ----------

ROUNDINGS = ["half_even_float", "fixed_point_double", "fixed_point_single"]
OUT_TYPES = [dtypes.uint8, dtypes.int8, dtypes.int16, dtypes.uint16, dtypes.int32]


def _multipliers(rng, n, pow2):
    m = scales_of(rng, pow2, n, -14, 1)
    if not pow2:
        m[: n // 3] = np.float32(rng.uniform(0.9, 1.0))
    return m


@FAST
@given(
    seed=SEEDS,
    rounding=st.sampled_from(ROUNDINGS),
    dtype=st.sampled_from(OUT_TYPES),
    per_axis=st.booleans(),
    pow2=st.booleans(),
    clamp=st.booleans(),
)
def test_requantize_every_rounding(seed, rounding, dtype, per_axis, pow2, clamp):
    rng = np.random.default_rng(seed)
    shape = (2, 5, 7)
    acc = rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)
    small = rng.integers(-3000, 3000, size=shape).astype(np.int32)
    acc = np.where(rng.random(shape) < 0.7, small, acc)
    acc.flat[:4] = [-(2**31), 2**31 - 1, 0, -1]
    g = Graph()
    x = g.add_input("acc", TensorType(dtypes.int32, shape))
    mult = _multipliers(rng, 5 if per_axis else 1, pow2)
    zp = rng.integers(dtype.qmin, dtype.qmax + 1, size=5 if per_axis else 1)
    zp = zp.astype(dtype.numpy).reshape(-1 if per_axis else ())
    attrs = {"dtype": dtype, "rounding": rounding, "axis": 1 if per_axis else None}
    if clamp:
        lo = int(rng.integers(dtype.qmin, dtype.qmax))
        attrs["clamp"] = (lo, int(rng.integers(lo, dtype.qmax + 1)))
    node = g.add_node(
        "requantize", [x, g.constant(mult.reshape(-1 if per_axis else ())), g.constant(zp)], attrs
    )
    g.set_outputs(node.outputs)
    cpu = check_graph(g, [acc])
    assert "requantize_flat" in kernel_names(cpu)


def test_requantize_ties_and_saturation_goldens():
    """Hand-computed values at +-0.5 and saturation, every rounding mode."""
    acc = np.array([1, 2, -2, 6, -6, 1000, -1000, 3], np.int32)  # x 0.25
    expected = {
        "half_even_float": [0, 0, 0, 2, -2, 127, -128, 1],
        "fixed_point_double": [1, 1, -1, 2, -2, 127, -128, 1],
        "fixed_point_single": [0, 1, 0, 2, -1, 127, -128, 1],
    }
    for rounding, want in expected.items():
        g = Graph()
        x = g.add_input("acc", TensorType(dtypes.int32, (8,)))
        attrs = {"dtype": dtypes.int8, "rounding": rounding, "axis": None}
        node = g.add_node(
            "requantize", [x, g.constant(np.float32(0.25)), g.constant(np.int8(0))], attrs
        )
        g.set_outputs(node.outputs)
        check_graph(g, [acc])
        np.testing.assert_array_equal(CpuExecutor(g).run([acc])[0], want)


def _int_input(g, name, dtype, shape):
    return g.add_input(name, TensorType(dtype, shape))


@st.composite
def chains(draw):
    return dict(
        anchor=draw(st.sampled_from(["conv", "conv_dw", "matmul", "reduce", "conv16"])),
        bias=draw(st.booleans()),
        rounding=draw(st.sampled_from(ROUNDINGS)),
        clamp=draw(st.booleans()),
        post=draw(st.sampled_from(["none", "qadd", "qadd_first", "qmul", "lookup"])),
        clip=draw(st.sampled_from([None, "relu", "both", "upper", "empty"])),
        dtype=draw(st.sampled_from([dtypes.uint8, dtypes.int8])),
        per_channel=draw(st.booleans()),
        pow2=draw(st.booleans()),
        seed=draw(SEEDS),
    )


@settings(FAST, max_examples=60)
@given(chains())
def test_epilogue_chains(case):
    """anchor -> [bias add] -> requantize (any rounding, clamp) -> [qadd | qmul |
    lookup [-> integer clip]] computed by one kernel, against the unfused
    reference. A clip with an empty interval (min > max) stays a kernel of
    its own."""
    rng = np.random.default_rng(case["seed"])
    dt = case["dtype"]
    g = Graph()
    anchor = case["anchor"]
    if anchor.startswith("conv"):
        xt = dtypes.int16 if anchor == "conv16" else dt
        x_val = codes(rng, xt.numpy, (2, 4, 5, 5))
        x = _int_input(g, "x", xt, x_val.shape)
        groups, cin = (4, 1) if anchor == "conv_dw" else (1, 4)
        w = codes(
            rng, np.int16 if anchor == "conv16" else np.int8, (6 if groups == 1 else 4, cin, 3, 3)
        )
        channels = w.shape[0]
        node = g.add_node(
            "qconv",
            [x, g.constant(w), g.constant(np.asarray(x_val.reshape(-1)[0], xt.numpy)),
             g.constant(codes(rng, w.dtype, (channels,)))],
            {"strides": (1, 1), "pads": (1, 0, 1, 2), "dilations": (1, 1), "group": groups},
        )  # fmt: skip
        axis = 1
    elif anchor == "matmul":
        x_val = codes(rng, dt.numpy, (3, 4, 12))
        x = _int_input(g, "x", dt, x_val.shape)
        channels = 7
        node = g.add_node(
            "qmatmul",
            [x, g.constant(codes(rng, np.int8, (12, channels))),
             g.constant(np.asarray(3, dt.numpy)), g.constant(np.int8(-2))],
        )  # fmt: skip
        axis = 2
    else:
        x_val = codes(rng, dt.numpy, (2, 5, 4, 3))
        x = _int_input(g, "x", dt, x_val.shape)
        channels = 5
        node = g.add_node("qreduce_sum", [x, g.constant(np.asarray(7, dt.numpy))], {"axes": [2, 3]})
        axis = 1
    acc = node.outputs[0]
    if case["bias"]:
        shape = (channels,) if axis == acc.type.rank - 1 else (channels, 1, 1)
        acc = g.add_node(
            "add", [acc, g.constant(rng.integers(-9000, 9000, shape).astype(np.int32))]
        ).outputs[0]
    per = case["per_channel"]
    mult = _multipliers(rng, channels if per else 1, case["pow2"]) / 64
    zp = codes(rng, dt.numpy, (channels,) if per else ())
    attrs = {"dtype": dt, "rounding": case["rounding"], "axis": axis if per else None}
    if case["clamp"]:
        attrs["clamp"] = (int(zp.reshape(-1)[0]), dt.qmax)
    y = g.add_node(
        "requantize", [acc, g.constant(mult.reshape(-1 if per else ())), g.constant(zp)], attrs
    ).outputs[0]
    inputs = [x_val]
    post = case["post"]
    if post == "lookup":
        table = codes(rng, np.uint8, (256,))
        y = g.add_node("lookup", [y, g.constant(table)]).outputs[0]
    elif post != "none":
        other_val = codes(rng, dt.numpy, y.type.shape)
        other = _int_input(g, "other", dt, other_val.shape)
        inputs.append(other_val)
        s = [g.constant(np.float32(v)) for v in scales_of(rng, case["pow2"], 3, -4, 0)]
        z = [g.constant(np.asarray(v, dt.numpy)) for v in codes(rng, dt.numpy, (3,))]
        a, b = (y, other) if post != "qadd_first" else (other, y)
        op = "qmul" if post == "qmul" else "qadd"
        rounding = "mlas" if op == "qmul" else "mlas_fma"
        y = g.add_node(
            op, [a, s[0], z[0], b, s[1], z[1], s[2], z[2]], {"rounding": rounding}
        ).outputs[0]
    clip = case["clip"] if post not in ("none", "lookup") else None
    if clip is not None:
        y = g.add_node("clip", [y], _clip_attrs(clip, dt)).outputs[0]
    g.set_outputs([y])
    cpu = check_graph(g, inputs)
    steps = 2 if clip == "empty" else 1  # else the whole chain is one kernel
    assert len(cpu.steps) == steps, kernel_names(cpu)


@pytest.mark.parametrize("isa", ["host", "avx2"])
@pytest.mark.parametrize("anchor", ["conv3x3", "conv1x1", "depthwise+pointwise", "matmul"])
@pytest.mark.parametrize("dt", [dtypes.uint8, dtypes.int8])
def test_lookup_after_requantize_in_the_microkernels(isa, anchor, dt, monkeypatch):
    """conv / matmul -> requantize -> 8-bit lookup (Inception's concat
    rescales, a GELU table) runs in the requantizing microkernels with their
    table stage (`_gemm.gemm_requant_rows`), on the vpermi2b path (host) and
    the scalar one (AVX2): the reference's codes, a table output of the
    other signedness than its index."""
    _use_isa(isa, monkeypatch)
    rng = np.random.default_rng(zlib.crc32(f"{isa} {anchor} {dt}".encode()))
    g = Graph()
    zx = g.constant(np.asarray(5 if dt == dtypes.uint8 else -3, dt.numpy))

    def requantized(acc, channels, axis):
        mult = rng.uniform(2e-4, 2e-3, channels).astype(np.float32)
        zp = codes(rng, dt.numpy, (channels,))
        attrs = {"dtype": dt, "rounding": "half_even_float", "axis": axis}
        return g.add_node("requantize", [acc, g.constant(mult), g.constant(zp)], attrs).outputs[0]

    def conv(x, cin, cout, k, group=1):
        w = g.constant(codes(rng, np.int8, (cout, cin // group, k, k)))
        pads = (k // 2,) * 4
        attrs = {"strides": (1, 1), "pads": pads, "dilations": (1, 1), "group": group}
        acc = g.add_node("qconv", [x, w, zx, g.constant(np.zeros(cout, np.int8))], attrs)
        return requantized(acc.outputs[0], cout, 1)

    if anchor == "matmul":
        x_val = codes(rng, dt.numpy, (3, 37, 64))
        x = _int_input(g, "x", dt, x_val.shape)
        w = g.constant(codes(rng, np.int8, (64, 70)))
        acc = g.add_node("qmatmul", [x, w, zx, g.constant(np.int8(0))]).outputs[0]
        y = requantized(acc, 70, 2)
    else:
        x_val = codes(rng, dt.numpy, (2, 32, 9, 11))
        x = _int_input(g, "x", dt, x_val.shape)
        if anchor == "conv3x3":
            y = conv(x, 32, 40, 3)
        elif anchor == "conv1x1":
            y = conv(x, 32, 40, 1)
        else:
            y = conv(conv(x, 32, 32, 3, group=32), 32, 40, 1)
    out_dt = np.int8 if dt == dtypes.uint8 else np.uint8
    y = g.add_node("lookup", [y, g.constant(codes(rng, out_dt, (256,)))]).outputs[0]
    g.set_outputs([y])
    names = kernel_names(check_graph(g, [x_val]))
    assert "\n" not in names and "(microkernels requantize" in names, names  # one step
    assert names.endswith("+lookup]" if anchor == "depthwise+pointwise" else "+lookup"), names


@pytest.mark.parametrize("isa", ["host", "avx2"])
@pytest.mark.parametrize(
    "case",
    ["matmul bias", "conv residual", "qmul", "weight zero point", "conv weight zero point",
     "signed"],
)  # fmt: skip
def test_lookup_after_the_add_in_the_microkernels_table_stage(isa, case, monkeypatch):
    """matmul / conv -> requantize -> qadd -> lookup (a transformer's bias add
    and GELU table; a residual add and a table) is one kernel: the
    requantizing microkernels' qadd, then their table stage. Where those
    kernels do not run (a qmul; a weight zero point's per-row term) the
    lookup is a step of its own. Every case: the reference's codes."""
    _use_isa(isa, monkeypatch)
    rng = np.random.default_rng(zlib.crc32(f"{isa} {case}".encode()))
    dt = dtypes.int8 if case == "signed" else dtypes.uint8
    g = Graph()
    zx = g.constant(np.asarray(7 if dt == dtypes.uint8 else -5, dt.numpy))
    s = [g.constant(np.float32(v)) for v in (0.02, 0.03, 0.025)]
    z = [g.constant(np.asarray(v, dt.numpy)) for v in codes(rng, dt.numpy, (3,))]
    inputs = []
    if case in ("conv residual", "conv weight zero point", "signed"):
        x_val = codes(rng, dt.numpy, (2, 32, 7, 9))
        x = _int_input(g, "x", dt, x_val.shape)
        w = g.constant(codes(rng, np.int8, (40, 32, 3, 3)))
        attrs = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1}
        zw = np.full(40, 2 if case == "conv weight zero point" else 0, np.int8)
        acc = g.add_node("qconv", [x, w, zx, g.constant(zw)], attrs)
        axis, channels = 1, 40
        other_val = codes(rng, dt.numpy, (2, 40, 7, 9))
        other = _int_input(g, "other", dt, other_val.shape)
        inputs = [x_val, other_val]
    else:
        x_val = codes(rng, dt.numpy, (3, 37, 64))
        x = _int_input(g, "x", dt, x_val.shape)
        zw = np.int8(3 if case == "weight zero point" else 0)
        acc = g.add_node("qmatmul", [x, g.constant(codes(rng, np.int8, (64, 70))), zx,
                                     g.constant(zw)])  # fmt: skip
        axis, channels = 2, 70
        other = g.constant(codes(rng, dt.numpy, (70,)))  # the bias row, broadcast
        inputs = [x_val]
    mult = rng.uniform(2e-4, 2e-3, channels).astype(np.float32)
    attrs = {"dtype": dt, "rounding": "half_even_float", "axis": axis}
    zp = g.constant(codes(rng, dt.numpy, (channels,)))
    y = g.add_node("requantize", [acc.outputs[0], g.constant(mult), zp], attrs).outputs[0]
    op, rounding = ("qmul", "mlas") if case == "qmul" else ("qadd", "mlas_fma")
    y = g.add_node(op, [y, s[0], z[0], other, s[1], z[1], s[2], z[2]], {"rounding": rounding})
    table = codes(rng, np.uint8 if dt == dtypes.int8 else np.int8, (256,))
    y = g.add_node("lookup", [y.outputs[0], g.constant(table)]).outputs[0]
    g.set_outputs([y])
    names = kernel_names(check_graph(g, inputs))
    if case in ("qmul", "weight zero point", "conv weight zero point"):
        assert len(names.splitlines()) == 2 and "lookup_flat_bytes" in names, names
    else:
        kind = "qadd_s8" if dt == dtypes.int8 else "qadd"  # the residual's codes
        assert "\n" not in names and f"(microkernels requantize: {kind})" in names, names
        assert names.endswith("+qadd+lookup"), names


def _clip_attrs(kind: str, dt) -> dict:
    """An integer clip's bounds: a relu at a code above qmin, both bounds
    (one outside the type: the cast wraps it), only the upper one, or an
    empty interval (min > max: every code becomes max)."""
    return {
        "relu": {"min": dt.qmin + 9, "max": None},
        "both": {"min": dt.qmin + 40, "max": dt.qmax + 251},  # max wraps to qmax - 5
        "upper": {"min": None, "max": dt.qmax - 30},
        "empty": {"min": dt.qmin + 50, "max": dt.qmin + 20},
    }[kind]


@pytest.mark.parametrize("dt", [dtypes.uint8, dtypes.int8])
def test_clip_after_an_overflowing_qadd(dt):
    """A qadd whose scale ratio sends its sums past int32 stores qmin there
    (MLAS's conversion), which the clip then raises to its lower bound: the
    folded saturation bounds give the same codes."""
    rng = np.random.default_rng(5)
    g = Graph()
    x_val = codes(rng, dt.numpy, (2, 5, 4, 3))
    x = _int_input(g, "x", dt, x_val.shape)
    acc = g.add_node("qreduce_sum", [x, g.constant(np.asarray(7, dt.numpy))], {"axes": [2, 3]})
    y = g.add_node(
        "requantize",
        [acc.outputs[0], g.constant(np.float32(1 / 64)), g.constant(np.asarray(3, dt.numpy))],
        {"dtype": dt, "rounding": "half_even_float", "axis": None},
    ).outputs[0]
    other_val = codes(rng, dt.numpy, y.type.shape)
    other = _int_input(g, "other", dt, other_val.shape)
    s = [g.constant(np.float32(v)) for v in (1e6, 1e-3, 1e-4)]
    z = [g.constant(np.asarray(v, dt.numpy)) for v in (1, 2, 3)]
    y = g.add_node("qadd", [y, s[0], z[0], other, s[1], z[1], s[2], z[2]],
                   {"rounding": "mlas_fma"}).outputs[0]  # fmt: skip
    y = g.add_node("clip", [y], _clip_attrs("both", dt)).outputs[0]
    g.set_outputs([y])
    cpu = check_graph(g, [x_val, other_val])
    assert len(cpu.steps) == 1, kernel_names(cpu)


# ---- elementwise: qadd / qmul / lookup -----------------------------------------------

BINARY_SHAPES = [
    ((67,), (67,)), ((2, 3, 5), (2, 3, 5)), ((1,), (40,)), ((40,), ()), ((), (9,)),
    ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (5,)), ((4, 1), (1, 37)), ((3, 1, 5), (3, 4, 1)),
    ((1, 1), (1, 1)),
]  # fmt: skip


@FAST
@given(
    op_type=st.sampled_from(["QLinearAdd", "QLinearMul"]),
    shapes=st.sampled_from(BINARY_SHAPES),
    dtype=INT8,
    pow2=st.booleans(),
    seed=SEEDS,
)
def test_qlinear_binary(op_type, shapes, dtype, pow2, seed):
    rng = np.random.default_rng(seed)
    a, b = codes(rng, dtype, shapes[0]), codes(rng, dtype, shapes[1])
    info = np.iinfo(dtype)
    consts = {
        "sa": scale_of(rng, pow2, -4, 0), "za": scalar(dtype, rng.integers(info.min, info.max)),
        "sb": scale_of(rng, pow2, -4, 0), "zb": scalar(dtype, rng.integers(info.min, info.max)),
        "sc": scale_of(rng, pow2, -5, 1), "zc": scalar(dtype, rng.integers(info.min, info.max)),
    }  # fmt: skip
    _check_qlinear_binary(op_type, a, b, consts, dtype)


def _check_qlinear_binary(op_type, a, b, consts, dtype):
    """The QLinearAdd / QLinearMul of a and b with `consts` (sa, za, sb, zb,
    sc, zc): CPU == reference, by the flat elementwise kernel."""
    attrs = {"order": ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"]}
    feeds = {"a": a, "b": b}
    model = one_node_model(op_type, feeds, consts, attrs, domain=MS, out=dtype)
    cpu = check_model(model, feeds)
    assert f"{op_type[7:].lower()}_flat" in kernel_names(cpu._executor)


@pytest.mark.parametrize("op_type", ["QLinearAdd", "QLinearMul"])
def test_qlinear_binary_every_code_pair(op_type):
    """All 65536 (a, b) uint8 pairs with scales where the two fma orders of
    QLinearAdd round differently (tests/test_quant_ops.py ADD_DISCRIMINATING)."""
    grid = np.arange(256, dtype=np.uint8)
    for shapes in (((256, 1), (1, 256)), ((1, 256), (256, 1))):
        a, b = grid.reshape(shapes[0]), grid.reshape(shapes[1])
        consts = {
            "sa": np.float32(0.3695337176322937), "za": scalar(np.uint8, 208),
            "sb": np.float32(0.12790803611278534), "zb": scalar(np.uint8, 161),
            "sc": np.float32(0.19580408930778503), "zc": scalar(np.uint8, 139),
        }  # fmt: skip
        _check_qlinear_binary(op_type, a, b, consts, np.uint8)


@pytest.mark.parametrize("op_type", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_binary_past_int32_and_nan(op_type, dtype):
    """Scale ratios that send the sums past +-2^31 (x86's conversion gives
    INT32_MIN there, so qmin), and a zero output scale (inf and NaN: qmin
    too)."""
    grid = np.arange(256).astype(np.uint8).view(dtype)
    a, b = grid.reshape(256, 1), grid[::-1].reshape(1, 256)
    for sc in (np.float32(1e-4), np.float32(0.0)):
        consts = {
            "sa": np.float32(1e6), "za": scalar(dtype, 3),
            "sb": np.float32(2e5), "zb": scalar(dtype, 5),
            "sc": sc, "zc": scalar(dtype, 7),
        }  # fmt: skip
        _check_qlinear_binary(op_type, a, b, consts, dtype)


def test_fma_is_one_rounding():
    """The kernels' fma (llvm.fma.f32) against numerics.fma_f32 (exact
    rationals), including near-ties where two roundings would differ."""
    import numba

    from qnnjit.backends.cpu.kernels._numba import fma_f32 as fma
    from qnnjit.numerics import fma_f32

    @numba.njit
    def run(a, b, c, out):
        for i in range(a.size):
            out[i] = fma(a[i], b[i], c[i])

    rng = np.random.default_rng(21)
    n = 20000
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    b = (rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))).astype(np.float32)
    c = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    a[:3], b[:3], c[:3] = np.float32(2.0**-24), np.float32(1 + 2.0**-23), np.float32(1.0)
    out = np.empty(n, np.float32)
    run(a, b, c, out)
    np.testing.assert_array_equal(out.view(np.uint32), fma_f32(a, b, c).view(np.uint32))


@pytest.mark.parametrize("op_type", ["QLinearSigmoid", "QLinearLeakyRelu"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("isa", ["host", "avx2"])  # byte tables with vpermi2b, and not
def test_lookup_ops(op_type, dtype, isa, monkeypatch):
    _use_isa(isa, monkeypatch)
    x = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1).astype(dtype).reshape(4, 64)
    consts = {
        "xs": np.float32(0.05), "xz": scalar(dtype, 3), "ys": np.float32(0.004),
        "yz": scalar(dtype, -7 if dtype == np.int8 else 9),
    }  # fmt: skip
    attrs = {"order": ["x", "xs", "xz", "ys", "yz"]}
    if op_type == "QLinearLeakyRelu":
        attrs["alpha"] = 0.1
    model = one_node_model(op_type, {"x": x}, consts, attrs, domain=MS, out=dtype)
    cpu = check_model(model, {"x": x})
    assert "lookup_flat_bytes" in kernel_names(cpu._executor)


# ---- quantize / dequantize -----------------------------------------------------------


@FAST
@given(
    dtype=st.sampled_from([np.uint8, np.int8, np.uint16, np.int16]),
    per_axis=st.booleans(),
    pow2=st.booleans(),
    seed=SEEDS,
)
def test_quantize_dequantize(dtype, per_axis, pow2, seed):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 17)
    scale = scales_of(rng, pow2, 3, -8, 2) if per_axis else scale_of(rng, pow2, -8, 2)
    zp = codes(rng, dtype, (3,)) if per_axis else scalar(dtype, codes(rng, dtype, ()))
    ticks = rng.integers(-70000, 70000, shape) + (0.5 if pow2 else rng.random(shape))
    x = (ticks * (scale[None, :, None] if per_axis else scale)).astype(np.float32)
    x.flat[:6] = [np.nan, np.inf, -np.inf, 1e30, -0.0, 3e-39]
    q = one_node_model("QuantizeLinear", {"x": x}, {"s": scale, "z": zp}, {"axis": 1}, out=dtype)
    cpu = check_model(q, {"x": x})
    assert "quantize_flat" in kernel_names(cpu._executor)
    codes_in = codes(rng, dtype, shape)
    dq = one_node_model(
        "DequantizeLinear", {"q": codes_in}, {"s": scale, "z": zp}, {"axis": 1}, out=np.float32
    )
    cpu = check_model(dq, {"q": codes_in})
    assert "dequantize_flat" in kernel_names(cpu._executor)


def test_quantize_clamp_attribute():
    """quantize's `clamp` (a fused relu/clip): NaN still gives qmin."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, (12,)))
    attrs = {"dtype": dtypes.int8, "axis": 1, "block_size": 0, "clamp": (-5, 90)}
    node = g.add_node("quantize", [x, g.constant(np.float32(0.5)), g.constant(np.int8(3))], attrs)
    g.set_outputs(node.outputs)
    values = np.array([np.nan, -1e9, 1e9, -3.25, -3.75, 0.25, 44.25, 44.75, 100, -0.0, 1, 2])
    check_graph(g, [values.astype(np.float32)])


def _quantize_conv_graph(shape, dtype, *, group=1, quantized_is_output=False, clamp=None):
    """x (float32) -> per-tensor quantize -> 3x3 qconv (int32 sums), with
    the quantized codes also a graph output when asked."""
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.float32, shape))
    attrs = {"dtype": dtype, "axis": 1, "block_size": 0}
    if clamp is not None:
        attrs["clamp"] = clamp
    zp = dtype.numpy.type(3)
    q = g.add_node("quantize", [x, g.constant(np.float32(0.05)), g.constant(zp)], attrs,
                   name="q")  # fmt: skip
    w = g.constant(rng.integers(-128, 128, (4 * group, c // group, 3, 3)).astype(np.int8), "w")
    conv_attrs = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": group}
    conv = g.add_node("qconv", [q.outputs[0], w, g.constant(zp)], conv_attrs, name="conv")
    g.set_outputs(conv.outputs + (q.outputs if quantized_is_output else []))
    feed = (rng.standard_normal(shape) * 4).astype(np.float32)
    feed.flat[:5] = [np.nan, np.inf, -np.inf, 1e30, -0.0]
    return g, feed


@pytest.mark.parametrize("shape", [(1, 3, 9, 31), (2, 5, 17, 16)])
@pytest.mark.parametrize("dtype", [dtypes.uint8, dtypes.int8])
def test_quantize_writes_nhwc_for_a_channels_last_conv(shape, dtype):
    """A per-tensor quantize whose only reader is a channels-last conv writes
    its codes NHWC (no transpose at that edge): images of 3 channels and of
    5 (the generic interleave), two images, pixel counts that leave a short
    last block; NaN and infinities; a clamp."""
    for clamp in (None, (-2, 90) if dtype == dtypes.int8 else (5, 200)):
        g, feed = _quantize_conv_graph(shape, dtype, clamp=clamp)
        names = kernel_names(check_graph(g, [feed]))
        assert "quantize_to_nhwc" in names and "conv_nhwc" in names, names


@pytest.mark.parametrize("group,output", [(3, False), (1, True)])
def test_quantize_stays_nchw_for_other_readers(group, output):
    """A grouped conv (not channels-last) or a graph output reads the codes
    NCHW: the quantize writes them so."""
    g, feed = _quantize_conv_graph((1, 3, 6, 7), dtypes.uint8, group=group,
                                   quantized_is_output=output)  # fmt: skip
    names = kernel_names(check_graph(g, [feed]))
    assert "quantize_flat" in names and "quantize_to_nhwc" not in names, names


@pytest.mark.parametrize("shape", [(1, 3, 20, 30), (2, 5, 3, 100), (1, 64, 2, 3)])
def test_nhwc_bytes_transposes(shape):
    from qnnjit.backends.cpu.kernels.layout import nhwc_bytes

    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    np.testing.assert_array_equal(nhwc_bytes(x), x.transpose(0, 2, 3, 1))


# ---- pooling -------------------------------------------------------------------------


@pytest.mark.parametrize("dt", [dtypes.uint8, dtypes.int8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rounding", ["half_even_float", "fixed_point_double"])
def test_global_pool_of_a_channels_last_conv_sums_in_place(
    dt, per_channel, threads, rounding, monkeypatch
):
    """A conv's channels-last output pooled over H and W is summed down its
    pixel rows, not copied to NCHW first: 300 channels (a second, partial
    block of `_COLUMN_BLOCK`), three images, every task on its own range
    with two threads, a per-tensor requantize or a bias and a per-channel
    one, against the reference. The float requantize takes the kernel
    without `ep_tile` (`reduce_columns_fast`), a fixed-point one the
    general kernel."""
    from qnnjit.backends.cpu.kernels import _threads, reduce

    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(17 + per_channel)
    g = Graph()
    x_val = codes(rng, dt.numpy, (3, 8, 6, 5))
    x = _int_input(g, "x", dt, x_val.shape)
    channels = 300
    assert channels % reduce._COLUMN_BLOCK
    conv = g.add_node(
        "qconv",
        [x, g.constant(codes(rng, np.int8, (channels, 8, 1, 1))), g.constant(scalar(dt.numpy, 3)),
         g.constant(np.zeros(channels, np.int8))],
        {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1},
    )  # fmt: skip
    mult = rng.uniform(1e-4, 1e-3, channels).astype(np.float32)
    zp = codes(rng, dt.numpy, (channels,))
    y = g.add_node(
        "requantize", [conv.outputs[0], g.constant(mult), g.constant(zp)],
        {"dtype": dt, "rounding": "half_even_float", "axis": 1},
    ).outputs[0]  # fmt: skip
    acc = g.add_node("qreduce_sum", [y, g.constant(zp[:1].reshape(()))], {"axes": [2, 3]})
    if per_channel:  # a bias add, fused into the epilogue too
        bias = g.constant(rng.integers(-900, 900, (channels, 1, 1)).astype(np.int32))
        acc = g.add_node("add", [acc.outputs[0], bias])
    # about 1 / pixels: each pixel moves the mean by up to 8 codes
    pooled_mult = rng.uniform(0.02, 0.04, channels if per_channel else 1).astype(np.float32)
    pooled_zp = codes(rng, dt.numpy, (channels,) if per_channel else ())
    out = g.add_node(
        "requantize",
        [acc.outputs[0], g.constant(pooled_mult.reshape(-1 if per_channel else ())),
         g.constant(pooled_zp)],
        {"dtype": dt, "rounding": rounding, "axis": 1 if per_channel else None},
    ).outputs[0]  # fmt: skip
    g.set_outputs([out])
    cpu = CpuExecutor(g, num_threads=threads, warmup=False)  # a first run: no replay
    with _threads.recording() as calls:
        got = cpu.run([x_val])[0]
    np.testing.assert_array_equal(got, ReferenceExecutor(g).run([x_val])[0])
    kernels = [call.kernel for call in calls]
    fast = rounding == "half_even_float"
    expected = reduce.reduce_columns_fast if fast else reduce.reduce_columns
    assert expected in kernels and reduce.reduce_rows not in kernels, kernels


@FAST
@given(
    dtype=INT8,
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    pads=st.tuples(*[st.integers(0, 1)] * 4),
    dilations=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    ceil_mode=st.booleans(),
    # whole vectors, the row kernels' case: 64 (AVX-512's 64 bytes), 96 (32), 48 (16)
    channels=st.sampled_from([3, 64, 96, 48]),
    seed=SEEDS,
)
def test_max_pool_integers(dtype, size, kernel, strides, pads, dilations, ceil_mode, channels,
                           seed):  # fmt: skip
    for i in range(2):
        assume(pads[i] < kernel[i] and pads[2 + i] < kernel[i])
        span = size[i] + pads[i] + pads[2 + i] - dilations[i] * (kernel[i] - 1)
        assume(span >= 1)
    x = codes(np.random.default_rng(seed), dtype, (2, channels, *size))
    attrs = {
        "kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
        "ceil_mode": int(ceil_mode),
    }  # fmt: skip
    cpu = check_model(one_node_model("MaxPool", {"x": x}, {}, attrs, out=dtype), {"x": x})
    assert "max_pool_2d" in kernel_names(cpu._executor)


@pytest.mark.parametrize("isa", ["host", "avx2"])
@pytest.mark.parametrize("channels", [16, 32, 144, 8])
def test_max_pool_row_kernels_take_the_widest_vectors_the_channels_fill(isa, channels,
                                                                         monkeypatch):  # fmt: skip
    """The byte-maximum row kernels run 64-, 32- or 16-byte vectors, the
    widest that the channels fill whole (Inception's 144 channels: 16); 8
    channels fill none and take the per-pixel loop. Border pixels (padding)
    and a stride of 2 on both paths."""
    from qnnjit.backends.cpu.kernels import pool

    _use_isa(isa, monkeypatch)
    assert (pool._max_row_kernel([3, 3], [2, 2], [1, 1], False, channels) != 0) == (channels > 8)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1]}
    for dtype in (np.uint8, np.int8):
        x = codes(np.random.default_rng(channels), dtype, (2, channels, 9, 11))
        check_model(one_node_model("MaxPool", {"x": x}, {}, attrs, out=dtype), {"x": x})


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_global_average_pool_reduce_sum(dtype):
    x = codes(np.random.default_rng(4), dtype, (2, 6, 5, 7))
    consts = {
        "xs": np.float32(2.0**-3), "xz": scalar(dtype, 5), "ys": np.float32(2.0**-4),
        "yz": scalar(dtype, -3 if dtype == np.int8 else 3),
    }  # fmt: skip
    attrs = {"order": ["x", "xs", "xz", "ys", "yz"], "channels_last": 0}
    model = one_node_model(
        "QLinearGlobalAveragePool", {"x": x}, consts, attrs, domain=MS, out=dtype
    )
    cpu = check_model(model, {"x": x})
    assert "reduce_sum" in kernel_names(cpu._executor)


@FAST
@given(
    dtype=INT8,
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    pads=st.tuples(*[st.integers(0, 1)] * 4),
    ceil_mode=st.booleans(),
    count_include_pad=st.booleans(),
    channels_last=st.booleans(),
    pow2=st.booleans(),
    seed=SEEDS,
)
def test_qlinear_average_pool(
    dtype, size, kernel, strides, pads, ceil_mode, count_include_pad, channels_last, pow2, seed
):
    for i in range(2):
        assume(pads[i] < kernel[i] and pads[2 + i] < kernel[i])
        assume(size[i] + pads[i] + pads[2 + i] >= kernel[i])
    rng = np.random.default_rng(seed)
    shape = (2, *size, 3) if channels_last else (2, 3, *size)
    x = codes(rng, dtype, shape)
    info = np.iinfo(dtype)
    consts = {
        "xs": scale_of(rng, pow2), "xz": scalar(dtype, rng.integers(info.min, info.max + 1)),
        "ys": scale_of(rng, pow2), "yz": scalar(dtype, rng.integers(info.min, info.max + 1)),
    }  # fmt: skip
    attrs = {
        "order": ["x", "xs", "xz", "ys", "yz"], "kernel_shape": kernel, "strides": strides,
        "pads": pads, "ceil_mode": int(ceil_mode), "count_include_pad": int(count_include_pad),
        "channels_last": int(channels_last),
    }  # fmt: skip
    model = one_node_model("QLinearAveragePool", {"x": x}, consts, attrs, domain=MS, out=dtype)
    cpu = check_model(model, {"x": x})
    names = kernel_names(cpu._executor)
    assert "qaverage_pool_2d" in names or "reduce_sum" in names, names


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("bounds", [(0, None), (-3, 100), (None, 6), (7.9, 2.0)])
def test_integer_clip(dtype, bounds):
    x = codes(np.random.default_rng(2), dtype, (3, 50))
    consts = {
        "lo": None if bounds[0] is None else np.array(bounds[0], np.float32).astype(dtype),
        "hi": None if bounds[1] is None else np.array(bounds[1], np.float32).astype(dtype),
    }
    if dtype == np.uint8 and bounds[0] == -3:
        consts["lo"] = scalar(dtype, 3)
    model = one_node_model("Clip", {"x": x}, consts, {"order": ["x", "lo", "hi"]}, out=dtype)
    cpu = check_model(model, {"x": x})
    assert "clip_flat" in kernel_names(cpu._executor)


# ---- whole models ----------------------------------------------------------------------

ZOO_VARIANTS = ["qdq_u8s8_pc", "qoperator_s8s8_pt_pow2", "qdq_s8s8_pc_sym_pow2"]


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
@pytest.mark.parametrize(
    "name", ["resnet_style", "mobilenetv2_style", "mlp_attention", "inception_style"]
)
def test_model_zoo(model_zoo, name, variant):
    from modelzoo import all_variants, example_input

    chosen = next(v for v in all_variants() if v.name == variant)
    path = model_zoo.build(name, chosen, dynamic_batch=True)
    cpu = check_model(str(path), {"input": example_input(name, batch=2, seed=9)})
    ex = cpu._executor
    # the integer core never falls back to NumPy
    core = {"qconv", "qmatmul", "requantize", "qreduce_sum", "qadd", "qmul", "lookup"}
    assert not [n for n, _ in ex.declined if n.op in core], ex.describe()
    assert "cpu kernels" in cpu.report() and "fallbacks" in cpu.report()


@settings(FAST, max_examples=25)
@given(case=quantized_cnn())
def test_random_cnns(case):
    """The pipeline fuzzer's random quantized CNNs (conv, residual add,
    max/average/global pools, sigmoid table, matmul head; random or
    tie-forcing scales): cpu == reference == ONNX Runtime."""
    model, shape, seed = case
    x = np.random.default_rng(seed).normal(0, 1.5, shape).astype(np.float32)
    cpu = check_model(model, {"input": x})
    np.testing.assert_array_equal(cpu(x), run_ort(model, x))


def test_work_split_over_threads(model_zoo, monkeypatch):
    """Every kernel's task ranges, split over two threads even for tiny work,
    give the same bits."""
    import numba
    from modelzoo import all_variants, example_input

    from qnnjit.backends.cpu.kernels import _threads

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    for name, variant in [
        ("mobilenetv2_style", "qdq_u8s8_pc"),
        ("inception_style", "qoperator_s8s8_pt"),
    ]:
        chosen = next(v for v in all_variants() if v.name == variant)
        path = model_zoo.build(name, chosen, dynamic_batch=True)
        cpu = check_model(str(path), {"input": example_input(name, batch=3, seed=4)}, num_threads=2)
        assert cpu._executor.num_threads == 2


def test_kernels_compile_once_per_signature(model_zoo):
    """Every layer of every model shares one compiled kernel per storage type:
    no dispatcher holds more signatures than there are output storage widths."""
    from modelzoo import all_variants

    from qnnjit.backends.cpu import kernels

    v = next(v for v in all_variants() if v.name == "qdq_u8s8_pc")
    qnnjit.compile(str(model_zoo.build("resnet_style", v)), target="cpu")
    for module in (kernels.conv, kernels.matmul, kernels.reduce, kernels.requant):
        for name in dir(module):
            f = getattr(module, name)
            if hasattr(f, "signatures") and not name.startswith("_"):
                assert len(f.signatures) <= 3, (name, f.signatures)


def test_digits_demo_runs_on_cpu():
    from qnnjit.demo import run_demo

    lines = []
    results = run_demo(out=lines.append)
    assert results["target"] == "cpu" and "target=cpu" in lines[0]
    assert results.get("identical_to_ort", 1.0) == 1.0


# ---- api -------------------------------------------------------------------------------


def _small_model():
    case = dict(
        batch=1, groups=1, cin_g=3, m_g=4, size=[6, 6], kernel=[3, 3], strides=[1, 1],
        dilations=[1, 1], pads=[1, 1, 1, 1], x_dtype=np.uint8, w_dtype=np.int8, w_zp="zero",
        per_channel=False, bias=True, pow2=True, seed=1,
    )  # fmt: skip
    return _conv_model(case)


def test_cpu_is_the_default_target():
    assert qnnjit.api.AVAILABLE_TARGETS[0] == "cpu"
    model, feeds = _small_model()
    assert qnnjit.compile(model).target == "cpu"


@pytest.mark.parametrize("threads", [1, 2, 64])
def test_num_threads(threads):
    model, feeds = _small_model()
    cpu = check_model(model, feeds, num_threads=threads)
    assert 1 <= cpu._executor.num_threads <= threads


def test_num_threads_environment(monkeypatch):
    monkeypatch.setenv("QNNJIT_NUM_THREADS", "1")
    model, feeds = _small_model()
    assert check_model(model, feeds)._executor.num_threads == 1


def test_report_lists_fallbacks_with_reasons():
    x = np.zeros((2, 3), np.float32)
    model = one_node_model("Relu", {"x": x}, {}, out=np.float32)
    cpu = check_model(model, {"x": x})
    assert "relu" in cpu.report() and "has no cpu lowering" in cpu.report()


def test_wrong_inputs_still_raise_input_error():
    model, feeds = _small_model()
    cpu = qnnjit.compile(model, target="cpu")
    with pytest.raises(qnnjit.InputError):
        cpu.run({"x": feeds["x"].astype(np.int8)})


def test_onnx_model_is_valid():
    model, _ = _small_model()
    onnx.checker.check_model(model)
