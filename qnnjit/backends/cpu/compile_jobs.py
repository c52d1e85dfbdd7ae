"""Cold compiles on two cores: a helper process compiles kernels into the
shared on-disk cache while this process compiles the others.

Numba compiles one function at a time per process (its global compiler
lock), and a cold ResNet-18 is ~8 s of it. So on the first cache miss of a
warm-up run (`CpuExecutor._warmup`) the executor starts a helper process
(`python -m qnnjit.backends.cpu.compile_jobs DIR`): it unpickles the graph,
lowers it the same way and runs the steps on zero inputs, those of the
plan's most common kinds first (`_longest_first`), while this process runs
them first to last. Every compiled function lands in the cache directory
both share (`kernels/_numba.py`), so each process loads what the other
compiled instead of compiling it again.

Claims keep the two from compiling the same function: on a cache miss a
process creates `claims/<function and signature>` (O_EXCL: one of the two
wins) and compiles; the other loads it once `<claim>.done` (written after
the save) exists. Until then, met in the middle of a compile of its own, a
process waits. Met between compiles (`_Busy`), the helper leaves that step
to this process and goes on to its next one; this process, the first time,
stops its warm-up run, runs the plan's steps on zeros, compiling what
nobody has claimed, and starts the run again, waiting from then on
(`_record_running_ahead`). So neither sits idle while there is work left.
(Before, the helper went last to first and both waited. Cold MobileNetV2
u8 at one thread, this alone, alternated with that: 7.8-8.9 -> 6.5-6.8 s;
ResNet-18 within noise. With the session's other cold-compile changes, at
two threads: MobileNetV2 u8 8.8-10.2 -> 7.2-7.7 s, s8 10.1-10.6 -> 9.0-9.4,
ResNet-18 u8 7.3-9.4 -> 6.8-8.0; benchmarks/RESULTS.md.)
A process whose compile raised marks its claims done (the other then
compiles for itself). Waits end early when the other process is gone, or
after `WAIT_LIMIT_S`. When this process's warm-up run ends it stops the
helper; what the helper had not reached is not needed.

The shared cache needs one fix to Numba: its `IndexDataCacheFile.save`
reads the index, picks the first free data-file name, and writes the index
then the data, unlocked, so two processes saving two signatures of one
function at once can both pick `f.1.nbc`, leaving one signature's index
entry naming the other's machine code. `_LockedIndexFile.save` does the
same under an exclusive `flock` and writes the data before the index.
`share_caches()` gives every cached Numba function of the CPU backend both
classes (the instance's class is swapped: no state is added). The shared
cache also loads without Numba's refresh of its target context, which a
warm compile in a fresh process would otherwise spend most of its time on
(`_SharedCache._load_without_refresh`).

`QNNJIT_COMPILE_JOBS=1` turns the helper off (the default, 2, is used when
the machine has two or more cores); so does an unset cache (`QNNJIT_CACHE_DIR=""`).
A plan of fewer than `MIN_STEPS` steps compiles alone: the helper's start-up
(~1 s: Python, the imports, lowering) is longer than such a compile.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.dispatcher import Dispatcher
from numba.core.runtime import rtsys

try:
    import fcntl
except ImportError:  # not POSIX: saves stay unlocked, and no helper is started
    fcntl = None

from ...errors import QnnjitError
from .kernels._numba import CACHE_DIR
from .kernels.layout import nchw_view

MIN_STEPS = 8
WAIT_LIMIT_S = 120.0
_POLL_S = 0.002

# The session of this process's running warm-up (or of the helper), if any.
_SESSION: _Session | None = None


# ---- the shared cache ------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: str):
    if fcntl is None:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _LockedIndexFile(IndexDataCacheFile):
    """Numba's index + data files, saved atomically with respect to other
    processes saving into the same index."""

    def save(self, key, data):
        with _flock(self._index_path + ".lock"):
            overloads = self._load_index()
            name = overloads.get(key)
            if name is None:
                taken = set(overloads.values())
                name = next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            # Data first: an index entry never names a file not yet written.
            self._save_data(name, data)
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)


class _SharedCache(FunctionCache):
    """A function's cache that loads machine code without refreshing Numba's
    target context, and that, during a two-process warm-up, claims what it
    compiles and waits for what the other process claimed."""

    def load_overload(self, sig, target_context):
        cres = self._load_without_refresh(sig, target_context)
        if cres is None and _SESSION is not None:
            load = functools.partial(self._load_without_refresh, sig, target_context)
            cres = _SESSION.claim_or_wait(self._claim_name(sig), load)
        return cres

    def _load_without_refresh(self, sig, target_context):
        """`FunctionCache.load_overload` less its first step, the refresh of
        the whole target context. That refresh imports every lowering
        registry Numba has, SciPy's BLAS wrappers among them (for np.dot):
        0.15-0.3 s of a fresh process's first load, half or more of a warm
        compile's own work. Linking cached machine code needs none of it,
        only Numba's runtime (NRT), which compiled code calls. A cache miss
        compiles, and Numba's compiler refreshes the context before it
        compiles anything (`CompilerBase.__init__`)."""
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
        return None  # the guard swallowed an I/O error

    def save_overload(self, sig, data):
        super().save_overload(sig, data)
        if _SESSION is not None:
            _SESSION.done(self._claim_name(sig))

    def _claim_name(self, sig) -> str:
        """The function (its index file names it) and the signature."""
        what = f"{self._cache_file._index_path}|{sig}"
        return hashlib.sha1(what.encode()).hexdigest()


def share_caches() -> int:
    """Give every cached Numba function of the CPU backend the shared cache
    (idempotent); returns how many functions have it."""
    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(__package__ + ".") or module is None:
            continue
        for value in list(vars(module).values()):
            if not isinstance(value, Dispatcher):
                continue
            cache = value._cache
            if type(cache) is FunctionCache:
                cache.__class__ = _SharedCache
            if isinstance(cache, _SharedCache):
                if type(cache._cache_file) is IndexDataCacheFile:
                    cache._cache_file.__class__ = _LockedIndexFile
                count += 1
    return count


# ---- claims ----------------------------------------------------------------------


class _Busy(QnnjitError):
    """A function the other process is compiling, met between compiles of
    this process's own while it has other work to do first: the helper
    skips the step, the parent's warm-up run stops to run ahead
    (`_record_running_ahead`). A QnnjitError, so that the executor's step
    wrappers pass it on as it is."""


class _Session:
    """The claims of one two-process warm-up, as seen by one of the two."""

    def __init__(self, root: Path, role: str, peer_alive):
        self.root = root
        self.claims = root / "claims"
        self.role = role
        self.peer_alive = peer_alive
        self.held: set[str] = set()
        self.compiled = 0  # functions this process claimed and compiled
        self.received = 0  # functions it waited for and then loaded
        self.on_first_miss = None  # called once, at the first claim (starts the helper)
        self.skip_busy = True  # raise `_Busy` rather than wait, between compiles
        # ... in the thread that runs the steps only: a spin team's threads
        # compile their loop (`spinteam._serve`) as they start, and wait
        self.stepping_thread = threading.get_ident()

    def claim_or_wait(self, name: str, load):
        """After a cache miss of claim `name`: None when this process is to
        compile it (claimed, or the other process gave up on it), else the
        other process's result, `load()` once it is done."""
        if self.on_first_miss is not None:
            start, self.on_first_miss = self.on_first_miss, None
            start()
        try:
            fd = os.open(self.claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, self.role.encode())
            os.close(fd)
            self.held.add(name)
            return None
        done = self.claims / (name + ".done")
        if (
            self.skip_busy and not self.held and not done.exists()
            and threading.get_ident() == self.stepping_thread
        ):  # fmt: skip
            raise _Busy(name)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not done.exists():
            if not self.peer_alive() or time.monotonic() > deadline:
                return None
            time.sleep(_POLL_S)
        result = load()
        if result is not None:
            self.received += 1
        return result

    def done(self, name: str) -> None:
        """Claim `name` was compiled and saved (by whichever process)."""
        if name in self.held:
            self.held.discard(name)
            self.compiled += 1
            self._mark_done(name)

    def release(self) -> None:
        """Mark every claim still held done (its compile raised)."""
        for name in self.held:
            self._mark_done(name)
        self.held.clear()

    def _mark_done(self, name: str) -> None:
        (self.claims / (name + ".done")).touch()

    def helper_compiled(self) -> int:
        """Functions the helper claimed (and compiled, or gave up on)."""
        return sum(
            1
            for path in self.claims.iterdir()
            if not path.name.endswith(".done") and path.read_bytes() == b"helper"
        )


