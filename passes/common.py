"""Shared parts of the TF fusion passes: the pass context, the checks common to every fold, and the
rewrite that folds a per-channel scale and shift into an op's weight and replaces the folded node by a
BiasAdd.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from fusion_ir.ir import Graph, Node, Value
from fusion_ir.report import Report
from passes.folding import FLOAT_DTYPES, FoldError, fold_bias, scale_weight
from passes.resolve import ConstResolver, NotConstant
from passes.table import CHANNELS_LAST, OpSemantics, semantics


FAMILIES = ("conv-bn", "group-conv", "small-bn", "mul-add")


@dataclass
class PassContext:
    graph: Graph
    report: Report
    mode: str = "ptq"
    resolver: ConstResolver = field(default_factory=ConstResolver)
    # Node-name globs kept out of every fusion (--skip), and fusion families turned off (--disable).
    skip_globs: tuple[str, ...] = ()
    disabled: frozenset[str] = frozenset()

    def check_allowed(self, family: str, nodes: list[str]) -> None:
        """Raise Skip when `family` is disabled or one of `nodes` matches a --skip glob."""
        if family in self.disabled:
            raise Skip(f"the {family} fusion is disabled (--disable {family})")
        for glob in self.skip_globs:
            for name in nodes:
                if fnmatch.fnmatchcase(name, glob):
                    raise Skip(f"{name} matches --skip {glob!r}")


class Skip(Exception):
    """A candidate that must not fold; the message is the reason for the report."""


def consumers(value: Value) -> str:
    return ", ".join(sorted({node.name for node, _ in value.uses()}))


def require_single_use(graph: Graph, value: Value, node_name: str) -> None:
    """Raise Skip unless `value` feeds exactly one input and is not a graph output."""
    if graph.is_output(value):
        raise Skip(f"{node_name} output {value.name} is a graph output, so its unfused value must stay")
    if any(v is value for v in graph.inputs):
        raise Skip(f"{node_name} output {value.name} is a graph input (fed by the caller), so the op before it "
                   f"does not run")
    if value.num_uses != 1:
        raise Skip(f"{node_name} output has {value.num_uses} consumers ({consumers(value)}); "
                   f"folding would change what the others read")


def resolve(ctx: PassContext, value: Value, what: str) -> np.ndarray:
    try:
        return ctx.resolver.resolve(value)
    except NotConstant as err:
        raise Skip(f"{what} is not constant: {err}") from None


def per_channel_vector(array: np.ndarray, rank: int, channel_axis: int, channels: int, what: str) -> np.ndarray:
    """Return `array` as a [channels] vector if, broadcast against an output of `rank` dims, it varies
    only along `channel_axis` and leaves the output's shape as it is; raise Skip otherwise."""
    if array.ndim > rank:
        raise Skip(f"{what} has shape {list(array.shape)}, more dimensions than the {rank}-D output")
    padded = (1,) * (rank - array.ndim) + tuple(array.shape)
    for axis, dim in enumerate(padded):
        if axis == channel_axis:
            if dim not in (1, channels):
                raise Skip(f"{what} has shape {list(array.shape)}: {dim} values along the channel axis, "
                           f"but the output has {channels} channels")
        elif dim != 1:
            raise Skip(f"{what} has shape {list(array.shape)}, which varies along output axis {axis}, "
                       f"not only along the channel axis {channel_axis}")
    vector = array.reshape(padded).reshape(-1)
    return np.broadcast_to(vector, (channels,)) if vector.size == 1 else vector


def require_finite(name: str, array: np.ndarray, owner: str) -> None:
    if not np.isfinite(np.asarray(array, dtype=np.float64)).all():
        raise Skip(f"{owner} {name} contains NaN or infinite values")


