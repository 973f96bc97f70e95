"""Differential fuzzing: random small TensorFlow and ONNX models, fused and compared with the original.

Each hypothesis example builds a model (TensorFlow: ops in a tf.function frozen like the other tests;
ONNX: onnx.helper), fuses it with `fusion_ir.fuse(verify=False)`, and checks that:

- the fused model imports (tf.compat.v1.import_graph_def, or onnx.checker with full_check);
- its outputs match the original's on one random input, within a relative max error
  max|fused - original| / max|original| of 1e-5 for float32 and 2e-3 for float16. A TensorFlow
  output that misses it passes when, against the model computed in float64, its error is at most three
  times the original's plus the tolerance (see check_outputs);
- every constant in the fused model is finite;
- every candidate in the report is "fused", or "skipped" with a non-empty reason;
- no candidate that must not fold is fused, and its node keeps its op. The strategies build these:
  - the first candidate after a tensor that has a second consumer or is a graph output,
  - an op whose constant varies along a non-channel axis, and the first candidate after such a bias,
  - a training-mode BatchNorm, and an ONNX BatchNormalization over a non-channel axis,
  - a Mul of two activations,
  - in qat mode, every candidate except a scalar Mul and a FusedBatchNorm or ONNX BatchNormalization.

The plain tests at the end cover large and adversarial numbers: huge and tiny variances, epsilon near
zero, subnormal scales, folded weights that overflow, and NaN or infinite statistics.

Hypothesis profiles: "ci" (the default: fixed seed, 40 examples per test, no example database) and
"long" (3,000 examples per test). Select one with the HYPOTHESIS_PROFILE environment variable, and see
the note at the registration for --hypothesis-profile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import freeze, tf

import fusion_ir
from fusion_ir.numerics import BackendUnavailable, run_graphdef, run_onnx

# The "ci" and "long" profiles are registered in conftest.py, which pytest loads before hypothesis's
# plugin reads --hypothesis-profile. Without that option the fixed-seed "ci" profile applies.
if settings.get_current_profile_name() == "default":
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOLERANCE = {"float32": 1e-5, "float16": 2e-3}


# ---------------------------------------------------------------------------------------------------
# Checks shared by the TensorFlow and ONNX tests


def rel_max_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """Return max|actual - expected| / max|expected|, or the max absolute error when expected is all zeros."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.size == 0:
        return 0.0
    diff = float(np.max(np.abs(expected - actual)))
    peak = float(np.max(np.abs(expected)))
    return diff / peak if peak > 0 else diff


def check_outputs(names, expected, actual, tolerance: float, reference=None) -> None:
    """Check fused outputs against the original's.

    `reference`, when given, returns the model's outputs computed in float64. An output that misses
    `tolerance` still passes when its error against the reference is at most three times the original's
    own error plus `tolerance`. Some outputs are much smaller than the values they are computed from, such
    as a MatMul sum that cancels or a Relu after a bias that cancels the conv. Their original misses the
    relative tolerance against exact arithmetic too, and two correct computations differ by about as much.
    """
    assert len(expected) == len(actual)
    for index, (name, e, a) in enumerate(zip(names, expected, actual)):
        assert np.isfinite(e).all(), f"the original output {name} is not finite; the strategy made a bad model"
        assert a.shape == e.shape, f"output {name}: shape {a.shape}, expected {e.shape}"
        assert a.dtype == e.dtype, f"output {name}: dtype {a.dtype}, expected {e.dtype}"
        error = rel_max_error(e, a)
        if error <= tolerance or reference is None:
            assert error <= tolerance, f"output {name}: relative max error {error:.3g} exceeds {tolerance:g}"
            continue
        event("output checked against the float64 reference")
        exact = reference()[index]
        original_error = rel_max_error(exact, e)
        fused_error = rel_max_error(exact, a)
        assert fused_error <= 3 * original_error + tolerance, (
            f"output {name}: relative max error {error:.3g} exceeds {tolerance:g}, and against the float64 "
            f"reference the fused error {fused_error:.3g} exceeds 3 x the original's {original_error:.3g} "
            f"+ {tolerance:g}")


def check_report(report) -> None:
    for anchor, candidate in report.candidates.items():
        event(f"{candidate.pattern}: {candidate.status}")
        if candidate.reason:
            # Strip node names and numbers, so --hypothesis-show-statistics counts each kind of reason once.
            reason = re.sub(r"\b(b\d+_[\w/]+|Identity\w*|x:0)", "<node>", candidate.reason)
            event("skip reason: " + re.sub(r"\d+", "N", reason))
        assert candidate.status in ("fused", "skipped"), f"{anchor}: status {candidate.status!r}"
        if candidate.status == "skipped":
            assert isinstance(candidate.reason, str) and candidate.reason.strip(), f"{anchor}: skipped without a reason"


def check_unfolded(report, must_not_fold: dict[str, str], ops_before: dict[str, str],
                   ops_after: dict[str, str], absorbable=frozenset()) -> None:
    """Check that each anchor in `must_not_fold` (name -> reason) is not fused and, unless it is in
    `absorbable`, is still the same op."""
    for anchor, reason in must_not_fold.items():
        assert anchor in ops_before, f"the test expected {anchor} in the original model"
        candidate = report.candidates.get(anchor)
        assert candidate is None or candidate.status != "fused", f"{anchor} was fused although {reason}"
        if anchor in absorbable:
            continue
        assert ops_after.get(anchor) == ops_before[anchor], (
            f"{anchor} was {ops_before[anchor]} and is now {ops_after.get(anchor)}, although {reason}")


def first_anchor_after(position: int, anchors: list[int]) -> int | None:
    """Return the first anchor position after `position`, or None."""
    return next((a for a in anchors if a > position), None)


# ---------------------------------------------------------------------------------------------------
# TensorFlow model specs
#
# A spec records every choice and shape. The values come from a numpy generator seeded with spec.seed,
# so the spec that hypothesis prints for a failing example rebuilds the same model.


@dataclass(frozen=True)
class TfArith:
    """Mul, Add, AddV2, Sub or BiasAdd of the running tensor and a constant."""

    op: str
    kind: str  # "scalar", "channel", or "other": varies along a non-channel axis
    shape: tuple[int, ...]
    const_first: bool = False
    data_format: str = ""  # BiasAdd only
    zero: bool = False  # the constant is all zeros


@dataclass(frozen=True)
class TfFusedBN:
    version: str
    training: bool
    epsilon: float
    channels: int
    data_format: str


@dataclass(frozen=True)
class TfSmallBN:
    """tf.nn.batch_normalization, which writes BatchNorm as Rsqrt, Mul, Sub and AddV2."""

    offset: bool
    scale: bool
    epsilon: float
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TfOp:
    """The conv or matmul of a block. For GroupConv2D, `weight_shape` is one branch's filter."""

    op: str
    weight_shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    padding: str = "SAME"
    data_format: str = ""
    input_sizes: tuple[int, ...] = ()  # Conv2DBackpropInput
    transpose_a: bool = False
    transpose_b: bool = False
    groups: int = 1
    split_op: str = "Split"
    branch_bias: bool = False
    concat_axis: int = -1


@dataclass(frozen=True)
class TfBlock:
    """op -> [bias] -> tail, reading tensor `source` (0 is the graph input, i the output of block i - 1).

    `shares` has one entry per intermediate: the op output, the bias output when there is a bias, then
    each tail output. An entry names what else reads that tensor. None is nothing, "reader" a Neg that is
    a graph output, "returned" an Identity because the tf.function returns the tensor, and "listed" that
    the model outputs name the tensor directly. `branch_share` is (branch, kind) for one branch conv of
    a group convolution.
    """

    source: int
    relu: bool
    flatten: bool
    op: TfOp
    bias: TfArith | None
    tail: tuple
    shares: tuple
    branch_share: tuple | None = None


@dataclass(frozen=True)
class TfMerge:
    """AddV2 (a residual connection) or Mul of two earlier tensors of the same shape."""

    op: str
    a: int
    b: int


@dataclass(frozen=True)
class TfSpec:
    dtype: str
    input_shape: tuple[int, ...]
    channels_last: bool
    variables: bool  # constants are tf.Variables (read through Identity once frozen) instead of Const nodes
    blocks: tuple
    mode: str
    seed: int


# The second consumer ("reader") is a Neg, not a Relu, because the fuser only counts consumers. A Relu
# that keeps a few small values makes an output whose max is far below the values it is computed from,
# and there float32 rounding of a correct fold exceeds the relative tolerance.
SHARE_KINDS = (None, "reader", "returned", "listed")
# BatchNorm epsilons. Zero comes last: a training-mode BatchNorm that normalizes one element per channel
# computes 0 / 0 with it, so training-mode BatchNorms draw from the others.
EPSILONS = (1e-3, 1e-5, 0.1, 0.0)
# A training-mode BatchNorm divides by the batch standard deviation. Over a few elements per channel that
# can be tiny next to the values, and then it amplifies the float32 rounding differences of a correct
# fold before it beyond the tolerance. So one is generated only where it normalizes at least this many.
MIN_TRAINING_BN_ELEMENTS = 8


