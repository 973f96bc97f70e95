"""Fold ONNX BatchNormalization, Mul, Add and Sub by constants into the Conv, ConvTranspose, Gemm or
MatMul before them.

The algebra is the TF passes' (passes/folding.py): y * s + t folds into W * s along the output channels
and b * s + t. What differs is where an ONNX op keeps its bias: Conv and ConvTranspose take it as input
2, Gemm as C (scaled by beta, so C' = (beta * C) * s + t is written with beta = 1), and MatMul has none,
so its bias is an Add of a constant after it, or a new Add when the fold creates one. The folded node
(BN, Mul, Add, Sub) is removed and the op chain's output takes its tensor name, so graph outputs and
consumers keep their names.

Rules shared with TF: one consumer, not a graph output; BN in inference mode (training_mode=0) with
finite statistics and var + eps > 0; constants that are scalars or vary only along the channel axis
(axis 1 for Conv outputs, so a per-channel constant is [C, 1, 1] or [1, C, 1, 1], never a bare [C]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_ir.ir import Node, Value
from passes.common import PassContext, Skip, per_channel_vector, require_finite, require_single_use
from passes.folding import FLOAT_DTYPES, FoldError, bn_scale_shift, fold_bias, scale_weight
from passes.resolve import NotConstant
from passes.table import OnnxSemantics, onnx_semantics

ANCHOR_OPS = ("BatchNormalization", "Mul", "Add", "Sub")


@dataclass
class OnnxProducer:
    op: Node
    sem: OnnxSemantics
    # For MatMul: an Add of a constant right after it, which is its bias.
    bias_node: Node | None = None
    bias_const_input: int | None = None

    @property
    def last(self) -> Node:
        return self.bias_node or self.op

    @property
    def names(self) -> list[str]:
        return [self.op.name] + ([self.bias_node.name] if self.bias_node else [])

    @property
    def prefix(self) -> str:
        return f"{self.op.op}+Add" if self.bias_node else self.op.op


def _is_default_domain(node: Node) -> bool:
    return node.extra.get("domain", "") in ("", "ai.onnx")


def _producer(ctx: PassContext, value: Value | None) -> OnnxProducer | None:
    """Return the table op behind `value`, through a MatMul's bias Add; None when there is none."""
    if value is None or value.producer is None:
        return None
    node = value.producer
    sem = onnx_semantics(node)
    if sem is not None:
        return OnnxProducer(node, sem)
    if node.op == "Add" and _is_default_domain(node):
        for i in (0, 1):
            data = node.inputs[i]
            if data is not None and data.producer is not None and data.producer.op == "MatMul" \
                    and onnx_semantics(data.producer) is not None \
                    and ctx.resolver.try_resolve(node.inputs[1 - i]) is not None:
                return OnnxProducer(data.producer, onnx_semantics(data.producer), node, 1 - i)
    return None


def run(ctx: PassContext) -> bool:
    changed = False
    for node in list(ctx.graph.nodes):
        if node.graph is None or node.dialect != "onnx" or node.op not in ANCHOR_OPS or not _is_default_domain(node):
            continue
        found = _match(ctx, node)
        if found is None:
            continue
        prod, const_value = found
        kind = {"BatchNormalization": "BatchNorm", "Mul": "Mul"}.get(node.op, "Add")
        pattern = f"{prod.prefix}+{kind}" if prod is not None else f"{node.inputs[0].producer.op}+BatchNorm"
        nodes = (prod.names if prod is not None else []) + [node.name]
        try:
            if prod is None:
                source = node.inputs[0].producer
                raise Skip(f"{node.name} input comes from {source.op} node {source.name}, not an op fusion-ir "
                           f"folds into")
            ctx.check_allowed("conv-bn" if kind == "BatchNorm" else "mul-add", nodes)
            _fold(ctx, node, prod, const_value)
        except Skip as reason:
            ctx.report.skipped(pattern, node.name, nodes, str(reason))
            continue
        ctx.report.fused(pattern, node.name, nodes)
        changed = True
    return changed


