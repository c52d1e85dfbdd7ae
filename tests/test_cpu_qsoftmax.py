"""The CPU kernel of `qsoftmax` (ONNX Runtime's QLinearSoftmax,
`backends/cpu/kernels/softmax.py`) against the reference semantics
(`ir/ops/qlinear_contrib.py`), bit for bit: u8 and s8 codes, rows contiguous
(`softmax_rows`) or strided (`softmax_columns`, a non-last axis), `flatten`,
scales that force rounding ties, tiny / zero / negative y scales (NaN, inf
and out-of-int32 quotients), one and two threads; replayed runs; ONNX
Runtime itself on a few models."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnnjit.backends.cpu.executor import CpuExecutor
from qnnjit.backends.cpu.kernels import _threads, softmax
from qnnjit.backends.reference import ReferenceExecutor
from qnnjit.ir import dtypes
from qnnjit.ir.graph import Graph
from qnnjit.ir.types import TensorType

F32 = np.float32
LENGTHS = [1, 2, 7, 16, 64, 197]
DTYPES = [dtypes.uint8, dtypes.int8]


def y_scale_for(big: int) -> F32:
    """A y scale whose Y = floor(1 / y_scale) is `big`."""
    ys = F32(1 / (big + 0.25))
    assert np.floor(F32(1) / ys) == big
    return ys


# x scales: random, powers of two (exact table ratios, ties), large (table
# entries that underflow to 0)
X_SCALES = [F32(0.0731), F32(2**-4), F32(0.5), F32(1.0), F32(8.0)]
# (y_scale, zero point as (u8, s8)): ORT's 1/256 and 1/255, Y = 249 (odd:
# Y / 2 is a tie whose half-even and half-away results differ), random, big
# (Y = 0), tiny (quotients past 2^31), zero (Y = inf: inf and NaN), negative
Y_PARAMS = [
    (F32(1 / 256), (0, -128)),
    (F32(1 / 255), (0, -128)),
    (y_scale_for(249), (3, -120)),
    (F32(0.0123), (200, 17)),
    (F32(2.0), (255, 127)),
    (F32(1e-12), (0, -128)),
    (F32(0.0), (0, -128)),
    (F32(-1 / 256), (255, 127)),
]


def softmax_graph(dtype, shape, axis, flatten, xs, ys, yzp, *, head=False):
    """x -> qsoftmax -> y. `head`: an integer clip before it (so that the
    softmax reads no graph input and its step can replay)."""
    g = Graph()
    x = g.add_input("x", TensorType(dtype, shape))
    if head:
        x = g.add_node("clip", [x], {"min": None, "max": None}).outputs[0]
    zp = g.constant(np.array(yzp, dtype.numpy), "y_zp") if yzp is not None else None
    node = g.add_node(
        "qsoftmax",
        [x, g.constant(F32(xs), "x_scale"), g.constant(F32(ys), "y_scale"), zp],
        {"axis": axis, "flatten": flatten},
    )
    g.set_outputs(node.outputs)
    return g


def inputs(rng, dtype, shape):
    """Random codes, all-equal rows, extremes (qmin / qmax alternating), one
    code high among low ones."""
    info = np.iinfo(dtype.numpy)
    size = int(np.prod(shape))
    random = rng.integers(info.min, info.max + 1, shape).astype(dtype.numpy)
    equal = np.full(shape, rng.integers(info.min, info.max + 1), dtype.numpy)
    extremes = np.where(np.arange(size) % 3 == 0, info.max, info.min).astype(dtype.numpy)
    spike = np.full(size, info.min + 1, dtype.numpy)
    spike[:: max(size // 5, 1)] = info.max - 1
    return [random, equal, extremes.reshape(shape), spike.reshape(shape)]


def check(g, arrays, threads=1, kernel=None):
    """CPU == reference on every array (of one shape: the first run runs the
    plan, the second records it, the later ones replay); the step is the
    softmax kernel (no fallback) and `kernel` (softmax_rows or
    softmax_columns) did the first run's work."""
    cpu = CpuExecutor(g, num_threads=threads, warmup=False)
    assert not cpu.declined, cpu.describe()
    assert any(step.name.startswith("softmax[") for step in cpu.steps), cpu.describe()
    ref = ReferenceExecutor(g)
    for index, x in enumerate(arrays):
        with _threads.recording() as calls:
            got = cpu.run([x])[0]
        want = ref.run([x])[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"input {index}")
        if kernel is not None and index == 0:
            assert [c.kernel for c in calls] == [kernel], calls
    return cpu


