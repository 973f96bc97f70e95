"""Benchmark tasks, each run by run.py in its own subprocess: `python benchmarks/tasks.py TASK REQUEST.json`.

A task reads its request (paths, tensor names, repetitions) from a JSON file and writes its result as
JSON to the request's "result" path. Running every task in a fresh process keeps one crashing or
memory-hungry tool from affecting the others, and lets run.py stop a task at its timeout.

Times are wall-clock seconds from time.perf_counter, measured inside the process after the tool's
modules are imported, from reading the input file to writing the output file. "Best of N" means the
minimum over N runs; a run longer than `long_run_seconds` is not repeated.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import bncount  # noqa: E402

TOLERANCE = 1e-5
SEED = 0


def best_of(function, repeats: int, long_run_seconds: float) -> tuple[float, list[float]]:
    """Run `function` up to `repeats` times; return (minimum seconds, all run times)."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        if times[-1] > long_run_seconds:
            break
    return min(times), times


def _node_name(tensor: str) -> str:
    return tensor.rsplit(":", 1)[0] if tensor.rsplit(":", 1)[-1].isdigit() else tensor


def _read_graphdef(path: str):
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    from tensorflow.core.framework import graph_pb2

    graph_def = graph_pb2.GraphDef()
    graph_def.ParseFromString(Path(path).read_bytes())
    return graph_def


def _input_specs(graph_def, inputs: list[str]):
    """(tensor name, dtype, shape) of each Placeholder input, as fusion_ir.numerics.make_inputs expects."""
    from converters.tf_graphdef import numpy_dtype

    by_name = {n.name: n for n in graph_def.node}
    specs = []
    for tensor in inputs:
        node = by_name[_node_name(tensor)]
        dims = node.attr["shape"].shape.dim
        shape = tuple(None if d.size < 0 else d.size for d in dims)
        specs.append((tensor, numpy_dtype(node.attr["dtype"].type), shape))
    return specs


def _tf_reference(request: dict):
    """Return (feeds, expected outputs) for the TF model, computed once and cached beside it."""
    from fusion_ir import numerics

    cache = Path(request["tf_reference"])
    if cache.exists():
        data = np.load(cache)
        feeds = {name: data[f"in{i}"] for i, name in enumerate(request["inputs"])}
        return feeds, [data[f"out{i}"] for i in range(len(request["outputs"]))]
    graph_def = _read_graphdef(request["model"])
    feeds = numerics.make_inputs(_input_specs(graph_def, request["inputs"]), {}, SEED)
    expected = numerics.run_graphdef(graph_def, feeds, request["outputs"])
    arrays = {f"in{i}": feeds[name] for i, name in enumerate(request["inputs"])}
    arrays.update({f"out{i}": e for i, e in enumerate(expected)})
    np.savez(cache, **arrays)
    return feeds, expected


def _onnx_reference(request: dict, feeds: dict):
    """Return the outputs of the unoptimized ONNX form in onnxruntime, cached beside it."""
    import onnx

    from fusion_ir import numerics

    cache = Path(request["onnx_reference"])
    if cache.exists():
        data = np.load(cache)
        return [data[f"out{i}"] for i in range(len(data.files))]
    model = onnx.load(request["onnx"])
    expected = numerics.run_onnx(model, _onnx_feeds(model, feeds), [o.name for o in model.graph.output])
    np.savez(cache, **{f"out{i}": e for i, e in enumerate(expected)})
    return expected


def _onnx_feeds(model, feeds: dict) -> dict:
    """Pair TF feeds with the ONNX graph inputs by position (tf2onnx keeps "x:0" names, but be safe)."""
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return dict(zip(names, feeds.values()))


def _match(expected: list, actual: list) -> dict:
    """Compare outputs with fusion_ir.numerics.compare; return the worst relative max error and a verdict."""
    from fusion_ir import numerics

    checks = [numerics.compare("benchmark", str(i), e, a, TOLERANCE) for i, (e, a) in enumerate(zip(expected, actual))]
    worst = max(c.rel_max_error for c in checks)
    return {"rel_max_error": worst, "match": all(c.ok for c in checks)}


def _tf_check(request: dict, graph_def) -> dict:
    """Count BN left in a TF graph and compare its outputs with the original's."""
    from fusion_ir import numerics

    count = bncount.count_tf(graph_def)
    result = {"bn_left": count.foldable, "bn_like_left": count.all_bn_like}
    feeds, expected = _tf_reference(request)
    try:
        actual = numerics.run_graphdef(graph_def, feeds, request["outputs"])
    except numerics.BackendUnavailable as err:
        result.update({"match": False, "match_error": str(err)})
        return result
    result.update(_match(expected, actual))
    return result


