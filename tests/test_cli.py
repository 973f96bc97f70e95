"""The fusion-ir command line, run as a user runs it: exit codes, stderr, and the files it leaves.

The cases the command-line contract names run `python -m fusion_ir.cli` as a subprocess on graphs this
file builds and freezes. A run that reaches TensorFlow spends about 4 s importing it (TensorFlow 2.21,
2 cores), so the `cli` fixture starts all of them at once, in parallel, each in its own folder. The
checks against the parsed graph and the verification failures call `fusion_ir.cli.main` in-process
through `cli_in_process`, which returns the same Run. The verification failures must run in-process
because they patch the BatchNorm math.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import bn_params, freeze, fused_bn, op_counts, tf, variable

import fusion_ir.cli
from fusion_ir.numerics import run_graphdef
from passes.folding import bn_scale_shift

REPO = Path(__file__).resolve().parents[1]
X = tf.TensorSpec([2, 9, 9, 4], tf.float32, name="x")
X_ANY_BATCH = tf.TensorSpec([None, 9, 9, 4], tf.float32, name="x")


def conv(x, w):
    return tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC")


def build_graphs() -> dict[str, bytes]:
    """Build the model files the runs read, keyed by the name CASES uses."""
    w1, p1 = variable(3, 3, 4, 6, seed=1), bn_params(6, seed=1)
    w2, p2 = variable(1, 1, 6, 5, seed=2), bn_params(5, seed=2)
    two_bn = freeze(lambda x: fused_bn(conv(tf.nn.relu(fused_bn(conv(x, w1), p1)), w2), p2), X).graph_def
    one_bn = freeze(lambda x: tf.nn.relu(fused_bn(conv(x, w1), p1)), X).graph_def
    any_batch = freeze(lambda x: tf.nn.relu(fused_bn(conv(x, w1), p1)), X_ANY_BATCH).graph_def
    no_bn = freeze(lambda x: tf.nn.relu(conv(x, w1)), X).graph_def
    pbtxt = text_format.MessageToString(one_bn).encode()

    # A node reading a tensor that no node produces, as a hand-edited or truncated export can have.
    dangling = tf.compat.v1.GraphDef()
    placeholder = dangling.node.add(name="x", op="Placeholder")
    placeholder.attr["dtype"].type = tf.float32.as_datatype_enum
    relu = dangling.node.add(name="relu", op="Relu", input=["ghost"])
    relu.attr["T"].type = tf.float32.as_datatype_enum

    # A node whose op TensorFlow does not register, so TensorFlow cannot import the graph and
    # verification is skipped.
    unknown_op = tf.compat.v1.GraphDef()
    unknown_op.CopyFrom(one_bn)
    custom = unknown_op.node.add(name="custom", op="NoSuchOp", input=["Identity"])
    custom.attr["T"].type = tf.float32.as_datatype_enum

    one_bn_bytes = one_bn.SerializeToString()
    return {
        "two_bn": two_bn.SerializeToString(),
        "one_bn": one_bn_bytes,
        "any_batch": any_batch.SerializeToString(),
        "no_bn": no_bn.SerializeToString(),
        "unknown_op": unknown_op.SerializeToString(),
        "dangling": dangling.SerializeToString(),
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": one_bn_bytes[: len(one_bn_bytes) // 2],
        "malformed_text": pbtxt[: len(pbtxt) // 2],
        "empty": b"",
    }


# Each run maps to the files written into its folder (file name -> build_graphs key) and to the
# arguments after `fusion-ir fuse`, which are relative to that folder.
CASES = {
    "missing_input": ({}, ["absent.pb", "-o", "out.pb"]),
    "empty_file": ({"model.pb": "empty"}, ["model.pb", "-o", "out.pb"]),
    "random_bytes": ({"model.pb": "random"}, ["model.pb", "-o", "out.pb"]),
    "truncated_pb": ({"model.pb": "truncated"}, ["model.pb", "-o", "out.pb"]),
    "malformed_pbtxt": ({"model.pbtxt": "malformed_text"}, ["model.pbtxt", "-o", "out.pb"]),
    "dangling_input": ({"model.pb": "dangling"}, ["model.pb", "-o", "out.pb"]),
    "invalid_mode": ({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--mode", "fast"]),
    "missing_output_folder": ({"model.pb": "one_bn"}, ["model.pb", "-o", "absent/out.pb"]),
    "txt_suffix": ({"model.pb": "one_bn"}, ["model.pb", "-o", "out.txt"]),
    "unknown_input_tensor": ({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--inputs", "ghost"]),
    "unknown_output_tensor": ({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--outputs", "ghost"]),
    "input_shape_syntax": ({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--input-shape", "x:1x9x9x4"]),
    "fuse_with_report": ({"model.pb": "two_bn"}, ["model.pb", "-o", "out.pbtxt", "--report", "report.json"]),
    "fuse_in_place": ({"model.pb": "one_bn"}, ["model.pb", "-o", "model.pb"]),
    "nothing_to_fuse": ({"model.pb": "no_bn"}, ["model.pb", "-o", "out.pb"]),
}


@dataclass
class Run:
    folder: Path
    files_before: dict[str, bytes]
    returncode: int
    stdout: str
    stderr: str


def run_fusion_ir(folder: Path, files: dict[str, bytes], args: list[str]) -> Run:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("FUSION_IR_TF_LOGS", None)
    proc = subprocess.run([sys.executable, "-m", "fusion_ir.cli", "fuse", *args], cwd=folder, env=env,
                          capture_output=True, text=True)
    return Run(folder, files, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def graphs():
    return build_graphs()


@pytest.fixture(scope="module")
def cli(graphs, tmp_path_factory):
    """Start every run in CASES in parallel and return a function from run name to its finished Run."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {}
        for name, (file_keys, args) in CASES.items():
            folder = tmp_path_factory.mktemp(name)
            files = {file_name: graphs[key] for file_name, key in file_keys.items()}
            for file_name, data in files.items():
                (folder / file_name).write_bytes(data)
            futures[name] = pool.submit(run_fusion_ir, folder, files, args)
        yield lambda name: futures[name].result()


