"""Population statistics ("precise BN"): exact averages over N batches for a Flax model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

import jaxbn.linen
from jaxbn._precise import pool_moments, recompute_stats


def test_pool_moments_is_the_union_of_the_batches():
  rng = np.random.default_rng(0)
  parts = [rng.normal(3.0 * i, 1 + i, size=(n, 2)) for i, n in enumerate([5, 1, 17, 8])]
  moments = [(len(p), p.mean(0), ((p - p.mean(0)) ** 2).sum(0)) for p in parts]
  n, mean, m2 = pool_moments(moments)
  union = np.concatenate(parts)
  np.testing.assert_allclose(n, len(union))
  np.testing.assert_allclose(mean, union.mean(0), rtol=1e-13)
  np.testing.assert_allclose(m2 / n, union.var(0), rtol=1e-13)
  with pytest.raises(ValueError, match=r"`batches` is empty"):
    pool_moments([])


class Block(nn.Module):
  features: int
  use_jaxbn: bool

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(self.features, name="dense")(x)
    bn = jaxbn.linen.BatchNorm if self.use_jaxbn else nn.BatchNorm
    return nn.relu(bn(use_running_average=not train, momentum=0.9, name="bn")(x))


class Net(nn.Module):
  """Six batch norm layers: Flax's and jaxbn's, nested, and one called twice."""

  @nn.compact
  def __call__(self, x, train=True):
    for i, use_jaxbn in enumerate([False, True, False, True]):
      x = Block(5 + i, use_jaxbn, name=f"block{i}")(x, train)
    shared = nn.BatchNorm(use_running_average=not train, name="shared")
    x = shared(nn.Dense(4, name="head")(x))
    return shared(2 * x + 1)


def _batches(count, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(i, 1 + i % 3, size=(7, 3)), jnp.float32) for i in range(count)]


def test_a_model_with_many_layers_gets_the_exact_population_statistics():
  model = Net()
  batches = _batches(6)
  variables = model.init(jax.random.key(0), batches[0])

  def apply_fn(variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  new = recompute_stats(apply_fn, variables, batches, progress=False)

  # Reference: the inputs of every layer, captured in training mode, pooled in float64.
  inputs = {}
  for x in batches:
    _, state = model.apply(variables, x, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name in ("dense", "head",
                                                                            "shared"))
    seen = state["intermediates"]
    for i in range(4):
      inputs.setdefault(f"block{i}", []).append(seen[f"block{i}"]["dense"]["__call__"][0])
    first_call = seen["shared"]["__call__"][0]
    inputs.setdefault("shared", []).extend([seen["head"]["__call__"][0], 2 * first_call + 1])
  stats = new["batch_stats"]
  for name, parts in inputs.items():
    union = np.concatenate([np.asarray(p, np.float64) for p in parts])
    layer = stats[name]["bn"] if name.startswith("block") else stats[name]
    np.testing.assert_allclose(layer["mean"], union.mean(0), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(layer["var"], union.var(0), rtol=1e-5, atol=1e-5, err_msg=name)
    assert layer["mean"].dtype == jnp.float32
  assert new["params"] is variables["params"]


def test_frozen_variables_generators_and_num_batches():
  model = nn.Sequential([nn.Dense(3), jaxbn.linen.BatchNorm(use_running_average=False)])
  batches = _batches(5, seed=1)
  variables = freeze(model.init(jax.random.key(1), batches[0]))

  def apply_fn(variables, x):
    return model.apply(variables, x, mutable=["batch_stats"])

  new = recompute_stats(apply_fn, variables, iter(batches), num_batches=2)
  two = recompute_stats(apply_fn, variables, batches[:2], progress=False)
  assert isinstance(new, type(variables))
  jax.tree.map(np.testing.assert_array_equal, new, two)


def test_bad_input():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"saw no batch norm layer run"):
    recompute_stats(model.apply, variables, _batches(1), progress=False)


def test_recompute_stats_is_also_a_top_level_name():
  assert jaxbn.recompute_stats is jaxbn.linen.recompute_stats


def test_renorm_std_follows_and_a_feature_never_seen_keeps_its_statistics():
  bn = jaxbn.linen.BatchNorm(
      use_running_average=False, epsilon=1e-3, renorm=jaxbn.Renorm(r_max=3.0, d_max=5.0)
  )
  rng = np.random.default_rng(3)
  batches = [jnp.asarray(rng.normal(2.0, 3.0, size=(8, 3)), jnp.float32) for _ in range(4)]
  mask = jnp.array([True, True, False])  # feature 2 is masked out in every batch
  variables = bn.init(jax.random.key(0), batches[0], mask=mask)
  stats = variables["batch_stats"]

  def apply_fn(variables, x):
    return bn.apply(variables, x, mask=mask, mutable=["batch_stats"])

  new = recompute_stats(apply_fn, variables, batches, progress=False)["batch_stats"]
  union = np.concatenate([np.asarray(b) for b in batches])
  np.testing.assert_allclose(new["mean"][:2], union.mean(0)[:2], rtol=1e-5)
  np.testing.assert_allclose(new["var"][:2], union.var(0)[:2], rtol=1e-5)
  np.testing.assert_allclose(new["std"][:2], np.sqrt(new["var"][:2] + 1e-3), rtol=1e-6)
  for name in ("mean", "var", "std", "renorm_mean", "renorm_std", "count"):
    if name in ("mean", "var", "std"):
      np.testing.assert_array_equal(new[name][2], stats[name][2], err_msg=name)
    else:
      np.testing.assert_array_equal(new[name], stats[name], err_msg=name)


def test_an_nnx_model_gets_the_exact_population_statistics_in_place():
  from flax import nnx

  import jaxbn.nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.BatchNorm(3, rngs=rngs)  # Flax's own
      self.second = jaxbn.nnx.BatchNorm(3, averaging="cumulative", rngs=rngs)
      self.third = jaxbn.nnx.BatchNorm(
          3, epsilon=1e-3, renorm=jaxbn.Renorm(r_max=3.0, d_max=5.0), rngs=rngs
      )
      self.unused = jaxbn.nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
      return self.third(self.second(self.first(x)))

  model = Net(nnx.Rngs(0))
  model.train()
  batches = _batches(5)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  assert jaxbn.nnx.recompute_stats(model, batches, progress=False) is model

  def standardized(x, epsilon=1e-5):  # a layer's output in training mode, scale 1, bias 0
    return (x - x.mean(0)) / np.sqrt(x.var(0) + epsilon)

  inputs = [np.asarray(b, np.float64) for b in batches]
  for layer in (model.first, model.second, model.third):
    union = np.concatenate(inputs)
    np.testing.assert_allclose(layer.mean[...], union.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.var[...], union.var(0), rtol=1e-4)
    inputs = [standardized(x) for x in inputs]
  np.testing.assert_allclose(model.third.std[...], np.sqrt(model.third.var[...] + 1e-3), rtol=1e-6)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  # Only mean, var (and renorm's std) of the layers that ran change.
  np.testing.assert_array_equal(after["second"]["count"], before["second"]["count"])
  for name in ("renorm_mean", "renorm_std", "count"):
    np.testing.assert_array_equal(after["third"][name], before["third"][name])
  for name in ("mean", "var"):
    np.testing.assert_array_equal(after["unused"][name], before["unused"][name])
  with pytest.raises(ValueError, match=r"no batch norm layer in `model`"):
    jaxbn.nnx.recompute_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches, progress=False)
