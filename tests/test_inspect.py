"""fusion-ir inspect and the Python API: what would fold, with nothing written."""

import json

from conftest import bn_params, freeze, fused_bn, op_counts, tf, variable

import fusion_ir
from fusion_ir.cli import main

X = tf.TensorSpec([2, 9, 9, 4], tf.float32, name="x")


def two_bn_model():
    """One BN that folds and one whose conv output has a second consumer."""
    w1, w2 = variable(3, 3, 4, 6, seed=1), variable(3, 3, 4, 6, seed=2)
    p1, p2 = bn_params(6, seed=1), bn_params(6, seed=2)

    def fn(x):
        folds = fused_bn(tf.nn.conv2d(x, w1, 1, "SAME"), p1)
        shared = tf.nn.conv2d(x, w2, 1, "SAME")
        return folds + fused_bn(shared, p2) + shared

    return freeze(fn, X)


def test_inspect_table_lists_every_candidate(tmp_path, capsys):
    path = tmp_path / "model.pb"
    path.write_bytes(two_bn_model().graph_def.SerializeToString())

    code = main(["inspect", str(path)])

    out = capsys.readouterr().out
    assert code == 0
    assert "1 would fold, 1 would not" in out
    assert "consumers" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pb"]


def test_inspect_json(tmp_path, capsys):
    path = tmp_path / "model.pb"
    path.write_bytes(two_bn_model().graph_def.SerializeToString())

    code = main(["inspect", str(path), "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(c["status"] for c in report["candidates"]) == ["fused", "skipped"]


def test_inspect_with_skip_and_disable(tmp_path, capsys):
    path = tmp_path / "model.pb"
    path.write_bytes(two_bn_model().graph_def.SerializeToString())

    code = main(["inspect", str(path), "--json", "--disable", "conv-bn"])

    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert all("disabled" in c["reason"] or "consumers" in c["reason"] for c in report["candidates"])


def test_api_fuse_save_and_verify(tmp_path):
    model = two_bn_model()

    result = fusion_ir.fuse(model)
    fusion_ir.save(result.graph_def, tmp_path / "fused.pbtxt")
    reloaded = fusion_ir.load(tmp_path / "fused.pbtxt")

    assert result.verified is True
    assert result.report.num_fused == 1
    assert result.report.num_skipped == 1
    assert op_counts(reloaded.graph_def)["FusedBatchNormV3"] == 1
    assert all(check.ok for check in result.checks)


def test_api_progress_callback():
    steps = []

    fusion_ir.fuse(two_bn_model(), progress=steps.append)

    assert steps == ["folding", "verifying"]
