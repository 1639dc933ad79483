"""The functional core under every JAX transformation it promises.

jit, grad, vmap (an ensemble of states, and a batch split over a named axis),
eval_shape, lax.scan over layers, checkpoint, a jitted optax training step
that compiles once, shard_map over the 8 host devices and sharded jit. Each
transformed result must equal the plain one (or the float64 reference).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from tests import _reference
from tests._reference import IMPLEMENTATIONS

N, C = 16, 5
TOL = dict(rtol=2e-5, atol=2e-5)


def _data(seed=0, shape=(N, C), offset=3.0):
  rng = np.random.default_rng(seed)
  x = (offset + 2.0 * rng.normal(size=shape)).astype(np.float32)
  scale = (1.0 + 0.2 * rng.normal(size=shape[-1])).astype(np.float32)
  bias = (0.2 * rng.normal(size=shape[-1])).astype(np.float32)
  return x, scale, bias


def _loss(x, scale, bias, state, implementation="fused", axis_name=None):
  """A non-trivial scalar of one training step: (loss, new_state)."""
  y, new_state = jaxbn.batch_norm(
      x,
      state,
      scale,
      bias,
      training=True,
      momentum=0.9,
      axis_name=axis_name,
      implementation=implementation,
  )
  return jnp.sum(jnp.sin(2.0 * y)), new_state


def _assert_trees_close(got, want, **tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, **(tol or TOL))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_matches_eager_and_the_float64_reference(implementation):
  x, scale, bias = _data()
  state = jaxbn.init_state(C)
  step = partial(jaxbn.batch_norm, training=True, momentum=0.9, implementation=implementation)
  y, new_state = jax.jit(step)(x, state, scale, bias)
  y_eager, state_eager = step(x, state, scale, bias)
  _assert_trees_close((y, new_state), (y_eager, state_eager))
  y_ref, (mean, var, count) = _reference.batch_norm(
      x, 0.0, 1.0, 0, scale, bias, training=True, momentum=0.9
  )
  np.testing.assert_allclose(y, y_ref, **TOL)
  np.testing.assert_allclose(new_state.mean, mean, **TOL)
  np.testing.assert_allclose(new_state.var, var, **TOL)
  assert int(new_state.count) == count == 1


def test_grad_under_jit_matches_eager_and_the_implementations_agree():
  x, scale, bias = _data()
  state = jaxbn.init_state(C)
  grads = {}
  for implementation in IMPLEMENTATIONS:
    grad = jax.grad(partial(_loss, implementation=implementation), (0, 1, 2), has_aux=True)
    grads[implementation], _ = jax.jit(grad)(x, scale, bias, state)
    _assert_trees_close(grads[implementation], grad(x, scale, bias, state)[0])
  _assert_trees_close(grads["fused"], grads["reference"], rtol=1e-4, atol=1e-4)
  # The normalized output is invariant to shifting x, so its gradient sums to 0.
  np.testing.assert_allclose(grads["fused"][0].sum(0), 0.0, atol=1e-4)


def test_vmap_ensemble_of_states_and_inputs_equals_a_loop():
  """An ensemble: E independent members, each with its own data, params and state."""
  members = 3
  data = [_data(seed) for seed in range(members)]
  xs, scales, biases = (np.stack(a) for a in zip(*data, strict=True))
  states = jax.vmap(lambda _: jaxbn.init_state(C))(jnp.arange(members))
  states = states._replace(mean=states.mean + jnp.arange(members, dtype=jnp.float32)[:, None])
  step = partial(jaxbn.batch_norm, training=True, momentum=0.9)
  ys, new_states = jax.jit(jax.vmap(step))(xs, states, scales, biases)
  assert new_states.mean.shape == (members, C) and new_states.count.shape == (members,)
  for i in range(members):
    y, new_state = step(xs[i], jax.tree.map(lambda v, i=i: v[i], states), scales[i], biases[i])
    np.testing.assert_allclose(ys[i], y, **TOL)
    _assert_trees_close(jax.tree.map(lambda v, i=i: v[i], new_states), new_state)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(N, C), (6, 2, 3, C)], ids=["rows", "images"])
def test_vmap_per_example_with_axis_name_equals_the_full_batch(implementation, shape):
  """``vmap(f, axis_name="batch")`` over single examples takes statistics over the batch."""
  x, scale, bias = _data(shape=shape)
  state = jaxbn.init_state(C)
  per_example = partial(_loss, implementation=implementation, axis_name="batch")

  def batched(x, scale, bias):
    losses, states = jax.vmap(per_example, (0, None, None, None), axis_name="batch")(
        x, scale, bias, state
    )
    return losses.sum(), states

  grads, states = jax.jit(jax.grad(batched, (0, 1, 2), has_aux=True))(x, scale, bias)
  full_grads, full_state = jax.grad(
      partial(_loss, implementation=implementation), (0, 1, 2), has_aux=True
  )(x, scale, bias, state)
  # Every example sees the statistics of the whole batch, so all states are equal.
  _assert_trees_close(jax.tree.map(lambda v: v[0], states), full_state)
  _assert_trees_close(jax.tree.map(lambda v: v[-1], states), full_state)
  _assert_trees_close(grads, full_grads, rtol=1e-4, atol=1e-4)
  y = jax.vmap(
      lambda x: jaxbn.batch_norm(x, state, scale, bias, training=True, axis_name="batch")[0],
      axis_name="batch",
  )(x)
  np.testing.assert_allclose(y, jaxbn.batch_norm(x, state, scale, bias, training=True)[0], **TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_eval_shape_gives_input_dtype_outputs_and_float32_state(dtype, training):
  x = jax.ShapeDtypeStruct((4, 7, 7, 6), dtype)
  params = jax.ShapeDtypeStruct((6,), dtype)
  state = jax.eval_shape(lambda: jaxbn.init_state(6))
  step = partial(jaxbn.batch_norm, training=training)
  y, new_state = jax.eval_shape(step, x, state, params, params)
  assert (y.shape, y.dtype) == (x.shape, dtype)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), new_state) == jaxbn.BatchNormState(
      ((6,), jnp.float32), ((6,), jnp.float32), ((), jnp.int32)
  )


def _stack_of_layers(x, scales, biases, states, implementation="fused"):
  """Layers x -> tanh(BN(x)) applied in turn; returns (output, new states)."""

  def layer(x, params):
    scale, bias, state = params
    y, new_state = jaxbn.batch_norm(
        x, state, scale, bias, training=True, momentum=0.8, implementation=implementation
    )
    return jnp.tanh(y) + x, new_state

  return lax.scan(layer, x, (scales, biases, states))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_scan_over_layers_with_stacked_params_and_states_equals_a_loop(implementation):
  layers = 4
  x, _, _ = _data()
  rng = np.random.default_rng(1)
  scales = (1.0 + 0.2 * rng.normal(size=(layers, C))).astype(np.float32)
  biases = (0.2 * rng.normal(size=(layers, C))).astype(np.float32)
  states = jax.vmap(lambda _: jaxbn.init_state(C))(jnp.arange(layers))

  def scanned(x, scales, biases):
    out, new_states = _stack_of_layers(x, scales, biases, states, implementation)
    return jnp.sum(out**2), new_states

  def looped(x, scales, biases):
    new_states = []
    for i in range(layers):
      out, new_state = _stack_of_layers(
          x, scales[i : i + 1], biases[i : i + 1], jax.tree.map(lambda v, i=i: v[i : i + 1], states)
      )
      x = out
      new_states.append(new_state)
    return jnp.sum(x**2), jax.tree.map(lambda *v: jnp.concatenate(v), *new_states)

  got = jax.jit(jax.value_and_grad(scanned, (0, 1, 2), has_aux=True))(x, scales, biases)
  want = jax.value_and_grad(looped, (0, 1, 2), has_aux=True)(x, scales, biases)
  _assert_trees_close(got, want, rtol=1e-4, atol=1e-4)
  assert got[0][1].count.tolist() == [1] * layers


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_checkpoint_gives_the_same_values_and_gradients(implementation):
  x, scale, bias = _data()
  state = jaxbn.init_state(C)
  loss = partial(_loss, implementation=implementation)
  remat = jax.checkpoint(loss)
  got = jax.jit(jax.value_and_grad(remat, (0, 1, 2), has_aux=True))(x, scale, bias, state)
  want = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias, state)
  _assert_trees_close(got, want)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(0.05)], ids=["sgd", "adam"])
def test_jitted_training_step_threads_the_state_and_compiles_once(optimizer):
  traces = []

  def model(params, state, x, training):
    h = x @ params["w"]
    h, state = jaxbn.batch_norm(
        h, state, params["scale"], params["bias"], training=training, momentum=0.9
    )
    return jnp.tanh(h) @ params["v"], state

  @jax.jit
  def train_step(params, state, opt_state, x, target):
    traces.append(None)  # runs only while tracing

    def loss_fn(params):
      out, new_state = model(params, state, x, training=True)
      return jnp.mean((out - target) ** 2), new_state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
      "scale": jnp.ones(8),
      "bias": jnp.zeros(8),
      "v": jnp.asarray(0.3 * rng.normal(size=(8, 1)), jnp.float32),
  }
  state, opt_state = jaxbn.init_state(8), optimizer.init(params)
  x = jnp.asarray(5.0 + rng.normal(size=(32, 3)), jnp.float32)
  target = jnp.sin(x.sum(axis=1, keepdims=True))
  losses = []
  for _ in range(15):
    params, state, opt_state, loss = train_step(params, state, opt_state, x, target)
    losses.append(float(loss))
  assert len(traces) == 1 and train_step._cache_size() == 1
  assert int(state.count) == 15
  assert losses[-1] < 0.7 * losses[0]
  # The running statistics converge to those of the last batch of features.
  h_mean = np.asarray(x @ params["w"]).mean(0)
  np.testing.assert_allclose(state.mean, (1 - 0.9**15) * h_mean, rtol=0.2, atol=0.2)
  out, same = jax.jit(model, static_argnums=3)(params, state, x, False)
  assert out.shape == (32, 1) and same is not None
  _assert_trees_close(same, state)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py asks for 8 host CPU devices"
  return jax.make_mesh((8,), ("d",))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shard_map_with_axis_name_equals_one_device(mesh, implementation):
  x, scale, bias = _data(shape=(8 * 3, C))  # 3 rows per device
  state = jaxbn.init_state(C)

  def local(x, scale, bias):
    loss, new_state = _loss(x, scale, bias, state, implementation, axis_name="d")
    return loss[None], new_state

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P()), out_specs=(P("d"), P()))

  def total(x, scale, bias):
    losses, new_state = sharded(x, scale, bias)
    return losses.sum(), new_state

  x_sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  got = jax.jit(jax.value_and_grad(total, (0, 1, 2), has_aux=True))(x_sharded, scale, bias)
  want = jax.value_and_grad(
      partial(_loss, implementation=implementation), (0, 1, 2), has_aux=True
  )(x, scale, bias, state)
  _assert_trees_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sharded_jit_over_the_batch_without_axis_name_equals_one_device(mesh, implementation):
  x, scale, bias = _data(shape=(8 * 2, 3, C))
  state = jaxbn.init_state(C)
  loss = partial(_loss, implementation=implementation)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
  got = step(x_sharded, scale, bias, state)
  assert got[1][0].sharding.is_equivalent_to(x_sharded.sharding, x.ndim)  # dx stays sharded
  _assert_trees_close(got, jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias, state))


# Regression: exporting a training step with a symbolic batch size raised
# "Symbolic dimension comparison 'b' <= '1' is inconclusive" (the single-value check).
def _export_and_run(fn, specs, *calls):
  """``fn`` exported for ``specs``, serialized, read back and called on each of ``calls``;
  returns ``[(exported result, jitted result)]``."""
  exported = jax.export.deserialize(jax.export.export(jax.jit(fn))(*specs).serialize())
  return [(exported.call(*args), jax.jit(fn)(*args)) for args in calls]


def _symbolic(spec, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_export_of_a_training_step_with_a_symbolic_batch_size(implementation, masked):
  def step(x, state, mask=None):
    return jaxbn.batch_norm(x, state, training=True, mask=mask, implementation=implementation)

  b, c = jax.export.symbolic_shape("b, 5")
  specs = [jax.ShapeDtypeStruct((b, c), jnp.float32), jaxbn.init_state(C)]
  if masked:
    specs.append(jax.ShapeDtypeStruct((b, 1), jnp.bool_))
  calls = []
  for n in (3, 16):
    x, _, _ = _data(seed=n, shape=(n, C))
    calls.append((x, jaxbn.init_state(C)) + ((x[:, :1] > 2.0,) if masked else ()))
  for got, want in _export_and_run(step, specs, *calls):
    _assert_trees_close(got, want)


def test_export_of_a_whole_training_step_with_a_symbolic_batch_size():
  x, scale, bias = _data()

  def train_step(params, state, x):
    (loss, state), grads = jax.value_and_grad(
        lambda p: _loss(x, p["scale"], p["bias"], state), has_aux=True
    )(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), state, loss

  params = {"scale": scale, "bias": bias}
  specs = (params, jaxbn.init_state(C), _symbolic("b, 5"))
  calls = [(params, jaxbn.init_state(C), x[:n]) for n in (4, N)]
  for got, want in _export_and_run(train_step, specs, *calls):
    _assert_trees_close(got, want)


def test_export_of_the_linen_module_in_training_with_a_symbolic_batch_size():
  import jaxbn.linen

  x, _, _ = _data()
  bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
  variables = bn.init(jax.random.key(0), x)
  step = partial(bn.apply, mutable=["batch_stats"])
  calls = [(variables, x[:n]) for n in (4, N)]
  for got, want in _export_and_run(step, (variables, _symbolic("b, 5")), *calls):
    _assert_trees_close(got, want)


def test_the_single_value_check_still_fires_for_concrete_shapes():
  with pytest.raises(ValueError, match="needs more than one value per feature"):
    jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(C), training=True))(jnp.ones((1, C)))
