"""``jaxbn.linen.BatchNorm`` against ``flax.linen.BatchNorm`` (``use_fast_variance=False``).

Same variables (tree, names, shapes, dtypes), and with Flax-made variables the
same outputs, updated statistics and gradients, to float32 rounding (bfloat16
rounding for bfloat16 outputs).
"""

import warnings

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn.linen
from tests import _reference

f32, bf16 = jnp.float32, jnp.bfloat16

# (shape, axis): features last, NCHW, and two feature axes.
LAYOUTS = [((12, 5), -1), ((4, 3, 2, 2), 1), ((6, 2, 3), (1, 2))]


def _input(shape, dtype=f32, offset=3.0, seed=0):
  x = offset + 2.0 * np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(x, dtype)


def _perturbed(variables, seed=1):
  """Moves every variable off its initial value so that none is trivial."""
  leaves, treedef = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  leaves = [
    (leaf + 0.3 * rng.uniform(0.5, 1.0, size=leaf.shape)).astype(leaf.dtype) for leaf in leaves
  ]
  return jax.tree.unflatten(treedef, leaves)


def _pair(**kwargs):
  return (
    nn.BatchNorm(use_fast_variance=False, **kwargs),
    jaxbn.linen.BatchNorm(use_fast_variance=False, **kwargs),
  )


def _train_step(module, variables, x, **kwargs):
  """Training-mode output, updated statistics, and gradients w.r.t. params and x."""

  def loss(params, x):
    y, updates = module.apply(
      {**variables, "params": params},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
      **kwargs,
    )
    return jnp.sum(jnp.sin(2.0 * y.astype(f32))), (y, updates["batch_stats"])

  grads, (y, stats) = jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x)
  return y, stats, grads


def test_is_an_instance_of_flax_batch_norm():
  assert isinstance(jaxbn.linen.BatchNorm(), nn.BatchNorm)
  assert issubclass(jaxbn.linen.BatchNorm, nn.BatchNorm)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_flax_variables_give_the_same_outputs_statistics_and_gradients(shape, axis, masked):
  flax_bn, ours = _pair(axis=axis, momentum=0.8)
  x = _input(shape)
  mask = _reference.partial_mask(shape) if masked else None
  key = jax.random.key(0)
  flax_vars = flax_bn.init(key, x, use_running_average=True)
  assert _reference.tree_spec(ours.init(key, x, use_running_average=True)) == _reference.tree_spec(
    flax_vars
  )
  flax_vars = _perturbed(flax_vars)

  got = _train_step(ours, flax_vars, x, mask=mask)
  want = _train_step(flax_bn, flax_vars, x, mask=mask)
  _reference.assert_trees_close(got, want)
  # And the float64 reference, for the statistics.
  stats = flax_vars["batch_stats"]
  _, (mean, var, _) = _reference.batch_norm(
    x, stats["mean"], stats["var"], 0, training=True, axis=axis, momentum=0.8, mask=mask
  )
  np.testing.assert_allclose(got[1]["mean"], mean, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got[1]["var"], var, rtol=2e-5, atol=2e-5)
  # Inference with the updated statistics.
  evaluated = {**flax_vars, "batch_stats": got[1]}
  _reference.assert_trees_close(
    ours.apply(evaluated, x, use_running_average=True),
    flax_bn.apply(evaluated, x, use_running_average=True),
  )


@pytest.mark.parametrize(("use_scale", "use_bias"), [(False, True), (True, False), (False, False)])
def test_without_scale_or_bias_the_variables_and_outputs_match(use_scale, use_bias):
  flax_bn, ours = _pair(use_scale=use_scale, use_bias=use_bias, use_running_average=False)
  x = _input((10, 4))
  flax_vars = flax_bn.init(jax.random.key(0), x)
  assert _reference.tree_spec(ours.init(jax.random.key(0), x)) == _reference.tree_spec(flax_vars)
  if not (use_scale or use_bias):
    assert "params" not in flax_vars
  y, stats = ours.apply(flax_vars, x, mutable=["batch_stats"])
  y_flax, stats_flax = flax_bn.apply(flax_vars, x, mutable=["batch_stats"])
  _reference.assert_trees_close((y, stats), (y_flax, stats_flax))


