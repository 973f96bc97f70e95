"""A small graph IR shared by the TensorFlow and ONNX converters and the fusion passes.

Values carry the use-def links: a value records its producer (node and output index) and its uses
(node and input index). Constants live on values, not on nodes. Every change to an edge goes
through `Graph.set_input` (or the helpers built on it) so both ends of a link stay in sync.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np


class IRError(Exception):
    """Raised when a graph operation would break the IR's invariants."""


@dataclass(frozen=True)
class Opaque:
    """An attribute or graph field the IR does not model, written back unchanged."""

    payload: Any


class Value:
    """A tensor: the output of a node, a graph input, or a constant."""

    __slots__ = ("name", "dtype", "shape", "producer", "index", "_uses", "_const", "_const_loader",
                 "origin", "const_changed")

    def __init__(self, name: str, dtype: np.dtype | None = None, shape: tuple | None = None,
                 const: np.ndarray | None = None, const_loader: Callable[[], np.ndarray] | None = None):
        self.name = name
        self.dtype = dtype
        # Partial shapes use None for an unknown dimension; None itself means unknown rank.
        self.shape = shape
        self.producer: Node | None = None
        self.index = 0
        self._uses: list[tuple[Node, int]] = []
        self._const = const
        self._const_loader = const_loader
        # The source-format record the value came from (a TF Const NodeDef, an ONNX initializer),
        # reused on export while `const_changed` is False.
        self.origin: Any = None
        self.const_changed = False

    def __repr__(self) -> str:
        return f"Value({self.name!r})"

    @property
    def is_const(self) -> bool:
        """True for a constant, whether or not its array has been decoded yet."""
        return self._const is not None or self._const_loader is not None

    @property
    def const(self) -> np.ndarray | None:
        """The constant's array, decoded on first access; None when the value is not a constant."""
        if self._const is None and self._const_loader is not None:
            self._const = self._const_loader()
        return self._const

    def release(self) -> None:
        """Drop the decoded array of an unchanged constant; the next access decodes it again."""
        if self._const_loader is not None and not self.const_changed:
            self._const = None

    @const.setter
    def const(self, array: np.ndarray) -> None:
        self._const = array
        self._const_loader = None
        self.const_changed = True
        self.dtype = array.dtype
        self.shape = tuple(array.shape)

    def uses(self) -> list[tuple["Node", int]]:
        """Return a snapshot of (node, input index) pairs, safe to iterate while rewiring."""
        return list(self._uses)

    @property
    def num_uses(self) -> int:
        return len(self._uses)


class Node:
    """An operation in one dialect ("tf" or "onnx")."""

    def __init__(self, op: str, name: str, dialect: str, attrs: dict[str, Any] | None = None):
        self.op = op
        self.name = name
        self.dialect = dialect
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        # Names of nodes this node must run after (TF control inputs, written "^name").
        self.control_inputs: list[str] = []
        # Format-specific fields the IR keeps for the way back (TF device, experimental debug info).
        self.extra: dict[str, Any] = {}
        self.graph: Graph | None = None

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.name!r})"

    def output(self, index: int = 0) -> Value:
        """Return output `index`, creating the value on first request.

        A TF NodeDef does not record how many outputs its op has, so outputs appear as they are used.
        """
        while len(self.outputs) <= index:
            i = len(self.outputs)
            value = Value(self.graph.output_name(self, i) if self.graph else f"{self.name}:{i}")
            if self.graph is not None and self.dialect == "onnx":
                self.graph.value_names.add(value.name)
            value.producer = self
            value.index = i
            self.outputs.append(value)
        return self.outputs[index]


