"""``jaxbn.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, attributes (``mean``, ``var``, ``scale``, ``bias``,
``use_running_average``, ...), ``train()``/``eval()``/``nnx.view`` behaviour and
state, so existing models and checkpoints work unchanged. The math is
``jaxbn.batch_norm``, whose variants come as further keyword arguments and
call arguments, off by default. As in ``jaxbn.linen``, complex inputs and batch
statistics of a single value per feature are handed to Flax's implementation
(the latter with a ``UserWarning``), or raise a ``ValueError`` when a variant
is asked for.
"""

import jax.numpy as jnp

from jaxbn import _validation

_validation.require("flax", extra="flax", user="jaxbn.nnx")

from flax import errors, nnx  # noqa: E402

from jaxbn import _activation, _core, _modules, _precise  # noqa: E402
from jaxbn._renorm import Renorm, init_renorm_state  # noqa: E402


class BatchNorm(nnx.BatchNorm):
  """Batch normalization (Ioffe & Szegedy, 2015) as a Flax nnx module.

  Construct it exactly like ``flax.nnx.BatchNorm``: ``num_features``, then the
  keyword arguments ``use_running_average``, ``axis``, ``momentum`` (weight of
  the old running value), ``epsilon``, ``dtype``, ``param_dtype``,
  ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
  ``axis_index_groups``, ``use_fast_variance`` (accepted; the statistics are
  always the stable one-pass ones), ``promote_dtype``, ``rngs``,
  ``bias_metadata`` and ``scale_metadata``. ``model.train()`` and
  ``model.eval()`` switch ``use_running_average``.

  With several feature axes, ``num_features`` is their total size, as in
  Flax. ``promote_dtype`` sets the dtype of the input, scale and bias (and so
  of the output); the statistics are reduced in at least float32 and the
  running statistics stay float32.

  Then come the keyword arguments of the variants of ``jaxbn.batch_norm`` (its
  docstring has the math), whose defaults keep Flax's behaviour and state:

  - ``averaging``: ``"ema"`` (default), ``"debiased_ema"`` or ``"cumulative"``
    running statistics; the last two keep the update count in the
    ``nnx.BatchStat`` ``count`` (int32 scalar).
  - ``unbiased_var``: store the unbiased batch variance, as PyTorch does.
  - ``skip_nonfinite``: leave the statistics unchanged after a batch whose
    statistics are not all finite.
  - ``activation``: None, ``"relu"`` or ``"leaky_relu"``, fused with the
    normalization, applied after the call's ``residual``.
  - ``negative_slope``: the slope of ``"leaky_relu"`` for negative inputs.
  - ``inplace``: the In-Place ABN backward pass, which keeps the output
    instead of the input.
  - ``renorm``: None, or a ``jaxbn.Renorm`` for Batch Renormalization; adds the
    ``nnx.BatchStat`` attributes ``count``, ``std``, ``renorm_mean`` and
    ``renorm_std`` (Keras's ``moving_stddev``, ``renorm_mean``,
    ``renorm_stddev``).
  - ``virtual_batch_size``: None, or the size of the ghost batches along axis
    0 normalized separately.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))
    >>> bn.mean[...]
    Array([0.45000002, 0.55      , 0.65000004], dtype=float32)

    A fused ``relu(bn(x) + shortcut)``, and frozen batch norm:

    >>> bn = jaxbn.nnx.BatchNorm(3, activation="relu", rngs=nnx.Rngs(0))
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y = bn(x, residual=x)
    >>> y_frozen = bn(x, use_batch_stats=False, update_stats=False)
  """

  def __init__(
      self,
      num_features: int,
      *,
      averaging: _core.Averaging = "ema",
      unbiased_var: bool = False,
      skip_nonfinite: bool = False,
      activation: _activation.Activation = None,
      negative_slope: float = 0.01,
      inplace: bool = False,
      renorm: Renorm | None = None,
      virtual_batch_size: int | None = None,
      **kwargs,
  ):
    super().__init__(num_features, **kwargs)
    self.averaging = averaging
    self.unbiased_var = unbiased_var
    self.skip_nonfinite = skip_nonfinite
    self.activation = activation
    self.negative_slope = negative_slope
    self.inplace = inplace
    self.renorm = renorm
    self.virtual_batch_size = virtual_batch_size
    # Flax's __init__ made `mean` and `var`; the others only where a variant needs them.
    initial = init_renorm_state(num_features)
    for name in _modules.stat_names(self):
      if name not in ("mean", "var"):
        setattr(self, name, nnx.BatchStat(getattr(initial, name)))

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

    Args:
      x: the input, e.g. ``(N, H, W, C)``.
      use_running_average: overrides the attribute of the same name: True
        normalizes with the stored statistics, False with the batch's and
        updates them. Not needed when both switches below are given.
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
      ValueError: if ``use_running_average`` is None both here and on the
        module and a switch is not given.
      ValueError, TypeError: as ``jaxbn.batch_norm``, for the arguments of the
        same names.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_batch_stats is not None and update_stats is not None:
      training = False  # Both switches given: `use_running_average` decides nothing.
    elif use_running_average is None:
      raise ValueError(
          "No `use_running_average` was given to BatchNorm: pass it to the "
          "constructor, to the call, or set it with `model.train()` / "
          "`model.eval()` (or `nnx.view(model, use_running_average=...)`)."
      )
    else:
      training = not use_running_average
    call = _modules.call_arguments(
        self,
        x,
        training=training,
        mask=mask,
        axis_name=self.axis_name,
        residual=residual,
        use_batch_stats=use_batch_stats,
        update_stats=update_stats,
    )
    if call is None:
      return super().__call__(x, use_running_average, mask=mask)
    feature_axes, updates_stats, variants = call
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    # The variables hold `num_features` values; there may be several feature axes.
    scale, bias = (None if v is None else v.reshape(feature_shape) for v in (scale, bias))
    stats = {name: getattr(self, name) for name in _modules.stat_names(self)}
    values = {
        name: stat[...] if name == "count" else stat[...].reshape(feature_shape)
        for name, stat in stats.items()
    }
    y, new_state = _core.batch_norm(
        x,
        _modules.running_state(self, values),
        scale,
        bias,
        training=training,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        **variants,
    )
    if updates_stats:
      try:
        for name, stat in stats.items():
          stat[...] = getattr(new_state, name).reshape(stat.shape)
      except errors.TraceContextError as error:
        raise errors.TraceContextError(_SHARED_STATS_MESSAGE) from error
    return y


