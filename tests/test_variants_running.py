"""Switches (use_batch_stats / update_stats) and running-average conventions."""

import warnings

import _reference_variants as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close, tolerance

import jaxbn
from jaxbn._core import update_running_stats

F32 = tolerance(jnp.float32)


@jax.jit
def _all_switches(x, state, scale, bias):
  def bn(use, update):
    return jaxbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9,
                            use_batch_stats=use, update_stats=update)
  return {(use, update): bn(use, update) for use in (True, False) for update in (True, False)}


def test_switches_against_the_reference():
  x, state, scale, bias = ref.inputs((6, 5, 3), count=3)
  out = _all_switches(x, state, scale, bias)
  x64 = np.asarray(x, np.float64)
  mean, var = ref.batch_stats(x64)
  y_batch = ref.normalize(x64, mean, var, scale, bias)
  y_running = ref.normalize(x64, state.mean, state.var, scale, bias)
  new_mean, new_var, _ = ref.update(state.mean, state.var, 3, mean, var, momentum=0.9)
  for (use, update), (y, new) in out.items():
    assert_close(y, y_batch if use else y_running, F32, f"y {use=} {update=}")
    if update:
      assert_close(new.mean, new_mean, F32, "mean")
      assert_close(new.var, new_var, F32, "var")
      assert int(new.count) == 4
    else:
      for a, b in zip(new, state, strict=True):
        np.testing.assert_array_equal(a, b)