@dataclass
class Graph:
    """Ordered nodes, graph inputs and outputs, and what the source format carries beyond them."""

    dialect: str
    nodes: list[Node] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    # Constant values not produced by any node, by name.
    constants: dict[str, Value] = field(default_factory=dict)
    # Source-format fields outside the IR's model: TF versions and library, ONNX opsets and metadata.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name: dict[str, Node] = {}
        self._counter = itertools.count()
        # ONNX tensor names in use (node outputs and graph inputs); converters add the names they read.
        self.value_names: set[str] = set()

    # -- naming -----------------------------------------------------------------------------------

    def output_name(self, node: Node, index: int) -> str:
        if self.dialect == "tf":
            return f"{node.name}:{index}"
        # ONNX tensor names are independent of node names, so a new one must avoid every existing name.
        base = f"{node.name}_out{index}"
        name = base
        while name in self.value_names or name in self.constants:
            name = f"{base}_{next(self._counter)}"
        return name

    def node(self, name: str) -> Node | None:
        return self._by_name.get(name)

    def unique_name(self, base: str) -> str:
        """Return `base`, or `base_N`, so that no node or constant has that name yet."""
        name = base
        while (name in self._by_name or name in self.constants or self._const_key(name) in self.constants
               or name in self.value_names):
            name = f"{base}_{next(self._counter)}"
        return name

    def _const_key(self, node_name: str) -> str:
        return f"{node_name}:0" if self.dialect == "tf" else node_name

    # -- building ---------------------------------------------------------------------------------

    def add_node(self, op: str, name: str, inputs: Iterable[Value | None] = (), attrs: dict | None = None,
                 num_outputs: int = 1, index: int | None = None) -> Node:
        """Create a node, link its inputs, and insert it at `index` (default: the end)."""
        if name in self._by_name:
            raise IRError(f"a node named {name!r} already exists")
        node = Node(op, name, self.dialect, attrs)
        node.graph = self
        for value in inputs:
            node.inputs.append(None)
            self.set_input(node, len(node.inputs) - 1, value)
        for i in range(num_outputs):
            node.output(i)
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        self._by_name[name] = node
        return node

    def add_constant(self, name: str, array: np.ndarray) -> Value:
        """Add a constant value named `name` (a node name in TF, which writes it as a Const node)."""
        key = self._const_key(name)
        if key in self.constants or name in self._by_name:
            raise IRError(f"a constant or node named {name!r} already exists")
        value = Value(key, array.dtype, tuple(array.shape), const=array)
        value.const_changed = True
        self.constants[key] = value
        return value

    # -- rewiring ---------------------------------------------------------------------------------

    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        """Point input `index` of `node` at `value`, updating the uses of the old and new value."""
        old = node.inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.remove((node, index))
        node.inputs[index] = value
        if value is not None:
            value._uses.append((node, index))

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Rewire every consumer of `old`, and every graph output naming it, to `new`."""
        for node, index in old.uses():
            self.set_input(node, index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Unlink and drop `node`; raise IRError when one of its outputs is still used."""
        for value in node.outputs:
            if value._uses:
                user, _ = value._uses[0]
                raise IRError(f"cannot remove {node.name!r}: its output {value.name!r} is used by {user.name!r}")
            if any(v is value for v in self.outputs):
                raise IRError(f"cannot remove {node.name!r}: its output {value.name!r} is a graph output")
        for i in range(len(node.inputs)):
            self.set_input(node, i, None)
        self.nodes.remove(node)
        del self._by_name[node.name]
        node.graph = None

    def rename_node(self, node: Node, name: str) -> None:
        """Rename `node`; in TF its output values follow, because a tensor name is "node:index"."""
        if name in self._by_name:
            raise IRError(f"a node named {name!r} already exists")
        old = node.name
        del self._by_name[old]
        node.name = name
        self._by_name[name] = node
        if self.dialect == "tf":
            for i, value in enumerate(node.outputs):
                value.name = f"{name}:{i}"
            for other in self.nodes:
                if old in other.control_inputs:
                    other.control_inputs = [name if dep == old else dep for dep in other.control_inputs]

    # -- queries ----------------------------------------------------------------------------------

    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def control_targets(self) -> set[str]:
        return {name for node in self.nodes for name in node.control_inputs}

    def iter_values(self) -> Iterator[Value]:
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.outputs

    def toposort(self) -> list[Node]:
        """Return the nodes in an order where producers (data and control) come first.

        Keeps the current order where it already satisfies that, so a round trip does not reorder.
        Raises IRError on a cycle; TF while loops written with NextIteration are the exception and
        are broken at their NextIteration edge.
        """
        position = {id(n): i for i, n in enumerate(self.nodes)}
        deps: dict[int, list[Node]] = {}
        for node in self.nodes:
            preds = []
            if node.op not in ("Merge", "RefMerge"):
                for value in node.inputs:
                    if value is not None and value.producer is not None:
                        preds.append(value.producer)
            for name in node.control_inputs:
                dep = self._by_name.get(name)
                if dep is not None:
                    preds.append(dep)
            deps[id(node)] = preds
        order: list[Node] = []
        state: dict[int, int] = {}
        for root in self.nodes:
            if id(root) in state:
                continue
            stack = [(root, iter(sorted(deps[id(root)], key=lambda n: position[id(n)])))]
            state[id(root)] = 1
            while stack:
                node, it = stack[-1]
                advanced = False
                for pred in it:
                    s = state.get(id(pred))
                    if s is None:
                        state[id(pred)] = 1
                        stack.append((pred, iter(sorted(deps[id(pred)], key=lambda n: position[id(n)]))))
                        advanced = True
                        break
                    if s == 1:
                        raise IRError(f"the graph has a cycle through {pred.name!r}")
                if not advanced:
                    stack.pop()
                    state[id(node)] = 2
                    order.append(node)
        return order

    def validate(self) -> list[str]:
        """Return a list of problems: dangling references and use lists out of sync with inputs."""
        problems = []
        live = {id(n) for n in self.nodes}
        consts = {id(v) for v in self.constants.values()}
        graph_inputs = {id(v) for v in self.inputs}
        for node in self.nodes:
            for i, value in enumerate(node.inputs):
                if value is None:
                    # ONNX writes an omitted optional input as an empty name; TF has no such input.
                    if node.dialect != "onnx":
                        problems.append(f"{node.name} input {i} is not connected")
                    continue
                if (node, i) not in value._uses:
                    problems.append(f"{node.name} input {i} ({value.name}) is missing from that value's uses")
                if value.producer is None:
                    if id(value) not in consts and id(value) not in graph_inputs:
                        problems.append(f"{node.name} input {i} ({value.name}) has no producer")
                elif id(value.producer) not in live:
                    problems.append(f"{node.name} input {i} ({value.name}) comes from removed node "
                                    f"{value.producer.name}")
            for name in node.control_inputs:
                if name not in self._by_name and self._const_key(name) not in self.constants:
                    problems.append(f"{node.name} has a control input on missing node {name}")
            for value in node.outputs:
                for user, i in value._uses:
                    if id(user) not in live:
                        problems.append(f"{value.name} is used by removed node {user.name}")
                    elif user.inputs[i] is not value:
                        problems.append(f"{value.name} lists a use by {user.name} input {i} that is not there")
        for value in self.outputs:
            if value.producer is not None and id(value.producer) not in live:
                problems.append(f"graph output {value.name} comes from removed node {value.producer.name}")
            if value.producer is None and id(value) not in consts and id(value) not in graph_inputs:
                problems.append(f"graph output {value.name} has no producer")
        return problems

    def remove_dead(self, removable: Callable[[Node], bool]) -> int:
        """Remove nodes whose outputs lost all their uses, repeatedly; `removable` vetoes stateful ops.

        Only nodes and constants that had uses at import can go (`meta["keep_nodes"]` and
        `meta["keep_constants"]` list the others), so a graph no pass changed keeps every node.
        A control input on a removed node is dropped: ordering after a stateless op whose result
        nothing reads has no effect. Returns the number of nodes removed.
        """
        keep_nodes = self.meta.get("keep_nodes", set())
        removed = 0
        changed = True
        while changed:
            changed = False
            dead = set()
            for node in reversed(list(self.nodes)):
                if not node.outputs or node.name in keep_nodes:
                    continue
                if any(v.num_uses or self.is_output(v) for v in node.outputs):
                    continue
                if not removable(node):
                    continue
                self.remove_node(node)
                dead.add(node.name)
                removed += 1
                changed = True
            if dead:
                for node in self.nodes:
                    if node.control_inputs:
                        node.control_inputs = [n for n in node.control_inputs if n not in dead]
        controlled = self.control_targets()
        keep = self.meta.get("keep_constants", set())
        for key, value in list(self.constants.items()):
            if value.num_uses or self.is_output(value) or key in keep:
                continue
            node_name = key.rsplit(":", 1)[0] if self.dialect == "tf" else key
            if node_name not in controlled:
                del self.constants[key]
        return removed
