"""CompiledModel: checks inputs against the graph's declared types, runs the
backend's executor and returns outputs by name or position."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..errors import InputError
from ..ir.graph import Graph


class CompiledModel:
    def __init__(
        self, graph: Graph, executor, *, target: str, report: str | Callable[[], str] = ""
    ):
        self.graph = graph
        self.target = target
        self._executor = executor
        self._report = report  # the text, or a function writing it (once, when asked)
        self._static_inputs = _static_signature(graph)
        self._input_names = tuple(v.name for v in graph.inputs)
        self._output_names = tuple(v.name for v in graph.outputs)
        # `__call__` returns the values of `run`'s dict, one per distinct name
        self._distinct_outputs = len(set(self._output_names)) == len(self._output_names)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named inputs; returns {output name: array}."""
        if type(inputs) is dict and len(inputs) == len(self._input_names):
            arrays = list(map(inputs.get, self._input_names))  # (no Python frame)
            if self._as_declared(arrays):
                return dict(zip(self._output_names, self._executor.run(arrays)))
        if not isinstance(inputs, Mapping):
            raise InputError(f"run() takes a dict of input arrays, got {type(inputs).__name__}")
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown:
            raise InputError(
                f"unknown input name(s) {unknown}; the model's inputs are {self.input_names}"
            )
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InputError(
                f"missing input(s) {missing}; the model's inputs are {self.input_names}"
            )
        arrays = self._check_inputs([inputs[name] for name in self.input_names])
        outputs = self._executor.run(arrays)
        return dict(zip(self.output_names, outputs))

    def __call__(self, *arrays):
        if self._distinct_outputs and self._as_declared(arrays):
            outputs = self._executor.run(list(arrays))
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        if len(arrays) != len(self.input_names):
            raise InputError(
                f"the model takes {len(self.input_names)} input(s) {self.input_names}, "
                f"got {len(arrays)}"
            )
        outputs = list(self.run(dict(zip(self.input_names, arrays))).values())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def report(self) -> str:
        """What the compiler did (node counts, fused groups, kept QDQ pairs)."""
        if callable(self._report):
            self._report = self._report()
        return self._report

    def _as_declared(self, arrays) -> bool:
        """Whether `arrays` are one ndarray per input, each of its declared
        dtype and shape (any size where the dimension is a symbol no other
        dimension names): inputs `_check_inputs` would pass as they are.
        Anything else takes the full checks, which say what is wrong.

        Why: between two runs a model's weights push the interpreter's code
        and data out of the caches, and there each Python operation of a
        run costs several times what it costs warm. With ResNet-18's kernel
        calls stubbed out and 24 MB written between runs, a `run` took
        20-55 us with the full checks and 12-17 us with these (warm: 5-9
        and 3-5 us)."""
        signature = self._static_inputs
        if signature is None or len(arrays) != len(signature):
            return False
        for array, (dtype, dims) in zip(arrays, signature):
            if type(array) is not np.ndarray or array.dtype != dtype or array.ndim != len(dims):
                return False
            for got, want in zip(array.shape, dims):
                if got != want and want is not None:
                    return False
        return True

    def _check_inputs(self, arrays) -> list[np.ndarray]:
        symbols: dict[str, int] = {}
        checked = []
        for value, array in zip(self.graph.inputs, arrays):
            if not isinstance(array, np.ndarray):
                raise InputError(
                    f"input {value.name!r} must be a numpy.ndarray, got {type(array).__name__}"
                )
            expected = value.type
            if array.dtype != expected.dtype.numpy:
                raise InputError(
                    f"input {value.name!r} has dtype {array.dtype}, expected {expected.dtype} "
                    f"(declared type {expected})"
                )
            if expected.shape is not None:
                self._check_shape(value.name, array.shape, expected.shape, symbols)
            checked.append(array)
        return checked

    @staticmethod
    def _check_shape(name, actual, expected, symbols):
        def describe():
            return f"input {name!r} has shape {tuple(actual)}, expected {tuple(expected)}"

        if len(actual) != len(expected):
            raise InputError(describe())
        for got, want in zip(actual, expected):
            if isinstance(want, str):
                if symbols.setdefault(want, got) != got:
                    raise InputError(
                        f"{describe()}: dimension {want!r} is {symbols[want]} in another input"
                    )
            elif got != want:
                raise InputError(describe())


def _static_signature(graph: Graph):
    """((numpy dtype, shape), ...) of the graph's inputs, a symbolic dimension
    None; None where some input's rank is unknown or a symbol names more than
    one dimension (the full checks see that they agree)."""
    signature, symbols = [], []
    for value in graph.inputs:
        shape = value.type.shape
        if shape is None:
            return None
        symbols += [d for d in shape if isinstance(d, str)]
        dims = tuple(None if isinstance(d, str) else d for d in shape)
        signature.append((np.dtype(value.type.dtype.numpy), dims))
    return tuple(signature) if len(set(symbols)) == len(symbols) else None
