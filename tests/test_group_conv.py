"""Group convolution (Split + Conv2D branches + Concat) + BN, and BN after Conv2DBackpropInput and Conv3D."""

import numpy as np
import pytest

from conftest import bn_params, freeze, fuse_and_compare, fused_bn, op_counts, reasons, tf, variable

X = tf.TensorSpec([2, 7, 7, 6], tf.float32, name="x")
SHAPE = {"x:0": (2, 7, 7, 6)}


def conv(x, w, data_format="NHWC"):
    return tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", data_format=data_format)


def group_conv(x, weights, biases=None, axis=3, concat_axis=3, split="Split", data_format="NHWC"):
    if split == "Split":
        parts = tf.split(x, len(weights), axis=axis)
    else:
        size = x.shape[axis] // len(weights)
        parts = tf.raw_ops.SplitV(value=x, size_splits=[size] * len(weights), axis=axis, num_split=len(weights))
    outs = []
    for i, (part, w) in enumerate(zip(parts, weights)):
        y = conv(part, w, data_format)
        if biases is not None:
            y = tf.nn.bias_add(y, biases[i], data_format=data_format)
        outs.append(y)
    return tf.concat(outs, axis=concat_axis)


def bn_name(model):
    return next(n.name for n in model.graph_def.node if n.op.startswith("FusedBatchNorm"))


@pytest.mark.parametrize("split", ["Split", "SplitV"])
def test_group_conv_bn_folds(split):
    weights = [variable(3, 3, 2, 4, seed=i) for i in range(3)]
    params = bn_params(12)
    model = freeze(lambda x: fused_bn(group_conv(x, weights, split=split), params), X)

    result = fuse_and_compare(model, SHAPE)

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv2D"] == 3
    assert counts["BiasAdd"] == 3
    concat = next(n for n in result.graph_def.node if n.op == "ConcatV2")
    assert concat.name == bn_name(model)
    assert result.report.candidates[bn_name(model)].status == "fused"


def test_group_conv_biasadd_bn_folds():
    weights = [variable(3, 3, 3, 5, seed=i) for i in range(2)]
    biases = [variable(5, seed=10 + i) for i in range(2)]
    params = bn_params(10)
    model = freeze(lambda x: fused_bn(group_conv(x, weights, biases), params), X)

    result = fuse_and_compare(model, SHAPE)

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["BiasAdd"] == 2


def test_group_conv_nchw_bn_folds():
    weights = [variable(3, 3, 3, 4, seed=i) for i in range(2)]
    params = bn_params(8)
    spec = tf.TensorSpec([2, 6, 7, 7], tf.float32, name="x")
    model = freeze(lambda x: fused_bn(group_conv(x, weights, axis=1, concat_axis=1, data_format="NCHW"), params,
                                      data_format="NCHW"), spec)

    result = fuse_and_compare(model, {"x:0": (2, 6, 7, 7)})

    assert "FusedBatchNormV3" not in op_counts(result.graph_def)


def test_group_conv_branch_second_consumer_skipped():
    weights = [variable(3, 3, 3, 4, seed=i) for i in range(2)]
    params = bn_params(8)

    def fn(x):
        a, b = tf.split(x, 2, axis=3)
        ya, yb = conv(a, weights[0]), conv(b, weights[1])
        return fused_bn(tf.concat([ya, yb], axis=3), params), tf.nn.relu(ya)

    model = freeze(fn, X)

    result = fuse_and_compare(model, SHAPE)

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "has 2 consumers" in reasons(result)[bn_name(model)]


def test_group_conv_split_non_channel_axis_skipped():
    weights = [variable(3, 3, 6, 4, seed=i) for i in range(2)]
    params = bn_params(8)
    spec = tf.TensorSpec([2, 8, 7, 6], tf.float32, name="x")
    model = freeze(lambda x: fused_bn(group_conv(x, weights, axis=1, concat_axis=3), params), spec)

    result = fuse_and_compare(model, {"x:0": (2, 8, 7, 6)})

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "splits along axis 1, not the channel axis 3" in reasons(result)[bn_name(model)]


def test_concat_on_non_channel_axis_skipped():
    weights = [variable(3, 3, 3, 4, seed=i) for i in range(2)]
    params = bn_params(4)
    model = freeze(lambda x: fused_bn(group_conv(x, weights, concat_axis=1), params), X)

    result = fuse_and_compare(model, SHAPE)

    assert "concatenates along axis 1" in reasons(result)[bn_name(model)]


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_deconv_bn_folds(data_format):
    w, params = variable(3, 3, 6, 4), bn_params(6)
    sizes = [2, 14, 14, 6] if data_format == "NHWC" else [2, 6, 14, 14]
    strides = [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2]
    shape = (2, 7, 7, 4) if data_format == "NHWC" else (2, 4, 7, 7)

    def fn(x):
        y = tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=w, out_backprop=x, strides=strides,
                                           padding="SAME", data_format=data_format)
        return fused_bn(y, params, data_format=data_format)

    model = freeze(fn, tf.TensorSpec(shape, tf.float32, name="x"))

    result = fuse_and_compare(model, {"x:0": shape})

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv2DBackpropInput"] == 1


@pytest.mark.parametrize("data_format", ["NDHWC", "NCDHW"])
def test_conv3d_bn_folds(data_format):
    w, params = variable(3, 3, 3, 4, 6), bn_params(6)
    shape = (2, 5, 6, 6, 4) if data_format == "NDHWC" else (2, 4, 5, 6, 6)

    def fn(x):
        y = tf.raw_ops.Conv3D(input=x, filter=w, strides=[1, 1, 1, 1, 1], padding="SAME", data_format=data_format)
        return fused_bn(y, params, data_format=data_format)

    model = freeze(fn, tf.TensorSpec(shape, tf.float32, name="x"))

    result = fuse_and_compare(model, {"x:0": shape})

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv3D"] == 1
