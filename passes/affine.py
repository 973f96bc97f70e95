"""Fold Mul, Add/AddV2, Sub and BiasAdd by a constant into the conv or matmul before them.

Pattern: op -> [bias] -> N, where op is a row of the op-semantics table and N combines the output with a
constant c that is a scalar or varies only along the output channels:
    Mul(y, c)      scale c, shift 0
    Add(y, c)      scale 1, shift c   (also BiasAdd, and Add with the constant first)
    Sub(y, c)      scale 1, shift -c
    Sub(c, y)      scale -1, shift c
An Add or BiasAdd directly after the op, with no bias before it, is the op's own bias and not a
candidate. A scalar Mul folds in every mode (AMCT's OP+(BiasAdd)+Mul fusion); everything else is
per-channel arithmetic that may be a BatchNorm folded by grappler, so it folds in ptq mode only.
"""

from __future__ import annotations

import numpy as np

from passes.common import (PassContext, Skip, check_producer, find_producer, fold_into_producer, per_channel_vector,
                           require_finite)
from passes.resolve import NotConstant
from passes.table import CHANNELS_LAST, semantics

AFFINE_OPS = ("Mul", "Add", "AddV2", "Sub", "BiasAdd")


def run(ctx: PassContext) -> bool:
    changed = False
    # Nodes of a BatchNorm written as small ops that small_bn.py matched; it reports them itself.
    claimed = ctx.graph.meta.get("small_op_bn_nodes", set())
    for node in list(ctx.graph.nodes):
        if node.op not in AFFINE_OPS or node.graph is None or node.dialect != "tf" or node.name in claimed:
            continue
        split = _split_inputs(ctx, node)
        if split is None:
            continue
        data, const_value, data_first = split
        try:
            prod = find_producer(ctx, data, node.name)
        except Skip:
            continue
        if node.op in ("Add", "AddV2", "BiasAdd") and prod.bias_node is None:
            continue  # the op's own bias
        if node.op != "Mul" and ctx.resolver.try_resolve(const_value) is None:
            continue  # a residual connection or other sum of activations, not a candidate
        pattern = f"{prod.pattern_prefix}+{'Mul' if node.op == 'Mul' else 'Add'}"
        nodes = prod.names + [node.name]
        try:
            ctx.check_allowed("mul-add", nodes)
            _fold(ctx, node, prod, const_value, data_first)
        except Skip as reason:
            ctx.report.skipped(pattern, node.name, nodes, str(reason))
            continue
        ctx.report.fused(pattern, node.name, nodes)
        changed = True
    return changed


def _split_inputs(ctx: PassContext, node):
    """Return (data input, constant-side input, whether data is input 0); None when neither input
    comes from a table op (possibly through a bias)."""
    a, b = node.inputs[:2]
    if node.op == "BiasAdd":
        return a, b, True
    for data, other, first in ((a, b, True), (b, a, False)):
        producer = data.producer
        if producer is None:
            continue
        if semantics(producer) is not None:
            return data, other, first
        if producer.op in ("BiasAdd", "Add", "AddV2") and producer.inputs and any(
                v.producer is not None and semantics(v.producer) is not None for v in producer.inputs[:2]):
            return data, other, first
    return None


def _fold(ctx: PassContext, node, prod, const_value, data_first: bool) -> None:
    try:
        constant = ctx.resolver.resolve(const_value)
    except NotConstant as err:
        raise Skip(f"the other input of {node.op} {node.name} is not constant: {err}") from None
    if constant.dtype.kind != "f" and constant.dtype.name != "bfloat16":
        raise Skip(f"the constant of {node.name} is {constant.dtype}, not a floating-point type")
    scalar = constant.size == 1
    if not scalar and ctx.mode == "qat":
        raise Skip(f"{node.name} is per-channel arithmetic, which may be a BatchNorm; qat mode keeps it")
    if node.op != "Mul" and ctx.mode == "qat":
        raise Skip(f"{node.name} adds a constant after the bias; qat mode folds only scalar Mul")
    weight = check_producer(ctx, prod)
    channels = prod.channels(weight)
    rank = prod.semantics.output_rank
    if scalar and constant.ndim > rank:
        raise Skip(f"the constant of {node.name} has {constant.ndim} dimensions, more than the {rank}-D output")
    if node.op == "BiasAdd":
        # BiasAdd adds its vector along the axis its own data_format names, which may not be the
        # producer's channel axis.
        bias_axis = rank - 1 if CHANNELS_LAST.get(node.attrs.get("data_format", "NHWC"), True) else 1
        if bias_axis != prod.channel_axis or constant.ndim != 1:
            raise Skip(f"{node.name} adds its bias along output axis {bias_axis}, not the channel axis "
                       f"{prod.channel_axis}")
        if constant.size not in (1, channels):
            raise Skip(f"the bias of {node.name} has {constant.size} values but the output has {channels} channels")
        vector = np.broadcast_to(constant, (channels,))
    else:
        vector = per_channel_vector(constant, rank, prod.channel_axis, channels, f"the constant of {node.name}")
    require_finite("constant", vector, node.name)
    vector = np.asarray(vector, dtype=np.float64)
    ones = np.ones(channels)
    if node.op == "Mul":
        scale, shift = vector * ones, np.zeros(channels)
    elif node.op == "Sub" and not data_first:
        scale, shift = -ones, vector * ones
    elif node.op == "Sub":
        scale, shift = ones, -vector * ones
    else:
        scale, shift = ones, vector * ones
    fold_into_producer(ctx, prod, weight, node, scale, shift)
