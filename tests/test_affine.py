"""OP + (BiasAdd) + Mul/Add/Sub by a constant: scalar and per-channel folds, and what must not fold."""

import numpy as np
import pytest

from conftest import bn_params, freeze, fuse_and_compare, fused_bn, op_counts, reasons, statuses, tf, variable

import fusion_ir

X4 = tf.TensorSpec([2, 7, 7, 4], tf.float32, name="x")
SHAPE4 = {"x:0": (2, 7, 7, 4)}
X2 = tf.TensorSpec([3, 5], tf.float32, name="x")
SHAPE2 = {"x:0": (3, 5)}


def conv(x, w, data_format="NHWC"):
    return tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", data_format=data_format)


def anchor_named(model, op):
    return [n.name for n in model.graph_def.node if n.op == op][-1]


def test_conv_scalar_mul_folds():
    w = variable(3, 3, 4, 6)
    model = freeze(lambda x: conv(x, w) * 0.5, X4)
    mul_name = anchor_named(model, "Mul")

    result = fuse_and_compare(model, SHAPE4)

    counts = op_counts(result.graph_def)
    assert "Mul" not in counts
    assert counts["Conv2D"] == 1
    assert "BiasAdd" not in counts
    assert statuses(result) == {mul_name: "fused"}
    assert any(n.name == mul_name and n.op == "Conv2D" for n in result.graph_def.node)


def test_conv_biasadd_scalar_mul_folds():
    w, b = variable(3, 3, 4, 6), variable(6)
    model = freeze(lambda x: tf.nn.relu(tf.nn.bias_add(conv(x, w), b) * -1.5), X4)

    result = fuse_and_compare(model, SHAPE4)

    counts = op_counts(result.graph_def)
    assert "Mul" not in counts
    assert counts["BiasAdd"] == 1
    assert result.report.candidates[anchor_named(model, "Mul")].pattern == "Conv2D+BiasAdd+Mul"


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_biasadd_scalar_mul_folds(transpose_b):
    w = variable(6, 5) if transpose_b else variable(5, 6)
    b = variable(6)
    model = freeze(lambda x: tf.nn.bias_add(tf.linalg.matmul(x, w, transpose_b=transpose_b), b) * 3.0, X2)

    result = fuse_and_compare(model, SHAPE2)

    assert "Mul" not in op_counts(result.graph_def)
    assert result.report.num_fused == 1


def test_depthwise_scalar_mul_folds():
    w = variable(3, 3, 4, 2)
    model = freeze(lambda x: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME") * 0.25, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert "Mul" not in op_counts(result.graph_def)


def deconv(x, w, data_format="NHWC"):
    """Conv2DBackpropInput with a [H, W, out, in] filter: 4 input channels to 6 output channels."""
    sizes = [2, 14, 14, 6] if data_format == "NHWC" else [2, 6, 14, 14]
    strides = [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2]
    return tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=w, out_backprop=x, strides=strides,
                                          padding="SAME", data_format=data_format)


