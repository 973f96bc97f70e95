"""SavedModel folders and Keras files: load, fuse, compare against the Keras model, write a SavedModel."""

import numpy as np
import pytest

from conftest import op_counts, rel_max_error, tf

import fusion_ir
from fusion_ir.examples import randomize_batchnorm
from fusion_ir.numerics import run_graphdef

X = np.random.default_rng(5).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def keras3_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3), name="image"),
        keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, use_bias=False), keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, name="logits"),
    ])
    randomize_batchnorm(model, seed=3)
    return model


def fuse_and_check(model: fusion_ir.Model, expected: np.ndarray, tmp_path, output_name="fused.pb"):
    result = fusion_ir.fuse(model, tmp_path / output_name)
    assert result.verified is True
    assert result.report.num_fused == 2
    assert op_counts(result.graph_def)["Rsqrt"] + op_counts(result.graph_def)["FusedBatchNormV3"] == 0
    (actual,) = run_graphdef(result.graph_def, {model.inputs[0]: X}, model.outputs[:1])
    assert rel_max_error(expected, actual) <= 1e-5
    return result


def test_load_keras_file(keras3_model, tmp_path):
    path = tmp_path / "model.keras"
    keras3_model.save(path)

    model = fusion_ir.load(path)

    fuse_and_check(model, keras3_model(X, training=False).numpy(), tmp_path)


def test_load_saved_model(keras3_model, tmp_path):
    keras3_model.export(tmp_path / "saved", verbose=False)

    model = fusion_ir.load(tmp_path / "saved")

    fuse_and_check(model, keras3_model(X, training=False).numpy(), tmp_path)


def test_saved_model_written_back_runs(keras3_model, tmp_path):
    keras3_model.export(tmp_path / "saved", verbose=False)
    original = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    model = fusion_ir.load(tmp_path / "saved")

    fuse_and_check(model, keras3_model(X, training=False).numpy(), tmp_path, "fused_saved")

    fused = tf.saved_model.load(str(tmp_path / "fused_saved")).signatures["serving_default"]
    assert fused.structured_input_signature[1].keys() == original.structured_input_signature[1].keys()
    assert fused.structured_outputs.keys() == original.structured_outputs.keys()
    (key,) = original.structured_input_signature[1]
    expected = original(**{key: tf.constant(X)})
    actual = fused(**{key: tf.constant(X)})
    for name in expected:
        assert rel_max_error(expected[name].numpy(), actual[name].numpy()) <= 1e-5


def test_load_tf_keras_h5(tmp_path):
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    keras_model = tf_keras.Sequential([
        tf_keras.Input((16, 16, 3)), tf_keras.layers.Conv2D(8, 3), tf_keras.layers.BatchNormalization(),
        tf_keras.layers.ReLU(), tf_keras.layers.Conv2D(4, 1), tf_keras.layers.BatchNormalization(fused=False),
    ])
    randomize_batchnorm(keras_model, seed=4)
    keras_model.save(tmp_path / "model.h5")

    model = fusion_ir.load(tmp_path / "model.h5")

    fuse_and_check(model, keras_model(X, training=False).numpy(), tmp_path)


def test_folder_not_saved_model_rejected(tmp_path):
    (tmp_path / "stuff").mkdir()

    with pytest.raises(fusion_ir.InputError, match="not a SavedModel"):
        fusion_ir.load(tmp_path / "stuff")


def test_unknown_signature_rejected(keras3_model, tmp_path):
    keras3_model.export(tmp_path / "saved", verbose=False)

    with pytest.raises(fusion_ir.InputError, match="no signature 'nope'"):
        fusion_ir.load(tmp_path / "saved", signature="nope")
