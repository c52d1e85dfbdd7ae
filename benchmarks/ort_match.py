"""How exactly qnnjit's reference interpreter reproduces ONNX Runtime on the
test model zoo: per model and variant, the fraction of output elements equal
to ORT's optimized session, the max difference in output LSB, and how many
rounding ties (pre-rounding values exactly at k + 0.5 in quantize/requantize
nodes) the inputs hit — ties are where rounding conventions disagree.

    python benchmarks/ort_match.py [--seeds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import modelzoo  # noqa: E402

import qnnjit  # noqa: E402


def count_ties(counter: dict):
    """An observer counting exact .5 ties before rounding."""

    def observe(node, args, results):
        if (
            node.op == "quantize"
            and node.outputs[0].type.dtype.is_int
            and node.attrs.get("axis") in (None, 1)
        ):
            scale = np.asarray(args[1], np.float32)
            if scale.size == 1:
                pre = np.asarray(args[0], np.float32) / scale.reshape(())
                counter["ties"] += int(np.sum(np.abs(pre - np.floor(pre)) == 0.5))
                counter["rounded"] += pre.size
        elif node.op == "requantize" and node.attrs["rounding"] == "half_even_float":
            mult = np.asarray(args[1], np.float32)
            axis = node.attrs.get("axis")
            if mult.size > 1 and axis is not None:
                shape = [1] * args[0].ndim
                shape[axis] = mult.size
                mult = mult.reshape(shape)
            pre = args[0].astype(np.float32) * mult
            counter["ties"] += int(np.sum(np.abs(pre - np.floor(pre)) == 0.5))
            counter["rounded"] += pre.size

    return observe


def measure(zoo, model_name, variant, seeds):
    path = zoo.build(model_name, variant)
    compiled = qnnjit.compile(str(path), target="reference")
    import onnx

    scale, _ = modelzoo.output_quantization(onnx.load(str(path)))
    counter = {"ties": 0, "rounded": 0}
    diffs = []
    for seed in range(seeds):
        x = modelzoo.example_input(model_name, seed=seed)
        (expected,) = modelzoo.ort_run(path, {"input": x}, optimized=True)
        (actual,) = compiled._executor.run([x], observe=count_ties(counter))
        diffs.append(np.abs(actual.astype(np.float64) - expected).ravel() / scale)
    diffs = np.round(np.concatenate(diffs), 6)
    return {
        "model": model_name,
        "variant": variant.name,
        "exact": float(np.mean(diffs == 0)),
        "max_lsb": float(diffs.max()),
        "ties": counter["ties"],
        "rounded": counter["rounded"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        zoo = modelzoo.set_default_zoo(modelzoo.ModelZoo(tmp))
        header = ("model", "variant", "exact", "max LSB", "ties", "rounded")
        print("{:18s} {:24s} {:>8s} {:>8s} {:>8s} {:>10s}".format(*header))
        for model_name in modelzoo.MODEL_NAMES:
            for variant in modelzoo.all_variants():
                row = measure(zoo, model_name, variant, args.seeds)
                rows.append(row)
                print(
                    f"{row['model']:18s} {row['variant']:24s} {100 * row['exact']:7.2f}% "
                    f"{row['max_lsb']:8.0f} {row['ties']:8d} {row['rounded']:10d}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
