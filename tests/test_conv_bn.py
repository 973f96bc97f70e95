"""Conv2D / DepthwiseConv2dNative + FusedBatchNorm*: positive cases and every skip reason."""

import numpy as np
import pytest

from conftest import bn_params, freeze, fuse_and_compare, fused_bn, op_counts, reasons, statuses, tf, variable

import fusion_ir

X_NHWC = tf.TensorSpec([2, 9, 9, 4], tf.float32, name="x")
X_NCHW = tf.TensorSpec([2, 4, 9, 9], tf.float32, name="x")
SHAPE_NHWC = {"x:0": (2, 9, 9, 4)}
SHAPE_NCHW = {"x:0": (2, 4, 9, 9)}


def conv(x, w, data_format="NHWC", strides=(1, 1, 1, 1)):
    return tf.raw_ops.Conv2D(input=x, filter=w, strides=list(strides), padding="SAME", data_format=data_format)


def the_bn_name(model):
    return next(n.name for n in model.graph_def.node if n.op.startswith("FusedBatchNorm"))


@pytest.mark.parametrize("version", ["V1", "V2", "V3"])
def test_conv_bn_nhwc_folds(version):
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: tf.nn.relu(fused_bn(conv(x, w), params, version)), X_NHWC)
    bn_name = the_bn_name(model)

    result = fuse_and_compare(model, SHAPE_NHWC)

    counts = op_counts(result.graph_def)
    assert not any(op.startswith("FusedBatchNorm") for op in counts)
    assert counts["Conv2D"] == 1
    assert counts["BiasAdd"] == 1
    bias_add = next(n for n in result.graph_def.node if n.op == "BiasAdd")
    assert bias_add.name == bn_name
    assert bias_add.attr["data_format"].s == b"NHWC"
    assert statuses(result) == {bn_name: "fused"}


def test_conv_bn_nchw_folds():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w, "NCHW"), params, data_format="NCHW"), X_NCHW)

    result = fuse_and_compare(model, SHAPE_NCHW)

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    bias_add = next(n for n in result.graph_def.node if n.op == "BiasAdd")
    assert bias_add.attr["data_format"].s == b"NCHW"


def test_conv_biasadd_bn_folds():
    w, b, params = variable(3, 3, 4, 6), variable(6), bn_params(6)
    model = freeze(lambda x: fused_bn(tf.nn.bias_add(conv(x, w), b), params), X_NHWC)

    result = fuse_and_compare(model, SHAPE_NHWC)

    counts = op_counts(result.graph_def)
    assert counts["BiasAdd"] == 1
    assert "FusedBatchNormV3" not in counts
    assert result.report.candidates[the_bn_name(model)].pattern == "Conv2D+BiasAdd+BatchNorm"


def test_conv_add_per_channel_bn_folds():
    w, b, params = variable(3, 3, 4, 6), variable(1, 1, 1, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(tf.add(conv(x, w), b), params), X_NHWC)

    result = fuse_and_compare(model, SHAPE_NHWC)

    counts = op_counts(result.graph_def)
    assert counts["BiasAdd"] == 1
    assert "AddV2" not in counts
    assert "Add" not in counts


def test_conv_add_nchw_bias_bn_folds():
    w, b, params = variable(3, 3, 4, 6), variable(6, 1, 1), bn_params(6)
    model = freeze(lambda x: fused_bn(tf.add(conv(x, w, "NCHW"), b), params, data_format="NCHW"), X_NCHW)

    result = fuse_and_compare(model, SHAPE_NCHW)

    assert "FusedBatchNormV3" not in op_counts(result.graph_def)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_depthwise_multiplier_2_folds(data_format):
    w, params = variable(3, 3, 4, 2), bn_params(8)

    def fn(x):
        y = tf.raw_ops.DepthwiseConv2dNative(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME",
                                             data_format=data_format)
        return fused_bn(y, params, data_format=data_format)

    spec, shapes = (X_NHWC, SHAPE_NHWC) if data_format == "NHWC" else (X_NCHW, SHAPE_NCHW)
    model = freeze(fn, spec)

    result = fuse_and_compare(model, shapes)

    counts = op_counts(result.graph_def)
    assert counts["DepthwiseConv2dNative"] == 1
    assert "FusedBatchNormV3" not in counts
    assert result.report.num_fused == 1