def test_frozen_batch_norm_is_inference_and_has_no_gradient_through_statistics():
  x, state, scale, bias = ref.inputs((6, 5, 3), count=3)
  def loss(x, frozen):
    kwargs = dict(use_batch_stats=False, update_stats=False) if frozen else {}
    y, new = jaxbn.batch_norm(x, state, scale, bias, training=frozen is not None, **kwargs)
    return jnp.sum(jnp.sin(y)), new
  (value, new), grad = jax.value_and_grad(loss, has_aux=True)(x, True)
  (value_inf, _), grad_inf = jax.value_and_grad(loss, has_aux=True)(x, None)
  for a, b in zip(new, state, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(value, value_inf)
  np.testing.assert_array_equal(grad, grad_inf)


def test_switches_default_to_training_and_must_be_bools():
  x, state, *_ = ref.inputs((6, 5, 3), count=3)
  y, new = jaxbn.batch_norm(x, state, training=False, update_stats=True)
  assert int(new.count) == 4
  assert_close(y, ref.normalize(np.asarray(x, np.float64), state.mean, state.var), F32)
  with pytest.raises(TypeError, match=r"`update_stats` must be a Python bool or None .*got 1"):
    jaxbn.batch_norm(x, state, training=True, update_stats=1)
  with pytest.raises(TypeError, match=r"`use_batch_stats` must be a Python bool"):
    jax.jit(lambda x, u: jaxbn.batch_norm(x, state, training=True, use_batch_stats=u))(x, True)


@pytest.mark.parametrize("averaging", ["ema", "debiased_ema", "cumulative"])
def test_averaging_over_steps_against_the_reference(averaging):
  x, state, _, _ = ref.inputs((6, 5, 3), count=3)
  mask = jnp.asarray(np.random.default_rng(1).random(x.shape) < 0.6)
  step = jax.jit(lambda x, state: jaxbn.batch_norm(
      x, state, training=True, momentum=0.8, mask=mask, averaging=averaging, unbiased_var=True))
  mean64, var64, count = np.asarray(state.mean, np.float64), np.asarray(state.var, np.float64), 3
  mask64 = np.asarray(mask)
  n = mask64.sum(axis=(0, 1))  # per-feature counts: the masks make them differ.
  assert len(set(n)) > 1
  for i in range(3):
    xi = x * (i + 1) + i
    _, state = step(xi, state)
    mean, var = ref.batch_stats(np.asarray(xi, np.float64), mask=mask64)
    mean64, var64, count = ref.update(mean64, var64, count, mean, var, momentum=0.8,
                                      averaging=averaging, unbiased_var=True, n=n)
    assert_close(state.mean, mean64, 3 * F32, f"mean after step {i}")
    assert_close(state.var, var64, 3 * F32, f"var after step {i}")
    assert int(state.count) == count


def test_debiased_ema_starts_at_the_first_batch_and_becomes_cumulative_at_momentum_one():
  state = jaxbn.init_state(2)
  batches = [jnp.array([1.0, 2.0]), jnp.array([3.0, 6.0]), jnp.array([5.0, 1.0])]
  debiased, cumulative = state, state
  for i, b in enumerate(batches):
    debiased = update_running_stats(debiased, b, b, momentum=1.0, averaging="debiased_ema")
    cumulative = update_running_stats(cumulative, b, b, averaging="cumulative")
    if i == 0:
      first = update_running_stats(state, b, b, momentum=0.9, averaging="debiased_ema")
      np.testing.assert_array_equal(first.mean, b)
  np.testing.assert_allclose(debiased.mean, np.mean(batches, axis=0), rtol=1e-6)
  np.testing.assert_allclose(debiased.mean, cumulative.mean, rtol=1e-6)


def test_debiased_ema_with_traced_momentum_under_jit():
  update = jax.jit(lambda s, m, momentum: update_running_stats(
      s, m, m, momentum=momentum, averaging="debiased_ema"))
  state = jaxbn.init_state(1)
  mean64, var64, count = 0.0, 1.0, 0
  for b in (2.0, -1.0, 4.0):
    state = update(state, jnp.array([b]), jnp.float32(0.7))
    mean64, var64, count = ref.update(mean64, var64, count, b, b, momentum=0.7,
                                      averaging="debiased_ema")
  assert_close(state.mean, np.atleast_1d(mean64), F32)


def test_unbiased_var_folds_n_over_n_minus_one_like_pytorch():
  # PyTorch: running_var = 0.9 * 1 + 0.1 * x.var(unbiased=True); x normalized with the biased var.
  x = jnp.array([[1.0], [2.0], [4.0]])
  y, state = jaxbn.batch_norm(x, jaxbn.init_state(1), training=True, momentum=0.9,
                              unbiased_var=True, epsilon=0.0)
  np.testing.assert_allclose(state.var, 0.9 + 0.1 * np.var([1, 2, 4], ddof=1), rtol=1e-6)
  np.testing.assert_allclose(y[:, 0], (x[:, 0] - 7 / 3) / np.std([1, 2, 4]), rtol=1e-5)


def test_skip_nonfinite_keeps_the_state_and_its_count():
  x, state, *_ = ref.inputs((6, 5, 3), count=3)
  bad = x.at[0, 0, 1].set(jnp.nan)
  step = jax.jit(lambda x, s: jaxbn.batch_norm(x, s, training=True, skip_nonfinite=True))
  _, skipped = step(bad, state)
  for a, b in zip(skipped, state, strict=True):
    np.testing.assert_array_equal(a, b)  # count unchanged: how a caller sees the skip.
  _, taken = step(x, state)
  assert int(taken.count) == int(state.count) + 1
  _, poisoned = jaxbn.batch_norm(bad, state, training=True)
  assert np.isnan(poisoned.mean[1])  # without the flag a NaN batch poisons the state.
  inf_var = update_running_stats(state, state.mean, state.var.at[0].set(jnp.inf),
                                       skip_nonfinite=True)
  assert int(inf_var.count) == int(state.count)


def test_pytorch_style_momentum_warns():
  x, state, *_ = ref.inputs((6, 5, 3), count=3)
  with pytest.warns(UserWarning, match=r"PyTorch's momentum=0\.1 is jaxbn's momentum=0\.9"):
    jaxbn.batch_norm(x, state, training=True, momentum=0.1)
  with pytest.warns(UserWarning, match=r"`momentum`=0\.3"):
    update_running_stats(state, state.mean, state.var, momentum=0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # Not warned: the usual values, momentum 0, traced values, other conventions, inference.
    jaxbn.batch_norm(x, state, training=True, momentum=0.9)
    jaxbn.batch_norm(x, state, training=True, momentum=0.0)
    jax.jit(lambda m: jaxbn.batch_norm(x, state, training=True, momentum=m))(0.1)
    jaxbn.batch_norm(x, state, training=True, momentum=0.1, averaging="debiased_ema")
    jaxbn.batch_norm(x, state, training=False, momentum=0.1)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(averaging="mean"), ValueError,
     r"`averaging` must be one of \('ema', 'debiased_ema', 'cumulative'\), got 'mean'"),
    (dict(unbiased_var=True), ValueError, r"`unbiased_var=True` needs `batch_count`"),
    (dict(unbiased_var=True, batch_count=jnp.ones((1, 3))), ValueError,
     r"`batch_count` must be a scalar or of the feature shape \(3,\), got shape \(1, 3\)"),
    (dict(skip_nonfinite=1), TypeError, r"`skip_nonfinite` must be a Python bool, got 1"),
    (dict(momentum=1.5), ValueError, r"`momentum` must lie in \[0\.0, 1\.0\], got 1\.5"),
])
def test_update_running_stats_bad_input(kwargs, error, match):
  state = jaxbn.init_state(3)
  with pytest.raises(error, match=match):
    update_running_stats(state, state.mean, state.var, **kwargs)


def test_update_running_stats_shapes_are_checked():
  state = jaxbn.init_state(3)
  with pytest.raises(ValueError, match=r"`var` has shape \(4,\), but the feature shape"):
    update_running_stats(state, state.mean, jnp.ones(4))
