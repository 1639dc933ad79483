"""Population statistics ("precise BN", Wu & Johnson, 2021): exact averages over N batches.

The moving averages of training are a noisy, lagging estimate of the
statistics that inference should use: they weigh recent batches most, and
the weights changed while they were averaged. Precise BN runs the trained
model over ``N`` batches with its weights fixed and replaces, in every batch
norm layer, the running statistics by the statistics of all the entries it
saw. With ``(n_i, mean_i, M2_i)`` the count, mean and sum of squared
deviations of batch ``i`` for one feature::

    n = sum n_i      mean = sum(n_i mean_i) / n
    var = (sum M2_i + sum n_i (mean_i - mean)^2) / n

the exact pooled mean and (biased) variance of the union of the batches,
combined in float64 with Chan's parallel formula. This is the population
variance: it adds the spread of the batch means to the average within-batch
variance. PyTorch's ``torch.optim.swa_utils.update_bn`` instead averages the
batches' unbiased variances (a cumulative average), which misses the spread
of the means; the two agree for large, well-shuffled batches.
"""

from collections.abc import Callable, Iterable
from functools import wraps
from itertools import islice
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _implementations, _stats, _validation

_validation.require("flax", extra="flax", user="jaxbn.recompute_stats")

import flax.linen as nn  # noqa: E402
from flax.core import freeze, unfreeze  # noqa: E402
from flax.core.frozen_dict import FrozenDict  # noqa: E402


def pool_moments(moments: Iterable[tuple[Any, Any, Any]]) -> tuple[np.ndarray, ...]:
  """Combines per-batch ``(n, mean, M2)`` into those of the union, in float64 (Chan et al.).

  Args:
    moments: ``(n_i, mean_i, M2_i)`` per batch, arrays of one shape.

  Returns:
    ``(n, mean, M2)`` of all the batches together, as float64 NumPy arrays.
  """
  n = mean = m2 = None
  for n_i, mean_i, m2_i in moments:
    n_i, mean_i, m2_i = (np.asarray(v, np.float64) for v in (n_i, mean_i, m2_i))
    if n is None:
      n, mean, m2 = n_i, mean_i, m2_i
      continue
    total = n + n_i
    delta = mean_i - mean
    weight = np.divide(n_i, total, out=np.zeros_like(total), where=total > 0)
    mean = mean + delta * weight
    m2 = m2 + m2_i + delta**2 * n * weight
    n = total
  if n is None:
    raise ValueError("`batches` is empty: recompute_stats needs at least one batch.")
  return n, mean, m2


