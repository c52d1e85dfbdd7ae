"""Replayed runs (`qnnjit/backends/cpu/replay.py`): after a run on some input
shapes has been recorded, later runs on those shapes repeat its kernel calls
on the same buffers. They must give the reference's bits on every new input,
never write the caller's arrays, return outputs of their own, and re-run
every step whose recording does not show it safe to repeat."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

import qnnjit
from qnnjit.backends.cpu import replay
from qnnjit.backends.cpu.kernels import _threads
from qnnjit.errors import QnnjitError


def _zoo_model(model_zoo, name, variant="qdq_u8s8_pc"):
    from modelzoo import all_variants

    chosen = next(v for v in all_variants() if v.name == variant)
    path = str(model_zoo.build(name, chosen, dynamic_batch=True))
    return path, qnnjit.compile(path, target="reference")


def _binding(cpu, batch):
    """The one pooled binding of `cpu` for inputs of `batch` images."""
    (free,) = [free for key, free in cpu._executor._bindings.items() if key[0][0][0] == batch]
    (binding,) = free
    return binding


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "name,variant",
    [
        ("resnet_style", "qdq_u8s8_pc"),
        ("mobilenetv2_style", "qoperator_s8s8_pt_pow2"),
        ("inception_style", "qdq_u8s8_pc"),
        ("mlp_attention", "qdq_s8s8_pc_sym_pow2"),
    ],
)
def test_replayed_runs_give_the_reference_bits_on_new_inputs(model_zoo, monkeypatch, name,
                                                              variant, threads):  # fmt: skip
    """Batch 2 (the warm-up ran batch 1): a plain run, a recording one, then
    replays, each on a new input; at two threads every call that can split
    does."""
    from modelzoo import example_input

    if threads == 2 and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    path, ref = _zoo_model(model_zoo, name, variant)
    cpu = qnnjit.compile(path, target="cpu", num_threads=threads)
    for seed in range(5):
        x = example_input(name, batch=2, seed=seed)
        np.testing.assert_array_equal(cpu(x), ref(x), err_msg=f"run {seed}")
    binding = _binding(cpu, 2)
    steps = len(cpu._executor.steps)
    # Every step replays, in every zoo model: concats, pools and attention's
    # steps included, and the input's quantize on each run's array.
    reruns = [step.name for step in binding.rerun_steps]
    assert binding.replayed_steps + len(binding.constant_steps) == steps and not reruns, reruns
    (step,) = binding.input_steps
    assert step.name.startswith("quantize"), step.name


def test_runs_leave_the_callers_arrays_alone_and_return_their_own(model_zoo):
    from modelzoo import example_input

    path, ref = _zoo_model(model_zoo, "mobilenetv2_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    x = example_input("mobilenetv2_style", batch=1, seed=1)
    kept = x.copy()
    first, second = cpu(x), cpu(x)  # both replays: the warm-up recorded batch 1
    assert _binding(cpu, 1) is not None
    np.testing.assert_array_equal(x, kept)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, second)
    x *= -0.5  # the same array, new contents: the next run reads them
    np.testing.assert_array_equal(cpu(x), ref(x))
    np.testing.assert_array_equal(first, second)  # earlier results untouched


def test_concurrent_runs_record_a_binding_each(model_zoo):
    from modelzoo import example_input

    path, ref = _zoo_model(model_zoo, "resnet_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    inputs = [example_input("resnet_style", batch=1, seed=s) for s in range(8)]
    wants = [ref(x) for x in inputs]
    barrier = threading.Barrier(2)
    failures = []

    def worker(offset):
        barrier.wait()
        for _ in range(10):
            for i in range(offset, len(inputs), 2):
                if not np.array_equal(cpu(inputs[i]), wants[i]):
                    failures.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert 1 <= len(cpu._executor._bindings[((inputs[0].shape, inputs[0].dtype),)]) <= 2


def test_bindings_are_kept_for_a_few_shapes_only(model_zoo, monkeypatch):
    """Recordings for the last 4 input shapes; the shapes run once are
    forgotten past `_SEEN_SHAPES` (3 here), which only delays a recording."""
    from modelzoo import example_input

    from qnnjit.backends.cpu import executor

    monkeypatch.setattr(executor, "_SEEN_SHAPES", 3)
    path, ref = _zoo_model(model_zoo, "resnet_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    for batch in range(1, 8):
        for seed in range(3):  # plain, recorded, replayed
            x = example_input("resnet_style", batch=batch, seed=seed)
            np.testing.assert_array_equal(cpu(x), ref(x), err_msg=f"batch {batch}")
        assert len(cpu._executor._seen) <= 3
    kept = [key[0][0][0] for key in cpu._executor._bindings]
    assert kept == [4, 5, 6, 7]


def test_a_binding_holds_about_the_live_tensors_not_all_of_them(model_zoo):
    """The recording draws each step's results from buffers whose tensors no
    later step reads (`kernels/_buffers.py`): a binding's memory is within
    twice the largest set of tensors live at once (best fit leaves some
    slack), and well under the sum of every result. (That the reuse never
    overwrites a live tensor is what the bit-exact replays above check.)"""
    from modelzoo import example_input

    from qnnjit.backends.cpu.kernels._buffers import root

    path, ref = _zoo_model(model_zoo, "mobilenetv2_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    x = example_input("mobilenetv2_style", batch=4, seed=0)
    for _ in range(3):  # plain, recorded, replayed
        np.testing.assert_array_equal(cpu(x), ref(x))
    binding, executor = _binding(cpu, 4), cpu._executor
    results = [binding.env[s] for _, _, writes, _ in executor._plan_steps for s in writes]
    pooled = {id(root(r)): root(r).nbytes for r in results if root(r).dtype == np.uint8}
    live, live_bytes = set(executor._input_slots), []
    for _, _, writes, frees in executor._plan_steps:
        live.update(writes)
        roots = {id(root(binding.env[s])): root(binding.env[s]) for s in live if s not in
                 executor._input_slots}  # fmt: skip
        live_bytes.append(sum(r.nbytes for r in roots.values()))
        live.difference_update(frees)
    total = sum(pooled.values())
    assert total <= 2 * max(live_bytes)
    assert total < 0.6 * sum(r.nbytes for r in results), (total, len(results))


def test_a_failing_replayed_call_names_its_node(model_zoo):
    from modelzoo import example_input

    path, _ = _zoo_model(model_zoo, "resnet_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=1)
    binding = _binding(cpu, 1)
    _, step = binding.calls[-1]

    def broken():
        raise ValueError("boom")

    binding.calls[-1] = (broken, step)
    with pytest.raises(QnnjitError, match=f"{step.nodes[0].name}.*boom"):
        cpu(example_input("resnet_style", batch=1, seed=0))


# ---- when a step may be replayed ------------------------------------------------------


def _kernel(t0, t1, *args):
    """A stand-in for a Numba kernel: recorded calls are only compared."""


def _replayable(step_run, inputs):
    """`replay._replayable` on two recorded calls of `step_run(*inputs)`."""
    made = []
    for _ in range(2):
        with _threads.recording() as calls:
            results = step_run(*inputs)
        made.append((results, calls))
    return replay._replayable(inputs, *made)


WEIGHTS = np.arange(12, dtype=np.int8)


def _call(*args):
    _threads.run_tasks(_kernel, 4, 1, 1, *args)


def test_a_step_whose_kernels_take_constants_and_views_is_replayed():
    def run(x):
        out = np.empty((2, 3, 4), np.uint8)
        _call(x.reshape(-1), WEIGHTS, 3, np.float32(0.5), out.reshape(-1))
        return [out.transpose(0, 2, 1)]  # a channels-last result: a view of what was written

    assert _replayable(run, [np.zeros((2, 3, 4), np.uint8)])


def test_a_view_step_is_replayed():
    assert _replayable(lambda x: [x.reshape(-1)], [np.zeros((2, 3), np.uint8)])


@pytest.mark.parametrize(
    "why",
    ["copies its operand", "per-call scratch", "computes outside the kernels", "scalar differs",
     "writes a copy of its output", "other view", "second output not written"],
)  # fmt: skip
def test_a_step_that_is_not_safe_to_repeat_is_not_replayed(why):
    calls_made = []

    def run(x):
        out = np.empty(x.shape, np.uint8)
        calls_made.append(1)
        if why == "copies its operand":
            _call(np.ascontiguousarray(x.T), out)
        elif why == "per-call scratch":
            _call(x, np.zeros(8, np.int32), out)
        elif why == "computes outside the kernels":
            _call(x, WEIGHTS)
            out = x + 1
        elif why == "scalar differs":
            _call(x, len(calls_made), out)
        elif why == "writes a copy of its output":
            _call(x, out.T.reshape(-1))  # reshaping the transposed view copies it
            out = out.T
        elif why == "other view":
            _call(x[len(calls_made) % 2 :], out)
        else:
            _call(x, out)
            return [out, np.empty(3, np.uint8)]
        return [out]

    assert not _replayable(run, [np.zeros((3, 4), np.uint8)])


def test_the_demo_model_replays_every_step():
    """The digits CNN's first conv has one input channel. As an NHWC GEMM conv
    it hands the conv after it NHWC bytes, which that conv reads as they
    are; as an NCHW kernel it made that conv copy them on each call, and so
    re-run on every replay (batch 1: 26 -> 16 us a run)."""
    from importlib import resources

    from qnnjit.demo import DATA

    with resources.as_file(DATA / "digits_int8.onnx") as path:
        cpu = qnnjit.compile(str(path), target="cpu", num_threads=1)
        ref = qnnjit.compile(str(path), target="reference")
    rng = np.random.default_rng(5)
    for _ in range(4):
        x = rng.random((1, 1, 8, 8), dtype=np.float32) * 16
        np.testing.assert_array_equal(cpu(x), ref(x))
    binding = _binding(cpu, 1)
    reruns = [step.name for step in binding.rerun_steps]
    assert binding.replayed_steps == len(cpu._executor.steps) and not reruns, reruns


@pytest.mark.parametrize("threads", [1, 2])
def test_a_step_that_reads_a_graph_input_replays_on_each_runs_array(model_zoo, monkeypatch,
                                                                    threads):  # fmt: skip
    """The first step reads the caller's array: its recorded call replays on
    each run's array itself (the image quantize takes it whole:
    `replay._on_run_input`). One that cannot be viewed alike (strided,
    read-only, Fortran-ordered) runs the step again instead; the same bits
    either way, and the caller's arrays are left alone."""
    from modelzoo import example_input

    if threads == 2 and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    monkeypatch.setattr(_threads, "MIN_PARALLEL_WORK", 0)
    path, ref = _zoo_model(model_zoo, "resnet_style")
    cpu = qnnjit.compile(path, target="cpu", num_threads=threads)
    steps = cpu._executor.steps
    binding = _binding(cpu, 1)
    assert binding.input_steps == [steps[0]] and binding.calls[0][1] is steps[0]
    assert binding.calls[0][0].__name__ == "replay_on_input"
    assert binding.replayed_steps == len(steps) and not binding.rerun_steps
    assert not binding.constant_steps
    assert f"replayed: {binding.replayed_steps} of {len(steps)} steps" in cpu.report()
    reruns = []
    monkeypatch.setattr(replay, "_rerun", _counting(replay._rerun, reruns))
    cpu = qnnjit.compile(path, target="cpu", num_threads=threads)  # recorded again
    x = example_input("resnet_style", batch=1, seed=3)
    wide = np.repeat(example_input("resnet_style", batch=1, seed=4), 2, axis=3)
    locked = example_input("resnet_style", batch=1, seed=5)
    locked.flags.writeable = False
    for array, laid_out_alike in [
        (x, True), (wide[..., ::2], False), (locked, False), (np.asfortranarray(x), False),
    ]:  # fmt: skip
        kept, before = array.copy(), len(reruns)
        np.testing.assert_array_equal(cpu(array), ref(kept))
        np.testing.assert_array_equal(array, kept)
        assert len(reruns) == before + (not laid_out_alike), (len(reruns), before)


