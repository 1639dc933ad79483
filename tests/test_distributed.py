"""Synchronized batch norm on the 8 host devices: vmap, pmap, shard_map and sharded jit.

Every style must reproduce one device running the whole batch: statistics,
outputs, running averages and gradients, also when devices hold different
numbers of valid entries (zero included).
"""

import re
from collections import Counter
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import _reference

D, N, C = 8, 4, 3  # devices, rows per device, features
VALID_ROWS = np.array([1, 4, 0, 2, 3, 4, 1, 2])  # per device; device 2 holds no valid row
TOL = dict(rtol=2e-5, atol=2e-5)


def _data():
  rng = np.random.default_rng(0)
  x = (10.0 + rng.normal(size=(D, N, C))).astype(np.float32)
  mask = np.arange(N)[None, :, None] < VALID_ROWS[:, None, None]  # (D, N, 1)
  scale = (1.0 + 0.1 * rng.normal(size=C)).astype(np.float32)
  bias = (0.1 * rng.normal(size=C)).astype(np.float32)
  return x, mask, scale, bias


def _step(x, mask, scale, bias, axis_name=None, axis_index_groups=None, implementation="fused"):
  """One training step on one device's rows: (loss, (y, new_state))."""
  y, state = jaxbn.batch_norm(
      x,
      jaxbn.init_state(C),
      scale,
      bias,
      training=True,
      momentum=0.5,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      implementation=implementation,
  )
  return jnp.sum(jnp.sin(3.0 * y)), (y, state)


@pytest.fixture(scope="module")
def full_batch():
  """One device, the whole batch: statistics, y, state and gradients."""
  x, mask, scale, bias = _data()
  flat = (x.reshape(D * N, C), mask.reshape(D * N, 1), scale, bias)
  grads, (y, state) = jax.jit(jax.grad(_step, argnums=(0, 2, 3), has_aux=True))(*flat)
  return dict(
      stats=_reference.batch_stats(flat[0], mask=flat[1]),
      y=y.reshape(D, N, C),
      state=state,
      grads=(grads[0].reshape(D, N, C), grads[1], grads[2]),
  )


def _assert_matches_full_batch(y, state, grads, full):
  """``y``, ``grads[0]`` per device; ``state`` stacked per device (all identical)."""
  np.testing.assert_allclose(y, full["y"], **TOL)
  for leaf in jax.tree.leaves(state):  # every device holds the same bits
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  mean, var = full["stats"]
  np.testing.assert_allclose(state.mean[0], 0.5 * mean, **TOL)
  np.testing.assert_allclose(state.var[0], 0.5 + 0.5 * var, **TOL)
  assert np.isfinite(grads[0]).all()
  for got, want in zip(grads, full["grads"], strict=True):
    np.testing.assert_allclose(got, want, **TOL)


def test_vmap_with_uneven_masks_matches_one_device(full_batch):
  x, mask, scale, bias = _data()

  def total(x, scale, bias):
    losses, aux = jax.vmap(partial(_step, axis_name="d"), (0, 0, None, None), axis_name="d")(
        x, mask, scale, bias
    )
    return losses.sum(), aux

  grads, (y, state) = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  _assert_matches_full_batch(y, state, grads, full_batch)


def test_pmap_with_uneven_masks_matches_one_device(full_batch):
  x, mask, scale, bias = _data()
  grad_step = jax.grad(partial(_step, axis_name="d"), argnums=(0, 2, 3), has_aux=True)
  grads, (y, state) = jax.pmap(grad_step, "d", in_axes=(0, 0, None, None))(x, mask, scale, bias)
  # pmap differentiates each device's own loss; the parameters' gradient is their sum.
  grads = (grads[0], grads[1].sum(0), grads[2].sum(0))
  _assert_matches_full_batch(y, state, grads, full_batch)


def test_shard_map_with_uneven_masks_matches_one_device(full_batch):
  x, mask, scale, bias = _data()
  mesh = jax.make_mesh((D,), ("d",))

  def local(x, mask, scale, bias):
    loss, (y, state) = _step(x[0], mask[0], scale, bias, axis_name="d")
    return loss[None], y[None], state

  # The statistics are the same on every device, so the state leaves with P().
  sharded = jax.shard_map(
      local, mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=(P("d"), P("d"), P())
  )

  def total(x, scale, bias):
    losses, y, state = sharded(x, mask, scale, bias)
    return losses.sum(), (y, state)

  x, mask = jax.device_put((x, mask), NamedSharding(mesh, P("d")))
  grads, (y, state) = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  state = jax.tree.map(lambda v: np.broadcast_to(v, (D,) + v.shape), state)
  _assert_matches_full_batch(y, state, grads, full_batch)


