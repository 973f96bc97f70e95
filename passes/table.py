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


def semantics(node: Node) -> OpSemantics | None:
    if node.dialect == "tf":
        return TF_TABLE.get(node.op)
    return None
