"""CpuExecutor: runs an optimized IR graph with Numba kernels prepared at
compile time, with the same `run(arrays)` interface as the reference
interpreter (and the same integers, bit for bit).

At construction every node is lowered once, in topological order, by its
op's `lowerings["cpu"]` (`kernels/`): the lowering prepares the node's
constants (packed weights, zero-point terms folded into per-channel
constants, requantization multipliers, tables) and returns a `Kernel`, which
may also absorb the node's epilogue chain (bias add -> requantize -> qadd /
qmul / lookup), so no int32 accumulator tensor is written. A node whose op
has no CPU lowering, or whose lowering declines it (a float op, an
unsupported dtype, a run-time scale...), runs its reference NumPy semantics;
`describe()` lists those with the reason.

A `fused` node (compiler/passes/fuse_epilogues.py) is not a black box: its
body is lowered in place, its values aliased to the fused node's operands
and results, so its chain becomes one kernel of this plan.

Then `kernels/step_fusion.py` merges consecutive kernels whose intermediate
tensor need not exist (a depthwise conv and the pointwise conv after it).

A kernel is scheduled at the position of the last node it covers: every
intermediate value of a chain has one reader inside the chain, so its only
outputs are those of its last node, and every operand it reads (the anchor's
inputs, a residual) is computed before that node.

The Numba functions are generic over shapes and layer parameters (run-time
arguments; the arrays they index are prepared here), so one compiled
function serves every layer of every model that uses it, compiled once per
process or loaded from the on-disk cache (`kernels/_numba.py`). A warm-up run
on zero inputs at construction compiles or loads all of them, so
`qnnjit.compile` returns a model whose first inference is not a compile.

Runs: the first run on some input shapes goes step by step, the second
is recorded, and later ones replay the recording (`replay.py`): the same
kernel calls on the same buffers, with no per-step Python and no
allocation. The warm-up run is recorded, so a static-shape model's first
real run is already a replay.

Layouts: values keep their logical shapes; kernels that compute
channels-last return transposed views of NHWC buffers (`kernels/layout.py`).
Kernels that do not declare `strided_inputs` get C-contiguous copies, and so
do the caller's outputs.

Threads: kernels split their tasks over a shared pool of `num_threads`
(`kernels/_threads.py`) when a call has enough work.

RUN_DOC. A replayed run's Python is written for the fewest operations,
because it runs cold: between two runs the model's weights push the
interpreter's code and data out of the caches, where each Python function
call and comprehension costs a microsecond or more. So `run` builds its key
with C-level `map` and `zip` (no Python frame), takes a binding inline, and
`Binding.run` wraps all its calls in one try and copies the outputs in a
plain loop. ResNet-18 with its kernels stubbed out and 24 MB written
before each run (400 runs, two processes each): `model(x)` took 14-15 us
at least and 20-26 at the median, now 10-12 and 13-16.
"""

from __future__ import annotations

import operator
import os
import time
from dataclasses import replace

import numba
import numpy as np

from ...errors import QnnjitError
from ...ir import ops
from ...ir.graph import Graph, Node
from . import replay, weight_arena
from .compile_jobs import helped_warmup, share_caches
from .kernels import Decline, Kernel, LowerContext
from .kernels._lowering import numpy_kernel
from .kernels.step_fusion import fuse_steps

_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")

# Input shapes whose recorded runs an executor keeps (`_keep`).
_BOUND_SHAPES = 4
# Input shapes an executor remembers having run once (`run`); past this many it
# forgets them all, which only delays the next recordings by one run each.
_SEEN_SHAPES = 256


def resolve_num_threads(num_threads: int | None = None) -> int:
    """`num_threads`, else $QNNJIT_NUM_THREADS, else every core; at most
    Numba's thread pool size."""
    if num_threads is None:
        env = os.environ.get("QNNJIT_NUM_THREADS", "").strip()
        num_threads = int(env) if env else (os.cpu_count() or 1)
    if num_threads < 1:
        raise QnnjitError(f"num_threads must be >= 1, got {num_threads}")
    return min(num_threads, numba.config.NUMBA_NUM_THREADS)


