"""Numerical quality: error against float64 that does not grow with the data's offset.

Batch statistics in one pass with ``E[x^2] - E[x]^2`` (Flax's default
``use_fast_variance=True``) lose every digit of the variance once the mean is
large: for float32 data N(1e4, 1) the relative spacing of ``x^2`` is ~1e1.
jaxbn sums shifted values ``x - K`` with ``K`` drawn from the data, so the
error in the variance stays at float32 rounding whatever the offset.
"""

import functools

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

IMPLEMENTATIONS = ref.IMPLEMENTATIONS
OFFSETS = (0.0, 1e2, 1e4, 1e6)
SHAPE = (1024, 4)


def _offset_data(offset, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + rng.standard_normal(SHAPE), jnp.float32)


@functools.partial(jax.jit, static_argnames="implementation")
def _stats_and_outputs(x, *, implementation):
  """Batch statistics from ``batch_stats`` and, with momentum 0, from ``batch_norm``'s new state."""
  stats = jaxbn.batch_stats(x)
  y, state = jaxbn.batch_norm(
      x, jaxbn.init_state(x.shape[-1]), training=True, momentum=0.0,
      implementation=implementation,
  )
  return stats, (state.mean, state.var), y


def _ulp(value):
  """The spacing of float32 numbers around ``value``."""
  return np.spacing(np.abs(np.float32(value))).astype(np.float64)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_error_does_not_grow_with_the_offset(implementation):
  var_errors = []
  for offset in OFFSETS:
    x = _offset_data(offset)
    x64 = np.asarray(x, np.float64)  # the exact values the library sees
    ref_mean, ref_var = ref.batch_stats(x64)
    ref_y = ref.normalize(x64, ref_mean, ref_var)
    (mean, var), (state_mean, state_var), y = _stats_and_outputs(
        x, implementation=implementation
    )
    for m, v in ((mean, var), (state_mean, state_var)):
      m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
      # The mean is correctly rounded to float32 (within one spacing at the offset);
      # no float32 result can be closer.
      assert np.all(np.abs(m - ref_mean) <= _ulp(ref_mean) + 1e-6), (offset, m - ref_mean)
      var_errors.append(np.max(np.abs(v - ref_var)))
      assert var_errors[-1] < 1e-5, (offset, v, ref_var)
    # Outputs of unit scale, to float32 rounding at every offset.
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=2e-5, err_msg=str(offset))
  # The variance error at 1e6 is of the order of that at 0 (float32 rounding of ~1).
  assert max(var_errors) < 1e-5
  assert max(var_errors[-2:]) <= 16 * max(var_errors[:2]) + 1e-6, var_errors


def test_one_pass_without_a_shift_is_far_off_where_jaxbn_is_not():
  # The textbook single pass E[x^2] - E[x]^2 in float32: a variance of ~1 is off
  # by more than 1 at an offset of 1e4 (issue: Flax's default reports 24).
  x = _offset_data(1e4)
  ref_var = ref.batch_stats(np.asarray(x, np.float64))[1]

  @jax.jit
  def variances(x):
    naive = jnp.mean(jnp.square(x), axis=0) - jnp.square(jnp.mean(x, axis=0))
    return naive, jaxbn.batch_stats(x)[1]

  naive, ours = variances(x)
  assert np.max(np.abs(np.asarray(naive, np.float64) - ref_var)) > 0.5
  assert np.max(np.abs(np.asarray(ours, np.float64) - ref_var)) < 1e-5


