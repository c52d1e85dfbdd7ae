"""ONNX's own backend node tests, run against qnnjit.onnx_backend.

Included: every quantization node test of the installed onnx, and the node
tests of the float ops quantized models carry. Exclusions are listed below,
each with its reason.
"""

import re

import onnx.backend.test

from qnnjit import onnx_backend

QUANTIZATION_TESTS = [
    r"test_quantizelinear",
    r"test_dequantizelinear",
    r"test_dynamicquantizelinear",
    r"test_qlinearconv",
    r"test_qlinearmatmul",
    r"test_convinteger",
    r"test_matmulinteger",
]

FLOAT_OP_TESTS = [
    r"test_conv_",
    r"test_basic_conv_",
    r"test_gemm_",
    r"test_matmul_",
    r"test_add",
    r"test_sub",
    r"test_mul",
    r"test_div",
    r"test_relu",
    r"test_leakyrelu",
    r"test_clip",
    r"test_sigmoid",
    r"test_hardsigmoid",
    r"test_hardswish",
    r"test_tanh",
    r"test_erf",
    r"test_gelu",
    r"test_softmax",
    r"test_layer_normalization",
    r"test_batchnorm",
    r"test_maxpool",
    r"test_averagepool",
    r"test_globalaveragepool",
    r"test_flatten",
    r"test_reshape",
    r"test_transpose",
    r"test_concat",
    r"test_split",
    r"test_slice",
    r"test_squeeze",
    r"test_unsqueeze",
    r"test_constant_pad",
    r"test_edge_pad",
    r"test_reflect_pad",
    r"test_reduce_mean",
    r"test_sqrt",
    r"test_pow",
    r"test_resize_.*nearest",
    r"test_shape",
    r"test_gather_",
    r"test_constant",
    r"test_constantofshape",
    r"test_cast_",
    r"test_range",
    r"test_identity",
]

# Excluded node tests, each with the reason.
EXCLUDED = {
    # Ops and variants outside the supported set (see the README's op table).
    r"test_convtranspose": "ConvTranspose is not supported",
    r"test_.*_cuda": "qnnjit's ONNX backend runs on CPU",
    r"test_maxpool_with_argmax": "MaxPool's Indices output is not supported",
    r"test_cast_.*STRING|test_cast_STRING": "string tensors are not supported",
    r"test_identity_sequence|test_identity_opt": "sequence and optional types are not supported",
    r"test_split_to_sequence": "sequence types are not supported",
    r"test_gather_elements|test_gathernd": "GatherElements / GatherND are not supported ops",
    r"test_batchnorm_.*_training_mode": "training-mode BatchNormalization (batch statistics) "
    "is not an inference op; qnnjit rejects it with a clear error",
    r"test_range_.*_expanded": "the expanded Range graphs use Loop; control flow is not supported",
    r"test_squeezenet": "a real-model test: it downloads the model (nothing may be downloaded) "
    "and is opset 9",
    r"test_softmax_functional_dim3|test_softmax_lastdim": "PyTorch-converted model tests at "
    "opset 6, below the supported opset 13",
    r"test_cast_FLOAT(16)?_to_FLOAT4E2M1": "the test data maps NaN to -0 (ml_dtypes' bit pattern), "
    "the ONNX float4 doc maps NaN to +6; qnnjit follows the doc (qnnjit/numerics.py)",
}

backend_test = onnx.backend.test.BackendTest(onnx_backend, __name__)
for pattern in QUANTIZATION_TESTS + FLOAT_OP_TESTS:
    backend_test.include(pattern)
for pattern in EXCLUDED:
    backend_test.exclude(pattern)


def _selected_only(test_cases: dict) -> dict:
    """The runner marks every test outside the include list as skipped; drop
    those methods instead, so a skip in this file's report always means
    something (the excluded ones are listed above with their reasons)."""
    include = re.compile("|".join(QUANTIZATION_TESTS + FLOAT_OP_TESTS))
    exclude = re.compile("|".join(EXCLUDED))
    for case in test_cases.values():
        for name in [n for n in vars(case) if n.startswith("test_")]:
            if not include.search(name) or exclude.search(name):
                delattr(case, name)
    return test_cases


globals().update(_selected_only(backend_test.test_cases))
