"""TF GraphDef -> ONNX ModelProto through tf2onnx."""

from __future__ import annotations

import logging

from fusion_ir.errors import FusionIRError
from fusion_ir.tfimport import import_tensorflow


class ConversionError(FusionIRError):
    """tf2onnx could not convert the graph (an op it does not support, a shape it cannot infer)."""

    exit_code = 2


def graphdef_to_onnx(graph_def, inputs: list[str], outputs: list[str], opset: int | None = None):
    """Convert a frozen GraphDef to ONNX with tf2onnx; tensor names ("x:0") stay as ONNX names."""
    tf = import_tensorflow()
    # tf2onnx calls deprecated TF1 freezing helpers, and TF logs a deprecation notice for each call.
    tf.get_logger().setLevel(logging.ERROR)
    for name in ("tf2onnx", "tf2onnx.tfonnx", "tf2onnx.optimizer", "tf2onnx.shape_inference"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import tf2onnx

    try:
        model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=list(inputs), output_names=list(outputs),
                                                  opset=opset)
    except Exception as err:  # noqa: BLE001 - tf2onnx raises many types for an unsupported graph
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConversionError(f"tf2onnx could not convert the graph to ONNX: {first}") from None
    return model