def _counting(make_rerun, calls: list):
    """`replay._rerun` whose calls append to `calls`."""

    def counted(*args):
        rerun = make_rerun(*args)

        def call():
            calls.append(1)
            rerun()

        return call

    return counted


@pytest.mark.parametrize("op", ["qadd", "qmul"])
def test_a_binary_op_with_a_broadcast_constant_is_replayed(op):
    """A bias qadd after a matmul: the constant row is broadcast to the
    result's shape once per shape, not copied anew by every call."""
    from qnnjit.backends.cpu.kernels import elementwise
    from qnnjit.backends.cpu.kernels._lowering import LowerContext
    from qnnjit.ir import Graph, TensorType, dtypes

    g = Graph()
    x = g.add_input("x", TensorType(dtypes.uint8, (4, 8)))
    bias = g.constant(np.arange(8, dtype=np.uint8), "bias")
    scale, zp = g.constant(np.float32(0.1), "s"), g.constant(np.uint8(128), "z")
    rounding = "mlas_fma" if op == "qadd" else "mlas"
    node = g.add_node(op, [bias, scale, zp, x, scale, zp, scale, zp], {"rounding": rounding})
    lower = elementwise.lower_qadd if op == "qadd" else elementwise.lower_qmul
    kernel = lower(node, LowerContext(g))
    assert _replayable(kernel.run, [np.zeros((4, 8), np.uint8)])


