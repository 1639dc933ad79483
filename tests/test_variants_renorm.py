"""Batch Renormalization: Keras 3 parity, float64 reference, limits, schedules, errors."""

import functools
import os

import _reference_variants as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import IMPLEMENTATIONS, assert_close, tolerance
from jax.test_util import check_grads

import jaxbn
from jaxbn._renorm import Renorm, init_renorm_state

F32 = tolerance(jnp.float32)
FIELDS = ("mean", "var", "std", "renorm_mean", "renorm_std")


def _batches(shape, axis, steps, seed=0):
  # Drifting offsets and spreads, so that r and d move and some of them clip.
  rng = np.random.default_rng(seed)
  c = shape[axis]
  offset, spread = rng.uniform(-2, 2, c), rng.uniform(0.3, 3, c)
  return [jnp.asarray(ref.expand(offset * (1 + t), axis, len(shape)) + ref.expand(
      spread, axis, len(shape)) * rng.standard_normal(shape), jnp.float32) for t in range(steps)]


def test_matches_keras_outputs_statistics_and_gradients():
  os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  assert keras.backend.backend() == "jax"
  settings = dict(r_max=1.4, r_min=0.8, d_max=0.3)
  layer = keras.layers.BatchNormalization(
      axis=1, momentum=0.9, epsilon=1e-3, renorm=True, renorm_momentum=0.7,
      renorm_clipping={"rmax": 1.4, "rmin": 0.8, "dmax": 0.3})
  layer.build((6, 4, 5))
  rng = np.random.default_rng(1)
  gamma, beta = rng.uniform(0.5, 1.5, 4), rng.uniform(-1, 1, 4)
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  scale, bias = jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32)
  renorm = Renorm(momentum=0.7, **settings)

  def keras_loss(trainable, non_trainable, x):
    y, non_trainable = layer.stateless_call(trainable, non_trainable, x, training=True)
    return jnp.sum(jnp.sin(2 * y)), (y, non_trainable)

  @functools.partial(jax.jit, static_argnames="implementation")
  def jaxbn_loss(scale, bias, state, x, implementation):
    y, state = jaxbn.batch_norm(x, state, scale, bias, training=True, axis=1, momentum=0.9,
                                epsilon=1e-3, renorm=renorm, implementation=implementation)
    return jnp.sum(jnp.sin(2 * y)), (y, state)

  keras_step = jax.jit(jax.value_and_grad(keras_loss, argnums=(0, 2), has_aux=True))
  ours_step = jax.value_and_grad(jaxbn_loss, argnums=(0, 1, 3), has_aux=True)
  trainable = [v.value for v in layer.trainable_variables]  # gamma, beta
  non_trainable = [v.value for v in layer.non_trainable_variables]
  names = [v.path.split("/")[-1] for v in layer.non_trainable_variables]
  states = {impl: init_renorm_state(4) for impl in IMPLEMENTATIONS}
  clipped = 0
  for x in _batches((6, 4, 5), 1, steps=4):
    (_, (y_keras, non_trainable)), (d_trainable, dx_keras) = keras_step(
        trainable, non_trainable, x)
    keras_vars = dict(zip(names, non_trainable, strict=True))
    for impl in states:
      sigma = np.maximum(states[impl].renorm_std, np.sqrt(1e-3))
      r = np.sqrt(np.var(np.asarray(x), axis=(0, 2)) + 1e-3) / sigma
      clipped += int(np.sum((r < 0.8) | (r > 1.4)))
      (_, (y, states[impl])), (dscale, dbias, dx) = ours_step(scale, bias, states[impl], x, impl)
      assert_close(y, np.asarray(y_keras, np.float64), 2e-5, f"{impl} y")
      for ours, theirs in [(dscale, d_trainable[0]), (dbias, d_trainable[1]), (dx, dx_keras)]:
        assert_close(ours, np.asarray(theirs, np.float64), 2e-5, f"{impl} gradients")
      for field, name in zip(FIELDS, ("moving_mean", "moving_variance", "moving_stddev",
                                      "renorm_mean", "renorm_stddev"), strict=True):
        assert_close(getattr(states[impl], field), np.asarray(keras_vars[name], np.float64),
                     F32, f"{impl} {field}")
  assert clipped > 0  # the clipping took part.


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "inplace"])
def test_against_the_float64_reference_nhwc(implementation):
  renorm = Renorm(r_max=1.3, d_max=0.5, momentum=0.8)
  kwargs = dict(momentum=0.9, epsilon=1e-3, renorm=renorm,
                implementation="fused" if implementation == "inplace" else implementation,
                inplace=implementation == "inplace")
  rng = np.random.default_rng(2)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32)
  bias = jnp.asarray(rng.uniform(-1, 1, 3), jnp.float32)
  step = jax.jit(lambda x, state: jaxbn.batch_norm(x, state, scale, bias, training=True,
                                                   **kwargs))
  state = init_renorm_state(3)
  state64 = {k: np.asarray(v, np.float64) for k, v in state._asdict().items()}
  for x in _batches((4, 3, 5, 3), -1, steps=3, seed=3):
    y, state = step(x, state)
    y64, state64 = ref.renorm(np.asarray(x, np.float64), state64, scale, bias, axis=-1,
                              momentum=0.9, epsilon=1e-3, r_max=1.3, d_max=0.5, r_min=1 / 1.3,
                              renorm_momentum=0.8)
    assert_close(y, y64, 4 * F32, "y")
    for field in FIELDS:
      assert_close(getattr(state, field), state64[field], F32, field)
    assert int(state.count) == state64["count"]
  y, same = jaxbn.batch_norm(x, state, scale, bias, training=False, epsilon=1e-3)
  assert same is state
  assert_close(y, ref.normalize(np.asarray(x, np.float64), state.mean, state.var, scale, bias,
                                epsilon=1e-3), F32, "inference")


