"""The numerical contract of the functional core, run against every implementation.

Each case compiles one function that calls ``batch_stats``, ``normalize`` and
``batch_norm`` in training and inference mode, and compares everything with
the float64 NumPy reference in ``_reference.py``.
"""

import functools

import _reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

IMPLEMENTATIONS = ref.IMPLEMENTATIONS

f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16


def _case(name, shape, axis, dtype, mask=None, affine="both", epsilon=1e-5, momentum=0.9):
  return pytest.param(shape, axis, dtype, mask, affine, epsilon, momentum, id=name)


# Masks: "random" drops 30% of the entries; "rows" is constant along the feature
# axes (one flag per example and position); "dead" is random with every entry
# of the first feature dropped; "trailing" has the shape of x without its first
# axis (lower rank, broadcast over the batch); "features" has the feature shape
# and drops the first feature entirely.
CASES = [
    _case("2d", (5, 3), -1, f32, affine="none", momentum=0.99),
    _case("2d-axis1-random", (5, 3), 1, f32, "random", epsilon=1e-3),
    _case("2d-bf16-rows", (5, 3), -1, bf16, "rows"),
    _case("2d-features", (5, 3), -1, f32, "features"),
    _case("3d-f16-scale", (7, 6, 5), -1, f16, affine="scale"),
    _case("3d-two-axes-bias", (7, 6, 5), (-1, -2), f32, "random", affine="bias", momentum=0.5),
    _case("3d-axis0", (7, 6, 5), 0, f32, momentum=0.99),
    _case("nhwc-dead", (4, 5, 6, 3), -1, f32, "dead"),
    _case("nhwc-axes13-bf16", (4, 5, 6, 3), (1, 3), bf16, "random"),
    _case("nhwc-f16-trailing", (4, 5, 6, 3), -1, f16, "trailing", affine="none"),
    _case("nchw", (3, 4, 5, 6), 1, f32),
    _case("nchw-neg-f16-rows", (3, 4, 5, 6), -3, f16, "rows", epsilon=1e-3),
    _case("nchw-bf16-dead", (3, 4, 5, 6), 1, bf16, "dead", affine="none"),
]


def _make_mask(kind, shape, axis, rng):
  if kind is None:
    return None
  feature_axes = ref.feature_axes(axis, len(shape))
  feature_shape = tuple(shape[i] for i in feature_axes)
  if kind == "random":
    return rng.random(shape) < 0.7
  if kind == "rows":
    row_shape = tuple(1 if i in feature_axes else d for i, d in enumerate(shape))
    mask = rng.random(row_shape) < 0.7
    mask.flat[:2] = True  # at least two entries per feature
    return mask
  if kind == "dead":
    mask = rng.random(shape) < 0.7
    first_feature = tuple(0 if i in feature_axes else slice(None) for i in range(len(shape)))
    mask[first_feature] = False
    return mask
  if kind == "trailing":
    return rng.random(shape[1:]) < 0.7
  if kind == "features":
    mask = np.ones(feature_shape, bool)
    mask.flat[0] = False
    return mask
  raise AssertionError(kind)


def _make_inputs(shape, axis, dtype, mask_kind, affine, seed=0):
  rng = np.random.default_rng(seed)
  feature_axes = ref.feature_axes(axis, len(shape))
  feature_shape = tuple(shape[i] for i in feature_axes)
  # Per-feature offsets and spreads, so that statistics differ between features.
  offset = ref.expand(rng.uniform(-3, 3, feature_shape), axis, len(shape))
  spread = ref.expand(rng.uniform(0.5, 2, feature_shape), axis, len(shape))
  x = jnp.asarray(offset + spread * rng.standard_normal(shape), dtype)
  state = jaxbn.BatchNormState(
      mean=jnp.asarray(rng.uniform(-1, 1, feature_shape), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 2, feature_shape), jnp.float32),
      count=jnp.asarray(3, jnp.int32),
  )
  scale = bias = None
  if affine in ("both", "scale"):
    scale = jnp.asarray(rng.uniform(0.5, 1.5, feature_shape), jnp.float32)
  if affine in ("both", "bias"):
    bias = jnp.asarray(rng.uniform(-1, 1, feature_shape), jnp.float32)
  mask = _make_mask(mask_kind, shape, axis, rng)
  return x, state, scale, bias, None if mask is None else jnp.asarray(mask)