def test_conv_bn_conv_bn_both_fold():
    w1, p1 = variable(3, 3, 4, 6, seed=1), bn_params(6, seed=1)
    w2, p2 = variable(1, 1, 6, 5, seed=2), bn_params(5, seed=2)
    model = freeze(lambda x: fused_bn(conv(tf.nn.relu(fused_bn(conv(x, w1), p1)), w2), p2), X_NHWC)

    result = fuse_and_compare(model, SHAPE_NHWC)

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv2D"] == 2
    assert counts["BiasAdd"] == 2
    assert result.report.num_fused == 2


def test_conv_with_second_consumer_skipped():
    w, params = variable(3, 3, 4, 6), bn_params(6)

    def fn(x):
        y = conv(x, w)
        return fused_bn(y, params) + tf.nn.relu(y)

    model = freeze(fn, X_NHWC)
    bn_name = the_bn_name(model)

    result = fuse_and_compare(model, SHAPE_NHWC)

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "has 2 consumers" in reasons(result)[bn_name]


def test_conv_graph_output_skipped():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w), params), X_NHWC)
    conv_name = next(n.name for n in model.graph_def.node if n.op == "Conv2D")
    model.outputs = model.outputs + [f"{conv_name}:0"]

    result = fuse_and_compare(model, SHAPE_NHWC)

    assert "graph output" in reasons(result)[the_bn_name(model)]


def test_shared_weight_two_bn_each_folds():
    w = variable(3, 3, 4, 6)
    p1, p2 = bn_params(6, seed=1), bn_params(6, seed=2)
    model = freeze(lambda x: fused_bn(conv(x, w), p1) + fused_bn(conv(x, w), p2), X_NHWC)
    original_bytes = model.graph_def.SerializeToString()

    result = fuse_and_compare(model, SHAPE_NHWC)

    assert model.graph_def.SerializeToString() == original_bytes
    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv2D"] == 2
    filters = [n for n in result.graph_def.node if n.op == "Const" and n.name.endswith("folded_weight")]
    assert len(filters) == 2
    assert filters[0].attr["value"].tensor.tensor_content != filters[1].attr["value"].tensor.tensor_content


def test_training_mode_bn_skipped():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w), params, is_training=True), X_NHWC)

    result = fusion_ir.fuse(model, verify=False)

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "training mode" in reasons(result)[the_bn_name(model)]