def _onnx_check(request: dict, model) -> dict:
    """Count BN left in an ONNX model and compare its outputs with the unoptimized ONNX form's."""
    from fusion_ir import numerics

    count = bncount.count_onnx(model)
    result = {"bn_left": count.foldable, "bn_like_left": count.all_bn_like}
    feeds, _ = _tf_reference(request)
    try:
        expected = _onnx_reference(request, feeds)
    except numerics.BackendUnavailable as err:
        result.update({"match": None, "match_error": f"the ONNX form itself does not run: {err}"})
        return result
    try:
        actual = numerics.run_onnx(model, _onnx_feeds(model, feeds), [o.name for o in model.graph.output])
    except numerics.BackendUnavailable as err:
        result.update({"match": False, "match_error": str(err)})
        return result
    result.update(_match(expected, actual))
    return result


# -- fusion-ir -------------------------------------------------------------------------------------


def _foldable_weights(request: dict, report):
    """Return (weight, channel axes) for the producer of every fused candidate, resolved as the passes do."""
    from converters.tf_graphdef import graphdef_to_ir
    from passes.resolve import ConstResolver
    from passes.table import semantics

    graph = graphdef_to_ir(_read_graphdef(request["model"]), request["inputs"], request["outputs"])
    resolver = ConstResolver({id(v) for v in graph.inputs})
    weights = []
    for candidate in report.candidates.values():
        if candidate.status != "fused":
            continue
        for name in candidate.nodes:
            node = graph.node(name)
            sem = semantics(node) if node is not None else None
            if sem is None:
                continue
            weight = resolver.resolve(node.inputs[sem.weight_input])
            weights.append((np.ascontiguousarray(weight), tuple(sem.channel_axes(node))))
    return weights


def time_fold(request: dict, report) -> dict:
    """Time passes.folding.scale_weight over every weight that `report` lists as folded, with random
    per-channel scales, against one numpy multiply-copy of the same weights."""
    from passes.folding import scale_weight

    weights = _foldable_weights(request, report)
    rng = np.random.default_rng(SEED)
    jobs = []
    for weight, axes in weights:
        channels = int(np.prod([weight.shape[a] for a in axes]))
        scale = rng.uniform(0.5, 1.5, channels)
        shape = [1] * weight.ndim
        for axis in axes:
            shape[axis] = weight.shape[axis]
        broadcast = scale.astype(weight.dtype).reshape(shape)
        jobs.append((weight, axes, scale, broadcast))

    def fold_all():
        for weight, axes, scale, _ in jobs:
            scale_weight(weight, scale, axes)

    def multiply_all():
        for weight, _, _, broadcast in jobs:
            np.multiply(weight, broadcast, out=np.empty_like(weight))

    repeats = request["repeats"]
    floor, floor_runs = best_of(multiply_all, repeats, request["long_run_seconds"])
    fold, fold_runs = best_of(fold_all, repeats, request["long_run_seconds"])
    return {"weights": len(jobs), "weight_bytes": int(sum(w.nbytes for w, *_ in jobs)),
            "seconds": fold, "runs": fold_runs, "floor_seconds": floor, "floor_runs": floor_runs}


def task_fuse(request: dict) -> dict:
    """Time fusion_ir.load + fusion_ir.fuse(verify=False) file to file, against read + parse + serialize +
    write of the same GraphDef; check the fused graph; time the folded-weight computation alone;
    optionally profile one fuse."""
    import fusion_ir
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    from tensorflow.core.framework import graph_pb2

    model_path, out_path = request["model"], request["output"]
    results = {}

    def fuse_once():
        results["last"] = fusion_ir.fuse(fusion_ir.load(model_path), out_path, verify=False)

    def parse_serialize_write():
        graph_def = graph_pb2.GraphDef()
        graph_def.ParseFromString(Path(model_path).read_bytes())
        data = graph_def.SerializeToString()
        with open(request["floor_output"], "wb") as handle:
            handle.write(data)

    # One untimed run of each first: the first fuse imports the rest of TensorFlow's op registry.
    fuse_once()
    parse_serialize_write()
    repeats, long_run = request["repeats"], request["long_run_seconds"]
    floor, floor_runs = best_of(parse_serialize_write, repeats, long_run)
    fuse, fuse_runs = best_of(fuse_once, repeats, long_run)
    result = results["last"]
    out = {"seconds": fuse, "runs": fuse_runs, "floor_seconds": floor, "floor_runs": floor_runs,
           "fused": result.report.num_fused, "skipped": result.report.num_skipped,
           "nodes_before": result.nodes_before, "nodes_after": result.nodes_after,
           "output_bytes": os.path.getsize(out_path)}
    original = bncount.count_tf(_read_graphdef(model_path))
    out["bn_foldable_before"] = original.foldable
    out["bn_like_before"] = original.all_bn_like
    out.update(_tf_check(request, _read_graphdef(out_path)))
    out["fold"] = time_fold(request, result.report)
    if request.get("profile"):
        out["profile"] = _profile(fuse_once, request["profile"])
    return out


