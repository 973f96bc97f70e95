"""Turn the JSON results of benchmarks/run.py into markdown tables, a goal summary and a PNG plot."""

from __future__ import annotations

import math

MB = 1e6

# Goals the benchmark reports against; they are figures to read, never assertions.
FOLD_GOAL = 2.0
FUSE_GOAL_SECONDS = 1.0
FUSE_GOAL_RATIO = 2.5
PROCESS_GOAL = 1.5
MEMORY_GOAL = 2.5
GOAL_MODEL = "resnet152v2-keras3"

TF_TOOLS = [("fusion-ir", None), ("grappler + optimize_for_inference", "tf-grappler-optimize-for-inference"),
            ("optimize_for_inference", "tf-optimize-for-inference"), ("tf2onnx", "tf2onnx")]
ONNX_TOOLS = [("fusion-ir", None), ("onnxruntime basic", "ort-basic"), ("onnxoptimizer", "onnxoptimizer"),
              ("onnxslim", "onnxslim")]


def _ok(entry) -> bool:
    return isinstance(entry, dict) and "error" not in entry and entry.get("seconds") is not None


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def _ratio(value: float | None, floor: float | None) -> float | None:
    if value is None or not floor:
        return None
    return value / floor


def _with_ratio(value: float | None, floor: float | None) -> str:
    ratio = _ratio(value, floor)
    return _seconds(value) + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _short(text: str, limit: int = 140) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(entry) -> str:
    return _short(entry.get("error", "failed: no result")) if isinstance(entry, dict) else "failed: not run"


def fold_ratio(model: dict) -> float | None:
    fold = model.get("fold")
    return _ratio(fold["seconds"], fold["floor_seconds"]) if _ok(fold) else None


def fuse_ratio(model: dict) -> float | None:
    fuse = model.get("fuse")
    return _ratio(fuse["seconds"], fuse["floor_seconds"]) if _ok(fuse) else None


def process_ratio(model: dict) -> float | None:
    process = model.get("process", {})
    if _ok(process.get("fusion_ir")) and _ok(process.get("floor")):
        return _ratio(process["fusion_ir"]["seconds"], process["floor"]["seconds"])
    return None


def memory_above_baseline(model: dict) -> float | None:
    """Return the peak resident bytes of the fuse process above the import-TensorFlow baseline process."""
    process = model.get("process", {})
    if _ok(process.get("fusion_ir")) and _ok(process.get("baseline")):
        return process["fusion_ir"]["peak_rss_bytes"] - process["baseline"]["peak_rss_bytes"]
    return None


def floor_memory_above_baseline(model: dict) -> float | None:
    process = model.get("process", {})
    if _ok(process.get("floor")) and _ok(process.get("baseline")):
        return process["floor"]["peak_rss_bytes"] - process["baseline"]["peak_rss_bytes"]
    return None


def other_load(model: dict) -> float | None:
    """Return the highest CPU load of other processes (in cores) during any step of this model, or None."""
    loads = []

    def walk(entry):
        if isinstance(entry, dict):
            if isinstance(entry.get("other_load_cores"), (int, float)):
                loads.append(entry["other_load_cores"])
            for value in entry.values():
                walk(value)

    walk({k: v for k, v in model.items() if k != "process"})
    walk({k: v for k, v in model.get("process", {}).items() if k != "baseline"})
    return max(loads) if loads else None


def memory_ratio(model: dict) -> float | None:
    above = memory_above_baseline(model)
    return above / model["file_bytes"] if above is not None and model.get("file_bytes") else None


def _fusion_ir_entry(model: dict, form: str) -> dict | None:
    return model.get("fuse") if form == "tf" else model.get("fuse_onnx")


def _tool_entry(model: dict, form: str, peer: str | None):
    if peer is None:
        return _fusion_ir_entry(model, form)
    return model.get("peers", {}).get(peer)