# ---- binding constants -----------------------------------------------------------------


def _class_token_model():
    """A ViT's class token: a constant row expanded to the batch size, which
    the graph reads off the input (Shape -> Gather -> Unsqueeze -> Concat ->
    Expand), quantized and dequantized (kernels whose results come from the
    recording's buffer pool), concatenated before the input's rows, and the
    rows quantized and dequantized: the rows' codes have the size of the
    dequantized tokens, whose buffer, once its last reader is done, they
    would take if the pool could give it out again."""
    from onnx import TensorProto, helper, numpy_helper

    const = {
        "zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
        "rest": np.array([1, 4], np.int64), "cls": np.arange(4, dtype=np.float32).reshape(1, 1, 4),
        "scale": np.array(0.05, np.float32), "zp": np.array(128, np.uint8),
    }  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
        helper.make_node("Expand", ["cls", "target"], ["tokens"]),
        helper.make_node("QuantizeLinear", ["tokens", "scale", "zp"], ["tokens_q"]),
        helper.make_node("DequantizeLinear", ["tokens_q", "scale", "zp"], ["tokens_dq"]),
        helper.make_node("Concat", ["tokens_dq", "x"], ["rows"], axis=1),
        helper.make_node("QuantizeLinear", ["rows", "scale", "zp"], ["rows_q"]),
        helper.make_node("DequantizeLinear", ["rows_q", "scale", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "class_token",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in const.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_values_of_the_input_shapes_are_computed_once_per_binding():
    """The class token's shape steps run when a binding is recorded, not on
    its replays; each batch size gets its own (2 and 3 images: different
    tokens tensors), and every run matches the reference."""
    model = _class_token_model()
    cpu = qnnjit.compile(model, target="cpu", num_threads=1)
    ref = qnnjit.compile(model, target="reference")
    rng = np.random.default_rng(3)
    for batch in (2, 3, 2, 3, 2, 3):
        x = rng.standard_normal((batch, 3, 4)).astype(np.float32)
        np.testing.assert_array_equal(cpu(x), ref(x))
    for batch in (2, 3):
        binding = _binding(cpu, batch)
        constant = [step.nodes[-1].op for step in binding.constant_steps]
        assert {"shape", "gather", "expand"} <= set(constant), constant
        steps = len(cpu._executor.steps)
        assert binding.replayed_steps + len(binding.rerun_steps) + len(constant) == steps
        assert not {"shape", "expand"} & {s.nodes[-1].op for s in binding.rerun_steps}
    assert "computed once: values of the shapes alone" in cpu.report()


def test_a_rerun_step_whose_result_changes_shape_fails_clearly():
    """A rerun step's result goes into its recorded buffer: one of another
    shape (a shape that depends on values) is an error, not broadcast."""

    class Executor:
        def _call_step(self, step, args):
            return [np.zeros(1, np.float32)]  # the recording had 3 elements

    buffer = np.ones(3, np.float32)
    call = replay._rerun(Executor(), object(), [], [], [buffer])
    with pytest.raises(QnnjitError, match=r"shape \(1,\).*\(3,\)"):
        call()
    assert np.all(buffer == 1)


@numba.njit(nogil=True)
def _add_rows(t0, t1, a, b):
    for t in range(t0, t1):
        a[t] += b[t]


def test_a_serial_replayed_call_passes_its_arguments_packed():
    """A recorded call that runs on one thread passes its arguments packed
    once (`spinteam.bind_serial`) to the kernel's trampoline, reading the
    arrays' contents as they are at each call; arguments that cannot be
    packed (a tuple) go to the kernel's compiled overload, a Python function
    to itself."""
    from qnnjit.backends.cpu import spinteam

    a, b = np.zeros(4), np.arange(4.0)
    call = _threads.TaskCall(_add_rows, 4, 1, 1, (a, b)).bound()
    assert isinstance(call, spinteam.SerialCall)
    call()
    np.testing.assert_array_equal(a, b)
    b += 1
    call()
    np.testing.assert_array_equal(a, 2 * b - 1)
    _add_rows_by(0, 4, a, (1.0, 2.0))
    call = _threads.TaskCall(_add_rows_by, 4, 1, 1, (a, (1.0, 2.0))).bound()
    assert call.func is _add_rows_by.overloads[_add_rows_by.signatures[0]].entry_point
    python_kernel = _add_rows.py_func
    call = _threads.TaskCall(python_kernel, 4, 1, 1, (a, b)).bound()
    assert call.func is python_kernel
    before = a.copy()
    call()
    np.testing.assert_array_equal(a, before + b)


@numba.njit(nogil=True)
def _add_rows_by(t0, t1, a, pair):
    for t in range(t0, t1):
        a[t] += pair[0] * pair[1]


@numba.njit(nogil=True)
def _fail_rows(t0, t1, a):
    for t in range(t0, t1):
        a[t] += 1
    if a[0] > 1:
        raise ValueError("rows failed")


def test_consecutive_serial_calls_run_as_one_sequence():
    """A recorded run's consecutive serial packed calls become one call
    (`CallSequence`); a kernel that raises in the middle raises its own
    step's error: the calls before it ran, those after it did not."""
    from qnnjit.backends.cpu import spinteam

    a = np.zeros(3)
    steps = [_FakeStep(f"s{i}") for i in range(4)]
    bound = [
        _threads.TaskCall(_add_one, 3, 1, 1, (a, limit)).bound()
        for limit in (100.0, 100.0, 5.0, 100.0)
    ]
    assert all(isinstance(call, spinteam.SerialCall) for call in bound)
    calls = replay._sequenced([(lambda: None, "python"), *zip(bound, steps)])
    assert len(calls) == 2 and calls[1][1] is steps[0]
    calls[1][0]()  # a = 1, 2, 3, 4
    np.testing.assert_array_equal(a, 4.0)
    with pytest.raises(QnnjitError, match="s2") as raised:
        calls[1][0]()  # 5, 6, then 7 > 5 and the re-run's 8 raise; the last call never runs
    assert "past the limit" in str(raised.value)
    np.testing.assert_array_equal(a, 8.0)


@numba.njit(nogil=True)
def _add_one(t0, t1, a, limit):
    for t in range(t0, t1):
        a[t] += 1
    if a[0] > limit:
        raise ValueError("past the limit")


class _FakeStep:
    """A step as `replay.step_error` names it."""

    def __init__(self, name):
        self.name, self.nodes = name, [_FakeNode(name)]


class _FakeNode:
    def __init__(self, name):
        self.name, self.op = name, "test"


def test_a_serial_packed_call_raises_its_kernels_error():
    """The packed call reports the kernel's error status; the call then runs
    the kernel through its dispatcher, which raises the error itself."""
    a = np.zeros(3)
    call = _threads.TaskCall(_fail_rows, 3, 1, 1, (a,)).bound()
    call()
    with pytest.raises(ValueError, match="rows failed"):
        call()


def test_a_replayed_run_names_the_failing_step_and_clears_its_inputs():
    """`Binding.run`: a call that raises becomes its own step's error (the
    calls after it do not run), and the input slots are cleared however the
    run ends; a graph output that is an input comes back as a copy."""
    ran = []

    def fail():
        raise ValueError("broken kernel")

    steps = [_FakeStep(f"s{i}") for i in range(3)]
    x = np.arange(4.0)
    env = [None]
    calls = [(lambda: ran.append(0), steps[0]), (fail, steps[1]), (lambda: ran.append(2), steps[2])]
    failing = replay.Binding([0], env, calls, [(0, None)], 3, [], [], [])
    with pytest.raises(QnnjitError, match="s1.*broken kernel"):
        failing.run([x])
    assert ran == [0] and env == [None]
    echo = replay.Binding([0], env, [(lambda: ran.append(1), steps[0])], [(0, None)], 1, [], [], [])
    (out,) = echo.run([x])
    assert out is not x and np.array_equal(out, x) and env == [None] and ran == [0, 1]