def _match(ctx: PassContext, node: Node):
    """Return (producer or None, constant-side input) when `node` is a candidate, else None."""
    if node.op == "BatchNormalization":
        if node.inputs[0] is None or node.inputs[0].producer is None:
            return None
        return _producer(ctx, node.inputs[0]), None
    for i in (0, 1):
        prod = _producer(ctx, node.inputs[i])
        if prod is None:
            continue
        other = node.inputs[1 - i]
        if node.op == "Add" and prod.bias_node is None and prod.op.op == "MatMul":
            return None  # MatMul's own bias
        if node.op != "Mul" and ctx.resolver.try_resolve(other) is None:
            return None  # a residual connection or other sum of activations
        if node.op == "Sub" and i == 1:
            return prod, ("reversed", other)
        return prod, other
    return None


def _output_rank(prod: OnnxProducer, weight: np.ndarray) -> int | None:
    if prod.op.op in ("Conv", "ConvTranspose"):
        return weight.ndim
    if prod.op.op == "Gemm":
        return 2
    shape = prod.op.inputs[0].shape if prod.op.inputs[0] is not None else None
    return len(shape) if shape is not None else None


def _fold(ctx: PassContext, anchor: Node, prod: OnnxProducer, const_value) -> None:
    graph = ctx.graph
    op = prod.op
    try:
        weight = ctx.resolver.resolve(op.inputs[prod.sem.weight_input])
    except NotConstant as err:
        raise Skip(f"the weight of {op.name} is not constant: {err}") from None
    if weight.dtype.name not in FLOAT_DTYPES:
        raise Skip(f"the weight of {op.name} is {weight.dtype}, not a floating-point type")
    if op.op in ("MatMul", "Gemm") and weight.ndim != 2:
        raise Skip(f"the weight of {op.name} has {weight.ndim} dimensions; only a 2-D matrix folds")
    view, axes = prod.sem.layout(tuple(weight.shape), op)
    dims = view if view is not None else weight.shape
    channels = int(np.prod([dims[a] for a in axes]))
    rank = _output_rank(prod, weight)
    if not prod.sem.channels_last:
        channel_axis = 1
    elif rank is not None:
        channel_axis = rank - 1
    else:
        channel_axis = -1

    if anchor.op == "BatchNormalization":
        scale, shift = _bn(ctx, anchor, rank, channel_axis, channels)
    else:
        scale, shift = _arithmetic(ctx, anchor, const_value, rank, channel_axis, channels)
    require_single_use(graph, op.outputs[0], op.name)
    if prod.bias_node is not None:
        require_single_use(graph, prod.bias_node.outputs[0], prod.bias_node.name)

    bias = _current_bias(ctx, prod, channels)
    try:
        new_weight = scale_weight(weight, scale, axes, view)
        new_bias = fold_bias(bias, scale, shift, weight.dtype)
    except FoldError as err:
        raise Skip(f"folding into {op.name}: {err}") from None
    _rewrite(ctx, anchor, prod, new_weight, new_bias, bias is not None or np.any(shift))


def _bn(ctx: PassContext, bn: Node, rank, channel_axis: int, channels: int):
    if int(bn.attrs.get("training_mode", 0)):
        raise Skip(f"{bn.name} is in training mode (training_mode=1), so it normalizes with batch statistics")
    if int(bn.attrs.get("spatial", 1)) == 0:
        raise Skip(f"{bn.name} has spatial=0 (statistics per element, opset 7 and older), not per channel")
    for index, value in enumerate(bn.outputs[1:], start=1):
        if value.name and (value.num_uses or ctx.graph.is_output(value)):
            raise Skip(f"{bn.name} output {index} ({value.name}) is used, and it would disappear with the BN")
    if rank is None or rank < 2 or channel_axis != 1:
        raise Skip(f"{bn.name} normalizes axis 1, which is not the channel axis of its producer's output")
    labels = ("scale", "B", "input_mean", "input_var")
    params = []
    for value, label in zip(bn.inputs[1:5], labels):
        try:
            array = ctx.resolver.resolve(value)
        except NotConstant as err:
            raise Skip(f"the {label} of {bn.name} is not constant: {err}") from None
        if array.shape != (channels,):
            raise Skip(f"the {label} of {bn.name} has shape {list(array.shape)}, expected [{channels}]")
        require_finite(label, array, bn.name)
        params.append(array)
    epsilon = float(bn.attrs.get("epsilon", 1e-5))
    if not (np.asarray(params[3], dtype=np.float64) + epsilon > 0).all():
        raise Skip(f"{bn.name} has variance + epsilon <= 0 for some channel")
    return bn_scale_shift(*params, epsilon)