def _profile(function, stats_path: str, top: int = 20) -> dict:
    """Run `function` under cProfile; save the stats and return the top functions by own and total time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    function()
    profiler.disable()
    elapsed = time.perf_counter() - start
    profiler.dump_stats(stats_path)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_, calls, own, total, _) in stats.stats.items():
        rows.append({"function": f"{_short_path(filename)}:{line}({name})", "calls": calls, "own_seconds": own,
                     "total_seconds": total})
    by_own = sorted(rows, key=lambda r: r["own_seconds"], reverse=True)[:top]
    by_total = sorted(rows, key=lambda r: r["total_seconds"], reverse=True)[:top]
    return {"seconds_under_profiler": elapsed, "stats_file": stats_path, "by_own_time": by_own,
            "by_total_time": by_total}


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", str(BENCH_DIR.parent) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def task_fusion_ir_onnx(request: dict) -> dict:
    """Time fusion-ir on the ONNX form (load + fuse + write, verify off) and check its output."""
    import onnx

    import fusion_ir

    def run():
        fusion_ir.fuse(fusion_ir.load(request["onnx"]), request["output"], verify=False)

    seconds, runs = best_of(run, request["repeats"], request["long_run_seconds"])
    out = {"seconds": seconds, "runs": runs}
    out.update(_onnx_check(request, onnx.load(request["output"])))
    return out


# -- peers -----------------------------------------------------------------------------------------


def _run_tf_peer(request: dict, optimize) -> dict:
    """Time read + parse + `optimize(graph_def)` + serialize + write, then check the result."""
    from fusion_ir.tfimport import import_tensorflow

    import_tensorflow()
    from tensorflow.core.framework import graph_pb2

    holder = {}

    def run():
        graph_def = graph_pb2.GraphDef()
        graph_def.ParseFromString(Path(request["model"]).read_bytes())
        optimized = optimize(graph_def)
        Path(request["output"]).write_bytes(optimized.SerializeToString())
        holder["graph_def"] = optimized

    seconds, runs = best_of(run, request["repeats"], request["long_run_seconds"])
    out = {"seconds": seconds, "runs": runs}
    out.update(_tf_check(request, holder.pop("graph_def")))
    return out


def _optimize_for_inference(request: dict, graph_def):
    from tensorflow.python.framework import dtypes
    from tensorflow.python.tools import optimize_for_inference_lib

    return optimize_for_inference_lib.optimize_for_inference(
        graph_def, [_node_name(t) for t in request["inputs"]], [_node_name(t) for t in request["outputs"]],
        dtypes.float32.as_datatype_enum)


def task_tf_optimize_for_inference(request: dict) -> dict:
    """TensorFlow's optimize_for_inference on the frozen graph as it is."""
    return _run_tf_peer(request, lambda graph_def: _optimize_for_inference(request, graph_def))


def task_tf_grappler_optimize_for_inference(request: dict) -> dict:
    """Grappler through tf2onnx.tf_loader.tf_optimize, then optimize_for_inference."""
    import logging

    from tf2onnx import tf_loader

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)

    from fusion_ir.tfimport import import_tensorflow

    tf = import_tensorflow()

    def optimize(graph_def):
        # tf_optimize exports a meta graph, which needs a graph context (tf2onnx's own converter opens one too).
        with tf.Graph().as_default():
            optimized = tf_loader.tf_optimize(request["inputs"], request["outputs"], graph_def)
        return _optimize_for_inference(request, optimized)

    return _run_tf_peer(request, optimize)


