"""Round-trip law for ONNX: ModelProto -> IR -> ModelProto with no pass keeps every node, name, initializer,
opset, function and metadata field, passes the full ONNX checker, and runs in onnxruntime to bit-identical
outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.onnx_model import ir_to_onnx, load_onnx, looks_like_onnx, onnx_to_ir, save_onnx
from fusion_ir.errors import InputError
from fusion_ir.ir import Opaque

OPSET = 17
IR_VERSION = 8
RNG = np.random.default_rng(7)


def random(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def make_model(nodes, inputs, outputs, initializers=(), opsets=None, **kwargs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = opsets or [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=kwargs.pop("ir_version", IR_VERSION),
                              **kwargs)
    return model


def run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def roundtrip(model, **kwargs):
    return ir_to_onnx(onnx_to_ir(model, **kwargs))


def node_signature(model):
    return [(n.name, n.op_type, n.domain, list(n.input), list(n.output)) for n in model.graph.node]


def assert_roundtrip(model, feeds, full_check=True):
    """Round-trip `model` with no pass and check structure, checker and onnxruntime outputs."""
    onnx.checker.check_model(model, full_check=full_check)

    written = roundtrip(model)

    onnx.checker.check_model(written, full_check=full_check)
    assert node_signature(written) == node_signature(model)
    assert [t.name for t in written.graph.initializer] == [t.name for t in model.graph.initializer]
    assert list(written.opset_import) == list(model.opset_import)
    assert list(written.metadata_props) == list(model.metadata_props)
    assert list(written.functions) == list(model.functions)
    assert list(written.graph.input) == list(model.graph.input)
    assert list(written.graph.output) == list(model.graph.output)
    assert list(written.graph.value_info) == list(model.graph.value_info)
    assert written.SerializeToString() == model.SerializeToString()
    expected = run(model, feeds)
    actual = run(written, feeds)
    for e, a in zip(expected, actual):
        assert np.array_equal(e, a)
    return written


# -- models ----------------------------------------------------------------------------------------


def conv_bn_relu_model():
    channels = 4
    initializers = [
        numpy_helper.from_array(random(channels, 3, 3, 3), "W"),
        numpy_helper.from_array(random(channels), "B"),
        numpy_helper.from_array(RNG.uniform(0.5, 1.5, channels).astype(np.float32), "gamma"),
        numpy_helper.from_array(random(channels), "beta"),
        numpy_helper.from_array(random(channels), "mean"),
        numpy_helper.from_array(RNG.uniform(0.5, 2.0, channels).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1],
                         strides=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["bn_out"],
                         name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 8, 8])]
    return make_model(nodes, inputs, outputs, initializers), {"x": random(2, 3, 8, 8)}


def constant_nodes_model():
    """Constant nodes in every dense form, one between two ordinary nodes."""
    nodes = [
        helper.make_node("Constant", [], ["scale"], name="scale_const",
                         value=numpy_helper.from_array(random(2, 3), "scale_tensor")),
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="mul"),
        helper.make_node("Constant", [], ["offset"], name="offset_const", value_float=0.25),
        helper.make_node("Add", ["scaled", "offset"], ["shifted"], name="add"),
        helper.make_node("Constant", [], ["new_shape"], name="shape_const", value_ints=[3, 2]),
        helper.make_node("Reshape", ["shifted", "new_shape"], ["y"], name="reshape"),
        helper.make_node("Constant", [], ["unused"], name="unused_const", value_int=5),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])]
    return make_model(nodes, inputs, outputs), {"x": random(2, 3)}


def if_model():
    """An If whose branches read main-graph values, one branch with a nested If."""
    shape = [2, 3]
    inner_then = helper.make_graph(
        [helper.make_node("Mul", ["t1", "W2"], ["inner_then_out"], name="inner_mul")], "inner_then", [],
        [helper.make_tensor_value_info("inner_then_out", TensorProto.FLOAT, shape)])
    inner_else = helper.make_graph(
        [helper.make_node("Sub", ["t1", "W2"], ["inner_else_out"], name="inner_sub")], "inner_else", [],
        [helper.make_tensor_value_info("inner_else_out", TensorProto.FLOAT, shape)])
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["t1"], name="then_add"),
         helper.make_node("If", ["cond"], ["then_out"], name="inner_if", then_branch=inner_then,
                          else_branch=inner_else)],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, shape)])
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["relu_x", "W"], ["else_out"], name="else_mul")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, shape)])
    nodes = [
        helper.make_node("Relu", ["x"], ["relu_x"], name="relu"),
        helper.make_node("If", ["cond"], ["if_out"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Neg", ["if_out"], ["y"], name="neg"),
    ]
    initializers = [numpy_helper.from_array(random(*shape), "W"), numpy_helper.from_array(random(*shape), "W2")]
    inputs = [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    return make_model(nodes, inputs, outputs, initializers), {"x": random(*shape)}


def function_model():
    """A node calling a local function in a custom domain."""
    function = helper.make_function(
        "local.ops", "ScaleAdd", ["X", "S"], ["Y"],
        [helper.make_node("Mul", ["X", "S"], ["XS"]), helper.make_node("Add", ["XS", "X"], ["Y"])],
        [helper.make_opsetid("", OPSET)], doc_string="Y = X * S + X")
    nodes = [helper.make_node("ScaleAdd", ["x", "S"], ["y"], name="scale_add", domain="local.ops")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("local.ops", 1)]
    model = make_model(nodes, inputs, outputs, [numpy_helper.from_array(random(4), "S")], opsets=opsets,
                       functions=[function])
    return model, {"x": random(4)}


def metadata_model():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["hidden"], name="sigmoid", doc_string="squash to (0, 1)"),
        helper.make_node("Mul", ["hidden", "x"], ["y"], name="swish"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])]
    model = make_model(nodes, inputs, outputs, producer_name="fusion-ir-tests", producer_version="1.2",
                       domain="org.example", model_version=3, doc_string="a swish model")
    model.graph.doc_string = "swish graph"
    model.graph.node[0].metadata_props.add(key="origin", value="activation")
    model.graph.value_info.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", 5]))
    helper.set_model_props(model, {"author": "tests", "license": "Apache-2.0"})
    return model, {"x": random(3, 5)}


def optional_inputs_model():
    """Clip with an omitted min, and Dropout with its optional mask output omitted."""
    initializers = [numpy_helper.from_array(np.array(0.5, np.float32), "max")]
    nodes = [
        helper.make_node("Clip", ["x", "", "max"], ["clipped"], name="clip"),
        helper.make_node("Dropout", ["clipped"], ["y", ""], name="dropout"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])]
    return make_model(nodes, inputs, outputs, initializers), {"x": random(6)}


def matmul_model(weight_name="W"):
    initializers = [numpy_helper.from_array(random(64, 32), weight_name), numpy_helper.from_array(random(32), "bias")]
    nodes = [helper.make_node("MatMul", ["x", weight_name], ["mm"], name="matmul"),
             helper.make_node("Add", ["mm", "bias"], ["y"], name="add")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])]
    return make_model(nodes, inputs, outputs, initializers), {"x": random(2, 64)}


# -- round trips -----------------------------------------------------------------------------------


def test_conv_bn_relu_roundtrip():
    model, feeds = conv_bn_relu_model()

    assert_roundtrip(model, feeds)


def test_conv_bn_relu_ir_contents():
    model, _ = conv_bn_relu_model()

    graph = onnx_to_ir(model)

    assert graph.dialect == "onnx"
    assert [n.name for n in graph.nodes] == ["conv", "bn", "relu"]
    assert list(graph.constants) == ["W", "B", "gamma", "beta", "mean", "var"]
    assert [v.name for v in graph.inputs] == ["x"]
    assert [v.name for v in graph.outputs] == ["y"]
    assert graph.inputs[0].shape == (None, 3, 8, 8)
    assert graph.inputs[0].dtype == np.float32
    conv = graph.node("conv")
    assert conv.attrs == {"pads": [1, 1, 1, 1], "strides": [1, 1], "kernel_shape": [3, 3]}
    assert conv.outputs[0].name == "conv_out"
    assert graph.node("bn").attrs["epsilon"] == pytest.approx(1e-3)
    assert graph.validate() == []
    assert graph.meta["opset_import"] == {"": OPSET}


def test_initializer_decoded_lazily_read_only():
    model, _ = conv_bn_relu_model()
    graph = onnx_to_ir(model)
    weight = graph.constants["W"]

    assert weight.origin is model.graph.initializer[0]
    assert weight.dtype == np.float32
    assert weight.shape == (4, 3, 3, 3)
    array = weight.const
    assert not array.flags.writeable
    assert np.array_equal(array, numpy_helper.to_array(model.graph.initializer[0]))


def test_constant_nodes_roundtrip():
    model, feeds = constant_nodes_model()

    written = assert_roundtrip(model, feeds)

    assert [n.op_type for n in written.graph.node].count("Constant") == 4
    assert len(written.graph.initializer) == 0


def test_constant_nodes_become_constants():
    model, _ = constant_nodes_model()

    graph = onnx_to_ir(model)

    assert set(graph.constants) == {"scale", "offset", "new_shape", "unused"}
    assert [n.op for n in graph.nodes] == ["Mul", "Add", "Reshape"]
    assert graph.constants["offset"].const.dtype == np.float32
    assert graph.constants["offset"].const.shape == ()
    assert graph.constants["new_shape"].const.tolist() == [3, 2]
    assert graph.constants["unused"].const == 5
    assert graph.constants["scale"].origin is model.graph.node[0]


def test_if_subgraphs_roundtrip():
    model, feeds = if_model()

    for cond in (True, False):
        assert_roundtrip(model, {**feeds, "cond": np.array(cond)})


def test_if_subgraph_reads_are_uses():
    model, _ = if_model()

    graph = onnx_to_ir(model)

    # helper.make_node sorts attributes by name, so else_branch comes before then_branch.
    refs = ["relu_x", "W", "x", "cond", "W2"]
    if_node = graph.node("if")
    assert if_node.extra["subgraph_refs"] == refs
    assert graph.meta["subgraph_refs"] == {"if": refs}
    assert [v.name for v in if_node.inputs] == ["cond"] + refs
    assert graph.constants["W2"].num_uses == 1
    assert {"W", "W2"} <= graph.meta["keep_constants"]
    assert "relu" in graph.meta["keep_nodes"]
    assert graph.validate() == []


def test_if_subgraph_values_survive_remove_dead():
    model, feeds = if_model()
    graph = onnx_to_ir(model)

    removed = graph.remove_dead(lambda node: True)
    written = ir_to_onnx(graph)

    assert removed == 0
    assert set(graph.constants) == {"W", "W2"}
    feeds["cond"] = np.array(False)
    assert np.array_equal(run(written, feeds)[0], run(model, feeds)[0])


def test_if_rewired_outer_value_renamed_in_subgraph():
    model, feeds = if_model()
    graph = onnx_to_ir(model)
    replacement = graph.add_constant("W_doubled", np.asarray(graph.constants["W2"].const) * 2)

    graph.replace_all_uses(graph.constants["W2"], replacement)
    written = ir_to_onnx(graph)

    onnx.checker.check_model(written, full_check=True)
    then_branch = next(a.g for a in written.graph.node[1].attribute if a.name == "then_branch")
    inner_if = then_branch.node[1]
    inner_then = next(a.g for a in inner_if.attribute if a.name == "then_branch")
    assert list(inner_then.node[0].input) == ["t1", "W_doubled"]
    feeds["cond"] = np.array(True)
    x, w, w2 = feeds["x"], graph.constants["W"].const, graph.constants["W2"].const
    expected = -((x + w) * (w2 * 2))
    assert np.array_equal(run(written, feeds)[0], expected)


def test_function_and_custom_domain_roundtrip():
    model, feeds = function_model()

    written = assert_roundtrip(model, feeds)

    assert written.graph.node[0].domain == "local.ops"
    assert written.functions[0].name == "ScaleAdd"


def test_function_node_domain_in_ir():
    model, _ = function_model()

    graph = onnx_to_ir(model)

    assert graph.node("scale_add").extra["domain"] == "local.ops"
    assert graph.meta["opset_import"] == {"": OPSET, "local.ops": 1}
    assert [f.name for f in graph.meta["functions"]] == ["ScaleAdd"]


def test_metadata_roundtrip():
    model, feeds = metadata_model()

    written = assert_roundtrip(model, feeds)

    assert written.producer_name == "fusion-ir-tests"
    assert written.producer_version == "1.2"
    assert written.domain == "org.example"
    assert written.model_version == 3
    assert written.doc_string == "a swish model"
    assert written.graph.doc_string == "swish graph"
    assert written.graph.node[0].doc_string == "squash to (0, 1)"
    assert [(p.key, p.value) for p in written.graph.node[0].metadata_props] == [("origin", "activation")]
    assert {p.key: p.value for p in written.metadata_props} == {"author": "tests", "license": "Apache-2.0"}


def test_attribute_types_roundtrip():
    probe = helper.make_node("Probe", ["x"], ["y"], name="probe", domain="test.attrs", count=3, ratio=0.5,
                             mode="text", sizes=[1, 2], scales=[0.25], labels=["a", "b"],
                             table=numpy_helper.from_array(np.arange(3, dtype=np.int32), "table"))
    probe.attribute.append(helper.make_attribute("empty", [], attr_type=onnx.AttributeProto.INTS))
    probe.attribute.append(onnx.AttributeProto(name="raw", type=onnx.AttributeProto.STRING, s=b"\xff\xfe"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("test.attrs", 1)]
    model = make_model([probe], inputs, outputs, opsets=opsets)

    graph = onnx_to_ir(model)
    written = ir_to_onnx(graph)

    attrs = graph.node("probe").attrs
    assert attrs["count"] == 3
    assert attrs["ratio"] == 0.5
    assert attrs["mode"] == "text"
    assert attrs["sizes"] == [1, 2]
    assert attrs["scales"] == [0.25]
    assert attrs["labels"] == ["a", "b"]
    assert attrs["empty"] == []
    assert isinstance(attrs["table"], Opaque)
    assert isinstance(attrs["raw"], Opaque)
    assert written.SerializeToString() == model.SerializeToString()


def test_changed_attributes_keep_their_types():
    probe = helper.make_node("Probe", ["x"], ["y"], name="probe", domain="test.attrs", ratio=0.5,
                             scales=[0.25], sizes=[1])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("test.attrs", 1)]
    graph = onnx_to_ir(make_model([probe], inputs, outputs, opsets=opsets))
    node = graph.node("probe")

    node.attrs["ratio"] = 2
    node.attrs["scales"] = [1, 2]
    node.attrs["sizes"] = []
    written = {a.name: a for a in ir_to_onnx(graph).graph.node[0].attribute}

    assert written["ratio"].type == onnx.AttributeProto.FLOAT
    assert written["ratio"].f == 2.0
    assert written["scales"].type == onnx.AttributeProto.FLOATS
    assert list(written["scales"].floats) == [1.0, 2.0]
    assert written["sizes"].type == onnx.AttributeProto.INTS
    assert list(written["sizes"].ints) == []


def test_value_info_sets_shapes():
    model, _ = metadata_model()

    graph = onnx_to_ir(model)

    hidden = graph.node("sigmoid").outputs[0]
    assert hidden.name == "hidden"
    assert hidden.dtype == np.float32
    assert hidden.shape == (None, 5)
    assert graph.node("swish").outputs[0].shape == (None, 5)


def test_omitted_optional_input_roundtrip():
    model, feeds = optional_inputs_model()

    assert_roundtrip(model, feeds)


def test_omitted_optional_input_is_none():
    model, _ = optional_inputs_model()

    graph = onnx_to_ir(model)

    clip = graph.node("clip")
    assert clip.inputs[1] is None
    assert [v.name for v in clip.inputs if v is not None] == ["x", "max"]
    dropout = graph.node("dropout")
    assert [v.name for v in dropout.outputs] == ["y", ""]


def test_unnamed_nodes_roundtrip():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Abs", ["b"], ["c"]),
        helper.make_node("Exp", ["c"], ["y"], name="Relu_0"),
    ]
    # make_node leaves the name field unset; this node has it set to "".
    nodes[2].name = ""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    model = make_model(nodes, inputs, outputs)

    graph = onnx_to_ir(model)
    assert_roundtrip(model, {"x": random(3)})

    names = [n.name for n in graph.nodes]
    assert len(set(names)) == 4
    assert names[1] == "neg"
    assert names[3] == "Relu_0"
    assert [n.extra.get("onnx_name", "kept") for n in graph.nodes] == [None, "kept", "", "kept"]


def test_duplicate_node_names_roundtrip():
    # The ONNX checker accepts duplicate node names, but onnxruntime 1.32 rejects them, so this
    # round trip is checked without running it.
    nodes = [
        helper.make_node("Neg", ["x"], ["b"], name="dup"),
        helper.make_node("Abs", ["b"], ["y"], name="dup"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    model = make_model(nodes, inputs, outputs)

    graph = onnx_to_ir(model)
    written = roundtrip(model)

    onnx.checker.check_model(written, full_check=True)
    assert written.SerializeToString() == model.SerializeToString()
    assert [n.name for n in graph.nodes] == ["dup", "Abs_0"]
    assert graph.node("Abs_0").extra["onnx_name"] == "dup"


def test_initializer_graph_inputs_roundtrip():
    """IR version 3 models list every initializer among the graph inputs."""
    model, feeds = matmul_model()
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 9))

    assert_roundtrip(model, feeds)
    graph = onnx_to_ir(model)

    assert [v.name for v in graph.inputs] == ["x"]
    assert set(graph.constants) == {"W", "bias"}
    assert graph.meta["initializer_inputs"] == {"W", "bias"}


def test_initializer_graph_input_requested_as_input():
    model, feeds = matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 32]))

    graph = onnx_to_ir(model, inputs=["x", "W"])
    written = ir_to_onnx(graph)

    assert [v.name for v in graph.inputs] == ["x", "W"]
    assert not graph.inputs[1].is_const
    assert "W" not in graph.constants
    assert written.SerializeToString() == model.SerializeToString()
    other_weight = random(64, 32)
    assert np.array_equal(run(written, {**feeds, "W": other_weight})[0],
                          run(model, {**feeds, "W": other_weight})[0])


def test_sparse_initializer_roundtrip():
    dense = np.zeros((4, 5), np.float32)
    dense[1, 2], dense[3, 0] = 1.5, -2.0
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "S"),
                                       numpy_helper.from_array(np.array([7, 15], np.int64), ""), [4, 5])
    nodes = [helper.make_node("Add", ["x", "S"], ["y"], name="add")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])]
    model = make_model(nodes, inputs, outputs)
    model.graph.sparse_initializer.append(sparse)

    # full_check runs shape inference, which types a sparse initializer as sparse_tensor and rejects
    # it as an Add input; onnxruntime densifies sparse initializers at load time.
    assert_roundtrip(model, {"x": random(4, 5)}, full_check=False)
    graph = onnx_to_ir(model)

    assert np.array_equal(graph.constants["S"].const, dense)


def test_training_info_kept():
    model, _ = matmul_model()
    training = model.training_info.add()
    training.algorithm.name = "algorithm"
    training.update_binding.add(key="W", value="W_new")

    written = roundtrip(model)

    assert list(written.training_info) == list(model.training_info)


# -- changed constants -----------------------------------------------------------------------------


def test_changed_initializer_written_back():
    model, feeds = matmul_model()
    graph = onnx_to_ir(model)
    new_weight = np.asarray(graph.constants["W"].const) * 2

    graph.constants["W"].const = new_weight
    written = ir_to_onnx(graph)

    onnx.checker.check_model(written, full_check=True)
    assert [t.name for t in written.graph.initializer] == ["W", "bias"]
    assert np.array_equal(numpy_helper.to_array(written.graph.initializer[0]), new_weight)
    assert written.graph.initializer[1] == model.graph.initializer[1]
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(new_weight, "W"))
    assert np.array_equal(run(written, feeds)[0], run(reference, feeds)[0])


def test_changed_constant_node_stays_constant_node():
    model, feeds = constant_nodes_model()
    graph = onnx_to_ir(model)
    new_scale = np.full((2, 3), 3.0, np.float32)

    graph.constants["scale"].const = new_scale
    graph.constants["offset"].const = np.array(-1.0, np.float32)
    written = ir_to_onnx(graph)

    onnx.checker.check_model(written, full_check=True)
    assert node_signature(written) == node_signature(model)
    assert len(written.graph.initializer) == 0
    scale_node = written.graph.node[0]
    assert scale_node.name == "scale_const"
    assert np.array_equal(numpy_helper.to_array(scale_node.attribute[0].t), new_scale)
    assert scale_node.attribute[0].t.name == "scale_tensor"
    expected = (feeds["x"] * new_scale - 1.0).reshape(3, 2)
    assert np.array_equal(run(written, feeds)[0], expected)


def test_new_constant_becomes_initializer():
    model, feeds = conv_bn_relu_model()
    graph = onnx_to_ir(model)
    conv = graph.node("conv")
    folded = graph.add_constant(graph.unique_name("W_folded"), np.asarray(graph.constants["W"].const) * 0.5)

    graph.set_input(conv, 1, folded)
    graph.remove_dead(lambda node: True)
    written = ir_to_onnx(graph)

    onnx.checker.check_model(written, full_check=True)
    assert [t.name for t in written.graph.initializer] == ["B", "gamma", "beta", "mean", "var", "W_folded"]
    assert list(written.graph.node[0].input) == ["x", "W_folded", "B"]


def test_changed_constant_type_updates_graph_input():
    model, feeds = matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 32]))
    graph = onnx_to_ir(model)

    graph.constants["W"].const = np.asarray(graph.constants["W"].const)[:, :16].copy()
    graph.constants["bias"].const = np.asarray(graph.constants["bias"].const)[:16].copy()
    graph.outputs[0].shape = (2, 16)
    written = ir_to_onnx(graph)

    onnx.checker.check_model(written, full_check=True)
    weight_input = written.graph.input[1]
    assert [d.dim_value for d in weight_input.type.tensor_type.shape.dim] == [64, 16]
    assert run(written, feeds)[0].shape == (2, 16)


# -- names and errors ------------------------------------------------------------------------------


def test_inputs_and_outputs_override():
    model, _ = conv_bn_relu_model()

    graph = onnx_to_ir(model, inputs=["x"], outputs=["conv_out", "y"])

    assert [v.name for v in graph.outputs] == ["conv_out", "y"]
    assert graph.outputs[0].producer is graph.node("conv")


@pytest.mark.parametrize("keyword", ["inputs", "outputs"])
def test_unknown_tensor_name_raises(keyword):
    model, _ = conv_bn_relu_model()

    with pytest.raises(InputError, match="'missing'") as info:
        onnx_to_ir(model, **{keyword: ["missing"]})

    assert "\n" not in str(info.value)


def test_undefined_node_input_raises():
    model, _ = conv_bn_relu_model()
    model.graph.node[2].input[0] = "nowhere"

    with pytest.raises(InputError, match="'nowhere'"):
        onnx_to_ir(model)


def test_duplicate_tensor_definition_raises():
    model, _ = conv_bn_relu_model()
    model.graph.node[2].output[0] = "conv_out"

    with pytest.raises(InputError, match="'conv_out' is defined twice"):
        onnx_to_ir(model)


def test_looks_like_onnx():
    model, _ = conv_bn_relu_model()

    assert looks_like_onnx(model.SerializeToString())
    assert not looks_like_onnx(b"")
    assert not looks_like_onnx(b"node {\n  name: 'x'\n}\n")
    assert not looks_like_onnx(b"\x08\x07")
    assert not looks_like_onnx(b"\x08\xff\xff")


# -- files -----------------------------------------------------------------------------------------


def test_external_data_roundtrip(tmp_path):
    model, feeds = matmul_model()
    path = tmp_path / "model.onnx"
    # save_model moves the tensors of the model it is given to external data, so it gets a copy.
    external = onnx.ModelProto()
    external.CopyFrom(model)
    onnx.save_model(external, str(path), save_as_external_data=True, size_threshold=0, location="weights.bin")

    loaded = load_onnx(path)

    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.graph.initializer)
    assert loaded.SerializeToString() == model.SerializeToString()
    written = assert_roundtrip(loaded, feeds)
    assert np.array_equal(run(written, feeds)[0], run(model, feeds)[0])


def test_external_data_missing_file_raises(tmp_path):
    model, _ = matmul_model()
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0, location="weights.bin")
    (tmp_path / "weights.bin").unlink()

    with pytest.raises(InputError, match="weights.bin") as info:
        load_onnx(path)

    assert "\n" not in str(info.value)


def test_load_onnx_rejects_other_files(tmp_path):
    path = tmp_path / "model.pb"
    path.write_bytes(b"\x0a\x03abc")

    with pytest.raises(InputError, match="not an ONNX model"):
        load_onnx(path)
    with pytest.raises(InputError, match="not found"):
        load_onnx(tmp_path / "absent.onnx")


def test_save_onnx_single_file(tmp_path):
    model, feeds = matmul_model()
    path = tmp_path / "out.onnx"

    save_onnx(roundtrip(model), path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    loaded = load_onnx(path)
    assert loaded.SerializeToString() == model.SerializeToString()


def test_save_onnx_external_data(tmp_path):
    model, feeds = matmul_model()
    before = model.SerializeToString()
    path = tmp_path / "out.onnx"

    save_onnx(model, path, external_data=True)

    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    raw = onnx.load(str(path), load_external_data=False)
    assert raw.graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert raw.graph.initializer[1].data_location == TensorProto.DEFAULT
    loaded = load_onnx(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.SerializeToString() == before
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, feeds)[0], run(model, feeds)[0])
