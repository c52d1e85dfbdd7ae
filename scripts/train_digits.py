"""Train, export and quantize the embedded demo model (`qnnjit demo`).

The demo model is a small int8 CNN for scikit-learn's bundled 8x8 digits data
set (no downloads). This script is the only way the files in ``qnnjit/data/``
are made, so they can always be regenerated bit for bit on one machine:

    python scripts/train_digits.py            # writes qnnjit/data/

It writes

- ``digits_float.onnx``: the trained float model (opset 17, BatchNorm folded
  into the convolutions by the exporter),
- ``digits_int8.onnx``: the same model quantized by ONNX Runtime's
  ``quantize_static`` in QDQ form (uint8 asymmetric activations, int8
  symmetric per-channel weights), calibrated on 200 training images,
- ``digits_test.npz``: the held-out test split and the accuracies measured here.

Input contract (both models): ``input`` is float32 NCHW ``[batch, 1, 8, 8]``,
already normalised as ``((pixel / 16) - MEAN) / STD`` where MEAN and STD are
the scalar mean and standard deviation of ``pixel / 16`` over the training
split (stored in the npz ``meta`` entry and in the models' metadata). The
shipped test images are already normalised. ``logits`` is float32
``[batch, 10]``; the prediction is its argmax.

Determinism: fixed seeds, a fixed stratified 80/20 split (random_state=0),
deterministic torch algorithms and a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
TORCH_THREADS = 2
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
CALIBRATION_IMAGES = 200
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "qnnjit" / "data"


class DigitsNet(nn.Module):
    """conv-bn-relu x2, maxpool, a residual conv block, global avgpool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.res_conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.res_bn = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # [N, 32, 4, 4]
        x = self.relu(self.res_bn(self.res_conv(x)) + x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TORCH_THREADS)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Return normalised float32 NCHW train/test images, int64 labels, stats."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    mean = float(x_train.mean())
    std = float(x_train.std())
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return x_train, y_train, x_test, y_test, {"mean": mean, "std": std}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            batch = xt[idx]
            # Light augmentation: random shifts of up to one pixel.
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(model(batch), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def export_float(model: nn.Module, path: Path) -> None:
    dummy = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():
        # dynamo=False is deliberate: the TorchScript exporter folds BatchNorm
        # and names the graph plainly; silence its deprecation notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        _legacy_export(model, dummy, path)


def _legacy_export(model: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )


class _Calibration(CalibrationDataReader):
    """Feeds the calibration images to ORT in batches of 50."""

    def __init__(self, images: np.ndarray, batch: int = 50) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize(float_path: Path, int8_path: Path, calib: np.ndarray) -> None:
    # quantize_static logs a "consider pre-processing" hint on the root logger;
    # the exported graph is already shape-inferred and constant-folded.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize_static(float_path, int8_path, calib)
    finally:
        root.setLevel(level)


def _quantize_static(float_path: Path, out_path: Path, calib: np.ndarray) -> None:
    quantize_static(
        str(float_path),
        str(out_path),
        _Calibration(calib),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )


def annotate(path: Path, doc: str, props: dict[str, str]) -> None:
    """Record the input contract inside the ONNX file itself."""
    model = onnx.load(str(path))
    model.doc_string = doc
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    seed_everything(SEED)
    x_train, y_train, x_test, y_test, stats = load_split()

    model = DigitsNet()
    start = time.perf_counter()
    train(model, x_train, y_train)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        torch_acc = accuracy(model(torch.from_numpy(x_test)).numpy(), y_test)

    float_path = out / "digits_float.onnx"
    int8_path = out / "digits_int8.onnx"
    export_float(model, float_path)

    calib_idx = np.random.default_rng(SEED).choice(len(x_train), CALIBRATION_IMAGES, replace=False)
    quantize(float_path, int8_path, x_train[np.sort(calib_idx)])

    float_acc = accuracy(ort_logits(float_path, x_test), y_test)
    int8_acc = accuracy(ort_logits(int8_path, x_test), y_test)

    contract = (
        f"input: float32 [batch,1,8,8] NCHW, normalised as "
        f"((pixel/16) - {stats['mean']:.8f}) / {stats['std']:.8f}; "
        f"logits: float32 [batch,10]. Regenerate: python scripts/train_digits.py"
    )
    props = {
        "qnnjit.dataset": "sklearn.datasets.load_digits",
        "qnnjit.input_mean": repr(stats["mean"]),
        "qnnjit.input_std": repr(stats["std"]),
        "qnnjit.pixel_divisor": "16",
    }
    annotate(float_path, "qnnjit digits demo, float. " + contract, props)
    annotate(int8_path, "qnnjit digits demo, int8 QDQ. " + contract, props)

    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "split": "train_test_split(test_size=0.2, stratify=labels, random_state=0)",
        "normalisation": "((pixel / 16) - mean) / std",
        "mean": stats["mean"],
        "std": stats["std"],
        "float_accuracy": float_acc,
        "ort_int8_accuracy": int8_acc,
        "calibration_images": CALIBRATION_IMAGES,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    np.savez_compressed(
        out / "digits_test.npz",
        images=x_test,
        labels=y_test,
        float_accuracy=np.float64(float_acc),
        ort_int8_accuracy=np.float64(int8_acc),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )

    print(f"train time       : {train_seconds:.1f} s ({EPOCHS} epochs)")
    print(f"torch float acc  : {torch_acc:.4f}")
    print(f"ORT float acc    : {float_acc:.4f}  ({len(y_test)} test images)")
    print(f"ORT int8 acc     : {int8_acc:.4f}")
    for name in ("digits_float.onnx", "digits_int8.onnx", "digits_test.npz"):
        print(f"{name:17s}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