def task_tf2onnx(request: dict) -> dict:
    """tf2onnx.convert.from_graph_def, file to file; the output is the benchmark's ONNX form."""
    import logging

    import onnx

    from fusion_ir.tfimport import import_tensorflow

    tf = import_tensorflow()
    tf.get_logger().setLevel(logging.ERROR)
    import tf2onnx
    from tensorflow.core.framework import graph_pb2

    for name in ("tf2onnx", "tf2onnx.tfonnx", "tf2onnx.optimizer", "tf2onnx.shape_inference"):
        logging.getLogger(name).setLevel(logging.ERROR)
    output = Path(request["output"])
    tmp = output.with_suffix(".onnx.tmp")

    def run():
        graph_def = graph_pb2.GraphDef()
        graph_def.ParseFromString(Path(request["model"]).read_bytes())
        model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=request["inputs"],
                                                  output_names=request["outputs"])
        onnx.save(model, str(tmp))

    seconds, runs = best_of(run, request["repeats"], request["long_run_seconds"])
    os.replace(tmp, output)
    out = {"seconds": seconds, "runs": runs}
    # tf2onnx's output is checked against the TF original, since it is itself the ONNX reference.
    from fusion_ir import numerics

    model = onnx.load(str(output))
    count = bncount.count_onnx(model)
    out.update({"bn_left": count.foldable, "bn_like_left": count.all_bn_like})
    feeds, expected = _tf_reference(request)
    try:
        actual = numerics.run_onnx(model, _onnx_feeds(model, feeds), [o.name for o in model.graph.output])
        out.update(_match(expected, actual))
    except numerics.BackendUnavailable as err:
        out.update({"match": False, "match_error": str(err)})
    return out


def _run_onnx_peer(request: dict, optimize) -> dict:
    """Time `optimize(onnx path, output path)` (it reads and writes the files), then check the result."""
    import onnx

    seconds, runs = best_of(lambda: optimize(request["onnx"], request["output"]), request["repeats"],
                            request["long_run_seconds"])
    out = {"seconds": seconds, "runs": runs}
    out.update(_onnx_check(request, onnx.load(request["output"])))
    return out


def task_ort_basic(request: dict) -> dict:
    """onnxruntime's offline basic optimization: ORT_ENABLE_BASIC with optimized_model_filepath."""
    import onnxruntime as ort

    def optimize(source: str, target: str):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = target
        options.log_severity_level = 3
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    return _run_onnx_peer(request, optimize)


def task_onnxoptimizer(request: dict) -> dict:
    """onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]), with onnx.load and onnx.save."""
    import onnx
    import onnxoptimizer

    def optimize(source: str, target: str):
        onnx.save(onnxoptimizer.optimize(onnx.load(source), ["fuse_bn_into_conv"]), target)

    return _run_onnx_peer(request, optimize)


def task_onnxslim(request: dict) -> dict:
    """onnxslim.slim(model) with its default passes, with onnx.load and onnx.save."""
    import onnx
    import onnxslim

    def optimize(source: str, target: str):
        onnx.save(onnxslim.slim(onnx.load(source)), target)

    return _run_onnx_peer(request, optimize)


# -- inference -------------------------------------------------------------------------------------


def _median_seconds(function, runs: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def task_inference_tf(request: dict) -> dict:
    """Median session.run time of the original and the fused GraphDef, batch 1, default session config."""
    from fusion_ir.tfimport import import_tensorflow

    tf = import_tensorflow()
    feeds, _ = _tf_reference(request)
    out = {}
    for label, path in (("original", request["model"]), ("fused", request["fused"])):
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(_read_graphdef(path), name="")
        with tf.compat.v1.Session(graph=graph) as session:
            median, times = _median_seconds(lambda: session.run(request["outputs"], feed_dict=feeds),
                                            request["runs"])
        out[label] = {"median_seconds": median, "runs": times}
    return out


def task_inference_ort(request: dict) -> dict:
    """Median run time of the ONNX form and of fusion-ir's fused ONNX in onnxruntime, batch 1, with
    onnxruntime's default graph optimizations (which fold BatchNorm into Conv at session creation)."""
    import onnxruntime as ort

    feeds, _ = _tf_reference(request)
    out = {}
    for label, path in (("original", request["onnx"]), ("fused", request["fused_onnx"])):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        onnx_feeds = dict(zip(names, feeds.values()))
        median, times = _median_seconds(lambda: session.run(None, onnx_feeds), request["runs"])
        out[label] = {"median_seconds": median, "runs": times}
    return out


TASKS = {
    "fuse": task_fuse,
    "fusion-ir-onnx": task_fusion_ir_onnx,
    "tf-optimize-for-inference": task_tf_optimize_for_inference,
    "tf-grappler-optimize-for-inference": task_tf_grappler_optimize_for_inference,
    "tf2onnx": task_tf2onnx,
    "ort-basic": task_ort_basic,
    "onnxoptimizer": task_onnxoptimizer,
    "onnxslim": task_onnxslim,
    "inference-tf": task_inference_tf,
    "inference-ort": task_inference_ort,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TASKS:
        print(f"usage: python benchmarks/tasks.py TASK REQUEST.json; TASK is one of {', '.join(TASKS)}",
              file=sys.stderr)
        return 2
    request = json.loads(Path(argv[1]).read_text())
    result = TASKS[argv[0]](request)
    Path(request["result"]).write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv[1:]))