def _moments_of(module: nn.BatchNorm, x, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(n, mean, M2)`` of a batch norm layer's input, each of its feature shape."""
  x = jnp.asarray(x)
  feature_axes = _validation.canonicalize_axes(module.axis, x.ndim)
  axes = _stats.reduction_axes(x.ndim, feature_axes)
  moments = _stats.local_moments(
      x.astype(_stats.compute_dtype(x.dtype)), axes, mask, ops=_implementations.REFERENCE
  )
  shape = _stats.feature_shape(x.shape, feature_axes)
  count = jnp.broadcast_to(moments.count, moments.m2.shape)
  return tuple(v.reshape(shape) for v in (count, moments.mean, moments.m2))


def _batch_moments(apply_fn, variables, batch, epsilons) -> dict[tuple[str, ...], list]:
  """Runs ``apply_fn`` once; returns, per batch norm path, the moments of each of its calls.

  Records each layer's ``epsilon`` in ``epsilons`` (while tracing).
  """
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      moments = _moments_of(context.module, args[0], kwargs.get("mask"))
      path = tuple(context.module.path)
      seen.setdefault(path, []).append(moments)
      epsilons[path] = context.module.epsilon
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    apply_fn(variables, batch)
  return seen


def recompute_stats(
    apply_fn: Callable[[Any, Any], Any],
    variables: Any,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> Any:
  """Replaces the running statistics of every batch norm layer by population statistics.

  Runs ``apply_fn(variables, batch)`` for each batch, under ``jax.jit``, and
  records the input of every ``flax.linen.BatchNorm`` (and subclass, such as
  ``jaxbn.linen.BatchNorm``) the model calls. Each layer's ``mean`` and
  ``var`` in the ``batch_stats`` collection become the exact mean and biased
  variance of all the entries that reached it, over all batches (see the
  module docstring for the formula and how it differs from PyTorch's
  ``update_bn``); with batch renormalization, ``std`` becomes
  ``sqrt(var + epsilon)`` to match. A layer called several times per step
  pools all its calls; a ``mask`` passed to a layer is honoured. Layers that
  never ran, and features masked out in every batch, keep their statistics.

  Like PyTorch's ``update_bn``, the passes should run the model in training
  mode, so that each layer sees the inputs training gave it (the layers
  before it normalized with batch statistics); the running statistics that
  ``apply_fn`` may return are ignored. Models whose batch norm runs inside
  ``nn.scan``, ``nn.vmap`` or other lifted transforms are not supported.

  Reference: Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021), section
  3 ("precise BN").

  Args:
    apply_fn: ``(variables, batch) -> anything``, a training-mode forward
      pass, e.g. ``lambda v, x: model.apply(v, x, train=True,
      mutable=["batch_stats"])``.
    variables: the model's variables, with a ``batch_stats`` collection.
    batches: an iterable of batches, each passed to ``apply_fn`` as is.
    num_batches: use at most this many batches (all by default).
    progress: show a ``tqdm`` progress bar (when ``tqdm`` is installed).

  Returns:
    ``variables`` with new ``batch_stats`` (same structure, dtypes and
    container type); the other collections are the same objects.

  Raises:
    ValueError: if ``batches`` is empty, or no batch norm layer ran.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn.linen
    >>> model = nn.Sequential([nn.Dense(3), jaxbn.linen.BatchNorm(use_running_average=False)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((4, 2)))
    >>> batches = [jnp.full((4, 2), float(i)) for i in range(3)]
    >>> apply_fn = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
    >>> variables = jaxbn.linen.recompute_stats(apply_fn, variables, batches, progress=False)
  """
  epsilons = {}
  step = jax.jit(lambda variables, batch: _batch_moments(apply_fn, variables, batch, epsilons))
  per_layer = {}
  for batch in _progress(batches, num_batches, progress):
    for path, calls in step(variables, batch).items():
      per_layer.setdefault(path, []).extend(calls)
  if not per_layer:
    raise ValueError(
        "recompute_stats saw no batch norm layer run (or `batches` is empty); `apply_fn` "
        "must call a model made of flax.linen.BatchNorm or jaxbn.linen.BatchNorm layers."
    )
  frozen = isinstance(variables, FrozenDict)
  new = unfreeze(variables) if frozen else dict(variables)
  stats = unfreeze(new["batch_stats"])
  for path, calls in per_layer.items():
    layer = stats
    for name in path:
      layer = layer[name]
    names = ("mean", "var", "std") if "std" in layer else ("mean", "var")
    layer.update(_population_stats(calls, {n: layer[n] for n in names}, epsilons[path]))
  new["batch_stats"] = stats
  return freeze(new) if frozen else new


def _population_stats(calls, old: dict[str, Any], epsilon: float) -> dict[str, jax.Array]:
  """A layer's new ``mean`` and ``var`` (and renorm's ``std``) from the moments of its calls.

  ``old`` maps those names to the layer's arrays, whose shapes and dtypes the
  new ones take; features that no call saw keep their old values.
  """
  n, mean, m2 = pool_moments(calls)
  seen = n > 0
  var = np.divide(m2, n, out=np.zeros_like(m2), where=seen)
  # Batch renormalization's moving sqrt(var + epsilon), for training on.
  new = {"mean": mean, "var": var, "std": np.sqrt(var + epsilon)}
  return {
      name: jnp.asarray(
          np.where(seen, new[name], np.asarray(value).reshape(seen.shape)).reshape(np.shape(value)),
          jnp.result_type(value),
      )
      for name, value in old.items()
  }


_STATISTICS = ("mean", "var", "count", "std", "renorm_mean", "renorm_std")


def recompute_stats_nnx(
    model: Any,
    batches: Iterable[Any],
    forward: Callable[[Any, Any], Any] | None = None,
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> Any:
  """``recompute_stats`` for a Flax nnx model, in place: see ``jaxbn.nnx.recompute_stats``."""
  from flax import nnx

  layers = {id(m): m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}
  if not layers:
    raise ValueError(
        "recompute_stats found no batch norm layer in `model`: it must contain "
        "flax.nnx.BatchNorm or jaxbn.nnx.BatchNorm layers."
    )
  forward = forward or (lambda model, batch: model(batch))
  calls, active = {}, set()

  def recording(call):
    @wraps(call)
    def recorded_call(self, x, *args, **kwargs):
      if id(self) not in layers or id(self) in active:  # a subclass calling its parent
        return call(self, x, *args, **kwargs)
      active.add(id(self))
      try:
        calls.setdefault(id(self), []).append(_moments_of(self, x, kwargs.get("mask")))
        return call(self, x, *args, **kwargs)
      finally:
        active.discard(id(self))

    return recorded_call

  classes = {
      cls
      for layer in layers.values()
      for cls in type(layer).__mro__
      if issubclass(cls, nnx.BatchNorm) and "__call__" in vars(cls)
  }
  originals = {cls: vars(cls)["__call__"] for cls in classes}
  # The training-mode passes move the layers' running statistics: put them back after.
  saved = {
      key: {name: getattr(layer, name)[...] for name in _STATISTICS if hasattr(layer, name)}
      for key, layer in layers.items()
  }
  for cls, call in originals.items():
    cls.__call__ = recording(call)
  try:
    for batch in _progress(batches, num_batches, progress):
      forward(model, batch)
  finally:
    for cls, call in originals.items():
      cls.__call__ = call
    for key, values in saved.items():
      for name, value in values.items():
        getattr(layers[key], name)[...] = value
  if not calls:
    raise ValueError(
        "recompute_stats saw no batch norm layer run (or `batches` is empty): `forward` "
        "must call the model's batch norm layers."
    )
  for key, layer_calls in calls.items():
    layer = layers[key]
    renorm = getattr(layer, "renorm", None) is not None  # flax.nnx.BatchNorm has none
    names = ("mean", "var", "std") if renorm else ("mean", "var")
    new = _population_stats(layer_calls, {n: getattr(layer, n)[...] for n in names}, layer.epsilon)
    for name, value in new.items():
      getattr(layer, name)[...] = value
  return model


def _progress(batches, num_batches, enabled):
  """``batches``, at most ``num_batches`` of them, behind a progress bar if ``enabled``."""
  total = len(batches) if num_batches is None and hasattr(batches, "__len__") else num_batches
  if num_batches is not None:
    batches = islice(batches, num_batches)
  if not enabled:
    return batches
  try:
    from tqdm.auto import tqdm
  except ImportError:  # the bar is a convenience: tqdm is not a dependency of the core.
    return batches
  return tqdm(batches, total=total, desc="recompute_stats", unit="batch")
