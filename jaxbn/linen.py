"""``jaxbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same attributes, same call signature, same variables (``params/scale``,
``params/bias``, ``batch_stats/mean``, ``batch_stats/var``), so checkpoints made
with Flax's module load unchanged. The math is ``jaxbn.batch_norm``: stable
one-pass statistics whatever ``use_fast_variance`` says, count-weighted
statistics across devices, and a backward pass that saves only the input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from jaxbn import _core
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._state import BatchNormState


class BatchNorm(nn.BatchNorm):
  """Batch normalization (Ioffe & Szegedy, 2015) as a Flax linen module.

  Attributes are those of ``flax.linen.BatchNorm``: ``use_running_average``,
  ``axis`` (the feature axis or axes), ``momentum`` (weight of the old running
  value), ``epsilon``, ``dtype`` (of the output; by default the promotion of
  the input and the params), ``param_dtype``, ``use_bias``, ``use_scale``,
  ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``. The
  statistics are always the numerically stable one-pass ones, so
  ``use_fast_variance`` is accepted and has no effect. Running statistics are
  kept in float32 (or wider).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn.linen
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> updates["batch_stats"]["mean"]
    Array([0.45000002, 0.55      , 0.65000004], dtype=float32)
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x`` with batch statistics (training) or running ones.

    Args:
      x: the input, e.g. ``(N, H, W, C)``.
      use_running_average: overrides the attribute of the same name: True
        normalizes with the stored statistics, False with the batch's and
        updates them (unless the module is initializing).
      mask: optional boolean array broadcastable to ``x``; entries where it is
        False do not count towards the batch statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    _validation.check_input(x)
    x = jnp.asarray(x)
    feature_axes = _validation.canonicalize_axes(self.axis, x.ndim)
    feature_shape = _stats.feature_shape(x.shape, feature_axes)
    state_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, state_dtype)
    var = self.variable("batch_stats", "var", jnp.ones, feature_shape, state_dtype)
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
        x.astype(jnp.promote_types(x.dtype, dtype)),
        BatchNormState(mean.value, var.value, jnp.zeros((), jnp.int32)),
        scale,
        bias,
        training=not use_running_average,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=None if self.is_initializing() else self.axis_name,
        axis_index_groups=None if self.is_initializing() else self.axis_index_groups,
    )
    if not use_running_average and not self.is_initializing():
      mean.value, var.value = new_state.mean, new_state.var
    return y.astype(dtype)


__all__ = ["BatchNorm"]
