"""The CPU kernels of `qaverage_pool` (ONNX Runtime's QLinearAveragePool,
`backends/cpu/kernels/pool.py`) against the reference semantics
(`ir/ops/qlinear_contrib.py`), bit for bit: a conv's channels-last result
pooled in place (`qaverage_pool_2d_nhwc`, a channels-last result), an NCHW
tensor (the same kernel on its planes), and the node's own NHWC layout; u8 and s8;
windows 3x3, 2x2, 3x1, 1x1 with strides, pads, ceil_mode,
count_include_pad, windows with no tap inside, the global case; scales with
rounding ties (powers of two, and float sums whose ties their order breaks)
and quotients past int32; one and two threads. Each run is checked three
times (step by step, recorded, replayed) and the pool's step replays."""

from __future__ import annotations

import numpy as np
import pytest

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.kernels import _threads, pool
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

F32 = np.float32
DTYPES = [dtypes.uint8, dtypes.int8]
SIZE = (7, 9)  # odd, different: ceil_mode windows overhang, rows and columns differ

# (kernel, strides, pads, ceil_mode, count_include_pad); a kernel of None is
# the whole image
POOLS = [
    ((3, 3), (1, 1), (1, 1, 1, 1), 0, 0),  # Inception's
    ((3, 3), (1, 1), (1, 1, 1, 1), 0, 1),
    ((2, 2), (2, 2), (0, 0, 0, 0), 1, 0),
    ((2, 2), (2, 2), (0, 0, 0, 0), 0, 1),
    ((2, 2), (1, 2), (1, 0, 0, 1), 1, 1),
    ((3, 1), (2, 1), (1, 0, 1, 0), 0, 0),
    ((3, 1), (1, 2), (1, 0, 0, 0), 1, 1),
    ((3, 3), (2, 2), (0, 1, 1, 0), 1, 0),
    ((3, 3), (3, 2), (2, 2, 2, 2), 1, 0),  # windows with one tap inside, or none
    ((1, 1), (1, 1), (1, 1, 1, 1), 0, 0),  # padding rows: count 0, NaN -> qmin
    ((1, 1), (1, 1), (1, 1, 1, 1), 0, 1),  # ... or 0 / 1 -> y_zp
    (None, (1, 1), (0, 0, 0, 0), 0, 0),  # global: integer sums
    (None, (2, 3), (0, 0, 0, 0), 1, 1),
    (None, (1, 1), (1, 0, 0, 0), 0, 0),  # the image's size, padded: the float path
]


def _tie_scales():
    """x_scale = 4.5 * y_scale exactly, so that y = (sum of the window's
    (code - x_zp)) / 2 exactly for 3x3 windows (count 9): every window with
    an odd sum is a tie, and the float32 rounding of the taps' sum, which
    depends on their order, decides it."""
    ys = F32(751_477 * 2.0**-24)
    xs = F32(9 * 751_477 * 2.0**-25)
    assert float(xs) == 4.5 * float(ys)
    return xs, ys


# (x_scale, y_scale): random; powers of two (exact sums, ties); order-broken
# ties; a tiny y_scale (quotients past int32: cvtps2dq's INT32_MIN -> qmin)
SCALES = [(F32(0.0731), F32(0.0517)), (F32(2**-3), F32(2**-4)), _tie_scales(),
          (F32(0.0731), F32(1e-12))]  # fmt: skip


def codes(rng, dtype, shape):
    info = np.iinfo(dtype.numpy)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype.numpy)