def test_issue_example_flax_weights_devices_equally_jaxbn_by_count():
  # Two devices with 1 and 4 valid entries: the batch is {0, 7, 9, 11, 13}, mean 8,
  # variance 20. Flax averages the per-device means (0 and 10) with equal weight: 5.
  x = jnp.array([[0.0, 0, 0, 0], [7, 9, 11, 13]])[..., None]
  mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 1]], bool)[..., None]
  stats = {}
  for cls in (nn.BatchNorm, jaxbn.linen.BatchNorm):
    bn = cls(use_running_average=False, axis_name="d", momentum=0.0, use_fast_variance=False)
    variables = bn.init(jax.random.key(0), x[0])
    apply = partial(bn.apply, variables, mutable=["batch_stats"])
    _, updates = jax.jit(jax.vmap(lambda x, m: apply(x, mask=m), axis_name="d"))(x, mask)  # noqa: B023
    stats[cls.__module__] = updates["batch_stats"]
  np.testing.assert_allclose(stats["flax.linen.normalization"]["mean"], 5.0)
  np.testing.assert_allclose(stats["jaxbn.linen"]["mean"], 8.0)
  np.testing.assert_allclose(stats["jaxbn.linen"]["var"], 20.0)


def test_devices_without_valid_entries_give_finite_values_and_gradients():
  # Regression guard: 0/0 in a device's mean would poison every device through the gather.
  x, _, scale, bias = _data()
  mask = np.zeros((D, N, 1), bool)
  mask[3, :2] = True  # two valid rows on one device, none elsewhere

  def total(x, scale, bias):
    losses, (y, _) = jax.vmap(partial(_step, axis_name="d"), (0, 0, None, None), axis_name="d")(
        x, mask, scale, bias
    )
    return losses.sum(), y

  grads, y = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  assert all(np.isfinite(leaf).all() for leaf in (y, *grads))
  stats = jax.vmap(lambda x, m: jaxbn.batch_stats(x, mask=m, axis_name="d"), axis_name="d")
  mean, var = jax.jit(stats)(x, mask)
  np.testing.assert_allclose(mean[0], x[3, :2].mean(0), **TOL)
  np.testing.assert_allclose(var[0], x[3, :2].var(0), **TOL)


def _count_collectives(hlo_text: str) -> dict[str, int]:
  """Collectives in compiled HLO text (an async pair counts once)."""
  ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast"
  return dict(Counter(re.findall(rf"\b({ops})(?:-start)?\(", hlo_text)))


def _layer(x, mask, scale, bias):
  """The forward pass alone: (y, new_state)."""
  return _step(x, mask, scale, bias)[1]


@pytest.mark.parametrize(
    "axis_type, use_mask, forward, backward",
    [
        # Each shard takes its own shift: one all-reduce gathers (n, K, delta, M2) forward,
        # one more sums the per-feature cotangents backward.
        (AxisType.Explicit, True, {"all-reduce": 1}, {"all-reduce": 2}),
        # XLA chooses the collectives: the shift, a sample of one device, is broadcast,
        # then the sums are all-reduced.
        (AxisType.Auto, False, {"all-reduce": 2}, {"all-reduce": 3}),
        (AxisType.Auto, True, None, None),  # more: the first valid entry is searched globally
    ],
)
def test_sharded_jit_matches_one_device_with_few_collectives(
    axis_type, use_mask, forward, backward
):
  x, mask, scale, bias = _data()
  x, mask = x.reshape(D * N, C), mask.reshape(D * N, 1) if use_mask else None
  mesh = jax.make_mesh((D,), ("d",), axis_types=(axis_type,))
  sharded_x, sharded_mask = jax.device_put((x, mask), NamedSharding(mesh, P("d")))
  grad_step = jax.grad(_step, argnums=(0, 2, 3), has_aux=True)
  for fn, collectives in ((_layer, forward), (grad_step, backward)):
    compiled = jax.jit(fn).lower(sharded_x, sharded_mask, scale, bias).compile()
    if collectives is not None:
      assert _count_collectives(compiled.as_text()) == collectives
    got = compiled(sharded_x, sharded_mask, scale, bias)
    want = jax.jit(fn)(x, mask, scale, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, **TOL)


