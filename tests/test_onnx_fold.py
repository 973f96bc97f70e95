"""ONNX fusions through the op-semantics table, checked in onnxruntime with optimizations off."""

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fusion_ir
from fusion_ir.numerics import run_onnx

RNG = np.random.default_rng(7)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def bn_inits(prefix, channels, seed=0):
    rng = np.random.default_rng(seed)
    return [const(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels)),
            const(f"{prefix}_bias", rng.normal(0, 0.3, channels)),
            const(f"{prefix}_mean", rng.normal(0, 0.3, channels)),
            const(f"{prefix}_var", rng.uniform(0.5, 2.0, channels))]


def bn_node(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], name=prefix, **attrs)


def make_model(nodes, inits, x_shape, y_names=("y",), opset=17):
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in y_names]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # Give the outputs the shapes onnxruntime computes, since the full checker requires a shape.
    results = run_onnx(model, {"x": np.zeros(x_shape, np.float32)}, list(y_names))
    for output, array in zip(model.graph.output, results):
        output.CopyFrom(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, array.shape))
    onnx.checker.check_model(model, full_check=True)
    return fusion_ir.Model(model)


def fuse_and_compare(model, x_shape, mode="ptq", tolerance=1e-5):
    result = fusion_ir.fuse(model, mode=mode, verify=False)
    onnx.checker.check_model(result.graph_def, full_check=True)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    outputs = [o.name for o in model.graph_def.graph.output]
    expected = run_onnx(model.graph_def, {"x": x}, outputs)
    actual = run_onnx(result.graph_def, {"x": x}, outputs)
    for name, e, a in zip(outputs, expected, actual):
        err = np.max(np.abs(e - a)) / np.max(np.abs(e))
        assert err <= tolerance, f"{name}: relative max error {err:.3g}"
    return result


def ops(model_proto):
    return Counter(n.op_type for n in model_proto.graph.node)


def skip_reason(result, anchor):
    candidate = result.report.candidates[anchor]
    assert candidate.status == "skipped", candidate
    return candidate.reason


@pytest.mark.parametrize("spatial,group,with_bias", [
    ((9,), 1, True), ((7, 7), 1, True), ((7, 7), 1, False), ((7, 7), 2, True), ((5, 6, 6), 1, True),
    ((7, 7), 4, False),  # depthwise: group == Cin == Cout / multiplier
])
def test_conv_bn_folds(spatial, group, with_bias):
    cin, cout = 4, 8
    w = const("w", RNG.uniform(-1, 1, (cout, cin // group) + (3,) * len(spatial)))
    inits = [w] + bn_inits("bn", cout) + ([const("b", RNG.normal(0, 1, cout))] if with_bias else [])
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if with_bias else []), ["c"], name="conv", group=group,
                            pads=[1] * (2 * len(spatial)))
    model = make_model([conv, bn_node("c", "y")], inits, (2, cin) + spatial)

    result = fuse_and_compare(model, (2, cin) + spatial)

    assert ops(result.graph_def) == Counter({"Conv": 1})
    assert result.report.candidates["bn"].status == "fused"
    assert [o.name for o in result.graph_def.graph.output] == ["y"]


@pytest.mark.parametrize("group,cin,cout,with_bias", [(1, 4, 6, True), (1, 4, 6, False), (2, 4, 6, True),
                                                      (2, 6, 4, False)])
def test_conv_transpose_bn_folds(group, cin, cout, with_bias):
    w = const("w", RNG.uniform(-1, 1, (cin, cout // group, 3, 3)))
    inits = [w] + bn_inits("bn", cout) + ([const("b", RNG.normal(0, 1, cout))] if with_bias else [])
    deconv = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if with_bias else []), ["c"], name="deconv",
                              group=group, strides=[2, 2])
    model = make_model([deconv, bn_node("c", "y")], inits, (2, cin, 5, 5))

    result = fuse_and_compare(model, (2, cin, 5, 5))

    assert ops(result.graph_def) == Counter({"ConvTranspose": 1})


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta", [(0, 0, 1.0, 1.0), (1, 1, 0.5, 2.0), (0, 1, 1.0, 0.0)])
@pytest.mark.parametrize("anchor", ["bn", "mul_channel", "add_scalar"])
def test_gemm_folds(trans_a, trans_b, alpha, beta, anchor):
    k, n = 5, 6
    w = const("w", RNG.uniform(-1, 1, (n, k) if trans_b else (k, n)))
    gemm = helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    inits = [w, const("c", RNG.normal(0, 1, n))]
    if anchor == "bn":
        nodes, inits = [gemm, bn_node("g", "y")], inits + bn_inits("bn", n)
    elif anchor == "mul_channel":
        nodes, inits = [gemm, helper.make_node("Mul", ["g", "s"], ["y"], name="mul")], inits + [
            const("s", RNG.uniform(0.5, 2, (1, n)))]
    else:
        nodes, inits = [gemm, helper.make_node("Add", ["s", "g"], ["y"], name="add")], inits + [const("s", 0.25)]
    x_shape = (k, 3) if trans_a else (3, k)
    model = make_model(nodes, inits, x_shape)

    result = fuse_and_compare(model, x_shape)

    assert ops(result.graph_def) == Counter({"Gemm": 1})


@pytest.mark.parametrize("anchor", ["bn", "mul_scalar", "add_channel", "sub_channel"])
def test_matmul_folds(anchor):
    w = const("w", RNG.uniform(-1, 1, (5, 6)))
    matmul = helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul")
    bias = helper.make_node("Add", ["m", "b"], ["mb"], name="bias")
    inits = [w, const("b", RNG.normal(0, 1, 6))]
    tail = {"bn": bn_node("mb", "y"), "mul_scalar": helper.make_node("Mul", ["mb", "s"], ["y"], name="mul"),
            "add_channel": helper.make_node("Add", ["mb", "s"], ["y"], name="add"),
            "sub_channel": helper.make_node("Sub", ["s", "mb"], ["y"], name="sub")}[anchor]
    inits += bn_inits("bn", 6) if anchor == "bn" else [const("s", 1.5 if anchor == "mul_scalar" else
                                                             RNG.normal(0, 1, 6))]
    model = make_model([matmul, bias, tail], inits, (3, 5))

    result = fuse_and_compare(model, (3, 5))

    assert ops(result.graph_def) == Counter({"MatMul": 1, "Add": 1})


def test_matmul_without_bias_mul_then_add_fold():
    w = const("w", RNG.uniform(-1, 1, (5, 6)))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Mul", ["m", "s"], ["ms"], name="mul"),
             helper.make_node("Add", ["ms", "t"], ["y"], name="add")]
    model = make_model(nodes, [w, const("s", RNG.uniform(0.5, 2, 6)), const("t", RNG.normal(0, 1, 6))], (3, 5))

    result = fuse_and_compare(model, (3, 5))

    assert ops(result.graph_def) == Counter({"MatMul": 1, "Add": 1})
    assert result.report.candidates["mul"].status == "fused"


@pytest.mark.parametrize("op,const_shape", [("Mul", (1, 8, 1, 1)), ("Mul", (8, 1, 1)), ("Add", (8, 1, 1)),
                                            ("Mul", ())])
def test_conv_arithmetic_folds(op, const_shape):
    w = const("w", RNG.uniform(-1, 1, (8, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node(op, ["c", "s"], ["y"], name="arith")]
    model = make_model(nodes, [w, const("b", RNG.normal(0, 1, 8)),
                               const("s", RNG.uniform(0.5, 2, const_shape))], (2, 4, 6, 6))

    result = fuse_and_compare(model, (2, 4, 6, 6))

    assert ops(result.graph_def) == Counter({"Conv": 1})


def test_bare_channel_vector_after_conv_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    model = make_model(nodes, [w, const("s", RNG.uniform(0.5, 2, 6))], (2, 4, 8, 8))

    result = fuse_and_compare(model, (2, 4, 8, 8))

    assert "varies along output axis 3" in skip_reason(result, "mul")


def test_matmul_add_3d_constant_skipped():
    w = const("w", RNG.uniform(-1, 1, (5, 6)))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b"], ["mb"], name="bias"),
             helper.make_node("Add", ["mb", "t"], ["y"], name="add")]
    model = make_model(nodes, [w, const("b", RNG.normal(0, 1, 6)), const("t", RNG.normal(0, 1, (1, 3, 6)))],
                       (3, 5))

    result = fuse_and_compare(model, (3, 5))

    assert ops(result.graph_def)["Add"] == 2
    assert "more dimensions than the 2-D output" in skip_reason(result, "add")


def test_bn_training_mode_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                              ["y", "running_mean", "running_var"], name="bn", training_mode=1)]
    model = make_model(nodes, [w] + bn_inits("bn", 6), (2, 4, 8, 8))

    result = fusion_ir.fuse(model, verify=False)

    assert ops(result.graph_def)["BatchNormalization"] == 1
    assert "training mode" in skip_reason(result, "bn")


