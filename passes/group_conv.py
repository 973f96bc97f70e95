"""Fold FusedBatchNorm* after a group convolution written as Split + N x Conv2D + ConcatV2/Concat.

Pattern: Split/SplitV(x) along the channel axis into N parts, part i -> Conv2D_i [-> BiasAdd_i], the N
branch outputs joined in order by ConcatV2/Concat on the channel axis, then a BN. Branch i covers BN
channels [offset_i, offset_i + C_i), so BN's scale and shift are cut into those slices and each slice is
folded into its branch, which ends in a BiasAdd; the Concat takes the BN's name.
"""

from __future__ import annotations

import numpy as np

from passes.common import (PassContext, Skip, check_producer, compute_fold, find_producer, insert_bias_add, replace_node,
                           require_single_use, set_weight)
from passes.conv_bn import BN_OPS, check_bn
from passes.resolve import NotConstant

CONCAT_OPS = ("ConcatV2", "Concat")


def concat_parts(node):
    """Return (data inputs, axis input) of a ConcatV2 (axis last) or Concat (axis first)."""
    if node.op == "ConcatV2":
        return node.inputs[:-1], node.inputs[-1]
    return node.inputs[1:], node.inputs[0]


def run(ctx: PassContext) -> bool:
    changed = False
    for bn in list(ctx.graph.nodes):
        if bn.op not in BN_OPS or bn.graph is None:
            continue
        concat = bn.inputs[0].producer
        if concat is None or concat.op not in CONCAT_OPS:
            continue
        pattern = f"GroupConv({concat.op})+BatchNorm"
        nodes = [concat.name, bn.name]
        try:
            branches = _branches(ctx, concat, bn)
            nodes = [n for b in branches for n in b.names] + nodes
            ctx.check_allowed("group-conv", nodes)
            _fold(ctx, concat, bn, branches)
        except Skip as reason:
            ctx.report.skipped(pattern, bn.name, nodes, str(reason))
            continue
        ctx.report.fused(pattern, bn.name, nodes)
        changed = True
    return changed


def _axis(ctx: PassContext, value, owner: str) -> int:
    try:
        return int(np.asarray(ctx.resolver.resolve(value)).reshape(-1)[0])
    except NotConstant:
        raise Skip(f"the axis of {owner} is not constant") from None


def _branches(ctx: PassContext, concat, bn):
    graph = ctx.graph
    parts, axis_value = concat_parts(concat)
    branches = []
    for part in parts:
        try:
            prod = find_producer(ctx, part, concat.name)
        except Skip:
            raise Skip(f"{concat.name} input {part.name} does not come from a Conv2D branch") from None
        if prod.op.op != "Conv2D":
            raise Skip(f"{concat.name} input {part.name} comes from {prod.op.op}, not Conv2D")
        branches.append(prod)
    if len(branches) < 2:
        raise Skip(f"{concat.name} joins fewer than two conv branches")
    channel_axis = branches[0].channel_axis
    if any(b.channel_axis != channel_axis for b in branches):
        raise Skip(f"the convs joined by {concat.name} use different data formats")
    rank = branches[0].semantics.output_rank
    if _axis(ctx, axis_value, concat.name) % rank != channel_axis:
        raise Skip(f"{concat.name} concatenates along axis {_axis(ctx, axis_value, concat.name)}, not the channel "
                   f"axis {channel_axis}")
    _check_split(ctx, branches, channel_axis, rank)
    require_single_use(graph, concat.outputs[0], concat.name)
    return branches


def _check_split(ctx: PassContext, branches, channel_axis: int, rank: int) -> None:
    """Each conv i must read output i of one Split/SplitV along the channel axis, in equal parts."""
    split = None
    for i, prod in enumerate(branches):
        source = prod.op.inputs[0]
        node = source.producer
        if node is None or node.op not in ("Split", "SplitV"):
            raise Skip(f"{prod.op.name} does not read a Split output, so this is not a group convolution")
        if split is None:
            split = node
        if node is not split or source.index != i:
            raise Skip(f"{prod.op.name} reads {source.name}, not output {i} of {split.name}")
    if len(split.outputs) != len(branches) or any(v.num_uses != 1 for v in split.outputs):
        raise Skip(f"the outputs of {split.name} do not each feed exactly one branch conv")
    if split.op == "Split":
        axis = _axis(ctx, split.inputs[0], split.name)
    else:
        axis = _axis(ctx, split.inputs[2], split.name)
        try:
            sizes = ctx.resolver.resolve(split.inputs[1]).reshape(-1)
        except NotConstant:
            raise Skip(f"the split sizes of {split.name} are not constant") from None
        if len(set(int(s) for s in sizes)) != 1:
            raise Skip(f"{split.name} splits into unequal parts {[int(s) for s in sizes]}")
    if axis % rank != channel_axis:
        raise Skip(f"{split.name} splits along axis {axis}, not the channel axis {channel_axis}")


def _fold(ctx: PassContext, concat, bn, branches) -> None:
    channel_axis = branches[0].channel_axis
    scale, shift = check_bn(ctx, bn, branches[0].semantics.output_rank, channel_axis)
    weights = [check_producer(ctx, prod) for prod in branches]
    sizes = [prod.channels(w) for prod, w in zip(branches, weights)]
    if sum(sizes) != scale.size:
        raise Skip(f"the branches of {concat.name} have {sum(sizes)} channels in all but {bn.name} has {scale.size}")
    offsets = np.cumsum([0] + sizes)
    folds = [compute_fold(prod, w, scale[a:b], shift[a:b])
             for prod, w, a, b in zip(branches, weights, offsets[:-1], offsets[1:])]

    graph = ctx.graph
    for prod, (new_weight, new_bias) in zip(branches, folds):
        set_weight(ctx, prod, new_weight)
        last = prod.bias_node or prod.op
        (user, index), = last.outputs[0].uses()
        bias_add = insert_bias_add(ctx, prod, new_bias, last.name, graph.nodes.index(last) + 1)
        graph.set_input(user, index, bias_add.outputs[0])
        if prod.bias_node is not None:
            replace_node_name = prod.bias_node.name
            graph.remove_node(prod.bias_node)
            graph.rename_node(bias_add, replace_node_name)
    replace_node(ctx, bn, concat.outputs[0])
