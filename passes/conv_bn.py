"""Fold TF FusedBatchNorm / V2 / V3 in inference mode into the conv or matmul before it.

Pattern: op -> [BiasAdd | Add/AddV2 of a per-channel constant] -> FusedBatchNorm*, with op a row of the
op-semantics table (Conv2D, DepthwiseConv2dNative, Conv2DBackpropInput, Conv3D). With
s = gamma / sqrt(var + eps) and t = beta - mean * s, the op's weight becomes W * s along its output
channels and the BN becomes BiasAdd(op, b * s + t), named as the BN was.
"""

from __future__ import annotations

import numpy as np

from passes.common import (PassContext, Skip, check_producer, find_producer, fold_into_producer, require_finite,
                           require_normal_sum, resolve)
from passes.folding import bn_scale_shift
from passes.table import CHANNELS_LAST

BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
_STAT_NAMES = ("scale (gamma)", "offset (beta)", "mean", "variance")
_EXTRA_OUTPUTS = ("batch_mean", "batch_variance", "reserve_space_1", "reserve_space_2", "reserve_space_3")


def run(ctx: PassContext) -> bool:
    changed = False
    for bn in list(ctx.graph.nodes):
        if bn.op not in BN_OPS or bn.graph is None:
            continue
        source = bn.inputs[0].producer
        if source is not None and source.op in ("ConcatV2", "Concat"):
            continue  # a group convolution: passes/group_conv.py reports it
        pattern = "BatchNorm"
        nodes = [bn.name]
        try:
            prod = find_producer(ctx, bn.inputs[0], bn.name)
            pattern = f"{prod.pattern_prefix}+BatchNorm"
            nodes = prod.names + [bn.name]
            ctx.check_allowed("conv-bn", nodes)
            scale, shift = check_bn(ctx, bn, prod.semantics.output_rank, prod.channel_axis)
            weight = check_producer(ctx, prod)
            if scale.size != prod.channels(weight):
                raise Skip(f"{bn.name} has {scale.size} channels but {prod.op.name} has {prod.channels(weight)}")
            fold_into_producer(ctx, prod, weight, bn, scale, shift)
        except Skip as reason:
            if pattern == "BatchNorm" and bn.inputs[0].producer is not None:
                pattern = f"{bn.inputs[0].producer.op}+BatchNorm"
            ctx.report.skipped(pattern, bn.name, nodes, str(reason))
            continue
        ctx.report.fused(pattern, bn.name, nodes)
        changed = True
    return changed


def check_bn(ctx: PassContext, bn, rank: int, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Check that `bn` is an inference-mode BN over the producer's channels; return (scale, shift)."""
    if bn.attrs.get("is_training", True):
        raise Skip(f"{bn.name} is in training mode (is_training=True), so it normalizes with batch statistics")
    for index, label in enumerate(_EXTRA_OUTPUTS, start=1):
        if index < len(bn.outputs) and (bn.outputs[index].num_uses or ctx.graph.is_output(bn.outputs[index])):
            raise Skip(f"{bn.name} output {index} ({label}) is used, and it would disappear with the BN")
    fmt = bn.attrs.get("data_format", "NHWC")
    bn_axis = rank - 1 if CHANNELS_LAST.get(fmt, True) else 1
    if bn_axis != channel_axis:
        raise Skip(f"{bn.name} normalizes axis {bn_axis} ({fmt}) but the producer's channels are on axis "
                   f"{channel_axis}")
    params = [resolve(ctx, v, f"the {label} of {bn.name}") for v, label in zip(bn.inputs[1:5], _STAT_NAMES)]
    gamma, beta, mean, variance = params
    if mean.size == 0 or variance.size == 0:
        raise Skip(f"{bn.name} has an empty mean or variance, so it computes batch statistics (training mode)")
    for array, label in zip(params, _STAT_NAMES):
        if array.ndim != 1 or array.shape != gamma.shape:
            raise Skip(f"the {label} of {bn.name} has shape {list(array.shape)}, expected one value per channel")
        require_finite(label, array, bn.name)
    epsilon = float(bn.attrs.get("epsilon", 1e-4))
    if not (np.asarray(variance, dtype=np.float64) + epsilon > 0).all():
        raise Skip(f"{bn.name} has variance + epsilon <= 0 for some channel")
    require_normal_sum(variance, epsilon, bn.name)
    return bn_scale_shift(gamma, beta, mean, variance, epsilon)
