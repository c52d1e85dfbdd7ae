"""The model benchmark of the CPU milestone: full-size ResNet-18 and
MobileNetV2 (1x3x224x224), and the other models of `full_size_match.py` (a
ViT-Tiny-style encoder, a pre-norm attention block, an Inception-style CNN),
quantized by ONNX Runtime (QDQ, per-channel s8 weights; u8 activations, and
s8 symmetric activations), run by qnnjit's best target and by ONNX Runtime
on the same inputs and thread counts in one run.

    python benchmarks/run_models.py [--models resnet18 mobilenetv2 vit attention inception]
        [--batch 1 8] [--threads 1 2] [--repeats 20] [--json results.json]

Prints one table per model and variant (median and min latency, GOPS, ratio
to ONNX Runtime, and whether qnnjit's outputs are bit-identical to the
reference interpreter's: the script exits non-zero if any is not). Report
ratios, not absolute times: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import full_size_match as fsm  # noqa: E402
import modelzoo  # noqa: E402

from qnnjit.bench import bench_model, format_table, inexact_rows  # noqa: E402

VARIANTS = {
    "u8s8": modelzoo.Variant(per_channel=True),
    "s8s8": modelzoo.Variant(
        activation_type=modelzoo.QuantType.QInt8, per_channel=True, activation_symmetric=True
    ),
}


def build(name: str, variant_name: str, workdir: Path) -> Path:
    prep = fsm.export(name, 17, True, workdir / f"{name}.onnx")  # pre-processed
    out = workdir / f"{name}.{variant_name}.onnx"
    return fsm.quantize(name, prep, VARIANTS[variant_name], out, workdir / f"{name}.calib")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", choices=list(fsm.MODELS), default=list(fsm.MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--target", default=None)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for variant_name in args.variants:
                path = build(name, variant_name, Path(tmp))
                result = bench_model(
                    str(path), target=args.target, batches=tuple(args.batch),
                    threads=tuple(args.threads), repeats=args.repeats,
                )  # fmt: skip
                result["model"] = f"{name} {variant_name}"
                print(format_table(result), flush=True)
                results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    wrong = [r["model"] for r in results if inexact_rows(r)]
    if wrong:
        sys.exit(f"outputs differ from the reference interpreter: {', '.join(wrong)}")


if __name__ == "__main__":
    main()