# (shape with L for the row length, axis, flatten, kernel)
LAYOUTS = [
    (("L",), 0, False, softmax.softmax_rows),
    ((5, "L"), 1, False, softmax.softmax_rows),
    ((2, 3, "L"), 2, False, softmax.softmax_rows),
    (("L", 4), 0, False, softmax.softmax_columns),
    ((2, "L", 3), 1, False, softmax.softmax_columns),
    ((2, 3, "L", 70), 2, False, softmax.softmax_columns),  # two blocks, one partial
    ((3, "L"), 1, True, softmax.softmax_rows),
    ((2, "L", 3), 1, True, softmax.softmax_rows),
    ((2, 3, "L", 2), 2, True, softmax.softmax_rows),
    (("L", 2), 0, True, softmax.softmax_rows),  # the whole tensor is one row
]


@pytest.fixture
def split_everything(monkeypatch):
    """Every call with more than one task splits over the threads."""
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)


@pytest.mark.filterwarnings("ignore:divide by zero")  # the reference, at y_scale 0
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay[0]}-axis{lay[1]}-f{lay[2]:d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_matches_the_reference(dtype, layout, threads, split_everything):
    """Every row length, scale pair and input kind of the module lists, for
    one layout, dtype and thread count (at two threads, the rows split over
    the threads only: fewer scales)."""
    template, axis, flatten, kernel = layout
    x_scales = X_SCALES if threads == 1 else X_SCALES[:2]
    y_params = Y_PARAMS if threads == 1 else Y_PARAMS[:3]
    rng = np.random.default_rng(zlib.crc32(repr((str(dtype), template, axis, flatten)).encode()))
    for length in LENGTHS:
        shape = tuple(length if d == "L" else d for d in template)
        arrays = inputs(rng, dtype, shape)
        for xs in x_scales:
            for ys, zps in y_params:
                yzp = zps[dtype == dtypes.int8]
                g = softmax_graph(dtype, shape, axis, flatten, xs, ys, yzp)
                check(g, arrays, threads, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vit_attention_map(dtype, split_everything):
    """ViT-B's [1, 3, 197, 197] attention scores at ORT's output scale 1/256,
    over the last axis and over axis 2, two threads."""
    rng = np.random.default_rng(3)
    shape = (1, 3, 197, 197)
    arrays = inputs(rng, dtype, shape)[:2]
    zp = 0 if dtype == dtypes.uint8 else -128
    for axis, kernel in ((3, softmax.softmax_rows), (2, softmax.softmax_columns)):
        g = softmax_graph(dtype, shape, axis, False, F32(0.0625), F32(1 / 256), zp)
        check(g, arrays, 2, kernel)


def test_absent_zero_point_and_symbolic_row_length():
    """No y zero point (0); a symbolic row length, so each length's table is
    built at run time: runs alternate between lengths; an empty tensor."""
    g = softmax_graph(dtypes.uint8, ("n", "d"), 1, False, F32(0.1), F32(1 / 256), None)
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert not cpu.declined, cpu.describe()
    ref = ReferenceExecutor(g)
    rng = np.random.default_rng(5)
    for n, d in ((3, 7), (3, 197), (2, 7), (3, 64), (3, 197), (0, 5)):
        x = rng.integers(0, 256, (n, d)).astype(np.uint8)
        np.testing.assert_array_equal(cpu.run([x])[0], ref.run([x])[0], err_msg=f"{n}x{d}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape,axis,flatten",
    [((2, 3, 197, 197), 3, False), ((2, 3, 50, 70), 2, False), ((2, 5, 9), 1, True)],
)
def test_softmax_step_is_replayed(shape, axis, flatten, threads, split_everything):
    """After the recording run, the softmax step is replayed (its kernel call
    repeated on the same buffers), not re-run, and new inputs still give the
    reference's bits."""
    g = softmax_graph(dtypes.int8, shape, axis, flatten, F32(0.125), F32(1 / 255), -128, head=True)
    cpu = CpuExecutor(g, num_threads=threads)  # the warm-up records batch 2
    ref = ReferenceExecutor(g)
    rng = np.random.default_rng(9)
    for seed in range(3):
        x = rng.integers(-128, 128, shape).astype(np.int8)
        np.testing.assert_array_equal(cpu.run([x])[0], ref.run([x])[0], err_msg=f"run {seed}")
    ((key, (binding,)),) = cpu._bindings.items()
    assert key == ((shape, np.dtype(np.int8)),)
    on_inputs = [step.name for step in binding.input_steps]
    assert binding.replayed_steps == 2 and on_inputs == ["clip_flat[int8]"], on_inputs
    assert not binding.rerun_steps and "replayed: 2 of 2 steps" in cpu.describe()


@pytest.mark.parametrize("which", [1, 2, 3])
def test_run_time_parameters_fall_back_to_the_reference(which):
    """A scale or zero point that is a run-time value: the lowering declines
    (the table and Y are built at compile time) and the reference runs."""
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (4, 9)))
    params = [g.constant(F32(0.1)), g.constant(F32(1 / 256)), g.constant(np.uint8(0))]
    params[which - 1] = g.add_input("p", TensorType(params[which - 1].type.dtype, ()))
    node = g.add_node("qsoftmax", [x, *params], {"axis": 1, "flatten": False})
    g.set_outputs(node.outputs)
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert [n.op for n, _ in cpu.declined] == ["qsoftmax"]
    assert "not a compile-time constant" in cpu.declined[0][1]
    x_val = np.random.default_rng(1).integers(0, 256, (4, 9)).astype(np.uint8)
    p_val = [F32(0.1), F32(1 / 256), np.uint8(0)][which - 1]
    feeds = [x_val, np.array(p_val)]
    np.testing.assert_array_equal(cpu.run(feeds)[0], ReferenceExecutor(g).run(feeds)[0])


