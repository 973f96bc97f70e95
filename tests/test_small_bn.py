"""BatchNorm written as small ops (tf_keras fused=False, Keras 3): recognized and folded in ptq mode,
kept in qat mode."""

import numpy as np
import pytest

from conftest import freeze, fuse_and_compare, op_counts, reasons, statuses, tf

import fusion_ir
from fusion_ir.examples import freeze_keras_model, randomize_batchnorm

SMALL_OPS = ("Rsqrt", "Mul", "Sub", "Neg")


def keras_model(layers, input_shape, library="keras"):
    if library == "keras":
        import keras
    else:
        import tf_keras as keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(input_shape)] + layers(keras))
    randomize_batchnorm(model, seed=1)
    graph_def, inputs, outputs = freeze_keras_model(model, (None,) + tuple(input_shape))
    return fusion_ir.Model(graph_def, inputs, outputs)


def small_op_count(graph_def):
    counts = op_counts(graph_def)
    return sum(counts[op] for op in SMALL_OPS)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_tf_keras_unfused_bn_variants_fold(center, scale, use_bias):
    model = keras_model(lambda k: [k.layers.Conv2D(6, 3, use_bias=use_bias),
                                   k.layers.BatchNormalization(fused=False, center=center, scale=scale)],
                        (9, 9, 3), library="tf_keras")
    assert op_counts(model.graph_def)["Rsqrt"] == 1

    result = fuse_and_compare(model, {model.inputs[0]: (2, 9, 9, 3)})

    assert small_op_count(result.graph_def) == 0
    assert op_counts(result.graph_def)["Conv2D"] == 1
    (candidate,) = result.report.candidates.values()
    assert candidate.status == "fused"
    assert candidate.pattern.endswith("+BatchNorm(small ops)")


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_keras3_bn_variants_fold(center, scale):
    model = keras_model(lambda k: [k.layers.Conv2D(6, 3), k.layers.BatchNormalization(center=center, scale=scale),
                                   k.layers.ReLU()], (9, 9, 3))

    result = fuse_and_compare(model, {model.inputs[0]: (2, 9, 9, 3)})

    assert small_op_count(result.graph_def) == 0
    assert [c.status for c in result.report.candidates.values()] == ["fused"]


def test_keras3_depthwise_bn_folds():
    model = keras_model(lambda k: [k.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
                                   k.layers.BatchNormalization()], (9, 9, 3))

    result = fuse_and_compare(model, {model.inputs[0]: (2, 9, 9, 3)})

    assert small_op_count(result.graph_def) == 0
    assert result.report.num_fused == 1


def test_keras3_dense_bn_2d_folds():
    model = keras_model(lambda k: [k.layers.Dense(6), k.layers.BatchNormalization()], (5,))

    result = fuse_and_compare(model, {model.inputs[0]: (4, 5)})

    assert small_op_count(result.graph_def) == 0
    assert op_counts(result.graph_def)["MatMul"] == 1
    (candidate,) = result.report.candidates.values()
    assert candidate.pattern == "MatMul+BiasAdd+BatchNorm(small ops)"


def test_keras3_channels_first_bn_folds():
    model = keras_model(lambda k: [k.layers.Conv2D(6, 3, data_format="channels_first"),
                                   k.layers.BatchNormalization(axis=1)], (3, 9, 9))

    result = fuse_and_compare(model, {model.inputs[0]: (2, 3, 9, 9)})

    assert small_op_count(result.graph_def) == 0


def test_small_bn_kept_in_qat():
    model = keras_model(lambda k: [k.layers.Conv2D(6, 3), k.layers.BatchNormalization()], (9, 9, 3))
    before = small_op_count(model.graph_def)

    result = fuse_and_compare(model, {model.inputs[0]: (2, 9, 9, 3)}, mode="qat")

    assert small_op_count(result.graph_def) == before
    (candidate,) = result.report.candidates.values()
    assert candidate.status == "skipped"
    assert "qat mode keeps it" in candidate.reason


def test_small_bn_after_add_skipped_with_reason():
    model = keras_model(lambda k: [k.layers.Dense(6), k.layers.ReLU(), k.layers.BatchNormalization()], (5,))

    result = fuse_and_compare(model, {model.inputs[0]: (4, 5)})

    (candidate,) = result.report.candidates.values()
    assert candidate.pattern == "Relu+BatchNorm(small ops)"
    assert "not an op fusion-ir folds into" in candidate.reason


def test_small_bn_conv_with_second_consumer_skipped():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 3))
    y = keras.layers.Conv2D(6, 3)(inputs)
    out = keras.layers.Add()([keras.layers.BatchNormalization()(y), y])
    model = keras.Model(inputs, out)
    randomize_batchnorm(model, seed=1)
    graph_def, ins, outs = freeze_keras_model(model, (None, 9, 9, 3))
    fmodel = fusion_ir.Model(graph_def, ins, outs)

    result = fuse_and_compare(fmodel, {ins[0]: (2, 9, 9, 3)})

    (candidate,) = result.report.candidates.values()
    assert "consumers" in candidate.reason
    assert op_counts(result.graph_def)["Rsqrt"] == 1


def test_tf_nn_batch_normalization_nchw_vector_skipped():
    # tf.nn.batch_normalization with [C] statistics after an NCHW conv broadcasts along the width.
    w = tf.Variable(np.random.default_rng(0).uniform(-1, 1, (3, 3, 4, 7)).astype(np.float32))
    stats = [tf.Variable(np.random.default_rng(i).uniform(0.5, 1.5, 7).astype(np.float32)) for i in range(4)]
    spec = tf.TensorSpec([2, 4, 7, 7], tf.float32, name="x")

    def fn(x):
        y = tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", data_format="NCHW")
        return tf.nn.batch_normalization(y, stats[0], stats[1], stats[2], stats[3], 1e-3)

    model = freeze(fn, spec)

    result = fuse_and_compare(model, {"x:0": (2, 4, 7, 7)})

    (reason,) = reasons(result).values()
    assert "varies along output axis 3" in reason
