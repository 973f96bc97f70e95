"""Benchmark fusion-ir against its floors and against peer tools on frozen keras.applications models.

    python benchmarks/run.py [--quick] [--models NAME,...] [--json FILE] [--plot FILE.png] [--markdown FILE.md]

Per model it records, each time in seconds and each ratio against a floor from the same run:

1. the folded-weight computation (passes.folding.scale_weight over every weight fusion-ir folds)
   against one numpy multiply-copy of the same weights;
2. the in-process fuse (fusion_ir.load + fusion_ir.fuse(model, out, verify=False)) against reading,
   parsing, serializing and writing the same GraphDef;
3. the whole `fusion-ir fuse IN -o OUT --no-verify` process against a process that imports TensorFlow,
   parses the GraphDef and writes it;
4. the peak resident memory of that fuse process above a process that only imports TensorFlow,
   against the model's file size;
5. peer tools on the same model: time, foldable BN left (see bncount.py) and whether the output
   still matches the original;
6. inference time of the original and the fused model in TensorFlow and onnxruntime.

Every measurement runs in its own subprocess (tasks.py) with a timeout; a failure is recorded as
"failed: reason" and the run goes on. Built models are cached in benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import models  # noqa: E402
import report  # noqa: E402

TF_PEERS = ["tf-grappler-optimize-for-inference", "tf-optimize-for-inference", "tf2onnx"]
ONNX_PEERS = ["ort-basic", "onnxoptimizer", "onnxslim"]
PACKAGES = ["tensorflow", "keras", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "onnxoptimizer", "onnxslim",
            "numpy", "protobuf"]

FLOOR_PROCESS = """
import sys
import tensorflow
from tensorflow.core.framework import graph_pb2
graph_def = graph_pb2.GraphDef()
with open(sys.argv[1], "rb") as handle:
    graph_def.ParseFromString(handle.read())
with open(sys.argv[2], "wb") as handle:
    handle.write(graph_def.SerializeToString())
"""
BASELINE_PROCESS = "import tensorflow"


class Settings:
    """Repetitions and limits for one run; --quick lowers them."""

    def __init__(self, quick: bool, timeout: float):
        self.quick = quick
        self.timeout = timeout
        self.repeats = 3
        # A run longer than this is not repeated (best of one).
        self.long_run_seconds = 5.0 if quick else 20.0
        self.process_repeats = 1 if quick else 3
        self.inference_runs = 5 if quick else 10


def _environment() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def machine_info() -> dict:
    """Return the CPU model, cores, memory and package versions of this machine, and the measured source."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import fusion_ir

    try:
        commit = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "fusion_ir_source": str(Path(fusion_ir.__file__).parent.parent),
            "git_commit": commit}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