def _everything(x, state, scale, bias, mask, *, axis, momentum, epsilon, implementation):
  """All public functions on one input, so that each case compiles once."""
  mean, var = jaxbn.batch_stats(x, axis, mask=mask)
  y_normalize = jaxbn.normalize(x, mean, var, scale, bias, axis=axis, epsilon=epsilon)
  common = dict(
      axis=axis, momentum=momentum, epsilon=epsilon, mask=mask, implementation=implementation
  )
  y_train, train_state = jaxbn.batch_norm(x, state, scale, bias, training=True, **common)
  y_eval, eval_state = jaxbn.batch_norm(x, state, scale, bias, training=False, **common)
  return (mean, var), y_normalize, (y_train, train_state), (y_eval, eval_state)


def _np(v):
  return None if v is None else np.asarray(v, np.float64)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("shape", "axis", "dtype", "mask_kind", "affine", "epsilon", "momentum"),
                         CASES)
def test_contract(implementation, shape, axis, dtype, mask_kind, affine, epsilon, momentum):
  x, state, scale, bias, mask = _make_inputs(shape, axis, dtype, mask_kind, affine)
  run = jax.jit(functools.partial(
      _everything, axis=axis, momentum=momentum, epsilon=epsilon, implementation=implementation
  ))
  (mean, var), y_normalize, (y_train, train_state), (y_eval, eval_state) = run(
      x, state, scale, bias, mask
  )

  # The reference sees exactly the (rounded) values that the library sees.
  x64, scale64, bias64 = _np(x), _np(scale), _np(bias)
  mask_np = None if mask is None else np.asarray(mask)
  tol, stats_tol = ref.tolerance(dtype), ref.stats_tolerance(dtype)
  feature_shape = state.mean.shape

  # batch_stats: float32 (at least) statistics of the valid entries.
  ref_mean, ref_var = ref.batch_stats(x64, axis, mask_np)
  stats_dtype = jnp.promote_types(dtype, jnp.float32)
  assert mean.shape == var.shape == feature_shape
  assert mean.dtype == var.dtype == stats_dtype
  ref.assert_close(mean, ref_mean, stats_tol, "batch_stats mean")
  ref.assert_close(var, ref_var, stats_tol, "batch_stats var")
  if mask_kind in ("dead", "features"):
    # A feature with no valid entry: mean 0 and variance 0, not NaN.
    assert ref_mean.flat[0] == ref_var.flat[0] == 0.0
    assert mean.ravel()[0] == var.ravel()[0] == 0.0

  # normalize with the library's own statistics.
  ref_y = ref.normalize(x64, _np(mean), _np(var), scale64, bias64, axis, epsilon)
  assert y_normalize.shape == x.shape and y_normalize.dtype == x.dtype
  ref.assert_close(y_normalize, ref_y, tol, "normalize")

  # batch_norm in training: batch statistics, moving averages, count + 1.
  ref_y, (ref_new_mean, ref_new_var, ref_count) = ref.batch_norm(
      x64, _np(state.mean), _np(state.var), int(state.count), scale64, bias64,
      training=True, axis=axis, momentum=momentum, epsilon=epsilon, mask=mask_np,
  )
  assert y_train.shape == x.shape and y_train.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(y_train, np.float64)))
  ref.assert_close(y_train, ref_y, tol, "batch_norm(training=True) y")
  assert [v.dtype for v in train_state] == [v.dtype for v in state]
  assert train_state.mean.shape == train_state.var.shape == feature_shape
  ref.assert_close(train_state.mean, ref_new_mean, stats_tol, "new state mean")
  ref.assert_close(train_state.var, ref_new_var, stats_tol, "new state var")
  assert int(train_state.count) == ref_count == 4

  # batch_norm in inference: running statistics, the state comes back unchanged.
  ref_y, _ = ref.batch_norm(
      x64, _np(state.mean), _np(state.var), int(state.count), scale64, bias64,
      training=False, axis=axis, epsilon=epsilon,
  )
  assert y_eval.shape == x.shape and y_eval.dtype == x.dtype
  ref.assert_close(y_eval, ref_y, tol, "batch_norm(training=False) y")
  for new, old in zip(eval_state, state, strict=True):
    assert new.dtype == old.dtype
    np.testing.assert_array_equal(new, old)


def test_empty_batch_has_zero_statistics():
  # Regression: an empty batch raised IndexError while picking the shift; like a
  # feature with no valid entry, it has mean 0 and variance 0.
  for mask in (None, jnp.ones((0, 1), bool)):
    mean, var = jaxbn.batch_stats(jnp.ones((0, 3)), mask=mask)
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(var, np.zeros(3))