_SHARED_STATS_MESSAGE = (
    "BatchNorm in training mode updates its running statistics, but it runs inside a "
    "transformation (such as nnx.vmap or jax.vmap over the batch) that does not own the "
    "module's state, so each mapped member would write its own statistics into one "
    "shared BatchStat. To normalize with the statistics of the whole batch, name the mapped "
    "axis in both places and pass the model to the mapped function: "
    "`nnx.vmap(f, in_axes=(None, 0), axis_name='batch')` with "
    "`jaxbn.nnx.BatchNorm(..., axis_name='batch')`. To give each member its own statistics "
    "(an ensemble), map the model's state too: a model made under `nnx.vmap` mapped with "
    "`in_axes=(0, 0)`, or `in_axes=(nnx.StateAxes({nnx.BatchStat: 0, ...: None}), 0)` with "
    "the statistics stacked along axis 0. To normalize without an update, use "
    "`model.eval()` or call the BatchNorm with `update_stats=False`."
)


def recompute_stats(model, batches, forward=None, *, num_batches=None, progress=True):
  """Replaces the running statistics of every batch norm layer of an nnx model, in place.

  Precise BN (Wu & Johnson, 2021) for ``flax.nnx`` models, as
  ``jaxbn.linen.recompute_stats`` is for linen ones (its docstring has the
  formula): runs ``forward(model, batch)`` (by default ``model(batch)``) for
  each batch, records the input of every ``flax.nnx.BatchNorm`` (and
  subclass, such as ``jaxbn.nnx.BatchNorm``) in ``model``, and sets each
  layer's ``mean`` and ``var`` to the exact mean and biased variance of all the
  entries that reached it (with batch renormalization, ``std`` to
  ``sqrt(var + epsilon)``). Features masked out in every batch, and layers that
  never ran, keep their statistics; the running statistics that the passes
  themselves move are put back first.

  The passes should run the layers in training mode (``model.train()``), so
  that each layer sees the inputs training gave it, and run eagerly: the
  inputs are recorded as the layers are called, which a ``jax.jit`` or
  ``nnx.jit`` around ``forward`` would turn into tracers. While it runs, the
  ``__call__`` of the batch norm classes records; do not call the same
  classes from another thread meanwhile.

  Args:
    model: an ``nnx.Module`` holding batch norm layers.
    batches: an iterable of batches.
    forward: ``(model, batch) -> anything``; ``model(batch)`` by default.
    num_batches: use at most this many batches (all by default).
    progress: show a ``tqdm`` progress bar (when ``tqdm`` is installed).

  Returns:
    ``model``, whose batch norm layers now hold the population statistics.

  Raises:
    ValueError: if ``model`` has no batch norm layer, or none ran.

  Examples:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
    ...                        jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> model.train()
    >>> batches = [jnp.full((4, 2), float(i)) for i in range(3)]
    >>> model = jaxbn.nnx.recompute_stats(model, batches, progress=False)
  """
  return _precise.recompute_stats_nnx(
      model, batches, forward, num_batches=num_batches, progress=progress
  )


__all__ = ["BatchNorm", "recompute_stats"]