def test_r_max_one_and_d_max_zero_is_batch_norm():
  x = _batches((6, 4), -1, steps=1)[0]
  state = init_renorm_state(4)._replace(renorm_mean=jnp.full(4, 3.0), renorm_std=jnp.full(4, 9.0))

  def loss(x, renorm):
    y, _ = jaxbn.batch_norm(x, state, training=True, renorm=renorm)
    return jnp.sum(jnp.sin(y)), y

  (_, y), g = jax.value_and_grad(loss, has_aux=True)(x, Renorm(r_max=1.0, d_max=0.0))
  (_, y_bn), g_bn = jax.value_and_grad(loss, has_aux=True)(x, None)
  assert_close(y, np.asarray(y_bn, np.float64), F32)
  assert_close(g, np.asarray(g_bn, np.float64), F32)


def test_schedules_of_the_step_count_and_traced_bounds():
  x = _batches((6, 4), -1, steps=1, seed=4)[0]
  state = init_renorm_state(4)._replace(renorm_mean=jnp.full(4, 1.0), renorm_std=jnp.full(4, 4.0),
                                        count=jnp.asarray(7, jnp.int32))
  schedule = Renorm(r_max=lambda t: 1 + t / 7, d_max=lambda t: t / 14)  # 2 and 0.5 at t = 7
  fixed = Renorm(r_max=2.0, d_max=0.5)
  run = jax.jit(lambda x, state, renorm: jaxbn.batch_norm(x, state, training=True,
                                                          renorm=renorm)[0])
  traced = Renorm(r_max=jnp.float32(2.0), d_max=jnp.float32(0.5))
  y_fixed = np.asarray(jaxbn.batch_norm(x, state, training=True, renorm=fixed)[0], np.float64)
  assert_close(jaxbn.batch_norm(x, state, training=True, renorm=schedule)[0], y_fixed, F32)
  assert_close(run(x, state, traced), y_fixed, F32)