def test_x_scale_zero_declines():
    """x scale 0: the table divides by it, so no kernel; the reference raises
    as it would at run time."""
    g = softmax_graph(dtypes.uint8, (2, 9), 1, False, F32(0.0), F32(1 / 256), 0)
    cpu = CpuExecutor(g, num_threads=1, warmup=False)
    assert [n.op for n, _ in cpu.declined] == ["qsoftmax"]
    assert "no exp table" in cpu.declined[0][1]


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_x_scale_gives_infinite_table_entries(dtype):
    """A negative x scale: table entries overflow to inf, sums are inf and
    quotients inf or NaN; the kernel follows the reference there too."""
    rng = np.random.default_rng(8)
    for shape, axis in (((4, 16), 1), ((3, 16, 5), 1)):
        g = softmax_graph(dtype, shape, axis, False, F32(-0.5), F32(1 / 256), 5)
        check(g, inputs(rng, dtype, shape))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_shapes_and_scales(data):
    """Random rank 1-4 shapes, axis, flatten, scales (random or powers of
    two) and zero points, against the reference."""
    dtype = data.draw(st.sampled_from(DTYPES))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    axis = data.draw(st.integers(0, len(shape) - 1))
    flatten = data.draw(st.booleans())

    def scale(lo, hi):
        exponent = data.draw(st.integers(lo, hi))
        if data.draw(st.booleans()):
            return F32(2.0**exponent)
        return F32(2.0**exponent * data.draw(st.floats(1.0, 2.0)))

    xs, ys = scale(-9, 3), scale(-12, 0)
    info = np.iinfo(dtype.numpy)
    yzp = data.draw(st.integers(int(info.min), int(info.max)))
    seed = data.draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(dtype.numpy)
    check(softmax_graph(dtype, shape, axis, flatten, xs, ys, yzp), [x])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("opset,axis,shape", [(13, -1, (3, 197)), (13, 1, (2, 37, 5)),
                                              (12, 1, (2, 4, 5))])  # fmt: skip
def test_onnx_runtime_qlinear_softmax(dtype, opset, axis, shape):
    """A QLinearSoftmax model through the frontend on target "cpu": ONNX
    Runtime's own output, bit for bit, from the kernel."""
    import onnxruntime as ort
    from test_cpu_backend import one_node_model

    import qnnjit

    rng = np.random.default_rng(21)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    zero = np.array(0 if dtype == np.uint8 else -128, dtype)
    consts = {"xs": F32(0.0625), "xz": np.array(0, dtype), "ys": F32(1 / 256), "yz": zero}
    model = one_node_model(
        "QLinearSoftmax", {"x": x}, consts, {"axis": axis, "opset": opset},
        domain="com.microsoft", out=dtype,
    )  # fmt: skip
    cpu = qnnjit.compile(model, target="cpu", num_threads=1)
    assert not cpu._executor.declined, cpu.report()
    assert any(s.name.startswith("softmax[") for s in cpu._executor.steps), cpu.report()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(cpu.run({"x": x})["y"], want)
