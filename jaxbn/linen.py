"""``jaxbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same attributes, same call signature, same variables (``params/scale``,
``params/bias``, ``batch_stats/mean``, ``batch_stats/var``, with Flax's shapes
and dtypes), so checkpoints made with Flax's module load unchanged. The math is
``jaxbn.batch_norm``: stable one-pass statistics whatever ``use_fast_variance``
says, count-weighted statistics across devices, and a backward pass that saves
only the input. Further attributes and call arguments, off by default, give the
variants of ``jaxbn.batch_norm`` (frozen batch norm, other running averages, a
fused activation and residual, In-Place ABN, Batch Renormalization, ghost
batches).

Two inputs that ``jaxbn.batch_norm`` refuses are handed to Flax's own
implementation so that existing models keep running: complex inputs, and
batch statistics of a single value per feature (then the variance is 0 and
the output is the bias alone; a ``UserWarning`` says so). Flax's
implementation has no variants: such an input with one raises a ``ValueError``.
"""

import jax.numpy as jnp

from jaxbn import _validation

_validation.require("flax", extra="flax", user="jaxbn.linen")

import flax.linen as nn  # noqa: E402
from flax import errors  # noqa: E402
from flax.linen import dtypes  # noqa: E402

from jaxbn import _activation, _core, _modules  # noqa: E402
from jaxbn._precise import recompute_stats as recompute_stats  # noqa: E402
from jaxbn._renorm import Renorm  # noqa: E402

# Initial values of the statistics, as in `init_state` and `init_renorm_state`.
_INITIAL = {
    "mean": jnp.zeros,
    "var": jnp.ones,
    "std": jnp.ones,
    "renorm_mean": jnp.zeros,
    "renorm_std": jnp.ones,
}


class BatchNorm(nn.BatchNorm):
  """Batch normalization (Ioffe & Szegedy, 2015) as a Flax linen module.

  Attributes are those of ``flax.linen.BatchNorm``: ``use_running_average``,
  ``axis`` (the feature axis or axes), ``momentum`` (weight of the old running
  value), ``epsilon``, ``dtype`` (of the output; by default the promotion of
  the input and the params), ``param_dtype``, ``use_bias``, ``use_scale``,
  ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``,
  ``use_fast_variance`` and ``force_float32_reductions``.

  The statistics are always the numerically stable one-pass ones, reduced in
  at least float32, so ``use_fast_variance`` has no effect and
  ``force_float32_reductions`` only sets the dtype of the stored statistics:
  float32 (default), or ``param_dtype`` when False, as in Flax.

  Then come the variants of ``jaxbn.batch_norm`` (its docstring has the math),
  whose defaults keep Flax's behaviour and variables:

  - ``averaging``: ``"ema"`` (default), ``"debiased_ema"`` or ``"cumulative"``
    running statistics; the last two keep the update count in
    ``batch_stats/count`` (int32 scalar).
  - ``unbiased_var``: store the unbiased batch variance, as PyTorch does.
  - ``skip_nonfinite``: leave the statistics unchanged after a batch whose
    statistics are not all finite.
  - ``activation``: None, ``"relu"`` or ``"leaky_relu"``, fused with the
    normalization, applied after the call's ``residual``.
  - ``negative_slope``: the slope of ``"leaky_relu"`` for negative inputs.
  - ``inplace``: the In-Place ABN backward pass, which keeps the output
    instead of the input.
  - ``renorm``: None, or a ``jaxbn.Renorm`` for Batch Renormalization; adds
    ``batch_stats/count``, ``std``, ``renorm_mean`` and ``renorm_std``
    (Keras's ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).
  - ``virtual_batch_size``: None, or the size of the ghost batches along axis
    0 normalized separately.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["mean"]
    Array([0.45000002, 0.55      , 0.65000004], dtype=float32)

    A fused ``relu(bn(x) + shortcut)``, and frozen batch norm:

    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False, activation="relu")
    >>> y, updates = bn.apply(variables, x, residual=x, mutable=["batch_stats"])
    >>> y_frozen = bn.apply(variables, x, use_batch_stats=False, update_stats=False)
  """

  averaging: _core.Averaging = "ema"
  unbiased_var: bool = False
  skip_nonfinite: bool = False
  activation: _activation.Activation = None
  negative_slope: float = 0.01
  inplace: bool = False
  renorm: Renorm | None = None
  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(
      self,
      x,
      use_running_average: bool | None = None,
      *,
      mask=None,
      residual=None,
      use_batch_stats: bool | None = None,
      update_stats: bool | None = None,
  ):
    """Normalizes ``x`` with batch statistics (training) or running ones.

    While the module is initializing the running statistics are not updated
    and ``axis_name`` is ignored, as in Flax.

    Args:
      x: the input, e.g. ``(N, H, W, C)``.
      use_running_average: overrides the attribute of the same name: True
        normalizes with the stored statistics, False with the batch's and
        updates them (unless the module is initializing). Not needed when
        both switches below are given.
      mask: optional boolean array broadcastable to ``x``; entries where it is
        False do not count towards the batch statistics.
      residual: optional array of the shape of ``x`` added to the normalized
        input before the ``activation`` (a ResNet shortcut).
      use_batch_stats: overrides ``not use_running_average`` for the
        statistics that normalize ``x`` (False with ``update_stats=False`` is
        frozen batch norm).
      update_stats: overrides ``not use_running_average`` for the update of
        the running statistics (True with ``use_batch_stats=False`` is
        calibration).

    Returns:
      The normalized input, of the shape of ``x``.

    Raises:
      ValueError, TypeError: as ``jaxbn.batch_norm``, for the attributes and
        arguments of the same names.
    """
    if use_batch_stats is None or update_stats is None:
      training = not nn.merge_param(
          "use_running_average", self.use_running_average, use_running_average
      )
    else:  # Both switches given: `use_running_average` decides nothing.
      training = False
    initializing = self.is_initializing()
    axis_name = None if initializing else self.axis_name
    call = _modules.call_arguments(
        self,
        x,
        training=training,
        mask=mask,
        axis_name=axis_name,
        residual=residual,
        use_batch_stats=use_batch_stats,
        update_stats=update_stats,
    )
    if call is None:
      return super().__call__(x, use_running_average, mask=mask)
    feature_axes, updates_stats, variants = call
    if not initializing:
      _check_batch_stats(self, updates_stats)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    state_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    stats = {
        name: self.variable("batch_stats", name, jnp.zeros, (), jnp.int32)
        if name == "count"
        else self.variable("batch_stats", name, _INITIAL[name], feature_shape, state_dtype)
        for name in _modules.stat_names(self)
    }
    state = _modules.running_state(self, {name: stat.value for name, stat in stats.items()})
    scale = (
        self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_scale
        else None
    )
    bias = (
        self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        if self.use_bias
        else None
    )
    dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = _core.batch_norm(
        jnp.asarray(x, jnp.promote_types(jnp.result_type(x), dtype)),
        state,
        scale,
        bias,
        training=training,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        **variants,
    )
    if updates_stats and not initializing:
      for name, stat in stats.items():
        stat.value = getattr(new_state, name)
    return y.astype(dtype)


