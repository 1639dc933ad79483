"""``jaxbn.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, attributes (``mean``, ``var``, ``scale``, ``bias``,
``use_running_average``, ...), ``train()``/``eval()`` behaviour and state, so
existing models and checkpoints work unchanged. The math is
``jaxbn.batch_norm``.
"""

import jax.numpy as jnp
from flax import nnx
from flax.linen import dtypes

from jaxbn import _core
from jaxbn import _validation
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
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "No `use_running_average` was given to BatchNorm: pass it to the "
          "constructor, to the call, or set it with `model.train()` / "
          "`model.eval()` (or `nnx.view(model, use_running_average=...)`)."
      )
    _validation.check_input(x)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    x = jnp.asarray(x)
    y, new_state = _core.batch_norm(
        x.astype(jnp.promote_types(x.dtype, dtype)),
        BatchNormState(self.mean[...], self.var[...], jnp.zeros((), jnp.int32)),
        scale,
        bias,
        training=not use_running_average,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
    )
    if not use_running_average:
      self.mean[...], self.var[...] = new_state.mean, new_state.var
    return y.astype(dtype)


__all__ = ["BatchNorm"]
