"""The public Python API: load a model, fuse it, verify it, save it. The CLI is a thin layer over it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from fusion_ir.errors import FusionIRError, InputError, VerificationError
from fusion_ir.files import check_output_path, looks_like_text, read_bytes, write_atomic
from fusion_ir.report import Report

log = logging.getLogger(__name__)


@dataclass
class Model:
    """A TensorFlow GraphDef with its graph input and output tensor names."""

    graph_def: object
    inputs: list[str] | None = None
    outputs: list[str] | None = None
    source: str = "<memory>"
    # Signature key -> tensor name for models loaded from a SavedModel or Keras file; a SavedModel
    # written from this model uses the same keys.
    input_keys: dict[str, str] | None = None
    output_keys: dict[str, str] | None = None


@dataclass
class FuseResult:
    """What `fuse` produced: the fused GraphDef, the report, and the verification checks."""

    graph_def: object
    report: Report
    checks: list = field(default_factory=list)
    verified: bool | None = None
    output: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    failure: str | None = None


def load(path: str | os.PathLike, inputs: list[str] | None = None, outputs: list[str] | None = None,
         signature: str | None = None) -> Model:
    """Load a model: a frozen GraphDef (.pb binary or .pbtxt text), a SavedModel folder (frozen from
    `signature`, default serving_default) or a Keras .keras / .h5 file. Files are recognized by content."""
    from converters.tf_graphdef import parse_graphdef

    if Path(path).is_dir():
        from converters.tf_loaders import load_saved_model

        frozen = load_saved_model(path, signature)
        return Model(frozen.graph_def, inputs or frozen.inputs, outputs or frozen.outputs, str(path),
                     frozen.input_keys, frozen.output_keys)
    data = read_bytes(path)
    if data.startswith((b"PK\x03\x04", b"\x89HDF\r\n\x1a\n")):
        from converters.tf_loaders import load_keras

        frozen = load_keras(path)
        return Model(frozen.graph_def, inputs or frozen.inputs, outputs or frozen.outputs, str(path),
                     frozen.input_keys, frozen.output_keys)
    text = looks_like_text(data)
    try:
        graph_def = parse_graphdef(data, str(path), text)
    except InputError:
        if text:
            raise
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a TensorFlow GraphDef (the binary parse failed and it is not "
                             f"text); pass a frozen GraphDef (.pb or .pbtxt)") from None
        graph_def = parse_graphdef(data, str(path), True)
    if not graph_def.node:
        raise InputError(f"{path}: the GraphDef has no nodes; pass a frozen GraphDef (.pb or .pbtxt)")
    return Model(graph_def, inputs, outputs, str(path))


def example(name: str, seed: int = 0) -> Model:
    """Build a keras.applications example with random weights and BN statistics, frozen."""
    from fusion_ir.examples import build_example

    graph_def, inputs, outputs = build_example(name, seed)
    return Model(graph_def, inputs, outputs, f"example {name}")


def save(graph_def, path: str | os.PathLike, inputs: list[str] | None = None, outputs: list[str] | None = None,
         input_keys: dict[str, str] | None = None, output_keys: dict[str, str] | None = None) -> None:
    """Write a GraphDef atomically: binary for .pb, text for .pbtxt, a SavedModel for a path without suffix.

    A SavedModel's serving signature maps `input_keys` / `output_keys` (signature key -> tensor name);
    without them the keys are the node names of `inputs` / `outputs`.
    """
    from converters.tf_graphdef import serialize_graphdef

    path = check_output_path(path)
    if not path.suffix:
        from converters.tf_loaders import save_saved_model

        if not input_keys:
            input_keys = {_key(t): t for t in inputs or []}
        if not output_keys:
            output_keys = {_key(t): t for t in outputs or []}
        save_saved_model(graph_def, path, input_keys, output_keys)
        return
    write_atomic(path, serialize_graphdef(graph_def, text=path.suffix == ".pbtxt"))


def _key(tensor: str) -> str:
    name, _, index = tensor.rpartition(":")
    base = (name if index.isdigit() else tensor).replace("/", "_")
    return base if not index.isdigit() or index == "0" else f"{base}_{index}"


def fuse(model: Model | str | os.PathLike, output: str | os.PathLike | None = None, *, mode: str = "ptq",
         inputs: list[str] | None = None, outputs: list[str] | None = None,
         input_shapes: dict[str, tuple[int, ...]] | None = None, verify: bool = True, force: bool = False,
         seed: int = 0, skip: list[str] = (), disable: list[str] = (), progress=None) -> FuseResult:
    """Fuse a model and, unless `verify` is False, check its outputs against the original in TensorFlow.

    `model` is a Model or a path. With `output`, the fused graph is written there atomically. Raises
    InputError on bad input and VerificationError (with `.result`) when an output differs beyond its
    tolerance; the file is then written only when `force` is True. `skip` lists node-name globs kept
    out of every fusion and `disable` fusion families (conv-bn, group-conv, small-bn, mul-add) to turn off.
    `progress`, when given, is called with the name of each long step as it starts.
    """
    step = progress or (lambda name: None)
    from converters.tf_graphdef import graphdef_to_ir, ir_to_graphdef
    from passes.common import FAMILIES
    from passes.manager import MODES, run_pipeline

    if mode not in MODES:
        raise InputError(f"invalid mode {mode!r}; use one of {', '.join(MODES)}")
    for family in disable:
        if family not in FAMILIES:
            raise InputError(f"--disable {family!r} is not a fusion family; use one of {', '.join(FAMILIES)}")
    if output is not None:
        check_output_path(output)
    if not isinstance(model, Model):
        step(f"loading {model}")
        model = load(model)
    step("folding")
    graph = graphdef_to_ir(model.graph_def, inputs or model.inputs, outputs or model.outputs)
    _check_input_shape_names(graph, input_shapes or {})
    input_specs = [(v.name, v.dtype, v.shape) for v in graph.inputs]
    output_names = [v.name for v in graph.outputs]
    nodes_before = len(model.graph_def.node)

    report = run_pipeline(graph, mode, skip=skip, disable=disable)
    problems = graph.validate()
    if problems:
        raise FusionIRError(f"internal error: the fused graph is inconsistent: {problems[0]}")
    fused = ir_to_graphdef(graph)
    result = FuseResult(fused, report, nodes_before=nodes_before, nodes_after=len(fused.node))

    if verify:
        step("verifying in TensorFlow")
        _verify(model.graph_def, result, input_specs, output_names, input_shapes or {}, seed)
    if output is not None and (result.verified is not False or force):
        step(f"writing {output}")
        same_io = not inputs and not outputs
        save(fused, output, [v for v, _, _ in input_specs], output_names,
             model.input_keys if same_io else None, model.output_keys if same_io else None)
        result.output = str(output)
    if result.verified is False:
        detail = result.failure or "; ".join(
            f"{c.output} relative max error {c.rel_max_error:.3g} exceeds {c.tolerance:.3g}"
            for c in result.checks if not c.ok)
        err = VerificationError("verification failed: " + detail +
                                ("" if force else "; the model was not written (use --force to write it anyway)"))
        err.result = result
        raise err
    return result


def _check_input_shape_names(graph, input_shapes: dict) -> None:
    names = {v.name for v in graph.inputs} | {v.name.rsplit(":", 1)[0] for v in graph.inputs}
    for name in input_shapes:
        if name not in names:
            listed = ", ".join(v.name for v in graph.inputs) or "none"
            raise InputError(f"--input-shape names {name!r}, which is not a graph input (inputs: {listed})")


def _verify(original, result: FuseResult, input_specs, output_names, input_shapes, seed) -> None:
    from fusion_ir.verify import BackendUnavailable, FusedGraphRejected, checks_to_dicts, verify_graphdefs

    if result.report.num_fused == 0:
        result.verified = True
        return
    try:
        checks = verify_graphdefs(original, result.graph_def, input_specs, output_names, input_shapes, seed)
    except BackendUnavailable as err:
        warning = f"verification skipped: {err}"
        log.debug(warning)
        result.report.warnings.append(warning)
        return
    except FusedGraphRejected as err:
        result.verified = False
        result.failure = str(err)
        return
    result.checks = checks
    result.verified = all(c.ok for c in checks)
    result.report.verification = checks_to_dicts(checks)