def test_sharded_jit_keeps_features_sharded_on_a_2d_mesh():
  # Batch split over "a", features over "b": the statistics stay split over "b".
  x = np.random.default_rng(1).normal(size=(16, 6)).astype(np.float32) + 1e3
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  mean, var = jax.jit(jaxbn.batch_stats)(jax.device_put(x, NamedSharding(mesh, P("a", "b"))))
  assert mean.sharding.spec == P("b")
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-4)


def test_one_collective_per_layer_under_pmap_and_shard_map():
  # Two layers, two collectives: the statistics are never reduced twice.
  x = jnp.ones((D, N, C))

  def two_layers(x):
    for _ in range(2):
      x, _ = jaxbn.batch_norm(x, jaxbn.init_state(C), training=True, axis_name="d")
    return x

  mesh = jax.make_mesh((D,), ("d",))
  shard = jax.shard_map(
      lambda x: two_layers(x[0])[None], mesh=mesh, in_specs=P("d"), out_specs=P("d")
  )
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  for mapped, inputs, collective in (
      (jax.pmap(two_layers, "d"), x, "all_gather"),
      (shard, x_sharded, "psum_invariant"),
  ):
    jaxpr = str(jax.make_jaxpr(mapped)(inputs))
    found = re.findall(r"\b(all_gather\w*|psum\w*|pmean|pmax|ppermute|all_to_all)\[", jaxpr)
    assert found == [collective] * 2, found


def test_tuple_axis_name_over_a_2d_mesh():
  x, mask, _, _ = _data()
  mesh = jax.make_mesh((4, 2), ("a", "b"))

  def local(x, mask):
    mean, var = jaxbn.batch_stats(x[0], mask=mask[0], axis_name=("a", "b"))
    return mean, var

  stats = jax.shard_map(local, mesh=mesh, in_specs=P(("a", "b")), out_specs=P())
  x, mask = jax.device_put((x, mask), NamedSharding(mesh, P(("a", "b"))))
  mean, var = jax.jit(stats)(x, mask)
  want = _reference.batch_stats(np.reshape(x, (D * N, C)), mask=np.reshape(mask, (D * N, 1)))
  np.testing.assert_allclose(mean, want[0], **TOL)
  np.testing.assert_allclose(var, want[1], **TOL)


