"""Unusual but valid input succeeds; bad ONNX input fails with one clear line."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import bn_params, freeze, fuse_and_compare, fused_bn, op_counts, tf, variable

import fusion_ir
from fusion_ir.cli import main

X = tf.TensorSpec([None, 9, 9, 4], tf.float32, name="x")


def conv_bn(x, w, params):
    return fused_bn(tf.nn.conv2d(x, w, 1, "SAME"), params)


def test_while_loop_and_cond_graph_fuses():
    w, params = variable(3, 3, 4, 4), bn_params(4)

    def fn(x):
        y = conv_bn(x, w, params)
        y = tf.while_loop(lambda i, t: i < 3, lambda i, t: (i + 1, tf.nn.relu(t) * 0.5), (tf.constant(0), y))[1]
        return tf.cond(tf.reduce_sum(y) > 0, lambda: y + 1.0, lambda: y - 1.0)

    # Freezing lowers the loop to TF1 control flow: Enter, Merge, Switch, NextIteration, Exit.
    model = freeze(fn, X)
    assert op_counts(model.graph_def)["NextIteration"] > 0

    result = fuse_and_compare(model, {"x:0": (2, 9, 9, 4)})

    counts = op_counts(result.graph_def)
    assert "FusedBatchNormV3" not in counts
    assert counts["Merge"] == op_counts(model.graph_def)["Merge"]


def test_several_inputs_outputs_and_int_tensors():
    w, params = variable(3, 3, 4, 6), bn_params(6)
    ids_spec = tf.TensorSpec([3], tf.int32, name="ids")

    def fn(x, ids):
        y = conv_bn(x, w, params)
        return y, tf.reduce_sum(ids) * 2, tf.strings.as_string(ids)

    model = freeze(fn, X, ids_spec)

    result = fusion_ir.fuse(model, input_shapes={"x:0": (2, 9, 9, 4)})

    assert result.verified is True
    assert "FusedBatchNormV3" not in op_counts(result.graph_def)
    assert len(result.checks) == 3
    assert all(c.ok for c in result.checks)


def test_unknown_tf_op_fuses_with_warning(tmp_path, capsys):
    w, params = variable(3, 3, 4, 6), bn_params(6)
    model = freeze(lambda x: tf.nn.relu(conv_bn(x, w, params)), X)
    relu = next(n for n in model.graph_def.node if n.op == "Relu")
    relu.op = "MyCustomRelu"
    (tmp_path / "model.pb").write_bytes(model.graph_def.SerializeToString())

    code = main(["fuse", str(tmp_path / "model.pb"), "-o", str(tmp_path / "out.pb")])

    err = capsys.readouterr().err
    assert code == 0
    assert err.startswith("warning: verification skipped")
    assert "MyCustomRelu" in err


def test_onnx_named_pb_loads_as_onnx(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    onnx.save(helper.make_model(graph), tmp_path / "model.pb")

    model = fusion_ir.load(tmp_path / "model.pb")

    assert model.format == "onnx"


def test_truncated_onnx_rejected(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    data = helper.make_model(graph).SerializeToString()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 2])

    code = main(["fuse", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "not a valid ONNX model" in err
    assert not (tmp_path / "out.onnx").exists()


def test_onnx_missing_external_data_rejected(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((64, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 6, 6])], [w])
    onnx.save_model(helper.make_model(graph), tmp_path / "model.onnx", save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()

    code = main(["fuse", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx")])

    err = capsys.readouterr().err
    assert code == 2
    assert "weights.bin" in err
    assert err.count("\n") == 1


def test_onnx_if_subgraph_model_fuses():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32), "w")]
    for name, values in (("s", rng.uniform(0.5, 1.5, 4)), ("b", rng.normal(0, 1, 4)), ("m", rng.normal(0, 1, 4)),
                         ("v", rng.uniform(0.5, 2, 4))):
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    then_branch = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 6, 6])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4, 6, 6])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("ReduceSum", ["y"], ["total"], name="sum", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["flag"], name="gt"),
             helper.make_node("If", ["flag"], ["out"], name="if", then_branch=then_branch, else_branch=else_branch)]
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = fusion_ir.Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    result = fusion_ir.fuse(model)

    assert result.verified is True
    assert "BatchNormalization" not in {n.op_type for n in result.graph_def.graph.node}
    onnx.checker.check_model(result.graph_def, full_check=True)
