"""Sanity checks for the golden-model zoo (tests/modelzoo.py): every variant
builds, is a valid ONNX model, runs in ONNX Runtime, and stays close to the
float model; power-of-two variants really have power-of-two scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from modelzoo import (
    MODEL_NAMES,
    ModelZoo,
    QuantType,
    Variant,
    all_variants,
    example_input,
    force_power_of_two_scales,
    ort_run,
    output_quantization,
    scale_initializers,
    torch_module,
)

VARIANTS = all_variants()


def test_variant_matrix() -> None:
    base = all_variants(pow2=False)
    assert len(base) == 10
    assert len({v.name for v in VARIANTS}) == len(VARIANTS) == 20
    assert {v.quant_format for v in base} == {"QDQ", "QOperator"}
    assert {v.activation_type for v in base} == {QuantType.QUInt8, QuantType.QInt8}
    assert sum(v.reduce_range for v in base) == 2
    assert all(v.with_pow2() in VARIANTS for v in base)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_format": "QLinear"},
        {"activation_type": QuantType.QInt16},
        {"activation_type": QuantType.QInt8, "weight_type": QuantType.QUInt8},
    ],
)
def test_variant_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Variant(**kwargs)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_float_model_matches_torch(model_zoo: ModelZoo, name: str) -> None:
    x = example_input(name, batch=2, seed=3)
    want = torch_module(name)(torch.from_numpy(x)).detach().numpy()
    got = ort_run(model_zoo.float_onnx(name, dynamic_batch=True), {"input": x}, optimized=False)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_float_export_folded_batchnorm(model_zoo: ModelZoo, name: str) -> None:
    """The exporter folds eval-mode BatchNorm; the random statistics make that
    fold change the conv weights (checked against the torch module)."""
    ops = {n.op_type for n in onnx.load(str(model_zoo.float_onnx(name))).graph.node}
    assert "BatchNormalization" not in ops
    bns = [m for m in torch_module(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unfolded_batchnorm_export(model_zoo: ModelZoo, name: str) -> None:
    path = model_zoo.float_onnx(name, fold_batchnorm=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ("BatchNormalization" in ops) == (name != "mlp_attention")
    x = example_input(name, seed=2)
    want = ort_run(model_zoo.float_onnx(name), {"input": x}, optimized=False)[0]
    got = ort_run(path, {"input": x}, optimized=False)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_uint8_weights_build_and_run(model_zoo: ModelZoo, fmt: str) -> None:
    variant = Variant(fmt, QuantType.QUInt8, QuantType.QUInt8, per_channel=True, pow2_scales=True)
    path = model_zoo.build("resnet_style", variant)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = example_input("resnet_style")
    assert np.isfinite(ort_run(path, {"input": x}, optimized=True)[0]).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_variant_builds_checks_and_runs(model_zoo: ModelZoo, name: str, variant: Variant) -> None:
    path = model_zoo.build(name, variant)
    assert model_zoo.build(name, variant) == path  # memoized
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    if variant.quant_format == "QOperator":
        assert ops & {"QLinearConv", "QLinearMatMul", "QGemm"}
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert not any(op.startswith("QLinear") for op in ops)

    x = example_input(name, seed=5)
    reference = ort_run(model_zoo.float_onnx(name), {"input": x}, optimized=False)[0]
    scale, _ = output_quantization(model)
    for optimized in (False, True):
        y = ort_run(path, {"input": x}, optimized=optimized)[0]
        assert y.shape == reference.shape and np.isfinite(y).all()
        lsb = y.astype(np.float64) / scale  # a dequantized output lies on the grid
        np.testing.assert_allclose(lsb, np.round(lsb), atol=1e-3)
        # Power-of-two scales round some grids down and clip; still a rough match.
        tolerance = 0.4 if variant.pow2_scales else 0.1
        assert np.abs(y - reference).max() <= tolerance * np.abs(reference).max()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.pow2_scales], ids=str)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pow2_scales_are_powers_of_two(model_zoo: ModelZoo, name: str, variant: Variant) -> None:
    model = onnx.load(str(model_zoo.build(name, variant)))
    scales = scale_initializers(model)
    assert scales
    for scale_name, value in scales.items():
        mantissa, _ = np.frexp(value)
        assert np.all(mantissa == 0.5), scale_name


def _tie_fraction(path: str) -> float:
    """Fraction of QuantizeLinear inputs (unoptimized ORT) exactly on x.5."""
    model = onnx.load(path)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for n in quants:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
    outs = ort_run(model.SerializeToString(), {"input": example_input("resnet_style")}, False)
    by_name = dict(zip([o.name for o in model.graph.output], outs, strict=True))
    ratios = [by_name[n.input[0]].astype(np.float64) / values[n.input[1]] for n in quants]
    r = np.concatenate([x.ravel() for x in ratios])
    return float(np.mean(r - np.floor(r) == 0.5))


def test_pow2_scales_produce_ties(model_zoo: ModelZoo) -> None:
    plain = Variant(per_channel=True)
    assert _tie_fraction(str(model_zoo.build("resnet_style", plain))) < 1e-3
    assert _tie_fraction(str(model_zoo.build("resnet_style", plain.with_pow2()))) > 0.01


def test_pow2_rewrite_is_idempotent_and_keeps_biases(model_zoo: ModelZoo) -> None:
    model = onnx.load(str(model_zoo.build("resnet_style", Variant(per_channel=True))))
    once = force_power_of_two_scales(model)
    twice = force_power_of_two_scales(once)
    assert once.SerializeToString() == twice.SerializeToString()
    # A QDQ conv bias keeps scale == s_x * s_w after the rewrite.
    values = {t.name: onnx.numpy_helper.to_array(t) for t in once.graph.initializer}
    dq = {n.output[0]: n for n in once.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in once.graph.node if n.op_type == "Conv" and len(n.input) == 3]
    assert convs
    for conv in convs:
        s_x, s_w, s_b = (values[dq[i].input[1]] for i in conv.input)
        np.testing.assert_array_equal(s_b.ravel(), (s_x * s_w).ravel())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamic_batch_matches_static(model_zoo: ModelZoo, name: str) -> None:
    variant = Variant("QDQ", per_channel=True)
    dynamic = model_zoo.build(name, variant, dynamic_batch=True)
    static = model_zoo.build(name, variant)
    x = example_input(name, batch=3, seed=9)
    got = ort_run(dynamic, {"input": x}, optimized=True)[0]
    want = np.concatenate([ort_run(static, {"input": x[i : i + 1]}, True)[0] for i in range(3)])
    np.testing.assert_array_equal(got, want)


def test_example_input_is_deterministic() -> None:
    a = example_input("resnet_style", batch=2, seed=4)
    assert a.dtype == np.float32 and a.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(a, example_input("resnet_style", batch=2, seed=4))
    assert not np.array_equal(a, example_input("resnet_style", batch=2, seed=5))