class CpuExecutor:
    """Executes a graph with CPU kernels; `run` maps input arrays (graph input
    order) to output arrays (graph output order)."""

    def __init__(self, graph: Graph, num_threads: int | None = None, *, warmup: bool = True):
        self.graph = graph
        self.num_threads = resolve_num_threads(num_threads)
        # The kernels split work over their own thread pool (kernels/_threads.py);
        # Numba's pool, which only the GEMM engine's parallel driver uses, gets
        # the same size.
        numba.set_num_threads(self.num_threads)
        # Every cached kernel (the kernels package imports them all) saves
        # under the cache's lock and loads without Numba's context refresh,
        # whenever it is first called: in lowering, warm-up or a later run.
        share_caches()
        self.steps: list[Kernel] = []
        self.declined: list[tuple[Node, str]] = []
        self.warmup_seconds = 0.0
        self.compile_stats: dict[str, int] = {}
        self._bindings: dict[tuple, list[replay.Binding]] = {}  # input shapes -> free bindings
        self._seen: set[tuple] = set()  # input shapes run once
        start = time.perf_counter()
        self.weights = weight_arena.WeightArena()
        with weight_arena.filling(self.weights):  # packed in the order the steps run
            self._lower_all()
        self.lower_seconds = time.perf_counter() - start
        self._plan()
        if warmup:
            self._warmup()

    # ---- compile time ---------------------------------------------------------------

    def _lower_all(self):
        self._alias: dict[int, object] = {}
        steps = self._lower_graph(self.graph)
        outputs = [self._canonical(v) for v in self.graph.outputs]
        self.steps = fuse_steps(steps, self._canonical, outputs)

    def _canonical(self, value):
        """The plan's value for `value` (a fused body's values are aliases)."""
        while id(value) in self._alias:
            value = self._alias[id(value)]
        return value

    def _lower_graph(self, graph: Graph, prefix: str = "") -> list[Kernel]:
        """Kernels for `graph`'s nodes, in a valid execution order. A `fused`
        node's body is lowered in place (its values aliased to the fused
        node's operands and results), so its kernels join this plan."""
        nodes = graph.nodes
        order = {node: index for index, node in enumerate(nodes)}
        ctx = LowerContext(graph, self.num_threads)
        at_last: dict[Node, list[Kernel]] = {}
        for node in nodes:
            if node in ctx.taken:
                continue
            if node.op == "fused" and _flattenable(node):
                body = node.attrs["body"]
                kind = node.attrs.get("kind", "?")
                steps = self._lower_graph(body, f"{prefix}fused[{kind}]: ")
                for inner, outer in zip(body.inputs, node.inputs):
                    self._alias[id(inner)] = outer
                for inner, outer in zip(body.outputs, node.outputs):
                    self._alias[id(outer)] = inner
                ctx.taken.add(node)
                at_last[node] = steps
                continue
            kernel = self._lower(node, ctx)
            if prefix:
                kernel = replace(kernel, name=prefix + kernel.name)
            ctx.taken.update(kernel.nodes)
            at_last[max(kernel.nodes, key=order.__getitem__)] = [kernel]
        return [step for node in nodes for step in at_last.get(node, ())]

    def _lower(self, node: Node, ctx: LowerContext) -> Kernel:
        opdef = ops.get(node.op)
        try:
            lower = opdef.lowering("cpu")
        except NotImplementedError as why:
            self.declined.append((node, str(why)))
            return _reference_kernel(node)
        try:
            return lower(node, ctx)
        except Decline as why:
            self.declined.append((node, str(why)))
        except Exception as exc:  # a lowering bug: loud in tests, a fallback for users
            if os.environ.get("QNNJIT_VERIFY", "") not in ("", "0"):
                raise QnnjitError(
                    f"cpu lowering of {node.name!r} ({node.op}) failed: {exc}"
                ) from exc
            self.declined.append((node, f"cpu lowering failed: {type(exc).__name__}: {exc}"))
        return _reference_kernel(node)

    def _plan(self):
        """Number the run-time values; each step reads and writes slots, and a
        slot is released after its last reader (outputs excepted)."""
        slots: dict[int, int] = {}

        def slot(value) -> int:
            return slots.setdefault(id(self._canonical(value)), len(slots))

        self._input_slots = [slot(v) for v in self.graph.inputs]
        plan = []
        for step in self.steps:
            reads = [slot(v) for v in step.inputs]
            writes = [slot(v) for v in step.outputs]
            plan.append([step, reads, writes, []])
        self._outputs = []
        keep = set(self._input_slots)
        for value in self.graph.outputs:
            if value.is_constant:
                self._outputs.append((None, value.const))
            else:
                self._outputs.append((slot(value), None))
                keep.add(slot(value))
        # Constants a kernel takes as run-time operands sit in their slots from the start.
        self._env = [None] * len(slots)
        for step in self.steps:
            for value in step.inputs:
                if value.is_constant:
                    self._env[slot(value)] = value.const
                    keep.add(slot(value))
        last_read: dict[int, int] = {}
        for index, (_, reads, _, _) in enumerate(plan):
            for s in reads:
                last_read[s] = index
        for s, index in last_read.items():
            if s not in keep:
                plan[index][3].append(s)
        self._plan_steps = [tuple(p) for p in plan]
        self._num_slots = len(slots)

    def _warmup(self):
        """Run on zero inputs (symbolic dims = 1) so every kernel is compiled,
        or loaded from the disk cache, now rather than on the first real
        inference, with a helper process compiling beside this one when the
        cache is cold (`compile_jobs`). The run is recorded
        (`replay`). Inputs the graph cannot take this way are skipped."""
        arrays = []
        for value in self.graph.inputs:
            shape = value.type.shape
            if shape is None:
                return
            dims = tuple(1 if isinstance(d, str) else d for d in shape)
            arrays.append(np.zeros(dims, value.type.dtype.numpy))
        start = time.perf_counter()
        with helped_warmup(self, self.compile_stats) as record:
            try:
                record(arrays)  # so the first real run on these shapes replays
            except Exception:  # noqa: BLE001 - the real inputs may still run; compile lazily
                pass
        self.warmup_seconds = time.perf_counter() - start

    # ---- run time -------------------------------------------------------------------

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The graph outputs for `arrays`. The first run on some input shapes
        runs the plan step by step; the second records it (`replay`); later
        ones replay the recording."""
        key = tuple(zip(map(_SHAPE, arrays), map(_DTYPE, arrays)))  # (no Python frame)
        free = self._bindings.get(key)
        if free:
            try:
                binding = free.pop()  # atomic: two threads never take the same one
            except IndexError:  # another thread took the last one
                binding = None
            if binding is not None:
                try:
                    return binding.run(arrays)
                finally:
                    free.append(binding)
        if key not in self._seen:
            if len(self._seen) >= _SEEN_SHAPES:
                self._seen.clear()
            self._seen.add(key)
            return self._run_steps(arrays)
        return self._record(arrays)

    def _record(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """A run that is recorded (`replay.record`) for later runs on its shapes."""
        key = tuple((a.shape, a.dtype) for a in arrays)
        self._seen.add(key)
        outputs, binding = replay.record(self, arrays)
        self._keep(key, binding)
        return outputs

    def _run_steps(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        env = list(self._env)
        for s, array in zip(self._input_slots, arrays):
            env[s] = array
        for step, reads, writes, frees in self._plan_steps:
            results = self._call_step(step, [env[s] for s in reads])
            for s, result in zip(writes, results):
                env[s] = result
            for s in frees:
                env[s] = None
        return [_contiguous(env[s]) if s is not None else const for s, const in self._outputs]

    def _call_step(self, step: Kernel, args: list) -> list[np.ndarray]:
        """`step.run` on `args` (C-contiguous copies unless it takes strided
        operands), its results checked against the declared dtypes."""
        if not step.strided_inputs:
            args = [_contiguous(a) for a in args]
        try:
            results = step.run(*args)
        except QnnjitError:
            raise
        except Exception as exc:
            raise replay.step_error(step, exc) from exc
        checked = []
        for value, result in zip(step.outputs, results):
            if not isinstance(result, np.ndarray):
                result = np.asarray(result)
            dtype = value.type.dtype.numpy
            if result.dtype != dtype:
                node = step.nodes[-1]
                raise QnnjitError(
                    f"node {node.name!r} ({node.op}) produced {result.dtype}, declared {dtype}"
                )
            checked.append(result)
        return checked

    def _keep(self, key, binding: replay.Binding) -> None:
        """Pool `binding` for runs on `key`'s shapes; the bindings of at most
        `_BOUND_SHAPES` shapes stay (each holds every intermediate tensor)."""
        free = self._bindings.setdefault(key, [])
        free.append(binding)
        while len(self._bindings) > _BOUND_SHAPES:
            del self._bindings[next(iter(self._bindings))]

    # ---- reporting ------------------------------------------------------------------

    def fallbacks(self) -> list[str]:
        return [f"{node.op} {node.name}" for node, _ in self.declined]

    def describe(self) -> str:
        """The execution plan: one line per kernel with the nodes it covers,
        then the nodes that run in NumPy and why."""
        lines = [
            f"cpu kernels ({len(self.steps)} steps for {len(self.graph)} nodes, "
            f"{self.num_threads} thread(s); lowering {self.lower_seconds:.2f} s, "
            f"kernel compile/load + warm-up run {self.warmup_seconds:.2f} s{self._helped()}; "
            f"{self.weights.describe()}):"
        ]
        for step in self.steps:
            covered = ", ".join(n.name for n in step.nodes)
            lines.append(f"  {step.name}  <- {covered}")
        lines.append("")
        lines.extend(self._replays())
        lines.append(f"reference (NumPy) fallbacks ({len(self.declined)}):")
        for node, reason in self.declined:
            lines.append(f"  {node.op} {node.name}: {reason}")
        return "\n".join(lines)

    def _replays(self) -> list[str]:
        """What runs on the recorded shapes replay (`replay.py`) and what they re-run."""
        lines = []
        for key, free in list(self._bindings.items()):
            if not free:
                continue
            binding = free[0]
            shapes = ", ".join("x".join(map(str, shape)) for shape, _ in key)
            lines.append(
                f"runs on {shapes} replayed: {binding.replayed_steps} of {len(self.steps)} steps"
                f" ({len(binding.input_steps)} of them on views of each run's inputs; "
                f"{len(binding.rerun_steps)} re-run each time, "
                f"{len(binding.constant_steps)} computed once: values of the shapes alone)"
            )
            lines.extend(f"  re-run: {step.name}" for step in binding.rerun_steps)
        return lines + [""] if lines else []

    def _helped(self) -> str:
        helper = self.compile_stats.get("helper_compiled", 0)
        if not helper:
            return ""
        return f", {self.compile_stats['compiled']} functions compiled here, {helper} by a helper"


def _flattenable(node: Node) -> bool:
    """A fused body can join the plan when each of its results is computed by
    one of its nodes (not an operand or a constant passed through)."""
    body = node.attrs.get("body")
    return isinstance(body, Graph) and all(
        v.producer is not None and not v.is_constant for v in body.outputs
    )


def _contiguous(array):
    """A channels-last result (a transposed view, `kernels/layout.py`) as the
    C-contiguous array a kernel without `strided_inputs`, or the user, gets."""
    if isinstance(array, np.ndarray) and not array.flags.c_contiguous:
        return np.ascontiguousarray(array)
    return array


def _reference_kernel(node: Node) -> Kernel:
    """A step that runs the node's reference semantics (NumPy)."""
    return numpy_kernel(node, "reference")
