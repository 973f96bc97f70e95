"""Numeric verification: run the original and the fused graph on the same seeded inputs.

For each output, the relative max error is max|fused - original| / max|original| (the absolute error
when the original is all zeros). Defaults: 1e-5 for float32 and float64, 2e-3 for float16 and bfloat16;
integer and boolean outputs must match exactly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from fusion_ir.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"float16": 2e-3, "bfloat16": 2e-3, "float32": 1e-5, "float64": 1e-5}


class BackendUnavailable(Exception):
    """Raised when a backend cannot run a model (an unknown op, a missing kernel); the message gives the cause."""


@dataclass
class OutputCheck:
    backend: str
    output: str
    max_abs_error: float
    rel_max_error: float
    tolerance: float
    ok: bool
    # The candidate's output name when it differs from the reference's (paired by position).
    candidate_output: str | None = None


def tolerance_for(dtype: np.dtype) -> float:
    return DEFAULT_TOLERANCE.get(np.dtype(dtype).name, 0.0)


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse NAME:DIMS entries ("input:1,224,224,3"; the name may itself end in ":0")."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
            if any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape {spec!r} is invalid; write NAME:DIMS with positive dimensions, "
                             f"for example input:1,224,224,3") from None
    return shapes


def make_inputs(specs: list[tuple[str, np.dtype, tuple | None]], shapes: dict[str, tuple[int, ...]],
                seed: int) -> dict[str, np.ndarray]:
    """Return seeded random feeds; unknown dimensions come from `shapes`, else 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, shape in specs:
        node_name = name.rsplit(":", 1)[0]
        given = shapes.get(name, shapes.get(node_name))
        if given is not None:
            if shape is not None and (len(given) != len(shape) or any(
                    d is not None and d != g for d, g in zip(shape, given))):
                known = ",".join("?" if d is None else str(d) for d in shape)
                raise InputError(f"--input-shape {node_name}:{','.join(map(str, given))} does not match the "
                                 f"input's shape [{known}]")
            dims = given
        elif shape is None:
            raise InputError(f"input {node_name} has unknown rank; give its shape with --input-shape "
                             f"{node_name}:DIMS")
        else:
            dims = tuple(1 if d is None else d for d in shape)
        if dtype is None:
            raise BackendUnavailable(f"input {node_name} has no known dtype")
        dtype = np.dtype(dtype)
        if dtype.kind == "f" or dtype.name == "bfloat16":
            array = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, 8, size=dims).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, size=dims).astype(bool)
        else:
            raise BackendUnavailable(f"input {node_name} has dtype {dtype}, which verification cannot generate")
        feeds[name] = array
    return feeds


def compare(backend: str, name: str, original: np.ndarray, fused: np.ndarray, tolerance: float | None,
            atol: float = 0.0) -> OutputCheck:
    original = np.asarray(original)
    fused = np.asarray(fused)
    tol = tolerance_for(original.dtype) if tolerance is None else tolerance
    if original.shape != fused.shape:
        return OutputCheck(backend, name, float("inf"), float("inf"), tol, False)
    if original.dtype.kind not in "fc" and original.dtype.name != "bfloat16":
        equal = bool(np.array_equal(original, fused))
        return OutputCheck(backend, name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), 0.0, equal)
    a = original.astype(np.float64)
    b = fused.astype(np.float64)
    if a.size == 0:
        return OutputCheck(backend, name, 0.0, 0.0, tol, True)
    same_nonfinite = (~np.isfinite(a) & (a == b)) | (np.isnan(a) & np.isnan(b))
    diff = np.where(same_nonfinite, 0.0, np.abs(a - b))
    max_abs = float(np.max(diff)) if diff.size else 0.0
    finite = a[np.isfinite(a)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    rel = max_abs / peak if peak > 0 else max_abs
    ok = bool(np.isfinite(rel) and (rel <= tol or max_abs <= atol))
    return OutputCheck(backend, name, max_abs, rel, tol, ok)


def run_graphdef(graph_def, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
    """Run a GraphDef in TensorFlow (TF1 session over an imported graph)."""
    from fusion_ir.tfimport import import_tensorflow

    tf = import_tensorflow()

    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
    except (ValueError, tf.errors.OpError) as err:
        raise BackendUnavailable(f"TensorFlow cannot import the graph: {str(err).splitlines()[0]}") from None
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    try:
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            return session.run(fetches, feed_dict=feeds)
    except tf.errors.OpError as err:
        raise BackendUnavailable(f"TensorFlow cannot run the graph: {str(err).splitlines()[0]}") from None


def run_onnx(model, feeds: dict[str, np.ndarray], fetches: list[str]) -> list[np.ndarray]:
    """Run an ONNX ModelProto in onnxruntime with graph optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(fetches, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types per failure
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BackendUnavailable(f"onnxruntime cannot run the model: {first}") from None


def checks_to_dicts(checks: list[OutputCheck]) -> list[dict]:
    return [asdict(c) for c in checks]


def format_checks(checks: list[OutputCheck]) -> str:
    checks = [c if c.candidate_output is None else
              OutputCheck(c.backend, f"{c.output} -> {c.candidate_output}", c.max_abs_error, c.rel_max_error,
                          c.tolerance, c.ok) for c in checks]
    width = max(len("output"), *(len(c.output) for c in checks))
    bwidth = max(len("backend"), *(len(c.backend) for c in checks))
    lines = [f"{'backend':<{bwidth}}  {'output':<{width}}  {'max abs err':>11}  {'rel max err':>11}  {'tolerance':>9}  result"]
    for c in checks:
        lines.append(f"{c.backend:<{bwidth}}  {c.output:<{width}}  {c.max_abs_error:>11.3g}  {c.rel_max_error:>11.3g}  "
                     f"{c.tolerance:>9.3g}  {'ok' if c.ok else 'FAILED'}")
    return "\n".join(lines)
