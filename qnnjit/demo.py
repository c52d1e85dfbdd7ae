"""`qnnjit demo`: the embedded int8 digits classifier, end to end.

Compiles the shipped ORT-quantized CNN (qnnjit/data/digits_int8.onnx, made by
scripts/train_digits.py) with the best available target, runs the held-out test
split, and prints accuracy (float vs int8, qnnjit vs ONNX Runtime when it is
installed) and latency.
"""

from __future__ import annotations

import json
import time
from importlib import resources

import numpy as np

from . import api

DATA = resources.files("qnnjit") / "data"


def _median_latency_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _ort_logits(model_path: str, images: np.ndarray):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def run_demo(target: str | None = None, out=print) -> dict:
    with resources.as_file(DATA / "digits_test.npz") as path:
        test = np.load(path)
        images, labels = test["images"], test["labels"]
        meta = json.loads(str(test["meta"]))
    with (
        resources.as_file(DATA / "digits_int8.onnx") as int8_path,
        resources.as_file(DATA / "digits_float.onnx") as float_path,
    ):
        start = time.perf_counter()
        int8_model = api.compile(str(int8_path), target=target)
        compile_s = time.perf_counter() - start
        float_model = api.compile(str(float_path), target=target)
        int8_logits = int8_model(images)
        float_logits = float_model(images)
        ort_logits = _ort_logits(str(int8_path), images)

    results = {
        "target": int8_model.target,
        "test_images": int(len(labels)),
        "float_accuracy": float(np.mean(float_logits.argmax(1) == labels)),
        "int8_accuracy": float(np.mean(int8_logits.argmax(1) == labels)),
        "compile_seconds": compile_s,
        "latency_ms_batch1": _median_latency_ms(lambda: int8_model(images[:1]), 20),
        "latency_ms_full_batch": _median_latency_ms(lambda: int8_model(images), 5),
    }
    out(f"qnnjit demo: int8 digits CNN ({meta['dataset']}), target={results['target']}")
    out(f"  test images            {results['test_images']}")
    out(f"  float accuracy         {results['float_accuracy']:.4f} (qnnjit, float model)")
    out(f"  int8 accuracy          {results['int8_accuracy']:.4f} (qnnjit, int8 model)")
    if ort_logits is not None:
        results["ort_int8_accuracy"] = float(np.mean(ort_logits.argmax(1) == labels))
        results["identical_to_ort"] = float(np.mean(int8_logits == ort_logits))
        out(f"  int8 accuracy          {results['ort_int8_accuracy']:.4f} (ONNX Runtime)")
        out(f"  outputs equal to ORT   {100 * results['identical_to_ort']:.2f}% of logits")
    else:
        out("  (install onnxruntime to compare with ONNX Runtime)")
    out(f"  compile time           {results['compile_seconds']:.2f} s")
    out(f"  latency, batch 1       {results['latency_ms_batch1']:.2f} ms (median)")
    out(
        f"  latency, batch {results['test_images']}     "
        f"{results['latency_ms_full_batch']:.2f} ms (median)"
    )
    return results
