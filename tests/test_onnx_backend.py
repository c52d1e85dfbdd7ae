"""ONNX's own backend node tests, run against qnnjit.onnx_backend.

Included: every quantization node test of the installed onnx, and the node
tests of the float ops quantized models carry. Exclusions are listed below,
each with its reason.
"""

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
}

backend_test = onnx.backend.test.BackendTest(onnx_backend, __name__)
for pattern in QUANTIZATION_TESTS + FLOAT_OP_TESTS:
    backend_test.include(pattern)
for pattern in EXCLUDED:
    backend_test.exclude(pattern)

globals().update(backend_test.test_cases)
