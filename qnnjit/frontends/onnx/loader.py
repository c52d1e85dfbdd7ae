"""ONNX model -> qnnjit IR graph.

The loader validates the model (onnx.checker first), lists every node it cannot
convert at once, then converts node by node through the converter table
(`converters`: one function per ONNX op type and domain). Converters emit IR
nodes through `ConvertContext.emit`, which folds a node whose inputs are all
constant (shape subgraphs, constant weight transforms) straight into a
constant, except `dequantize`: DQ of a quantized weight must stay visible so
the compiler can keep the weight in integers.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from ...errors import ModelError, NonConstantInputError, QnnjitError, UnsupportedModelError
from ...ir import builder, dtypes
from ...ir.graph import Graph, Value
from ...ir.types import TensorType
from . import converters

ONNX_TO_DTYPE = {
    onnx.TensorProto.FLOAT: dtypes.float32,
    onnx.TensorProto.UINT8: dtypes.uint8,
    onnx.TensorProto.INT8: dtypes.int8,
    onnx.TensorProto.UINT16: dtypes.uint16,
    onnx.TensorProto.INT16: dtypes.int16,
    onnx.TensorProto.INT32: dtypes.int32,
    onnx.TensorProto.INT64: dtypes.int64,
    onnx.TensorProto.BOOL: dtypes.bool_,
    onnx.TensorProto.FLOAT16: dtypes.float16,
    onnx.TensorProto.DOUBLE: dtypes.float64,
    onnx.TensorProto.UINT32: dtypes.uint32,
    onnx.TensorProto.UINT64: dtypes.uint64,
    onnx.TensorProto.BFLOAT16: dtypes.bfloat16,
    onnx.TensorProto.FLOAT8E4M3FN: dtypes.float8e4m3fn,
    onnx.TensorProto.FLOAT8E4M3FNUZ: dtypes.float8e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: dtypes.float8e5m2,
    onnx.TensorProto.FLOAT8E5M2FNUZ: dtypes.float8e5m2fnuz,
    onnx.TensorProto.UINT4: dtypes.uint4,
    onnx.TensorProto.INT4: dtypes.int4,
    onnx.TensorProto.FLOAT4E2M1: dtypes.float4e2m1,
    onnx.TensorProto.UINT2: dtypes.uint2,
    onnx.TensorProto.INT2: dtypes.int2,
    onnx.TensorProto.FLOAT8E8M0: dtypes.float8e8m0,
}


def onnx_dtype(elem_type: int, where: str) -> dtypes.DType:
    try:
        return ONNX_TO_DTYPE[elem_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
        raise ModelError(f"{where}: element type {name} is not supported") from None


def load_model_proto(model) -> onnx.ModelProto:
    """Accept a path, bytes or ModelProto; validate with onnx.checker."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model file {str(path)!r} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise ModelError(f"{str(path)!r} is not a readable ONNX model: {exc}") from exc
    elif isinstance(model, bytes):
        try:
            model = onnx.load_from_string(model)
        except Exception as exc:
            raise ModelError(f"bytes are not a readable ONNX model: {exc}") from exc
    if not isinstance(model, onnx.ModelProto):
        raise QnnjitError(f"cannot compile a {type(model).__name__}; expected an ONNX model")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the ONNX model is malformed: {exc}") from exc
    return model


def opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    versions = {}
    for entry in model.opset_import:
        versions["" if entry.domain == "ai.onnx" else entry.domain] = entry.version
    return versions


def find_unsupported(model: onnx.ModelProto, opsets: dict[str, int]) -> list[dict]:
    unsupported = []
    for index, node in enumerate(model.graph.node):
        opset = opsets.get(node.domain, 0)
        reason = converters.unsupported_reason(node.domain, node.op_type, opset)
        if reason is not None:
            unsupported.append(
                {
                    "name": node.name or f"#{index}",
                    "op_type": node.op_type,
                    "domain": node.domain,
                    "opset": opset,
                    "reason": reason,
                }
            )
    return unsupported


