"""Recognize BatchNorm written as small ops and fold it into the conv or matmul before it.

tf.nn.batch_normalization, and so tf_keras BatchNormalization(fused=False) and every Keras 3
BatchNormalization, leaves this structure (gamma and beta optional):

    inv   = Rsqrt(AddV2(variance, epsilon)) [* gamma]
    out   = AddV2(Mul(x, inv), shift)
    shift = Sub(beta, Mul(mean, inv))        with center
          = Mul(Neg(mean), inv)              without center

It is an inference-mode BN with scale inv and the given shift. The structure is matched here, before
constant resolution would see only a per-channel Mul and Add, so the report calls it a BatchNorm, and
qat mode can keep it. The fold is the one FusedBatchNorm gets (s = gamma / sqrt(var + eps) computed in
float64), written straight into the producer's weight and bias.
"""

from __future__ import annotations

import numpy as np

from passes.common import (PassContext, Skip, check_producer, find_producer, fold_into_producer, per_channel_vector,
                           require_finite, require_normal_sum, require_single_use)
from passes.resolve import NotConstant

_FORWARD = ("Identity", "Cast", "Reshape", "Squeeze", "ExpandDims")


def _strip(value):
    """Follow forwarding ops back from `value`; return the first node that is not one (or None)."""
    node = value.producer
    while node is not None and node.op in _FORWARD:
        node = node.inputs[0].producer
    return node


def _match_inv(ctx: PassContext, inv_value):
    """Return (gamma value or None, variance value, epsilon) if `inv_value` is Rsqrt(var + eps) [* gamma]."""
    node = _strip(inv_value)
    gamma = None
    if node is not None and node.op == "Mul":
        for i in (0, 1):
            rsqrt = _strip(node.inputs[i])
            if rsqrt is not None and rsqrt.op == "Rsqrt":
                gamma, node = node.inputs[1 - i], rsqrt
                break
    if node is None or node.op != "Rsqrt":
        return None
    add = _strip(node.inputs[0])
    if add is None or add.op not in ("Add", "AddV2"):
        return None
    for i in (0, 1):
        eps = ctx.resolver.try_resolve(add.inputs[i])
        if eps is not None and eps.size == 1:
            return gamma, add.inputs[1 - i], float(np.asarray(eps, dtype=np.float64).reshape(-1)[0])
    return None


def _match_shift(shift_value):
    """Return (beta value or None, mean value) for Sub(beta, Mul(mean, inv)) or Mul(Neg(mean), inv)."""
    node = _strip(shift_value)
    if node is None:
        return None
    if node.op == "Sub":
        mul = _strip(node.inputs[1])
        if mul is not None and mul.op == "Mul":
            return node.inputs[0], _mean_of(mul)
    if node.op == "Mul":
        for i in (0, 1):
            neg = _strip(node.inputs[i])
            if neg is not None and neg.op == "Neg":
                return None, neg.inputs[0]
    return None


def _mean_of(mul):
    """Mul(mean, inv): the input that is not the Rsqrt branch."""
    for i in (0, 1):
        other = _strip(mul.inputs[1 - i])
        if other is not None and other.op in ("Rsqrt", "Mul"):
            return mul.inputs[i]
    return mul.inputs[0]


def match(ctx: PassContext, add):
    """Return the structure around AddV2 `add`, or None when it is not a small-op BatchNorm."""
    if add.op not in ("Add", "AddV2") or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        mul = add.inputs[i].producer
        if mul is None or mul.op != "Mul":
            continue
        for j in (0, 1):
            inv = _match_inv(ctx, mul.inputs[j])
            if inv is None:
                continue
            shift = _match_shift(add.inputs[1 - i])
            if shift is None:
                continue
            gamma, variance, epsilon = inv
            beta, mean = shift
            return {"mul": mul, "x": mul.inputs[1 - j], "inv": mul.inputs[j], "gamma": gamma, "beta": beta, "mean": mean,
                    "variance": variance, "epsilon": epsilon, "shift": add.inputs[1 - i]}
    return None


