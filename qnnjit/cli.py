"""The `qnnjit` command line: compile | run | inspect | bench | tune | demo."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import api
from .errors import QnnjitError


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(target=args.target)
    return 0


def _cmd_inspect(args) -> int:
    model = api.compile(args.model, target=args.target)
    print(model.report())
    return 0


def _cmd_compile(args) -> int:
    model = api.compile(args.model, target=args.target)
    counts = model.graph.op_counts()
    print(f"compiled {args.model} for target {model.target}: {sum(counts.values())} nodes")
    for op, count in counts.items():
        print(f"  {op:28s} {count}")
    return 0


def _cmd_run(args) -> int:
    """Run on random inputs (or arrays from an .npz keyed by input name)."""
    model = api.compile(args.model, target=args.target)
    feeds = {}
    stored = np.load(args.inputs) if args.inputs else {}
    rng = np.random.default_rng(0)
    for value in model.graph.inputs:
        if value.name in stored:
            feeds[value.name] = stored[value.name]
            continue
        shape = [args.batch if isinstance(d, str) else d for d in value.type.shape]
        feeds[value.name] = rng.standard_normal(shape).astype(value.type.dtype.numpy)
    for name, array in model.run(feeds).items():
        print(f"{name}: {array.dtype}{list(array.shape)}\n{array}")
    return 0


def _cmd_bench(args) -> int:
    from .bench import inexact_rows
    from .bench import main as bench_main

    result = bench_main(
        args.model,
        target=args.target,
        batches=tuple(args.batch),
        threads=tuple(args.threads),
        repeats=args.repeats,
        json_path=args.json,
    )
    return 1 if inexact_rows(result) else 0  # a wrong answer fails the command


def _not_built(name: str, issue: str):
    def command(args) -> int:
        print(f"qnnjit {name}: not built yet ({issue})", file=sys.stderr)
        return 2

    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qnnjit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name, function, help, model=True):
        sub = commands.add_parser(name, help=help)
        if model:
            sub.add_argument("model", help="path to an .onnx model")
        sub.add_argument("--target", default=None, help="reference | cpu | cuda (default: best)")
        sub.set_defaults(function=function)
        return sub

    add("compile", _cmd_compile, "compile a model and print its node counts")
    run = add("run", _cmd_run, "compile and run a model on random or given inputs")
    run.add_argument("--inputs", help=".npz of input arrays keyed by input name")
    run.add_argument("--batch", type=int, default=1, help="size of symbolic dimensions")
    add("inspect", _cmd_inspect, "show what the compiler did (report)")
    bench = add("bench", _cmd_bench, "latency vs ONNX Runtime, same inputs and threads")
    bench.add_argument("--batch", type=int, nargs="+", default=[1])
    bench.add_argument("--threads", type=int, nargs="+", default=[1])
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--json", help="write the measurements as JSON here")
    add("tune", _not_built("tune", "the autotuner"), "autotune kernel tile sizes")
    add("demo", _cmd_demo, "run the embedded int8 digits classifier", model=False)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.function(args)
    except QnnjitError as exc:
        print(f"qnnjit: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
