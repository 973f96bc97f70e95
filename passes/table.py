"""Op-semantics table: per dialect op, which input is the weight and where its output channels are.

Passes ask this table; they never hard-code an axis. `channel_axes` are the weight axes whose row-major
flattening is the output channel index; `output_channel_axis` is the channel axis of the op's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fusion_ir.ir import Node

CHANNELS_LAST = {"NHWC": True, "NDHWC": True, "NWC": True, "NCHW": False, "NCDHW": False, "NCW": False}


@dataclass(frozen=True)
class OpSemantics:
    weight_input: int
    output_rank: int
    channel_axes: Callable[[Node], tuple[int, ...]]
    output_channel_axis: Callable[[Node], int]


def _data_format_axis(default: str, rank: int) -> Callable[[Node], int]:
    def axis(node: Node) -> int:
        fmt = node.attrs.get("data_format", default)
        return rank - 1 if CHANNELS_LAST.get(fmt, True) else 1

    return axis


def _matmul_axes(node: Node) -> tuple[int, ...]:
    return (0,) if node.attrs.get("transpose_b", False) else (1,)


TF_TABLE: dict[str, OpSemantics] = {
    "Conv2D": OpSemantics(1, 4, lambda n: (3,), _data_format_axis("NHWC", 4)),
    # Filter [H, W, C, M]: output channel c * M + m.
    "DepthwiseConv2dNative": OpSemantics(1, 4, lambda n: (2, 3), _data_format_axis("NHWC", 4)),
    # Inputs (input_sizes, filter, out_backprop); filter [H, W, out_channels, in_channels].
    "Conv2DBackpropInput": OpSemantics(1, 4, lambda n: (2,), _data_format_axis("NHWC", 4)),
    "Conv3D": OpSemantics(1, 5, lambda n: (4,), _data_format_axis("NDHWC", 5)),
    "MatMul": OpSemantics(1, 2, _matmul_axes, lambda n: 1),
}


@dataclass(frozen=True)
class OnnxSemantics:
    """An ONNX table row. Output channels are on axis 1 for Conv and ConvTranspose, last for Gemm and
    MatMul; `bias_input` is the op's own bias input (Conv B, Gemm C), or None for MatMul."""

    weight_input: int
    bias_input: int | None
    # (weight shape, node) -> (view shape or None, channel axes within that view)
    layout: Callable[[tuple, Node], tuple[tuple | None, tuple[int, ...]]]
    channels_last: bool


def _conv_transpose_layout(shape: tuple, node: Node):
    # Weight [Cin, Cout/g, k...]; output channel g_index * (Cout/g) + j.
    groups = int(node.attrs.get("group", 1))
    if groups == 1:
        return None, (1,)
    return (groups, shape[0] // groups) + tuple(shape[1:]), (0, 2)


ONNX_TABLE: dict[str, OnnxSemantics] = {
    # Weight [Cout, Cin/g, k...], grouped or not: output channel = axis 0.
    "Conv": OnnxSemantics(1, 2, lambda shape, n: (None, (0,)), False),
    "ConvTranspose": OnnxSemantics(1, 2, _conv_transpose_layout, False),
    "Gemm": OnnxSemantics(1, 2, lambda shape, n: (None, (0,) if n.attrs.get("transB", 0) else (1,)), True),
    "MatMul": OnnxSemantics(1, None, lambda shape, n: (None, (len(shape) - 1,)), True),
}


def semantics(node: Node) -> OpSemantics | None:
    if node.dialect == "tf":
        return TF_TABLE.get(node.op)
    return None


def onnx_semantics(node: Node) -> OnnxSemantics | None:
    if node.dialect == "onnx" and node.extra.get("domain", "") in ("", "ai.onnx"):
        return ONNX_TABLE.get(node.op)
    return None