def run(ctx: PassContext) -> bool:
    changed = False
    for add in list(ctx.graph.nodes):
        if add.graph is None or add.dialect != "tf":
            continue
        found = match(ctx, add)
        if found is None:
            continue
        mul = found["mul"]
        ctx.graph.meta.setdefault("small_op_bn_nodes", set()).update((mul.name, add.name))
        pattern = "BatchNorm(small ops)"
        nodes = [mul.name, add.name]
        try:
            prod = find_producer(ctx, found["x"], mul.name)
            pattern = f"{prod.pattern_prefix}+BatchNorm(small ops)"
            nodes = prod.names + nodes
            ctx.check_allowed("small-bn", nodes)
            if ctx.mode == "qat":
                raise Skip(f"{add.name} is a BatchNorm written as small ops; qat mode keeps it for "
                           f"quantization-aware training")
            require_single_use(ctx.graph, mul.outputs[0], mul.name)
            weight = check_producer(ctx, prod)
            _check_broadcast(ctx, found, prod, prod.channels(weight), add.name)
            scale, shift = _scale_shift(ctx, found, add.name)
            if scale.size != prod.channels(weight):
                raise Skip(f"{add.name} has {scale.size} channels but {prod.op.name} has {prod.channels(weight)}")
            fold_into_producer(ctx, prod, weight, add, scale, shift, interior=[mul])
        except Skip as reason:
            if pattern == "BatchNorm(small ops)" and found["x"].producer is not None:
                pattern = f"{found['x'].producer.op}+BatchNorm(small ops)"
            ctx.report.skipped(pattern, add.name, nodes, str(reason))
            continue
        ctx.report.fused(pattern, add.name, nodes)
        changed = True
    return changed


def _check_broadcast(ctx: PassContext, found, prod, channels: int, owner: str) -> None:
    """Raise Skip unless the computed scale and shift vary only along the producer's channel axis
    (a [C] vector after an NCHW conv broadcasts along the width, not the channels)."""
    rank, axis = prod.semantics.output_rank, prod.channel_axis
    for key, label in (("inv", "scale"), ("shift", "shift")):
        try:
            array = ctx.resolver.resolve(found[key])
        except NotConstant as err:
            raise Skip(f"the {label} of {owner} is not constant: {err}") from None
        per_channel_vector(array, rank, axis, channels, f"the {label} of {owner}")


def _vector(ctx: PassContext, value, label: str, owner: str) -> np.ndarray:
    try:
        array = ctx.resolver.resolve(value)
    except NotConstant as err:
        raise Skip(f"the {label} of {owner} is not constant: {err}") from None
    array = np.asarray(array, dtype=np.float64)
    if sum(d > 1 for d in array.shape) > 1:
        raise Skip(f"the {label} of {owner} has shape {list(array.shape)}, not one value per channel")
    require_finite(label, array, owner)
    return array.reshape(-1)


def _scale_shift(ctx: PassContext, found, owner: str) -> tuple[np.ndarray, np.ndarray]:
    variance = _vector(ctx, found["variance"], "variance", owner)
    epsilon = found["epsilon"]
    if not (variance + epsilon > 0).all():
        raise Skip(f"{owner} has variance + epsilon <= 0 for some channel")
    require_normal_sum(variance, epsilon, owner)
    gamma = _vector(ctx, found["gamma"], "gamma", owner) if found["gamma"] is not None else 1.0
    mean = _vector(ctx, found["mean"], "mean", owner)
    beta = _vector(ctx, found["beta"], "beta", owner) if found["beta"] is not None else 0.0
    scale = gamma / np.sqrt(variance + epsilon)
    channels = max(np.size(scale), np.size(mean), np.size(beta))
    scale = np.broadcast_to(scale, (channels,))
    shift = np.broadcast_to(beta - mean * scale, (channels,))
    return np.array(scale), np.array(shift)