# ---- this process's side ---------------------------------------------------------


def jobs() -> int:
    """Processes a cold warm-up may use (this one and at most one helper):
    $QNNJIT_COMPILE_JOBS, else 2 on a machine with two or more cores; 1
    when there is no shared cache."""
    env = os.environ.get("QNNJIT_COMPILE_JOBS", "").strip()
    if env and (not env.isdigit() or int(env) < 1):
        raise QnnjitError(f"QNNJIT_COMPILE_JOBS must be 1 or 2, got {env!r}")
    if CACHE_DIR is None or fcntl is None:
        return 1
    if env:
        return min(int(env), 2)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@contextlib.contextmanager
def helped_warmup(executor, stats: dict):
    """`with helped_warmup(executor, stats) as record: record(arrays)`: the
    executor's recorded warm-up run (`CpuExecutor._record`), at whose first
    cache miss a helper process starts compiling the plan beside it.
    `stats` gets `compiled` (functions compiled here), `received`
    (compiled by the helper while this process waited) and
    `helper_compiled` (claimed by the helper, all told); all 0 with no
    helper."""
    global _SESSION
    stats.update(compiled=0, received=0, helper_compiled=0)
    if _SESSION is not None or jobs() < 2 or len(executor.steps) < MIN_STEPS:
        yield executor._record
        return
    root = Path(tempfile.mkdtemp(prefix="qnnjit-compile-"))
    (root / "claims").mkdir()
    helper: list[subprocess.Popen] = []

    def start():
        try:
            helper.append(_start_helper(root, executor))
        except Exception:  # noqa: BLE001 - no helper: this process compiles everything
            pass

    session = _Session(root, "main", lambda: bool(helper) and helper[0].poll() is None)
    session.on_first_miss = start
    _SESSION = session
    try:
        yield functools.partial(_record_running_ahead, executor, session)
    finally:
        _SESSION = None
        session.release()
        (root / "stop").touch()
        if helper:
            _stop(helper[0])
            stats["helper_compiled"] = session.helper_compiled()
        stats.update(compiled=session.compiled, received=session.received)
        shutil.rmtree(root, ignore_errors=True)


