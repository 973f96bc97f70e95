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
    """A model with its graph input and output tensor names: a TensorFlow GraphDef, or an ONNX
    ModelProto (held in the same field)."""

    graph_def: object
    inputs: list[str] | None = None
    outputs: list[str] | None = None
    source: str = "<memory>"
    # Signature key -> tensor name for models loaded from a SavedModel or Keras file; a SavedModel
    # written from this model uses the same keys.
    input_keys: dict[str, str] | None = None
    output_keys: dict[str, str] | None = None

    @property
    def format(self) -> str:
        """"onnx" for an ONNX ModelProto, "tf" for a GraphDef."""
        return "onnx" if type(self.graph_def).__name__ == "ModelProto" else "tf"


@dataclass
class FuseResult:
    """Result of `fuse`: the fused model (a GraphDef, or a ModelProto for ONNX input), the report and the
    verification checks. `onnx_model` is the tf2onnx conversion when a TF model is written as ONNX."""

    report: Report
    checks: list = field(default_factory=list)
    verified: bool | None = None
    output: str | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    failure: str | None = None
    onnx_model: object = None
    # The fused IR graph; a TF GraphDef is built from it only when someone reads `graph_def`, because
    # writing streams the GraphDef node by node without building it.
    _graph: object = field(default=None, repr=False)
    _model: object = field(default=None, repr=False)

    @property
    def graph_def(self):
        """The fused model: a TF GraphDef or an ONNX ModelProto."""
        if self._model is None:
            self._model = _from_ir(self._graph)
        return self._model


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
    from converters.onnx_model import parse_onnx

    onnx_model = parse_onnx(data, path)
    if onnx_model is not None:
        return Model(onnx_model, inputs, outputs, str(path))
    if Path(path).suffix == ".onnx":
        raise InputError(f"{path}: not a valid ONNX model (truncated or corrupt); export it again")
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
    if type(graph_def).__name__ == "ModelProto":
        from converters.onnx_model import save_onnx

        if path.suffix != ".onnx":
            raise InputError(f"{path}: an ONNX model is written as .onnx; choose an output ending in .onnx")
        save_onnx(graph_def, path)
        return
    if path.suffix == ".onnx":
        raise InputError(f"{path}: convert the GraphDef first (fusion-ir convert), or let fuse write .onnx")
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
    """Fuse a model and, unless `verify` is False, check its outputs against the original.

    `model` is a Model or a path. A TF model is checked in TensorFlow, an ONNX model in onnxruntime;
    a TF model written to an .onnx `output` is converted with tf2onnx after fusing and that ONNX model is
    checked in onnxruntime against the TF original too. With `output`, the result is written atomically.
    Raises InputError on bad input and VerificationError (with `.result`) when an output differs beyond
    its tolerance; the file is then written only when `force` is True. `skip` lists node-name globs kept
    out of every fusion and `disable` fusion families (conv-bn, group-conv, small-bn, mul-add) to turn off.
    `progress`, when given, is called with the name of each long step as it starts.
    """
    step = progress or (lambda name: None)
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
    if output is not None and model.format == "onnx" and Path(output).suffix != ".onnx":
        raise InputError(f"{output}: an ONNX model is written as .onnx; choose an output ending in .onnx")

    step("folding")
    graph = _to_ir(model, inputs or model.inputs, outputs or model.outputs)
    _check_input_shape_names(graph, input_shapes or {})
    input_specs = [(v.name, v.dtype, v.shape) for v in graph.inputs]
    output_names = [v.name for v in graph.outputs]
    nodes_before = len(graph.nodes) + len(graph.constants)

    report = run_pipeline(graph, mode, skip=skip, disable=disable)
    problems = graph.validate()
    if problems:
        raise FusionIRError(f"internal error: the fused graph is inconsistent: {problems[0]}")
    result = FuseResult(report, nodes_before=nodes_before, nodes_after=len(graph.nodes) + len(graph.constants),
                        _graph=graph)

    to_onnx = output is not None and model.format == "tf" and Path(output).suffix == ".onnx"
    if to_onnx:
        from converters.tf_to_onnx import graphdef_to_onnx

        step("converting to ONNX with tf2onnx")
        result.onnx_model = graphdef_to_onnx(result.graph_def, [v for v, _, _ in input_specs], output_names)
    if verify:
        step("verifying")
        _verify(model, result, input_specs, output_names, input_shapes or {}, seed)
    if output is not None and (result.verified is not False or force):
        step(f"writing {output}")
        same_io = not inputs and not outputs
        if to_onnx:
            written = result.onnx_model
        elif model.format == "tf" and Path(output).suffix == ".pb":
            from converters.tf_graphdef import ir_to_graphdef_chunks

            written = None
            write_atomic(output, ir_to_graphdef_chunks(graph))
        else:
            written = result.graph_def
        if written is not None:
            save(written, output, [v for v, _, _ in input_specs], output_names,
                 model.input_keys if same_io else None, model.output_keys if same_io else None)
        result.output = str(output)
    if result.verified is False:
        detail = result.failure or "; ".join(
            f"{c.output} ({c.backend}) relative max error {c.rel_max_error:.3g} exceeds {c.tolerance:.3g}"
            for c in result.checks if not c.ok)
        err = VerificationError("verification failed: " + detail +
                                ("" if force else "; the model was not written (use --force to write it anyway)"))
        err.result = result
        raise err
    return result


