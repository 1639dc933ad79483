"""Normalization and the batch-norm step (Ioffe & Szegedy, 2015).

For features ``x`` with per-feature ``mean`` and ``var``::

    y = (x - mean) / sqrt(var + epsilon) * scale + bias

In training the statistics are those of the batch and the running averages
move towards them::

    new.mean = momentum * old.mean + (1 - momentum) * batch_mean
    new.var  = momentum * old.var  + (1 - momentum) * batch_var   (biased)

``momentum`` weighs the old value, as in Flax and Keras (PyTorch's
``momentum=0.1`` is our ``0.9``).
"""

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _fused
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._state import BatchNormState

Implementation = Literal["fused", "reference"]
IMPLEMENTATIONS = ("fused", "reference")


def _broadcastable(value, ndim: int, feature_axes: tuple[int, ...], dtype):
  """Reshapes a feature-shaped array so that it broadcasts against the input."""
  if value is None:
    return None
  shape = [1] * ndim
  for i, ax in enumerate(feature_axes):
    shape[ax] = jnp.shape(value)[i]
  return jnp.asarray(value, dtype).reshape(shape)


def _check_common(x, axis, scale, bias, epsilon):
  """Checks shared by `normalize` and `batch_norm`; returns (x, feature_axes, feature_shape)."""
  _validation.check_input(x)
  x = jnp.asarray(x)
  feature_axes = _validation.canonicalize_axes(axis, x.ndim)
  feature_shape = _stats.feature_shape(x.shape, feature_axes)
  _validation.check_per_feature(scale, feature_shape, "scale")
  _validation.check_per_feature(bias, feature_shape, "bias")
  _validation.check_fraction(epsilon, "epsilon", 0.0, float("inf"))
  return x, feature_axes, feature_shape


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    axis: _validation.Axis = -1,
    epsilon: float | jax.Array = 1e-5,
) -> jax.Array:
  """Normalizes ``x`` with given statistics: ``(x - mean) * rsqrt(var + eps) * scale + bias``.

  Args:
    x: floating-point array, e.g. ``(N, H, W, C)``.
    mean: per-feature mean, of the feature shape (``x.shape`` at ``axis``).
    var: per-feature variance, of the feature shape.
    scale: optional per-feature scale (gamma); ``None`` means 1.
    bias: optional per-feature offset (beta); ``None`` means 0.
    axis: the feature axis or axes (negative values count from the end).
    epsilon: added to ``var`` before the square root; a float >= 0 or a scalar.

  Returns:
    ``y``, of the shape and dtype of ``x``; the arithmetic runs in at least
    float32.

  Raises:
    TypeError: if ``x`` or a statistic is not floating point.
    ValueError: if ``axis`` is out of range or repeated, or a per-feature array
      does not have the feature shape.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]), jnp.array([1.0]), epsilon=0.0)
    Array([[-1.],
           [ 1.]], dtype=float32)
  """
  x, feature_axes, feature_shape = _check_common(x, axis, scale, bias, epsilon)
  _validation.check_per_feature(mean, feature_shape, "mean")
  _validation.check_per_feature(var, feature_shape, "var")
  dtype = _stats.compute_dtype(x.dtype)
  mean, var, scale, bias = (
      _broadcastable(v, x.ndim, feature_axes, dtype) for v in (mean, var, scale, bias)
  )
  mul = lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  y = (x.astype(dtype) - mean) * mul
  if bias is not None:
    y = y + bias
  return y.astype(x.dtype)


def update_running_stats(
    state: BatchNormState, mean: jax.Array, var: jax.Array, momentum
) -> BatchNormState:
  """One exponential-moving-average step; no gradient flows into the result."""
  mean, var = (jnp.asarray(v, state.mean.dtype).reshape(state.mean.shape) for v in (mean, var))
  new_state = BatchNormState(
      mean=momentum * state.mean + (1 - momentum) * mean,
      var=momentum * state.var + (1 - momentum) * var,
      count=state.count + 1,
  )
  return jax.tree.map(
      lambda new, old: lax.stop_gradient(new).astype(old.dtype), new_state, state
  )


