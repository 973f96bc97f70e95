"""Round-trip law: GraphDef -> IR -> GraphDef with no pass keeps every node, name and attribute, and
runs to bit-identical outputs."""

import numpy as np
import pytest

from conftest import bn_params, freeze, fused_bn, tf, variable

import fusion_ir
from converters.tf_graphdef import graphdef_to_ir, ir_to_graphdef
from fusion_ir.numerics import run_graphdef


def roundtrip(graph_def, **kwargs):
    return ir_to_graphdef(graphdef_to_ir(graph_def, **kwargs))


def assert_same_nodes(original, written):
    assert [n.name for n in written.node] == [n.name for n in original.node]
    for a, b in zip(original.node, written.node):
        assert a == b, f"node {a.name} changed"
    assert written.library == original.library
    assert written.versions == original.versions


def graph_with_control_and_library():
    """A TF1-style graph with control dependencies, a function library call and an int output."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [2, 3], name="x")
        ids = tf.compat.v1.placeholder(tf.int32, [4], name="ids")

        @tf.function
        def double_plus_one(t):
            return t * 2.0 + 1.0

        first = tf.identity(x, name="first")
        with tf.control_dependencies([first]):
            second = tf.multiply(double_plus_one(x), 3.0, name="second")
        count = tf.reduce_sum(ids, name="count")
        label = tf.constant("unused-string", name="label")
        del label
    return graph.as_graph_def(), ["second:0", "count:0"]


def test_roundtrip_control_inputs_and_library():
    graph_def, outputs = graph_with_control_and_library()
    assert len(graph_def.library.function) == 1
    assert any(i.startswith("^") for n in graph_def.node for i in n.input)

    written = roundtrip(graph_def)

    assert_same_nodes(graph_def, written)
    feeds = {"x:0": np.arange(6, dtype=np.float32).reshape(2, 3), "ids:0": np.arange(4, dtype=np.int32)}
    expected = run_graphdef(graph_def, feeds, outputs)
    actual = run_graphdef(written, feeds, outputs)
    for e, a in zip(expected, actual):
        assert np.array_equal(e, a)


def test_roundtrip_frozen_conv_bn_bit_identical():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    spec = tf.TensorSpec([None, 8, 8, 4], tf.float32, name="x")
    model = freeze(lambda x: tf.nn.relu(fused_bn(tf.nn.conv2d(x, w, 1, "SAME"), params)), spec)

    written = roundtrip(model.graph_def)

    assert_same_nodes(model.graph_def, written)
    assert written.SerializeToString(deterministic=True) == model.graph_def.SerializeToString(deterministic=True)


def test_roundtrip_text_format(tmp_path):
    graph_def, _ = graph_with_control_and_library()
    path = tmp_path / "model.pbtxt"
    fusion_ir.save(graph_def, path)

    loaded = fusion_ir.load(path)

    assert_same_nodes(graph_def, loaded.graph_def)


def test_roundtrip_keeps_io_names():
    graph_def, outputs = graph_with_control_and_library()

    graph = graphdef_to_ir(graph_def)

    assert [v.name for v in graph.inputs] == ["x:0", "ids:0"]
    assert set(outputs) <= {v.name for v in graph.outputs}


def test_roundtrip_explicit_inputs_outputs():
    graph_def, _ = graph_with_control_and_library()

    graph = graphdef_to_ir(graph_def, inputs=["x"], outputs=["second"])

    assert [v.name for v in graph.inputs] == ["x:0"]
    assert [v.name for v in graph.outputs] == ["second:0"]


def test_roundtrip_unknown_output_name_rejected():
    graph_def, _ = graph_with_control_and_library()

    with pytest.raises(fusion_ir.InputError, match="no_such_node"):
        graphdef_to_ir(graph_def, outputs=["no_such_node:0"])


@pytest.mark.slow
def test_roundtrip_keras_application():
    import tf_keras

    from fusion_ir.examples import freeze_keras_model

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3))
    graph_def, inputs, outputs = freeze_keras_model(model, (1, 64, 64, 3))

    written = roundtrip(graph_def)

    assert_same_nodes(graph_def, written)
    feeds = {inputs[0]: np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)}
    expected = run_graphdef(graph_def, feeds, outputs)
    actual = run_graphdef(written, feeds, outputs)
    assert np.array_equal(expected[0], actual[0])


def test_streamed_graphdef_matches_serialized():
    from converters.tf_graphdef import ir_to_graphdef_chunks
    from passes.manager import run_pipeline

    w, params = variable(3, 3, 4, 6), bn_params(6)
    spec = tf.TensorSpec([None, 8, 8, 4], tf.float32, name="x")
    model = freeze(lambda x: tf.nn.relu(fused_bn(tf.nn.conv2d(x, w, 1, "SAME"), params)), spec)
    graph = graphdef_to_ir(model.graph_def)
    unchanged = type(model.graph_def)()
    unchanged.ParseFromString(b"".join(ir_to_graphdef_chunks(graph)))

    run_pipeline(graph)

    fused = type(model.graph_def)()
    fused.ParseFromString(b"".join(ir_to_graphdef_chunks(graph)))
    assert unchanged == model.graph_def
    assert fused == ir_to_graphdef(graph)
    assert "FusedBatchNormV3" not in {n.op for n in fused.node}


def test_roundtrip_library_streamed():
    from converters.tf_graphdef import ir_to_graphdef_chunks

    graph_def, _ = graph_with_control_and_library()

    streamed = type(graph_def)()
    streamed.ParseFromString(b"".join(ir_to_graphdef_chunks(graphdef_to_ir(graph_def))))

    assert streamed == graph_def
