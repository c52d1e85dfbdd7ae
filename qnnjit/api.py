"""`qnnjit.compile`: model in, CompiledModel out."""

from __future__ import annotations

import os

from .compiler import run_pipeline
from .errors import QnnjitError
from .runtime import CompiledModel

TARGETS = ("reference", "cpu", "cuda")
# Targets whose backend exists today, best first; `target=None` takes the first.
AVAILABLE_TARGETS = ("reference",)


def load_graph(model, example_inputs=None):
    """Dispatch a model to its frontend and return the IR graph."""
    if _is_torch_model(model):
        raise QnnjitError(
            "the PyTorch frontend is not built yet: export the model to ONNX "
            "(torch.onnx.export) and compile the .onnx"
        )
    from .frontends.onnx import load_onnx

    return load_onnx(model)


def compile(model, target: str | None = None, *, example_inputs=None, num_threads=None):
    """Compile `model` (path to .onnx, onnx.ModelProto or bytes) for `target`.

    target: "reference" (the NumPy interpreter that defines the numerics),
    "cpu" or "cuda"; None picks the best target available in this build.
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
    graph = load_graph(model, example_inputs)
    before = graph.op_counts()
    run_pipeline(graph)
    from .backends.reference import ReferenceExecutor

    report = _report(before, graph)
    return CompiledModel(graph, ReferenceExecutor(graph), target=target, report=report)


def _report(before: dict, graph) -> str:
    after = graph.op_counts()
    lines = ["node counts (frontend -> optimized):"]
    for op in sorted(set(before) | set(after)):
        lines.append(f"  {op:28s} {before.get(op, 0):5d} -> {after.get(op, 0):5d}")
    log = graph.metadata.get("qdq_log")
    if log is not None:
        lines += ["", f"QDQ units rewritten to integer ops ({len(log.applied)}):"]
        lines += [f"  {entry}" for entry in log.applied]
        lines += ["", f"quantize nodes kept ({len(log.kept)}), with the reason no rule applied:"]
        lines += [f"  {anchor}: {why}" for anchor, why in sorted(log.kept.items())]
    lines += ["", "optimized graph:", str(graph)]
    return "\n".join(lines)


def _is_torch_model(model) -> bool:
    module = type(model).__module__
    return module.startswith("torch")


def num_threads_default() -> int:
    return int(os.environ.get("QNNJIT_NUM_THREADS", os.cpu_count() or 1))
