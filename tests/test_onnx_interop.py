"""TF <-> ONNX: a Keras 3 model through tf2onnx fused as ONNX, a TF model fused and written as ONNX,
fusion-ir convert, and fusion-ir verify on faithful and unfaithful pairs."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import bn_params, freeze, fused_bn, tf, variable

import fusion_ir
from converters.tf_to_onnx import graphdef_to_onnx
from fusion_ir.cli import main
from fusion_ir.examples import freeze_keras_model, randomize_batchnorm

X = tf.TensorSpec([2, 9, 9, 4], tf.float32, name="x")


def small_tf_model():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    return freeze(lambda x: tf.nn.relu(fused_bn(tf.nn.conv2d(x, w, 1, "SAME"), params)), X)


@pytest.fixture(scope="module")
def mobilenet_v2():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))
    randomize_batchnorm(model, seed=0)
    graph_def, inputs, outputs = freeze_keras_model(model, (None, 64, 64, 3))
    return fusion_ir.Model(graph_def, inputs, outputs)


@pytest.mark.slow
def test_keras3_onnx_bn_remnants_fold(mobilenet_v2):
    onnx_model = graphdef_to_onnx(mobilenet_v2.graph_def, mobilenet_v2.inputs, mobilenet_v2.outputs)
    before = Counter(n.op_type for n in onnx_model.graph.node)
    assert before["Mul"] > 0

    result = fusion_ir.fuse(fusion_ir.Model(onnx_model), input_shapes={mobilenet_v2.inputs[0]: (2, 64, 64, 3)})

    after = Counter(n.op_type for n in result.graph_def.graph.node)
    assert after["Mul"] == 0
    assert after["Conv"] == before["Conv"]
    assert result.report.num_skipped == 0
    assert result.verified is True
    assert all(c.rel_max_error <= 1e-5 for c in result.checks)
    onnx.checker.check_model(result.graph_def, full_check=True)


@pytest.mark.slow
def test_keras3_fused_as_tf_written_as_onnx(mobilenet_v2, tmp_path):
    result = fusion_ir.fuse(mobilenet_v2, tmp_path / "fused.onnx",
                            input_shapes={mobilenet_v2.inputs[0]: (2, 64, 64, 3)})

    backends = {c.backend for c in result.checks}
    assert backends == {"tensorflow", "onnxruntime"}
    assert all(c.ok and c.rel_max_error <= 1e-5 for c in result.checks)
    written = onnx.load(tmp_path / "fused.onnx")
    onnx.checker.check_model(written, full_check=True)


def test_convert_writes_onnx(tmp_path):
    path = tmp_path / "model.pb"
    path.write_bytes(small_tf_model().graph_def.SerializeToString())

    code = main(["convert", str(path), "-o", str(tmp_path / "model.onnx")])

    assert code == 0
    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)


def test_convert_rejects_non_onnx_output(tmp_path):
    path = tmp_path / "model.pb"
    path.write_bytes(small_tf_model().graph_def.SerializeToString())

    code = main(["convert", str(path), "-o", str(tmp_path / "model.pb2")])

    assert code == 2


def perturb_tf(graph_def):
    """Return a copy of `graph_def` with its conv filter scaled by 1.01."""
    changed = type(graph_def)()
    changed.CopyFrom(graph_def)
    conv = next(n for n in changed.node if n.op == "Conv2D")
    source = conv.input[1]
    while True:
        node = next(n for n in changed.node if n.name == source.split(":")[0])
        if node.op == "Const":
            break
        source = node.input[0]
    array = tf.make_ndarray(node.attr["value"].tensor) * 1.01
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(array.astype(np.float32)))
    return changed


def test_verify_single_tf_model_passes(tmp_path):
    path = tmp_path / "model.pb"
    path.write_bytes(small_tf_model().graph_def.SerializeToString())

    code = main(["verify", str(path), "--json", str(tmp_path / "v.json")])

    assert code == 0
    assert (tmp_path / "v.json").exists()


def test_verify_tf_pair(tmp_path):
    model = small_tf_model()
    (tmp_path / "a.pb").write_bytes(model.graph_def.SerializeToString())
    fused = fusion_ir.fuse(model, verify=False)
    (tmp_path / "b.pb").write_bytes(fused.graph_def.SerializeToString())
    (tmp_path / "c.pb").write_bytes(perturb_tf(model.graph_def).SerializeToString())

    assert main(["verify", str(tmp_path / "a.pb"), str(tmp_path / "b.pb")]) == 0
    assert main(["verify", str(tmp_path / "a.pb"), str(tmp_path / "c.pb")]) == 1


def test_verify_onnx_pair(tmp_path):
    model = small_tf_model()
    onnx_model = graphdef_to_onnx(model.graph_def, model.inputs, model.outputs)
    onnx.save(onnx_model, tmp_path / "a.onnx")
    weight = next(i for i in onnx_model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(onnx_model, tmp_path / "b.onnx")

    assert main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx")]) == 0
    assert main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 1


def test_verify_pairs_by_position(tmp_path, capsys):
    model = small_tf_model()
    onnx_model = graphdef_to_onnx(model.graph_def, model.inputs, model.outputs)
    onnx_model.graph.output[0].name = "renamed"
    onnx_model.graph.node[-1].output[0] = "renamed"
    onnx.save(onnx_model, tmp_path / "b.onnx")
    (tmp_path / "a.pb").write_bytes(model.graph_def.SerializeToString())

    code = main(["verify", str(tmp_path / "a.pb"), str(tmp_path / "b.onnx")])

    assert code == 0
    assert "-> renamed" in capsys.readouterr().out
