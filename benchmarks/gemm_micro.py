"""int8 GEMM micro-benchmark: qnnjit's CPU GEMM engine vs ONNX Runtime vs this
machine's peak, on ResNet-18's convolutions as GEMMs (M = output pixels,
N = output channels, K = 3*3*input channels), u8 activations x s8 weights.

- peak: a tight loop of independent ``vpdpbusd`` (AVX-512 VNNI: 128 int8 ops
  each) or ``vpmaddubsw + vpmaddwd + vpaddd`` (AVX2: 64 ops) on registers,
  per thread, threads run concurrently: the ceiling of this machine, measured
  now (the clock and the neighbours decide it, not a data sheet);
- ORT: ``MatMulInteger`` with the weights as a constant initializer (prepacked
  by ORT), ``intra_op_num_threads`` = threads, in the same run, measured in
  alternation with qnnjit so both see the same machine load;
- qnnjit: ``gemm.gemm`` with ``default_config`` (``--tune``: the best of
  ``candidate_configs``), per ISA path this host runs; ``avx2`` runs the exact
  split kernel (full-range weights), ``avx2_i16`` the single-``vpmaddubsw``
  kernel, which ``gemm`` picks only when the weights prove it exact (here
  7-bit weights, [-64, 63], as ORT's reduce_range makes).

GOPS = 2*M*N*K / seconds. Each repeat times enough calls to last ``--min-time``;
min and median over ``--repeats`` (the machine is shared and noisy).

    python benchmarks/gemm_micro.py [--threads 1 2] [--paths avx512_vnni avx2 avx2_i16 portable]
                                    [--parallel pool numba] [--repeats 9] [--min-time 0.05]
                                    [--tune] [--no-ort] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qnnjit.backends.cpu import features, gemm, llvmjit  # noqa: E402

RESNET18 = [  # (layer, M, N, K) at batch 1, 224x224
    ("conv1 7x7/2", 12544, 64, 147),
    ("layer1 3x3", 3136, 64, 576),
    ("layer2 3x3", 784, 128, 1152),
    ("layer3 3x3", 196, 256, 2304),
    ("layer4 3x3", 49, 512, 4608),
]

# ---------------------------------------------------------------------------
# Peak: independent dot-product instructions on registers
# ---------------------------------------------------------------------------

_PEAK_ACCS = 24


def _peak_ir(isa: str) -> tuple[str, int]:
    """IR of ``i32 peak(i64 iters)`` and the int8 ops one iteration performs."""
    acc = _PEAK_ACCS
    if isa == "avx512_vnni":
        vec, lanes = "<16 x i32>", 16
        decl = (
            "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)"
        )
        body = [
            f"  %n{i} = call {vec} @llvm.x86.avx512.vpdpbusd.512({vec} %a{i}, {vec} %x, {vec} %y)"
            for i in range(acc)
        ]
        ops = acc * lanes * 4 * 2
    else:
        acc = 12  # 16 ymm registers
        vec, lanes = "<8 x i32>", 8
        decl = (
            "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)\n"
            "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)"
        )
        ones = "<" + ", ".join(["i16 1"] * 16) + ">"
        maddubs, maddwd = "@llvm.x86.avx2.pmadd.ub.sw", "@llvm.x86.avx2.pmadd.wd"
        body = ["  %y8 = bitcast <8 x i32> %y to <32 x i8>"]
        for i in range(acc):  # u8 operand from the accumulator: nothing to hoist
            body += [
                f"  %x{i} = bitcast <8 x i32> %a{i} to <32 x i8>",
                f"  %p{i} = call <16 x i16> {maddubs}(<32 x i8> %x{i}, <32 x i8> %y8)",
                f"  %q{i} = call <8 x i32> {maddwd}(<16 x i16> %p{i}, <16 x i16> {ones})",
                f"  %n{i} = add <8 x i32> %a{i}, %q{i}",
            ]
        ops = acc * lanes * 4 * 2
    phis = [f"  %a{i} = phi {vec} [ %seed, %entry ], [ %n{i}, %loop ]" for i in range(acc)]
    red = []
    prev = "%n0"
    for i in range(1, acc):
        red.append(f"  %r{i} = add {vec} {prev}, %n{i}")
        prev = f"%r{i}"
    text = f"""{decl}