def convert(model: Model | str | os.PathLike, output: str | os.PathLike, *, opset: int | None = None) -> object:
    """Convert a TF model to ONNX with tf2onnx, without fusing, and write it to `output` (.onnx)."""
    from converters.tf_to_onnx import graphdef_to_onnx

    path = check_output_path(output)
    if path.suffix != ".onnx":
        raise InputError(f"{output}: convert writes ONNX; choose an output ending in .onnx")
    if not isinstance(model, Model):
        model = load(model)
    if model.format == "onnx":
        raise InputError(f"{model.source}: is already an ONNX model")
    graph = _to_ir(model, model.inputs, model.outputs)
    onnx_model = graphdef_to_onnx(model.graph_def, [v.name for v in graph.inputs], [v.name for v in graph.outputs],
                                  opset)
    save(onnx_model, path)
    return onnx_model


def _to_ir(model: Model, inputs, outputs):
    if model.format == "onnx":
        from converters.onnx_model import onnx_to_ir

        return onnx_to_ir(model.graph_def, inputs, outputs)
    from converters.tf_graphdef import graphdef_to_ir

    return graphdef_to_ir(model.graph_def, inputs, outputs)


def _from_ir(graph):
    if graph.dialect == "onnx":
        from converters.onnx_model import ir_to_onnx

        return ir_to_onnx(graph)
    from converters.tf_graphdef import ir_to_graphdef

    return ir_to_graphdef(graph)


def _check_input_shape_names(graph, input_shapes: dict) -> None:
    names = {v.name for v in graph.inputs} | {v.name.rsplit(":", 1)[0] for v in graph.inputs}
    for name in input_shapes:
        if name not in names:
            listed = ", ".join(v.name for v in graph.inputs) or "none"
            raise InputError(f"--input-shape names {name!r}, which is not a graph input (inputs: {listed})")


def _verify(model: Model, result: FuseResult, input_specs, output_names, input_shapes, seed) -> None:
    """Compare the fused model (and its ONNX conversion, if any) with the original on seeded inputs."""
    from fusion_ir import numerics as numeric

    if result.report.num_fused == 0 and result.onnx_model is None:
        result.verified = True
        return
    feeds = numeric.make_inputs(input_specs, input_shapes, seed)
    backend = "onnxruntime" if model.format == "onnx" else "tensorflow"
    run = numeric.run_onnx if model.format == "onnx" else numeric.run_graphdef
    try:
        expected = run(model.graph_def, feeds, output_names)
    except numeric.BackendUnavailable as err:
        _skip_verification(result, err)
        return
    checks = []
    candidates = [(backend, run, result.graph_def)] if result.report.num_fused else []
    if result.onnx_model is not None:
        candidates.append(("onnxruntime", numeric.run_onnx, result.onnx_model))
    for name, runner, candidate in candidates:
        try:
            actual = runner(candidate, feeds, output_names)
        except numeric.BackendUnavailable as err:
            if name == backend:
                # The original ran, so a fused model the same backend rejects is a fusion bug.
                result.verified = False
                result.failure = f"the fused model does not run in {name} although the original does: {err}"
                return
            _skip_verification(result, err)
            continue
        checks += [numeric.compare(name, out, e, a, None) for out, e, a in zip(output_names, expected, actual)]
    result.checks = checks
    result.verified = all(c.ok for c in checks)
    result.report.verification = numeric.checks_to_dicts(checks)


def _skip_verification(result: FuseResult, err: Exception) -> None:
    warning = f"verification skipped: {err}"
    log.debug(warning)
    result.report.warnings.append(warning)


