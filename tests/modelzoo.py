"""Golden-model zoo: small generated models and their ONNX Runtime quantizations.

The test suite needs real quantized ONNX graphs of the shapes people deploy
(residual CNNs, inverted residuals with depthwise convs and ReLU6, attention with
LayerNorm/Softmax/GELU, multi-branch concat), in every form ONNX Runtime's
quantizer writes: QDQ and QOperator, uint8 or int8 activations, per-tensor or
per-channel weights, with or without ``reduce_range``. Nothing is downloaded:
each float model is a seeded ``torch.nn`` module (BatchNorm in eval mode with
random running statistics, so folding it is not a no-op), exported with the
TorchScript exporter, calibrated on fixed random batches and quantized with
``onnxruntime.quantization.quantize_static``.

Random scales almost never put a requantized value exactly on x.5, so rounding
differences between runtimes stay invisible. The ``pow2_scales`` variant
rewrites the quantized model so that every scale is a power of two
(:func:`force_power_of_two_scales`); then requantization ratios are powers of
two and ties occur often.

Files are written once per (model, variant, dynamic_batch) into a cache
directory; the names carry a hash of this file and the library versions, so a
persistent directory (``QNNJIT_MODELZOO_DIR``) is reused safely across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

MODEL_NAMES = ("resnet_style", "mobilenetv2_style", "mlp_attention", "inception_style")

INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17
CALIBRATION_BATCHES = 16
_SEED = 0

# --------------------------------------------------------------------------
# Float models
# --------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3)
        )
        self.down = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.down(x))


class ResNetStyle(nn.Module):
    """Conv-BN-ReLU stem, max pool, two basic blocks (the second strided with a
    1x1 downsample), global average pool, linear. Input 1x3x32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(_BasicBlock(8, 8, 1), _BasicBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            *_conv_bn(cin, hidden, 1),
            nn.ReLU6(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Style(nn.Module):
    """Strided stem, three inverted-residual blocks (1x1 expand, depthwise 3x3 at
    stride 1 and 2, 1x1 linear projection; residual adds where shapes allow),
    1x1 head, ReLU6 throughout, global average pool, linear. Input 1x3x32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 8, 3, 2),
            nn.ReLU6(),
            _InvertedResidual(8, 8, 1, 4),
            _InvertedResidual(8, 16, 2, 4),
            _InvertedResidual(16, 16, 1, 4),
            *_conv_bn(16, 32, 1),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MlpAttention(nn.Module):
    """Pre-norm transformer block on (batch, 16 tokens, 32 features):
    LayerNorm, single-head self-attention (Q/K/V projections, QK^T / sqrt(d),
    Softmax, weighted sum of V, output projection), residual add, LayerNorm,
    MLP with GELU, residual add."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj(torch.matmul(attn, v))
        return x + self.mlp(self.norm2(x))


class InceptionStyle(nn.Module):
    """Stem, then four parallel branches (1x1 conv; 1x1 then 3x3 conv; 3x3
    average pool stride 1 pad 1 then 1x1 conv; 3x3 max pool) concatenated on
    channels, a 1x1 conv, global average pool, linear. Input 1x3x32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.b1 = nn.Sequential(*_conv_bn(8, 8, 1), nn.ReLU())
        self.b3 = nn.Sequential(*_conv_bn(8, 4, 1), nn.ReLU(), *_conv_bn(4, 8, 3), nn.ReLU())
        self.bpool = nn.Sequential(nn.AvgPool2d(3, 1, 1), *_conv_bn(8, 8, 1), nn.ReLU())
        self.bmax = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Sequential(*_conv_bn(32, 16, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.bpool(x), self.bmax(x)], dim=1)
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


_MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet_style": (ResNetStyle, (3, 32, 32)),
    "mobilenetv2_style": (MobileNetV2Style, (3, 32, 32)),
    "mlp_attention": (MlpAttention, (16, 32)),
    "inception_style": (InceptionStyle, (3, 32, 32)),
}


def _check_name(model_name: str) -> None:
    if model_name not in _MODELS:
        raise KeyError(f"unknown model {model_name!r}; the zoo has {', '.join(MODEL_NAMES)}")


def torch_module(model_name: str) -> nn.Module:
    """A fresh, deterministic instance of the float model, in eval mode.

    BatchNorm layers get random affine parameters and running statistics, so
    folding them into the preceding conv changes the weights substantially;
    LayerNorm layers get random affine parameters.
    """
    _check_name(model_name)
    cls, _ = _MODELS[model_name]
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(_SEED)
        module = cls()
        gen = torch.Generator().manual_seed(_SEED + 1)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.data = torch.rand(n, generator=gen) + 0.5
                m.bias.data = torch.randn(n, generator=gen) * 0.2
                m.running_mean = torch.randn(n, generator=gen) * 0.3
                m.running_var = torch.rand(n, generator=gen) * 1.5 + 0.5
            elif isinstance(m, nn.LayerNorm):
                n = m.normalized_shape[0]
                m.weight.data = torch.rand(n, generator=gen) + 0.5
                m.bias.data = torch.randn(n, generator=gen) * 0.2
    return module.eval()


def input_shape(model_name: str, batch: int = 1) -> tuple[int, ...]:
    _check_name(model_name)
    return (batch, *_MODELS[model_name][1])


def example_input(model_name: str, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A float32 standard-normal input of the model's shape."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(input_shape(model_name, batch), dtype=np.float32)


def export_float(
    model_name: str, path: Path, dynamic_batch: bool = False, fold_batchnorm: bool = True
) -> Path:
    """Export the float model to ONNX (TorchScript exporter, opset 17,
    constant folding on; input "input", output "output").

    With ``fold_batchnorm`` (the default) the exporter folds eval-mode
    BatchNorm into the preceding conv; without it (``TrainingMode.PRESERVE``
    on the eval-mode module) the graph keeps inference-mode
    BatchNormalization nodes, for testing a BatchNorm-folding pass.
    """
    module = torch_module(model_name)
    dummy = torch.from_numpy(example_input(model_name))
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # PRESERVE on an eval-mode module is inference export; the advice to
        # turn constant folding off concerns training-mode modules only.
        warnings.filterwarnings("ignore", "It is recommended that constant folding")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            training=torch.onnx.TrainingMode.EVAL
            if fold_batchnorm
            else torch.onnx.TrainingMode.PRESERVE,
        )
    return path


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers; Identity nodes are bypassed.

    The TorchScript exporter leaves scalar Constant nodes (Clip bounds, the
    attention scale, GELU's constants) and Identity nodes for parameters that
    happen to be equal; both are noise for the quantizer.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        if (
            node.op_type == "Constant"
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        elif node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


# --------------------------------------------------------------------------
# Quantization variants
# --------------------------------------------------------------------------

_TYPE_TAGS = {QuantType.QUInt8: "u8", QuantType.QInt8: "s8"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a float model is quantized by ``quantize_static``.

    Activations and weights are ``QuantType.QUInt8`` or ``QuantType.QInt8``
    (ORT refuses int8 activations with uint8 weights). ``reduce_range``
    quantizes weights to 7 bits.

    ``activation_symmetric`` is ORT's ``ActivationSymmetric`` extra option
    (zero point 0 for every activation; ORT then keeps Relu/Clip as ops
    instead of folding them into the quantization range). ``pow2_scales``
    rewrites every scale to a power of two after quantization (see
    :func:`force_power_of_two_scales`).
    """

    quant_format: str = "QDQ"
    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = False
    reduce_range: bool = False
    activation_symmetric: bool = False
    pow2_scales: bool = False

    def __post_init__(self) -> None:
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(
                f"quant_format must be 'QDQ' or 'QOperator', not {self.quant_format!r}"
            )
        for field in ("activation_type", "weight_type"):
            if getattr(self, field) not in _TYPE_TAGS:
                raise ValueError(f"{field} must be QuantType.QUInt8 or QuantType.QInt8")
        if self.activation_type == QuantType.QInt8 and self.weight_type == QuantType.QUInt8:
            raise ValueError("ONNX Runtime cannot quantize int8 activations with uint8 weights")

    @property
    def name(self) -> str:
        """A short id for test names and file names, e.g. ``qdq_u8s8_pc_rr``."""
        parts = [
            self.quant_format.lower(),
            _TYPE_TAGS[self.activation_type] + _TYPE_TAGS[self.weight_type],
            "pc" if self.per_channel else "pt",
        ]
        if self.reduce_range:
            parts.append("rr")
        if self.activation_symmetric:
            parts.append("sym")
        if self.pow2_scales:
            parts.append("pow2")
        return "_".join(parts)

    def __str__(self) -> str:
        return self.name

    def with_pow2(self) -> Variant:
        return dataclasses.replace(self, pow2_scales=True)

    def extra_options(self) -> dict[str, object]:
        """``extra_options`` for ``quantize_static``."""
        return {"ActivationSymmetric": self.activation_symmetric}


def all_variants(pow2: bool = True) -> list[Variant]:
    """The matrix the tests run: {QDQ, QOperator} x {u8, s8 activations} x
    {per-tensor, per-channel} with int8 weights and no range reduction, plus
    ``reduce_range`` for the uint8 per-channel case of each format; with
    ``pow2`` (the default) each again with power-of-two scales.

    int8 activations are symmetric in QDQ (``ActivationSymmetric``, the
    symmetric S8S8 QDQ setup ORT's ``quantize_static`` docstring advises for
    int8 targets such as ARM and GPU/TensorRT; Relu/Clip stay explicit ops
    between Q/DQ pairs) and asymmetric in QOperator: there, symmetric
    activations would leave every Relu/Clip as a float op between a
    DequantizeLinear and a QuantizeLinear, since QOperator has no quantized
    Relu/Clip, while asymmetric ones fold them into QLinearConv's output
    range as in the uint8 case.
    """
    base = [
        Variant(fmt, act, QuantType.QInt8, per_channel, False, symmetric)
        for fmt in ("QDQ", "QOperator")
        for act in (QuantType.QUInt8, QuantType.QInt8)
        for per_channel in (False, True)
        for symmetric in [fmt == "QDQ" and act == QuantType.QInt8]
    ]
    base += [
        Variant("QDQ", QuantType.QUInt8, QuantType.QInt8, True, True),
        Variant("QOperator", QuantType.QUInt8, QuantType.QInt8, True, True),
    ]
    return base + [v.with_pow2() for v in base] if pow2 else base


class RandomDataReader(CalibrationDataReader):
    """Fixed-seed standard-normal calibration batches for one model."""

    def __init__(self, model_name: str, count: int = CALIBRATION_BATCHES, seed: int = 1000) -> None:
        self.batches = [example_input(model_name, 1, seed + i) for i in range(count)]
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def quantize(
    float_path: Path,
    out_path: Path,
    model_name: str,
    variant: Variant,
    calib_cache: Path | None,
) -> Path:
    """Quantize a (pre-processed) float model with ``quantize_static``.

    ORT's advice-level warnings (int8 activations in QOperator, per-channel
    axis out of range for LayerNorm's 1-D gamma, which it then quantizes per
    tensor) go to the root logger; they are silenced for the call.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize_static(float_path, out_path, model_name, variant, calib_cache)
    finally:
        root.setLevel(level)
    return out_path


def _quantize_static(
    float_path: Path, out_path: Path, model_name: str, variant: Variant, calib_cache: Path | None
) -> None:
    quantize_static(
        str(float_path),
        str(out_path),
        RandomDataReader(model_name),
        quant_format=QuantFormat.QDQ if variant.quant_format == "QDQ" else QuantFormat.QOperator,
        per_channel=variant.per_channel,
        reduce_range=variant.reduce_range,
        activation_type=variant.activation_type,
        weight_type=variant.weight_type,
        extra_options=variant.extra_options(),
        calibration_cache_path=calib_cache,
    )


# --------------------------------------------------------------------------
# Power-of-two scales
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _QOpSpec:
    """Where a quantized op keeps its quantization parameters.

    ``operands``: (data, scale, zero point) input positions of each quantized
    operand; ``variadic``: position from which further such triplets repeat
    (QLinearConcat); ``output``: (scale, zero point) input positions of the
    quantized output; ``bias``: (int32 bias, operand a, operand b) -- the bias
    is quantized with scale ``s_a * s_b`` and zero point 0.
    """

    operands: tuple[tuple[int, int, int], ...] = ()
    output: tuple[int, int] | None = None
    bias: tuple[int, int, int] | None = None
    variadic: int | None = None


_UNARY = _QOpSpec(operands=((0, 1, 2),), output=(3, 4))
_BINARY = _QOpSpec(operands=((0, 1, 2), (3, 4, 5)), output=(6, 7))
_QOPS: dict[str, _QOpSpec] = {
    "QuantizeLinear": _QOpSpec(output=(1, 2)),
    "DequantizeLinear": _QOpSpec(operands=((0, 1, 2),)),
    "QLinearConv": _QOpSpec(operands=((0, 1, 2), (3, 4, 5)), output=(6, 7), bias=(8, 0, 1)),
    "QGemm": _QOpSpec(operands=((0, 1, 2), (3, 4, 5)), output=(7, 8), bias=(6, 0, 1)),
    "QLinearMatMul": _BINARY,
    "QLinearAdd": _BINARY,
    "QLinearMul": _BINARY,
    "QLinearConcat": _QOpSpec(output=(0, 1), variadic=2),
    "QLinearGlobalAveragePool": _UNARY,
    "QLinearAveragePool": _UNARY,
    "QLinearSoftmax": _UNARY,
    "QLinearSigmoid": _UNARY,
    "QLinearLeakyRelu": _UNARY,
}


def _operand_triplets(node: onnx.NodeProto, spec: _QOpSpec) -> list[tuple[int, int, int]]:
    triplets = list(spec.operands)
    if spec.variadic is not None:
        triplets += [(i, i + 1, i + 2) for i in range(spec.variadic, len(node.input), 3)]
    return triplets


def scale_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer used as a scale by a Q/DQ or QOperator op, by name."""
    values = {t.name: t for t in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        spec = _QOPS.get(node.op_type)
        if spec is None:
            continue
        positions = [s for _, s, _ in _operand_triplets(node, spec)]
        if spec.output is not None:
            positions.append(spec.output[0])
        names |= {node.input[i] for i in positions if i < len(node.input)}
    return {n: numpy_helper.to_array(values[n]) for n in sorted(names) if n in values}


def _pow2_nearest(scale: np.ndarray) -> np.ndarray:
    """2**round(log2 s): the nearest power of two on a log scale."""
    return np.where(scale > 0, np.exp2(np.round(np.log2(scale))), scale).astype(np.float32)


def _pow2_ceil(scale: np.ndarray) -> np.ndarray:
    """2**ceil(log2 s): the smallest power of two >= s."""
    return np.where(scale > 0, np.exp2(np.ceil(np.log2(scale))), scale).astype(np.float32)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _channel_axis(node: onnx.NodeProto, operand: int, rank: int) -> int:
    """Axis of a per-channel scale for ``node``'s ``operand``-th operand."""
    if node.op_type == "DequantizeLinear":
        return _attr(node, "axis", 1) % rank
    if node.op_type == "QLinearConv":
        return 0
    if node.op_type == "QGemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "QLinearMatMul":
        return rank - 1
    raise NotImplementedError(f"per-channel scale on {node.op_type} operand {operand}")


def force_power_of_two_scales(model: onnx.ModelProto, weights: bool = True) -> onnx.ModelProto:
    """Return a copy of a quantized model whose scales are powers of two.

    - Activation scales -- every scale initializer that describes a tensor
      computed at run time, in QuantizeLinear/DequantizeLinear and in the
      scale inputs of QOperator ops -- become ``2**round(log2 s)``. This is
      a pure function of the value applied per initializer, so wherever one
      tensor's scale appears (its Q, its DQs, every QLinear op reading it)
      the new scale is the same. Zero points are kept.
    - With ``weights`` (the default) constant quantized tensors (conv / gemm
      / matmul weights, constant operands of QLinearAdd/Mul and of QDQ
      Add/Mul, LayerNorm gamma) get ``s' = 2**ceil(log2 s)`` per channel and
      their integers are requantized, ``q' = round((q - zp) * s / s') + zp``;
      as ``s' >= s`` nothing saturates. Then conv/matmul requantization
      ratios ``s_x * s_w / s_y`` are powers of two as well.
    - int32 biases quantized with ``s_x * s_w`` (QLinearConv/QGemm bias
      inputs; in QDQ an int32 DequantizeLinear whose consumer reads two
      dequantized operands with those scales) are requantized to the new
      ``s_x * s_w``, and in QDQ their scale initializer is set to it.

    Every constant keeps its real value up to the new rounding, so the model
    computes the same function with different quantization grids. Raises
    ``NotImplementedError`` for a quantized op it does not know, rather than
    leave a scale unconverted.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    old = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    new: dict[str, np.ndarray] = {}
    roles: dict[str, str] = {}
    constants: dict[str, tuple[str, str, int]] = {}  # data -> (scale, zp, axis)
    biases: dict[str, tuple[str | None, str, str]] = {}  # data -> (scale, s_a, s_b)

    def rescale(name: str, role: str) -> None:
        if name not in inits:
            raise ValueError(f"scale {name!r} is not an initializer")
        if roles.setdefault(name, role) != role:
            raise ValueError(f"scale {name!r} serves {roles[name]} and {role} tensors")
        if role == "activation":
            new[name] = _pow2_nearest(old[name])
        elif weights:
            new[name] = _pow2_ceil(old[name])

    int32_dq = {}  # DQ output -> the DQ node, for int32 constants
    for node in graph.node:
        spec = _QOPS.get(node.op_type)
        if spec is None:
            if node.op_type.startswith("QLinear") or node.op_type == "QGemm":
                raise NotImplementedError(f"no power-of-two rule for {node.op_type}")
            continue
        ins = list(node.input) + [""] * 16
        operands = _operand_triplets(node, spec)
        if spec.output is not None:
            constant_input = node.op_type == "QuantizeLinear" and ins[0] in inits
            rescale(ins[spec.output[0]], "weight" if constant_input else "activation")
        for k, (data, scale, zp) in enumerate(operands):
            if ins[data] not in inits:
                rescale(ins[scale], "activation")
            elif old[ins[data]].dtype == np.int32 and node.op_type == "DequantizeLinear":
                int32_dq[node.output[0]] = node
            else:
                rescale(ins[scale], "weight")
                per_channel = old[ins[scale]].size > 1
                axis = _channel_axis(node, k, old[ins[data]].ndim) if per_channel else 0
                constants[ins[data]] = (ins[scale], ins[zp], axis)
        if spec.bias is not None and ins[spec.bias[0]]:
            b, a_k, b_k = spec.bias
            s_a, s_b = ins[spec.operands[a_k][1]], ins[spec.operands[b_k][1]]
            biases[ins[b]] = (None, s_a, s_b)

    for dq in int32_dq.values():
        data, scale = dq.input[0], dq.input[1]
        pair = _bias_operand_scales(graph, dq, old)
        if pair is not None:
            biases[data] = (scale, *pair)
        else:
            rescale(scale, "weight")
            constants[data] = (scale, dq.input[2] if len(dq.input) > 2 else "", 0)

    if weights:
        for data, (scale, zp, axis) in constants.items():
            new[data] = _requantize_constant(old[data], old[scale], new[scale], old.get(zp), axis)
    for data, (scale, s_a, s_b) in biases.items():
        before = old[scale] if scale else old[s_a] * old[s_b]
        after = (new.get(s_a, old[s_a]) * new.get(s_b, old[s_b])).astype(np.float32)
        real = old[data].astype(np.float64) * before.astype(np.float64)
        new[data] = np.clip(np.round(real / after), -(2**31), 2**31 - 1)
        if scale:
            new[scale] = after.reshape(old[scale].shape)

    for name, value in new.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(old[name].dtype), name))
    return model


def _bias_operand_scales(
    graph: onnx.GraphProto, dq: onnx.NodeProto, values: dict[str, np.ndarray]
) -> tuple[str, str] | None:
    """For a QDQ int32 bias ``dq``: the scale initializers ``(s_x, s_w)`` of
    the dequantized first two inputs of a consumer when the bias scale equals
    ``s_x * s_w`` (Conv, Gemm, LayerNormalization biases), else None."""
    dq_of = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    bias_scale = values[dq.input[1]]
    for node in graph.node:
        if dq.output[0] not in node.input or len(node.input) < 3:
            continue
        x, w = dq_of.get(node.input[0]), dq_of.get(node.input[1])
        if x is None or w is None:
            continue
        s_x, s_w = x.input[1], w.input[1]
        if s_x in values and s_w in values:
            product = values[s_x] * values[s_w]
            if np.allclose(product.ravel(), bias_scale.ravel(), rtol=1e-5, atol=0):
                return s_x, s_w
    return None


def _requantize_constant(
    q: np.ndarray, scale: np.ndarray, new_scale: np.ndarray, zp: np.ndarray | None, axis: int
) -> np.ndarray:
    """``round((q - zp) * scale / new_scale) + zp``, per channel along ``axis``."""
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    ratio = (scale.astype(np.float64) / new_scale).reshape(shape)
    z = zp.astype(np.int64).reshape(shape if zp.size > 1 else ()) if zp is not None else 0
    return np.round((q.astype(np.int64) - z) * ratio) + z


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


def _source_key() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for version in (torch.__version__, onnx.__version__, ort.__version__):
        h.update(version.encode())
    return h.hexdigest()[:10]


class ModelZoo:
    """Builds zoo models into ``cache_dir``, each at most once per instance.

    File names carry a hash of this module's source and the library versions,
    so files found in the directory from an earlier run are reused only when
    they were made by the same code.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._key = _source_key()
        self._lock = threading.RLock()
        self._memo: dict[tuple[object, ...], Path] = {}

    def _path(self, *parts: str) -> Path:
        return self.cache_dir / ("-".join(parts) + f"-{self._key}.onnx")

    def _once(self, key: tuple[object, ...], path: Path, make: Callable[[Path], object]) -> Path:
        with self._lock:
            if key not in self._memo:
                if not path.exists():
                    tmp = _scratch_name(path)
                    make(tmp)
                    os.replace(tmp, path)  # atomic: a reader never sees half a file
                self._memo[key] = path
            return self._memo[key]

    def float_onnx(
        self, model_name: str, dynamic_batch: bool = False, fold_batchnorm: bool = True
    ) -> Path:
        """The float model as exported by torch (see :func:`export_float`);
        by default with BatchNorm folded into the convs by the exporter."""
        _check_name(model_name)
        tag = "dyn" if dynamic_batch else "static"
        kind = "float" if fold_batchnorm else "float_bn"
        return self._once(
            (kind, model_name, dynamic_batch),
            self._path(model_name, kind, tag),
            lambda p: export_float(model_name, p, dynamic_batch, fold_batchnorm),
        )

    def preprocessed_onnx(self, model_name: str, dynamic_batch: bool = False) -> Path:
        """The input to quantization: the float model with Constant nodes
        turned into initializers, Identity nodes removed, and shapes inferred
        by ``quant_pre_process``. ORT's graph optimizations are skipped: they
        would turn the attention block's MatMul+Add into Reshape/Gemm/Reshape."""
        src = self.float_onnx(model_name, dynamic_batch)
        tag = "dyn" if dynamic_batch else "static"
        path = self._path(model_name, "prep", tag)
        return self._once(
            ("prep", model_name, dynamic_batch),
            path,
            lambda p: quant_pre_process(tidy(onnx.load(str(src))), str(p), skip_optimization=True),
        )

    def build(self, model_name: str, variant: Variant, dynamic_batch: bool = False) -> Path:
        """Path of ``model_name`` quantized as ``variant``."""
        _check_name(model_name)
        tag = "dyn" if dynamic_batch else "static"
        path = self._path(model_name, variant.name, tag)
        if variant.pow2_scales:
            src = self.build(
                model_name,
                dataclasses.replace(variant, pow2_scales=False),
                dynamic_batch,
            )

            def make(p: Path) -> None:
                onnx.save(force_power_of_two_scales(onnx.load(str(src))), str(p))

        else:
            prep = self.preprocessed_onnx(model_name, dynamic_batch)
            calib = self.cache_dir / f"{model_name}-calib-{tag}-{self._key}.json"

            def make(p: Path) -> None:
                # Calibration ranges do not depend on the variant: computed by
                # the first build of this model, then read from the cache file.
                if calib.exists():
                    quantize(prep, p, model_name, variant, calib)
                else:
                    tmp = _scratch_name(calib)
                    quantize(prep, p, model_name, variant, tmp)
                    os.replace(tmp, calib)

        return self._once((model_name, variant, dynamic_batch), path, make)


def _scratch_name(path: Path) -> Path:
    """A name beside ``path`` that no other process or thread is writing."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")


_default_zoo: ModelZoo | None = None


def default_zoo() -> ModelZoo:
    """The process-wide zoo used by the module-level functions: the one set by
    :func:`set_default_zoo` (the ``model_zoo`` fixture does), else one in
    ``$QNNJIT_MODELZOO_DIR`` or a fresh temporary directory."""
    global _default_zoo
    if _default_zoo is None:
        where = os.environ.get("QNNJIT_MODELZOO_DIR") or tempfile.mkdtemp(prefix="qnnjit-zoo-")
        _default_zoo = ModelZoo(where)
    return _default_zoo


def set_default_zoo(zoo: ModelZoo) -> ModelZoo:
    global _default_zoo
    _default_zoo = zoo
    return zoo


def build(model_name: str, variant: Variant, dynamic_batch: bool = False) -> Path:
    """``default_zoo().build(...)``: the quantized model's path, built once."""
    return default_zoo().build(model_name, variant, dynamic_batch)


def float_onnx(model_name: str, dynamic_batch: bool = False, fold_batchnorm: bool = True) -> Path:
    """``default_zoo().float_onnx(...)``: the exported float model's path."""
    return default_zoo().float_onnx(model_name, dynamic_batch, fold_batchnorm)


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def ort_session(path: str | os.PathLike[str] | bytes, optimized: bool) -> ort.InferenceSession:
    """A single-threaded CPU session, with all graph optimizations or none.
    ``path`` may also be a serialized model."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_run(
    path: str | os.PathLike[str] | bytes, inputs: dict[str, np.ndarray], optimized: bool
) -> list[np.ndarray]:
    """Run a model once with ONNX Runtime's CPU EP (one thread; graph
    optimizations ORT_ENABLE_ALL if ``optimized`` else ORT_DISABLE_ALL);
    returns all outputs in graph order."""
    return ort_session(path, optimized).run(None, inputs)


def output_quantization(
    model: onnx.ModelProto, output: str = OUTPUT_NAME
) -> tuple[float, int] | None:
    """(scale, zero point) of the DequantizeLinear that produces ``output``,
    or None if the output is not produced by one."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if output in node.output and node.op_type == "DequantizeLinear":
            zp = int(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
            return float(inits[node.input[1]]), zp
    return None
