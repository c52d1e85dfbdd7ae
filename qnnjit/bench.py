"""`qnnjit bench`: qnnjit against ONNX Runtime on the same model, inputs and
thread count, in one run.

Latency is reported as median and min over repeats (the machine is shared and
noisy; absolute times drift, so the ratio to ONNX Runtime measured in the same
run is the figure that means something). Work is counted from the compiled
graph: 2 * multiply-accumulates of every convolution and matrix product.

Each qnnjit row also says whether its outputs on the benchmark's inputs are
bit-identical to the reference interpreter's (column "exact"): a fast wrong
kernel shows up in the same table as its speed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import api


@dataclass
class Measurement:
    engine: str
    threads: int
    batch: int
    median_ms: float
    min_ms: float
    gops: float
    exact: bool | None = None  # outputs bit-identical to the reference (None: not checked)


def count_ops(graph) -> int:
    """2 * MACs of every conv / matmul (integer or float) per sample: symbolic
    (batch) dims count as 1."""

    def dims(value):
        shape = value.type.shape
        return None if shape is None else [1 if isinstance(d, str) else d for d in shape]

    total = 0
    for node in _all_nodes(graph):
        out = dims(node.outputs[0])
        if node.op in ("qconv", "conv") and out and dims(node.inputs[1]):
            total += 2 * int(np.prod(out)) * int(np.prod(dims(node.inputs[1])[1:]))
        elif node.op in ("qmatmul", "matmul", "gemm") and out and dims(node.inputs[0]):
            a = dims(node.inputs[0])
            k = a[-2] if node.attrs.get("trans_a") else a[-1]
            total += 2 * int(np.prod(out)) * int(k)
    return total


def _all_nodes(graph):
    for node in graph.nodes:
        yield node
        body = node.attrs.get("body")
        if body is not None:
            yield from _all_nodes(body)


def make_inputs(compiled, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in compiled.graph.inputs:
        shape = [batch if isinstance(d, str) else d for d in value.type.shape]
        if value.type.dtype.is_float:
            feeds[value.name] = rng.standard_normal(shape).astype(value.type.dtype.numpy)
        else:
            info = np.iinfo(value.type.dtype.numpy)
            feeds[value.name] = rng.integers(info.min, info.max + 1, shape).astype(
                value.type.dtype.numpy
            )
    return feeds


def time_calls(function, repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), 1000 * float(np.min(times))


def ort_session(model_path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def bench_model(
    model_path, *, target=None, batches=(1,), threads=(1,), repeats=20, check=True
) -> dict:
    """Time qnnjit (each thread count) and ONNX Runtime on the same inputs;
    with `check`, also compare qnnjit's outputs with the reference
    interpreter's, bit for bit (row field "exact")."""
    rows: list[Measurement] = []
    start = time.perf_counter()
    compiled = {t: api.compile(model_path, target=target, num_threads=t) for t in threads}
    compile_s = (time.perf_counter() - start) / len(threads)
    any_model = next(iter(compiled.values()))
    reference = None
    if check and any_model.target != "reference":
        reference = api.compile(model_path, target="reference")
    for batch in batches:
        feeds = make_inputs(any_model, batch)
        ops = count_ops(any_model.graph) * batch
        want = reference.run(feeds) if reference is not None else None
        for t in threads:
            model = compiled[t]
            median, best = time_calls(lambda m=model, f=feeds: m.run(f), repeats)
            rows.append(Measurement(f"qnnjit-{model.target}", t, batch, median, best,
                                    ops / best / 1e6, _same(model.run(feeds), want)))  # fmt: skip
            try:
                session = ort_session(str(model_path), t)
            except ImportError:
                continue
            median, best = time_calls(lambda s=session, f=feeds: s.run(None, f), repeats)
            rows.append(Measurement("onnxruntime", t, batch, median, best, ops / best / 1e6))
    return {
        "model": str(model_path),
        "compile_seconds": compile_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "rows": [asdict(r) for r in rows],
    }


def _same(got: dict, want: dict | None) -> bool | None:
    """Are the outputs `got` bit-identical (dtype, shape, values) to `want`?"""
    if want is None:
        return None
    return all(
        got[name].dtype == value.dtype and np.array_equal(got[name], value)
        for name, value in want.items()
    )


def inexact_rows(result: dict) -> list[dict]:
    """The rows whose outputs differ from the reference interpreter's."""
    return [row for row in result["rows"] if row.get("exact") is False]


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"model {result['model']}  (compile {result['compile_seconds']:.2f} s)",
        f"{'engine':18s} {'threads':>7s} {'batch':>5s} {'median ms':>10s} {'min ms':>8s} "
        f"{'GOPS':>7s} {'vs ORT':>7s} {'exact':>6s}",
    ]
    ort_min = {
        (r["threads"], r["batch"]): r["min_ms"] for r in rows if r["engine"] == "onnxruntime"
    }
    for r in rows:
        ratio = ort_min.get((r["threads"], r["batch"]))
        speedup = f"{ratio / r['min_ms']:.2f}x" if ratio else "-"
        exact = {True: "yes", False: "NO", None: "-"}[r.get("exact")]
        lines.append(
            f"{r['engine']:18s} {r['threads']:7d} {r['batch']:5d} {r['median_ms']:10.2f} "
            f"{r['min_ms']:8.2f} {r['gops']:7.1f} {speedup:>7s} {exact:>6s}"
        )
    if inexact_rows(result):
        lines.append("outputs differ from the reference interpreter where exact is NO")
    return "\n".join(lines)


def main(model_path, *, target=None, batches=(1,), threads=(1,), repeats=20, json_path=None):
    result = bench_model(model_path, target=target, batches=batches, threads=threads,
                         repeats=repeats)  # fmt: skip
    print(format_table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