def conv(g: Graph, rng, x, dt, cin: int, cout: int, kernel: int = 1, stride: int = 1):
    """qconv (s8 weights, per-channel requantize to `dt`): the conv_nhwc
    kernel, whose result is channels-last."""
    w = rng.integers(-128, 128, (cout, cin, kernel, kernel)).astype(np.int8)
    pad = kernel // 2
    acc = g.add_node(
        "qconv",
        [x, g.constant(w), g.constant(codes(rng, dt, ())), g.constant(np.zeros(cout, np.int8))],
        {"strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "group": 1},
    )
    # output codes spread over the type's range (acc std ~ 74 * 74 * sqrt(taps))
    mult = (rng.uniform(0.5, 1.5, cout) * 0.01 / np.sqrt(cin * kernel * kernel)).astype(F32)
    return g.add_node(
        "requantize", [acc.outputs[0], g.constant(mult), g.constant(codes(rng, dt, (cout,)))],
        {"dtype": dt, "rounding": "half_even_float", "axis": 1},
    ).outputs[0]  # fmt: skip


def qaverage_pool(g: Graph, rng, x, dt, spec, scales, size, channels_last=False):
    kernel, strides, pads, ceil_mode, include_pad = spec
    xs, ys = scales
    attrs = {
        "kernel_shape": kernel or size, "strides": strides, "pads": pads,
        "ceil_mode": ceil_mode, "count_include_pad": include_pad, "channels_last": channels_last,
    }  # fmt: skip
    params = [g.constant(xs), g.constant(codes(rng, dt, ())), g.constant(ys),
              g.constant(codes(rng, dt, ()))]  # fmt: skip
    return g.add_node("qaverage_pool", [x, *params], attrs).outputs[0]


def pool_graph(rng, dt, producer, spec, scales, channels):
    """(graph, input shape): x -> producer -> qaverage_pool -> y. `producer`:
    "conv" (a channels-last result), "clip" (NCHW), or "nhwc" (a clip, and
    the pool in the node's own NHWC layout)."""
    g = Graph()
    if producer == "conv":
        shape = (2, 8, *SIZE)
        x = conv(g, rng, g.add_input("x", TensorType(dt, shape)), dt, 8, channels)
    else:
        shape = (2, *SIZE, channels) if producer == "nhwc" else (2, channels, *SIZE)
        x = g.add_input("x", TensorType(dt, shape))
        x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    g.set_outputs([qaverage_pool(g, rng, x, dt, spec, scales, SIZE, producer == "nhwc")])
    return g, shape


def check_runs(g: Graph, inputs: list, threads: int):
    """CPU == reference on three runs (step by step, recorded, replayed) of
    `inputs` (per run, x or a list of the graph's inputs); returns the
    executor, the `run_tasks` kernels of its first run and its binding."""
    cpu = CpuExecutor(g, num_threads=threads, warmup=False)
    assert not cpu.declined, cpu.describe()
    ref = ReferenceExecutor(g)
    kernels = None
    for index, arrays in enumerate(inputs):
        arrays = arrays if isinstance(arrays, list) else [arrays]
        with _threads.recording() as calls:
            got = cpu.run(arrays)
        kernels = [c.kernel for c in calls] if kernels is None else kernels
        for a, b in zip(got, ref.run(arrays), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b, err_msg=f"run {index}")
    ((_, (binding,)),) = cpu._bindings.items()
    return cpu, kernels, binding


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("producer", ["conv", "clip", "nhwc"])
@pytest.mark.parametrize("threads", [1, 2])
def test_average_pool_matches_the_reference_and_replays(dt, producer, threads, monkeypatch):
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)  # every call split over threads
    want = pool.qaverage_pool_2d_nhwc
    for index, (spec, scales, channels) in enumerate(
        (spec, scales, channels) for spec in POOLS for scales in SCALES for channels in (3, 40)
    ):
        rng = np.random.default_rng(index)
        g, shape = pool_graph(rng, dt, producer, spec, scales, channels)
        cpu, kernels, binding = check_runs(g, [codes(rng, dt, shape) for _ in range(3)], threads)
        assert kernels.count(want) == 1, (spec, kernels)
        # the pool reads its operand in place: every step replays but the
        # one reading x (on each run's array where it can: not a conv, which
        # copies x channels-last)
        assert binding.input_steps + binding.rerun_steps == [cpu.steps[0]], spec


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_tap_order_decides_ties(dt):
    """With `_tie_scales` a sum of the taps in another order than the
    reference's row-major one rounds differently in some windows (so the
    test above would see a changed order): checked here on the reference's
    own arithmetic, and the kernel agrees with it on a larger map."""
    xs, ys = _tie_scales()
    rng = np.random.default_rng(5)
    x = codes(rng, dt, (1, 64, 14, 14))
    taps = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (3, 3), axis=(2, 3))
    terms = (xs * taps.astype(F32)).astype(F32).reshape(*taps.shape[:4], 9)

    def rounded(order):
        s = np.zeros(terms.shape[:4], F32)
        for k in order:
            s = (s + terms[..., k]).astype(F32)
        return np.rint((s / F32(9)).astype(F32) / ys)

    assert (rounded(range(9)) != rounded([0, 3, 6, 1, 4, 7, 2, 5, 8])).any()  # column-major
    g = Graph()
    xin = g.add_input("x", TensorType(dt, x.shape))
    y = conv(g, rng, xin, dt, 64, 64)
    g.set_outputs([qaverage_pool(g, rng, y, dt, POOLS[0], (xs, ys), (14, 14))])
    check_runs(g, [codes(rng, dt, x.shape) for _ in range(3)], 1)


def test_inception_pool_feeds_a_conv_without_copies():
    """conv -> 3x3 average pool -> 1x1 conv: the pool's channels-last result
    is the next conv's NHWC operand as it is, so every step after the first
    replays (before, the pool copied its operand to NCHW and the conv
    transposed the pool's NCHW result back, both every run)."""
    rng = np.random.default_rng(11)
    dt = dtypes.uint8
    g = Graph()
    x = g.add_input("x", TensorType(dt, (1, 16, 12, 12)))
    y = conv(g, rng, x, dt, 16, 96, 3)
    y = qaverage_pool(g, rng, y, dt, POOLS[0], SCALES[0], (12, 12))
    g.set_outputs([conv(g, rng, y, dt, 96, 32)])
    cpu, kernels, binding = check_runs(g, [codes(rng, dt, (1, 16, 12, 12)) for _ in range(3)], 1)
    assert pool.qaverage_pool_2d_nhwc in kernels
    assert binding.rerun_steps == [cpu.steps[0]], binding.rerun_steps  # a conv reading x
    assert binding.replayed_steps == len(cpu.steps) - 1