def peer_verdict(model: dict, form: str) -> tuple[bool | None, str]:
    """Return whether fusion-ir beat every peer on this form while leaving no foldable BN and matching,
    and the reasons when it did not (None when fusion-ir itself failed)."""
    own = _fusion_ir_entry(model, form)
    if not _ok(own):
        return None, "fusion-ir failed"
    tools = TF_TOOLS if form == "tf" else ONNX_TOOLS
    problems = []
    if own.get("bn_left"):
        problems.append(f"{own['bn_left']} foldable BN left")
    if own.get("match") is False:
        problems.append("output differs")
    for label, peer in tools[1:]:
        entry = _tool_entry(model, form, peer)
        if _ok(entry) and entry["seconds"] <= own["seconds"]:
            problems.append(f"{label} faster ({_seconds(entry['seconds'])} against {_seconds(own['seconds'])})")
    return not problems, "; ".join(problems) or "met"


def _cell(entry) -> str:
    if not _ok(entry):
        return _error(entry)
    left = entry.get("bn_left")
    match = entry.get("match")
    if entry.get("match_error"):
        verdict = ("not compared: " if match is None else "DOES NOT RUN: ") + _short(entry["match_error"], 90)
    elif match is None:
        verdict = "not checked"
    else:
        verdict = ("match" if match else "DIFFERS") + f" {entry.get('rel_max_error', float('nan')):.1e}"
    return f"{_seconds(entry['seconds'])}, {left} left, {verdict}"


def _goal_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """Return one (goal, target, figures, verdict) row per goal."""
    rows = []
    models = [m for m in results["models"] if "error" not in m]

    def per_model(name, target, value_of, limit, fmt):
        figures, misses, missing = [], [], []
        for model in models:
            value = value_of(model)
            if value is None:
                missing.append(model["key"])
                continue
            figures.append(f"{model['key']} {fmt(value)}")
            if value > limit:
                misses.append(model["key"])
        verdict = ("missed on " + ", ".join(misses)) if misses else "met"
        if missing:
            verdict += "; not measured on " + ", ".join(missing)
        rows.append((name, target, "; ".join(figures) or "-", verdict))

    per_model("folded-weight computation", f"<= {FOLD_GOAL}x the multiply-copy floor", fold_ratio, FOLD_GOAL,
              lambda v: f"{v:.2f}x")
    goal_model = next((m for m in models if m["key"] == GOAL_MODEL), None)
    if goal_model is not None and _ok(goal_model.get("fuse")):
        fuse = goal_model["fuse"]
        ratio = fuse_ratio(goal_model)
        met = fuse["seconds"] < FUSE_GOAL_SECONDS and ratio <= FUSE_GOAL_RATIO
        misses = []
        if fuse["seconds"] >= FUSE_GOAL_SECONDS:
            misses.append(f"{_seconds(fuse['seconds'])} is not under {FUSE_GOAL_SECONDS:.1f} s")
        if ratio > FUSE_GOAL_RATIO:
            misses.append(f"{ratio:.2f}x is over {FUSE_GOAL_RATIO}x")
        rows.append((f"in-process fuse, {GOAL_MODEL}", f"< {FUSE_GOAL_SECONDS:.1f} s and <= {FUSE_GOAL_RATIO}x "
                     "parse + serialize", f"{_seconds(fuse['seconds'])}, {ratio:.2f}x",
                     "met" if met else "missed: " + "; ".join(misses)))
    else:
        rows.append((f"in-process fuse, {GOAL_MODEL}", f"< {FUSE_GOAL_SECONDS:.1f} s and <= {FUSE_GOAL_RATIO}x",
                     "-", "not measured"))
    per_model("in-process fuse, every model", f"<= {FUSE_GOAL_RATIO}x parse + serialize (reference only)", fuse_ratio,
              FUSE_GOAL_RATIO, lambda v: f"{v:.2f}x")
    per_model("whole process", f"<= {PROCESS_GOAL}x the import-parse-write process", process_ratio, PROCESS_GOAL,
              lambda v: f"{v:.2f}x")
    per_model("peak memory above the TF baseline", f"< {MEMORY_GOAL}x the model file", memory_ratio, MEMORY_GOAL,
              lambda v: f"{v:.2f}x")
    for form, label in (("tf", "TensorFlow form"), ("onnx", "ONNX form")):
        misses, missing = [], []
        for model in models:
            ok, why = peer_verdict(model, form)
            if ok is None:
                missing.append(model["key"])
            elif not ok:
                misses.append(f"{model['key']} ({why})")
        verdict = ("missed on " + "; ".join(misses)) if misses else "met"
        if missing:
            verdict += "; not measured on " + ", ".join(missing)
        rows.append((f"faster than every peer, {label}", "fastest, 0 foldable BN left, output matches",
                     f"{len(models) - len(misses) - len(missing)} of {len(models)} models", verdict))
    return rows