def elements_per_channel(shape: tuple, channel_axis: int) -> int:
    return math.prod(shape) // shape[channel_axis]


def draw_training(draw, shape: tuple, channel_axis: int) -> bool:
    """Draw whether a BatchNorm is in training mode: about one in six where it has enough elements."""
    return elements_per_channel(shape, channel_axis) >= MIN_TRAINING_BN_ELEMENTS and sometimes(draw, 6)
BIAS_LIKE_TF = ("BiasAdd", "Add", "AddV2")


def channel_axis(rank: int, channels_last: bool) -> int:
    return rank - 1 if channels_last or rank == 2 else 1


def tf_format(rank: int, channels_last: bool) -> str:
    return {(4, True): "NHWC", (4, False): "NCHW", (5, True): "NDHWC", (5, False): "NCDHW"}[(rank, channels_last)]


def full(rank: int, channels_last: bool, value: int) -> list[int]:
    """Return strides or dilations: `value` on the spatial axes and 1 on the batch and channel axes."""
    middle = [value] * (rank - 2)
    return [1] + middle + [1] if channels_last else [1, 1] + middle


def conv_out(size: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    if padding == "SAME":
        return -(-size // stride)
    return -(-(size - (kernel - 1) * dilation) // stride)


def divisors(n: int, low: int, high: int) -> list[int]:
    return [d for d in range(low, high + 1) if n % d == 0]


def sometimes(draw, one_in: int) -> bool:
    """Draw True about once in `one_in` times; shrinks to False."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


def merge_pairs(shapes: list[tuple]):
    """Pairs of earlier tensors of the same shape, a tensor with itself included.

    A tensor is multiplied only by a different one: t * t is positive everywhere, and a BatchNorm after
    it subtracts a large mean, so the output amplifies rounding beyond the tolerance.
    """
    return st.sampled_from([(a, b) for a in range(len(shapes)) for b in range(a, len(shapes))
                            if shapes[a] == shapes[b]])


def draw_zero(draw, op: str, kind: str) -> bool:
    """Draw whether a constant is all zeros, about one in ten.

    Only a shift may be zero. A zero Mul makes channels constant, which a later training-mode BatchNorm
    turns into rounding noise, and an all-zero "other" constant would not vary at all.
    """
    return op != "Mul" and kind != "other" and sometimes(draw, 10)


def draw_share(draw, kinds=SHARE_KINDS[1:]):
    """Draw what else reads an intermediate: None about three times in four."""
    return draw(st.sampled_from(kinds)) if sometimes(draw, 4) else None


def scalar_shapes(rank: int) -> list[tuple]:
    return [(), (1,), (1,) * rank]


def channel_shapes(rank: int, channels: int, channels_last: bool) -> list[tuple]:
    if rank == 2:
        return [(channels,), (1, channels)]
    if channels_last:
        return [(channels,), (1,) * (rank - 1) + (channels,)]
    return [(channels,) + (1,) * (rank - 2), (1, channels) + (1,) * (rank - 2)]


def other_shapes(shape: tuple, channels_last: bool) -> list[tuple]:
    """Constant shapes that broadcast to `shape` without changing it and vary along a non-channel axis."""
    rank = len(shape)
    options = []
    if rank == 2:
        if shape[0] > 1:
            options += [tuple(shape), (shape[0], 1)]
        return options
    if math.prod(shape[1:]) > shape[channel_axis(rank, channels_last)]:
        options.append(tuple(shape[1:]))
    if shape[0] > 1:
        options.append((shape[0],) + (1,) * (rank - 1))
    if channels_last and shape[-2] > 1:
        options.append((shape[-2], 1))
    if not channels_last and shape[-1] > 1:
        options.append((shape[-1],))  # a bare [W] vector after an NCHW op: it broadcasts along the width
    return options


@st.composite
def tf_ariths(draw, shape: tuple, channels_last: bool, ops=("Mul", "AddV2", "Add", "Sub", "BiasAdd")):
    rank = len(shape)
    channels = shape[channel_axis(rank, channels_last)]
    op = draw(st.sampled_from(ops))
    kind = draw(st.sampled_from(["channel", "scalar", "other"]))
    if op == "BiasAdd":
        own_format = "NHWC" if channels_last or rank == 2 else "NCHW"
        other_format = "NCHW" if own_format == "NHWC" else "NHWC"
        # BiasAdd with the other data_format adds along axis 1 (NCHW) or the last axis (NHWC).
        other_axis = 1 if other_format == "NCHW" else rank - 1
        if kind == "other" and rank > 2 and shape[other_axis] > 1:
            return TfArith(op, "other", (shape[other_axis],), data_format=other_format)
        return TfArith(op, "channel", (channels,), data_format=own_format, zero=draw_zero(draw, op, "channel"))
    if kind == "other":
        options = other_shapes(shape, channels_last)
        if not options:
            kind = "channel"
    if kind == "scalar":
        const_shape = draw(st.sampled_from(scalar_shapes(rank)))
    elif kind == "channel":
        const_shape = draw(st.sampled_from(channel_shapes(rank, channels, channels_last)))
    else:
        const_shape = draw(st.sampled_from(options))
    return TfArith(op, kind, const_shape, const_first=draw(st.booleans()), zero=draw_zero(draw, op, kind))


@st.composite
def tf_tail_op(draw, shape: tuple, channels_last: bool, dtype: str):
    rank = len(shape)
    channels = shape[channel_axis(rank, channels_last)]
    kind = draw(st.sampled_from(["arith", "fused_bn", "small_bn"]))
    training = kind == "fused_bn" and draw_training(draw, shape, channel_axis(rank, channels_last))
    epsilon = draw(st.sampled_from(EPSILONS[:-1] if training else EPSILONS))
    if kind == "fused_bn" and rank >= 4:
        versions = ["V3"] if rank == 5 else (["V3", "V2", "V1"] if dtype == "float32" else ["V3", "V2"])
        return TfFusedBN(draw(st.sampled_from(versions)), training, epsilon, channels, tf_format(rank, channels_last))
    if kind == "small_bn":
        param_shape = (channels,) if channels_last or rank == 2 else (channels,) + (1,) * (rank - 2)
        return TfSmallBN(draw(st.booleans()), draw(st.booleans()), epsilon, param_shape)
    return draw(tf_ariths(shape, channels_last))


@st.composite
def tf_ops(draw, op: str, shape: tuple, channels_last: bool, dtype: str):
    """Draw a conv or matmul reading a tensor of `shape`; return (TfOp, output shape)."""
    half = dtype == "float16"
    if op == "MatMul":
        rows, depth = shape
        transpose_a, transpose_b = draw(st.booleans()), draw(st.booleans())
        if transpose_a:
            rows, depth = depth, rows
        units = draw(st.integers(1, 8))
        weight = (units, depth) if transpose_b else (depth, units)
        return TfOp(op, weight, transpose_a=transpose_a, transpose_b=transpose_b), (rows, units)

    rank = len(shape)
    cax = channel_axis(rank, channels_last)
    cin = shape[cax]
    spatial = [shape[a] for a in range(1, rank) if a != cax]
    kernel = draw(st.integers(1, 2 if rank == 5 else 3))
    stride = draw(st.integers(1, 2))
    # TensorFlow 2.21 on CPU runs float16 convolutions only as NHWC, and dilated float16 ones only as Conv2D
    # (checked with run_graphdef, so with grappler off).
    dilation = draw(st.integers(1, 2)) if not half or op in ("Conv2D", "GroupConv2D") else 1
    valid_fits = min(spatial) >= (kernel - 1) * dilation + 1
    padding = draw(st.sampled_from(["SAME", "VALID"])) if valid_fits or op == "Conv2DBackpropInput" else "SAME"
    fmt = tf_format(rank, channels_last)
    strides = tuple(full(rank, channels_last, stride))
    dilations = tuple(full(rank, channels_last, dilation))

    def out_shape(channels: int, sizes: list[int]) -> tuple:
        return (shape[0],) + (tuple(sizes) + (channels,) if channels_last else (channels,) + tuple(sizes))

    if op == "Conv2DBackpropInput":
        cout = draw(st.integers(1, 8))
        extra = draw(st.integers(0, stride - 1))
        if padding == "SAME":
            sizes = [max(1, s * stride - extra) for s in spatial]
        else:
            sizes = [(s - 1) * stride + (kernel - 1) * dilation + 1 + extra for s in spatial]
        output = out_shape(cout, sizes)
        return TfOp(op, (kernel, kernel, cout, cin), strides, dilations, padding, fmt, input_sizes=output), output

    sizes = [conv_out(s, kernel, stride, dilation, padding) for s in spatial]
    if op == "DepthwiseConv2dNative":
        # NOTE: TensorFlow 2.21 with oneDNN fails ("could not create a primitive descriptor for the reorder
        # primitive") on DepthwiseConv2dNative with one output channel followed by Conv2D and BiasAdd, and
        # later runs in the same process can fail on similar graphs. A 1-channel input gets multiplier 2.
        multiplier = draw(st.integers(2 if cin == 1 else 1, 2))
        weight = (kernel, kernel, cin, multiplier)
        return TfOp(op, weight, strides, dilations, padding, fmt), out_shape(cin * multiplier, sizes)
    if op == "GroupConv2D":
        groups = draw(st.sampled_from(divisors(cin, 2, 4)))
        per_group = draw(st.integers(1, 4))
        positive_axis = draw(st.booleans())
        concat_axis = cax if positive_axis else cax - rank
        return TfOp(op, (kernel, kernel, cin // groups, per_group), strides, dilations, padding, fmt,
                    groups=groups, split_op=draw(st.sampled_from(["Split", "SplitV"])),
                    branch_bias=draw(st.booleans()), concat_axis=concat_axis), out_shape(groups * per_group, sizes)
    cout = draw(st.integers(1, 8))
    weight = (kernel,) * (rank - 2) + (cin, cout)
    return TfOp(op, weight, strides, dilations, padding, fmt), out_shape(cout, sizes)


@st.composite
def tf_models(draw, first_op: str | None = None):
    half = sometimes(draw, 6)
    dtype = "float16" if half else "float32"
    family = "image" if first_op else draw(st.sampled_from(["image", "image", "matrix", "image", "volume"]))
    channels_last = True if half else draw(st.booleans())
    batch = draw(st.integers(1, 2))
    if family == "matrix":
        input_shape = (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    else:
        rank = 5 if family == "volume" else 4
        spatial = [draw(st.integers(1, 4 if rank == 5 else 8)) for _ in range(rank - 2)]
        channels = draw(st.integers(1, 8))
        if first_op == "GroupConv2D":
            channels = draw(st.sampled_from([2, 3, 4, 6, 8]))
        input_shape = tuple([batch] + spatial + [channels] if channels_last else [batch, channels] + spatial)

    shapes = [input_shape]
    blocks = []
    for index in range(draw(st.integers(1, 3))):
        if index > 0 and sometimes(draw, 5):
            a, b = draw(merge_pairs(shapes))
            blocks.append(TfMerge(draw(st.sampled_from(["AddV2", "Mul"])) if a != b else "AddV2", a, b))
            shapes.append(shapes[a])
            continue
        ops = ["MatMul"]
        if family == "image":
            ops = ["Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "GroupConv2D", "MatMul"]
        elif family == "volume":
            ops = ["Conv3D", "MatMul"]
        op = first_op if index == 0 and first_op else draw(st.sampled_from(ops))
        rank_needed = 5 if op == "Conv3D" else 4
        sources = [i for i, s in enumerate(shapes) if op == "MatMul" or len(s) == rank_needed]
        if op == "Conv2DBackpropInput":
            sources = [i for i in sources if max(shapes[i][1:]) <= 8]
        if op == "GroupConv2D":
            sources = [i for i in sources if divisors(shapes[i][channel_axis(4, channels_last)], 2, 4)]
        if not sources:
            op = "MatMul"
            sources = list(range(len(shapes)))
        source = draw(st.sampled_from(sources))
        shape = shapes[source]
        flatten = op == "MatMul" and len(shape) > 2
        if flatten:
            shape = (shape[0], math.prod(shape[1:]))
        tf_op, shape = draw(tf_ops(op, shape, channels_last, dtype))

        bias = None
        if op != "GroupConv2D" and sometimes(draw, 2):
            bias = draw(tf_ariths(shape, channels_last, ops=("BiasAdd", "AddV2", "Add")))
        tail_length = draw(st.integers(1 if op == "GroupConv2D" else 0, 3))
        tail = []
        for position in range(tail_length):
            if op == "GroupConv2D" and position == 0:
                tail.append(TfFusedBN(draw(st.sampled_from(["V3", "V2"])),
                                      draw_training(draw, shape, channel_axis(4, channels_last)),
                                      draw(st.sampled_from([1e-3, 1e-5])), shape[channel_axis(4, channels_last)],
                                      tf_format(4, channels_last)))
            else:
                tail.append(draw(tf_tail_op(shape, channels_last, dtype)))
        shares = tuple(draw_share(draw) for _ in range(1 + (bias is not None) + len(tail)))
        branch_share = None
        if op == "GroupConv2D" and sometimes(draw, 5):
            branch_share = (draw(st.integers(0, tf_op.groups - 1)), draw(st.sampled_from(SHARE_KINDS[1:])))
        blocks.append(TfBlock(source, sometimes(draw, 3), flatten, tf_op, bias, tuple(tail), shares, branch_share))
        shapes.append(shape)

    mode = "qat" if sometimes(draw, 4) else "ptq"
    return TfSpec(dtype, input_shape, channels_last, draw(st.booleans()), tuple(blocks), mode,
                  draw(st.integers(0, 2**32 - 1)))


# ---------------------------------------------------------------------------------------------------
# Building a TensorFlow model from a spec


@dataclass
class BuiltModel:
    model: fusion_ir.Model
    feeds: dict
    # Anchor node name -> the reason it must not fold.
    must_not_fold: dict
    # Anchors in must_not_fold that a later BatchNorm fold may absorb as the conv's bias, so only their
    # report status is checked: in qat mode an Add after a Mul that folded is the conv's own bias.
    absorbable: set = frozenset()


def weight_values(rng, shape: tuple, fan_in: int) -> np.ndarray:
    """Uniform weights with variance 1 / fan_in, so activations stay near unit scale through a chain."""
    return rng.uniform(-1.0, 1.0, shape) * math.sqrt(3.0 / max(fan_in, 1))


def arith_values(rng, arith) -> np.ndarray:
    if arith.zero:
        return np.zeros(arith.shape)
    if arith.op == "Mul":
        return rng.uniform(0.5, 2.0, arith.shape) * rng.choice([-1.0, 1.0], arith.shape)
    return rng.normal(0.0, 1.0, arith.shape)


def bn_values(rng, channels) -> list[np.ndarray]:
    """Random (gamma, beta, mean, variance); about one gamma in five is negative."""
    gamma = rng.uniform(0.5, 1.5, channels) * np.where(rng.random(channels) < 0.2, -1.0, 1.0)
    return [gamma, rng.normal(0.0, 0.5, channels), rng.normal(0.0, 0.5, channels), rng.uniform(0.2, 2.0, channels)]


def tf_weight_fan_in(op: TfOp) -> int:
    if op.op == "MatMul":
        return op.weight_shape[1] if op.transpose_b else op.weight_shape[0]
    if op.op == "Conv2DBackpropInput":
        return op.weight_shape[0] * op.weight_shape[1] * op.weight_shape[3]
    return math.prod(op.weight_shape[:-1]) if op.op != "DepthwiseConv2dNative" else math.prod(op.weight_shape[:2])


def make_tf_values(spec: TfSpec, rng, reference: bool = False) -> tuple[list, list]:
    """Create every constant of the model eagerly, in block order: (per-block values, variables to keep).

    With `reference`, every constant has the model's value but is stored as float64.
    """
    dtype = np.dtype(spec.dtype)
    keep = []

    def constant(array, as_dtype=dtype):
        array = np.asarray(array).astype(as_dtype)
        if reference:
            return tf.constant(array.astype(np.float64))
        if spec.variables:
            keep.append(tf.Variable(array))
            return keep[-1]
        return tf.constant(array)

    values = []
    for block in spec.blocks:
        if isinstance(block, TfMerge):
            values.append(None)
            continue
        op = block.op
        count = op.groups if op.op == "GroupConv2D" else 1
        block_values = {
            "weights": [constant(weight_values(rng, op.weight_shape, tf_weight_fan_in(op))) for _ in range(count)],
            "branch_biases": [constant(rng.normal(0, 0.5, op.weight_shape[-1])) for _ in range(count)]
            if op.branch_bias else [],
            "bias": constant(arith_values(rng, block.bias)) if block.bias else None,
            "tail": [],
        }
        for item in block.tail:
            if isinstance(item, TfFusedBN):
                block_values["tail"].append([constant(v, np.float32) for v in bn_values(rng, item.channels)])
            elif isinstance(item, TfSmallBN):
                params = bn_values(rng, item.shape)
                block_values["tail"].append([constant(v) for v in params])
            else:
                block_values["tail"].append(constant(arith_values(rng, item)))
        values.append(block_values)
    return values, keep


def spread_kernel(weight: np.ndarray, dilation: int, spatial_dims: int) -> np.ndarray:
    """Return `weight` with dilation - 1 zeros between taps: the dilated kernel as an undilated one."""
    shape = tuple((k - 1) * dilation + 1 for k in weight.shape[:spatial_dims]) + weight.shape[spatial_dims:]
    spread = np.zeros(shape, dtype=weight.dtype)
    spread[(slice(None, None, dilation),) * spatial_dims] = weight
    return spread


def emit_tf_conv(op_type: str, op: TfOp, x, weight, name: str, reference: bool):
    """Emit one convolution.

    With `reference` (float64), TensorFlow 2.21 on CPU lacks kernels for channels-first and some dilated
    float64 convolutions. So a dilated kernel is spread out with zeros (the same effective size, so the
    same SAME padding), and a channels-first convolution runs channels-last between two transposes, the
    second of which takes `name`.
    """
    rank = len(op.strides)
    dilation = max(op.dilations)
    if reference and dilation > 1:
        weight = tf.constant(spread_kernel(weight.numpy(), dilation, rank - 2))
        op = dataclasses.replace(op, dilations=(1,) * rank)
    if not reference or op.data_format in ("NHWC", "NDHWC"):
        args = dict(strides=list(op.strides), dilations=list(op.dilations), padding=op.padding,
                    data_format=op.data_format)
        if op_type == "Conv2DBackpropInput":
            return tf.raw_ops.Conv2DBackpropInput(input_sizes=list(op.input_sizes), filter=weight, out_backprop=x,
                                                  name=name, **args)
        return getattr(tf.raw_ops, op_type)(input=x, filter=weight, name=name, **args)
    to_last = [0] + list(range(2, rank)) + [1]
    to_first = [0, rank - 1] + list(range(1, rank - 1))
    args = dict(strides=[op.strides[a] for a in to_last], dilations=[op.dilations[a] for a in to_last],
                padding=op.padding, data_format="NHWC" if rank == 4 else "NDHWC")
    x = tf.transpose(x, to_last)
    if op_type == "Conv2DBackpropInput":
        y = tf.raw_ops.Conv2DBackpropInput(input_sizes=[op.input_sizes[a] for a in to_last], filter=weight,
                                           out_backprop=x, **args)
    else:
        y = getattr(tf.raw_ops, op_type)(input=x, filter=weight, **args)
    return tf.transpose(y, to_first, name=name)


def emit_bias_add(x, bias, data_format: str, name: str, reference: bool):
    """Emit BiasAdd; with `reference` (float64), an Add of the bias reshaped for `data_format`."""
    if not reference:
        return tf.raw_ops.BiasAdd(value=x, bias=bias, data_format=data_format, name=name)
    rank = len(x.shape)
    shape = [-1] + [1] * (rank - 2) if data_format == "NCHW" and rank > 2 else [-1]
    return tf.add(x, tf.reshape(bias, shape), name=name)


def emit_tf_op(op: TfOp, x, weights, branch_biases, name: str, reference: bool = False):
    if op.op == "MatMul":
        return tf.raw_ops.MatMul(a=x, b=weights[0], transpose_a=op.transpose_a, transpose_b=op.transpose_b, name=name)
    if op.op != "GroupConv2D":
        return emit_tf_conv(op.op, op, x, weights[0], name, reference)
    cax = 3 if op.data_format == "NHWC" else 1
    if op.split_op == "Split":
        parts = tf.split(x, op.groups, axis=cax, name=f"{name}_split")
    else:
        size = x.shape[cax] // op.groups
        parts = tf.raw_ops.SplitV(value=x, size_splits=[size] * op.groups, axis=cax, num_split=op.groups,
                                  name=f"{name}_split")
    outs = []
    for index, part in enumerate(parts):
        y = emit_tf_conv("Conv2D", op, part, weights[index], f"{name}_g{index}_conv", reference)
        if branch_biases:
            y = emit_bias_add(y, branch_biases[index], op.data_format, f"{name}_g{index}_bias", reference)
        outs.append(y)
    return tf.concat(outs, axis=op.concat_axis, name=name)


def emit_tf_arith(arith: TfArith, x, c, name: str, reference: bool = False):
    if arith.op == "BiasAdd":
        return emit_bias_add(x, c, arith.data_format, name, reference)
    a, b = (c, x) if arith.const_first else (x, c)
    return getattr(tf.raw_ops, arith.op)(x=a, y=b, name=name)


def emit_tf_tail(item, x, values, name: str, reference: bool = False):
    if isinstance(item, TfFusedBN) and reference:
        return emit_reference_bn(item, x, values, name)
    if isinstance(item, TfFusedBN):
        gamma, beta, mean, variance = values
        bn = getattr(tf.raw_ops, "FusedBatchNorm" if item.version == "V1" else f"FusedBatchNorm{item.version}")
        return bn(x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=item.epsilon,
                  data_format=item.data_format, is_training=item.training, name=name)[0]
    if isinstance(item, TfSmallBN):
        gamma, beta, mean, variance = values
        return tf.nn.batch_normalization(x, mean, variance, beta if item.offset else None,
                                         gamma if item.scale else None, item.epsilon, name=name)
    return emit_tf_arith(item, x, values, name, reference)


def emit_reference_bn(item: TfFusedBN, x, values, name: str):
    """Emit FusedBatchNorm as float64 arithmetic (TensorFlow has no float64 FusedBatchNorm kernel).

    In training mode it normalizes with the batch mean and the biased batch variance, as FusedBatchNorm does.
    """
    gamma, beta, mean, variance = values
    rank = len(x.shape)
    axis = 1 if item.data_format in ("NCHW", "NCDHW") else rank - 1
    shape = [1] * rank
    shape[axis] = -1
    if item.training:
        mean, variance = tf.nn.moments(x, axes=[a for a in range(rank) if a != axis], keepdims=True)
    else:
        mean, variance = tf.reshape(mean, shape), tf.reshape(variance, shape)
    scale = tf.reshape(gamma, shape) / tf.sqrt(variance + item.epsilon)
    return tf.add((x - mean) * scale, tf.reshape(beta, shape), name=name)


def tf_unfoldable_reason(item, spec: TfSpec) -> str | None:
    """Return the reason tail op `item` must not fold on its own, or None."""
    if isinstance(item, TfFusedBN):
        return "it is a training-mode BatchNorm" if item.training else None
    if isinstance(item, TfSmallBN):
        return "qat mode keeps a BatchNorm written as small ops" if spec.mode == "qat" else None
    if item.kind == "other":
        return f"its constant of shape {list(item.shape)} varies along a non-channel axis"
    if spec.mode == "qat" and item.op in BIAS_LIKE_TF:
        return QAT_ADD_REASON
    if spec.mode == "qat" and (item.op != "Mul" or math.prod(item.shape) > 1):
        return "qat mode folds only a scalar Mul"
    return None


QAT_ADD_REASON = "qat mode does not fold an added constant"


def build_tf_model(spec: TfSpec, reference: bool = False) -> BuiltModel:
    """Build the model of `spec`.

    With `reference`, build the same model computed in float64 as far as TensorFlow allows. It is the
    check's measure of exact arithmetic and has its own input and output names.
    """
    rng = np.random.default_rng(spec.seed)
    values, keep = make_tf_values(spec, rng, reference)
    must_not_fold: dict[str, str] = {}
    absorbable: set[str] = set()
    listed: list[str] = []

    def body(x):
        tensors = [x]
        consumed = set()
        extra_outputs = []

        def share(tensor, kind, label):
            if kind == "reader":
                extra_outputs.append(tf.raw_ops.Neg(x=tensor, name=f"{label}_reader"))
            elif kind == "returned":
                extra_outputs.append(tensor)
            elif kind == "listed":
                listed.append(tensor.name)

        for index, (block, block_values) in enumerate(zip(spec.blocks, values)):
            prefix = f"b{index}"
            if isinstance(block, TfMerge):
                merged = getattr(tf.raw_ops, block.op)(x=tensors[block.a], y=tensors[block.b], name=f"{prefix}_merge")
                if block.op == "Mul":
                    must_not_fold[merged.op.name] = "it multiplies two activations"
                consumed |= {block.a, block.b}
                tensors.append(merged)
                continue
            consumed.add(block.source)
            y = tensors[block.source]
            if block.relu:
                y = tf.nn.relu(y, name=f"{prefix}_relu")
            if block.flatten:
                y = tf.reshape(y, [y.shape[0], -1], name=f"{prefix}_flatten")
            y = emit_tf_op(block.op, y, block_values["weights"], block_values["branch_biases"], f"{prefix}_op",
                           reference)
            # Positions: 0 is the op output, then come the bias and the tail. `anchors` lists the fold candidates.
            position_tensors = [y]
            anchors: list[int] = []
            reasons: dict[int, str] = {}
            if block.bias is not None:
                y = emit_tf_arith(block.bias, y, block_values["bias"], f"{prefix}_bias", reference)
                position_tensors.append(y)
            bias_like = block.bias
            for t, (item, item_values) in enumerate(zip(block.tail, block_values["tail"])):
                y = emit_tf_tail(item, y, item_values, f"{prefix}_t{t}", reference)
                position_tensors.append(y)
                position = len(position_tensors) - 1
                if t == 0 and bias_like is None and block.op.op != "GroupConv2D" and isinstance(item, TfArith) \
                        and item.op in BIAS_LIKE_TF:
                    bias_like = item  # the op's own bias, not a candidate
                    continue
                anchors.append(position)
                reason = tf_unfoldable_reason(item, spec)
                if reason:
                    reasons[position] = reason
            if bias_like is not None and bias_like.kind == "other" and anchors:
                reasons.setdefault(anchors[0], "the bias before it varies along a non-channel axis")
            for position, kind in enumerate(block.shares):
                if kind is None:
                    continue
                share(position_tensors[position], kind, f"{prefix}_p{position}")
                anchor = first_anchor_after(position, anchors)
                if anchor is not None:
                    reasons.setdefault(anchor, f"the tensor before it is also read elsewhere ({kind})")
            if block.branch_share is not None:
                branch, kind = block.branch_share
                conv = tf.compat.v1.get_default_graph().get_operation_by_name(f"{prefix}_op_g{branch}_conv")
                share(conv.outputs[0], kind, f"{prefix}_g{branch}")
                if anchors:
                    reasons.setdefault(anchors[0], f"a branch conv output is also read elsewhere ({kind})")
            for position, reason in reasons.items():
                must_not_fold[position_tensors[position].op.name] = reason
                if reason == QAT_ADD_REASON:
                    absorbable.add(position_tensors[position].op.name)
            tensors.append(y)
        sinks = [t for i, t in enumerate(tensors) if i > 0 and i not in consumed]
        return sinks + extra_outputs

    dtype = tf.float64 if reference else tf.as_dtype(spec.dtype)
    model = freeze(body, tf.TensorSpec(spec.input_shape, dtype, name="x"))
    model.outputs = model.outputs + listed
    del keep  # the variables are frozen into constants now
    x = np.random.default_rng(spec.seed + 1).standard_normal(spec.input_shape).astype(spec.dtype)
    feeds = {model.inputs[0]: x.astype(np.float64) if reference else x}
    return BuiltModel(model, feeds, must_not_fold, absorbable)


def tf_ops_by_name(graph_def) -> dict[str, str]:
    return {node.name: node.op for node in graph_def.node}


def tf_nonfinite_constants(graph_def) -> list[str]:
    bad = []
    for node in graph_def.node:
        if node.op == "Const":
            array = tf.make_ndarray(node.attr["value"].tensor)
            if array.dtype.kind == "f" and not np.isfinite(array.astype(np.float64)).all():
                bad.append(node.name)
    return bad


def tf_run_error(graph_def, feeds: dict, fetches: list[str]) -> str:
    """Run a GraphDef as run_graphdef does and return TensorFlow's full error message, or "" when it runs.

    run_graphdef keeps only the first line, which for a kernel error is just "Graph execution error:".
    """
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    try:
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            session.run(fetches, feed_dict=feeds)
    except tf.errors.OpError as err:
        return err.message
    return ""


def check_tf_fuse(spec: TfSpec) -> None:
    built = build_tf_model(spec)
    model = built.model
    result = fusion_ir.fuse(model, mode=spec.mode, verify=False)
    note(result.report.details_table())

    with tf.Graph().as_default():
        tf.compat.v1.import_graph_def(result.graph_def, name="")
    try:
        expected = run_graphdef(model.graph_def, built.feeds, model.outputs)
    except BackendUnavailable as err:
        raise AssertionError(f"the generated model does not run in TensorFlow, so the strategy must exclude it: "
                             f"{err}") from None
    try:
        actual = run_graphdef(result.graph_def, built.feeds, model.outputs)
    except BackendUnavailable as err:
        detail = tf_run_error(result.graph_def, built.feeds, model.outputs)
        raise AssertionError(f"the fused model does not run in TensorFlow although the original does: {err}\n"
                             f"{detail}") from None
    def reference():
        exact = build_tf_model(spec, reference=True)
        return run_graphdef(exact.model.graph_def, exact.feeds, exact.model.outputs)

    check_outputs(model.outputs, expected, actual, TOLERANCE[spec.dtype], reference)
    assert tf_nonfinite_constants(result.graph_def) == [], "the fold wrote NaN or infinite constants"
    check_report(result.report)
    check_unfolded(result.report, built.must_not_fold, tf_ops_by_name(model.graph_def),
                   tf_ops_by_name(result.graph_def), built.absorbable)


@given(spec=tf_models())
def test_tf_models_fuse_equivalently(spec):
    check_tf_fuse(spec)


@given(spec=tf_models(first_op="GroupConv2D"))
def test_tf_group_conv_fuses_equivalently(spec):
    check_tf_fuse(spec)


def test_tf_biasadd_other_axis_not_folded():
    """A BiasAdd whose data_format puts its vector on another axis (NCHW on an NHWC conv output, with the
    height equal to the channel count) varies spatially, so it must not fold."""
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((3, 3, 3, 2)).astype(np.float32))
    bias = tf.constant(np.array([0.5, -0.5], np.float32))
    height_bias = tf.constant(np.array([10.0, -10.0], np.float32))

    def body(x):
        y = tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", data_format="NHWC")
        y = tf.raw_ops.BiasAdd(value=y, bias=bias, data_format="NHWC", name="bias")
        return tf.raw_ops.BiasAdd(value=y, bias=height_bias, data_format="NCHW", name="height_bias")

    model = freeze(body, tf.TensorSpec([1, 2, 4, 3], tf.float32, name="x"))
    feeds = {model.inputs[0]: rng.standard_normal((1, 2, 4, 3)).astype(np.float32)}

    result = fusion_ir.fuse(model, verify=False)

    assert result.report.candidates["height_bias"].status == "skipped"
    expected = run_graphdef(model.graph_def, feeds, model.outputs)
    actual = run_graphdef(result.graph_def, feeds, model.outputs)
    check_outputs(model.outputs, expected, actual, TOLERANCE["float32"])


# ---------------------------------------------------------------------------------------------------
# ONNX model specs


@dataclass(frozen=True)
class OnnxArith:
    """Mul, Add or Sub of the running tensor and a constant. Sub with const_first computes c - x."""

    op: str
    kind: str  # "scalar", "channel", or "other": varies along a non-channel axis
    shape: tuple[int, ...]
    const_first: bool = False
    zero: bool = False


@dataclass(frozen=True)
class OnnxBN:
    training: bool
    epsilon: float
    channels: int  # the size of axis 1, which ONNX BatchNormalization normalizes
    channel_axis_ok: bool  # False after a 3-D MatMul, whose channels are last
    explicit_mode: bool  # write training_mode=0 instead of leaving the attribute out


@dataclass(frozen=True)
class OnnxOp:
    """Conv, ConvTranspose, Gemm or MatMul. `bias_shape` is the shape of Conv's B or Gemm's C, and
    `matmul_bias` is an Add of a constant after a MatMul."""

    op: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    attrs: tuple = ()  # (name, value) pairs
    bias_shape: tuple | None = None
    matmul_bias: OnnxArith | None = None


@dataclass(frozen=True)
class OnnxBlock:
    """op -> [MatMul bias] -> tail, like TfBlock. A `shares` entry is None, "reader" or "output"."""

    source: int
    relu: bool
    flatten: bool
    op: OnnxOp
    tail: tuple
    shares: tuple


@dataclass(frozen=True)
class OnnxMerge:
    op: str
    a: int
    b: int


@dataclass(frozen=True)
class OnnxSpec:
    input_shape: tuple[int, ...]
    blocks: tuple
    mode: str
    opset: int
    constant_nodes: bool  # constants as Constant nodes instead of initializers
    value_info: bool  # run shape inference first, so intermediate shapes are known
    seed: int


def onnx_channel_axis(shape: tuple, op: str) -> int:
    return len(shape) - 1 if op in ("Gemm", "MatMul") else 1


def onnx_other_shapes(shape: tuple, cax: int) -> list[tuple]:
    rank = len(shape)
    options = []
    if cax == 1 and rank > 2:
        if math.prod(shape[2:]) > 1:
            options.append(tuple(shape[1:]))
        if shape[-1] > 1:
            options.append((shape[-1],))  # a bare vector along the last spatial axis
    if cax == rank - 1:
        if rank == 2 and shape[0] > 1:
            options += [tuple(shape), (shape[0], 1)]
        if rank == 3 and shape[1] > 1:
            options += [tuple(shape[1:]), (shape[1], 1)]
    if shape[0] > 1:
        options.append((shape[0],) + (1,) * (rank - 1))
    return options


def onnx_channel_shapes(shape: tuple, cax: int) -> list[tuple]:
    rank, channels = len(shape), shape[cax]
    if cax == rank - 1:
        return [(channels,), (1,) * (rank - 1) + (channels,)]
    return [(channels,) + (1,) * (rank - 2), (1, channels) + (1,) * (rank - 2)]


@st.composite
def onnx_ariths(draw, shape: tuple, cax: int, ops=("Mul", "Add", "Sub")):
    op = draw(st.sampled_from(ops))
    kind = draw(st.sampled_from(["channel", "scalar", "other"]))
    options = onnx_other_shapes(shape, cax)
    if kind == "other" and not options:
        kind = "channel"
    if kind == "scalar":
        const_shape = draw(st.sampled_from(scalar_shapes(len(shape))))
    elif kind == "channel":
        const_shape = draw(st.sampled_from(onnx_channel_shapes(shape, cax)))
    else:
        const_shape = draw(st.sampled_from(options))
    return OnnxArith(op, kind, const_shape, draw(st.booleans()), draw_zero(draw, op, kind))


@st.composite
def onnx_ops(draw, op: str, shape: tuple):
    """Draw a Conv, ConvTranspose, Gemm or MatMul reading a tensor of `shape`; return (OnnxOp, output shape)."""
    if op == "Gemm":
        rows, depth = shape
        trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        if trans_a:
            rows, depth = depth, rows
        units = draw(st.integers(1, 8))
        c_shape = draw(st.sampled_from([None, (units,), (1, units), (), (rows, units)]))
        attrs = (("alpha", draw(st.sampled_from([1.0, 0.5, -2.0]))), ("beta", draw(st.sampled_from([1.0, 0.5, 0.0, 2.0]))),
                 ("transA", trans_a), ("transB", trans_b))
        weight = (units, depth) if trans_b else (depth, units)
        return OnnxOp(op, weight, (rows, units), attrs, c_shape)
    if op == "MatMul":
        units = draw(st.integers(1, 8))
        output = tuple(shape[:-1]) + (units,)
        bias = draw(onnx_ariths(output, len(output) - 1, ops=("Add",))) if sometimes(draw, 2) else None
        return OnnxOp(op, (shape[-1], units), output, matmul_bias=bias)

    dims = len(shape) - 2
    cin = shape[1]
    groups = draw(st.sampled_from(divisors(cin, 1, 8)))
    per_group = draw(st.integers(1, max(1, 8 // groups)))
    cout = groups * per_group
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    spatial = list(shape[2:])
    attrs = [("strides", [stride] * dims), ("dilations", [dilation] * dims)]
    if groups > 1 or draw(st.booleans()):
        attrs.append(("group", groups))
    bias_shape = (cout,) if draw(st.booleans()) else None
    if op == "Conv":
        pads = [draw(st.integers(0, 1)) for _ in range(2 * dims)]
        room = min(s + pads[i] + pads[i + dims] for i, s in enumerate(spatial))
        kernel = draw(st.sampled_from([k for k in range(1, (3 if dims < 3 else 2) + 1) if (k - 1) * dilation + 1 <= room]))
        sizes = [(s + pads[i] + pads[i + dims] - (kernel - 1) * dilation - 1) // stride + 1
                 for i, s in enumerate(spatial)]
        weight = (cout, cin // groups) + (kernel,) * dims
    else:
        kernel = draw(st.integers(1, 3 if dims < 3 else 2))
        # Pads remove output at both ends, so pad only where the kernel adds at least 2 ((kernel - 1) * dilation).
        pads = [draw(st.integers(0, 1)) if (kernel - 1) * dilation >= 2 else 0 for _ in range(2 * dims)]
        output_padding = draw(st.integers(0, stride - 1))
        if output_padding:
            attrs.append(("output_padding", [output_padding] * dims))
        sizes = [stride * (s - 1) + output_padding + (kernel - 1) * dilation + 1 - pads[i] - pads[i + dims]
                 for i, s in enumerate(spatial)]
        weight = (cin, per_group) + (kernel,) * dims
    attrs.append(("pads", pads))
    if draw(st.booleans()):
        attrs.append(("kernel_shape", [kernel] * dims))
    return OnnxOp(op, weight, (shape[0], cout) + tuple(sizes), tuple(attrs), bias_shape)


@st.composite
def onnx_models(draw):
    family = draw(st.sampled_from(["conv", "matrix", "conv", "sequence"]))
    batch = draw(st.integers(1, 2))
    if family == "conv":
        dims = draw(st.sampled_from([2, 1, 2, 3]))
        spatial = tuple(draw(st.integers(1, 4 if dims == 3 else 8)) for _ in range(dims))
        input_shape = (batch, draw(st.integers(1, 8))) + spatial
    elif family == "matrix":
        input_shape = (draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    else:
        input_shape = (batch, draw(st.integers(1, 4)), draw(st.integers(1, 8)))

    shapes = [input_shape]
    blocks = []
    for index in range(draw(st.integers(1, 3))):
        if index > 0 and sometimes(draw, 5):
            a, b = draw(merge_pairs(shapes))
            blocks.append(OnnxMerge(draw(st.sampled_from(["Add", "Mul"])) if a != b else "Add", a, b))
            shapes.append(shapes[a])
            continue
        ops = {"conv": ["Conv", "ConvTranspose", "Gemm", "MatMul"], "matrix": ["Gemm", "MatMul"],
               "sequence": ["MatMul"]}[family]
        op = draw(st.sampled_from(ops))
        sources = list(range(len(shapes)))
        if op in ("Conv", "ConvTranspose"):
            sources = [i for i in sources if len(shapes[i]) > 2 and (op == "Conv" or max(shapes[i][2:]) <= 8)]
        if not sources:
            op = "MatMul"
            sources = list(range(len(shapes)))
        source = draw(st.sampled_from(sources))
        shape = shapes[source]
        # Gemm takes 2-D input. MatMul also takes 3-D input ([batch, rows, depth]) as it is.
        flatten = op in ("Gemm", "MatMul") and len(shape) > 2 and (op == "Gemm" or len(shape) > 3 or draw(st.booleans()))
        if flatten:
            shape = (shape[0], math.prod(shape[1:]))
        onnx_op = draw(onnx_ops(op, shape))
        shape = onnx_op.output_shape
        cax = onnx_channel_axis(shape, op)
        tail = []
        for _ in range(draw(st.integers(0, 3))):
            if sometimes(draw, 3):
                training = draw_training(draw, shape, 1)
                epsilon = draw(st.sampled_from(EPSILONS[:-1] if training else EPSILONS))
                tail.append(OnnxBN(training, epsilon, shape[1], cax == 1 or len(shape) == 2, draw(st.booleans())))
            else:
                tail.append(draw(onnx_ariths(shape, cax)))
        positions = 1 + (onnx_op.matmul_bias is not None) + len(tail)
        shares = tuple(draw_share(draw, ("reader", "output")) for _ in range(positions))
        blocks.append(OnnxBlock(source, sometimes(draw, 3), flatten, onnx_op, tuple(tail), shares))
        shapes.append(shape)

    mode = "qat" if sometimes(draw, 4) else "ptq"
    return OnnxSpec(input_shape, tuple(blocks), mode, draw(st.sampled_from([17, 14, 21])), sometimes(draw, 4),
                    sometimes(draw, 3), draw(st.integers(0, 2**32 - 1)))


# ---------------------------------------------------------------------------------------------------
# Building an ONNX model from a spec


def onnx_unfoldable_reason(item, spec: OnnxSpec) -> str | None:
    """Return the reason tail op `item` must not fold on its own, or None."""
    if isinstance(item, OnnxBN):
        if item.training:
            return "it is a training-mode BatchNormalization"
        if not item.channel_axis_ok:
            return "it normalizes axis 1, which is not the channel axis of a 3-D MatMul output"
        return None
    if item.kind == "other":
        return f"its constant of shape {list(item.shape)} varies along a non-channel axis"
    if spec.mode == "qat" and (item.op != "Mul" or math.prod(item.shape) > 1):
        return "qat mode folds only a scalar Mul"
    return None


def onnx_weight_fan_in(op: OnnxOp) -> int:
    attrs = dict(op.attrs)
    if op.op in ("Gemm", "MatMul"):
        return op.weight_shape[1] if attrs.get("transB") else op.weight_shape[0]
    if op.op == "Conv":
        return math.prod(op.weight_shape[1:])  # [Cout, Cin / group, k...]
    # ConvTranspose [Cin, Cout / group, k...]: each output reads Cin / group input channels.
    return op.weight_shape[0] // attrs.get("group", 1) * math.prod(op.weight_shape[2:])


def build_onnx_model(spec: OnnxSpec) -> BuiltModel:
    rng = np.random.default_rng(spec.seed)
    nodes, initializers = [], []
    shapes = {"x": spec.input_shape}
    outputs = []
    must_not_fold: dict[str, str] = {}

    def constant(name: str, array) -> str:
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        if spec.constant_nodes:
            nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_node", value=tensor))
        else:
            initializers.append(tensor)
        return name

    def node(op: str, inputs: list[str], name: str, shape: tuple, **attrs) -> str:
        output = f"{name}_y"
        extra = [f"{name}_running_mean", f"{name}_running_var"] if attrs.get("training_mode") else []
        nodes.append(helper.make_node(op, inputs, [output] + extra, name=name, **attrs))
        shapes[output] = tuple(shape)
        return output

    def arith(item: OnnxArith, x: str, name: str) -> str:
        c = constant(f"{name}_c", arith_values(rng, item))
        operands = [c, x] if item.const_first else [x, c]
        return node(item.op, operands, name, np.broadcast_shapes(shapes[x], item.shape))

    tensors = ["x"]
    consumed = set()
    for index, block in enumerate(spec.blocks):
        prefix = f"b{index}"
        if isinstance(block, OnnxMerge):
            merged = node(block.op, [tensors[block.a], tensors[block.b]], f"{prefix}_merge", shapes[tensors[block.a]])
            if block.op == "Mul":
                must_not_fold[f"{prefix}_merge"] = "it multiplies two activations"
            consumed |= {block.a, block.b}
            tensors.append(merged)
            continue
        consumed.add(block.source)
        y = tensors[block.source]
        if block.relu:
            y = node("Relu", [y], f"{prefix}_relu", shapes[y])
        if block.flatten:
            y = node("Flatten", [y], f"{prefix}_flatten", (shapes[y][0], math.prod(shapes[y][1:])), axis=1)
        op = block.op
        inputs = [y, constant(f"{prefix}_w", weight_values(rng, op.weight_shape, onnx_weight_fan_in(op)))]
        if op.bias_shape is not None:
            inputs.append(constant(f"{prefix}_b", rng.normal(0.0, 0.5, op.bias_shape)))
        y = node(op.op, inputs, f"{prefix}_op", op.output_shape, **dict(op.attrs))
        position_tensors = [y]
        anchors: list[int] = []
        reasons: dict[int, str] = {}
        bias_like = None
        if op.matmul_bias is not None:
            y = arith(op.matmul_bias, y, f"{prefix}_bias")
            position_tensors.append(y)
            bias_like = op.matmul_bias
        for t, item in enumerate(block.tail):
            name = f"{prefix}_t{t}"
            if isinstance(item, OnnxBN):
                params = [constant(f"{name}_{label}", value)
                          for label, value in zip(("scale", "B", "mean", "var"), bn_values(rng, item.channels))]
                attrs = {"epsilon": item.epsilon}
                if item.training or item.explicit_mode:
                    attrs["training_mode"] = int(item.training)
                y = node("BatchNormalization", [y] + params, name, shapes[y], **attrs)
            else:
                y = arith(item, y, name)
            position_tensors.append(y)
            position = len(position_tensors) - 1
            if t == 0 and bias_like is None and op.op == "MatMul" and isinstance(item, OnnxArith) and item.op == "Add":
                bias_like = item  # MatMul's own bias, not a candidate
                continue
            anchors.append(position)
            reason = onnx_unfoldable_reason(item, spec)
            if reason:
                reasons[position] = reason
        if bias_like is not None and bias_like.kind == "other" and anchors:
            reasons.setdefault(anchors[0], "the bias before it varies along a non-channel axis")
        for position, kind in enumerate(block.shares):
            if kind is None:
                continue
            tensor = position_tensors[position]
            if kind == "reader":
                outputs.append(node("Neg", [tensor], f"{prefix}_p{position}_reader", shapes[tensor]))
            else:
                outputs.append(tensor)
            anchor = first_anchor_after(position, anchors)
            if anchor is not None:
                reasons.setdefault(anchor, f"the tensor before it is also read elsewhere ({kind})")
        for position, reason in reasons.items():
            must_not_fold[position_tensors[position].removesuffix("_y")] = reason
        tensors.append(y)
    sinks = [t for i, t in enumerate(tensors) if i > 0 and i not in consumed]
    outputs = list(dict.fromkeys(sinks + outputs))

    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec.input_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    if spec.value_info:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": np.random.default_rng(spec.seed + 1).standard_normal(spec.input_shape).astype(np.float32)}
    return BuiltModel(fusion_ir.Model(model), feeds, must_not_fold)


def onnx_ops_by_name(model) -> dict[str, str]:
    return {node.name: node.op_type for node in model.graph.node}


def onnx_nonfinite_constants(model) -> list[str]:
    bad = [t.name for t in model.graph.initializer if not np.isfinite(numpy_helper.to_array(t)).all()]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and not np.isfinite(numpy_helper.to_array(attr.t)).all():
                    bad.append(node.output[0])
    return bad


def check_onnx_fuse(spec: OnnxSpec) -> None:
    built = build_onnx_model(spec)
    model = built.model.graph_def
    result = fusion_ir.fuse(built.model, mode=spec.mode, verify=False)
    note(result.report.details_table())

    onnx.checker.check_model(result.graph_def, full_check=True)
    names = [o.name for o in model.graph.output]
    assert [o.name for o in result.graph_def.graph.output] == names
    try:
        expected = run_onnx(model, built.feeds, names)
    except BackendUnavailable as err:
        raise AssertionError(f"the generated model does not run in onnxruntime, so the strategy must exclude it: "
                             f"{err}") from None
    try:
        actual = run_onnx(result.graph_def, built.feeds, names)
    except BackendUnavailable as err:
        raise AssertionError(f"the fused model does not run in onnxruntime although the original does: {err}") from None
    check_outputs(names, expected, actual, TOLERANCE["float32"])
    assert onnx_nonfinite_constants(result.graph_def) == [], "the fold wrote NaN or infinite constants"
    check_report(result.report)
    check_unfolded(result.report, built.must_not_fold, onnx_ops_by_name(model), onnx_ops_by_name(result.graph_def))


@given(spec=onnx_models())
def test_onnx_models_fuse_equivalently(spec):
    check_onnx_fuse(spec)


# ---------------------------------------------------------------------------------------------------
# Large and adversarial numbers
#
# Each case builds conv -> BatchNorm (or Mul) with chosen numbers and states the expected result.
# "fused": the candidate folds and the outputs match. "skipped: TEXT": it is skipped with TEXT in the
# reason and the outputs are unchanged. "either": fused with matching outputs, or skipped with a reason.
# In every case the fold must not write a NaN or infinite constant, and outputs that are NaN or infinite
# in the original must be the same in the fused model.

SUBNORMAL_F32 = 1e-40  # below float32's smallest normal, 1.18e-38
SUBNORMAL_F16 = 1e-6  # below float16's smallest normal, 6.1e-5


@dataclass(frozen=True)
class NumberCase:
    name: str
    expected: str
    gamma: float = 1.0
    beta: float = 0.0
    mean: float = 0.0
    variance: float = 1.0
    epsilon: float = 1e-3
    dtype: str = "float32"
    weight_scale: float = 1.0
    input_scale: float = 1.0
    tail: str = "bn"  # "bn" (FusedBatchNormV3 or ONNX BatchNormalization), "small_bn", or "mul" by `gamma`


NAN_CASES = [NumberCase(f"{label} {value}", "skipped: NaN or infinite", **{label: value})
             for label, value in [("gamma", float("nan")), ("beta", float("-inf")), ("mean", float("nan")),
                                  ("variance", float("inf")), ("variance", float("nan"))]]

COMMON_CASES = [
    NumberCase("huge variance", "fused", variance=1e30),
    NumberCase("tiny variance", "fused", variance=1e-30),
    NumberCase("tiny variance, epsilon 0", "fused", variance=1e-30, epsilon=0.0),
    NumberCase("variance near float32 max", "fused", variance=3e38, epsilon=0.0),
    NumberCase("variance 0, epsilon 0", "skipped: variance + epsilon <= 0", variance=0.0, epsilon=0.0),
    NumberCase("negative variance", "skipped: variance + epsilon <= 0", variance=-1.0),
    NumberCase("subnormal epsilon, variance 0", "either", variance=0.0, epsilon=1e-45),
    NumberCase("subnormal gamma", "either", gamma=SUBNORMAL_F32, beta=0.5),
    NumberCase("subnormal scalar Mul", "either", gamma=SUBNORMAL_F32, tail="mul"),
    NumberCase("float32 weight overflow (BN)", "skipped: overflow", gamma=1e20, weight_scale=1e30, input_scale=1e-25),
    NumberCase("float32 weight overflow (Mul)", "skipped: overflow", gamma=1e20, weight_scale=1e30,
               input_scale=1e-25, tail="mul"),
    NumberCase("infinite Mul", "skipped: NaN or infinite", gamma=float("inf"), tail="mul"),
    NumberCase("NaN Mul", "skipped: NaN or infinite", gamma=float("nan"), tail="mul"),
] + NAN_CASES

TF_CASES = COMMON_CASES + [
    NumberCase("float16 weight overflow (BN)", "skipped: overflow", gamma=1000.0, dtype="float16",
               weight_scale=200.0, input_scale=1e-3),
    NumberCase("float16 weight overflow (Mul)", "skipped: overflow", gamma=1000.0, dtype="float16",
               weight_scale=200.0, input_scale=1e-3, tail="mul"),
    # The folded bias, -1e5, is also the original's output, so the original output is -inf as well.
    NumberCase("float16 bias overflow", "skipped: overflow", gamma=100.0, mean=1000.0, dtype="float16"),
    NumberCase("float16 subnormal scale", "either", gamma=1e-5, dtype="float16"),
    NumberCase("float16 subnormal scalar Mul", "either", gamma=SUBNORMAL_F16, dtype="float16", tail="mul"),
    NumberCase("small-op BN huge variance", "fused", variance=1e30, tail="small_bn"),
    NumberCase("small-op BN tiny variance, epsilon 0", "fused", variance=1e-30, epsilon=0.0, tail="small_bn"),
    NumberCase("small-op BN variance 0, epsilon 0", "skipped: variance + epsilon <= 0", variance=0.0, epsilon=0.0,
               tail="small_bn"),
    NumberCase("small-op BN subnormal epsilon, variance 0", "either", variance=0.0, epsilon=1e-45, tail="small_bn"),
    NumberCase("small-op BN NaN mean", "skipped: NaN or infinite", mean=float("nan"), tail="small_bn"),
    NumberCase("small-op BN infinite gamma", "skipped: NaN or infinite", gamma=float("inf"), tail="small_bn"),
]

CASE_CHANNELS = (2, 3)  # conv input and output channels


def case_arrays(case: NumberCase):
    """Return (weight [3, 3, cin, cout], [gamma, beta, mean, variance]) for a case.

    Channels 0 and 2 get the case's numbers and channel 1 plain ones, so one fold handles both.
    """
    rng = np.random.default_rng(0)
    cin, cout = CASE_CHANNELS
    weight = rng.uniform(-1.0, 1.0, (3, 3, cin, cout)) * case.weight_scale

    def per_channel(value, plain):
        return np.array([value, plain, value], dtype=np.float64)

    stats = [per_channel(case.gamma, 1.0), per_channel(case.beta, 0.0), per_channel(case.mean, 0.0),
             per_channel(case.variance, 1.0)]
    return weight, stats


def case_input(case: NumberCase, shape: tuple) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(shape) * case.input_scale).astype(case.dtype)


def assert_same_outputs(names, expected, actual, tolerance: float) -> None:
    """Check outputs that may contain NaN or infinity: the same non-finite entries, the rest within tolerance."""
    for name, e, a in zip(names, expected, actual):
        assert a.shape == e.shape, f"output {name}: shape {a.shape}, expected {e.shape}"
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        finite = np.isfinite(e64)
        assert np.array_equal(np.isfinite(a64), finite), f"output {name}: NaN or infinite entries differ"
        np.testing.assert_array_equal(a64[~finite], e64[~finite], err_msg=f"output {name}")
        error = rel_max_error(e64[finite], a64[finite])
        assert error <= tolerance, f"output {name}: relative max error {error:.3g} exceeds {tolerance:g}"


def check_case_result(case: NumberCase, result, anchor: str, names, expected, actual, new_nonfinite) -> None:
    candidate = result.report.candidates.get(anchor)
    assert candidate is not None, f"{anchor} is not in the report"
    if case.expected == "fused":
        assert candidate.status == "fused", candidate.reason
    elif case.expected.startswith("skipped: "):
        expected_reason = case.expected.removeprefix("skipped: ")
        assert candidate.status == "skipped", f"{anchor} was fused; expected a reason with {expected_reason!r}"
        assert expected_reason in candidate.reason
    assert new_nonfinite == [], f"the fold wrote NaN or infinite constants: {new_nonfinite}"
    if candidate.status == "skipped":
        assert candidate.reason.strip()
    assert_same_outputs(names, expected, actual, TOLERANCE[case.dtype])


def build_tf_case(case: NumberCase) -> tuple[fusion_ir.Model, str, tuple]:
    weight, stats = case_arrays(case)
    w = tf.constant(weight.astype(case.dtype))
    gamma, beta, mean, variance = (tf.constant(s.astype(np.float32)) for s in stats)
    gamma_t, beta_t, mean_t, variance_t = (tf.constant(s.astype(case.dtype)) for s in stats)
    scale = tf.constant(np.asarray(case.gamma, dtype=case.dtype))

    def body(x):
        y = tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="SAME", name="conv")
        if case.tail == "mul":
            return tf.raw_ops.Mul(x=y, y=scale, name="anchor")
        if case.tail == "small_bn":
            return tf.nn.batch_normalization(y, mean_t, variance_t, beta_t, gamma_t, case.epsilon, name="anchor")
        return tf.raw_ops.FusedBatchNormV3(x=y, scale=gamma, offset=beta, mean=mean, variance=variance,
                                           epsilon=case.epsilon, is_training=False, name="anchor")[0]

    shape = (1, 5, 5, CASE_CHANNELS[0])
    dtype = tf.float16 if case.dtype == "float16" else tf.float32
    model = freeze(body, tf.TensorSpec(shape, dtype, name="x"))
    anchor = next(n.name for n in model.graph_def.node if n.name == "anchor" or n.name.startswith("anchor/add_1"))
    return model, anchor, shape


def tf_new_nonfinite_constants(original, fused) -> list[str]:
    before = {node.name for node in original.node if node.op == "Const"}
    return [name for name in tf_nonfinite_constants(fused) if name not in before]


@pytest.mark.parametrize("case", TF_CASES, ids=lambda case: case.name)
def test_tf_adversarial_numbers(case):
    model, anchor, shape = build_tf_case(case)
    feeds = {model.inputs[0]: case_input(case, shape)}

    result = fusion_ir.fuse(model, verify=False)

    with tf.Graph().as_default():
        tf.compat.v1.import_graph_def(result.graph_def, name="")
    expected = run_graphdef(model.graph_def, feeds, model.outputs)
    actual = run_graphdef(result.graph_def, feeds, model.outputs)
    check_case_result(case, result, anchor, model.outputs, expected, actual,
                      tf_new_nonfinite_constants(model.graph_def, result.graph_def))


def build_onnx_case(case: NumberCase) -> tuple[fusion_ir.Model, tuple]:
    weight, stats = case_arrays(case)
    # ONNX Conv weights are [Cout, Cin, kH, kW].
    initializers = [numpy_helper.from_array(np.ascontiguousarray(weight.transpose(3, 2, 0, 1)).astype(np.float32),
                                            "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if case.tail == "mul":
        initializers.append(numpy_helper.from_array(np.asarray(case.gamma, dtype=np.float32), "s"))
        nodes.append(helper.make_node("Mul", ["c", "s"], ["y"], name="anchor"))
    else:
        for label, values in zip(("scale", "B", "mean", "var"), stats):
            initializers.append(numpy_helper.from_array(values.astype(np.float32), label))
        nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["y"], name="anchor",
                                      epsilon=case.epsilon))
    shape = (1, CASE_CHANNELS[0], 5, 5)
    graph = helper.make_graph(nodes, "case", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, CASE_CHANNELS[1], 5, 5))],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return fusion_ir.Model(model), shape


def onnx_new_nonfinite_constants(original, fused) -> list[str]:
    before = {t.name for t in original.graph.initializer}
    return [name for name in onnx_nonfinite_constants(fused) if name not in before]


@pytest.mark.parametrize("case", COMMON_CASES, ids=lambda case: case.name)
def test_onnx_adversarial_numbers(case):
    model, shape = build_onnx_case(case)
    feeds = {"x": case_input(case, shape)}

    result = fusion_ir.fuse(model, verify=False)

    onnx.checker.check_model(result.graph_def, full_check=True)
    expected = run_onnx(model.graph_def, feeds, ["y"])
    actual = run_onnx(result.graph_def, feeds, ["y"])
    check_case_result(case, result, "anchor", ["y"], expected, actual,
                      onnx_new_nonfinite_constants(model.graph_def, result.graph_def))