def test_flax_fast_variance_is_far_off_at_offset_1e4():
  # Documents the reason for jaxbn: flax.linen.BatchNorm's default
  # (use_fast_variance=True) against jaxbn on the same float32 data.
  nn = pytest.importorskip("flax.linen")
  x = _offset_data(1e4)
  ref_var = ref.batch_stats(np.asarray(x, np.float64))[1]
  module = nn.BatchNorm(use_running_average=False, momentum=0.0)
  variables = {
      "params": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
      "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)},
  }
  flax_var = jax.jit(
      lambda v, x: module.apply(v, x, mutable=["batch_stats"])[1]["batch_stats"]["var"]
  )(variables, x)
  ours_var = jax.jit(jaxbn.batch_stats)(x)[1]
  flax_error = np.max(np.abs(np.asarray(flax_var, np.float64) - ref_var))
  ours_error = np.max(np.abs(np.asarray(ours_var, np.float64) - ref_var))
  assert flax_error > 0.5
  assert ours_error < 1e-5
  assert flax_error > 1e4 * ours_error


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_constant_channels_give_finite_outputs_and_gradients(implementation):
  rng = np.random.default_rng(1)
  constants = (0.0, 3.7, 1e4)
  x = rng.standard_normal((8, 1 + len(constants)))
  x[:, 1:] = constants  # channels whose values are all equal: variance 0
  x = jnp.asarray(x, jnp.float32)
  scale = jnp.asarray([1.0, 2.0, 0.5, 3.0])
  bias = jnp.asarray([0.1, -0.3, 0.2, 0.0])
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(x, scale, bias):
    y, state = jaxbn.batch_norm(
        x, jaxbn.init_state(4), scale, bias, training=True, implementation=implementation
    )
    return jnp.sum(weights * y), (y, state)

  grads, (y, state) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  assert np.all(np.isfinite(y))
  # x - mean is exactly 0 there, so the output is the bias.
  np.testing.assert_allclose(y[:, 1:], np.broadcast_to(bias[1:], (8, 3)), atol=1e-6)
  np.testing.assert_allclose(state.var[1:], 0.99, atol=1e-6)  # 0.99 * 1 + 0.01 * 0
  for g in grads:
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_reduces_in_float32(dtype):
  # Statistics of half-precision data are float32 and as accurate as float32 sums
  # of the (exactly representable) inputs: much tighter than a half-precision
  # reduction could be (bfloat16 spacing near 10 is 0.0625).
  rng = np.random.default_rng(2)
  x = jnp.asarray(10 + rng.standard_normal((512, 3)), dtype)
  mask = jnp.asarray(rng.random((512, 1)) < 0.8)

  @jax.jit
  def run(x, mask):
    state = jaxbn.init_state(3, dtype)
    stats = (jaxbn.batch_stats(x), jaxbn.batch_stats(x, mask=mask))
    return stats, jaxbn.batch_norm(x, state, training=True, momentum=0.5)

  stats, (y, state) = run(x, mask)
  x64 = np.asarray(x, np.float64)
  for (mean, var), m in zip(stats, (None, np.asarray(mask)), strict=True):
    assert mean.dtype == var.dtype == jnp.float32
    ref_mean, ref_var = ref.batch_stats(x64, mask=m)
    np.testing.assert_allclose(np.asarray(mean, np.float64), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var, np.float64), ref_var, rtol=1e-5)
  assert y.dtype == dtype and state.mean.dtype == state.var.dtype == jnp.float32
  ref_mean, ref_var = ref.batch_stats(x64)
  np.testing.assert_allclose(np.asarray(state.mean, np.float64), 0.5 * ref_mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.var, np.float64), 0.5 + 0.5 * ref_var, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_out_entries_do_not_reach_the_statistics(implementation):
  # Masked-out entries holding NaN, inf or huge values change nothing, even where
  # the first entry of a feature (a natural shift) is masked out.
  rng = np.random.default_rng(3)
  x = 1e4 + rng.standard_normal((6, 3))
  mask = np.ones((6, 1), bool)
  mask[0] = mask[3] = False
  x64 = x.copy()
  x[0], x[3] = np.nan, [np.inf, -np.inf, 3e38]
  x, mask = jnp.asarray(x, jnp.float32), jnp.asarray(mask)
  ref_mean, ref_var = ref.batch_stats(np.asarray(jnp.asarray(x64, jnp.float32)), mask=mask)

  @jax.jit
  def run(x, mask):
    y, state = jaxbn.batch_norm(
        x, jaxbn.init_state(3), training=True, mask=mask, momentum=0.0,
        implementation=implementation,
    )
    return jaxbn.batch_stats(x, mask=mask), y, state

  (mean, var), y, state = run(x, mask)
  for m, v in ((mean, var), (state.mean, state.var)):
    np.testing.assert_allclose(np.asarray(m, np.float64), ref_mean, atol=_ulp(1e4))
    np.testing.assert_allclose(np.asarray(v, np.float64), ref_var, atol=1e-4)
  assert np.all(np.isfinite(np.asarray(y)[np.asarray(mask[:, 0])]))
