"""Batch Renormalization (Ioffe, 2017): training that sees the statistics inference will use.

Batch statistics make a training example's output depend on the rest of its
batch, and differ from the moving averages used at inference. Batch
renormalization corrects the batch-normalized features towards the moving
averages ``mu``, ``sigma``, with the correction held constant in the gradient::

    sigma_B = sqrt(var_B + epsilon)
    r = clip(sigma_B / sigma, r_min, r_max)            (stop_gradient)
    d = clip((mean_B - mu) / sigma, -d_max, d_max)     (stop_gradient)
    y = ((x - mean_B) / sigma_B * r + d) * scale + bias

With ``r_max = 1``, ``d_max = 0`` it is batch norm; as they grow, training
normalizes with ``mu`` and ``sigma``, exactly as inference does. The paper
starts at ``r_max = 1``, ``d_max = 0`` and relaxes them to 3 and 5 over the
first tens of thousands of steps: ``r_max`` and ``d_max`` may be schedules,
functions of the update count.

The statistics follow Keras 3's ``BatchNormalization(renorm=True)``: ``r``
and ``d`` use their own moving averages (``renorm_mean``, ``renorm_std``,
updated with the renorm momentum, ``sigma`` floored at ``sqrt(epsilon)``);
inference uses moving averages of the mean and of ``sigma_B`` (with
``momentum``), and the variance ``max(std^2 - epsilon, 0)`` derived from the
latter.
"""

from collections.abc import Callable
from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from jaxbn import _state, _validation

Bound = float | jax.Array | Callable[[jax.Array], float | jax.Array]


class RenormState(NamedTuple):
  """The running statistics of batch renormalization, one entry per feature.

  ``mean``, ``var`` and ``count`` mean what they mean in ``BatchNormState``,
  so inference and ``normalize`` use a ``RenormState`` as they use a
  ``BatchNormState``.
  """

  mean: jax.Array  # [*feature_shape] float32+: moving mean (momentum), for inference.
  var: jax.Array  # [*feature_shape] float32+: max(std^2 - epsilon, 0), for inference.
  count: jax.Array  # [] int32: number of updates so far (the schedules' step).
  std: jax.Array  # [*feature_shape] float32+: moving sqrt(var_B + epsilon) (momentum).
  renorm_mean: jax.Array  # [*feature_shape] float32+: mu of r and d (renorm momentum).
  renorm_std: jax.Array  # [*feature_shape] float32+: sigma of r and d (renorm momentum).


jax.export.register_namedtuple_serialization(RenormState, serialized_name="jaxbn.RenormState")


def init_renorm_state(
    feature_shape: int | tuple[int, ...], dtype: DTypeLike = jnp.float32
) -> RenormState:
  """Returns the state before any update: means 0, ``var`` and standard deviations 1.

  These are Keras's initial values (the standard deviations start at
  ``sqrt(1)``).

  Args:
    feature_shape: the shape of the feature axes, e.g. ``C``.
    dtype: the dtype of the statistics, promoted to at least float32.

  Returns:
    A ``RenormState``.

  Raises:
    ValueError, TypeError: as ``init_state``.

  Examples:
    >>> import jaxbn
    >>> jaxbn.init_renorm_state(2).renorm_std
    Array([1., 1.], dtype=float32)
  """
  state = _state.init_state(feature_shape, dtype)
  return RenormState(*state, std=state.var, renorm_mean=state.mean, renorm_std=state.var)


class Renorm(NamedTuple):
  """Settings of batch renormalization, for ``batch_norm(..., renorm=Renorm(...))``.

  ``r_max``, ``d_max`` and ``r_min`` are each a float, a traced scalar, or a
  schedule: a function of the update count ``state.count`` (an int32 scalar)
  that returns one, e.g. the paper's ramps::

      Renorm(r_max=lambda t: jnp.clip(1 + 2 * (t - 5000) / 35000, 1, 3),
             d_max=lambda t: jnp.clip(5 * (t - 5000) / 20000, 0, 5))

  A ``Renorm`` is a pytree: one of numbers and arrays may be an argument of a
  jitted function; one holding schedules must be closed over instead.
  """

  r_max: Bound = 3.0  # r <= r_max, r_max >= 1.
  d_max: Bound = 5.0  # |d| <= d_max, d_max >= 0.
  r_min: Bound | None = None  # r >= r_min in [0, 1]; None: 1 / r_max, as in the paper.
  momentum: float | jax.Array = 0.99  # weight of the old value in renorm_mean, renorm_std.