def _normalize_with_batch_stats(
    x, feature_axes, scale, bias, epsilon, mask, axis_name, axis_index_groups, implementation
):
  """Returns ``(y, mean, var)`` with the statistics of the (global) batch."""
  moments = _stats.global_moments(
      x, feature_axes, mask, axis_name, axis_index_groups, implementation=implementation
  )
  mean, var = moments.mean, moments.var
  scale, bias = (_broadcastable(v, x.ndim, feature_axes, x.dtype) for v in (scale, bias))
  rstd = lax.rsqrt(var + epsilon)
  if implementation == "reference":
    y = (x - moments.shift - moments.delta) * rstd  # = (x - mean) * rstd, unrounded
    if scale is not None:
      y = y * scale
    if bias is not None:
      y = y + bias
  else:
    # y = (x - K) a + b with a = scale * rstd and b = bias - (mean - K) a.
    a = rstd if scale is None else rstd * scale
    b = -moments.delta * a
    if bias is not None:
      b = b + bias
    y = _fused.shifted_affine(x, moments.shift, a, b)
  return y, mean, var


def batch_norm(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    axis: _validation.Axis = -1,
    momentum: float | jax.Array = 0.99,
    epsilon: float | jax.Array = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    implementation: Implementation = "fused",
) -> tuple[jax.Array, BatchNormState]:
  """One batch-norm step: normalize ``x`` and return the next running statistics.

  Training (``training=True``) normalizes with the statistics of the batch
  (see ``batch_stats``) and updates the running averages::

      y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias
      new.mean = momentum * state.mean + (1 - momentum) * mean_B
      new.var  = momentum * state.var  + (1 - momentum) * var_B
      new.count = state.count + 1

  Inference (``training=False``) normalizes with ``state.mean`` and
  ``state.var`` and returns ``state`` unchanged, so a loop threads the state
  the same way in both modes. No gradient flows into the new state.

  Args:
    x: floating-point array, e.g. ``(N, H, W, C)`` or ``(N, C, H, W)``.
    state: the running statistics, from ``init_state(feature_shape)``.
    scale: optional per-feature scale (gamma), of the feature shape.
    bias: optional per-feature offset (beta), of the feature shape.
    training: keyword-only Python bool: batch statistics and an update (True),
      or the running statistics (False).
    axis: the feature axis or axes, which are kept; statistics are taken over
      all the others (``axis=1`` for NCHW).
    momentum: the weight of the old running value, in [0, 1].
    epsilon: added to the variance before the square root, >= 0.
    mask: optional boolean array broadcastable to ``x``; in training, entries
      where it is False do not count towards the statistics (all entries are
      still normalized).
    axis_name: optional mapped axis name (or tuple of names) over which the
      batch is split; the statistics are then those of the whole batch.
    axis_index_groups: optional groups of indices along ``axis_name`` that
      take their statistics separately.
    implementation: ``"fused"`` (default) differentiates with custom rules that
      keep only ``x`` and per-feature values for the backward pass;
      ``"reference"`` is the textbook formula under plain autodiff.

  Returns:
    ``(y, new_state)``: ``y`` of the shape and dtype of ``x``; ``new_state``
    with the structure and dtypes of ``state``.

  Raises:
    TypeError: if ``x`` is not floating point, ``training`` is not a bool or
      ``state`` is not a ``BatchNormState``.
    ValueError: if ``axis`` is out of range or repeated; ``state``, ``scale``
      or ``bias`` do not have the feature shape; ``mask`` does not broadcast;
      ``momentum`` or ``epsilon`` are out of range; or training sees a single
      entry per feature.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, state = jaxbn.batch_norm(x, jaxbn.init_state(2), training=True, momentum=0.9)
    >>> state.mean
    Array([0.2, 0.4], dtype=float32)
  """
  if not isinstance(training, bool | jnp.bool_):
    raise TypeError(
        f"`training` must be a Python bool, got {training!r}; it selects the "
        "computation at trace time, so pass it as a static argument under jit."
    )
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
    )
  x, feature_axes, feature_shape = _check_common(x, axis, scale, bias, epsilon)
  _validation.check_state(state, feature_shape)
  _validation.check_mask(mask, x.shape)
  _validation.check_fraction(momentum, "momentum", 0.0, 1.0)
  if not training:
    y = normalize(x, state.mean, state.var, scale, bias, axis=feature_axes, epsilon=epsilon)
    return y, state
  entries_per_feature = x.size // max(1, jnp.size(state.mean))
  if axis_name is None and mask is None and entries_per_feature == 1:
    raise ValueError(
        f"training batch norm needs more than one value per feature, but `x` of "
        f"shape {x.shape} with `axis`={axis!r} has a single one (its variance "
        "would be 0); use a larger batch, `training=False`, or `axis_name` to "
        "take statistics across devices."
    )
  y, mean, var = _normalize_with_batch_stats(
      x.astype(_stats.compute_dtype(x.dtype)),
      feature_axes,
      scale,
      bias,
      epsilon,
      mask,
      axis_name,
      axis_index_groups,
      implementation,
  )
  return y.astype(x.dtype), update_running_stats(state, mean, var, momentum)