def require_normal_sum(variance: np.ndarray, epsilon: float, owner: str) -> None:
    """Raise Skip when var + eps in float32 is subnormal: TensorFlow's CPU kernels flush it to zero,
    so the unfused BN computes rsqrt(0) = inf where the folded scale would be finite."""
    total = np.asarray(variance, dtype=np.float32) + np.float32(epsilon)
    if (total < np.finfo(np.float32).tiny).any():
        raise Skip(f"{owner} has variance + epsilon below float32's smallest normal number, which TensorFlow "
                   f"flushes to zero")


@dataclass
class Producer:
    """The op a fold writes into, with the optional bias op between it and the folded node."""

    op: Node
    semantics: OpSemantics
    bias_node: Node | None = None
    bias: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return [self.op.name] + ([self.bias_node.name] if self.bias_node else [])

    @property
    def pattern_prefix(self) -> str:
        return f"{self.op.op}+BiasAdd" if self.bias_node else self.op.op

    @property
    def channel_axis(self) -> int:
        return self.semantics.output_channel_axis(self.op)

    def channels(self, weight: np.ndarray) -> int:
        return int(np.prod([weight.shape[a] for a in self.semantics.channel_axes(self.op)]))


_BIAS_OPS = ("BiasAdd", "Add", "AddV2")


def find_producer(ctx: PassContext, value: Value, user: str) -> Producer:
    """Walk from the folded node's data input back to a table op, through one optional bias op.

    A BiasAdd, or an Add/AddV2 whose other input is a constant, counts as the op's bias. Raises Skip
    naming the producer when it is not an op fusion-ir folds into.
    """
    node = value.producer
    if node is None:
        raise Skip(f"{user} input {value.name} is a graph input, not the output of a conv or matmul")
    bias_node = None
    if node.op in _BIAS_OPS and semantics(node) is None:
        data = _bias_data_input(ctx, node)
        if data is not None:
            bias_node, node = node, data.producer
    sem = semantics(node)
    if sem is None:
        raise Skip(f"{user} input comes from {node.op} node {node.name}, not an op fusion-ir folds into")
    return Producer(node, sem, bias_node)


def _bias_data_input(ctx: PassContext, node: Node) -> Value | None:
    """Return the input of bias op `node` that comes from a table op when the other is a constant."""
    candidates = (0,) if node.op == "BiasAdd" else (0, 1)
    for i in candidates:
        data = node.inputs[i]
        if data.producer is None or semantics(data.producer) is None:
            continue
        if ctx.resolver.try_resolve(node.inputs[1 - i]) is not None:
            return data
    return None


def check_producer(ctx: PassContext, prod: Producer) -> np.ndarray:
    """Apply the checks common to every fold; return the resolved weight, and set prod.bias."""
    graph = ctx.graph
    op = prod.op
    if prod.bias_node is not None:
        require_single_use(graph, op.outputs[0], op.name)
        require_single_use(graph, prod.bias_node.outputs[0], prod.bias_node.name)
    else:
        require_single_use(graph, op.outputs[0], op.name)
    weight = resolve(ctx, op.inputs[prod.semantics.weight_input], f"the weight of {op.name}")
    if weight.dtype.name not in FLOAT_DTYPES:
        raise Skip(f"the weight of {op.name} is {weight.dtype}, not a floating-point type")
    channels = prod.channels(weight)
    if prod.bias_node is not None:
        prod.bias = _bias_vector(ctx, prod, channels)
        require_finite("bias", prod.bias, prod.bias_node.name)
    return weight


def _bias_vector(ctx: PassContext, prod: Producer, channels: int) -> np.ndarray:
    node = prod.bias_node
    if node.op == "BiasAdd":
        bias = resolve(ctx, node.inputs[1], f"the bias of {node.name}")
        fmt = node.attrs.get("data_format", "NHWC")
        bias_last = CHANNELS_LAST.get(fmt, True)
        if bias_last != (prod.channel_axis == prod.semantics.output_rank - 1):
            raise Skip(f"{node.name} adds its bias along a different axis than {prod.op.name}'s channels")
        if bias.shape != (channels,):
            raise Skip(f"the bias of {node.name} has shape {list(bias.shape)}, expected [{channels}]")
        return bias
    data = _bias_data_input(ctx, node)
    const_input = node.inputs[1] if node.inputs[0] is data else node.inputs[0]
    array = ctx.resolver.resolve(const_input)
    return per_channel_vector(array, prod.semantics.output_rank, prod.channel_axis, channels,
                              f"the constant added by {node.name}")