def _record_running_ahead(executor, session: _Session, arrays):
    """The warm-up run, which stops at the first function the helper is
    compiling (`_Busy`): then the plan's steps run on zeros, each compiling
    what nobody has claimed and skipping what is claimed, and the run
    starts again, this time waiting for the helper's functions. (Cold
    MobileNetV2: while the helper compiles its depthwise+pointwise kernel,
    this process compiles the global pool's and the classifier's, instead
    of waiting and then compiling them.)"""
    try:
        return executor._record(arrays)
    except _Busy:
        pass
    _run_on_zeros(executor.steps, session)
    session.skip_busy = False
    return executor._record(arrays)


def _start_helper(root: Path, executor) -> subprocess.Popen:
    with open(root / "graph.pkl", "wb") as f:
        pickle.dump(executor.graph, f, protocol=pickle.HIGHEST_PROTOCOL)
    job = {"num_threads": executor.num_threads, "parent": os.getpid()}
    (root / "job.json").write_text(json.dumps(job))
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen) -> None:
    """The helper exits at its next step or claim once `stop` exists; one
    in the middle of a compile is not waited for."""
    try:
        proc.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the helper process -----------------------------------------------------------


def _helper(root: Path) -> None:
    global _SESSION
    os.environ["QNNJIT_COMPILE_JOBS"] = "1"  # no helper of its own (fused bodies' warm-ups)
    job = json.loads((root / "job.json").read_text())
    stop = root / "stop"

    def parent_running() -> bool:
        if stop.exists() or os.getppid() != job["parent"]:
            os._exit(0)  # nothing to clean up: saves are atomic
        return True

    with open(root / "graph.pkl", "rb") as f:
        graph = pickle.load(f)
    from . import spinteam
    from .executor import CpuExecutor

    executor = CpuExecutor(graph, num_threads=job["num_threads"], warmup=False)  # shares caches
    _SESSION = _Session(root, "helper", parent_running)
    try:  # needed by the parent only once its warm-up run ends: first here
        spinteam.compile_sequence_loop(job["num_threads"])
    except _Busy:
        pass
    finally:
        _SESSION.release()
    _run_on_zeros(_longest_first(executor.steps), _SESSION, parent_running)