GROUPS = [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("style", ["vmap", "pmap", "shard_map"])
def test_axis_index_groups_give_per_group_statistics(style):
  x, mask, _, _ = _data()
  stats = partial(jaxbn.batch_stats, axis_name="d", axis_index_groups=GROUPS)
  if style == "vmap":  # no grouped collectives in vmap: jaxbn gathers all and selects
    mean, var = jax.jit(jax.vmap(lambda x, m: stats(x, mask=m), axis_name="d"))(x, mask)
  elif style == "pmap":
    mean, var = jax.pmap(lambda x, m: stats(x, mask=m), "d")(x, mask)
  else:
    mesh = jax.make_mesh((D,), ("d",))
    local = jax.shard_map(
        lambda x, m: jax.tree.map(lambda v: v[None], stats(x[0], mask=m[0])),
        mesh=mesh,
        in_specs=P("d"),
        out_specs=P("d"),
    )
    sharded = jax.device_put((x, mask), NamedSharding(mesh, P("d")))
    mean, var = jax.jit(local)(*sharded)
  mean, var = np.asarray(mean), np.asarray(var)
  for group in GROUPS:
    want = _reference.batch_stats(x[group].reshape(-1, C), mask=mask[group].reshape(-1, 1))
    for i in group:
      np.testing.assert_allclose(mean[i], want[0], **TOL)
      np.testing.assert_allclose(var[i], want[1], **TOL)


@pytest.mark.parametrize(
    "groups, match",
    [
        ([[0, 1, 2], [3, 4, 5, 6, 7]], r"groups of sizes \[3, 5\]"),
        ([[0, 1, 2, 3], [3, 4, 5, 6]], "does not partition the axis"),
        ([[0, 1, 2, 3]], "does not partition the axis"),
        ([[0, 1, 2, 3], [4, 5, 6, 8]], "does not partition the axis"),
        (4, "must be a sequence of sequences of ints"),
    ],
)
def test_bad_axis_index_groups_raise_value_error(groups, match):
  x = jnp.ones((D, N, C))
  stats = partial(jaxbn.batch_stats, axis_name="d", axis_index_groups=groups)
  stats = jax.vmap(stats, axis_name="d")
  with pytest.raises(ValueError, match=match) as error:
    jax.eval_shape(stats, x)
  assert "exactly once, e.g. [[0, 1, 2, 3], [4, 5, 6, 7]]" in str(error.value)


def test_axis_index_groups_without_axis_name_raise_value_error():
  with pytest.raises(ValueError, match="was given without `axis_name`"):
    jaxbn.batch_norm(
        jnp.ones((4, C)), jaxbn.init_state(C), training=True, axis_index_groups=GROUPS
    )


def test_unbound_axis_name_names_the_axis_and_the_fix():
  with pytest.raises(NameError, match=r"the axis 'batch' is not bound") as error:
    jax.vmap(partial(jaxbn.batch_stats, axis_name=("d", "batch")), axis_name="d")(
        jnp.ones((D, N, C))
    )
  assert "jax.vmap(f, axis_name='batch')" in str(error.value)
  assert "sharded `jax.jit` needs no axis name" in str(error.value)


def test_linen_matches_flax_under_pmap_with_groups():
  x, _, _, _ = _data()
  results = []
  for cls in (nn.BatchNorm, jaxbn.linen.BatchNorm):
    bn = cls(
        use_running_average=False,
        axis_name="d",
        axis_index_groups=GROUPS,
        momentum=0.5,
        use_fast_variance=False,
    )
    variables = bn.init(jax.random.key(0), x[0])

    def loss(params, x, bn=bn, variables=variables):
      y, updates = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(3.0 * y)), (y, updates)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    results.append(jax.pmap(grad, "d", in_axes=(None, 0))(variables["params"], x))
  flax_result, jaxbn_result = results
  for got, want in zip(jax.tree.leaves(jaxbn_result), jax.tree.leaves(flax_result), strict=True):
    np.testing.assert_allclose(got, want, **TOL)


def test_nnx_matches_flax_under_shard_map():
  x, _, _, _ = _data()
  mesh = jax.make_mesh((D,), ("d",))
  x = jax.device_put(x, NamedSharding(mesh, P("d")))
  results = []
  for cls in (nnx.BatchNorm, jaxbn.nnx.BatchNorm):
    model = cls(C, axis_name="d", momentum=0.5, use_fast_variance=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def local(state, x, graphdef=graphdef):
      model = nnx.merge(graphdef, state)
      y = model(x[0])
      return y[None], nnx.state(model)

    step = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P()))
    results.append(jax.jit(step)(state, x))
  flax_result, jaxbn_result = results
  for got, want in zip(jax.tree.leaves(jaxbn_result), jax.tree.leaves(flax_result), strict=True):
    np.testing.assert_allclose(got, want, **TOL)


# Regressions: a tuple `axis_name` under nested maps crashed in `lax.all_gather`
# ("axis size doesn't match"): one gather cannot span two `vmap`s, or a `pmap` and a `vmap`.
OUTER, INNER = 2, 4  # D = OUTER * INNER devices, as two nested maps
NESTED_GROUPS = [[0, 1, 4, 5], [2, 3, 6, 7]]  # indices along ("o", "i"): o * INNER + i


def _nested(fn, outer_map, in_axes=0):
  """``fn`` on (OUTER, INNER, N, C) inputs: ``outer_map`` over "o", ``jax.vmap`` over "i"."""
  inner = jax.vmap(fn, in_axes, axis_name="i")
  if outer_map == "vmap":
    return jax.jit(jax.vmap(inner, in_axes, axis_name="o"))
  return jax.pmap(inner, "o", in_axes=in_axes)