def goals_text(results: dict) -> str:
    lines = ["goals:"]
    for goal, target, figures, verdict in _goal_rows(results):
        lines.append(f"  {goal} ({target}): {verdict}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """Render the results as markdown: goals, fusion-ir against its floors, peers, inference, profile."""
    out = []
    models = results["models"]
    out.append("### Goals\n")
    out.append("| goal | target | figures | verdict |")
    out.append("| --- | --- | --- | --- |")
    for row in _goal_rows(results):
        out.append("| " + " | ".join(row) + " |")

    out.append("\n### fusion-ir against its floors\n")
    out.append("Each time is the best of the runs; the ratio in brackets is against the floor from the same run. "
               "\"Other CPU load\" is the highest average number of cores that processes outside the benchmark "
               "kept busy during any step of that model (0 on an idle machine).\n")
    out.append("| model | file | foldable BN (all BN) | fused, BN left, match | folded-weight computation "
               "(multiply-copy floor) | in-process fuse (parse + serialize floor) | `fusion-ir fuse` process "
               "(import-parse-write process) | peak memory above TF import (floor process) | other CPU load |")
    out.append("| --- | ---: | ---: | --- | --- | --- | --- | --- | ---: |")
    for model in models:
        if "error" in model:
            out.append(f"| {model['label']} | - | - | {model['error']} | | | | |")
            continue
        fuse, fold, process = model.get("fuse", {}), model.get("fold", {}), model.get("process", {})
        size = f"{model['file_bytes'] / MB:.0f} MB"
        if _ok(fuse):
            bn = f"{fuse['bn_foldable_before']} ({fuse['bn_like_before']})"
            verdict = "match" if fuse.get("match") else "DIFFERS"
            result = f"{fuse['fused']} fused, {fuse['bn_left']} left, {verdict} {fuse.get('rel_max_error', 0):.1e}"
            fuse_cell = f"{_with_ratio(fuse['seconds'], fuse['floor_seconds'])}; floor {_seconds(fuse['floor_seconds'])}"
        else:
            bn, result, fuse_cell = "-", _error(fuse), _error(fuse)
        if _ok(fold):
            fold_cell = (f"{_with_ratio(fold['seconds'], fold['floor_seconds'])}; floor "
                         f"{_seconds(fold['floor_seconds'])}; {fold['weights']} weights, "
                         f"{fold['weight_bytes'] / MB:.0f} MB")
        else:
            fold_cell = _error(fold)
        if _ok(process.get("fusion_ir")) and _ok(process.get("floor")):
            process_cell = (f"{_with_ratio(process['fusion_ir']['seconds'], process['floor']['seconds'])}; "
                            f"floor {_seconds(process['floor']['seconds'])}")
        else:
            process_cell = _error(process.get("fusion_ir") if not _ok(process.get("fusion_ir")) else process.get("floor"))
        above = memory_above_baseline(model)
        if above is not None:
            floor_above = floor_memory_above_baseline(model)
            memory_cell = f"{above / MB:.0f} MB ({memory_ratio(model):.2f}x file)"
            if floor_above is not None:
                memory_cell += f"; floor {floor_above / MB:.0f} MB ({floor_above / model['file_bytes']:.2f}x)"
        else:
            memory_cell = _error(process.get("fusion_ir"))
        load = other_load(model)
        load_cell = "not recorded" if load is None else f"{load:.2f} cores"
        out.append(f"| {model['label']} | {size} | {bn} | {result} | {fold_cell} | {fuse_cell} | {process_cell} | "
                   f"{memory_cell} | {load_cell} |")

    for form, tools, title in (("tf", TF_TOOLS, "Peers on the frozen GraphDef"),
                               ("onnx", ONNX_TOOLS, "Peers on the ONNX form (tf2onnx's output)")):
        out.append(f"\n### {title}\n")
        out.append("Each cell: time from input file to output file inside the tool's process, foldable BN "
                   "left, and the relative max error against the original.\n")
        out.append("| model | " + " | ".join(label for label, _ in tools) + " |")
        out.append("| --- |" + " --- |" * len(tools))
        for model in models:
            if "error" in model:
                continue
            cells = [_cell(_tool_entry(model, form, peer)) for _, peer in tools]
            out.append(f"| {model['label']} | " + " | ".join(cells) + " |")

    out.append("\n### Inference, batch 1 (median)\n")
    out.append("| model | input | TensorFlow original | TensorFlow fused | onnxruntime original | onnxruntime fused |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for model in models:
        if "error" in model:
            continue
        inference = model.get("inference", {})
        cells = []
        for backend in ("tf", "ort"):
            entry = inference.get(backend, {})
            if "error" in entry or not entry:
                cells += [_error(entry), ""]
                continue
            original, fused = entry["original"]["median_seconds"], entry["fused"]["median_seconds"]
            cells += [_seconds(original), _with_ratio(fused, original)]
        size = model.get("input_size")
        out.append(f"| {model['label']} | {size}x{size} | " + " | ".join(cells) + " |")

    for model in models:
        profile = model.get("fuse", {}).get("profile") if isinstance(model.get("fuse"), dict) else None
        if not profile:
            continue
        out.append(f"\n### Profile of one in-process fuse, {model['label']}\n")
        out.append(f"cProfile, {profile['seconds_under_profiler']:.2f} s under the profiler. Top functions by own "
                   "time:\n")
        out.append("| function | calls | own time | total time |")
        out.append("| --- | ---: | ---: | ---: |")
        for row in profile["by_own_time"][:12]:
            out.append(f"| `{row['function']}` | {row['calls']} | {_seconds(row['own_seconds'])} | "
                       f"{_seconds(row['total_seconds'])} |")
    return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
    """Write a horizontal bar chart (log scale) of fusion-ir, its floor and the peers, per model and form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in results["models"] if "error" not in m]
    panels = [("frozen GraphDef", "tf", [("parse + serialize floor", "floor")] + TF_TOOLS),
              ("ONNX form (tf2onnx's output)", "onnx", ONNX_TOOLS)]
    # One color per tool across both panels; fusion-ir is the same color in each.
    palette = {"floor": "0.6", None: "tab:blue", "tf-grappler-optimize-for-inference": "tab:green",
               "tf-optimize-for-inference": "tab:red", "tf2onnx": "tab:purple", "ort-basic": "tab:orange",
               "onnxoptimizer": "tab:brown", "onnxslim": "tab:pink"}
    figure, axes = plt.subplots(1, 2, figsize=(14, 1.8 + 0.75 * len(models)), sharey=True)
    for axis, (title, form, tools) in zip(axes, panels):
        bar = 0.8 / len(tools)
        for index, (label, peer) in enumerate(tools):
            values, positions = [], []
            for row, model in enumerate(models):
                if peer == "floor":
                    entry = model.get("fuse")
                    value = entry.get("floor_seconds") if _ok(entry) else None
                else:
                    entry = _tool_entry(model, form, peer)
                    value = entry["seconds"] if _ok(entry) else None
                if value is not None:
                    values.append(value)
                    positions.append(row + index * bar)
            axis.barh(positions, values, height=bar, label=label, color=palette.get(peer, "0.3"))
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds from input file to output file (log scale; no bar: failed)")
        axis.grid(axis="x", which="both", alpha=0.3)
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=7)
    axes[0].set_yticks([row + 0.4 - 0.4 / len(panels[0][2]) for row in range(len(models))])
    axes[0].set_yticklabels([m["label"] for m in models], fontsize=8)
    axes[0].invert_yaxis()
    machine = results.get("machine", {})
    figure.suptitle(f"fusion-ir against its floor and peer tools ({machine.get('cpu', '?')}, "
                    f"{machine.get('cores', '?')} cores)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
