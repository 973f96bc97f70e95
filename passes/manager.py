"""The pass manager: run a mode's pipeline until nothing changes, then remove dead nodes."""

from __future__ import annotations

import logging

from fusion_ir.ir import Graph, Node
from fusion_ir.report import Report
from passes import affine, conv_bn, group_conv, onnx_fold, small_bn
from passes.common import PassContext
from passes.resolve import ConstResolver

log = logging.getLogger(__name__)

MODES = ("ptq", "qat")
# Both modes run the same passes. In qat mode, small_bn, affine and onnx_fold skip what
# quantization-aware training keeps (BatchNorm as small ops, per-channel Mul/Add) and report why.
PIPELINES = {
    "ptq": [small_bn.run, group_conv.run, conv_bn.run, affine.run, onnx_fold.run],
    "qat": [small_bn.run, group_conv.run, conv_bn.run, affine.run, onnx_fold.run],
}
MAX_ROUNDS = 50


def _removable(node: Node) -> bool:
    """Return whether a dead node may be removed: only ops whose TF OpDef is registered and stateless."""
    if node.graph is not None and any(v is out for out in node.outputs for v in node.graph.inputs):
        return False
    if node.dialect != "tf":
        return True
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(node.op)
    return op_def is not None and not op_def.is_stateful and node.op not in ("Placeholder", "PlaceholderV2")


def run_pipeline(graph: Graph, mode: str = "ptq", report: Report | None = None, skip: list[str] = (),
                 disable: list[str] = ()) -> Report:
    """Fuse `graph` in place with the pipeline for `mode`; return the report.

    `skip` lists node-name globs kept out of every fusion; `disable` lists fusion families to turn off.
    Both show in the report as skip reasons.
    """
    if mode not in PIPELINES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    report = report if report is not None else Report()
    for round_number in range(1, MAX_ROUNDS + 1):
        ctx = PassContext(graph, report, mode, ConstResolver({id(v) for v in graph.inputs}),
                          tuple(skip), frozenset(disable))
        changed = False
        for fusion in PIPELINES[mode]:
            changed |= fusion(ctx)
        log.debug("round %d: %s", round_number, "changed" if changed else "no change")
        if not changed:
            break
    removed = graph.remove_dead(_removable)
    log.debug("removed %d dead nodes", removed)
    return report
