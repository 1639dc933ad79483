"""Float64 NumPy references for the batch-norm variants (issue: variants and utilities)."""

import numpy as np
from _reference import batch_stats, expand, normalize, reduction_axes

__all__ = ["batch_stats", "expand", "normalize", "reduction_axes"]


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