@pytest.fixture
def cli_in_process(graphs, tmp_path, monkeypatch, capsys):
    """Return a function that runs `fusion_ir.cli.main` in tmp_path as `cli` runs the command.

    `main` adds a handler to the project's loggers on every call, so their state is restored afterwards.
    """
    loggers = [logging.getLogger(name) for name in ("fusion_ir", "converters", "passes")]
    saved = [(logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    monkeypatch.chdir(tmp_path)

    def run(file_keys: dict[str, str], args: list[str]) -> Run:
        files = {file_name: graphs[key] for file_name, key in file_keys.items()}
        for file_name, data in files.items():
            (tmp_path / file_name).write_bytes(data)
        status = fusion_ir.cli.main(["fuse", *args])
        captured = capsys.readouterr()
        return Run(tmp_path, files, status, captured.out, captured.err)

    yield run

    for logger, (handlers, propagate, level) in zip(loggers, saved):
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def load_graph_def(path: Path):
    graph_def = tf.compat.v1.GraphDef()
    if path.suffix == ".pbtxt":
        text_format.Parse(path.read_text(), graph_def)
    else:
        graph_def.ParseFromString(path.read_bytes())
    return graph_def


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_rejected(run: Run, exit_code: int = 2) -> None:
    """Check the contract for bad input: the exit code, one `error:` line, and no file written or changed."""
    assert run.returncode == exit_code, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: "), run.stderr
    assert folder_listing(run.folder) == sorted(run.files_before), "an output or temporary file was left"
    for name, data in run.files_before.items():
        assert (run.folder / name).read_bytes() == data, f"{name} was modified"


# Bad input and bad usage: exit 2.

def test_fuse_missing_input(cli):
    run = cli("missing_input")
    assert_rejected(run)
    assert "not found" in run.stderr


def test_fuse_empty_file(cli):
    run = cli("empty_file")
    assert_rejected(run)
    assert "empty" in run.stderr


def test_fuse_random_bytes(cli):
    run = cli("random_bytes")
    assert_rejected(run)
    assert "not a TensorFlow GraphDef" in run.stderr


def test_fuse_truncated_pb(cli):
    run = cli("truncated_pb")
    assert_rejected(run)
    assert "model.pb" in run.stderr


def test_fuse_malformed_pbtxt(cli):
    run = cli("malformed_pbtxt")
    assert_rejected(run)
    assert "model.pbtxt" in run.stderr


def test_fuse_dangling_input(cli):
    run = cli("dangling_input")
    assert_rejected(run)
    assert "ghost" in run.stderr


def test_fuse_invalid_mode(cli):
    run = cli("invalid_mode")
    assert_rejected(run)
    assert "--mode" in run.stderr


def test_fuse_missing_output_folder(cli):
    run = cli("missing_output_folder")
    assert_rejected(run)
    assert "does not exist" in run.stderr


def test_fuse_txt_suffix(cli):
    run = cli("txt_suffix")
    assert_rejected(run)
    assert ".txt" in run.stderr


def test_fuse_unknown_input_tensor(cli):
    run = cli("unknown_input_tensor")
    assert_rejected(run)
    assert "ghost" in run.stderr


def test_fuse_unknown_output_tensor(cli):
    run = cli("unknown_output_tensor")
    assert_rejected(run)
    assert "ghost" in run.stderr


def test_fuse_input_shape_syntax(cli):
    run = cli("input_shape_syntax")
    assert_rejected(run)
    assert "--input-shape" in run.stderr


# Successful runs: exit 0.

def test_fuse_success_exit_code(cli):
    run = cli("fuse_with_report")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""


def test_fuse_summary_table(cli):
    rows = [line.split() for line in cli("fuse_with_report").stdout.splitlines()]
    assert ["pattern", "found", "fused", "skipped"] in rows
    assert ["Conv2D+BatchNorm", "2", "2", "0"] in rows


def test_fuse_pbtxt_output(cli):
    run = cli("fuse_with_report")
    counts = op_counts(load_graph_def(run.folder / "out.pbtxt"))
    assert "FusedBatchNormV3" not in counts
    assert counts["Conv2D"] == 2


def test_fuse_input_unchanged(cli):
    run = cli("fuse_with_report")
    assert (run.folder / "model.pb").read_bytes() == run.files_before["model.pb"]
    assert folder_listing(run.folder) == ["model.pb", "out.pbtxt", "report.json"]


def test_fuse_report_one_candidate_per_bn(cli):
    run = cli("fuse_with_report")
    bn_names = {n.name for n in load_graph_def(run.folder / "model.pb").node if n.op == "FusedBatchNormV3"}
    report = json.loads((run.folder / "report.json").read_text())
    assert len(report["candidates"]) == len(bn_names)
    assert {c["anchor"] for c in report["candidates"]} == bn_names
    for candidate in report["candidates"]:
        assert set(candidate) == {"pattern", "anchor", "nodes", "status", "reason"}
        assert candidate["status"] == "fused"


def test_fuse_in_place(cli):
    run = cli("fuse_in_place")
    assert run.returncode == 0, run.stderr
    assert folder_listing(run.folder) == ["model.pb"], "a temporary file was left"
    assert "FusedBatchNormV3" not in op_counts(load_graph_def(run.folder / "model.pb"))


def test_fuse_nothing_to_fuse(cli):
    run = cli("nothing_to_fuse")
    assert run.returncode == 0, run.stderr
    assert op_counts(load_graph_def(run.folder / "out.pb")) == op_counts(load_graph_def(run.folder / "model.pb"))


@pytest.mark.slow
def test_fuse_example_resnet50(tmp_path):
    """The README's quick-start command."""
    proc = subprocess.run([sys.executable, "-m", "fusion_ir.cli", "fuse", "--example", "resnet50", "-o", "r50.pb"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "FusedBatchNormV3" not in op_counts(load_graph_def(tmp_path / "r50.pb"))


# Checks against the parsed graph, in-process to spare a TensorFlow import each.

def test_fuse_output_index_out_of_range(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--outputs", "Identity:5"])
    assert_rejected(run)
    assert "Identity:5" in run.stderr


def test_fuse_input_shape_wrong_rank(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--input-shape", "x:2,9,9"])
    assert_rejected(run)
    assert "x:2,9,9" in run.stderr


def test_fuse_input_shape_negative(cli_in_process):
    run = cli_in_process({"model.pb": "any_batch"}, ["model.pb", "-o", "out.pb", "--input-shape", "x:-1,9,9,4"])
    assert_rejected(run)


def test_fuse_input_shape_unknown_name(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--input-shape", "ghost:1,2"])
    assert_rejected(run)
    assert "ghost" in run.stderr


def test_fuse_negative_seed(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--seed", "-1"])
    assert_rejected(run)


def test_fuse_report_missing_folder(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--report", "absent/report.json"])
    assert_rejected(run)
    assert "absent" in run.stderr


def test_fuse_report_is_input(cli_in_process):
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--report", "model.pb"])
    assert_rejected(run)
    assert "--report" in run.stderr


def test_fuse_unknown_op_warns_once(cli_in_process):
    run = cli_in_process({"model.pb": "unknown_op"}, ["model.pb", "-o", "out.pb"])
    assert run.returncode == 0, run.stderr
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("warning: verification skipped"), run.stderr


def test_fuse_conv_output_as_input(cli_in_process):
    """A conv output named in --inputs is fed, so the BN after it must not be folded into that conv."""
    run = cli_in_process({"model.pb": "one_bn"},
                         ["model.pb", "-o", "out.pb", "--inputs", "Conv2D", "--input-shape", "Conv2D:2,9,9,6"])
    assert run.returncode == 0, run.stderr

    feeds = {"Conv2D:0": np.random.default_rng(0).standard_normal((2, 9, 9, 6)).astype(np.float32)}
    expected = run_graphdef(load_graph_def(run.folder / "model.pb"), feeds, ["Identity:0"])[0]
    actual = run_graphdef(load_graph_def(run.folder / "out.pb"), feeds, ["Identity:0"])[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# Verification failure, in-process: the BatchNorm math is replaced with a wrong one, TensorFlow is real.

def double_scale(gamma, beta, mean, variance, epsilon):
    scale, shift = bn_scale_shift(gamma, beta, mean, variance, epsilon)
    return scale * 2.0, shift


def shift_of_rank_2(gamma, beta, mean, variance, epsilon):
    """Return a (C, 1) shift, so the folded BiasAdd gets a bias that TensorFlow rejects at import."""
    scale, shift = bn_scale_shift(gamma, beta, mean, variance, epsilon)
    return scale, shift.reshape(-1, 1)


def test_fuse_verification_failure(cli_in_process, monkeypatch):
    monkeypatch.setattr("passes.conv_bn.bn_scale_shift", double_scale)
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb"])
    assert_rejected(run, exit_code=1)
    assert run.stderr.startswith("error: verification failed"), run.stderr


def test_fuse_verification_failure_force(cli_in_process, monkeypatch):
    monkeypatch.setattr("passes.conv_bn.bn_scale_shift", double_scale)
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb", "--force"])
    assert run.returncode == 1, run.stderr
    assert "FusedBatchNormV3" not in op_counts(load_graph_def(run.folder / "out.pb"))


def test_fuse_fused_graph_rejected_by_tensorflow(cli_in_process, monkeypatch):
    """A fused graph that TensorFlow rejects while the original runs is a verification failure, not a skip."""
    monkeypatch.setattr("passes.conv_bn.bn_scale_shift", shift_of_rank_2)
    run = cli_in_process({"model.pb": "one_bn"}, ["model.pb", "-o", "out.pb"])
    assert_rejected(run, exit_code=1)
    assert run.stderr.startswith("error: verification failed"), run.stderr
