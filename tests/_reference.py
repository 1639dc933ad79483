"""Float64 NumPy references for the numerical contract, and per-dtype tolerances."""

import jax
import jax.numpy as jnp
import numpy as np

# Every implementation of batch norm's local pieces (jaxbn._implementations); the default,
# "auto", is "kernel" on CPU where the kernels loaded.
IMPLEMENTATIONS = ("kernel", "fused", "reference")

# Absolute tolerances on normalized outputs (unit scale) and on statistics
# relative to the data's spread, per input dtype.
TOLERANCE = {
  jnp.dtype(jnp.float64): 1e-10,
  jnp.dtype(jnp.float32): 2e-5,
  jnp.dtype(jnp.bfloat16): 4e-2,
  jnp.dtype(jnp.float16): 4e-3,
}


def tolerance(dtype) -> float:
  return TOLERANCE[jnp.dtype(dtype)]


def stats_tolerance(dtype) -> float:
  """Statistics and running state reduce in at least float32, whatever the input dtype."""
  return tolerance(jnp.promote_types(dtype, jnp.float32))


def assert_close(actual, expected, tol, err_msg=""):
  """``|actual - expected| <= tol * (1 + |expected|)``, compared in float64."""
  actual = np.asarray(actual, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=err_msg)


def feature_axes(axis, ndim):
  axes = axis if isinstance(axis, tuple) else (axis,)
  return tuple(sorted(a % ndim for a in axes))


def reduction_axes(axis, ndim):
  kept = feature_axes(axis, ndim)
  return tuple(i for i in range(ndim) if i not in kept)


def batch_stats(x, axis=-1, mask=None):
  """Mean and biased variance over the non-feature axes, in float64."""
  x = np.asarray(x, np.float64)
  red = reduction_axes(axis, x.ndim)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape) * 1.0
  n = w.sum(axis=red)
  mean = (w * x).sum(axis=red) / np.maximum(n, 1)
  mean_b = np.expand_dims(mean, red)
  var = (w * (x - mean_b) ** 2).sum(axis=red) / np.maximum(n, 1)
  return mean, var


def partial_mask(shape, seed=2):
  """A boolean mask dropping about a third of the entries, never a whole feature.

  The first two examples stay whole, so every feature keeps valid entries.
  """
  mask = np.random.default_rng(seed).uniform(size=shape) > 0.3
  mask[:2] = True
  return mask


def expand(v, axis, ndim):
  return np.expand_dims(np.asarray(v, np.float64), reduction_axes(axis, ndim))


def normalize(x, mean, var, scale=None, bias=None, axis=-1, epsilon=1e-5):
  x = np.asarray(x, np.float64)
  nd = x.ndim
  y = (x - expand(mean, axis, nd)) / np.sqrt(expand(var, axis, nd) + epsilon)
  if scale is not None:
    y = y * expand(scale, axis, nd)
  if bias is not None:
    y = y + expand(bias, axis, nd)
  return y


def batch_norm(
  x,
  mean,
  var,
  count,
  scale=None,
  bias=None,
  *,
  training,
  axis=-1,
  momentum=0.99,
  epsilon=1e-5,
  mask=None,
):
  """Returns (y, (new_mean, new_var, new_count)) in float64.

  A feature without a valid entry (masked out entirely) is normalized with the
  running statistics, which it leaves unchanged.
  """
  if not training:
    return normalize(x, mean, var, scale, bias, axis, epsilon), (mean, var, count)
  mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
  bm, bv = batch_stats(x, axis, mask)
  w = np.ones(np.shape(x)) if mask is None else np.broadcast_to(np.asarray(mask), np.shape(x))
  seen = w.sum(axis=reduction_axes(axis, np.ndim(x))) > 0
  bm, bv = np.where(seen, bm, mean), np.where(seen, bv, var)
  y = normalize(x, bm, bv, scale, bias, axis, epsilon)
  new = (
    momentum * mean + (1 - momentum) * bm,
    momentum * var + (1 - momentum) * bv,
    count + 1,
  )
  return y, new


def tree_spec(tree):
  """The (shape, dtype) of every leaf: what a checkpoint must agree on."""
  return jax.tree.map(lambda v: (v.shape, v.dtype), tree)


def assert_trees_close(got, want):
  """Equal dtypes, and values to the rounding of that dtype (bfloat16: a few ulps)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    tol = 3e-2 if a.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), tol, tol)
