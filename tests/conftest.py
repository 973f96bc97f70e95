"""Shared helpers: build small TF2 graphs, freeze them as TF2 users do, fuse and run them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fusion_ir.tfimport import import_tensorflow

tf = import_tensorflow()

from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

import fusion_ir  # noqa: E402
from fusion_ir.numerics import run_graphdef  # noqa: E402

RNG_SEED = 1234

# Fuzz test profiles: "ci" is fixed-seed and small, "long" (pytest --hypothesis-profile=long) runs
# thousands of examples. Neither keeps an example database, so a failure prints a @reproduce_failure
# blob to replay it.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])


def freeze(fn, *specs) -> fusion_ir.Model:
    """Trace `fn` as a tf.function and freeze its captured variables into constants."""
    concrete = tf.function(fn).get_concrete_function(*specs)
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    return fusion_ir.Model(graph_def, [t.name for t in frozen.inputs], [t.name for t in frozen.outputs])


def variable(*shape, low=-1.0, high=1.0, seed=None, dtype=np.float32) -> tf.Variable:
    rng = np.random.default_rng(seed if seed is not None else hash(shape) % 2**32)
    return tf.Variable(rng.uniform(low, high, shape).astype(dtype))


def bn_params(channels: int, seed: int = 0, dtype=np.float32):
    """Random BN statistics as variables: (gamma, beta, mean, variance)."""
    rng = np.random.default_rng(seed)
    return (tf.Variable(rng.uniform(0.5, 1.5, channels).astype(dtype)),
            tf.Variable(rng.normal(0, 0.3, channels).astype(dtype)),
            tf.Variable(rng.normal(0, 0.3, channels).astype(dtype)),
            tf.Variable(rng.uniform(0.5, 2.0, channels).astype(dtype)))


def fused_bn(x, params, version="V3", data_format="NHWC", epsilon=1e-3, is_training=False):
    gamma, beta, mean, var = params
    op = {"V1": tf.raw_ops.FusedBatchNorm, "V2": tf.raw_ops.FusedBatchNormV2,
          "V3": tf.raw_ops.FusedBatchNormV3}[version]
    return op(x=x, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=epsilon,
              data_format=data_format, is_training=is_training)[0]


def op_counts(graph_def) -> Counter:
    return Counter(node.op for node in graph_def.node)


def feeds_for(model: fusion_ir.Model, shapes: dict[str, tuple], seed: int = RNG_SEED) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def rel_max_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max|actual - expected| / max|expected|, where positions equal in both (NaN included) count as 0."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    same = (expected == actual) | (np.isnan(expected) & np.isnan(actual))
    diff = np.where(same, 0.0, np.abs(expected - actual))
    finite = np.abs(expected[np.isfinite(expected)])
    return float(np.max(diff) / max(finite.max() if finite.size else 0.0, 1e-30))


def fuse_and_compare(model: fusion_ir.Model, shapes: dict[str, tuple], mode: str = "ptq",
                     tolerance: float = 1e-5, **kwargs):
    """Fuse `model` in memory and check every output against the unfused graph in TensorFlow."""
    result = fusion_ir.fuse(model, mode=mode, verify=False, **kwargs)
    feeds = feeds_for(model, shapes)
    fetches = model.outputs
    expected = run_graphdef(model.graph_def, feeds, fetches)
    actual = run_graphdef(result.graph_def, feeds, fetches)
    for name, e, a in zip(fetches, expected, actual):
        assert e.shape == a.shape, name
        assert rel_max_error(e, a) <= tolerance, f"{name}: relative max error {rel_max_error(e, a):.3g}"
    return result


def reasons(result) -> dict[str, str]:
    return {c.anchor: c.reason for c in result.report.candidates.values() if c.status == "skipped"}


def statuses(result) -> dict[str, str]:
    return {c.anchor: c.status for c in result.report.candidates.values()}


@pytest.fixture
def tmp_model(tmp_path):
    """Write a Model's GraphDef to a .pb file and return its path."""

    def write(model: fusion_ir.Model, name: str = "model.pb"):
        path = tmp_path / name
        path.write_bytes(model.graph_def.SerializeToString())
        return path

    return write