@pytest.mark.parametrize("implementation", _reference.IMPLEMENTATIONS)
@pytest.mark.parametrize("outer_map", ["vmap", "pmap"])
def test_tuple_axis_name_under_nested_maps_gives_full_batch_statistics(
    full_batch, outer_map, implementation
):
  x, mask, scale, bias = _data()
  grad_step = jax.grad(
      partial(_step, axis_name=("o", "i"), implementation=implementation),
      argnums=(0, 2, 3),
      has_aux=True,
  )
  nested = (np.reshape(a, (OUTER, INNER, N, -1)) for a in (x, mask))
  grads, (y, state) = _nested(grad_step, outer_map, (0, 0, None, None))(*nested, scale, bias)
  per_device = lambda a: np.reshape(a, (D,) + np.shape(a)[2:])  # noqa: E731
  param_grads = (np.sum(per_device(g), 0) for g in grads[1:])  # summed over the devices
  _assert_matches_full_batch(
      per_device(y), jax.tree.map(per_device, state), (per_device(grads[0]), *param_grads),
      full_batch,
  )


def _assert_each_group_has_its_statistics(mean, var, x, mask):
  """``mean``, ``var`` per device: those of its group of ``NESTED_GROUPS``."""
  for group in NESTED_GROUPS:
    want = _reference.batch_stats(x[group].reshape(-1, C), mask=mask[group].reshape(-1, 1))
    for i in group:
      np.testing.assert_allclose(mean[i], want[0], **TOL)
      np.testing.assert_allclose(var[i], want[1], **TOL)


@pytest.mark.parametrize("outer_map", ["vmap", "pmap"])
def test_tuple_axis_name_under_nested_maps_with_groups(outer_map):
  x, mask, _, _ = _data()
  stats = partial(jaxbn.batch_stats, axis_name=("o", "i"), axis_index_groups=NESTED_GROUPS)
  nested = (np.reshape(a, (OUTER, INNER, N, -1)) for a in (x, mask))
  mean, var = _nested(lambda x, m: stats(x, mask=m), outer_map)(*nested)
  mean, var = np.reshape(mean, (D, C)), np.reshape(var, (D, C))
  _assert_each_group_has_its_statistics(mean, var, x, mask)


def test_tuple_axis_name_over_a_2d_mesh_with_groups():
  x, mask, _, _ = _data()
  mesh = jax.make_mesh((OUTER, INNER), ("o", "i"))
  stats = partial(jaxbn.batch_stats, axis_name=("o", "i"), axis_index_groups=NESTED_GROUPS)
  local = jax.shard_map(
      lambda x, m: jax.tree.map(lambda v: v[None], stats(x[0], mask=m[0])),
      mesh=mesh,
      in_specs=P(("o", "i")),
      out_specs=P(("o", "i")),
  )
  sharded = jax.device_put((x, mask), NamedSharding(mesh, P(("o", "i"))))
  mean, var = (np.asarray(v) for v in jax.jit(local)(*sharded))
  _assert_each_group_has_its_statistics(mean, var, x, mask)


def test_linen_tuple_axis_name_inside_two_nn_vmaps_matches_flax():
  x, _, _, _ = _data()
  x = x.reshape(OUTER, INNER, N, C)
  results = []
  for cls in (nn.BatchNorm, jaxbn.linen.BatchNorm):

    class Nested(nn.Module):
      cls: type

      @nn.compact
      def __call__(self, x):
        bn = nn.vmap(
            self.cls,
            in_axes=0,
            out_axes=0,
            axis_name="inner",
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
        )
        bn = nn.vmap(
            bn,
            in_axes=0,
            out_axes=0,
            axis_name="outer",
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
        )
        return bn(
            use_running_average=False,
            axis_name=("outer", "inner"),
            momentum=0.5,
            use_fast_variance=False,
        )(x)

    model = Nested(cls)
    variables = model.init(jax.random.key(0), x)
    results.append(model.apply(variables, x, mutable=["batch_stats"]))
  flax_result, jaxbn_result = results
  for got, want in zip(jax.tree.leaves(jaxbn_result), jax.tree.leaves(flax_result), strict=True):
    np.testing.assert_allclose(got, want, **TOL)
  (stats,) = jaxbn_result[1]["batch_stats"].values()
  mean, var = _reference.batch_stats(x.reshape(-1, C))  # of all OUTER * INNER * N rows
  np.testing.assert_allclose(stats["mean"], 0.5 * mean, **TOL)
  np.testing.assert_allclose(stats["var"], 0.5 + 0.5 * var, **TOL)