def compute_fold(prod: Producer, weight: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the folded (weight, bias) arrays, or raise Skip when they would not be finite."""
    try:
        new_weight = scale_weight(weight, scale, prod.semantics.channel_axes(prod.op))
        new_bias = fold_bias(prod.bias, scale, shift, weight.dtype)
    except FoldError as err:
        raise Skip(f"folding into {prod.op.name}: {err}") from None
    return new_weight, new_bias


def set_weight(ctx: PassContext, prod: Producer, new_weight: np.ndarray) -> None:
    """Point the producer's weight input at a new constant; the old one is never modified."""
    graph = ctx.graph
    old = prod.op.inputs[prod.semantics.weight_input]
    value = graph.add_constant(graph.unique_name(f"{prod.op.name}/folded_weight"), new_weight)
    graph.set_input(prod.op, prod.semantics.weight_input, value)
    ctx.resolver.forget(old)


def bias_add_attrs(prod: Producer, dtype: np.dtype) -> dict:
    channels_last = prod.channel_axis == prod.semantics.output_rank - 1
    return {"T": np.dtype(dtype), "data_format": "NHWC" if channels_last else "NCHW"}


def insert_bias_add(ctx: PassContext, prod: Producer, new_bias: np.ndarray, name: str, position: int):
    """Add BiasAdd(producer op output, new_bias) named `name` (made unique) at `position`."""
    graph = ctx.graph
    bias_value = graph.add_constant(graph.unique_name(f"{name}/folded_bias"), new_bias)
    return graph.add_node("BiasAdd", graph.unique_name(f"{name}/folded"), [prod.op.outputs[0], bias_value],
                          bias_add_attrs(prod, new_bias.dtype), index=position)


def replace_node(ctx: PassContext, old: Node, new_output: Value, removed_after: list[Node] = ()) -> None:
    """Rewire every use of `old`'s output to `new_output`, remove `old` and then `removed_after` in
    order, and give the producer of `new_output` the old node's name, control inputs and device."""
    graph = ctx.graph
    replacement = new_output.producer
    name = old.name
    graph.replace_all_uses(old.outputs[0], new_output)
    for dep in old.control_inputs:
        if dep not in replacement.control_inputs:
            replacement.control_inputs.append(dep)
    if "device" in old.extra and "device" not in replacement.extra:
        replacement.extra["device"] = old.extra["device"]
    graph.remove_node(old)
    for node in removed_after:
        graph.remove_node(node)
    graph.rename_node(replacement, name)


def fold_into_producer(ctx: PassContext, prod: Producer, weight: np.ndarray, anchor: Node,
                       scale: np.ndarray, shift: np.ndarray, interior: list[Node] = ()) -> None:
    """Fold y * scale + shift into the producer's weight and bias.

    `anchor` (the BN, Mul or Add) is replaced by one BiasAdd that takes its name; `interior` lists the
    nodes between the producer and the anchor (each with the next as its only consumer), removed with
    it. When there is no bias to keep (no bias op and a zero shift), the producer op itself takes the
    anchor's name instead. Raises Skip before touching the graph when the folded values are not finite.
    """
    new_weight, new_bias = compute_fold(prod, weight, scale, shift)
    set_weight(ctx, prod, new_weight)
    leftovers = list(reversed(interior)) + ([prod.bias_node] if prod.bias_node else [])
    if prod.bias_node is None and not np.any(shift):
        replace_node(ctx, anchor, prod.op.outputs[0], leftovers)
        return
    bias_add = insert_bias_add(ctx, prod, new_bias, anchor.name, ctx.graph.nodes.index(anchor))
    replace_node(ctx, anchor, bias_add.outputs[0], leftovers)