class ConvertContext(builder.LoweringContext):
    """What a converter sees of the ONNX node being converted."""

    def __init__(self, loader: OnnxLoader, node: onnx.NodeProto, opset: int):
        name = node.name or f"{node.op_type}_{node.output[0]}"
        inputs = [loader.lookup(n, name) if n else None for n in node.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        super().__init__(loader.graph, name, inputs, attrs, opset)
        self.loader = loader
        self.node = node

    def not_constant(self, index: int, what: str, value: Value | None) -> Exception:
        message = (
            f"node {self.name!r} ({self.node.op_type}): input {index} ({what}) must be a "
            "constant (an initializer or computable at compile time)"
        )
        if value is not None and value.producer is None:
            return NonConstantInputError(f"{message}; it is graph input {value.name!r}", value.name)
        return ModelError(message)

    def error(self, message: str) -> ModelError:
        return ModelError(f"node {self.name!r} ({self.node.op_type}): {message}")


class OnnxLoader:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opsets = opset_versions(model)
        self.graph = Graph(model.graph.name or "main")
        self.names: dict[str, Value] = {}

    def lookup(self, name: str, node_name: str) -> Value:
        try:
            return self.names[name]
        except KeyError:
            raise ModelError(f"node {node_name!r} reads {name!r}, which nothing defines") from None

    def load(self) -> Graph:
        unsupported = find_unsupported(self.model, self.opsets)
        if unsupported:
            raise UnsupportedModelError(unsupported)
        onnx_graph = self.model.graph
        initializers = {t.name: t for t in onnx_graph.initializer}
        for tensor in onnx_graph.initializer:
            try:
                array = numpy_helper.to_array(tensor)
            except Exception as exc:
                raise ModelError(f"initializer {tensor.name!r} cannot be read: {exc}") from exc
            self.names[tensor.name] = self.graph.constant(array, tensor.name)
        for value_info in onnx_graph.input:
            if value_info.name in initializers:
                continue  # an initializer listed as input (IR < 4 style): a constant
            self.names[value_info.name] = self.graph.add_input(
                value_info.name, self.tensor_type(value_info)
            )
        for node in onnx_graph.node:
            self.convert(node)
        outputs = []
        for value_info in onnx_graph.output:
            outputs.append(self.lookup(value_info.name, "graph output"))
        self.graph.set_outputs(outputs)
        self.graph.metadata["output_names"] = [v.name for v in onnx_graph.output]
        self.graph.metadata["opsets"] = self.opsets
        # The numerics convention this model's integers follow: every rounding
        # choice the converters make is ONNX Runtime's (QuantizeLinear divides,
        # requantize is half_even_float), recorded on the ops themselves.
        self.graph.metadata["numerics_preset"] = "onnxruntime"
        return self.graph

    def convert(self, node: onnx.NodeProto):
        opset = self.opsets.get(node.domain, 0)
        ctx = ConvertContext(self, node, opset)
        results = converters.lookup(node.domain, node.op_type, opset)(ctx)
        outputs = [name for name in node.output]
        if len(results) < len([o for o in outputs if o]):
            raise ctx.error(f"converter gave {len(results)} outputs for {len(outputs)}")
        for name, value in zip(outputs, results):
            if not name:
                continue
            if any(v is value for v in ctx.created) and not self.graph.has_value(name):
                self.graph.rename(value, name)  # keep ONNX names where they are free
            self.names[name] = value

    def tensor_type(self, value_info) -> TensorType:
        kind = value_info.type.WhichOneof("value")
        if kind != "tensor_type":
            raise ModelError(f"graph input {value_info.name!r} is a {kind}, not a tensor")
        tensor = value_info.type.tensor_type
        dtype = onnx_dtype(tensor.elem_type, f"graph input {value_info.name!r}")
        if not tensor.HasField("shape"):
            return TensorType(dtype, None)
        shape = []
        for axis, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:
                shape.append(dim.dim_param or f"{value_info.name}_dim{axis}")
        return TensorType(dtype, tuple(shape))


def load_onnx(model) -> Graph:
    """Convert an ONNX model (path, bytes or ModelProto) into an IR graph.

    Graph output values keep the ONNX output names (an output that is also
    another output or an input gets an identity node so names stay unique)."""
    proto = load_model_proto(model)
    graph = OnnxLoader(proto).load()
    _name_outputs(graph)
    return graph


def _name_outputs(graph: Graph):
    """Give each graph output value its ONNX name, via identity where shared."""
    names = graph.metadata["output_names"]
    outputs = []
    for value, name in zip(graph.outputs, names):
        if (
            value.name != name
            or any(v is value for v in outputs)
            or value.is_constant
            or any(v is value for v in graph.inputs)
        ):
            node = graph.add_node("identity", [value], name=f"output_{name}")
            out = node.outputs[0]
            if graph.has_value(name) and graph.value(name) is not out:
                graph.rename(graph.value(name), graph._fresh_name(name + "_inner"))
            graph.rename(out, name)
            value = out
        outputs.append(value)
    graph.set_outputs(outputs)