def test_bn_conv_second_consumer_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y1"),
             helper.make_node("Relu", ["c"], ["y2"], name="relu")]
    model = make_model(nodes, [w] + bn_inits("bn", 6), (2, 4, 8, 8), ("y1", "y2"))

    result = fuse_and_compare(model, (2, 4, 8, 8))

    assert "has 2 consumers" in skip_reason(result, "bn")


def test_bn_conv_graph_output_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, [w] + bn_inits("bn", 6), (2, 4, 8, 8), ("y", "c"))

    result = fuse_and_compare(model, (2, 4, 8, 8))

    assert "graph output" in skip_reason(result, "bn")


def test_bn_nan_statistics_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    inits = [w] + bn_inits("bn", 6)
    inits[4] = const("bn_var", [1, 1, np.nan, 1, 1, 1])
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")], inits,
                       (2, 4, 8, 8))

    result = fusion_ir.fuse(model, verify=False)

    assert "NaN or infinite" in skip_reason(result, "bn")


def test_per_channel_mul_kept_in_qat():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    model = make_model(nodes, [w, const("s", RNG.uniform(0.5, 2, (6, 1, 1)))], (2, 4, 8, 8))

    result = fuse_and_compare(model, (2, 4, 8, 8), mode="qat")

    assert "qat mode" in skip_reason(result, "mul")


def test_mul_by_non_constant_skipped():
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Sigmoid", ["c"], ["g"], name="sigmoid"),
             helper.make_node("Mul", ["c", "g"], ["y"], name="mul")]
    model = make_model(nodes, [w], (2, 4, 8, 8))

    result = fuse_and_compare(model, (2, 4, 8, 8))

    assert "not constant" in skip_reason(result, "mul")


def test_fused_onnx_verified_end_to_end(tmp_path):
    w = const("w", RNG.uniform(-1, 1, (6, 4, 3, 3)))
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")],
                       [w] + bn_inits("bn", 6), (2, 4, 8, 8))
    onnx.save(model.graph_def, tmp_path / "model.onnx")

    result = fusion_ir.fuse(tmp_path / "model.onnx", tmp_path / "fused.onnx")

    assert result.verified is True
    assert result.checks[0].backend == "onnxruntime"
    assert ops(onnx.load(tmp_path / "fused.onnx")) == Counter({"Conv": 1})