def test_nnx_tuple_axis_name_inside_two_nnx_vmaps_matches_flax():
  x, _, _, _ = _data()
  x = x.reshape(OUTER, INNER, N, C)
  results = []
  for cls in (nnx.BatchNorm, jaxbn.nnx.BatchNorm):
    model = cls(C, axis_name=("outer", "inner"), momentum=0.5, use_fast_variance=False,
                rngs=nnx.Rngs(0))
    inner = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="inner")
    outer = nnx.vmap(inner, in_axes=(None, 0), axis_name="outer")
    y = outer(model, x)
    results.append((y, nnx.state(model, nnx.BatchStat)))
  flax_result, jaxbn_result = results
  for got, want in zip(jax.tree.leaves(jaxbn_result), jax.tree.leaves(flax_result), strict=True):
    np.testing.assert_allclose(got, want, **TOL)
  mean, var = _reference.batch_stats(x.reshape(-1, C))  # of all OUTER * INNER * N rows
  np.testing.assert_allclose(jaxbn_result[1]["mean"][...], 0.5 * mean, **TOL)


# A per-example `vmap` (Equinox's idiom) holds one entry per feature in each member.
@pytest.mark.parametrize("implementation", _reference.IMPLEMENTATIONS)
@pytest.mark.parametrize("outer_map", ["vmap", "pmap"])
def test_per_example_maps_give_full_batch_statistics(full_batch, outer_map, implementation):
  x, mask, scale, bias = _data()
  rows = jnp.broadcast_to(mask, x.shape)[..., :1]  # (D, N, 1): one mask entry per example
  grad_step = jax.grad(
      partial(_step, axis_name=("d", "n"), implementation=implementation),
      argnums=(0, 2, 3),
      has_aux=True,
  )
  in_axes = (0, 0, None, None)
  inner = jax.vmap(grad_step, in_axes, axis_name="n")  # over the N examples of a device
  if outer_map == "vmap":
    mapped = jax.jit(jax.vmap(inner, in_axes, axis_name="d"))
  else:
    mapped = jax.pmap(inner, "d", in_axes=in_axes)
  grads, (y, state) = mapped(x, rows, scale, bias)
  state = jax.tree.map(lambda a: np.reshape(a, (D * N,) + np.shape(a)[2:]), state)
  _assert_matches_full_batch(
      y, state, (grads[0], *(np.sum(g, (0, 1)) for g in grads[1:])), full_batch
  )


def test_per_example_vmap_is_exact_far_from_zero():
  rng = np.random.default_rng(1)
  x = (1e4 + rng.normal(size=(256, 5))).astype(np.float32)
  per_example = lambda xi: jaxbn.batch_stats(xi, axis_name="b")  # noqa: E731
  mean, var = jax.jit(jax.vmap(per_example, axis_name="b", out_axes=None))(x)
  want_mean, want_var = _reference.batch_stats(x)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-7)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)


def test_per_example_vmap_holds_no_array_larger_than_the_batch():
  """The moments of B members are summed, not gathered into (B, 4, C) arrays."""
  B, C = 64, 16

  def loss(x):
    step = lambda xi: jaxbn.batch_norm(xi, jaxbn.init_state(C), training=True, axis_name="b")  # noqa: E731
    y, _ = jax.vmap(step, axis_name="b", out_axes=(0, None))(x)
    return jnp.sum(jnp.sin(y))

  hlo = jax.jit(jax.grad(loss)).lower(jnp.ones((B, C))).compile().as_text()
  shapes = re.findall(r"f32\[([\d,]*)\]", hlo)
  assert max(np.prod([int(d) for d in dims.split(",") if d]) for dims in shapes) == B * C


def test_per_example_vmap_second_derivatives():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)))
    mask = jnp.asarray([[True], [False], [True], [True], [False], [True]])

    def f(x, scale, bias):
      step = lambda xi, mi: jaxbn.batch_norm(  # noqa: E731
          xi, jaxbn.init_state(3, jnp.float64), scale, bias, training=True, axis_name="b",
          mask=mi,
      )
      y, _ = jax.vmap(step, axis_name="b", out_axes=(0, None))(x, mask)
      return jnp.sin(y)

    check_grads(f, (x, jnp.ones(3) + 0.1 * x[0], 0.1 * x[1]), order=2, modes=("fwd", "rev"))
