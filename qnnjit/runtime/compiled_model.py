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

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named inputs; returns {output name: array}."""
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
