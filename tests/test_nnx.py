"""``jaxbn.nnx.BatchNorm`` against ``flax.nnx.BatchNorm`` (``use_fast_variance=False``).

Same state (tree, shapes, dtypes), and with Flax's state loaded the same
outputs, updated statistics and gradients, eagerly and under ``nnx.jit``,
``nnx.vmap`` (named axis and ensembles) and ``nnx.scan``, on the first call
and on the second.
"""

import warnings

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn.nnx
from tests import _reference

f32, bf16 = jnp.float32, jnp.bfloat16
CLASSES = (nnx.BatchNorm, jaxbn.nnx.BatchNorm)

# (shape, axis): features last and NCHW.
LAYOUTS = [((12, 5), -1), ((4, 3, 2, 2), 1)]


def _input(shape, dtype=f32, offset=3.0, seed=0):
  x = offset + 2.0 * np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(x, dtype)


def _pair(num_features, **kwargs):
  """Flax's module and ours, ours holding a perturbed copy of Flax's state."""
  flax_bn = nnx.BatchNorm(num_features, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
  ours = jaxbn.nnx.BatchNorm(num_features, use_fast_variance=False, rngs=nnx.Rngs(1), **kwargs)
  state = nnx.state(flax_bn)
  assert _reference.tree_spec(nnx.state(ours)) == _reference.tree_spec(state)
  rng = np.random.default_rng(1)
  state = jax.tree.map(
    lambda v: (v + 0.3 * rng.uniform(0.5, 1.0, size=v.shape)).astype(v.dtype), state
  )
  nnx.update(flax_bn, state)
  nnx.update(ours, state)
  return flax_bn, ours


def _train_step(model, x, **kwargs):
  """Output, gradients w.r.t. params and x, then the updated statistics."""

  def loss(model, x):
    y = model(x, **kwargs)
    return jnp.sum(jnp.sin(2.0 * y.astype(f32))), y

  grads, y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
  return y, grads, nnx.state(model, nnx.BatchStat)


def test_is_an_instance_of_flax_batch_norm():
  assert isinstance(jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_flax_state_gives_the_same_outputs_statistics_and_gradients(shape, axis, masked):
  flax_bn, ours = _pair(shape[axis], axis=axis, momentum=0.8)
  x = _input(shape)
  mask = _reference.partial_mask(shape) if masked else None
  old_mean, old_var = ours.mean[...], ours.var[...]
  got = _train_step(ours, x, mask=mask)
  _reference.assert_trees_close(got, _train_step(flax_bn, x, mask=mask))
  # The statistics against the float64 reference.
  _, (mean, var, _) = _reference.batch_norm(
    x, old_mean, old_var, 0, training=True, axis=axis, momentum=0.8, mask=mask
  )
  np.testing.assert_allclose(ours.mean[...], mean, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ours.var[...], var, rtol=2e-5, atol=2e-5)
  _reference.assert_trees_close(
    ours(x, use_running_average=True), flax_bn(x, use_running_average=True)
  )


def test_several_feature_axes_hold_num_features_values_and_match_the_reference():
  # flax.nnx.BatchNorm cannot update its (num_features,) statistics from (2, 3)
  # batch statistics; here num_features = 2 * 3 values are read and written in place.
  bn = jaxbn.nnx.BatchNorm(6, axis=(1, 2), momentum=0.8, rngs=nnx.Rngs(0))
  bn.scale[...] = jnp.linspace(0.5, 1.5, 6)
  x = _input((6, 2, 3, 4))
  y = bn(x)
  assert bn.mean[...].shape == (6,)
  scale = bn.scale[...].reshape(2, 3)
  y_ref, (mean, var, _) = _reference.batch_norm(
    x, np.zeros((2, 3)), np.ones((2, 3)), 0, scale, training=True, axis=(1, 2), momentum=0.8
  )
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(bn.mean[...], mean.reshape(6), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(bn.var[...], var.reshape(6), rtol=2e-5, atol=2e-5)
  bn.eval()
  np.testing.assert_allclose(
    bn(x), _reference.normalize(x, mean, var, scale, axis=(1, 2)), rtol=2e-5, atol=2e-5
  )


@pytest.mark.parametrize(("use_scale", "use_bias"), [(False, True), (True, False), (False, False)])
def test_without_scale_or_bias_the_state_and_outputs_match(use_scale, use_bias):
  flax_bn, ours = _pair(4, use_scale=use_scale, use_bias=use_bias)
  assert (ours.scale is None, ours.bias is None) == (not use_scale, not use_bias)
  x = _input((10, 4))
  _reference.assert_trees_close(_train_step(ours, x), _train_step(flax_bn, x))


@pytest.mark.parametrize(
  ("x_dtype", "dtype", "param_dtype"),
  [(bf16, None, f32), (bf16, None, bf16), (f32, bf16, f32), (jnp.int32, None, f32)],
)
def test_dtype_promotion_matches_flax(x_dtype, dtype, param_dtype):
  # nnx promotes the input, the statistics and the params together (float32
  # statistics make the default output float32); `dtype` overrides that.
  flax_bn, ours = _pair(3, dtype=dtype, param_dtype=param_dtype)
  x = _input((16, 3), x_dtype)
  y, y_flax = ours(x), flax_bn(x)
  assert y.dtype == y_flax.dtype == (dtype or f32)
  _reference.assert_trees_close(
    (y, nnx.state(ours, nnx.BatchStat)), (y_flax, nnx.state(flax_bn, nnx.BatchStat))
  )
  assert ours.mean[...].dtype == f32


def test_train_eval_view_and_call_time_override():
  _, bn = _pair(3, momentum=0.5)
  x = _input((8, 3))
  stats = nnx.clone(nnx.state(bn, nnx.BatchStat))
  bn.eval()
  assert bn.use_running_average is True
  y_eval = bn(x)
  _reference.assert_trees_close(
    nnx.state(bn, nnx.BatchStat), stats
  )  # eval leaves the statistics alone
  bn.train()
  assert bn.use_running_average is False
  y_train = bn(x)
  assert not np.allclose(bn.mean[...], stats["mean"][...])
  np.testing.assert_allclose(y_train.mean(0), bn.bias[...], atol=1e-5)
  # nnx.view makes an inference view sharing the variables; the module stays in training.
  view = nnx.view(bn, use_running_average=True)
  assert view.use_running_average is True and bn.use_running_average is False
  stats = nnx.clone(nnx.state(bn, nnx.BatchStat))
  _reference.assert_trees_close(view(x), bn(x, use_running_average=True))  # call-time argument wins
  _reference.assert_trees_close(nnx.state(bn, nnx.BatchStat), stats)
  assert not np.allclose(view(x), y_eval)  # the statistics moved in between
  bn.use_running_average = None
  with pytest.raises(ValueError, match="use_running_average"):
    bn(x)


def test_jitted_training_step_with_an_optimizer_matches_flax_and_traces_once():
  class Model(nnx.Module):
    def __init__(self, norm, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.bn = norm(4, momentum=0.8, use_fast_variance=False, rngs=rngs)
      self.out = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.bn(self.linear(x))))

  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, target):
    traces.append(None)  # runs only while tracing

    def loss_fn(model):
      return jnp.mean((model(x) - target) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  x = _input((16, 3))
  target = jnp.sin(x.sum(axis=1, keepdims=True))
  results = []
  for norm in CLASSES:
    model = Model(norm, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    losses = [train_step(model, optimizer, x, target) for _ in range(2)]
    results.append((losses, nnx.state(model)))
  assert len(traces) == 2  # once per model class, not once per step
  _reference.assert_trees_close(results[1], results[0])


@pytest.mark.parametrize("norm", CLASSES, ids=["flax", "jaxbn"])
def test_vmap_with_axis_name_twice_gives_full_batch_statistics(norm):
  x = _input((4, 6, 3))
  bn = norm(3, axis_name="batch", momentum=0.5, use_fast_variance=False, rngs=nnx.Rngs(0))
  full = norm(3, momentum=0.5, use_fast_variance=False, rngs=nnx.Rngs(0))

  @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
  def forward(bn, x):
    return bn(x)

  for _ in range(2):  # the second call reads the state the first one wrote
    y = forward(bn, x)
    y_full = full(x.reshape(24, 3))
    _reference.assert_trees_close(y.reshape(24, 3), y_full)
    _reference.assert_trees_close(nnx.state(bn), nnx.state(full))


def _ensemble(norm, members=4):
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return norm(3, momentum=0.5, use_fast_variance=False, rngs=nnx.Rngs(key))

  return create(jax.random.split(jax.random.key(0), members))


def test_vmap_ensemble_and_scan_over_layers_match_flax_on_two_calls():
  x = _input((4, 6, 3))

  @nnx.vmap(in_axes=(0, 0), out_axes=0)
  def ensemble_forward(bn, x):
    return bn(x)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def layers(bn, h):
    return jnp.tanh(bn(h)) + h

  results = []
  for norm in CLASSES:
    ensemble, stack = _ensemble(norm), _ensemble(norm)
    outputs = []
    for _ in range(2):
      outputs.append(ensemble_forward(ensemble, x))
      outputs.append(layers(stack, x[0]))
    results.append((outputs, nnx.state(ensemble), nnx.state(stack)))
  assert results[1][1]["mean"][...].shape == (4, 3)
  _reference.assert_trees_close(results[1], results[0])


# Flax writes the complex batch mean into its float32 running mean, with warnings.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
def test_complex_input_is_handed_to_flax():
  flax_bn, ours = _pair(3, dtype=jnp.complex64)
  x = jax.random.normal(jax.random.key(0), (6, 3), jnp.complex64)
  _reference.assert_trees_close((ours(x), nnx.state(ours)), (flax_bn(x), nnx.state(flax_bn)))


def test_single_value_per_feature_in_training_warns_and_follows_flax():
  # nnx modules start in training mode, so a single example is easy to pass by
  # mistake (e.g. to nnx.tabulate); Flax returns the bias, jaxbn.batch_norm raises.
  flax_bn, ours = _pair(3)
  x = _input((1, 3))
  with pytest.warns(UserWarning, match="single value per feature"):
    y = ours(x)
  _reference.assert_trees_close((y, nnx.state(ours)), (flax_bn(x), nnx.state(flax_bn)))
  ours.eval()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ours(x)


# Regression: a model closed over by `nnx.vmap`/`jax.vmap` without an axis name failed
# in Flax's trace machinery ("Cannot mutate BatchStat from a different trace level").
@pytest.mark.parametrize("vmap", [nnx.vmap, jax.vmap])
def test_vmap_over_shared_statistics_without_axis_name_says_why_and_the_fixes(vmap):
  x = _input((2, 4, 3))
  model = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(flax.errors.TraceContextError) as error:
    vmap(lambda x: model(x))(x)
  message = str(error.value)
  assert "shared BatchStat" in message
  assert "axis_name='batch'" in message and "nnx.StateAxes({nnx.BatchStat: 0" in message
  np.testing.assert_array_equal(model.mean[...], 0.0)  # nothing was written


def test_the_fixes_of_the_shared_statistics_error_work():
  x = _input((2, 4, 3))
  # The statistics of the whole batch: an axis name on the map and on the module.
  model = jaxbn.nnx.BatchNorm(3, momentum=0.5, axis_name="batch", rngs=nnx.Rngs(0))
  nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(model, x)
  np.testing.assert_allclose(model.mean[...], 0.5 * x.reshape(8, 3).mean(0), rtol=1e-5)
  # Each member its own statistics.
  model = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
  model.mean, model.var = nnx.BatchStat(jnp.zeros((2, 3))), nnx.BatchStat(jnp.ones((2, 3)))
  axes = nnx.StateAxes({nnx.BatchStat: 0, ...: None})
  nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0))(model, x)
  np.testing.assert_allclose(model.mean[...], 0.5 * x.mean(1), rtol=1e-5)
