"""ORT-quantized models end to end: qnnjit's reference output vs ONNX Runtime's.

Every model of the zoo (ResNet-, MobileNetV2-, attention- and Inception-style)
in every variant (QDQ/QOperator, u8/s8 activations, per-channel/per-tensor,
reduce_range, power-of-two scales that force rounding ties) is compiled with
target="reference" and compared with ONNX Runtime's *optimized* session
(ORT_ENABLE_ALL, the default): that is the session whose integer kernels qnnjit
reproduces. Outputs are dequantized floats; differences are counted in output
LSB (|a - b| / output scale).

Expected agreement (asserted below):
- exact wherever ORT's optimized session runs integer kernels throughout;
- QDQ with s8 activations: on x86 ORT declines to fuse several s8 QDQ node
  units and runs DequantizeLinear -> float Conv/Add -> QuantizeLinear with MLAS
  float kernels (docs/ort_numerics.md §9.4). qnnjit computes those layers in
  exact integer arithmetic (its defined semantics), so an inexact float sum in
  ORT may land on the other side of a rounding boundary: at most 1 LSB is
  accepted there, and the test reports the rate.
"""

from __future__ import annotations

import numpy as np
import pytest

import qnnjit

SEEDS = (0, 1, 2)


def _variants():
    import modelzoo

    return modelzoo.all_variants()


def _cases():
    import modelzoo

    return [
        pytest.param(model, variant, id=f"{model}-{variant}")
        for model in modelzoo.MODEL_NAMES
        for variant in modelzoo.all_variants()
    ]


def lsb_differences(model_path, compiled, batch: int = 1) -> np.ndarray:
    """|qnnjit - ORT optimized| in output LSB over SEEDS inputs."""
    import modelzoo
    import onnx

    model_name = compiled.graph.metadata.get("zoo_model")
    scale, _ = modelzoo.output_quantization(onnx.load(str(model_path)))
    diffs = []
    for seed in SEEDS:
        x = modelzoo.example_input(model_name, batch=batch, seed=seed)
        (expected,) = modelzoo.ort_run(model_path, {"input": x}, optimized=True)
        actual = compiled(x)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        diffs.append(np.abs(actual.astype(np.float64) - expected) / scale)
    return np.round(np.concatenate([d.ravel() for d in diffs]), 6)


def allowed_lsb(variant) -> int:
    s8_qdq = variant.quant_format == "QDQ" and variant.activation_type.name == "QInt8"
    return 1 if s8_qdq else 0


@pytest.mark.parametrize("model_name, variant", _cases())
def test_reference_matches_onnxruntime(model_zoo, model_name, variant):
    path = model_zoo.build(model_name, variant)
    compiled = qnnjit.compile(str(path), target="reference")
    compiled.graph.metadata["zoo_model"] = model_name
    diffs = lsb_differences(path, compiled)
    exact = float(np.mean(diffs == 0))
    assert diffs.max() <= allowed_lsb(variant), (
        f"{model_name} {variant}: max {diffs.max()} LSB, exact on {exact:.2%} of outputs"
    )
    # Even where ORT runs float kernels, a mismatch must stay a rare tie effect.
    assert exact >= 0.99, f"{model_name} {variant}: exact on only {exact:.2%} of outputs"


@pytest.mark.parametrize("model_name", ["resnet_style", "mlp_attention"])
def test_dynamic_batch(model_zoo, model_name):
    import modelzoo

    variant = modelzoo.Variant(per_channel=True)
    path = model_zoo.build(model_name, variant, dynamic_batch=True)
    compiled = qnnjit.compile(str(path), target="reference")
    assert isinstance(compiled.graph.inputs[0].type.shape[0], str)
    compiled.graph.metadata["zoo_model"] = model_name
    diffs = lsb_differences(path, compiled, batch=3)
    assert diffs.max() == 0