@pytest.mark.parametrize(
  ("x_dtype", "dtype", "param_dtype"),
  [(bf16, None, f32), (bf16, None, bf16), (f32, bf16, f32), (bf16, f32, bf16), (f32, None, bf16)],
)
def test_dtype_promotion_matches_flax(x_dtype, dtype, param_dtype):
  flax_bn, ours = _pair(dtype=dtype, param_dtype=param_dtype)
  x = _input((16, 3), x_dtype)
  flax_vars = flax_bn.init(jax.random.key(0), x, use_running_average=True)
  assert _reference.tree_spec(
    ours.init(jax.random.key(0), x, use_running_average=True)
  ) == _reference.tree_spec(flax_vars)
  assert flax_vars["batch_stats"]["mean"].dtype == f32  # statistics stay float32
  flax_vars = _perturbed(flax_vars)
  got, want = _train_step(ours, flax_vars, x), _train_step(flax_bn, flax_vars, x)
  _reference.assert_trees_close(got, want)


def test_force_float32_reductions_false_stores_statistics_in_param_dtype_like_flax():
  flax_bn, ours = _pair(param_dtype=bf16, force_float32_reductions=False)
  x = _input((8, 3), bf16)
  variables = ours.init(jax.random.key(0), x, use_running_average=True)
  assert _reference.tree_spec(variables) == _reference.tree_spec(
    flax_bn.init(jax.random.key(0), x, use_running_average=True)
  )
  assert variables["batch_stats"]["var"].dtype == bf16
  # The reductions still run in float32, so our statistics are at least as accurate.
  _, stats = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  mean, _ = _reference.batch_stats(x)
  np.testing.assert_allclose(
    np.asarray(stats["batch_stats"]["mean"], np.float32), 0.01 * mean, rtol=1e-2
  )


def test_init_computes_batch_statistics_but_does_not_store_them():
  flax_bn, ours = _pair(use_running_average=False, momentum=0.9)
  x = _input((8, 3))
  y, variables = ours.init_with_output(jax.random.key(0), x)
  y_flax, flax_vars = flax_bn.init_with_output(jax.random.key(0), x)
  _reference.assert_trees_close((y, variables), (y_flax, flax_vars))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
  # The axis name need not be bound while initializing, as in Flax.
  _, named = _pair(use_running_average=False, axis_name="batch")
  named.init(jax.random.key(0), x)


def test_use_running_average_is_merged_like_flax():
  x = _input((4, 3))
  for module in _pair(use_running_average=True):
    with pytest.raises(ValueError, match="use_running_average"):
      module.init(jax.random.key(0), x, use_running_average=True)
  for module in _pair():
    with pytest.raises(ValueError, match="use_running_average"):
      module.init(jax.random.key(0), x)
  flax_bn, ours = _pair(use_running_average=True)
  variables = _perturbed(flax_bn.init(jax.random.key(0), x))
  # Inference needs no mutable collection and leaves the statistics alone.
  _reference.assert_trees_close(ours.apply(variables, x), flax_bn.apply(variables, x))


def test_axis_name_under_vmap_gives_full_batch_statistics():
  flax_bn, ours = _pair(use_running_average=False, axis_name="batch", momentum=0.5)
  x = _input((4, 6, 3))  # 4 mapped shards of 6 rows
  variables = _perturbed(ours.init(jax.random.key(0), x[0]))

  def apply(module, x):
    return module.apply(variables, x, mutable=["batch_stats"])

  got = jax.vmap(lambda x: apply(ours, x), axis_name="batch")(x)
  want = jax.vmap(lambda x: apply(flax_bn, x), axis_name="batch")(x)
  _reference.assert_trees_close(got, want)
  # The same as one module seeing the whole batch.
  _, unmapped = _pair(use_running_average=False, momentum=0.5)
  y, stats = unmapped.apply(variables, x.reshape(24, 3), mutable=["batch_stats"])
  _reference.assert_trees_close(
    (got[0].reshape(24, 3), jax.tree.map(lambda v: v[0], got[1])), (y, stats)
  )


def test_jitted_module_in_a_model_matches_flax_twice():
  class Net(nn.Module):
    norm: type[nn.BatchNorm]

    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(4)(x)
      x = self.norm(use_running_average=not train, use_fast_variance=False)(x)
      return nn.Dense(2)(nn.relu(x))

  x = _input((8, 3))
  nets = Net(nn.BatchNorm), Net(jaxbn.linen.BatchNorm)
  variables = nets[0].init(jax.random.key(0), x, train=False)
  results = []
  for net in nets:
    step = jax.jit(lambda v, x, net=net: net.apply(v, x, train=True, mutable=["batch_stats"]))
    v = variables
    for _ in range(2):
      y, updates = step(v, x)
      v = {**v, **updates}
    results.append((y, v))
  _reference.assert_trees_close(results[0], results[1])


