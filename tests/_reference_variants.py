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
