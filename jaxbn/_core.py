"""Normalization and the batch-norm step (Ioffe & Szegedy, 2015).

For features ``x`` with per-feature ``mean`` and ``var``::

    y = (x - mean) / sqrt(var + epsilon) * scale + bias

In training the statistics are those of the batch and the running averages
move towards them::

    new.mean = momentum * old.mean + (1 - momentum) * batch_mean
    new.var  = momentum * old.var  + (1 - momentum) * batch_var   (biased)

``momentum`` weighs the old value, as in Flax and Keras (PyTorch's
``momentum=0.1`` is our ``0.9``); ``update_running_stats`` also offers the
zero-debiased and the cumulative average and PyTorch's unbiased variance.

``batch_norm`` is written as the steps of the algorithm, in the order they
happen, each a small function below it:

1. ``_settings``: check the arguments and resolve the static settings once;
2. ``_ghost_batch``: shape the batch (ghost batches become a kept group axis);
3. ``_batch_moments``: the moments of this device's shard, then of all
   devices, completed with the running statistics where a feature has no
   valid entry;
4. ``_coefficients``: the per-feature ``a, b`` of ``z = act((x - K) a + b + r)``,
   with Batch Renormalization's correction (``_renormalized``);
5. the apply, ``ops.shifted_affine`` of the chosen implementation
   (``_implementations``); In-Place ABN (``_inplace``) takes steps 3-5 together,
   since its backward pass recovers ``x`` from the output;
6. ``_next_state``: the running averages (EMA, debiased, cumulative, renorm's),
   skipping non-finite batches and keeping features the batch did not see.

The implementation switch acts on the local pieces only (``_implementations``);
a variant changes one step: renorm the coefficients, ghost batches the shape,
the averagings the next state, the activation and residual the apply.
"""