class LoadMeter:
    """Measure how many cores other processes kept busy during a step: the machine's busy CPU time from
    /proc/stat minus the CPU time of this process and its reaped children, divided by the wall time.

    The benchmark needs an idle machine; this figure shows when it did not have one. It is an estimate:
    /proc/stat counts in clock ticks (10 ms), and a child still running at the end is not counted as ours.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return time.perf_counter(), float("nan"), 0.0
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return time.perf_counter(), busy, own

    def other_cores(self) -> float | None:
        end = self._sample()
        wall = end[0] - self.start[0]
        if wall <= 0 or end[1] != end[1]:
            return None
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall)


def run_task(task: str, request: dict, timeout: float, workdir: Path) -> dict:
    """Run tasks.py TASK in a subprocess; return its result, or {"error": "failed: ..."}."""
    request_path = workdir / f"{task}.request.json"
    result_path = workdir / f"{task}.result.json"
    result_path.unlink(missing_ok=True)
    request = dict(request, result=str(result_path))
    request_path.write_text(json.dumps(request))
    command = [sys.executable, str(BENCH_DIR / "tasks.py"), task, str(request_path)]
    start = time.perf_counter()
    meter = LoadMeter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())
    except subprocess.TimeoutExpired:
        return {"error": f"failed: timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - start
    other_load = meter.other_cores()
    if completed.returncode != 0 or not result_path.exists():
        reason = _last_line(completed.stderr) if completed.returncode > 0 else f"killed by signal {-completed.returncode}"
        return {"error": f"failed: exit code {completed.returncode}: {reason}", "task_seconds": elapsed}
    result = json.loads(result_path.read_text())
    result["task_seconds"] = elapsed
    result["other_load_cores"] = other_load
    return result


def run_process(command: list[str], timeout: float) -> dict:
    """Run `command`; return its wall time and peak resident memory (ru_maxrss from wait4), or an error."""
    meter = LoadMeter()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment())
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            os.wait4(process.pid, 0)
            return {"error": f"failed: timed out after {timeout:.0f} s"}
        time.sleep(0.005)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode("utf-8", "replace")
    process.stderr.close()
    if process.returncode != 0:
        return {"error": f"failed: exit code {process.returncode}: {_last_line(stderr)}"}
    # Linux reports ru_maxrss in KiB.
    return {"seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "other_load_cores": meter.other_cores()}


def repeat_process(command: list[str], repeats: int, settings: Settings) -> dict:
    """Run `command` up to `repeats` times; return the best wall time and the highest peak memory."""
    runs = []
    for _ in range(repeats):
        result = run_process(command, settings.timeout)
        if "error" in result:
            return result
        runs.append(result)
        if result["seconds"] > settings.long_run_seconds * 3:
            break
    loads = [r["other_load_cores"] for r in runs if r["other_load_cores"] is not None]
    return {"seconds": min(r["seconds"] for r in runs), "runs": [r["seconds"] for r in runs],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "other_load_cores": max(loads) if loads else None}


def fusion_ir_command() -> list[str]:
    """Return the installed fusion-ir console script beside this interpreter, so no pyenv shim runs first."""
    script = Path(sys.executable).parent / "fusion-ir"
    if script.exists():
        return [str(script)]
    found = shutil.which("fusion-ir")
    if found is None:
        raise SystemExit("error: the fusion-ir command is not installed; run pip install -e . first")
    return [found]


def ensure_built(spec: models.ModelSpec, cache_dir: Path, timeout: float) -> tuple[models.BuiltModel | None, str]:
    """Return the cached model, building it in a subprocess first when needed."""
    built = models.load_cached(spec, cache_dir)
    if built is not None:
        return built, "cached"
    print(f"  building {spec.key}...", flush=True)
    command = [sys.executable, str(BENCH_DIR / "models.py"), spec.key, str(cache_dir)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())
    except subprocess.TimeoutExpired:
        return None, f"failed: building timed out after {timeout:.0f} s"
    if completed.returncode != 0:
        return None, f"failed: building exited with code {completed.returncode}: {_last_line(completed.stderr)}"
    return models.load_cached(spec, cache_dir), "built"


def benchmark_model(spec: models.ModelSpec, settings: Settings, cache_dir: Path, workdir: Path, baseline: dict,
                    profile: bool) -> dict:
    """Run every measurement on one model; return its record for the JSON output."""
    record = {"key": spec.key, "label": spec.label, "kind": spec.kind}
    built, status = ensure_built(spec, cache_dir, settings.timeout)
    if built is None:
        record["error"] = status
        return record
    record.update({"file_bytes": built.file_bytes, "build_seconds": built.build_seconds, "inputs": built.inputs,
                   "outputs": built.outputs, "input_size": spec.size})
    stem = cache_dir / spec.key
    outputs = workdir / spec.key
    outputs.mkdir(exist_ok=True)
    base = {"model": str(built.path), "inputs": built.inputs, "outputs": built.outputs,
            "repeats": settings.repeats, "long_run_seconds": settings.long_run_seconds,
            "tf_reference": f"{stem}.tfref.npz", "onnx": str(built.onnx_path),
            "onnx_reference": f"{stem}.onnxref.npz"}
    # A reference from an earlier run with other inputs must not be reused.
    for name in ("tf_reference", "onnx_reference"):
        Path(base[name]).unlink(missing_ok=True)

    def step(name: str, task: str, **extra) -> dict:
        print(f"  {name}...", end=" ", flush=True)
        result = run_task(task, dict(base, **extra), settings.timeout, outputs)
        print(result.get("error") or f"{result.get('seconds', result.get('task_seconds', 0)):.3f} s", flush=True)
        return result

    fused_pb = outputs / "fused.pb"
    record["fuse"] = step("in-process fuse and folded-weight computation", "fuse", output=str(fused_pb),
                          floor_output=str(outputs / "floor.pb"), profile=f"{stem}.fuse.prof" if profile else None)
    record["fold"] = record["fuse"].pop("fold", None) or {"error": record["fuse"].get("error", "failed: no result")}

    print("  fusion-ir process...", end=" ", flush=True)
    process = repeat_process(fusion_ir_command() + ["fuse", str(built.path), "-o", str(outputs / "process.pb"),
                                                    "--no-verify"], settings.process_repeats, settings)
    floor = repeat_process([sys.executable, "-c", FLOOR_PROCESS, str(built.path), str(outputs / "floor-process.pb")],
                           settings.process_repeats, settings)
    record["process"] = {"fusion_ir": process, "floor": floor, "baseline": baseline}
    print(process.get("error") or f"{process['seconds']:.2f} s (floor {floor.get('seconds', float('nan')):.2f} s)",
          flush=True)

    record["peers"] = {}
    for peer in TF_PEERS:
        output = built.onnx_path if peer == "tf2onnx" else outputs / f"{peer}.pb"
        if peer == "tf2onnx":
            built.onnx_path.unlink(missing_ok=True)
        record["peers"][peer] = step(peer, peer, output=str(output))
    fused_onnx = outputs / "fused.onnx"
    if built.onnx_path.exists():
        record["fuse_onnx"] = step("fusion-ir on the ONNX form", "fusion-ir-onnx", output=str(fused_onnx))
        for peer in ONNX_PEERS:
            record["peers"][peer] = step(peer, peer, output=str(outputs / f"{peer}.onnx"))
    else:
        skipped = {"error": "failed: no ONNX form, because tf2onnx failed"}
        record["fuse_onnx"] = skipped
        for peer in ONNX_PEERS:
            record["peers"][peer] = skipped

    inference = {"runs": settings.inference_runs}
    if fused_pb.exists():
        inference["tf"] = step("TensorFlow inference", "inference-tf", fused=str(fused_pb), runs=settings.inference_runs)
    else:
        inference["tf"] = {"error": "failed: no fused model, because the in-process fuse failed"}
    if fused_onnx.exists():
        inference["ort"] = step("onnxruntime inference", "inference-ort", fused_onnx=str(fused_onnx),
                                runs=settings.inference_runs)
    else:
        inference["ort"] = {"error": "failed: no fused ONNX model"}
    record["inference"] = inference
    return record


def select_models(args) -> list[models.ModelSpec]:
    if args.models:
        keys = [k.strip() for k in args.models.split(",") if k.strip()]
        unknown = [k for k in keys if k not in models.ALL_MODELS]
        if unknown:
            raise SystemExit(f"error: unknown model {', '.join(unknown)}; choose from {', '.join(models.ALL_MODELS)}")
        return [models.ALL_MODELS[k] for k in keys]
    return models.QUICK_MODELS if args.quick else models.FULL_MODELS


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark fusion-ir against its floors and peer tools; see docs/benchmarks.md.")
    parser.add_argument("--quick", action="store_true",
                        help="small models and fewer repetitions (about 4 minutes on two cores)")
    parser.add_argument("--models", metavar="NAME,...",
                        help=f"models to run (default: the full or --quick set); any of {', '.join(models.ALL_MODELS)}")
    parser.add_argument("--json", metavar="FILE", help="write every raw figure as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot of the times to FILE.png")
    parser.add_argument("--markdown", metavar="FILE.md", help="write the tables as markdown to FILE.md")
    parser.add_argument("--profile", metavar="NAME,...",
                        help="models whose in-process fuse is also run once under cProfile (default: "
                             "resnet152v2-keras3 when it is in the run)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="limit for each build and each measurement subprocess (default: 300 with --quick, "
                             "else 900)")
    parser.add_argument("--cache-dir", type=Path, default=models.DEFAULT_CACHE,
                        help="where built models and their ONNX forms are kept (default: benchmarks/.cache)")
    parser.add_argument("--from-json", metavar="FILE",
                        help="measure nothing: read the results of an earlier run and write --markdown and --plot")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        _write_outputs(results, args)
        return 0

    settings = Settings(args.quick, args.timeout or (300.0 if args.quick else 900.0))
    specs = select_models(args)
    profiled = set(args.profile.split(",")) if args.profile else {"resnet152v2-keras3"}
    command = " ".join(["python", "benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:]))
    results = {"command": command, "quick": args.quick, "machine": machine_info(),
               "settings": {"repeats": settings.repeats, "long_run_seconds": settings.long_run_seconds,
                            "process_repeats": settings.process_repeats, "inference_runs": settings.inference_runs,
                            "timeout": settings.timeout},
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "models": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fusion-ir-bench-") as tmp:
        workdir = Path(tmp)
        print("baseline process (import tensorflow)...", end=" ", flush=True)
        baseline = repeat_process([sys.executable, "-c", BASELINE_PROCESS], settings.process_repeats, settings)
        print(baseline.get("error") or f"{baseline['seconds']:.2f} s, {baseline['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
        results["baseline_process"] = baseline
        for spec in specs:
            print(f"{spec.key}:", flush=True)
            model_start = time.perf_counter()
            record = benchmark_model(spec, settings, args.cache_dir, workdir, baseline, spec.key in profiled)
            record["benchmark_seconds"] = time.perf_counter() - model_start
            # The outputs of a 1 GB model add up to several GB; only the numbers are kept.
            shutil.rmtree(workdir / spec.key, ignore_errors=True)
            results["models"].append(record)
            # Written after every model, so a run cut short keeps what it measured.
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    results["total_seconds"] = time.perf_counter() - start
    _write_outputs(results, args)
    print(report.goals_text(results))
    return 0


def _write_outputs(results: dict, args) -> None:
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    markdown = report.markdown(results)
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    elif not args.from_json:
        print(markdown)
    if args.plot:
        report.plot(results, args.plot)


if __name__ == "__main__":
    sys.exit(main())