def _longest_first(steps: list) -> list:
    """The helper's order: the steps of the plan's most common kinds (the ops
    they run) first, each kind from the plan's end. Why: a model's common
    steps are its convolutions or matmuls, whose kernels are its longest
    compiles (MobileNetV2's pointwise and depthwise+pointwise: 2.3-2.5 s
    each), while one-off steps are mostly short ones; started first, the
    long compiles leave the short ones to even out the two processes' ends
    (longest-first scheduling), and the parent, which goes first to last,
    meets the helper's claims early, where it runs ahead instead of
    waiting. Ties (one-off steps) from the end, as the parent meets them
    last."""
    kinds = Counter(_kind(step) for step in steps)
    order = sorted(range(len(steps)), key=lambda i: (-kinds[_kind(steps[i])], -i))
    return [steps[i] for i in order]


def _kind(step) -> tuple[str, ...]:
    return tuple(node.op for node in step.nodes)


def _run_on_zeros(steps, session: _Session, before_each=None) -> None:
    """Run each of `steps` on zero inputs, so that its kernels are compiled
    (or loaded). A step that raises is skipped: zero inputs it rejects, or a
    function the other process is compiling (`_Busy`); the parent's warm-up
    run meets it again."""
    for step in steps:
        if before_each is not None:
            before_each()
        args = [_zeros_like(v, step.strided_inputs) for v in step.inputs]
        if any(a is None for a in args):
            continue
        try:
            step.run(*args)
        except Exception:  # noqa: BLE001 - see above
            pass
        finally:
            session.release()


def _zeros_like(value, strided: bool):
    """A value's constant, else zeros of its type (symbolic dims 1). For a
    kernel that takes strided inputs, a 4-d one is channels-last memory
    (`kernels/layout.py`), as the convolutions and pools before it return
    theirs: such a kernel picks its compiled function by the layout (a
    reduce over H and W sums NHWC columns, else contiguous rows), and the
    parent needs the channels-last one (MobileNetV2's global pool: 1.1 s of
    its cold compile)."""
    if value.is_constant:
        return value.const
    shape = value.type.shape
    if shape is None:
        return None
    dims = tuple(d if isinstance(d, int) else 1 for d in shape)
    dtype = value.type.dtype.numpy
    if strided and len(dims) == 4:
        n, c, h, w = dims
        return nchw_view(np.zeros((n, h, w, c), dtype))
    return np.zeros(dims, dtype)


if __name__ == "__main__":
    # Run as `python -m`, this file is `__main__`, a second copy of the module:
    # the helper's session must live in the copy the executor imports, whose
    # `_SharedCache` reads it.
    from qnnjit.backends.cpu import compile_jobs

    compile_jobs._helper(Path(sys.argv[1]))