def test_deconv_biasadd_scalar_mul_folds():
    w, b = variable(3, 3, 6, 4), variable(6)
    model = freeze(lambda x: tf.nn.bias_add(deconv(x, w), b) * 0.7, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert "Mul" not in op_counts(result.graph_def)
    assert result.report.num_fused == 1


def test_conv_per_channel_mul_add_fold_in_ptq():
    w = variable(3, 3, 4, 6)
    scale, shift = variable(6, low=0.5, high=2.0), variable(1, 1, 1, 6)
    model = freeze(lambda x: conv(x, w) * scale + shift, X4)

    result = fuse_and_compare(model, SHAPE4)

    counts = op_counts(result.graph_def)
    assert "Mul" not in counts
    # The Add of a per-channel constant right after the conv is its bias, so it stays.
    assert counts["AddV2"] == 1
    assert result.report.num_fused == 1


def test_conv_biasadd_sub_constant_folds():
    w, b, c = variable(3, 3, 4, 6), variable(6), variable(6)
    model = freeze(lambda x: tf.nn.bias_add(conv(x, w), b) - c, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert "Sub" not in op_counts(result.graph_def)


def test_constant_minus_conv_folds():
    w, b, c = variable(3, 3, 4, 6), variable(6), variable(6)
    model = freeze(lambda x: c - tf.nn.bias_add(conv(x, w), b), X4)

    result = fuse_and_compare(model, SHAPE4)

    assert "Sub" not in op_counts(result.graph_def)


def test_per_channel_mul_kept_in_qat():
    w, scale = variable(3, 3, 4, 6), variable(6)
    model = freeze(lambda x: conv(x, w) * scale, X4)

    result = fuse_and_compare(model, SHAPE4, mode="qat")

    assert op_counts(result.graph_def)["Mul"] == 1
    assert "qat mode keeps it" in reasons(result)[anchor_named(model, "Mul")]


def test_scalar_mul_folds_in_qat():
    w = variable(3, 3, 4, 6)
    model = freeze(lambda x: conv(x, w) * 2.0, X4)

    result = fuse_and_compare(model, SHAPE4, mode="qat")

    assert "Mul" not in op_counts(result.graph_def)


def test_mul_by_non_constant_skipped():
    w = variable(3, 3, 4, 6)
    spec_s = tf.TensorSpec([6], tf.float32, name="s")
    model = freeze(lambda x, s: conv(x, w) * s, X4, spec_s)

    result = fusion_ir.fuse(model, verify=False)

    assert op_counts(result.graph_def)["Mul"] == 1
    assert "is not constant" in reasons(result)[anchor_named(model, "Mul")]


def test_mul_by_spatial_constant_skipped():
    w = variable(3, 3, 4, 6)
    spatial = variable(7, 1, 1)
    model = freeze(lambda x: conv(x, w) * spatial, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert op_counts(result.graph_def)["Mul"] == 1
    assert "varies along output axis 1" in reasons(result)[anchor_named(model, "Mul")]


def test_nchw_bare_vector_mul_skipped():
    w = variable(3, 3, 4, 6)
    per_width = variable(7)
    spec = tf.TensorSpec([2, 4, 7, 7], tf.float32, name="x")
    model = freeze(lambda x: conv(x, w, "NCHW") * per_width, spec)

    result = fuse_and_compare(model, {"x:0": (2, 4, 7, 7)})

    assert op_counts(result.graph_def)["Mul"] == 1
    assert "varies along output axis 3" in reasons(result)[anchor_named(model, "Mul")]


def test_nchw_channel_constant_mul_folds():
    w = variable(3, 3, 4, 6)
    per_channel = variable(6, 1, 1)
    spec = tf.TensorSpec([2, 4, 7, 7], tf.float32, name="x")
    model = freeze(lambda x: conv(x, w, "NCHW") * per_channel, spec)

    result = fuse_and_compare(model, {"x:0": (2, 4, 7, 7)})

    assert "Mul" not in op_counts(result.graph_def)


def test_mul_with_second_consumer_on_conv_skipped():
    w = variable(3, 3, 4, 6)

    def fn(x):
        y = conv(x, w)
        return y * 2.0, tf.nn.relu(y)

    model = freeze(fn, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert "has 2 consumers" in reasons(result)[anchor_named(model, "Mul")]


def test_residual_add_is_not_a_candidate():
    w, b = variable(3, 3, 4, 4), variable(4)
    model = freeze(lambda x: tf.nn.bias_add(conv(x, w), b) + x, X4)

    result = fuse_and_compare(model, SHAPE4)

    assert result.report.candidates == {}
    assert op_counts(result.graph_def)["AddV2"] == 1


def test_bn_then_mul_folds_completely():
    w, b, params = variable(3, 3, 4, 6), variable(6), bn_params(6)
    model = freeze(lambda x: fused_bn(tf.nn.bias_add(conv(x, w), b), params) * 0.5, X4)

    result = fuse_and_compare(model, SHAPE4)

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert "Mul" not in counts
    assert counts["BiasAdd"] == 1
    assert result.report.num_fused == 2


@pytest.mark.parametrize("dtype", [np.float16, tf.bfloat16.as_numpy_dtype])
def test_low_precision_scalar_mul_folds(dtype):
    w = tf.Variable(np.random.default_rng(0).uniform(-1, 1, (3, 3, 4, 6)).astype(dtype))
    tf_dtype = tf.as_dtype(dtype)
    spec = tf.TensorSpec([2, 7, 7, 4], tf_dtype, name="x")
    model = freeze(lambda x: conv(x, w) * tf.constant(0.5, tf_dtype), spec)

    result = fusion_ir.fuse(model, verify=False)

    assert "Mul" not in op_counts(result.graph_def)
    folded = next(n for n in result.graph_def.node if n.name.endswith("folded_weight"))
    assert folded.attr["dtype"].type == tf_dtype.as_datatype_enum


def test_nchw_biasadd_after_bias_folds():
    w, b, c = variable(3, 3, 4, 6), variable(6), variable(6)
    spec = tf.TensorSpec([2, 4, 7, 7], tf.float32, name="x")
    model = freeze(lambda x: tf.nn.bias_add(tf.nn.bias_add(conv(x, w, "NCHW"), b, "NCHW"), c, "NCHW"), spec)

    result = fuse_and_compare(model, {"x:0": (2, 4, 7, 7)})

    assert op_counts(result.graph_def)["BiasAdd"] == 1
    assert result.report.num_fused == 1


def test_biasadd_on_other_axis_skipped():
    w, b, c = variable(3, 3, 4, 6), variable(6), variable(7)
    model = freeze(lambda x: tf.nn.bias_add(tf.nn.bias_add(conv(x, w), b), c, "NCHW"), X4)

    result = fuse_and_compare(model, SHAPE4)

    assert op_counts(result.graph_def)["BiasAdd"] == 2
    assert "along output axis 1, not the channel axis 3" in list(reasons(result).values())[0]