def test_complex_input_is_handed_to_flax():
  flax_bn, ours = _pair(use_running_average=False, dtype=jnp.complex64)
  x = jax.random.normal(jax.random.key(0), (6, 3), jnp.complex64)
  variables = flax_bn.init(jax.random.key(1), x)
  _reference.assert_trees_close(
    ours.apply(variables, x, mutable=["batch_stats"]),
    flax_bn.apply(variables, x, mutable=["batch_stats"]),
  )


def test_single_value_per_feature_in_training_warns_and_follows_flax():
  # Flax allows it (variance 0: the output is the bias); jaxbn.batch_norm raises.
  flax_bn, ours = _pair(use_running_average=False)
  x = _input((1, 3))
  variables = _perturbed(flax_bn.init(jax.random.key(0), x))
  with pytest.warns(UserWarning, match="single value per feature"):
    got = ours.apply(variables, x, mutable=["batch_stats"])
  _reference.assert_trees_close(got, flax_bn.apply(variables, x, mutable=["batch_stats"]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # inference on one example is fine
    _pair()[1].apply(variables, x, use_running_average=True)


def test_integer_input_is_promoted_to_the_params_dtype_like_flax():
  flax_bn, ours = _pair(use_running_average=False)
  x = jnp.arange(12, dtype=jnp.int32).reshape(4, 3)
  variables = flax_bn.init(jax.random.key(0), x)
  got = ours.apply(variables, x, mutable=["batch_stats"])
  assert got[0].dtype == f32
  _reference.assert_trees_close(got, flax_bn.apply(variables, x, mutable=["batch_stats"]))


class _Net(nn.Module):
  """A user's model: Dense then BatchNorm, switched by ``train``."""

  @nn.compact
  def __call__(self, x, train: bool):
    return jaxbn.linen.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))


# Regression: training without `mutable=["batch_stats"]` gave Flax's bare
# "collection "batch_stats" is immutable", which does not say what to do.
def test_training_apply_without_mutable_batch_stats_says_how_to_fix_it():
  x = _input((6, 2))
  variables = _Net().init(jax.random.key(0), x, train=False)
  with pytest.raises(jaxbn.linen.ImmutableBatchStatsError) as error:
    _Net().apply(variables, x, train=True)
  message = str(error.value)
  assert "'/BatchNorm_0'" in message and "training mode" in message
  assert 'mutable=["batch_stats"]' in message and 'updates["batch_stats"]' in message
  assert "use_running_average=True" in message and "update_stats=False" in message
  # Code that catches Flax's error keeps catching ours.
  assert isinstance(error.value, flax.errors.ModifyScopeVariableError)
  y, updates = _Net().apply(variables, x, train=True, mutable=["batch_stats"])  # the fix
  assert set(updates) == {"batch_stats"}


# Regression: `apply({"params": params}, ...)` gave Flax's "Tried to access "mean" from
# collection "batch_stats" ... but the collection is empty".
@pytest.mark.parametrize("train", [False, True])
def test_apply_without_batch_stats_says_how_to_pass_them(train):
  x = _input((6, 2))
  variables = _Net().init(jax.random.key(0), x, train=False)
  with pytest.raises(jaxbn.linen.MissingBatchStatsError) as error:
    _Net().apply({"params": variables["params"]}, x, train=train)
  message = str(error.value)
  assert "'/BatchNorm_0'" in message and "'batch_stats'" in message
  assert '{"params": params, "batch_stats": batch_stats}' in message
  assert isinstance(error.value, flax.errors.ScopeCollectionNotFound)
  _Net().apply(variables, x, train=False)  # the fix


def test_training_apply_with_mutable_batch_stats_creates_missing_statistics_as_flax():
  x = _input((6, 2))
  params = {"params": _Net().init(jax.random.key(0), x, train=False)["params"]}
  _, updates = _Net().apply(params, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(
      updates["batch_stats"]["BatchNorm_0"]["mean"],
      0.01 * nn.Dense(3).apply({"params": params["params"]["Dense_0"]}, x).mean(0),
      rtol=1e-5, atol=1e-6,
  )
