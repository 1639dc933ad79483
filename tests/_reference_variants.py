"""Float64 NumPy references for the batch-norm variants (issue: variants and utilities)."""

import jax.numpy as jnp
import numpy as np
from _reference import batch_stats, expand, normalize, reduction_axes

import jaxbn

__all__ = ["batch_stats", "expand", "normalize", "reduction_axes"]


def inputs(shape, axis=-1, seed=0, count=0):
  """Random float32 ``(x, state, scale, bias)`` of ``shape``, features along ``axis``.

  Each feature has its own offset and each entry its own spread; the state
  holds random statistics after ``count`` updates.
  """
  rng = np.random.default_rng(seed)
  c = shape[axis]
  x = jnp.asarray(expand(rng.uniform(-2, 2, c), axis, len(shape))
                  + rng.uniform(0.5, 2, shape) * rng.standard_normal(shape), jnp.float32)
  state = jaxbn.BatchNormState(jnp.asarray(rng.uniform(-1, 1, c), jnp.float32),
                               jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                               jnp.asarray(count, jnp.int32))
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.uniform(-1, 1, c), jnp.float32)
  return x, state, scale, bias


def update(old_mean, old_var, count, mean, var, *, momentum=0.99, averaging="ema",
           unbiased_var=False, n=None):
  """One running-average step; returns (mean, var, count) in float64."""
  old_mean, old_var, mean, var = (np.asarray(v, np.float64) for v in (old_mean, old_var, mean, var))
  if unbiased_var:
    var = var * n / np.maximum(n - 1, 1)
  t = count + 1
  if averaging == "ema":
    new = [momentum * o + (1 - momentum) * b for o, b in ((old_mean, mean), (old_var, var))]
  elif averaging == "debiased_ema":
    # Haiku's ExponentialMovingAverage: a biased average, divided by 1 - momentum^t.
    w = (1 - momentum) / (1 - momentum**t) if momentum < 1 else 1 / t
    new = [o + w * (b - o) for o, b in ((old_mean, mean), (old_var, var))]
  else:
    new = [o + (b - o) / t for o, b in ((old_mean, mean), (old_var, var))]
  return new[0], new[1], t


def activation(u, kind, negative_slope=0.01):
  if kind is None:
    return u
  if kind == "relu":
    return np.maximum(u, 0)
  return np.where(u >= 0, u, negative_slope * u)


def renorm(x, state, scale, bias, *, axis, momentum, epsilon, r_max, d_max, r_min, renorm_momentum):
  """Batch renormalization as Keras 3 computes it; returns (y, new state as a dict) in float64."""
  state = {k: np.asarray(v, np.float64) for k, v in state.items()}
  mean, var = batch_stats(x, axis)
  std = np.sqrt(var + epsilon)
  sigma = np.maximum(state["renorm_std"], np.sqrt(epsilon))
  r = np.clip(std / sigma, r_min, r_max)
  d = np.clip((mean - state["renorm_mean"]) / sigma, -d_max, d_max)
  nd = np.ndim(x)
  x_hat = (np.asarray(x, np.float64) - expand(mean, axis, nd)) / expand(std, axis, nd)
  y = (x_hat * expand(r, axis, nd) + expand(d, axis, nd)) * expand(scale, axis, nd) + expand(
      bias, axis, nd)
  new_std = momentum * state["std"] + (1 - momentum) * std
  new = {
      "mean": momentum * state["mean"] + (1 - momentum) * mean,
      "var": np.maximum(new_std**2 - epsilon, 0),
      "count": state["count"] + 1,
      "std": new_std,
      "renorm_mean": renorm_momentum * state["renorm_mean"] + (1 - renorm_momentum) * mean,
      "renorm_std": renorm_momentum * state["renorm_std"] + (1 - renorm_momentum) * std,
  }
  return y, new


def ghost(x, mean, var, scale, bias, *, virtual_batch_size, axis, momentum, epsilon, mask=None,
          unbiased_var=False):
  """Ghost batch norm on contiguous groups; returns (y, new mean, new var) in float64."""
  x = np.asarray(x, np.float64)
  groups = x.shape[0] // virtual_batch_size
  ys, means, variances = [], [], []
  for g in range(groups):
    part = slice(g * virtual_batch_size, (g + 1) * virtual_batch_size)
    xg = x[part]
    mg = None if mask is None else np.broadcast_to(mask, x.shape)[part]
    m, v = batch_stats(xg, axis, mg)
    ys.append(normalize(xg, m, v, scale, bias, axis, epsilon))
    if unbiased_var:
      n = xg.size / m.size if mg is None else mg.sum(axis=reduction_axes(axis, x.ndim))
      v = v * n / np.maximum(n - 1, 1)
    means.append(m)
    variances.append(v)
  new_mean = momentum * np.asarray(mean, np.float64) + (1 - momentum) * np.mean(means, 0)
  new_var = momentum * np.asarray(var, np.float64) + (1 - momentum) * np.mean(variances, 0)
  return np.concatenate(ys), new_mean, new_var


def tf_keras_ghost(x, mean, var, *, virtual_batch_size, momentum, epsilon):
  """tf.keras BatchNormalization(virtual_batch_size=V), features last, no scale or bias.

  Transcribes its algorithm: reshape to [V, -1, ...] (so group g holds the
  strided entries x[g::G]), moments over every axis but the group and feature
  axes, and an update with the means over the groups of their means and
  variances.
  """
  x = np.asarray(x, np.float64)
  expanded = x.reshape((virtual_batch_size, -1) + x.shape[1:])
  axes = tuple(i for i in range(expanded.ndim - 1) if i != 1)
  m = expanded.mean(axes, keepdims=True)
  v = expanded.var(axes, keepdims=True)
  y = ((expanded - m) / np.sqrt(v + epsilon)).reshape(x.shape)
  new_mean = momentum * mean + (1 - momentum) * m.mean(1).ravel()
  new_var = momentum * var + (1 - momentum) * v.mean(1).ravel()
  return y, new_mean, new_var