def _arithmetic(ctx: PassContext, anchor: Node, const_value, rank, channel_axis: int, channels: int):
    reversed_sub = isinstance(const_value, tuple)
    value = const_value[1] if reversed_sub else const_value
    try:
        constant = ctx.resolver.resolve(value)
    except NotConstant as err:
        raise Skip(f"the other input of {anchor.op} {anchor.name} is not constant: {err}") from None
    if constant.dtype.kind != "f":
        raise Skip(f"the constant of {anchor.name} is {constant.dtype}, not a floating-point type")
    scalar = constant.size == 1
    if ctx.mode == "qat" and not (scalar and anchor.op == "Mul"):
        raise Skip(f"{anchor.name} is per-channel arithmetic or an added constant; qat mode folds only scalar Mul")
    if rank is None:
        if constant.ndim > 1:
            raise Skip(f"the output rank of {anchor.name}'s producer is unknown, so a {constant.ndim}-D constant "
                       f"may broadcast it to more dimensions")
        rank = 1
        channel_axis = 0
    vector = per_channel_vector(constant, rank, channel_axis, channels, f"the constant of {anchor.name}")
    require_finite("constant", vector, anchor.name)
    vector = np.asarray(vector, dtype=np.float64) * np.ones(channels)
    ones = np.ones(channels)
    if anchor.op == "Mul":
        return vector, np.zeros(channels)
    if anchor.op == "Sub":
        return (-ones, vector) if reversed_sub else (ones, -vector)
    return ones, vector


def _current_bias(ctx: PassContext, prod: OnnxProducer, channels: int) -> np.ndarray | None:
    """Return the effective bias vector the producer chain adds now (None when it adds none)."""
    op = prod.op
    if prod.bias_node is not None:
        array = ctx.resolver.resolve(prod.bias_node.inputs[prod.bias_const_input])
        return per_channel_vector(array, max(array.ndim, 1), max(array.ndim, 1) - 1, channels,
                                  f"the bias added by {prod.bias_node.name}") * np.ones(channels)
    index = prod.sem.bias_input
    if index is None or index >= len(op.inputs) or op.inputs[index] is None:
        return None
    try:
        array = ctx.resolver.resolve(op.inputs[index])
    except NotConstant as err:
        raise Skip(f"the bias of {op.name} is not constant: {err}") from None
    if op.op == "Gemm":
        if array.ndim > 2 or (array.ndim == 2 and array.shape[0] != 1):
            raise Skip(f"the C input of {op.name} has shape {list(array.shape)}, which varies along rows")
        beta = float(op.attrs.get("beta", 1.0))
        return np.broadcast_to(np.asarray(array, dtype=np.float64).reshape(-1), (channels,)) * beta
    return np.asarray(array, dtype=np.float64).reshape(-1)


def _rewrite(ctx: PassContext, anchor: Node, prod: OnnxProducer, new_weight, new_bias, needs_bias: bool) -> None:
    graph = ctx.graph
    op = prod.op
    old_weight = op.inputs[prod.sem.weight_input]
    weight_value = graph.add_constant(graph.unique_name(f"{op.name}_folded_weight"), new_weight)
    graph.set_input(op, prod.sem.weight_input, weight_value)
    ctx.resolver.forget(old_weight)
    last = prod.last
    if needs_bias:
        bias_value = graph.add_constant(graph.unique_name(f"{op.name}_folded_bias"), new_bias)
        if prod.bias_node is not None:
            graph.set_input(prod.bias_node, prod.bias_const_input, bias_value)
        elif prod.sem.bias_input is not None:
            while len(op.inputs) <= prod.sem.bias_input:
                op.inputs.append(None)
            graph.set_input(op, prod.sem.bias_input, bias_value)
            if op.op == "Gemm":
                op.attrs["beta"] = 1.0
        else:
            position = graph.nodes.index(op) + 1
            last = graph.add_node("Add", graph.unique_name(f"{anchor.name}_bias"), [op.outputs[0], bias_value],
                                  index=position)
            for user, index in op.outputs[0].uses():
                if user is not last:
                    graph.set_input(user, index, last.outputs[0])
    new_output = last.outputs[0]
    old_output = anchor.outputs[0]
    name = old_output.name
    graph.replace_all_uses(old_output, new_output)
    graph.remove_node(anchor)
    new_output.name = name
