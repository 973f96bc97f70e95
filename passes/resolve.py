"""Lazy constant resolution: compute a value in numpy only when a fold requests it.

TF2-frozen graphs read every weight through Identity (the former ReadVariableOp), and Keras 3 adds
Reshape and Squeeze chains between a variable and its use. `ConstResolver.resolve` walks back through
such shape-only ops, casts and elementwise arithmetic whose inputs all resolve, and computes the result
without writing anything into the graph.
"""

from __future__ import annotations

import numpy as np

from fusion_ir.ir import Value

# Ops that forward input 0 unchanged.
_FORWARD = {"Identity", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics", "EnsureShape"}

_BINARY = {
    "Add": np.add, "AddV2": np.add, "Sub": np.subtract, "Mul": np.multiply, "RealDiv": np.divide,
    "Div": np.divide, "Maximum": np.maximum, "Minimum": np.minimum, "Pow": np.power,
}
_UNARY = {
    "Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Inv": np.reciprocal,
    "Square": np.square, "Abs": np.abs, "Exp": np.exp, "Log": np.log,
}

# Ops never run by the TensorFlow fallback: graph inputs, and ops whose value is not a function of their inputs.
_NEVER_EVALUATE = {"Placeholder", "PlaceholderV2", "PlaceholderWithDefault", "VarHandleOp", "ReadVariableOp",
                   "Enter", "Exit", "Merge", "Switch", "NextIteration", "LoopCond"}

# Elementwise results larger than this many elements are not computed: resolution is for weights and
# per-channel parameters, and a broadcast that large points at an activation, not a constant.
MAX_ELEMENTS = 1 << 28


# Constant subgraphs feeding a weight are a few ops deep; a longer chain is an activation path, and
# stopping there keeps resolution of an activation from walking the whole network.
MAX_DEPTH = 32


_evaluable_ops: dict[str, bool] = {}


def _evaluable(op: str) -> bool:
    """Return whether the TensorFlow fallback may run `op`: registered, stateless, a function of its inputs."""
    known = _evaluable_ops.get(op)
    if known is None:
        from fusion_ir.tfimport import import_tensorflow

        import_tensorflow()
        from tensorflow.python.framework import op_def_registry

        op_def = op_def_registry.get(op)
        known = op_def is not None and not op_def.is_stateful and op not in _NEVER_EVALUATE
        _evaluable_ops[op] = known
    return known


class NotConstant(Exception):
    """The value does not resolve to a constant; the message names the value and the reason."""


class ConstResolver:
    """Resolve values to numpy arrays, caching each result for the life of one pass run."""

    def __init__(self, graph_inputs: set[int] | None = None):
        # ids of values fed by the caller: never constant, even when a constant op produces them.
        self.graph_inputs = graph_inputs or set()
        # id(value) -> array, or the NotConstant raised for it, so no value is walked twice.
        self._cache: dict[int, np.ndarray | NotConstant] = {}
        self._depth = 0

    def resolve(self, value: Value) -> np.ndarray:
        """Return the value's array, or raise NotConstant naming the op that is not constant."""
        cached = self._cache.get(id(value))
        if isinstance(cached, NotConstant):
            raise cached
        if cached is not None:
            return cached
        if self._depth >= MAX_DEPTH:
            raise NotConstant(f"{value.name} is more than {MAX_DEPTH} ops away from any constant")
        self._depth += 1
        try:
            array = self._compute(value)
        except NotConstant as err:
            self._cache[id(value)] = err
            raise
        finally:
            self._depth -= 1
        self._cache[id(value)] = array
        return array

    def forget(self, value: Value) -> None:
        """Drop cached arrays along a chain that lost its last use, so a folded weight's original
        array can be freed before the round ends."""
        while value is not None and value.num_uses == 0:
            self._cache.pop(id(value), None)
            if value.is_const:
                value.release()
                return
            node = value.producer
            if node is None or node.op not in _FORWARD or any(v.num_uses for v in node.outputs):
                return
            value = node.inputs[0]

    def try_resolve(self, value: Value) -> np.ndarray | None:
        try:
            return self.resolve(value)
        except NotConstant:
            return None

    def _compute(self, value: Value) -> np.ndarray:
        if value.is_const:
            return value.const
        if self.graph_inputs and id(value) in self.graph_inputs:
            raise NotConstant(f"{value.name} is a graph input, not a constant")
        node = value.producer
        if node is None:
            raise NotConstant(f"{value.name} is a graph input, not a constant")
        op = node.op
        if node.dialect == "tf":
            if op in _FORWARD or (op == "IdentityN"):
                source = node.inputs[value.index if op == "IdentityN" else 0]
                return self.resolve(source)
            if op == "Reshape":
                return self._reshape(self.resolve(node.inputs[0]), self.resolve(node.inputs[1]))
            if op == "Squeeze":
                axes = node.attrs.get("squeeze_dims", [])
                return np.squeeze(self.resolve(node.inputs[0]), axis=tuple(axes) if axes else None)
            if op == "ExpandDims":
                return np.expand_dims(self.resolve(node.inputs[0]), int(self.resolve(node.inputs[1])))
            if op == "Cast":
                dst = node.attrs.get("DstT")
                if not isinstance(dst, np.dtype):
                    raise NotConstant(f"{node.name} casts to a type numpy cannot represent")
                return self.resolve(node.inputs[0]).astype(dst)
            if op == "Transpose":
                perm = self.resolve(node.inputs[1])
                return np.transpose(self.resolve(node.inputs[0]), tuple(int(p) for p in perm))
            if op == "Rsqrt":
                return self._elementwise(np.reciprocal, np.sqrt(self.resolve(node.inputs[0])))
            if op in _UNARY:
                return self._elementwise(_UNARY[op], self.resolve(node.inputs[0]))
            if op in _BINARY:
                a, b = (self.resolve(v) for v in node.inputs[:2])
                return self._binary(_BINARY[op], a, b, node.name)
            return self._evaluate_in_tf(value)
        raise NotConstant(f"{value.name} comes from {op} node {node.name}, which is not constant")

    def _evaluate_in_tf(self, value: Value) -> np.ndarray:
        """Fallback for ops numpy does not cover: run the node in TensorFlow when all its inputs are
        constants and its op is registered and stateless."""
        from converters.tf_graphdef import evaluate_node

        node = value.producer
        if not _evaluable(node.op) or not node.inputs:
            raise NotConstant(f"{value.name} comes from {node.op} node {node.name}, which is not constant")
        arrays = [self.resolve(v) for v in node.inputs]
        if sum(a.size for a in arrays) > MAX_ELEMENTS:
            raise NotConstant(f"the inputs of {node.name} are too large to evaluate as constants")
        try:
            result = evaluate_node(node, arrays, value.index)
        except ValueError as err:
            raise NotConstant(f"TensorFlow could not evaluate {node.op} node {node.name}: {err}") from None
        if result.size > max(MAX_ELEMENTS // 16, sum(a.size for a in arrays)):
            raise NotConstant(f"{node.name} would produce {result.size} elements, too large to treat as a constant")
        return result

    @staticmethod
    def _reshape(array: np.ndarray, shape: np.ndarray) -> np.ndarray:
        return array.reshape(tuple(int(d) for d in np.asarray(shape).reshape(-1)))

    @staticmethod
    def _elementwise(fn, array: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(fn(array), dtype=array.dtype)

    @staticmethod
    def _binary(fn, a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
        shape = np.broadcast_shapes(a.shape, b.shape)
        if int(np.prod(shape)) > MAX_ELEMENTS:
            raise NotConstant(f"{name} would broadcast to {shape}, too large to treat as a constant")
        with np.errstate(all="ignore"):
            result = fn(a, b)
        return np.asarray(result, dtype=np.result_type(a.dtype, b.dtype))
