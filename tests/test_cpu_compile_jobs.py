"""Two-process cold compiles (`qnnjit/backends/cpu/compile_jobs.py`): the
locked cache saves, the claim protocol, and whole compiles with a helper
process (bit for bit against the reference, in fresh cache directories).

The rest of the suite runs with QNNJIT_COMPILE_JOBS=1 (conftest.py), so the
compiles here are the ones that start helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numba
import numpy as np
import pytest

from qnnjit.backends.cpu import compile_jobs
from qnnjit.backends.cpu.compile_jobs import _LockedIndexFile, _Session

pytestmark = pytest.mark.skipif(compile_jobs.fcntl is None, reason="needs POSIX flock")

_SAVER = textwrap.dedent(
    """
    import pathlib, sys, time
    from qnnjit.backends.cpu.compile_jobs import _LockedIndexFile
    where, who = sys.argv[1], sys.argv[2]
    index = _LockedIndexFile(where, "f", "stamp")
    (pathlib.Path(where) / f"ready-{who}").touch()
    go = pathlib.Path(where) / "go"
    while not go.exists():
        time.sleep(0.001)
    for k in range(40):
        index.save((who, k), f"{who}-{k}")
    """
)


def test_locked_saves_from_two_processes_keep_each_signature_its_own_data(tmp_path):
    """Numba's unlocked save lets two processes saving different keys of one
    function pick the same data file; under the lock each key keeps its own."""
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), who]) for who in "ab"]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{who}").exists() for who in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    index = _LockedIndexFile(str(tmp_path), "f", "stamp")
    loaded = {(who, k): index.load((who, k)) for who in "ab" for k in range(40)}
    assert loaded == {(who, k): f"{who}-{k}" for who in "ab" for k in range(40)}


def _sessions(tmp_path, helper_alive):
    """The two sides of one session; each one's `peer_alive` is the other's."""
    (tmp_path / "claims").mkdir()
    main = _Session(tmp_path, "main", helper_alive)
    helper = _Session(tmp_path, "helper", lambda: True)
    return main, helper


def test_one_process_compiles_a_claim_the_other_waits_then_loads(tmp_path):
    """Met in the middle of a compile of its own (a callee), a claimed
    function is waited for."""
    main, helper = _sessions(tmp_path, lambda: True)
    starts = []
    main.on_first_miss = lambda: starts.append(1)
    assert main.claim_or_wait("k", load=lambda: pytest.fail("the claimer loads nothing")) is None
    assert helper.claim_or_wait("caller", load=lambda: None) is None  # compiling "caller"
    assert _waited_for(helper, "k", then=lambda: main.done("k"), stepping=True) == "k loaded"
    helper.done("caller")
    assert (main.compiled, helper.received, helper.compiled) == (1, 1, 1)
    assert main.claim_or_wait("k2", load=lambda: None) is None
    assert starts == [1], "the helper is started once, at the first miss"
    assert helper.helper_compiled() == 1


def test_between_compiles_a_claimed_function_is_skipped_until_nothing_else_is_left(tmp_path):
    """Between compiles of its own, a process meeting the other's claim
    raises `_Busy` at once (the helper goes on to its next step, the
    parent runs ahead); the parent, once it stops skipping, waits; a claim
    already done is loaded either way."""
    main, helper = _sessions(tmp_path, lambda: True)
    assert main.claim_or_wait("m", load=lambda: None) is None
    main.done("m")
    assert helper.claim_or_wait("h", load=lambda: None) is None
    helper.done("h")
    assert main.claim_or_wait("m2", load=lambda: None) is None
    start = time.monotonic()
    with pytest.raises(compile_jobs._Busy):
        helper.claim_or_wait("m2", load=lambda: pytest.fail("not done"))
    assert helper.claim_or_wait("m", load=lambda: "M") == "M"
    assert main.claim_or_wait("h", load=lambda: "H") == "H"
    assert helper.claim_or_wait("h2", load=lambda: None) is None
    main.done("m2")
    with pytest.raises(compile_jobs._Busy):
        main.claim_or_wait("h2", load=lambda: pytest.fail("not done"))
    assert time.monotonic() - start < 1, "no waiting"
    main.skip_busy = False
    threading.Timer(0.2, helper.done, ["h2"]).start()
    assert main.claim_or_wait("h2", load=lambda: "H2") == "H2"
    assert time.monotonic() - start >= 0.2


def test_other_threads_wait_for_a_claimed_function(tmp_path):
    """A spin team's thread compiles its loop as it starts: met there, a
    claimed function is waited for, never raised (it would end the thread)."""
    main, helper = _sessions(tmp_path, lambda: True)
    assert helper.claim_or_wait("serve", load=lambda: None) is None
    assert _waited_for(main, "serve", then=lambda: helper.done("serve")) == "serve loaded"


def _waited_for(session, name, then, stepping=False):
    """`session.claim_or_wait(name)` in a thread of its own (made the
    session's stepping thread if `stepping`): it must still wait 0.1 s
    later; `then()` (the other side's `done`) ends the wait. Returns what
    the wait returned."""
    got = {}

    def wait():
        if stepping:
            session.stepping_thread = threading.get_ident()
        got["r"] = session.claim_or_wait(name, lambda: f"{name} loaded")

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive(), "the claim is not done: it must wait"
    then()
    thread.join(10)
    return got["r"]


def test_the_parents_warmup_runs_ahead_of_a_function_the_helper_is_compiling(tmp_path):
    """At the helper's claim, the parent's recorded run stops, the steps run
    on zeros (compiling the unclaimed third step's function before the
    helper's is done) and the run starts again, waiting for the helper."""
    main, helper = _sessions(tmp_path, lambda: True)
    cache, events = set(), []

    class Step:
        inputs, strided_inputs = [], False

        def __init__(self, function):
            self.function = function

        def run(self):
            if self.function in cache:
                return
            loaded = main.claim_or_wait(self.function, load=lambda: self.function)
            if loaded is None:
                events.append(f"compiled {self.function}")
                cache.add(self.function)
                main.done(self.function)

    class Executor:
        steps = [Step("a"), Step("b"), Step("c")]

        def _record(self, arrays):
            events.append("record")
            for step in self.steps:
                step.run()
            return "outputs"

    assert helper.claim_or_wait("b", load=lambda: None) is None

    def helper_done():
        events.append("helper compiled b")
        cache.add("b")
        helper.done("b")

    threading.Timer(0.3, helper_done).start()
    assert compile_jobs._record_running_ahead(Executor(), main, [np.zeros(1)]) == "outputs"
    assert events == [
        "record", "compiled a", "compiled c", "record", "helper compiled b",
    ]  # fmt: skip


def test_the_helper_takes_the_most_common_kinds_of_steps_first():
    from types import SimpleNamespace

    def step(name, *ops):
        return SimpleNamespace(name=name, nodes=[SimpleNamespace(op=op) for op in ops])

    steps = [
        step("quantize", "quantize"), step("stem", "qconv", "requantize"),
        step("dw+pw", "qconv", "requantize", "qconv", "requantize"),
        step("pw", "qconv", "requantize"),
        step("dw+pw 2", "qconv", "requantize", "qconv", "requantize"),
        step("pw 2", "qconv", "requantize"), step("pool", "qreduce_sum"), step("fc", "qmatmul"),
    ]  # fmt: skip
    order = [s.name for s in compile_jobs._longest_first(steps)]
    assert order == ["pw 2", "pw", "stem", "dw+pw 2", "dw+pw", "fc", "pool", "quantize"]


def test_a_claim_whose_compile_raised_or_whose_process_died_is_not_waited_for(tmp_path):
    alive = [True]
    main, helper = _sessions(tmp_path, lambda: alive[0])
    assert helper.claim_or_wait("raised", load=lambda: None) is None
    helper.release()  # its compile raised: marked done, not compiled
    assert main.claim_or_wait("raised", load=lambda: "cached?") == "cached?"
    assert helper.compiled == 0
    assert helper.claim_or_wait("dies", load=lambda: None) is None
    alive[0] = False
    main.skip_busy = False  # as once the parent has run ahead
    start = time.monotonic()
    assert main.claim_or_wait("dies", load=lambda: pytest.fail("nothing to load")) is None
    assert time.monotonic() - start < 5
    assert main.helper_compiled() == 2


_COMPILE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import qnnjit
    from qnnjit.backends.cpu import compile_jobs
    if sys.argv[3] == "dead-helper":
        import subprocess
        compile_jobs._start_helper = lambda root, ex: subprocess.Popen(
            [sys.executable, "-c", "pass"])
    x = np.load(sys.argv[2])
    cpu = qnnjit.compile(sys.argv[1], target="cpu", num_threads=int(sys.argv[4]))
    got = cpu(x)
    # Numba's lowering registries: imported by a compile, not by a cache load
    registries = "numba.np.arraymath" in sys.modules
    ref = qnnjit.compile(sys.argv[1], target="reference")
    print(json.dumps({**cpu._executor.compile_stats,
                      "steps": len(cpu._executor.steps),
                      "reported": "by a helper" in cpu.report(),
                      "registries": registries,
                      "equal": bool(np.array_equal(got, ref(x)))}))
    """
)


def _compile_in_new_process(tmp_path, model, x, cache, mode="normal", threads=1):
    np.save(tmp_path / "x.npy", x)
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        QNNJIT_CACHE_DIR=str(cache),
        QNNJIT_COMPILE_JOBS="2",
        TMPDIR=str(tmp),
    )
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(model), str(tmp_path / "x.npy"), mode, str(threads)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp.iterdir()) == [], "the session's directory is removed"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def resnet(model_zoo):
    from modelzoo import all_variants, example_input

    variant = next(v for v in all_variants() if v.name == "qdq_u8s8_pc")
    return model_zoo.build("resnet_style", variant), example_input("resnet_style", seed=3)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cold_compile_shares_the_kernels_with_a_helper(resnet, tmp_path, threads):
    """Cold: the helper compiles some functions, this process the others,
    and the model is bit-exact; warm (a new process): no helper, nothing
    compiled, Numba's lowering registries never imported, and the model
    loaded that way is bit-exact too. At two threads both processes' spin
    teams compile their loops in threads of their own as well."""
    if threads == 2 and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip(reason="one core")
    model, x = resnet
    cold = _compile_in_new_process(tmp_path, model, x, tmp_path / "cache", threads=threads)
    assert cold["equal"]
    assert cold["steps"] >= compile_jobs.MIN_STEPS
    assert cold["helper_compiled"] >= 1 and cold["compiled"] >= 1, cold
    assert cold["reported"]
    assert cold["registries"]
    warm = _compile_in_new_process(tmp_path, model, x, tmp_path / "cache", threads=threads)
    assert warm["equal"]
    assert (warm["compiled"], warm["received"], warm["helper_compiled"]) == (0, 0, 0), warm
    assert not warm["reported"]
    assert not warm["registries"], "a warm load refreshed Numba's whole target context"


def test_a_helper_that_dies_at_once_leaves_the_compile_to_this_process(resnet, tmp_path):
    model, x = resnet
    stats = _compile_in_new_process(tmp_path, model, x, tmp_path / "cache", "dead-helper")
    assert stats["equal"]
    assert (stats["received"], stats["helper_compiled"]) == (0, 0), stats
    assert stats["compiled"] >= 5, stats


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_compile_jobs_value_is_a_clear_error(value, monkeypatch):
    from pathlib import Path

    import qnnjit

    monkeypatch.setenv("QNNJIT_COMPILE_JOBS", value)
    model = Path(qnnjit.__file__).parent / "data" / "digits_int8.onnx"
    with pytest.raises(qnnjit.QnnjitError, match="QNNJIT_COMPILE_JOBS must be 1 or 2"):
        qnnjit.compile(str(model), target="cpu")


def test_the_helpers_inputs_are_laid_out_as_the_parents():
    """The helper runs each step on zeros; a kernel that takes strided
    inputs gets its 4-d ones channels-last, as the parent's convolutions
    and pools pass them (so both compile the same function), a kernel that
    does not gets C-contiguous ones, and a constant stays itself."""
    from qnnjit.backends.cpu.kernels.layout import is_channels_last
    from qnnjit.ir import Graph, TensorType, dtypes

    graph = Graph("layouts")
    image = graph.add_input("image", TensorType(dtypes.uint8, (1, 8, 5, 3)))
    rows = graph.add_input("rows", TensorType(dtypes.uint8, ("N", 7)))
    weights = graph.constant(np.ones((2, 3), np.int8), "weights")
    nhwc = compile_jobs._zeros_like(image, True)
    assert nhwc.shape == (1, 8, 5, 3) and is_channels_last(nhwc) and not nhwc.flags.c_contiguous
    assert not nhwc.any() and nhwc.dtype == np.uint8
    assert compile_jobs._zeros_like(image, False).flags.c_contiguous
    assert compile_jobs._zeros_like(rows, True).shape == (1, 7)
    assert compile_jobs._zeros_like(weights, True) is weights.const
