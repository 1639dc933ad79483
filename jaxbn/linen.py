"""``jaxbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same attributes, same call signature, same variables (``params/scale``,
``params/bias``, ``batch_stats/mean``, ``batch_stats/var``, with Flax's shapes
and dtypes), so checkpoints made with Flax's module load unchanged. The math is
``jaxbn.batch_norm``: stable one-pass statistics whatever ``use_fast_variance``
says, count-weighted statistics across devices, and a backward pass that saves
only the input.

Two inputs that ``jaxbn.batch_norm`` refuses are handed to Flax's own
implementation so that existing models keep running: complex inputs, and
batch statistics of a single value per feature (then the variance is 0 and
the output is the bias alone; a ``UserWarning`` says so).
"""

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes

from jaxbn import _core, _validation
from jaxbn._precise import recompute_stats as recompute_stats
from jaxbn._state import BatchNormState


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

    While the module is initializing the running statistics are not updated
    and ``axis_name`` is ignored, as in Flax.

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
    training = not nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    initializing = self.is_initializing()
    axis_name = None if initializing else self.axis_name
    feature_axes = _validation.canonicalize_axes(self.axis, jnp.ndim(x))
    if _validation.flax_fallback(
        x, feature_axes, training=training, mask=mask, axis_name=axis_name
    ):
      return super().__call__(x, use_running_average, mask=mask)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    state_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
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
        jnp.asarray(x, jnp.promote_types(jnp.result_type(x), dtype)),
        BatchNormState(mean.value, var.value, jnp.zeros((), jnp.int32)),
        scale,
        bias,
        training=training,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
    )
    if training and not initializing:
      mean.value, var.value = new_state.mean, new_state.var
    return y.astype(dtype)


__all__ = ["BatchNorm", "recompute_stats"]