class MissingBatchStatsError(errors.ScopeCollectionNotFound):
  """``apply`` was given no running statistics for a BatchNorm that reads them."""

  def __init__(self, message: str):
    Exception.__init__(self, message)


class ImmutableBatchStatsError(errors.ModifyScopeVariableError):
  """A BatchNorm in training mode must update ``batch_stats``, which ``apply`` keeps frozen."""

  def __init__(self, message: str):
    Exception.__init__(self, message)


def _check_batch_stats(module: BatchNorm, updates_stats: bool) -> None:
  """Raises before Flax would, with the fix, when ``apply`` lacks or freezes ``batch_stats``.

  Both errors subclass Flax's (``ScopeCollectionNotFound``,
  ``ModifyScopeVariableError``), so code that catches those still does.
  """
  mutable = module.is_mutable_collection("batch_stats")
  where = f"{type(module).__name__} at {module.scope.path_text!r}"
  if not mutable and not module.has_variable("batch_stats", "mean"):
    raise MissingBatchStatsError(
        f"{where} reads its running statistics from the collection 'batch_stats', but "
        "the `variables` given to `apply` have none. Pass every collection that `init` "
        "returned: `variables = model.init(key, x)` then `model.apply(variables, x, ...)`, "
        'or `model.apply({"params": params, "batch_stats": batch_stats}, x, ...)`.'
    )
  if updates_stats and not mutable:
    raise ImmutableBatchStatsError(
        f"{where} is in training mode (use_running_average=False): it normalizes with "
        "the batch statistics and updates its running statistics, but the collection "
        "'batch_stats' is immutable in this `apply`. Make it mutable and take the new "
        'statistics from the second output: `y, updates = model.apply(variables, x, '
        'mutable=["batch_stats"])`, then `variables = {**variables, "batch_stats": '
        'updates["batch_stats"]}`. To keep the statistics frozen instead, normalize with '
        "them (use_running_average=True), or with the batch's without an update "
        "(call the BatchNorm with update_stats=False)."
    )


__all__ = ["BatchNorm", "ImmutableBatchStatsError", "MissingBatchStatsError", "recompute_stats"]
