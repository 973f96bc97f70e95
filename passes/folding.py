"""Folding math, apart from any graph: per-channel scale and shift into a weight and a bias.

For an operator y = conv(x, W) + b followed by z = y * s + t, where s and t vary only along the
output channel, z = conv(x, W * s) + (b * s + t). BatchNorm in inference mode is that affine map with
s = gamma / sqrt(var + eps) and t = beta - mean * s. A channel maps onto one weight axis, or onto
several consecutive axes flattened in row-major order (DepthwiseConv2dNative's [H, W, C, M] filter
has output channel c * M + m on axes 2 and 3).

The scale is computed in float64. The weight is multiplied in its own dtype when that is float32 or
float64 (one read and one write of the weight), and in float32 for float16 and bfloat16; results are
stored in the weight's dtype. Inputs are never modified: every result is a new array.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class FoldError(ValueError):
    """The fold would produce a non-finite or ill-shaped result; the message is the skip reason."""


def bn_scale_shift(gamma, beta, mean, variance, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the float64 per-channel (scale, shift) of an inference-mode BatchNorm."""
    var = np.asarray(variance, dtype=np.float64) + np.float64(epsilon)
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(var)
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * scale
    return scale, shift


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def scale_weight(weight: np.ndarray, scale: np.ndarray, channel_axes: tuple[int, ...],
                 view_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return weight * scale, where output channel k lies on the flattened `channel_axes` of weight.

    With `view_shape`, the axes refer to the weight reshaped to that shape (ONNX ConvTranspose with
    groups views [Cin, Cout/g, ...] as [g, Cin/g, Cout/g, ...], channels on axes 0 and 2). The axes are
    increasing; channel k is their row-major flattening.
    """
    original_shape = weight.shape
    if view_shape is not None:
        weight = weight.reshape(view_shape)
    dims = [weight.shape[a] for a in channel_axes]
    if int(np.prod(dims)) != scale.size:
        raise FoldError(f"the weight has {int(np.prod(dims))} output channels but the scale has {scale.size}")
    if list(channel_axes) != sorted(set(channel_axes)):
        raise ValueError(f"channel axes {channel_axes} must be increasing")
    shape = [1] * weight.ndim
    for axis, dim in zip(channel_axes, dims):
        shape[axis] = dim
    compute = _compute_dtype(weight.dtype)
    factor = scale.astype(compute).reshape(shape)
    if weight.dtype == compute:
        result = np.multiply(weight, factor, out=np.empty(weight.shape, dtype=weight.dtype))
    else:
        with np.errstate(over="ignore"):
            result = np.multiply(weight.astype(compute), factor).astype(weight.dtype)
    _check_underflow(weight, factor, result)
    # |scale| <= 1 cannot overflow; otherwise check, and for float16/bfloat16 always (cheap at that size).
    might_overflow = weight.dtype.itemsize <= 2 or float(np.max(np.abs(scale), initial=0.0)) > 1.0
    if might_overflow and not np.isfinite(result.astype(np.float32, copy=False)).all():
        if np.isfinite(weight.astype(np.float32, copy=False)).all():
            raise FoldError(f"the folded weight overflows {weight.dtype}")
    return result.reshape(original_shape)


def _check_underflow(weight: np.ndarray, factor: np.ndarray, result: np.ndarray) -> None:
    """Raise FoldError when nonzero products fall below the dtype's smallest normal number.

    Such products are subnormal or zero and lose the precision the unfused op keeps (it multiplies
    after summing). Only a tiny scale can cause that, so the weight is scanned only then.
    """
    threshold = 2.0**-20 if weight.dtype.itemsize >= 4 else 2.0**-4
    nonzero = np.abs(factor[factor != 0])
    if nonzero.size == 0 or float(nonzero.min()) >= threshold:
        return
    tiny = float(_finfo(weight.dtype).tiny)
    lost = (np.abs(result.astype(np.float32, copy=False)) < tiny) & (weight != 0) & (factor != 0)
    if lost.any():
        raise FoldError(f"the folded weight underflows {weight.dtype}: products below its smallest normal "
                        f"number would lose precision")


def _finfo(dtype: np.dtype):
    if dtype.name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def fold_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return bias * scale + shift (bias 0 when absent), computed in float64 and stored as `dtype`."""
    folded = shift.copy() if bias is None else np.asarray(bias, dtype=np.float64) * scale + shift
    with np.errstate(over="ignore"):
        result = folded.astype(dtype)
    if not np.isfinite(result.astype(np.float32)).all():
        raise FoldError(f"the folded bias overflows {np.dtype(dtype)}")
    return result
