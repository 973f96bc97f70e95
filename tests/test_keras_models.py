"""Whole tf_keras.applications models (FusedBatchNormV3 form), random weights and BN statistics."""

import pytest

from conftest import op_counts, tf

import fusion_ir
from fusion_ir.examples import freeze_keras_model, randomize_batchnorm

BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def frozen_application(name: str, size: int) -> fusion_ir.Model:
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = getattr(tf_keras.applications, name)(weights=None, input_shape=(size, size, 3))
    assert randomize_batchnorm(model, seed=0) > 0
    graph_def, inputs, outputs = freeze_keras_model(model, (None, size, size, 3))
    return fusion_ir.Model(graph_def, inputs, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_application_every_bn_folds(name):
    model = frozen_application(name, 96)
    before = op_counts(model.graph_def)
    num_bn = sum(before[op] for op in BN_OPS)
    convs_before = before["Conv2D"] + before["DepthwiseConv2dNative"]

    result = fusion_ir.fuse(model, input_shapes={model.inputs[0]: (2, 96, 96, 3)})

    after = op_counts(result.graph_def)
    assert num_bn > 0
    assert sum(after[op] for op in BN_OPS) == 0
    assert result.report.num_fused == num_bn
    skipped_bn = [c for c in result.report.candidates.values() if "BatchNorm" in c.pattern and c.status == "skipped"]
    assert skipped_bn == []
    assert after["Conv2D"] + after["DepthwiseConv2dNative"] == convs_before
    assert result.verified is True
    for check in result.checks:
        assert check.rel_max_error <= 1e-5, check


def unfused_bn_clone(model):
    """Clone a tf_keras model with every BatchNormalization rebuilt as fused=False (small ops)."""
    import tf_keras

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            config["fused"] = False
        return layer.__class__.from_config(config)

    copy = tf_keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_application_unfused_bn_folds(name):
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    original = getattr(tf_keras.applications, name)(weights=None, input_shape=(96, 96, 3))
    randomize_batchnorm(original, seed=0)
    graph_def, inputs, outputs = freeze_keras_model(unfused_bn_clone(original), (None, 96, 96, 3))
    model = fusion_ir.Model(graph_def, inputs, outputs)
    before = op_counts(graph_def)
    assert before["Rsqrt"] > 0
    assert sum(before[op] for op in BN_OPS) == 0

    result = fusion_ir.fuse(model, input_shapes={inputs[0]: (2, 96, 96, 3)})

    after = op_counts(result.graph_def)
    assert after["Rsqrt"] == 0
    bn = [c for c in result.report.candidates.values() if "BatchNorm" in c.pattern]
    assert len(bn) == before["Rsqrt"]
    assert all(c.status == "fused" for c in bn)
    assert after["Conv2D"] + after["DepthwiseConv2dNative"] == before["Conv2D"] + before["DepthwiseConv2dNative"]
    assert result.verified is True
    for check in result.checks:
        assert check.rel_max_error <= 1e-5, check