def test_check_grads_float64_where_r_and_d_clip():
  # r and d get no gradient; where they clip they are locally constant, so finite
  # differences see the same derivatives.
  with jax.enable_x64(True):
    x = jnp.asarray(_batches((6, 3), -1, steps=1, seed=5)[0], jnp.float64)
    state = init_renorm_state(3, jnp.float64)._replace(
        renorm_mean=jnp.asarray([10.0, -100.0, 10.0]), renorm_std=jnp.asarray([0.05, 40.0, 0.05]))
    scale, bias = jnp.asarray([1.2, 0.7, 1.0]), jnp.asarray([0.1, -0.2, 0.3])

    def f(x, scale, bias):
      return jaxbn.batch_norm(x, state, scale, bias, training=True,
                              renorm=Renorm(r_max=1.5, d_max=0.5))[0]

    check_grads(jax.jit(f), (x, scale, bias), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize(("renorm", "state", "kwargs", "error", "match"), [
    (Renorm(r_max=0.5), None, {}, ValueError,
     r"`renorm\.r_max` must lie in \[1\.0, inf\], got 0\.5"),
    (Renorm(d_max=-1.0), None, {}, ValueError,
     r"`renorm\.d_max` must lie in \[0\.0, inf\], got -1\.0"),
    (Renorm(r_min=1.5), None, {}, ValueError,
     r"`renorm\.r_min` must lie in \[0\.0, 1\.0\], got 1\.5"),
    (Renorm(momentum=2.0), None, {}, ValueError, r"`renorm\.momentum` must lie in \[0\.0, 1\.0\]"),
    (Renorm(r_max="3"), None, {}, TypeError,
     r"`renorm\.r_max` must be a float, a scalar array or a function of the step count, got '3'"),
    (Renorm(d_max=jnp.ones(2)), None, {}, ValueError,
     r"`renorm\.d_max` must be a scalar, got shape \(2,\)"),
    ({"r_max": 3.0}, None, {}, TypeError, r"`renorm` must be a jaxbn\.Renorm"),
    (Renorm(), jaxbn.init_state(3), {}, TypeError,
     r"`state` must be a RenormState from `jaxbn\.init_renorm_state\(feature_shape\)`, got "
     r"BatchNormState without std, renorm_mean, renorm_std"),
    (Renorm(), None, dict(averaging="cumulative"), ValueError,
     r"`averaging` must be 'ema' and `unbiased_var` False, got 'cumulative' and False"),
])
def test_bad_input(renorm, state, kwargs, error, match):
  state = init_renorm_state(3) if state is None else state
  with pytest.raises(error, match=match):
    jax.jit(lambda x: jaxbn.batch_norm(x, state, training=True, renorm=renorm, **kwargs))(
        jnp.ones((5, 3)))


# Regression: a feature with no valid entry got r and d from the running statistics that
# stand in for the batch's (r = sqrt(var + eps) / renorm_std): at the initial state y = x,
# where inference gives x / sqrt(1 + eps).
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("virtual_batch_size", [None, 3])
def test_a_feature_without_valid_entries_is_normalized_as_in_inference(
    implementation, virtual_batch_size
):
  rng = np.random.default_rng(0)
  x = jnp.asarray(2.0 + 3.0 * rng.standard_normal((6, 3)), jnp.float32)
  mask = jnp.ones((6, 3), bool).at[:, 1].set(False)  # feature 1 is masked out everywhere
  if virtual_batch_size:
    mask = mask.at[3:, 2].set(False)  # feature 2 is masked out in the second ghost batch
  state = init_renorm_state(3)._replace(
      mean=jnp.asarray([0.5, -1.0, 0.2]), var=jnp.asarray([2.0, 4.0, 0.5]),
      renorm_mean=jnp.asarray([0.3, 0.7, -0.4]), renorm_std=jnp.asarray([1.5, 0.6, 2.5]))
  scale, bias = jnp.asarray([1.2, 0.8, 1.1]), jnp.asarray([0.1, -0.3, 0.2])
  train, new_state = jaxbn.batch_norm(
      x, state, scale, bias, training=True, mask=mask, renorm=Renorm(r_max=3.0, d_max=5.0),
      virtual_batch_size=virtual_batch_size, implementation=implementation)
  inference, _ = jaxbn.batch_norm(x, state, scale, bias, training=False)
  assert_close(train[:, 1], np.asarray(inference[:, 1], np.float64), F32)
  if virtual_batch_size:
    assert_close(train[3:, 2], np.asarray(inference[3:, 2], np.float64), F32)
  for field in FIELDS:  # the statistics of the unseen feature stay as they were
    np.testing.assert_array_equal(getattr(new_state, field)[1], getattr(state, field)[1])