import functools
import math
import warnings
from numbers import Real
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _activation, _implementations, _inplace, _renorm, _stats, _validation
from jaxbn._implementations import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxbn._implementations import Implementation, LocalOps
from jaxbn._state import BatchNormState


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
    TypeError: if ``x`` or a statistic is not floating point, or ``mean`` or
      ``var`` is None.
    ValueError: if ``axis`` is out of range or repeated, a per-feature array
      does not have the feature shape, or ``epsilon`` is negative or not a
      scalar.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> jaxbn.normalize(jnp.array([[1.0], [3.0]]), jnp.array([2.0]), jnp.array([1.0]), epsilon=0.0)
    Array([[-1.],
           [ 1.]], dtype=float32)
  """
  x, feature_axes, feature_shape = _check_common(x, axis, scale, bias, epsilon)
  _validation.check_per_feature(mean, feature_shape, "mean", required=True)
  _validation.check_per_feature(var, feature_shape, "var", required=True)
  ops = _implementations.resolve("auto", batch_stats=False)
  return _normalize(x, feature_axes, mean, var, scale, bias, epsilon, ops)


def _normalize(
    x, feature_axes, mean, var, scale, bias, epsilon, ops, activation=None, negative_slope=0.0,
    residual=None,
) -> jax.Array:
  """``act(normalize(x) + residual)`` without the checks, in the dtype of ``x``.

  Written as ``(x - K) a + b`` with ``K`` the mean without its gradient and
  ``b = bias - (mean - K) a`` (which is ``bias``, with the mean's gradient), so
  that reverse mode keeps only ``x`` and per-feature values (see ``_fused``).
  """
  dtype = _stats.compute_dtype(x.dtype)
  mean, var, scale, bias = (
      _broadcastable(v, x.ndim, feature_axes, dtype) for v in (mean, var, scale, bias)
  )
  shift = lax.stop_gradient(mean)
  a = lax.rsqrt(var + epsilon)
  if scale is not None:
    a = a * scale
  b = -(mean - shift) * a
  if bias is not None:
    b = b + bias
  return ops.shifted_affine(x.astype(dtype), x, shift, a, b, residual, activation, negative_slope)


Averaging = Literal["ema", "debiased_ema", "cumulative"]
AVERAGINGS = ("ema", "debiased_ema", "cumulative")


def _check_averaging(momentum, averaging, unbiased_var, batch_count, skip_nonfinite, stacklevel):
  """Trace-time checks of the running-average settings; warns on a PyTorch-style momentum."""
  if averaging not in AVERAGINGS:
    raise ValueError(f"`averaging` must be one of {AVERAGINGS}, got {averaging!r}.")
  for name, flag in (("unbiased_var", unbiased_var), ("skip_nonfinite", skip_nonfinite)):
    if not isinstance(flag, bool):
      raise TypeError(f"`{name}` must be a Python bool, got {flag!r}.")
  if unbiased_var and batch_count is None:
    raise ValueError(
        "`unbiased_var=True` needs `batch_count`, the number of entries per feature "
        "behind the batch variance, to fold in `var * n / (n - 1)`."
    )
  _validation.check_fraction(momentum, "momentum", 0.0, 1.0)
  if averaging == "ema" and isinstance(momentum, Real) and 0 < momentum < 0.5:
    warnings.warn(
        f"`momentum`={momentum} puts less than half the weight on the old running "
        f"value. jaxbn's momentum weighs the old value (as in Flax and Keras): "
        f"PyTorch's momentum={momentum} is jaxbn's momentum={round(1 - momentum, 12)}.",
        UserWarning,
        stacklevel=stacklevel,
    )


def update_running_stats(
    state: BatchNormState,
    mean: ArrayLike,
    var: ArrayLike,
    *,
    momentum: float | jax.Array = 0.99,
    averaging: Averaging = "ema",
    unbiased_var: bool = False,
    batch_count: ArrayLike | None = None,
    skip_nonfinite: bool = False,
) -> BatchNormState:
  """Moves the running statistics towards a batch's ``mean`` and ``var``.

  With ``t = state.count + 1`` and ``s`` standing for ``mean`` or ``var``::

      "ema":           new.s = momentum * old.s + (1 - momentum) * batch_s
      "debiased_ema":  new.s = old.s + (batch_s - old.s) * (1 - momentum) / (1 - momentum**t)
      "cumulative":    new.s = old.s + (batch_s - old.s) / t
      new.count = t

  ``"ema"`` is the Flax and Keras convention: ``momentum`` weighs the old
  value (PyTorch's ``momentum=0.1`` is our ``0.9``). ``"debiased_ema"`` stores
  the zero-debiased average of haiku's ``ExponentialMovingAverage`` (and
  Adam's moments): the biased average divided by ``1 - momentum**t``, so the
  first update equals the batch and the initial value leaves no trace (at
  ``momentum=1`` it is the cumulative average). ``"cumulative"`` is the plain
  average of all batches so far, PyTorch's ``momentum=None``; ``momentum`` is
  then unused.

  With ``unbiased_var=True`` the batch variance folded in is
  ``var * n / (n - 1)`` with ``n = batch_count``, as PyTorch stores it (the
  batch itself is normalized with the biased ``var``).

  With ``skip_nonfinite=True``, a batch whose ``mean`` or ``var`` holds a NaN
  or an infinity leaves the whole state unchanged, ``count`` included, so a
  caller sees a skipped update as ``new.count == state.count``.

  No gradient flows into the result.

  Args:
    state: the running statistics.
    mean: the batch mean, of the feature shape.
    var: the biased batch variance, of the feature shape.
    momentum: the weight of the old value in [0, 1] (``"ema"``,
      ``"debiased_ema"``). A Python float below 0.5 with ``"ema"`` warns: it
      is most likely a PyTorch momentum (0 is taken as deliberate).
    averaging: ``"ema"``, ``"debiased_ema"`` or ``"cumulative"``.
    unbiased_var: fold the unbiased batch variance into ``var``.
    batch_count: ``n``, the number of entries per feature behind ``var``: a
      scalar or an array of the feature shape (with masks it differs between
      features). Required with ``unbiased_var=True``.
    skip_nonfinite: leave the state unchanged when the batch statistics are
      not all finite.

  Returns:
    The new ``BatchNormState``, with the structure and dtypes of ``state``.

  Raises:
    ValueError: if ``averaging`` is unknown, ``momentum`` lies outside [0, 1],
      ``unbiased_var`` comes without ``batch_count``, or ``mean``/``var`` do
      not have the feature shape.
    TypeError: if ``unbiased_var`` or ``skip_nonfinite`` is not a Python bool.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> state = jaxbn.init_state(1)
    >>> for batch_mean in (1.0, 3.0):
    ...   state = jaxbn.update_running_stats(
    ...       state, jnp.array([batch_mean]), jnp.array([1.0]), averaging="cumulative")
    >>> state.mean, state.count
    (Array([2.], dtype=float32), Array(2, dtype=int32))
  """
  _check_averaging(momentum, averaging, unbiased_var, batch_count, skip_nonfinite, stacklevel=2)
  feature_shape = jnp.shape(state.mean)
  for name, value in (("mean", mean), ("var", var)):
    _validation.check_per_feature(value, feature_shape, name)
  if batch_count is not None and jnp.shape(batch_count) not in ((), feature_shape):
    raise ValueError(
        f"`batch_count` must be a scalar or of the feature shape {feature_shape}, got "
        f"shape {jnp.shape(batch_count)}."
    )
  return _update_running_stats(
      state, mean, var, momentum, averaging, unbiased_var, batch_count, skip_nonfinite
  )


def _update_running_stats(
    state, mean, var, momentum, averaging, unbiased_var, batch_count, skip_nonfinite
) -> BatchNormState:
  """``update_running_stats`` without the checks."""
  dtype = state.mean.dtype
  mean, var = (jnp.asarray(v, dtype).reshape(state.mean.shape) for v in (mean, var))
  if unbiased_var:
    n = jnp.asarray(batch_count, dtype)
    var = var * n / jnp.maximum(n - 1, 1)  # n <= 1 leaves `var` (0 there) as it is.
  t = state.count + 1
  if averaging == "ema":
    keep = momentum
  elif averaging == "debiased_ema":
    # keep = 1 - (1 - m) / (1 - m^t) = m (1 - m^(t-1)) / (1 - m^t): exactly 0 at t = 1.
    momentum = jnp.asarray(momentum, dtype)
    powered = momentum ** (t - 1).astype(dtype)
    debias = 1 - powered * momentum
    safe = jnp.where(debias > 0, debias, 1)
    keep = jnp.where(debias > 0, momentum * (1 - powered) / safe, 1 - 1 / t.astype(dtype))
  else:
    keep = 1 - 1 / t.astype(dtype)
  new_state = state._replace(
      mean=keep * state.mean + (1 - keep) * mean,
      var=keep * state.var + (1 - keep) * var,
      count=t,
  )
  if skip_nonfinite:
    new_state = _skip_nonfinite(new_state, state, BatchNormState(mean, var, t))
  return jax.tree.map(
      lambda new, old: lax.stop_gradient(new).astype(old.dtype), new_state, state
  )


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
    implementation: Implementation = "auto",
    use_batch_stats: bool | None = None,
    update_stats: bool | None = None,
    averaging: Averaging = "ema",
    unbiased_var: bool = False,
    skip_nonfinite: bool = False,
    activation: _activation.Activation = None,
    negative_slope: float = 0.01,
    residual: ArrayLike | None = None,
    inplace: bool = False,
    renorm: _renorm.Renorm | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[jax.Array, BatchNormState]:
  """One batch-norm step: normalize ``x`` and return the next running statistics.

  Training (``training=True``) normalizes with the statistics of the batch
  (see ``batch_stats``) and updates the running averages (see
  ``update_running_stats`` for the other ``averaging`` conventions)::

      y = (x - mean_B) / sqrt(var_B + epsilon) * scale + bias
      new.mean = momentum * state.mean + (1 - momentum) * mean_B
      new.var  = momentum * state.var  + (1 - momentum) * var_B
      new.count = state.count + 1

  Inference (``training=False``) normalizes with ``state.mean`` and
  ``state.var`` and returns ``state`` unchanged, so a loop threads the state
  the same way in both modes. No gradient flows into the new state.

  An ``activation`` and a ``residual`` ``r`` (of the shape of ``x``) fuse into
  the same passes, forward and backward (cuDNN's BN-add-ReLU)::

      z = act(y + r)     relu(u) = max(u, 0)     leaky_relu(u) = u if u > 0 else s u

  with ``s = negative_slope``. The backward pass (of every implementation
  but ``"reference"``) reads ``x``, the output ``z`` and the incoming
  gradient, and keeps nothing else of size ``x``: the activation's derivative
  is read off the sign of ``z``.

  ``inplace=True`` is In-Place Activated BatchNorm (Rota Bulò et al., 2018):
  with an invertible activation (``None``, or ``"leaky_relu"`` with a positive
  slope) reverse mode keeps the output ``z`` instead of ``x``, and recovers
  ``x_hat = (act^-1(z) - r - bias) / scale`` in the backward pass. In a network
  the output is kept anyway as the next layer's input, so each batch norm
  stops holding an activation-sized buffer of its own. Every ``scale`` entry
  must then be nonzero.

  ``renorm=Renorm(r_max, d_max, ...)`` is Batch Renormalization (Ioffe, 2017)
  with the statistics of a ``RenormState`` (see ``Renorm`` and
  ``init_renorm_state``): in training, ``y = ((x - mean_B) / sigma_B * r + d)
  * scale + bias`` with ``r``, ``d`` (no gradient) pulling the batch
  statistics towards the moving ones, as Keras 3's ``renorm=True`` does.

  ``virtual_batch_size=V`` is ghost batch normalization (Hoffer et al., 2017):
  the batch axis 0 is cut into ``G = N / V`` contiguous groups
  ``x[g V:(g + 1) V]``, each normalized with its own statistics. The running
  statistics move towards the average over the groups of their means and of
  their (biased, or with ``unbiased_var`` unbiased) variances, as tf.keras does
  (tf.keras groups the strided entries ``x[g::G]`` instead; with shuffled data
  the two are alike). With ``renorm``, ``r`` and ``d`` come from these
  averages; with ``axis_name``, group ``g`` gathers the ``g``-th group of
  every device.

  ``training`` is the shorthand for two switches, which override it when
  given: ``use_batch_stats`` (normalize with the batch statistics rather than
  the running ones) and ``update_stats`` (return updated running statistics).

  ==================  ===============  ============  ===========================
  use_batch_stats     update_stats     same as       use
  ==================  ===============  ============  ===========================
  True                True             training      training
  False               False            inference     frozen BN (fine-tuning)
  True                False                          batch statistics, state kept
  False               True                           running statistics used,
                                                     updated (calibration)
  ==================  ===============  ============  ===========================

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
      still normalized). A feature without any valid entry in the batch (all
      devices together) has no batch statistics: it is normalized with the
      running ones, which it leaves unchanged.
    axis_name: optional mapped axis name (or tuple of names) over which the
      batch is split; the statistics are then those of the whole batch.
    axis_index_groups: optional groups of indices along ``axis_name`` that
      take their statistics separately.
    implementation: ``"auto"`` (default) is ``"kernel"`` on CPU where jaxbn's
      compiled kernels loaded (``jaxbn.kernels_available()``) and ``"fused"``
      elsewhere, and also where the step only normalizes with the running
      statistics (inference: one elementwise pass, which XLA fuses with the
      layers around it). ``"kernel"`` runs the statistics and the apply as compiled
      one-pass CPU kernels; ``"fused"`` as XLA's fusions; both differentiate
      with custom rules that keep only ``x`` and per-feature values for the
      backward pass. ``"reference"`` computes the same pieces under plain
      autodiff.
    use_batch_stats: Python bool overriding ``training`` for the statistics
      that normalize ``x``.
    update_stats: Python bool overriding ``training`` for the update of the
      running statistics.
    averaging: ``"ema"`` (default), ``"debiased_ema"`` or ``"cumulative"``;
      see ``update_running_stats``.
    unbiased_var: fold the unbiased batch variance ``var_B * n / (n - 1)``
      into the running variance (PyTorch), ``n`` the number of valid entries
      per feature in the whole batch; ``x`` is still normalized with ``var_B``.
    skip_nonfinite: leave the state unchanged (``count`` included) when the
      batch statistics are not all finite.
    activation: ``None`` (default), ``"relu"`` or ``"leaky_relu"``, applied
      after the residual add.
    negative_slope: the slope ``s >= 0`` of ``"leaky_relu"`` for negative
      inputs, a Python float (0.01 as in ``jax.nn.leaky_relu``).
    residual: optional array of the shape of ``x`` added to the normalized
      features before the activation (a ResNet shortcut).
    inplace: Python bool; the memory-saving backward pass of In-Place ABN
      (keeps the output and the residual, not ``x``) for batch statistics.
    renorm: ``None``, or the ``Renorm`` settings of batch renormalization;
      ``state`` must then be a ``RenormState``, and ``averaging`` and
      ``unbiased_var`` keep their defaults.
    virtual_batch_size: ``None``, or a Python int dividing ``x.shape[0]``: the
      size of the ghost batches normalized separately.

  Returns:
    ``(y, new_state)``: ``y`` of the shape and dtype of ``x``; ``new_state``
    with the structure and dtypes of ``state``.

  Raises:
    TypeError: if ``x`` is not floating point, ``training``,
      ``use_batch_stats`` or ``update_stats`` is not a bool, or ``state`` is
      not a ``BatchNormState``.
    ValueError: if ``axis`` is out of range or repeated; ``state``, ``scale``
      or ``bias`` do not have the feature shape; ``mask`` does not broadcast;
      ``momentum`` or ``epsilon`` are out of range or not scalars; ``averaging`` or
      ``activation`` is unknown; ``negative_slope`` is negative; ``residual``
      does not have the shape of ``x``; ``inplace=True`` comes with ``"relu"``
      or the ``"reference"`` implementation; ``renorm`` has ``r_max < 1``,
      ``d_max < 0``, ``r_min`` outside [0, 1] or comes with another averaging;
      ``virtual_batch_size`` does not divide the batch or axis 0 is a feature
      axis; or batch statistics are asked of a single entry per feature.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, state = jaxbn.batch_norm(x, jaxbn.init_state(2), training=True, momentum=0.9)
    >>> state.mean
    Array([0.2, 0.4], dtype=float32)

    Frozen batch norm, e.g. to fine-tune a pretrained network:

    >>> y, same = jaxbn.batch_norm(
    ...     x, state, training=True, use_batch_stats=False, update_stats=False)
    >>> same is state
    True
  """
  settings = _settings(
      x, state, scale, bias, training=training, axis=axis, momentum=momentum, epsilon=epsilon,
      mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
      implementation=implementation, use_batch_stats=use_batch_stats,
      update_stats=update_stats, averaging=averaging, unbiased_var=unbiased_var,
      skip_nonfinite=skip_nonfinite, activation=activation, negative_slope=negative_slope,
      residual=residual, inplace=inplace, renorm=renorm, virtual_batch_size=virtual_batch_size,
  )
  x = jnp.asarray(x)
  if residual is not None:
    residual = jnp.asarray(residual)  # cast where it is read, so no copy is kept.
  if not (settings.use_batch_stats or settings.update_stats):
    return _normalize_with_running_stats(x, state, scale, bias, epsilon, residual, settings), state
  batch = _ghost_batch(x, mask, residual, settings)
  if settings.use_batch_stats:
    y, moments = _normalize_with_batch_stats(batch, state, scale, bias, epsilon, renorm, settings)
    y = y.reshape(x.shape)
  else:  # calibration: normalize with the running statistics, update them with the batch's
    y = _normalize_with_running_stats(x, state, scale, bias, epsilon, residual, settings)
    moments = _batch_moments(lax.stop_gradient(batch.x), batch, state, settings)
  new_state = state
  if settings.update_stats:
    new_state = _next_state(state, moments, batch, settings, momentum, epsilon, renorm)
  return y.astype(x.dtype), new_state


# 1. Settings: everything static about a call, checked once while tracing.


class _Settings(NamedTuple):
  """The static settings of one ``batch_norm`` call: Python values, resolved and checked.

  Arrays (``x``, ``state``, ``scale``, ``bias``, ``mask``, ``residual``) and the
  values that may be traced (``momentum``, ``epsilon``, ``renorm``'s bounds)
  travel apart.
  """

  feature_axes: tuple[int, ...]  # the axes of x that the statistics keep, sorted
  use_batch_stats: bool  # normalize with the batch statistics (else the running ones)
  update_stats: bool  # return updated running statistics
  ops: LocalOps  # the implementation of the local pieces
  activation: _activation.Activation
  negative_slope: float
  inplace: bool  # In-Place ABN's backward pass
  averaging: Averaging
  unbiased_var: bool
  skip_nonfinite: bool
  renorm: bool  # Batch Renormalization (its settings travel as `renorm`)
  groups: int | None  # the number of ghost batches along axis 0
  axis_name: Any
  axis_index_groups: Any


def _settings(
    x, state, scale, bias, *, training, axis, momentum, epsilon, mask, axis_name,
    axis_index_groups, implementation, use_batch_stats, update_stats, averaging, unbiased_var,
    skip_nonfinite, activation, negative_slope, residual, inplace, renorm, virtual_batch_size,
) -> _Settings:
  """Checks the arguments of ``batch_norm`` (see its Raises) and resolves its settings."""
  use_batch_stats, update_stats = _resolve_switches(training, use_batch_stats, update_stats)
  ops = _implementations.resolve(implementation, batch_stats=use_batch_stats or update_stats)
  x, feature_axes, feature_shape = _check_common(x, axis, scale, bias, epsilon)
  _validation.check_state(state, feature_shape)
  _validation.check_mask(mask, x.shape)
  _validation.check_fraction(momentum, "momentum", 0.0, 1.0)
  if update_stats:
    _check_averaging(momentum, averaging, unbiased_var, True, skip_nonfinite, stacklevel=4)
  _activation.check(activation, negative_slope, residual, x.shape)
  if not isinstance(inplace, bool):
    raise TypeError(f"`inplace` must be a Python bool, got {inplace!r}.")
  if inplace:
    _inplace.check(activation, negative_slope, implementation)
  if renorm is not None:
    _renorm.check(renorm, state)
    if averaging != "ema" or unbiased_var:
      raise ValueError(
          "batch renormalization keeps Keras's moving averages: `averaging` must be 'ema' "
          f"and `unbiased_var` False, got {averaging!r} and {unbiased_var}."
      )
  groups = _ghost_groups(virtual_batch_size, x.shape, feature_axes)
  if use_batch_stats or update_stats:
    _check_values_per_feature(
        x.shape, axis, feature_shape, groups, mask, axis_name, virtual_batch_size
    )
  return _Settings(
      feature_axes, use_batch_stats, update_stats, ops, activation, negative_slope, inplace,
      averaging, unbiased_var, skip_nonfinite, renorm is not None, groups, axis_name,
      axis_index_groups,
  )


def _resolve_switches(training, use_batch_stats, update_stats) -> tuple[bool, bool]:
  """``(use_batch_stats, update_stats)``, each defaulting to ``training``."""
  if not isinstance(training, bool | jnp.bool_):
    raise TypeError(
        f"`training` must be a Python bool, got {training!r}; it selects the "
        "computation at trace time, so pass it as a static argument under jit."
    )
  switches = []
  for name, value in (("use_batch_stats", use_batch_stats), ("update_stats", update_stats)):
    if value is None:
      value = bool(training)
    elif not isinstance(value, bool | jnp.bool_):
      raise TypeError(
          f"`{name}` must be a Python bool or None (then it follows `training`), got "
          f"{value!r}; pass it as a static argument under jit."
      )
    switches.append(bool(value))
  return switches[0], switches[1]


def _ghost_groups(virtual_batch_size, shape, feature_axes) -> int | None:
  """The number of ghost batches along axis 0, or None; checks ``virtual_batch_size``."""
  if virtual_batch_size is None:
    return None
  if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
    raise TypeError(
        f"`virtual_batch_size` must be a Python int or None, got {virtual_batch_size!r}."
    )
  if 0 in feature_axes:
    raise ValueError(
        f"`virtual_batch_size` splits axis 0, the batch axis, but `axis` makes axis 0 a "
        f"feature axis (feature axes {feature_axes} of an input of shape {shape})."
    )
  if virtual_batch_size < 1 or shape[0] % virtual_batch_size:
    raise ValueError(
        f"`virtual_batch_size`={virtual_batch_size} must be a positive divisor of the "
        f"batch size {shape[0]} (axis 0 of `x` with shape {shape}); pick another size, "
        "or pad or drop examples to a multiple of it."
    )
  return shape[0] // virtual_batch_size


def _check_values_per_feature(
    shape, axis, feature_shape, groups, mask, axis_name, virtual_batch_size
):
  """Batch statistics need more than one value per feature (else the variance is 0)."""
  entries_per_feature = math.prod(shape) // max(1, math.prod(feature_shape) * (groups or 1))
  # A symbolic batch size (jax.export) may be anything at run time: no check then.
  concrete = not jax.export.is_symbolic_dim(entries_per_feature)
  if axis_name is None and mask is None and concrete and entries_per_feature <= 1:
    raise ValueError(
        f"batch norm with batch statistics needs more than one value per feature, but `x` "
        f"of shape {shape} with `axis`={axis!r}"
        f"{'' if virtual_batch_size is None else f' in virtual batches of {virtual_batch_size}'}"
        f" has {'a single one' if entries_per_feature else 'none'} (its variance would be 0); "
        "use a larger batch, `training=False`, or `axis_name` to take statistics across "
        "devices."
    )


# 2. The batch as the statistics see it.


class _Batch(NamedTuple):
  """``x``, ``mask`` and ``residual`` as the statistics see them.

  With ghost batches ``(N, ...)`` becomes ``(G, N / G, ...)``, and the
  statistics keep the group axis 0 besides the feature axes.
  """

  x: jax.Array  # the caller's array (its dtype), reshaped
  mask: jax.Array | None
  residual: jax.Array | None
  feature_axes: tuple[int, ...]  # the axes the statistics keep (the group axis included)
  param_axes: tuple[int, ...]  # the axes of x that scale, bias and the state span

  def expand(self, value, dtype):
    """A feature-shaped ``value`` (or None) in ``dtype``, broadcastable against ``x``."""
    return _broadcastable(value, self.x.ndim, self.param_axes, dtype)


def _ghost_batch(x, mask, residual, settings: _Settings) -> _Batch:
  """The batch, cut into ``settings.groups`` contiguous ghost batches along axis 0 if any."""
  if settings.groups is None:
    return _Batch(x, mask, residual, settings.feature_axes, settings.feature_axes)
  shape = (settings.groups, -1) + x.shape[1:]
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape).reshape(shape)
  if residual is not None:
    residual = residual.reshape(shape)
  param_axes = tuple(a + 1 for a in settings.feature_axes)
  return _Batch(x.reshape(shape), mask, residual, (0,) + param_axes, param_axes)


# 3. The moments of the batch.


def _batch_moments(
    x, batch: _Batch, state, settings: _Settings, stored=None
) -> _stats.Moments:
  """The moments of the whole batch: this device's shard, then every device's (``_stats``).

  ``x`` is ``batch.x`` (read as stored), its ``stop_gradient``, or its
  conversion to the compute dtype with ``stored=batch.x``.
  """
  moments = _stats.global_moments(
      x, batch.feature_axes, batch.mask, settings.axis_name, settings.axis_index_groups,
      ops=settings.ops, stored=stored,
  )
  return _complete(moments, batch, state, settings)


def _complete(moments, batch: _Batch, state, settings: _Settings) -> _stats.Moments:
  """``moments`` with the running ``mean`` and ``var`` for the features without a valid entry.

  With a mask (or devices without data) a feature may have no valid entry in
  the batch, and no batch statistics; it is normalized with the running ones,
  which it then leaves as they are (see ``_keep_unseen``). ``count`` stays 0.
  """
  if batch.mask is None and settings.axis_name is None:  # every feature has entries
    return moments
  dtype = moments.m2.dtype
  mean, var = batch.expand(state.mean, dtype), batch.expand(state.var, dtype)
  empty = moments.count == 0
  return moments._replace(
      delta=jnp.where(empty, mean - moments.shift, moments.delta),
      m2=jnp.where(empty, var, moments.m2),
  )


# 4. The per-feature coefficients.


def _coefficients(moments, scale, bias, epsilon):
  """``(a, b)`` with ``y = (x - K) a + b``: ``a = scale * rstd``, ``b = bias - (mean - K) a``."""
  rstd = lax.rsqrt(moments.var + epsilon)
  a = rstd if scale is None else rstd * scale
  b = -moments.delta * a
  if bias is not None:
    b = b + bias
  return a, b


def _batch_coefficients(moments, scale, bias, batch: _Batch, state, epsilon, renorm, settings):
  """``(a, b)`` of the batch's moments; with renorm, of Batch Renormalization's affine map."""
  if settings.renorm:
    scale, bias = _renormalized(scale, bias, moments, batch, state, epsilon, renorm, settings)
  return _coefficients(moments, scale, bias, epsilon)


def _renormalized(scale, bias, moments, batch: _Batch, state, epsilon, renorm, settings):
  """Batch Renormalization's ``(r scale, d scale + bias)`` (see ``_renorm``)."""
  mean, var = _pooled(moments, settings.groups)
  expand = functools.partial(batch.expand, dtype=mean.dtype)
  r, d = _renorm.correction(renorm, state, mean, var, epsilon, expand, moments.count > 0)
  return (r if scale is None else r * scale), (
      (d if scale is None else d * scale) + (0 if bias is None else bias)
  )


def _pooled(moments, groups, unbiased=False):
  """The batch ``(mean, var)`` of renorm and the running averages (ghost batches: averaged)."""
  mean, var = moments.mean, moments.var
  if unbiased:
    var = var * moments.count / jnp.maximum(moments.count - 1, 1)
  if groups is not None:
    mean, var = jnp.mean(mean, 0, keepdims=True), jnp.mean(var, 0, keepdims=True)
  return mean, var


# 5. Apply: z = act((x - K) a + b + r).


def _normalize_with_running_stats(x, state, scale, bias, epsilon, residual, settings) -> jax.Array:
  return _normalize(
      x, settings.feature_axes, state.mean, state.var, scale, bias, epsilon, settings.ops,
      settings.activation, settings.negative_slope, residual,
  )


def _normalize_with_batch_stats(batch: _Batch, state, scale, bias, epsilon, renorm, settings):
  """``(z, moments)``: steps 3 to 5, with the moments of the (global) batch."""
  dtype = _stats.compute_dtype(batch.x.dtype)
  x = batch.x.astype(dtype)
  coefficients = functools.partial(
      _batch_coefficients, scale=batch.expand(scale, dtype), bias=batch.expand(bias, dtype),
      batch=batch, state=state, epsilon=epsilon, renorm=renorm, settings=settings,
  )
  if settings.inplace:
    z, moments = _inplace.normalize_with_batch_stats(
        settings.ops, x, batch.x, batch.feature_axes,
        lambda moments: coefficients(_complete(moments, batch, state, settings)),
        batch.mask, settings.axis_name, settings.axis_index_groups, settings.activation,
        settings.negative_slope, batch.residual,
    )
    return z, _complete(moments, batch, state, settings)
  moments = _batch_moments(x, batch, state, settings, stored=batch.x)
  a, b = coefficients(moments)
  z = settings.ops.shifted_affine(
      x, batch.x, moments.shift, a, b, batch.residual, settings.activation,
      settings.negative_slope,
  )
  return z, moments


# 6. The running statistics after this batch.


def _next_state(state, moments, batch: _Batch, settings: _Settings, momentum, epsilon, renorm):
  """The running averages moved towards the batch's statistics (``update_running_stats``)."""
  if settings.renorm:
    mean, var = _pooled(moments, settings.groups)
    new_state = _renorm.update(renorm, state, mean, var, momentum, epsilon)
    if settings.skip_nonfinite:
      new_state = _skip_nonfinite(new_state, state, BatchNormState(mean, var, None))
  else:
    mean, var = _pooled(moments, settings.groups, settings.unbiased_var)
    new_state = _update_running_stats(
        state, mean, var, momentum, settings.averaging, False, None, settings.skip_nonfinite
    )
  if batch.mask is None and settings.axis_name is None:  # every feature was seen
    return new_state
  seen = moments.count > 0
  if settings.groups is not None:
    seen = jnp.any(seen, 0)
  return _keep_unseen(new_state, state, seen.reshape(jnp.shape(state.mean)))


def _keep_unseen(new_state, state, seen):
  """``new_state`` for the features ``seen`` in the batch, ``state`` for the others."""
  return new_state._replace(**{
      name: jnp.where(seen, getattr(new_state, name), getattr(state, name))
      for name in state._fields
      if name != "count"
  })


def _skip_nonfinite(new_state, state, batch):
  """``new_state`` if ``batch.mean`` and ``batch.var`` are all finite, else ``state``."""
  finite = jnp.all(jnp.isfinite(batch.mean)) & jnp.all(jnp.isfinite(batch.var))
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)


