"""Full-size models through qnnjit's reference interpreter vs ONNX Runtime.

The test zoo (tests/modelzoo.py) holds 32x32 toys; this script builds the
real thing: ResNet-18 and MobileNetV2 at 1x3x224x224, a ViT-Tiny-style
encoder (patch conv, class token, 3-head attention, LayerNorm, GELU), a
pre-norm attention block on tokens and an Inception-style CNN (1x7/7x1
kernels, pooling branches), all seeded ``torch.nn`` modules with random
BatchNorm statistics. Each is exported with the TorchScript exporter (chosen
opsets, optionally a dynamic batch), pre-processed and quantized with
``quantize_static`` in the variants of ``modelzoo.all_variants()``, compiled
with ``target="reference"`` and compared with ONNX Runtime's optimized
session (the session qnnjit reproduces): exact-match fraction, max
difference in output LSB, and the reference interpreter's run time.

    python benchmarks/full_size_match.py                      # everything (slow)
    python benchmarks/full_size_match.py --models resnet18 --opsets 17 \\
        --variants qdq_u8s8_pt,qoperator_s8s8_pc --dynamic --json out.json

Expected: exact everywhere except QDQ with int8 activations, where ONNX
Runtime runs some units as float32 MLAS kernels (at most 1 LSB, see
tests/test_ort_models.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import modelzoo  # noqa: E402

import qnnjit  # noqa: E402

# ---- models ----------------------------------------------------------------------------


def _conv_bn(cin, cout, k, stride=1, groups=1, act=None):
    pad = (k - 1) // 2 if isinstance(k, int) else tuple((d - 1) // 2 for d in k)
    layers = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, 3, stride, act=nn.ReLU), _conv_bn(cout, cout, 3)
        )
        down = stride != 1 or cin != cout
        self.down = _conv_bn(cin, cout, 1, stride) if down else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6), _conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        cfg = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp=4):
        super().__init__()
        self.n1, self.attn, self.n2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp * dim), nn.GELU(), nn.Linear(mlp * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class ViT(nn.Module):
    """Patch-16 conv embedding, class token, 2 encoder blocks (dim 192, 3 heads)."""

    def __init__(self, dim=192, heads=3, depth=2, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class AttentionBlock(nn.Module):
    """One encoder block with 4 heads on (batch, 64 tokens, 128 features)."""

    def __init__(self):
        super().__init__()
        self.block = EncoderBlock(128, 4)

    def forward(self, x):
        return self.block(x)


class Inception(nn.Module):
    """Stem, an InceptionA-like block (1x1; 1x1-5x5; 1x1-3x3-3x3; avgpool-1x1)
    and a reduction block with 1x7 / 7x1 kernels and a max-pool branch."""

    def __init__(self, classes=1000):
        super().__init__()
        relu = nn.ReLU
        self.stem = nn.Sequential(
            _conv_bn(3, 32, 3, 2, act=relu),
            _conv_bn(32, 64, 3, act=relu),
            nn.MaxPool2d(3, 2),
            _conv_bn(64, 96, 3, 2, act=relu),
        )
        self.b1 = _conv_bn(96, 32, 1, act=relu)
        self.b5 = nn.Sequential(_conv_bn(96, 24, 1, act=relu), _conv_bn(24, 32, 5, act=relu))
        self.b3 = nn.Sequential(
            _conv_bn(96, 32, 1, act=relu),
            _conv_bn(32, 48, 3, act=relu),
            _conv_bn(48, 48, 3, act=relu),
        )
        self.bp = _conv_bn(96, 32, 1, act=relu)
        self.r3 = _conv_bn(144, 96, 3, 2, act=relu)
        self.r7 = nn.Sequential(
            _conv_bn(144, 48, 1, act=relu),
            _conv_bn(48, 48, (1, 7), act=relu),
            _conv_bn(48, 64, (7, 1), act=relu),
            _conv_bn(64, 64, 3, 2, act=relu),
        )
        self.fc = nn.Linear(304, classes)

    def forward(self, x):
        x = self.stem(x)
        pooled = nn.functional.avg_pool2d(x, 3, 1, 1)
        x = torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(pooled)], 1)
        x = torch.cat([self.r3(x), self.r7(x), nn.functional.max_pool2d(x, 3, 2, 1)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    "resnet18": (ResNet18, (3, 224, 224)),
    "mobilenetv2": (MobileNetV2, (3, 224, 224)),
    "vit": (ViT, (3, 224, 224)),
    "attention": (AttentionBlock, (64, 128)),
    "inception": (Inception, (3, 224, 224)),
}


def make_module(name: str) -> nn.Module:
    cls, _ = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cls()
        gen = torch.Generator().manual_seed(1)
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                n = m.weight.numel()
                m.weight.data = torch.rand(n, generator=gen) + 0.5
                m.bias.data = torch.randn(n, generator=gen) * 0.2
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean = torch.randn(m.num_features, generator=gen) * 0.3
                m.running_var = torch.rand(m.num_features, generator=gen) * 1.5 + 0.5
    return module.eval()


def example(name: str, batch: int, seed: int) -> np.ndarray:
    shape = (batch, *MODELS[name][1])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# ---- export and quantization -------------------------------------------------------------


class Reader(CalibrationDataReader):
    def __init__(self, name: str, count: int = 4):
        self.batches = [example(name, 1, 1000 + i) for i in range(count)]
        self.rewind()

    def get_next(self):
        batch = next(self.it, None)
        return None if batch is None else {"input": batch}

    def rewind(self):
        self.it = iter(self.batches)


def export(name: str, opset: int, dynamic: bool, path: Path) -> Path:
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_module(name),
            (torch.from_numpy(example(name, 1, 0)),),
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
        )
    prep = path.with_suffix(".prep.onnx")
    quant_pre_process(modelzoo.tidy(onnx.load(str(path))), str(prep), skip_optimization=True)
    return prep


def quantize(name: str, prep: Path, variant, out: Path, calib: Path) -> Path:
    if variant.pow2_scales:
        base = quantize(
            name,
            prep,
            dataclasses.replace(variant, pow2_scales=False),
            out.with_name(out.stem + ".base.onnx"),
            calib,
        )
        onnx.save(modelzoo.force_power_of_two_scales(onnx.load(str(base))), str(out))
        return out
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(prep),
            str(out),
            Reader(name),
            quant_format=QuantFormat.QDQ
            if variant.quant_format == "QDQ"
            else QuantFormat.QOperator,
            per_channel=variant.per_channel,
            reduce_range=variant.reduce_range,
            activation_type=variant.activation_type,
            weight_type=variant.weight_type,
            extra_options=variant.extra_options(),
            calibration_cache_path=calib,
        )
    finally:
        root.setLevel(level)
    return out


# ---- comparison ---------------------------------------------------------------------------


def measure(name: str, path: Path, batch: int, seeds: int) -> dict:
    start = time.perf_counter()
    compiled = qnnjit.compile(str(path), target="reference")
    compile_s = time.perf_counter() - start
    scale, _ = modelzoo.output_quantization(onnx.load(str(path)))
    diffs, times = [], []
    for seed in range(seeds):
        x = example(name, batch, seed)
        (expected,) = modelzoo.ort_run(path, {"input": x}, optimized=True)
        start = time.perf_counter()
        actual = compiled(x)
        times.append(time.perf_counter() - start)
        diffs.append(np.abs(actual.astype(np.float64) - expected).ravel() / scale)
    diffs = np.round(np.concatenate(diffs), 6)
    return {
        "exact": float(np.mean(diffs == 0)),
        "max_lsb": float(diffs.max()),
        "run_s": min(times),
        "compile_s": compile_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--opsets", default="13,17,21")
    parser.add_argument("--variants", default="all", help="comma-separated Variant names")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, run with batch 2")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    variants = modelzoo.all_variants()
    if args.variants != "all":
        wanted = args.variants.split(",")
        variants = [v for v in variants if v.name in wanted]
    batch = 2 if args.dynamic else 1
    rows = []
    header = (
        f"{'model':12s} {'opset':>5s} {'variant':26s} {'exact':>8s} {'max LSB':>8s} {'run s':>7s}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for opset in (int(o) for o in args.opsets.split(",")):
                base = Path(tmp, f"{name}-{opset}")
                prep = export(name, opset, args.dynamic, base.with_suffix(".onnx"))
                calib = base.with_suffix(".calib.json")
                for variant in variants:
                    row = {
                        "model": name,
                        "opset": opset,
                        "variant": variant.name,
                        "dynamic": args.dynamic,
                    }
                    try:
                        path = quantize(
                            name, prep, variant, base.with_suffix(f".{variant}.onnx"), calib
                        )
                        row.update(measure(name, path, batch, args.seeds))
                        line = (
                            f"{row['exact'] * 100:7.2f}% {row['max_lsb']:8.0f} {row['run_s']:7.2f}"
                        )
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        line = f"ERROR {row['error'][:120]}"
                    rows.append(row)
                    print(f"{name:12s} {opset:5d} {variant.name:26s} {line}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
