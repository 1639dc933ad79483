"""``jaxbn.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, attributes (``mean``, ``var``, ``scale``, ``bias``,
``use_running_average``, ...), ``train()``/``eval()``/``nnx.view`` behaviour and
state, so existing models and checkpoints work unchanged. The math is
``jaxbn.batch_norm``. As in ``jaxbn.linen``, complex inputs and batch
statistics of a single value per feature are handed to Flax's implementation
(the latter with a ``UserWarning``).
"""

import jax.numpy as jnp
from flax import nnx

from jaxbn import _core, _validation
from jaxbn._state import BatchNormState


class BatchNorm(nnx.BatchNorm):
  """Batch normalization (Ioffe & Szegedy, 2015) as a Flax nnx module.

  Construct it exactly like ``flax.nnx.BatchNorm``: ``num_features``, then the
  keyword arguments ``use_running_average``, ``axis``, ``momentum`` (weight of
  the old running value), ``epsilon``, ``dtype``, ``param_dtype``,
  ``use_bias``, ``use_scale``, ``bias_init``, ``scale_init``, ``axis_name``,
  ``axis_index_groups``, ``use_fast_variance`` (accepted; the statistics are
  always the stable one-pass ones), ``promote_dtype`` and ``rngs``.
  ``model.train()`` and ``model.eval()`` switch ``use_running_average``.

  With several feature axes, ``num_features`` is their total size, as in
  Flax. ``promote_dtype`` sets the dtype of the input, scale and bias (and so
  of the output); the statistics are reduced in at least float32 and the
  running statistics stay float32.

  Example:
    >>> import jax.numpy as jnp, jaxbn.nnx
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))
    >>> bn.mean[...]
    Array([0.45000002, 0.55      , 0.65000004], dtype=float32)
  """

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalizes ``x`` with batch statistics (training) or running ones.

    Args:
      x: the input, e.g. ``(N, H, W, C)``.
      use_running_average: overrides the attribute of the same name: True
        normalizes with the stored statistics, False with the batch's and
        updates them.
      mask: optional boolean array broadcastable to ``x``; entries where it is
        False do not count towards the batch statistics.

    Returns:
      The normalized input, of the shape of ``x``.

    Raises:
      ValueError: if ``use_running_average`` is None both here and on the
        module.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "No `use_running_average` was given to BatchNorm: pass it to the "
          "constructor, to the call, or set it with `model.train()` / "
          "`model.eval()` (or `nnx.view(model, use_running_average=...)`)."
      )
    training = not use_running_average
    feature_axes = _validation.canonicalize_axes(self.axis, jnp.ndim(x))
    if _validation.flax_fallback(
        x, feature_axes, training=training, mask=mask, axis_name=self.axis_name
    ):
      return super().__call__(x, use_running_average, mask=mask)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    # The variables hold `num_features` values; there may be several feature axes.
    scale, bias = (None if v is None else v.reshape(feature_shape) for v in (scale, bias))
    state = BatchNormState(
        self.mean[...].reshape(feature_shape),
        self.var[...].reshape(feature_shape),
        jnp.zeros((), jnp.int32),
    )
    y, new_state = _core.batch_norm(
        x,
        state,
        scale,
        bias,
        training=training,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
    )
    if training:
      self.mean[...] = new_state.mean.reshape(self.mean.shape)
      self.var[...] = new_state.var.reshape(self.var.shape)
    return y


__all__ = ["BatchNorm"]