def test_empty_statistics_skipped():
    w, (gamma, beta, _, _) = variable(3, 3, 4, 6), bn_params(6)
    empty = tf.Variable(np.zeros([0], np.float32))

    def fn(x):
        return tf.raw_ops.FusedBatchNormV3(x=conv(x, w), scale=gamma, offset=beta, mean=empty, variance=empty,
                                           is_training=True)[0]

    model = freeze(fn, X_NHWC)
    # TF's shape inference rejects empty statistics with is_training=False, so a hand-edited or
    # foreign GraphDef is the only source of this node.
    bn = next(n for n in model.graph_def.node if n.op == "FusedBatchNormV3")
    bn.attr["is_training"].b = False

    result = fusion_ir.fuse(model, verify=False)

    assert "empty mean or variance" in reasons(result)[the_bn_name(model)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_statistics_skipped(bad):
    w = variable(3, 3, 4, 6)
    gamma, beta, mean, _ = bn_params(6)
    variance = np.full(6, 1.0, np.float32)
    variance[2] = bad
    params = (gamma, beta, mean, tf.Variable(variance))
    model = freeze(lambda x: fused_bn(conv(x, w), params), X_NHWC)

    result = fuse_and_compare(model, SHAPE_NHWC)

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "NaN or infinite" in reasons(result)[the_bn_name(model)]


def test_nonpositive_variance_skipped():
    w = variable(3, 3, 4, 6)
    gamma, beta, mean, _ = bn_params(6)
    params = (gamma, beta, mean, tf.Variable(np.full(6, -1.0, np.float32)))
    model = freeze(lambda x: fused_bn(conv(x, w), params), X_NHWC)

    result = fusion_ir.fuse(model, verify=False)

    assert "variance + epsilon <= 0" in reasons(result)[the_bn_name(model)]


def test_bn_batch_mean_used_skipped():
    w, (gamma, beta, mean, var) = variable(3, 3, 4, 6), bn_params(6)

    def fn(x):
        outs = tf.raw_ops.FusedBatchNormV3(x=conv(x, w), scale=gamma, offset=beta, mean=mean, variance=var,
                                           is_training=False)
        return outs[0], outs[1]

    model = freeze(fn, X_NHWC)

    result = fusion_ir.fuse(model, verify=False)

    assert "output 1 (batch_mean) is used" in reasons(result)[the_bn_name(model)]


def test_weight_not_constant_skipped():
    params = bn_params(6)
    spec_w = tf.TensorSpec([3, 3, 4, 6], tf.float32, name="w")
    model = freeze(lambda x, w: fused_bn(conv(x, w), params), X_NHWC, spec_w)

    result = fusion_ir.fuse(model, verify=False)

    reason = reasons(result)[the_bn_name(model)]
    assert "weight of" in reason
    assert "not constant" in reason


def test_bn_after_non_conv_skipped():
    params = bn_params(4)
    model = freeze(lambda x: fused_bn(tf.nn.relu(x), params), X_NHWC)

    result = fusion_ir.fuse(model, verify=False)

    candidate = result.report.candidates[the_bn_name(model)]
    assert candidate.pattern == "Relu+BatchNorm"
    assert "not an op fusion-ir folds into" in candidate.reason


def test_bn_data_format_mismatch_skipped():
    w, params = variable(3, 3, 4, 6), bn_params(9)
    model = freeze(lambda x: fused_bn(conv(x, w), params, data_format="NCHW"), X_NHWC)

    result = fusion_ir.fuse(model, verify=False)

    assert "normalizes axis 1" in reasons(result)[the_bn_name(model)]


def test_float16_conv_bn_folds():
    w = variable(3, 3, 4, 6, dtype=np.float16)
    params = bn_params(6)
    spec = tf.TensorSpec([2, 9, 9, 4], tf.float16, name="x")
    model = freeze(lambda x: fused_bn(conv(x, w), params), spec)

    result = fusion_ir.fuse(model, verify=True)

    assert result.verified is True
    assert result.checks[0].tolerance == 2e-3
    assert "FusedBatchNormV3" not in op_counts(result.graph_def)
    folded = next(n for n in result.graph_def.node if n.name.endswith("folded_weight"))
    assert folded.attr["dtype"].type == tf.float16.as_datatype_enum


def test_float16_overflow_skipped():
    w = tf.Variable(np.full((3, 3, 4, 6), 60000.0, np.float16))
    gamma, beta, mean, _ = bn_params(6)
    params = (gamma, beta, mean, tf.Variable(np.full(6, 1e-6, np.float32)))
    spec = tf.TensorSpec([2, 9, 9, 4], tf.float16, name="x")
    model = freeze(lambda x: fused_bn(conv(x, w), params, epsilon=1e-5), spec)

    result = fusion_ir.fuse(model, verify=False)

    assert "overflows float16" in reasons(result)[the_bn_name(model)]


def test_weight_through_op_numpy_lacks_folds():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, tf.reverse(w, axis=[0])), params), X_NHWC)
    assert "ReverseV2" in op_counts(model.graph_def)

    result = fuse_and_compare(model, SHAPE_NHWC)

    assert "FusedBatchNormV3" not in op_counts(result.graph_def)
    assert "ReverseV2" not in op_counts(result.graph_def)


def test_skip_glob_keeps_bn():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w), params), X_NHWC)
    conv_name = next(n.name for n in model.graph_def.node if n.op == "Conv2D")

    result = fusion_ir.fuse(model, verify=False, skip=[conv_name[:3] + "*"])

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "matches --skip" in reasons(result)[the_bn_name(model)]


def test_disable_family_keeps_bn():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w), params) * 2.0, X_NHWC)

    result = fusion_ir.fuse(model, verify=False, disable=["conv-bn"])

    assert op_counts(result.graph_def)["FusedBatchNormV3"] == 1
    assert "disabled (--disable conv-bn)" in reasons(result)[the_bn_name(model)]


def test_disable_unknown_family_rejected():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: fused_bn(conv(x, w), params), X_NHWC)

    with pytest.raises(fusion_ir.InputError, match="not a fusion family"):
        fusion_ir.fuse(model, verify=False, disable=["bogus"])
