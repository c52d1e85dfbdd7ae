"""`qnnjit.compile`: model in, CompiledModel out."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import warnings

from .compiler import graph_cache, run_pipeline
from .errors import QnnjitError
from .runtime import CompiledModel

TARGETS = ("reference", "cpu", "cuda")
# Targets whose backend exists today, best first; `target=None` takes the first.
# "cpu" needs Numba (a dependency; checked without importing it).
AVAILABLE_TARGETS = (
    ("cpu", "reference") if importlib.util.find_spec("numba") is not None else ("reference",)
)


def load_graph(model, example_inputs=None):
    """Dispatch a model to its frontend and return the IR graph."""
    if _is_torch_model(model):
        raise QnnjitError(
            "the PyTorch frontend is not built yet: export the model to ONNX "
            "(torch.onnx.export) and compile the .onnx"
        )
    from .frontends.onnx import load_onnx

    return load_onnx(model)


def compile(
    model,
    target: str | None = None,
    *,
    example_inputs=None,
    num_threads=None,
    strict_ranges: bool | None = None,
):
    """Compile `model` (path to .onnx, onnx.ModelProto or bytes) for `target`.

    target: "reference" (the NumPy interpreter that defines the numerics),
    "cpu" or "cuda"; None picks the best target available in this build.
    num_threads: threads the compiled model runs on (cpu target); None reads
    QNNJIT_NUM_THREADS, else every core.
    strict_ranges: an accumulator that may overflow int32 is an error
    (`AccumulatorOverflowError`) instead of a warning; None reads
    QNNJIT_STRICT_RANGES (1 = strict).
    """
    if target is None:
        target = AVAILABLE_TARGETS[0]
    if target not in TARGETS:
        raise QnnjitError(f"unknown target {target!r}; choose one of {TARGETS}")
    if target not in AVAILABLE_TARGETS:
        raise QnnjitError(
            f"target {target!r} is not built yet; available: {AVAILABLE_TARGETS} "
            "(target=None picks the best one)"
        )
    with _collector_paused():
        return _compile(model, target, example_inputs, num_threads, strict_ranges)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the block. A compile in a
    fresh process imports Numba and ONNX and loads kernels, and the full
    collections that this many new objects set off were ~0.08 s of a ~0.6 s
    warm compile (MobileNetV2, ResNet-18). The cycles the compile leaves are
    collected once the collector is back on (a cold compile holds ~90 MB more
    meanwhile). Left off if the caller had turned it off."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile(model, target, example_inputs, num_threads, strict_ranges):
    if strict_ranges is None:
        strict_ranges = os.environ.get("QNNJIT_STRICT_RANGES", "") not in ("", "0")
    entry, cached = _optimized(model, example_inputs, bool(strict_ranges))
    graph = entry.graph
    if target == "cpu":
        from .backends.cpu.executor import CpuExecutor

        executor = CpuExecutor(graph, num_threads=num_threads)
    else:
        from .backends.reference import ReferenceExecutor

        executor = ReferenceExecutor(graph)

    def report() -> str:  # written when asked: the IR printed is ~5% of a warm compile
        text = _report(entry, cached)
        return text + "\n\n" + executor.describe() if target == "cpu" else text

    return CompiledModel(graph, executor, target=target, report=report)


_ABOUT_CODE = (DeprecationWarning, PendingDeprecationWarning, ImportWarning)


def _optimized(model, example_inputs, strict_ranges: bool) -> tuple[graph_cache.Entry, bool]:
    """The model's optimized graph (frontend, then passes), from the graph
    cache when this model was compiled before; and whether it came from there."""
    key = None
    if example_inputs is None:
        key = graph_cache.key_for(model, {"strict_ranges": strict_ranges})
    if key is None:
        return _optimize(model, example_inputs, strict_ranges), False
    entry = graph_cache.load(key)
    if entry is not None:
        return entry, True
    # Warnings are caught and given again after: a compile that warned about
    # the model is not stored, since a hit would not warn. Deprecation and
    # import warnings are about code, not the model (a library imported on
    # the way may give them), and do not stop the store.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry = _optimize(model, example_inputs, strict_ranges)
    for warning in caught:
        warnings.warn_explicit(
            warning.message,
            warning.category,
            warning.filename,
            warning.lineno,
            source=warning.source,
        )
    if all(issubclass(w.category, _ABOUT_CODE) for w in caught):
        graph_cache.store(key, entry, model)
    return entry, False


def _optimize(model, example_inputs, strict_ranges: bool) -> graph_cache.Entry:
    graph = load_graph(model, example_inputs)
    graph.metadata["strict_ranges"] = strict_ranges
    before = graph.op_counts()
    before_ir = str(graph)
    run_pipeline(graph)
    return graph_cache.Entry(graph, before, before_ir)


def _report(entry: graph_cache.Entry, cached: bool) -> str:
    """What the compiler did, section by section: node counts, fused groups,
    QDQ units rewritten or kept (with reasons), accumulator widths, the IR
    before and after."""
    graph, before, before_ir = entry.graph, entry.before_counts, entry.before_ir
    after = graph.op_counts()
    groups = [node for node in graph.nodes if node.op == "fused"]
    inner: dict[str, int] = {}
    for node in groups:
        for op, count in node.attrs["body"].op_counts().items():
            inner[op] = inner.get(op, 0) + count
    preset = graph.metadata.get("numerics_preset", "unspecified")
    lines = [
        "optimized graph: "
        + ("from the graph cache (this model was compiled before)" if cached else "compiled"),
        f"numerics preset: {preset} (rounding choices are attributes of the ops below)",
        "",
        f"node counts (frontend -> optimized), {sum(before.values())} -> {sum(after.values())}:",
    ]
    for op in sorted(set(before) | set(after)):
        lines.append(f"  {op:28s} {before.get(op, 0):5d} -> {after.get(op, 0):5d}")
    if inner:
        held = ", ".join(f"{op} {count}" for op, count in sorted(inner.items()))
        lines.append(f"  (inside the fused groups: {held})")

    lines += ["", f"fused groups ({len(groups)}):"]
    for node in groups:
        ops = " -> ".join(n.op for n in node.attrs["body"].nodes)
        lines.append(f"  {node.name}: {node.attrs['kind']} ({ops})")
    fusion = graph.metadata.get("fusion_log")
    if fusion is not None and fusion.kept:
        lines.append(f"  not fused ({len(fusion.kept)}):")
        lines += [f"    {anchor}: {why}" for anchor, why in sorted(fusion.kept.items())]

    log = graph.metadata.get("qdq_log")
    if log is not None:
        lines += ["", f"QDQ units rewritten to integer ops ({len(log.applied)}):"]
        lines += [f"  {entry}" for entry in log.applied]
        lines += ["", f"quantize nodes kept ({len(log.kept)}), with the reason no rule applied:"]
        lines += [f"  {anchor}: {why}" for anchor, why in sorted(log.kept.items())]

    accumulators = list(_accumulators(graph))
    narrow = sum(1 for _, _, acc, _ in accumulators if acc.bits == 16)
    lines += [
        "",
        f"accumulators ({len(accumulators)}, {narrow} provably 16-bit safe; "
        "pairs = u8*s8 vpmaddubsw pair sums, any two taps):",
    ]
    for name, op, acc, pairs in accumulators:
        bounds = "range unknown" if acc.lo is None else f"[{acc.lo}, {acc.hi}]"
        if acc.lo is not None and (acc.lo < -(1 << 31) or acc.hi >= 1 << 31):
            bounds += " OVERFLOWS int32"
        extra = f"  {pairs}" if pairs is not None else ""
        lines.append(f"  {name} ({op}): i{acc.bits} {bounds}{extra}")

    lines += ["", "IR before (frontend output):", before_ir]
    lines += ["", "IR after (optimized):", str(graph)]
    return "\n".join(lines)


def _accumulators(graph, group: str = ""):
    """(node name, op, Accumulator, i16_pairs) of every accumulator, through
    fused bodies (a node in a group is named `group: node` unless they agree)."""
    for node in graph.nodes:
        if node.op == "fused":
            yield from _accumulators(node.attrs["body"], node.name)
            continue
        for value in node.outputs:
            if value.type.accumulator is not None:
                name = node.name if group in ("", node.name) else f"{group}: {node.name}"
                yield name, node.op, value.type.accumulator, node.attrs.get("i16_pairs")


def _is_torch_model(model) -> bool:
    module = type(model).__module__
    return module.startswith("torch")


def num_threads_default() -> int:
    return int(os.environ.get("QNNJIT_NUM_THREADS", os.cpu_count() or 1))
