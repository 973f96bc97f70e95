"""Whole Keras 3 keras.applications models (BatchNorm as small ops), random weights and BN statistics.

Every BN whose producer is a conv or matmul used only by it folds; every other BN stays and the report
gives the reason (a BN after an Add, a pool or a Concat, or after a conv whose output has other users).
"""

import pytest

from conftest import op_counts

import fusion_ir
from fusion_ir.examples import freeze_keras_model, randomize_batchnorm

CONV_OPS = ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3D", "MatMul")
EXPECTED_SKIP_REASONS = ("not an op fusion-ir folds into", "consumers", "graph output")


def keras3_application(name: str, size: int) -> fusion_ir.Model:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    assert randomize_batchnorm(model, seed=0) > 0
    graph_def, inputs, outputs = freeze_keras_model(model, (None, size, size, 3))
    return fusion_ir.Model(graph_def, inputs, outputs)


def check_application(name: str, size: int):
    model = keras3_application(name, size)
    before = op_counts(model.graph_def)
    num_bn = before["Rsqrt"]
    assert num_bn > 0

    result = fusion_ir.fuse(model, input_shapes={model.inputs[0]: (2, size, size, 3)})

    after = op_counts(result.graph_def)
    bn = [c for c in result.report.candidates.values() if "BatchNorm" in c.pattern]
    fused = [c for c in bn if c.status == "fused"]
    skipped = [c for c in bn if c.status == "skipped"]
    assert len(bn) == num_bn
    assert after["Rsqrt"] == len(skipped)
    for candidate in skipped:
        assert any(r in candidate.reason for r in EXPECTED_SKIP_REASONS), candidate
    assert len(fused) > 0
    assert sum(after[op] for op in CONV_OPS) == sum(before[op] for op in CONV_OPS)
    assert result.verified is True
    for check in result.checks:
        assert check.rel_max_error <= 1e-5, check
    return result, skipped


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [
    ("ResNet50", 64), ("MobileNetV2", 64), ("EfficientNetB0", 64), ("MobileNetV3Small", 64),
    ("InceptionV3", 75), ("Xception", 71), ("NASNetMobile", 64),
])
def test_keras3_application_folds(name, size):
    result, skipped = check_application(name, size)
    if name in ("ResNet50", "MobileNetV2", "EfficientNetB0", "InceptionV3"):
        assert skipped == []


@pytest.mark.slow
def test_keras3_densenet121_bn_after_concat_skipped():
    result, skipped = check_application("DenseNet121", 64)

    assert len(skipped) > 0
    assert all("ConcatV2" in c.reason or "AvgPool" in c.reason or "MaxPool" in c.reason or "Relu" in c.reason
               for c in skipped), [c.reason for c in skipped][:3]


@pytest.mark.slow
def test_keras3_resnet152v2_preactivation_bn_skipped():
    result, skipped = check_application("ResNet152V2", 64)

    assert len(skipped) > 0
    assert all(c.pattern.split("+")[0] in ("AddV2", "Add", "MaxPool", "Relu") for c in skipped), \
        sorted({c.pattern for c in skipped})