@dataclass
class VerifyResult:
    """The checks of `verify`: one per output and backend, and whether all are within tolerance."""

    checks: list
    ok: bool
    input_pairs: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _pair(reference: list[str], candidate: list[str], what: str) -> list[tuple[str, str]]:
    """Pair names by name (ignoring a ":0" suffix), else by position (tf2onnx may rename)."""
    def bare(name):
        return name[:-2] if name.endswith(":0") else name

    by_name = {bare(n): n for n in candidate}
    if all(bare(n) in by_name for n in reference) and len(reference) == len(candidate):
        return [(n, by_name[bare(n)]) for n in reference]
    if len(reference) != len(candidate):
        raise InputError(f"the models have {len(reference)} and {len(candidate)} {what}s, which cannot be paired")
    return list(zip(reference, candidate))


def verify(reference: Model | str | os.PathLike, candidate: Model | str | os.PathLike | None = None, *,
           rtol: float | None = None, atol: float = 0.0, seed: int = 0,
           input_shapes: dict[str, tuple[int, ...]] | None = None, mode: str = "ptq") -> VerifyResult:
    """Compare two models on the same seeded inputs, or a model against its own fused form.

    Without `candidate`, `reference` is fused in memory and both are run in TensorFlow (for a TF model)
    and in onnxruntime (ONNX models directly, TF models through tf2onnx). With `candidate`, each model
    runs in its own backend and inputs and outputs are paired by name, else by position. An output is
    within tolerance when its relative max error is at most `rtol` (default by dtype) or its max absolute
    error at most `atol`.
    """
    from fusion_ir import numerics as numeric

    if not isinstance(reference, Model):
        reference = load(reference)
    result = VerifyResult([], True)
    ref_graph = _to_ir(reference, reference.inputs, reference.outputs)
    specs = [(v.name, v.dtype, v.shape) for v in ref_graph.inputs]
    ref_outputs = [v.name for v in ref_graph.outputs]
    _check_input_shape_names(ref_graph, input_shapes or {})
    feeds = numeric.make_inputs(specs, input_shapes or {}, seed)

    if candidate is None:
        fused = fuse(reference, verify=False, mode=mode)
        cand_model = Model(fused.graph_def, [s[0] for s in specs], ref_outputs, "fused")
        runs = [(_backend(reference), reference, cand_model)]
        if reference.format == "tf":
            from converters.tf_to_onnx import graphdef_to_onnx

            inputs = [s[0] for s in specs]
            runs.append(("onnxruntime", Model(graphdef_to_onnx(reference.graph_def, inputs, ref_outputs), inputs,
                                              ref_outputs), Model(graphdef_to_onnx(fused.graph_def, inputs,
                                                                                   ref_outputs), inputs, ref_outputs)))
        input_pairs = [(s[0], s[0]) for s in specs]
        output_pairs = [(n, n) for n in ref_outputs]
    else:
        cand_model = candidate if isinstance(candidate, Model) else load(candidate)
        cand_graph = _to_ir(cand_model, cand_model.inputs, cand_model.outputs)
        input_pairs = _pair([s[0] for s in specs], [v.name for v in cand_graph.inputs], "input")
        output_pairs = _pair(ref_outputs, [v.name for v in cand_graph.outputs], "output")
        label = _backend(reference) if reference.format == cand_model.format else \
            f"{_backend(reference)}/{_backend(cand_model)}"
        runs = [(label, reference, cand_model)]
    result.input_pairs = input_pairs

    for label, ref_model, cand in runs:
        try:
            expected = _run(ref_model, feeds, [r for r, _ in output_pairs])
            cand_feeds = {c: feeds[r] for r, c in input_pairs}
            actual = _run(cand, cand_feeds, [c for _, c in output_pairs])
        except numeric.BackendUnavailable as err:
            result.warnings.append(f"{label} check skipped: {err}")
            continue
        for (ref_name, cand_name), e, a in zip(output_pairs, expected, actual):
            check = numeric.compare(label, ref_name, e, a, rtol, atol)
            if cand_name != ref_name:
                check.candidate_output = cand_name
            result.checks.append(check)
    if not result.checks:
        raise InputError("no backend could run both models; nothing was compared (" +
                         "; ".join(result.warnings) + ")")
    result.ok = all(c.ok for c in result.checks)
    return result


def _backend(model: Model) -> str:
    return "onnxruntime" if model.format == "onnx" else "tensorflow"


def _run(model: Model, feeds: dict, outputs: list[str]):
    from fusion_ir.numerics import run_graphdef, run_onnx

    if model.format == "onnx":
        return run_onnx(model.graph_def, feeds, outputs)
    return run_graphdef(model.graph_def, feeds, outputs)