define i32 @peak(i64 %iters, i32 %s) {{
entry:
  %si = insertelement {vec} poison, i32 %s, i64 0
  %seed = shufflevector {vec} %si, {vec} poison, {vec} zeroinitializer
  %x = add {vec} %seed, %seed
  %y = xor {vec} %seed, %x
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i.next, %loop ]
{chr(10).join(phis)}
{chr(10).join(body)}
  %i.next = add i64 %i, 1
  %done = icmp eq i64 %i.next, %iters
  br i1 %done, label %exit, label %loop
exit:
{chr(10).join(red)}
  %e = extractelement {vec} {prev}, i64 0
  ret i32 %e
}}
"""
    return text, ops


def measure_peak(isa: str, threads: int, seconds: float = 0.05, repeats: int = 40) -> float:
    """Best GOPS of ``threads`` concurrent peak loops (ctypes releases the GIL),
    over many short runs: on a shared machine the best run is the ceiling."""
    text, ops = _peak_ir(isa)
    mod = llvmjit.compile_module(text, isa, ("peak",))
    fn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_int32)(mod.addresses["peak"])
    t0 = time.perf_counter()
    fn(1_000_000, 1)
    iters = max(1000, int(1_000_000 * seconds / max(time.perf_counter() - t0, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=fn, args=(iters, 1)) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * iters * ops / (time.perf_counter() - t0) / 1e9)
    return best


# ---------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------


def ort_matmul(b: np.ndarray, m: int, threads: int):
    """A callable running ORT's MatMulInteger(A, B) with B constant."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, [m, n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"A": a})[0]


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def timed_rounds(fns: dict, repeats: int, min_time: float, settle: float = 0.02):
    """Seconds per call of each function, ``repeats`` rounds, the functions
    alternating within each round (so they share the machine's load), with a
    ``settle`` pause before each: ORT's (and OpenMP's) worker threads keep
    spinning after a call and would otherwise steal the next one's cores."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            fn()  # warm caches after the pause
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / inner[name])
    return times


def tuned_config(m, n, k, isa, threads, repeats):
    results = [
        gemm.measure_config(c, m, n, k, repeats=repeats, min_seconds=0.01)
        for c in gemm.candidate_configs(m, n, k, isa=isa, threads=threads)
    ]
    return min(results, key=lambda r: r.seconds_median).config


def _isa(path: str) -> str:
    return "avx2" if path == "avx2_i16" else path


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--paths",
        nargs="+",
        default=None,
        help="avx512_vnni, avx2 (exact split kernel, full-range weights), avx2_i16 "
        "(vpmaddubsw kernel, 7-bit weights), portable (default: every runnable one)",
    )
    p.add_argument(
        "--parallel",
        nargs="+",
        default=["pool"],
        choices=["pool", "numba"],
        help="how threads > 1 run (QNNJIT_GEMM_PARALLEL); several: one row each. Note: "
        "after a 'numba' (OpenMP) call its threads keep spinning for a while and slow "
        "whatever runs next in this process, the other rows and ORT included; measure "
        "'numba' in a run of its own",
    )
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.05)
    p.add_argument("--tune", action="store_true", help="best of candidate_configs, not the default")
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    runnable = features.runnable_isas()
    paths = args.paths or [
        x for x in ("avx512_vnni", "avx2", "avx2_i16", "portable") if _isa(x) in runnable
    ]
    cpu = features.host_cpu()
    print(
        f"host: {cpu.name}, runnable paths {runnable}, threads {args.threads}, "
        f"repeats {args.repeats} x >= {args.min_time}s, load average {_load()}"
    )
    peaks = {}
    for isa in sorted({_isa(x) for x in paths} - {"portable"}):
        for t in args.threads:
            peaks[isa, t] = measure_peak(isa, t)
            print(f"peak {isa:12s} {t} thread(s): {peaks[isa, t]:7.1f} GOPS")

    rows = []
    rng = np.random.default_rng(0)
    header = (
        f"{'layer':13s} {'M':>5s} {'N':>4s} {'K':>5s} {'path':18s} {'thr':>3s} "
        f"{'qnnjit min/med':>15s} {'ORT min/med':>13s} {'x ORT':>5s} {'% peak':>6s}  config"
    )
    print()
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        backends = args.parallel if threads > 1 else ["pool"]
        for layer, m, n, k in RESNET18:
            a = rng.integers(0, 256, (m, k), dtype=np.uint8)
            b = rng.integers(-128, 128, (k, n), dtype=np.int8)
            fns, configs, names = {}, {}, []
            for path in paths:
                isa = _isa(path)
                bw = np.clip(b, -64, 63) if path == "avx2_i16" else b
                exact = (a.astype(np.int64) @ bw.astype(np.int64)).astype(np.int32)
                if args.tune and isa != "portable":
                    cfg = tuned_config(m, n, k, isa, threads, 3)
                else:
                    cfg = gemm.default_config(m, n, k, isa=isa, threads=threads)
                w = gemm.pack_b(bw, cfg)
                assert (path == "avx2_i16") == (isa == "avx2" and w.i16_pairs_safe())
                out = np.empty((m, n), np.int32)
                for backend in backends:
                    name = path if len(backends) == 1 else f"{path}/{backend}"

                    def run(a=a, w=w, cfg=cfg, out=out, backend=backend):
                        os.environ["QNNJIT_GEMM_PARALLEL"] = backend
                        return gemm.gemm(a, w, cfg, out=out)

                    gemm.compile_config(cfg)
                    np.testing.assert_array_equal(run(), exact)
                    fns[name], configs[name] = run, cfg
                    names.append((name, isa))
            if not args.no_ort:
                run_ort = ort_matmul(b, m, threads)
                exact = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
                np.testing.assert_array_equal(run_ort(a), exact)
                fns["ort"] = lambda a=a, f=run_ort: f(a)
            times = timed_rounds(fns, args.repeats, args.min_time)
            ops = 2.0 * m * n * k
            ort_t = times.get("ort")
            for name, isa in names:
                t = times[name]
                best, med = ops / min(t) / 1e9, ops / statistics.median(t) / 1e9
                row = dict(layer=layer, m=m, n=n, k=k, path=name, threads=threads,
                           gops_min_time=best, gops_median=med,
                           config=configs[name].describe())  # fmt: skip
                ratio, pct, ort_txt = "", "", ""
                if ort_t is not None:
                    o_best, o_med = ops / min(ort_t) / 1e9, ops / statistics.median(ort_t) / 1e9
                    row.update(ort_gops_min_time=o_best, ort_gops_median=o_med,
                               ratio_median=med / o_med, ratio_best=best / o_best)  # fmt: skip
                    ort_txt = f"{o_best:6.0f}/{o_med:<6.0f}"
                    ratio = f"{med / o_med:5.2f}"
                if (isa, threads) in peaks:
                    row["pct_peak_best"] = 100 * best / peaks[isa, threads]
                    pct = f"{row['pct_peak_best']:5.0f}%"
                rows.append(row)
                print(
                    f"{layer:13s} {m:5d} {n:4d} {k:5d} {name:18s} {threads:3d} "
                    f"{best:7.0f}/{med:<7.0f} {ort_txt:>13s} {ratio:>5s} {pct:>6s}  "
                    f"{configs[name].describe()}",
                    flush=True,
                )
    print(f"load average at the end: {_load()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "host": cpu.name,
                    "peaks": {f"{i}/{t}": v for (i, t), v in peaks.items()},
                    "load_average_end": _load(),
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
