"""qnnjit as an `onnx.backend.base.Backend`, so ONNX's own backend test suite
(`onnx.backend.test.BackendTest`) runs against it.

ONNX's node tests feed every operand as a graph input, including operands that
qnnjit compiles into the kernel (shapes, axes, pads). The rep therefore
specializes at run time: when compilation needs a graph input to be constant,
the rep binds that input's run-time value as an initializer and compiles again,
caching one compiled model per distinct bound value — the JIT specializing on
values, as it does on shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.backend.base import Backend, BackendRep

from .api import compile as qnnjit_compile
from .errors import InputError, ModelError, NonConstantInputError

TARGET = "reference"


class QnnjitRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, target: str = TARGET):
        self.model = model
        self.target = target
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]
        self._bound_names: list[str] = []
        self._compiled: dict[tuple, object] = {}
        self._try_compile({})  # fails early on unsupported models; may need run-time values

    def _try_compile(self, feeds: dict):
        """Compile with the bound inputs taken from `feeds`; None if another input
        must be bound first (that input is then added to the bound set)."""
        key = tuple(
            (name, feeds[name].dtype.str, feeds[name].shape, feeds[name].tobytes())
            for name in self._bound_names
        )
        if key in self._compiled:
            return self._compiled[key]
        model = self._bind(feeds)
        try:
            compiled = qnnjit_compile(model, target=self.target)
        except NonConstantInputError as exc:
            if exc.input_name not in self.input_names or exc.input_name in self._bound_names:
                raise
            if exc.input_name not in feeds:
                self._bound_names.append(exc.input_name)
                return None
            self._bound_names.append(exc.input_name)
            return self._try_compile(feeds)
        self._compiled[key] = compiled
        return compiled

    def _bind(self, feeds: dict) -> onnx.ModelProto:
        if not self._bound_names:
            return self.model
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        kept = [i for i in model.graph.input if i.name not in self._bound_names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        for name in self._bound_names:
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(feeds[name]), name))
        return model

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            feeds = dict(zip(self.input_names, inputs))
        # ONNX's test runner passes 0-d inputs as NumPy scalars.
        feeds = {name: np.asarray(value) for name, value in feeds.items()}
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise InputError(
                f"missing input(s) {missing}; the model's inputs are {self.input_names}"
            )
        compiled = self._try_compile(feeds)
        run_feeds = {name: feeds[name] for name in compiled.input_names}
        results = compiled.run(run_feeds)
        return tuple(results[name] for name in self.output_names)


class QnnjitBackend(Backend):
    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs) -> QnnjitRep:
        if not cls.supports_device(device):
            raise RuntimeError(f"qnnjit's ONNX backend runs on CPU, not {device}")
        return QnnjitRep(model, kwargs.get("target", TARGET))

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        """Run one NodeProto on `inputs` (a list in the node's input order)."""
        arrays = [np.asarray(x) for x in inputs]
        graph_inputs = [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
            )
            for name, array in zip(node.input, arrays)
            if name
        ]
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        domain = node.domain or ""
        imports = [helper.make_opsetid("", opset)]
        if domain not in ("", "ai.onnx"):
            imports.append(helper.make_opsetid(domain, 1))
        model = _single_node_model(node, graph_inputs, imports)
        feeds = {name: array for name, array in zip(node.input, arrays) if name}
        return cls.prepare(model, device).run(feeds)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper().startswith("CPU")


def _single_node_model(node, graph_inputs, imports) -> onnx.ModelProto:
    """A model around one node; output types come from ONNX shape inference
    (the checker requires typed graph outputs)."""
    probe = helper.make_model(
        helper.make_graph([node], "run_node", graph_inputs, []), opset_imports=imports
    )
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    outputs = []
    for name in node.output:
        if not name:
            continue
        if name not in inferred:
            raise ModelError(f"run_node: the type of output {name!r} cannot be inferred")
        outputs.append(inferred[name])
    graph = helper.make_graph([node], "run_node", graph_inputs, outputs)
    return helper.make_model(graph, opset_imports=imports)


prepare = QnnjitBackend.prepare
run_model = QnnjitBackend.run_model
run_node = QnnjitBackend.run_node
supports_device = QnnjitBackend.supports_device