def test_inference_returns_the_same_state_object():
  x = jnp.ones((4, 3))
  state = jaxbn.init_state(3)
  _, new_state = jaxbn.batch_norm(x, state, training=False)
  assert new_state is state


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_defaults_match_the_reference(implementation):
  # Default momentum 0.99, epsilon 1e-5, axis -1, no scale or bias; run eagerly.
  x, state, *_ = _make_inputs((6, 2), -1, f32, None, "none", seed=1)
  y, new_state = jaxbn.batch_norm(x, state, training=True, implementation=implementation)
  ref_y, (ref_mean, ref_var, _) = ref.batch_norm(
      _np(x), _np(state.mean), _np(state.var), 3, training=True
  )
  ref.assert_close(y, ref_y, ref.tolerance(f32))
  ref.assert_close(new_state.mean, ref_mean, ref.tolerance(f32))
  ref.assert_close(new_state.var, ref_var, ref.tolerance(f32))


@pytest.mark.parametrize("feature_shape", [3, (3,), (2, 3)])
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
def test_init_state(feature_shape, dtype):
  state = jaxbn.init_state(feature_shape, dtype)
  shape = (feature_shape,) if isinstance(feature_shape, int) else feature_shape
  assert isinstance(state, jaxbn.BatchNormState)
  # Half precision is promoted: running statistics are kept in float32.
  assert state.mean.dtype == state.var.dtype == jnp.float32
  assert state.mean.shape == state.var.shape == shape
  np.testing.assert_array_equal(state.mean, np.zeros(shape))
  np.testing.assert_array_equal(state.var, np.ones(shape))
  assert state.count.shape == () and state.count.dtype == jnp.int32 and int(state.count) == 0


def test_init_state_is_a_pytree_of_three_leaves():
  leaves, treedef = jax.tree.flatten(jaxbn.init_state(4))
  assert len(leaves) == 3
  assert isinstance(jax.tree.unflatten(treedef, leaves), jaxbn.BatchNormState)
  assert jaxbn.init_state(4)._fields == ("mean", "var", "count")


def test_untrained_state_in_inference_is_the_identity_up_to_epsilon():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), f32)
  y, _ = jaxbn.batch_norm(x, jaxbn.init_state(3), training=False, epsilon=1e-5)
  ref.assert_close(y, _np(x) / np.sqrt(1 + 1e-5), ref.tolerance(f32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"implementation": "reference"},
        {"unbiased_var": True},
        {"averaging": "cumulative"},
        {"averaging": "debiased_ema"},
        {"activation": "leaky_relu", "inplace": True},
        {"virtual_batch_size": 3},
        {"use_batch_stats": False},
    ],
    ids=lambda kwargs: "-".join(f"{k}={v}" for k, v in kwargs.items()) or "default",
)
def test_a_feature_without_valid_entries_keeps_its_running_statistics(kwargs):
  # Feature 1 is masked out everywhere: it has no batch statistics, so it is
  # normalized with the running ones and they stay as they are (no decay
  # towards 0, no NaN), whatever the averaging.
  x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (6, 3)), f32)
  mask = jnp.array([True, False, True])
  state = jaxbn.BatchNormState(jnp.array([1.0, 5.0, -2.0]), jnp.array([2.0, 4.0, 0.5]),
                               jnp.asarray(3, jnp.int32))
  scale, bias = jnp.array([1.5, 2.0, 0.5]), jnp.array([0.1, -0.3, 0.2])

  @jax.jit
  def step(x, state):
    return jaxbn.batch_norm(x, state, scale, bias, training=True, mask=mask, momentum=0.9,
                            **kwargs)

  y, new = step(x, state)
  assert np.isfinite(np.asarray(y)).all()
  np.testing.assert_array_equal(new.mean[1], state.mean[1])
  np.testing.assert_array_equal(new.var[1], state.var[1])
  assert int(new.count) == 4
  assert not np.allclose(new.mean[0], state.mean[0])  # the other features do move
  expected = ref.normalize(x, state.mean, state.var, scale, bias)[:, 1]
  if kwargs.get("activation") == "leaky_relu":
    expected = np.where(expected > 0, expected, 0.01 * expected)
  ref.assert_close(y[:, 1], expected, ref.tolerance(f32))


def test_a_feature_masked_out_on_every_device_keeps_its_running_statistics():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5, 2)), f32)
  mask = jnp.broadcast_to(jnp.array([True, False]), x.shape)
  state = jaxbn.BatchNormState(jnp.array([1.0, 5.0]), jnp.array([2.0, 4.0]),
                               jnp.asarray(0, jnp.int32))

  def step(x, mask):
    return jaxbn.batch_norm(x, state, training=True, mask=mask, axis_name="devices")

  y, new = jax.vmap(step, axis_name="devices", out_axes=(0, None))(x, mask)
  np.testing.assert_array_equal(new.mean[1], 5.0)
  np.testing.assert_array_equal(new.var[1], 4.0)
  ref.assert_close(y[..., 1], (x[..., 1] - 5.0) / np.sqrt(4.0 + 1e-5), ref.tolerance(f32))
