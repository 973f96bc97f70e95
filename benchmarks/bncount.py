"""Count the foldable BatchNorms a graph still has, in the same way for TensorFlow and ONNX graphs.

A BatchNorm counts as foldable when its data input is the output of a convolution, either directly or
through one bias op (BiasAdd, or Add/AddV2 with a constant operand), and nothing else reads that output
(otherwise folding would change the value that reader gets). Two forms are counted:

- a BatchNorm op: FusedBatchNorm, FusedBatchNormV2 or FusedBatchNormV3 in TensorFlow,
  BatchNormalization in ONNX (the data input may also come from a MatMul or Gemm);
- a BatchNorm written as, or decomposed into, elementwise ops: a Mul whose one operand is a
  convolution output and whose other operand is constant. Keras 3 writes its BatchNormalization as
  Mul(x, Rsqrt(variance + epsilon) * gamma) + shift, grappler's constant folding turns the Rsqrt chain
  into a Const, and tf2onnx turns it into a Mul and an Add of initializers. Each such BN has exactly
  one Mul on the convolution output, so each counts once. A Mul by a scalar constant after a conv
  (InceptionResNetV2's residual scale) is foldable in the same way and counts too; the Mul by a
  constant inside swish (x * sigmoid(beta * x)) does not, because x has a second reader.

"Constant" means a Const node (TF) or an initializer or Constant node (ONNX), or a node all of whose
data inputs are constant. The count is structural: it says nothing about whether a fold of that BN
would be numerically safe.
"""

from __future__ import annotations

from dataclasses import dataclass

TF_BN_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
ONNX_BN_OPS = {"BatchNormalization"}
CONV_OPS = {"Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3D", "Conv", "ConvTranspose"}
MATMUL_OPS = {"MatMul", "Gemm"}
BIAS_OPS = {"BiasAdd", "Add", "AddV2"}
SOURCE_OPS = {"Placeholder", "PlaceholderV2", "PlaceholderWithDefault"}


@dataclass
class _Node:
    op: str
    inputs: list[str]  # producer keys of the data inputs (node names in TF, tensor names in ONNX)


@dataclass
class BNCount:
    """Foldable BN still in a graph: as BN ops, as Mul-by-constant after a conv, and the total of BN-like
    nodes anywhere (FusedBatchNorm*, BatchNormalization, and Rsqrt nodes, which Keras 3 writes once per BN)."""

    bn_ops: int
    mul_after_conv: int
    all_bn_like: int

    @property
    def foldable(self) -> int:
        return self.bn_ops + self.mul_after_conv


def _count(nodes: dict[str, _Node], producer_of: dict[str, str], constants: set[str]) -> BNCount:
    """`nodes` maps a node key to its op and input keys; `producer_of` maps an input key to a node key."""
    # Fixed-point pass over the nodes: a node is constant when all its data inputs are. Nodes are
    # usually listed producers first, so one or two passes settle it.
    const_nodes = {key for key, node in nodes.items() if node.op in ("Const", "Constant")}
    changed = True
    while changed:
        changed = False
        for key, node in nodes.items():
            if key in const_nodes or node.op in SOURCE_OPS or not node.inputs:
                continue
            if all(ref in constants or producer_of.get(ref) in const_nodes for ref in node.inputs):
                const_nodes.add(key)
                changed = True

    def is_const(key: str) -> bool:
        return key in constants or producer_of.get(key) in const_nodes

    readers: dict[str, int] = {}
    for node in nodes.values():
        for ref in node.inputs:
            readers[ref] = readers.get(ref, 0) + 1

    def op_of(key: str) -> str | None:
        node_key = producer_of.get(key)
        return nodes[node_key].op if node_key is not None else None

    def from_conv(key: str, ops: set[str]) -> bool:
        """Whether `key` is a single-reader conv output, or a single-reader bias op on one."""
        if readers.get(key, 0) != 1:
            return False
        op = op_of(key)
        if op in ops:
            return True
        if op in BIAS_OPS:
            node = nodes[producer_of[key]]
            data = [ref for ref in node.inputs[:2] if not is_const(ref)]
            return len(data) == 1 and readers.get(data[0], 0) == 1 and op_of(data[0]) in ops
        return False

    bn_ops = mul_after_conv = all_bn_like = 0
    for node in nodes.values():
        if node.op in TF_BN_OPS or node.op in ONNX_BN_OPS or node.op == "Rsqrt":
            all_bn_like += 1
        if (node.op in TF_BN_OPS or node.op in ONNX_BN_OPS) and node.inputs:
            if from_conv(node.inputs[0], CONV_OPS | MATMUL_OPS):
                bn_ops += 1
        elif node.op == "Mul" and len(node.inputs) == 2:
            a, b = node.inputs
            if (from_conv(a, CONV_OPS) and is_const(b)) or (from_conv(b, CONV_OPS) and is_const(a)):
                mul_after_conv += 1
    return BNCount(bn_ops, mul_after_conv, all_bn_like)


def count_tf(graph_def) -> BNCount:
    """Count foldable BN in a TensorFlow GraphDef (control inputs are ignored)."""
    nodes = {}
    for node in graph_def.node:
        refs = [ref.split(":")[0] if not ref.startswith("^") else None for ref in node.input]
        nodes[node.name] = _Node(node.op, [r for r in refs if r is not None])
    producer_of = {name: name for name in nodes}
    return _count(nodes, producer_of, set())


def count_onnx(model) -> BNCount:
    """Count foldable BN in the main graph of an ONNX ModelProto."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    nodes = {}
    producer_of = {}
    for index, node in enumerate(graph.node):
        key = f"{index}:{node.name}"
        nodes[key] = _Node(node.op_type, [name for name in node.input if name])
        for output in node.output:
            producer_of[output] = key
    return _count(nodes, producer_of, constants)
