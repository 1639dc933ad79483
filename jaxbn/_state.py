"""The running statistics that batch norm threads through a training loop."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbn import _stats


class BatchNormState(NamedTuple):
  """Running averages of the batch statistics, one entry per feature.

  A pytree: it can be jitted, vmapped (a batch of states for an ensemble),
  checkpointed and sharded like any other.
  """

  mean: jax.Array  # [*feature_shape], float32 or wider: running mean.
  var: jax.Array  # [*feature_shape], float32 or wider: running biased variance.
  count: jax.Array  # [], int32: number of training-mode updates so far.


# Exported functions (`jax.export`) that take or return a state can be serialized.
jax.export.register_namedtuple_serialization(BatchNormState, serialized_name="jaxbn.BatchNormState")


def init_state(
    feature_shape: int | tuple[int, ...], dtype: DTypeLike = jnp.float32
) -> BatchNormState:
  """Returns the state before any update: mean 0, variance 1, count 0.

  A variance of one (never zero) means an untrained model evaluated in
  inference mode passes its inputs through unchanged up to ``epsilon``.

  Args:
    feature_shape: the shape of the feature axes, e.g. ``C`` or ``(C,)`` for a
      ``(N, H, W, C)`` input with ``axis=-1``.
    dtype: the dtype of ``mean`` and ``var``; promoted to at least float32 so
      that half-precision training keeps exact running statistics.

  Returns:
    A ``BatchNormState`` with ``mean`` and ``var`` of shape ``feature_shape``.

  Raises:
    ValueError: if ``feature_shape`` has a negative entry.
    TypeError: if ``dtype`` is not a floating-point dtype.

  Examples:
    >>> import jaxbn
    >>> state = jaxbn.init_state(3)
    >>> state.mean, state.var
    (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    >>> state.count
    Array(0, dtype=int32)
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
  if any(not isinstance(d, int) or d < 0 for d in shape):
    raise ValueError(
        f"`feature_shape` must be a non-negative int or a tuple of them, got {feature_shape!r}."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {jnp.dtype(dtype)}.")
  dtype = _stats.compute_dtype(dtype)
  return BatchNormState(
      mean=jnp.zeros(shape, dtype),
      var=jnp.ones(shape, dtype),
      count=jnp.zeros((), jnp.int32),
  )