def check(renorm: Renorm, state) -> None:
  """Trace-time checks of the settings and the state."""
  if not isinstance(renorm, Renorm):
    raise TypeError(
        f"`renorm` must be a jaxbn.Renorm(r_max, d_max, r_min, momentum) or None, got "
        f"{type(renorm).__name__}."
    )
  for name, value, low, high in (
      ("r_max", renorm.r_max, 1.0, float("inf")),
      ("d_max", renorm.d_max, 0.0, float("inf")),
      ("r_min", renorm.r_min, 0.0, 1.0),
      ("momentum", renorm.momentum, 0.0, 1.0),
  ):
    if value is None and name == "r_min":
      continue
    if callable(value) and name != "momentum":
      continue
    if isinstance(value, bool) or not (isinstance(value, Real) or hasattr(value, "shape")):
      raise TypeError(
          f"`renorm.{name}` must be a float, a scalar array"
          f"{'' if name == 'momentum' else ' or a function of the step count'}, got {value!r}."
      )
    if jnp.shape(value) != ():
      raise ValueError(f"`renorm.{name}` must be a scalar, got shape {jnp.shape(value)}.")
    _validation.check_fraction(value, f"renorm.{name}", low, high)
  missing = [f for f in ("std", "renorm_mean", "renorm_std") if not hasattr(state, f)]
  if missing:
    raise TypeError(
        f"batch renormalization keeps more statistics: `state` must be a RenormState from "
        f"`jaxbn.init_renorm_state(feature_shape)`, got {type(state).__name__} without "
        f"{', '.join(missing)}."
    )


def _bound(value, count):
  return value(count) if callable(value) else value


def correction(renorm: Renorm, state: RenormState, mean, var, epsilon, reshape, seen):
  """``(r, d)`` of the docstring, without gradient; ``reshape`` broadcasts the state's fields.

  A feature not ``seen`` in the batch (no valid entry; per ghost batch) is
  normalized with the running statistics, as in inference: ``r = 1``, ``d = 0``.
  """
  r_max = _bound(renorm.r_max, state.count)
  d_max = _bound(renorm.d_max, state.count)
  r_min = 1 / r_max if renorm.r_min is None else _bound(renorm.r_min, state.count)
  sigma = jnp.maximum(reshape(state.renorm_std), jnp.sqrt(jnp.asarray(epsilon, mean.dtype)))
  r = jnp.clip(jnp.sqrt(var + epsilon) / sigma, r_min, r_max)
  d = jnp.clip((mean - reshape(state.renorm_mean)) / sigma, -d_max, d_max)
  r, d = jnp.where(seen, r, jnp.ones_like(r)), jnp.where(seen, d, jnp.zeros_like(d))
  return lax.stop_gradient(r), lax.stop_gradient(d)


def update(renorm: Renorm, state: RenormState, mean, var, momentum, epsilon) -> RenormState:
  """Keras's update of the moving statistics from the batch ``mean`` and ``var``."""
  dtype = state.mean.dtype
  mean, var = (jnp.asarray(v, dtype).reshape(state.mean.shape) for v in (mean, var))
  std = jnp.sqrt(var + epsilon)
  new_std = momentum * state.std + (1 - momentum) * std
  new_state = RenormState(
      mean=momentum * state.mean + (1 - momentum) * mean,
      var=jnp.maximum(new_std * new_std - epsilon, 0),
      count=state.count + 1,
      std=new_std,
      renorm_mean=renorm.momentum * state.renorm_mean + (1 - renorm.momentum) * mean,
      renorm_std=renorm.momentum * state.renorm_std + (1 - renorm.momentum) * std,
  )
  return jax.tree.map(lambda new, old: lax.stop_gradient(new).astype(old.dtype), new_state, state)
