"""The IR graph: SSA values, nodes with attributes, graph inputs/outputs, constants.

networkx holds the node-to-node dependence edges and serves the graph
algorithms (topological order, cycle checks); rule authors use only this
module's API (`producer`, `users`, `replace_all_uses`, `add_node`, ...).

Every value has exactly one definition: a graph input, a constant, or one
output of one node. Types are inferred from the op registry when a node is
added, so a graph is always fully typed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
import numpy as np

from . import dtypes
from .types import TensorType


class Value:
    """An SSA value. `const` holds the array when the value is a constant."""

    __slots__ = ("name", "type", "producer", "const")

    def __init__(self, name: str, type: TensorType, producer: Node | None = None, const=None):
        self.name = name
        self.type = type
        self.producer = producer
        self.const = const

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    def __getstate__(self):
        # Without `producer`: the graph that pickles this value restores it
        # (see `Graph.__getstate__`).
        return self.name, self.type, self.const

    def __setstate__(self, state):
        self.name, self.type, self.const = state
        self.producer = None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation. `inputs` may contain None for an omitted optional operand."""

    __slots__ = ("op", "name", "inputs", "outputs", "attrs", "order")

    def __init__(self, op: str, name: str, inputs, outputs, attrs, order: int):
        self.op = op
        self.name = name
        self.inputs: list[Value | None] = list(inputs)
        self.outputs: list[Value] = list(outputs)
        self.attrs: dict[str, Any] = dict(attrs)
        self.order = order  # creation order: makes topological order deterministic

    def input(self, index: int) -> Value | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name!r})"


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self._dag = nx.DiGraph()
        # `nodes`' order, until the DAG or a node's `order` changes: passes ask
        # for it often (ResNet-18's compile: 132 sorts, 20 ms of 0.24 s)
        self._topological: list[Node] | None = None
        self._uses: dict[Value, list[Node]] = {}
        self._values: dict[str, Value] = {}
        self._next_id = 0  # suffixes fresh names and numbers nodes' creation order
        self._node_names: set[str] = set()
        self.metadata: dict[str, Any] = {}

    # ---- pickling -------------------------------------------------------------
    # Flat: values are pickled without their producer and nodes without the
    # DAG, both rebuilt from the node list. Following the producer -> inputs
    # links recursed once per node along the longest path and overflowed
    # Python's stack past ~300 nodes in a chain.

    def __getstate__(self):
        state = {
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "values": list(self._values.values()),
            "nodes": sorted(self._dag.nodes, key=lambda node: node.order),
            "next_id": self._next_id,
            "node_names": self._node_names,
            # Keys starting with "_" are caches kept beside the graph (a fused
            # body's reference executor): rebuilt when needed, not pickled.
            "metadata": {k: v for k, v in self.metadata.items() if not k.startswith("_")},
        }
        return state

    def __setstate__(self, state):
        self.__init__(state["name"])
        self.inputs = state["inputs"]
        self.outputs = state["outputs"]
        self._next_id = state["next_id"]
        self._node_names = state["node_names"]
        self.metadata = state["metadata"]
        for value in state["values"]:
            self._register(value)
        for node in state["nodes"]:
            for value in node.outputs:
                value.producer = node
        for node in state["nodes"]:
            self._dag.add_node(node)
            for value in node.inputs:
                if value is not None:
                    self._use(value, node)

    # ---- construction -------------------------------------------------------

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _fresh_name(self, hint: str) -> str:
        name = hint or "v"
        while name in self._values:
            name = f"{hint or 'v'}_{self._take_id()}"
        return name

    def _fresh_node_name(self, hint: str) -> str:
        name = hint
        while name in self._node_names:
            name = f"{hint}_{self._take_id()}"
        self._node_names.add(name)
        return name

    def _register(self, value: Value) -> Value:
        self._values[value.name] = value
        self._uses[value] = []
        return value

    def add_input(self, name: str, type: TensorType) -> Value:
        if name in self._values:
            raise ValueError(f"value name {name!r} is already defined")
        value = self._register(Value(name, type))
        self.inputs.append(value)
        return value

    def constant(self, array, name: str = "const") -> Value:
        array = np.asarray(array)
        array = array.copy() if array.flags.writeable else array
        array.flags.writeable = False
        type = TensorType(dtypes.from_numpy(array.dtype), array.shape)
        return self._register(Value(self._fresh_name(name), type, const=array))

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict | None = None,
        *,
        name: str = "",
        output_names: Sequence[str] | None = None,
        output_types: Sequence[TensorType] | None = None,
    ) -> Node:
        """Add a node, inferring its output types from the op registry.

        `output_types` skips inference (used when a pass knows the exact type,
        e.g. a rewritten node that must keep its predecessor's quantization).
        """
        from .ops import infer_types

        attrs = dict(attrs or {})
        node_name = self._fresh_node_name(name or op)
        if output_types is None:
            output_types = infer_types(op, node_name, inputs, attrs)
        node = Node(op, node_name, inputs, [], attrs, self._take_id())
        names = list(output_names or [])
        for index, type in enumerate(output_types):
            default = node_name if len(output_types) == 1 else f"{node_name}_{index}"
            hint = names[index] if index < len(names) and names[index] else default
            value = Value(self._fresh_name(hint), type, producer=node)
            node.outputs.append(self._register(value))
        self._dag.add_node(node)
        self._topological = None
        for value in inputs:
            if value is not None:
                self._use(value, node)
        return node

    def _use(self, value: Value, node: Node):
        if value not in self._uses:
            raise ValueError(f"{node.name}: input {value.name!r} is not a value of this graph")
        self._uses[value].append(node)
        if value.producer is not None:
            self._dag.add_edge(value.producer, node)
            self._topological = None

    def rename(self, value: Value, name: str):
        if name in self._values and self._values[name] is not value:
            raise ValueError(f"value name {name!r} is already defined")
        del self._values[value.name]
        value.name = name
        self._values[name] = value

    def set_outputs(self, values: Iterable[Value]):
        self.outputs = list(values)

    # ---- queries ------------------------------------------------------------

    def value(self, name: str) -> Value:
        return self._values[name]

    def has_value(self, name: str) -> bool:
        return name in self._values

    def producer(self, value: Value) -> Node | None:
        return value.producer

    def users(self, value: Value) -> list[Node]:
        """Nodes that read `value`, each once, in creation order."""
        return sorted(set(self._uses.get(value, ())), key=lambda n: n.order)

    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    @property
    def nodes(self) -> list[Node]:
        """Nodes in a deterministic topological order (by creation order, or
        the order `place` gave, among the ready ones)."""
        if self._topological is None:
            order = nx.lexicographical_topological_sort(self._dag, key=lambda n: n.order)
            self._topological = list(order)
        return list(self._topological)

    def place(self, node: Node, order: int) -> None:
        """Sort `node` as if created at `order` (among the nodes ready at once)."""
        node.order = order
        self._topological = None

    def contains(self, node: Node) -> bool:
        return self._dag.has_node(node)

    def __len__(self) -> int:
        return self._dag.number_of_nodes()

    @property
    def constants(self) -> list[Value]:
        used = {v for n in self._dag.nodes for v in n.inputs if v is not None}
        used.update(self.outputs)
        return sorted((v for v in used if v.is_constant), key=lambda v: v.name)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self._dag.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))

    # ---- rewriting ----------------------------------------------------------

    def set_input(self, node: Node, index: int, value: Value | None):
        old = node.inputs[index]
        node.inputs[index] = value
        if old is not None:
            self._uses[old].remove(node)
            if old.producer is not None and old.producer not in {
                v.producer for v in node.inputs if v is not None
            }:
                self._dag.remove_edge(old.producer, node)
                self._topological = None
        if value is not None:
            self._use(value, node)

    def replace_all_uses(self, old: Value, new: Value):
        """Make every reader of `old` (graph outputs included) read `new`."""
        for node in self.users(old):
            for index, value in enumerate(node.inputs):
                if value is old:
                    self.set_input(node, index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node):
        """Remove a node whose outputs nobody reads."""
        for value in node.outputs:
            if self._uses[value] or self.is_output(value):
                raise ValueError(f"cannot remove {node.name}: {value.name} is still used")
        for index in range(len(node.inputs)):
            self.set_input(node, index, None)
        for value in node.outputs:
            del self._uses[value]
            del self._values[value.name]
        self._dag.remove_node(node)
        self._topological = None
        self._node_names.discard(node.name)

    def dead_code_elimination(self) -> bool:
        """Remove nodes that no graph output depends on. Returns whether it changed."""
        live: set[Node] = set()
        stack = [v.producer for v in self.outputs if v.producer is not None]
        while stack:
            node = stack.pop()
            if node in live:
                continue
            live.add(node)
            stack.extend(v.producer for v in node.inputs if v is not None and v.producer)
        dead = [n for n in self.nodes if n not in live]
        for node in reversed(dead):
            self.remove_node(node)
        return bool(dead)

    def has_cycle(self) -> bool:
        return not nx.is_directed_acyclic_graph(self._dag)

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)
