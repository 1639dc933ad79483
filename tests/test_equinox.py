"""``jaxbn.equinox.BatchNorm`` against ``equinox.nn.BatchNorm`` and ``jaxbn.batch_norm``.

The module is called per example inside ``jax.vmap(..., axis_name="batch")``;
``jaxbn.batch_norm`` sees the whole batch ``(N, C, *spatial)`` with ``axis=1``.
Over several steps, under ``eqx.filter_jit`` and ``jax.grad``, each mode and
variant gives ``batch_norm``'s outputs, gradients and running statistics
(``mode="batch"``: ``averaging="debiased_ema"``; ``mode="ema"``: ``"ema"``
with a first update of momentum 0), and stores what Equinox's class stores,
in its layout.
"""

import functools
import importlib
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn.equinox
from tests import _reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
C, N, SPATIAL = 3, 6, (4,)
MOMENTUM, EPS = 0.8, 1e-5
MODES = ("batch", "ema")
CLASSES = (eqx.nn.BatchNorm, jaxbn.equinox.BatchNorm)


def _batches(steps, seed=0, shape=(N, C, *SPATIAL)):
  """Batches whose statistics differ from step to step, far from mean 0 and variance 1."""
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray((3.0 + i) + (2.0 + i) * rng.normal(size=shape), jnp.float32) for i in range(steps)
  ]


def _make(cls, mode, **settings):
  """``make_with_state`` of ``cls``, with a weight and bias that are not 1 and 0."""
  bn, state = eqx.nn.make_with_state(cls)(C, "batch", momentum=MOMENTUM, mode=mode, **settings)
  bn = eqx.tree_at(
    lambda m: (m.weight, m.bias), bn, (jnp.array([0.5, 1.0, 2.0]), jnp.array([0.1, -0.2, 0.3]))
  )
  return bn, state


def _step(bn, x, state, inference=None, **per_example):
  """``bn`` over a batch ``x`` (examples on axis 0): ``(y, state)``.

  ``per_example``: call keywords (``residual``, ``mask``) with one entry per example.
  """

  def one(x, kwargs, state):
    return bn(x, state, inference=inference, **kwargs)

  return jax.vmap(one, axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None))(
    x, per_example, state
  )


# Jitted: eagerly, each of batch norm's small operations would be dispatched on its own.
_run = eqx.filter_jit(_step)


def _loss(y):
  return jnp.sum(jnp.sin(2.0 * y.astype(jnp.float32)))


@eqx.filter_jit
def _train(bn, state, x, **per_example):
  """One training step, then inference with its state.

  Returns ``(y, grads of (x, weight, bias), state, y in inference, state after it)``.
  """

  def loss(x, params):
    model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
    y, new_state = _step(model, x, state, **per_example)
    return _loss(y), (y, new_state)

  grads, (y, state) = jax.grad(loss, (0, 1), has_aux=True)(x, (bn.weight, bn.bias))
  return y, grads, state, *_step(bn, x, state, inference=True, **per_example)


def _reference_train(state, x, weight, bias, momentum, settings, **per_example):
  """``_train`` of ``jaxbn.batch_norm`` on the whole batch: ``(y, grads, state, y_infer)``."""
  mask = per_example.get("mask")
  kwargs = dict(
    axis=1,
    epsilon=EPS,
    residual=per_example.get("residual"),
    mask=None if mask is None else mask.reshape((N,) + (1,) * (1 + len(SPATIAL))),
    **settings,
  )

  def loss(x, params):
    y, new_state = jaxbn.batch_norm(x, state, *params, training=True, momentum=momentum, **kwargs)
    return _loss(y), (y, new_state)

  grads, (y, state) = jax.grad(loss, (0, 1), has_aux=True)(x, (weight, bias))
  y_infer, _ = jaxbn.batch_norm(x, state, weight, bias, training=False, **kwargs)
  return y, grads, state, y_infer


def _batch_norm_settings(mode, settings):
  """The ``batch_norm`` keywords that give ``mode``'s running statistics (as read)."""
  return {"averaging": "debiased_ema" if mode == "batch" else "ema", **settings}


def _assert_states_close(got, want):
  """Floating-point leaves to float32 rounding; counters and flags exactly."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)
    if jnp.issubdtype(a.dtype, jnp.inexact):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), 2e-5, 2e-5)
    else:
      np.testing.assert_array_equal(a, b)


def _leaf_spec(value):
  return (value.shape, value.dtype) if eqx.is_array(value) else value


def test_is_an_equinox_batch_norm():
  bn = jaxbn.equinox.BatchNorm(C, "batch", mode="batch")
  assert isinstance(bn, eqx.nn.BatchNorm)
  assert isinstance(bn, eqx.nn.StatefulLayer) and bn.is_stateful()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
  "kwargs", [{}, {"channelwise_affine": False}, {"dtype": jnp.bfloat16}], ids=str
)
def test_make_with_state_gives_equinox_s_model_leaves_and_state(mode, kwargs):
  (theirs, their_state), (ours, our_state) = (
    eqx.nn.make_with_state(cls)(C, "batch", mode=mode, **kwargs) for cls in CLASSES
  )
  # Same State keys (the markers name the fields), shapes, dtypes and weak types.
  assert jax.tree.structure(our_state) == jax.tree.structure(their_state)
  assert jax.tree.leaves(jax.eval_shape(lambda: our_state)) == jax.tree.leaves(
    jax.eval_shape(lambda: their_state)
  )
  # Same leaves: what tree_serialise_leaves writes.
  assert [_leaf_spec(v) for v in jax.tree.leaves(ours)] == [
    _leaf_spec(v) for v in jax.tree.leaves(theirs)
  ]
  for name in (
    "axis_name",
    "inference",
    "input_size",
    "eps",
    "channelwise_affine",
    "momentum",
    "mode",
  ):
    assert getattr(ours, name) == getattr(theirs, name), name


def test_default_mode_is_ema_without_equinox_s_warning():
  with pytest.warns(UserWarning, match="defaults to 'ema'"):
    theirs = eqx.nn.BatchNorm(C, "batch")
  ours = jaxbn.equinox.BatchNorm(C, "batch")  # warnings are errors: none is raised
  assert ours.mode == theirs.mode == "ema"


@pytest.mark.parametrize("mode", MODES)
def test_stored_state_is_equinox_s_over_steps(mode):
  """Both classes store the same moving averages; their training outputs agree in mode "batch".

  Equinox's mode "ema" normalizes training batches with the running average
  (equinox #659), so only its stored state and inference outputs agree.
  """
  (theirs, their_state), (ours, our_state) = (_make(cls, mode) for cls in CLASSES)
  for x in _batches(3):
    y_theirs, their_state = _run(theirs, x, their_state)
    y_ours, our_state = _run(ours, x, our_state)
    if mode == "batch":
      _reference.assert_trees_close(y_ours, y_theirs)
  _assert_states_close(our_state, their_state)
  if mode == "ema":
    x = _batches(1, seed=5)[0]
    _reference.assert_trees_close(
      _run(ours, x, our_state, inference=True), _run(theirs, x, their_state, inference=True)
    )


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_batch_mode_reads_the_variance_without_the_bias_of_its_initial_one(momentum):
  # Equinox divides the moving variance, started at 1, by 1 - m^t: it reads 103 instead of 4
  # after one step at momentum 0.99. The same state read here gives the batch's variance.
  x = jnp.asarray(3.0 + 2.0 * np.random.default_rng(0).normal(size=(256, C)), jnp.float32)
  var = np.var(np.asarray(x, np.float64), axis=0)
  states = []
  for cls in CLASSES:
    bn, state = eqx.nn.make_with_state(cls)(C, "batch", momentum=momentum, mode="batch")
    states.append((bn, _run(bn, x, state)[1]))
  (theirs, their_state), (ours, our_state) = states
  _assert_states_close(our_state, their_state)  # the same stored state
  _reference.assert_close(ours.running_stats(our_state)[1], var, 1e-5)
  hidden_mean, hidden_var = their_state.get(theirs.batch_state_index)
  equinox_reads = np.asarray(hidden_var, np.float64) / (1 - momentum)
  np.testing.assert_allclose(equinox_reads, var + momentum / (1 - momentum), rtol=1e-5)
  # Inference normalizes with the batch's statistics: unit variance.
  y, _ = _run(ours, x, our_state, inference=True)
  np.testing.assert_allclose(np.var(np.asarray(y), axis=0), np.asarray(ours.weight) ** 2, 1e-4)


def _case_inputs(call_keywords, batches):
  """Per-step call keywords: a residual and/or a mask (dropping whole examples) per example."""
  rng = np.random.default_rng(7)
  calls = []
  for x in batches:
    call = {}
    if "residual" in call_keywords:
      call["residual"] = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    if "mask" in call_keywords:
      call["mask"] = jnp.asarray(rng.uniform(size=N) > 0.3).at[:2].set(True)
    calls.append(call)
  return calls


CASES = {
  # name: (constructor settings, call keywords)
  "plain": ({}, ()),
  "relu_residual_mask": ({"activation": "relu"}, ("residual", "mask")),
  "leaky_relu_inplace": (
    {"activation": "leaky_relu", "negative_slope": 0.1, "inplace": True},
    ("residual",),
  ),
  "unbiased_var_skip_nonfinite": ({"unbiased_var": True, "skip_nonfinite": True}, ()),
  "renorm": ({"renorm": jaxbn.Renorm(r_max=1.5, d_max=0.5)}, ()),
}
MODE_CASES = [
  (mode, case) for mode in MODES for case in CASES if (mode, case) != ("batch", "renorm")
]


@pytest.mark.parametrize(("mode", "case"), MODE_CASES)
def test_matches_batch_norm_over_steps_training_and_inference(mode, case):
  settings, call_keywords = CASES[case]
  bn, state = _make(jaxbn.equinox.BatchNorm, mode, **settings)
  batches = _batches(3)
  if "skip_nonfinite" in settings:  # the second batch holds a NaN: no update, counter included
    batches[1] = batches[1].at[2, 1, 0].set(jnp.nan)
  ref_state = jaxbn.init_state(C) if "renorm" not in settings else jaxbn.init_renorm_state(C)
  ref_settings = _batch_norm_settings(mode, settings)
  reference = jax.jit(functools.partial(_reference_train, settings=ref_settings))
  first = True
  for x, call in zip(batches, _case_inputs(call_keywords, batches), strict=True):
    momentum = 0.0 if mode == "ema" and first else MOMENTUM  # "ema": seeded by the first batch
    y, grads, state, y_infer, same = _train(bn, state, x, **call)
    y_ref, grads_ref, ref_state, y_ref_infer = reference(
      ref_state, x, bn.weight, bn.bias, momentum, **call
    )
    first = False
    _assert_states_close(same, state)  # inference updates nothing
    if not np.isfinite(np.asarray(x)).all():
      continue  # NaN outputs and gradients, on both sides
    _reference.assert_trees_close((y, grads, y_infer), (y_ref, grads_ref, y_ref_infer))
    _reference.assert_trees_close(bn.running_stats(state), (ref_state.mean, ref_state.var))
  if mode == "batch":
    expected_count = 2 if "skip_nonfinite" in settings else 3
    assert state.get(bn.batch_counter) == expected_count == ref_state.count
  else:
    assert not state.get(bn.ema_first_time_index)
  if "renorm" in settings:
    count, std, renorm_mean, renorm_std = state.get(bn.renorm_state_index)
    _reference.assert_trees_close(
      (count, std, renorm_mean, renorm_std),
      (ref_state.count, ref_state.std, ref_state.renorm_mean, ref_state.renorm_std),
    )


# Regression: jvp and grad of jit(vmap(batch_norm(inplace=True, axis_name=...))) traced a
# div of operands of ranks 2 and 3.
def test_inplace_backward_under_grad_of_a_jitted_vmap():
  bn, state = _make(
    jaxbn.equinox.BatchNorm, "batch", activation="leaky_relu", negative_slope=0.1, inplace=True
  )
  jax.grad(lambda x: _loss(_run(bn, x, state)[0]))(_batches(1)[0])


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_first_batch_leaves_the_state_unwritten(mode):
  bn, state = _make(jaxbn.equinox.BatchNorm, mode, skip_nonfinite=True)
  fresh = bn.running_stats(state)
  x = _batches(1)[0].at[0, 0, 0].set(jnp.inf)
  _, state = _run(bn, x, state)
  _reference.assert_trees_close(bn.running_stats(state), fresh)
  if mode == "ema":  # still waiting for the first update, which seeds the averages
    assert state.get(bn.ema_first_time_index)
  else:
    assert state.get(bn.batch_counter) == 0
  _, state = _run(bn, _batches(1)[0], state)
  mean, var = _reference.batch_stats(_batches(1)[0], axis=1)
  if mode == "ema":
    _reference.assert_close(bn.running_stats(state)[0], mean, 1e-5)
  _reference.assert_close(bn.running_stats(state)[1], var, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_nested_vmaps_with_a_tuple_of_axis_names(mode):
  # Statistics over both named axes: those of the whole (2 x 3)-example batch.
  bn, state = _make(jaxbn.equinox.BatchNorm, mode)
  bn = eqx.tree_at(lambda m: m.axis_name, bn, ("outer", "inner"))
  x = _batches(1)[0]

  def loss(x, params, state):
    model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
    inner = jax.vmap(model, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = outer(x.reshape((2, 3) + x.shape[1:]), state)
    y = y.reshape(x.shape)
    return _loss(y), (y, state)

  grads, (y, state) = eqx.filter_jit(jax.grad(loss, (0, 1), has_aux=True))(
    x, (bn.weight, bn.bias), state
  )
  y_ref, grads_ref, ref_state, _ = _reference_train(
    jaxbn.init_state(C),
    x,
    bn.weight,
    bn.bias,
    0.0 if mode == "ema" else MOMENTUM,
    _batch_norm_settings(mode, {}),
  )
  _reference.assert_trees_close((y, grads), (y_ref, grads_ref))
  _reference.assert_trees_close(bn.running_stats(state), (ref_state.mean, ref_state.var))


def test_an_outer_vmap_without_axis_name_maps_the_state():
  # An ensemble: a batch of states, each normalized over the named axis (as in Equinox's tests).
  x = jnp.stack(_batches(2))  # (2, N, C, *SPATIAL)
  bn, state = _make(jaxbn.equinox.BatchNorm, "batch")
  ys, states = jax.vmap(lambda x: _run(bn, x, state))(x)
  mean, var = states.get(bn.batch_state_index)
  for i in range(2):
    y, one = _run(bn, x[i], state)
    _reference.assert_trees_close((ys[i], mean[i], var[i]), (y, *one.get(bn.batch_state_index)))


def test_pmap_across_devices_gives_the_batch_statistics():
  devices = min(jax.device_count(), N)
  x = _batches(1, shape=(devices, C, *SPATIAL))[0]
  bn, state = _make(jaxbn.equinox.BatchNorm, "batch")
  y, state = jax.pmap(
    lambda x, s: bn(x, s), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
  )(x, state)
  y_ref, ref_state = jaxbn.batch_norm(
    x,
    jaxbn.init_state(C),
    bn.weight,
    bn.bias,
    training=True,
    axis=1,
    momentum=MOMENTUM,
    averaging="debiased_ema",
  )
  _reference.assert_trees_close((y, bn.running_stats(state)), (y_ref, ref_state[:2]))


@pytest.mark.parametrize("mode", MODES)
def test_checkpoints_load_both_ways(mode, tmp_path):
  (theirs, their_state), (ours, our_state) = (_make(cls, mode) for cls in CLASSES)
  x = _batches(1)[0]
  _, their_state = _run(theirs, x, their_state)
  _, our_state = _run(ours, x, our_state)
  eqx.tree_serialise_leaves(tmp_path / "theirs.eqx", (theirs, their_state))
  eqx.tree_serialise_leaves(tmp_path / "ours.eqx", (ours, our_state))
  for path, (model, state), (like_model, like_state) in (
    ("theirs.eqx", (theirs, their_state), _make(jaxbn.equinox.BatchNorm, mode)),
    ("ours.eqx", (ours, our_state), _make(eqx.nn.BatchNorm, mode)),
  ):
    loaded_model, loaded_state = eqx.tree_deserialise_leaves(
      tmp_path / path, (like_model, like_state)
    )
    assert type(loaded_model) is type(like_model)
    _reference.assert_trees_close(
      (eqx.filter(loaded_model, eqx.is_array), loaded_state),
      (eqx.filter(model, eqx.is_array), state),
    )


def test_sequential_make_with_state_and_inference_mode():
  def make(key):
    k1, k2 = jax.random.split(key)
    return eqx.nn.Sequential(
      [
        eqx.nn.Linear(2, C, key=k1),
        jaxbn.equinox.BatchNorm(C, "batch", mode="batch", activation="relu"),
        eqx.nn.Linear(C, 1, key=k2),
      ]
    )

  model, state = eqx.nn.make_with_state(make)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)

  @eqx.filter_jit
  def run(model, x, state, axis_name):
    return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))(x, state)

  y, state = run(model, x, state, "batch")
  assert y.shape == (8, 1) and state.get(model[1].batch_counter) == 1
  inference_model = eqx.nn.inference_mode(model)
  assert inference_model[1].inference
  y, same = run(inference_model, x, state, None)  # inference needs no axis name
  assert same.get(model[1].batch_counter) == 1
  # The hidden layer's output is normalized with the running statistics, then relu'd.
  h = jax.vmap(model[0])(x)
  mean, var = model[1].running_stats(state)
  expected = jax.nn.relu(
    (h - mean[None]) / jnp.sqrt(var[None] + EPS) * model[1].weight[None] + model[1].bias[None]
  )
  np.testing.assert_allclose(jax.vmap(model[2])(expected), y, rtol=1e-5, atol=1e-5)


def test_the_second_step_does_not_retrace():
  traces = 0
  bn, state = _make(jaxbn.equinox.BatchNorm, "ema")

  @eqx.filter_jit
  def step(bn, state, x):
    nonlocal traces
    traces += 1
    return _run(bn, x, state)

  for x in _batches(3):
    _, state = step(bn, state, x)
  assert traces == 1


def test_half_precision_input_with_float32_weight():
  # The output takes the promotion of x and weight (Equinox's `x * weight + bias`); statistics
  # in float32. A bfloat16 module keeps its bfloat16 state.
  x = _batches(1)[0]
  bn, state = _make(jaxbn.equinox.BatchNorm, "batch")
  y, state = _run(bn, x.astype(jnp.bfloat16), state)
  y32, _ = _run(bn, x, _make(jaxbn.equinox.BatchNorm, "batch")[1])
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y32, atol=0.05)
  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
    C, "batch", mode="ema", dtype=jnp.bfloat16
  )
  y, state = _run(bn, x.astype(jnp.bfloat16), state)
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.bfloat16 for v in state.get(bn.ema_state_index))


@pytest.mark.parametrize("mode", MODES)
def test_inference_before_any_update(mode):
  # Equinox issue #1010: an untrained model in inference passes its input through (up to eps);
  # mode "ema" reads its never-written buffers as mean 0 and variance 1.
  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(C, "batch", mode=mode, inference=True)
  x = _batches(1)[0][0]
  y, _ = bn(x, state)  # one example, no vmap: inference needs no axis name
  np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-6)


def test_complex_input_goes_to_equinox_s_implementation():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N, C)) + 1j * rng.normal(size=(N, C)), jnp.complex64)
  outputs = []
  for cls in CLASSES:
    bn, state = eqx.nn.make_with_state(cls)(C, "batch", mode="batch", dtype=jnp.complex64)
    outputs.append(_run(bn, x, state))
  _reference.assert_trees_close(outputs[0], outputs[1])
  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
    C, "batch", mode="batch", dtype=jnp.complex64, activation="relu"
  )
  with pytest.raises(ValueError, match=r"complex.*`activation`"):
    _run(bn, x, state)


def test_training_outside_a_named_vmap_raises_name_error():
  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(C, "batch", mode="batch")
  x = _batches(1)[0]
  with pytest.raises(NameError, match="jax.vmap\\(f, axis_name='batch'\\)"):
    bn(x[0], state)
  with pytest.raises(NameError, match="not bound"):
    jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x, state)


ERRORS = [
  # (constructor keywords, call: (x shape, keywords), error, message)
  pytest.param(
    {"mode": "batch", "renorm": jaxbn.Renorm()},
    None,
    ValueError,
    "needs mode='ema'",
    id="renorm_batch_mode",
  ),
  pytest.param({"mode": "mean"}, None, ValueError, "Invalid mode", id="mode"),
  pytest.param({"momentum": 1.5}, None, ValueError, "`momentum` must lie in", id="momentum"),
  pytest.param({"eps": -1.0}, None, ValueError, "`eps` must lie in", id="eps"),
  pytest.param({"activation": "gelu"}, None, ValueError, "`activation` must be", id="activation"),
  pytest.param(
    {"inplace": True, "activation": "relu"}, None, ValueError, "invertible", id="inplace_relu"
  ),
  pytest.param({"skip_nonfinite": 1}, None, TypeError, "`skip_nonfinite` must", id="flag"),
  pytest.param({"renorm": (3.0, 5.0)}, None, TypeError, "jaxbn.Renorm", id="renorm_type"),
  pytest.param(
    {}, ((N, C + 1), {}), ValueError, r"takes one example of shape \(3, \*spatial\)", id="channels"
  ),
  pytest.param(
    {},
    ((N, C, 4), {"residual": jnp.zeros((N, C))}),
    ValueError,
    "`residual` has shape",
    id="residual",
  ),
  pytest.param(
    {},
    ((N, C), {"inference": jnp.array(True)}),
    TypeError,
    "`inference` must be",
    id="traced_inference",
  ),
  pytest.param(
    {}, ((N, C), {"mask": jnp.ones((N, 2), bool)}), ValueError, "does not broadcast", id="mask"
  ),
]


@pytest.mark.parametrize(("settings", "call", "error", "match"), ERRORS)
def test_bad_settings_and_inputs_raise_teaching_errors(settings, call, error, match):
  make = functools.partial(eqx.nn.make_with_state(jaxbn.equinox.BatchNorm), C, "batch")
  settings = {"mode": "ema"} | settings
  if call is None:
    with pytest.raises(error, match=match):
      make(**settings)
    return
  bn, state = make(**settings)
  shape, kwargs = call
  kwargs = {"inference": None} | kwargs
  with pytest.raises(error, match=match):
    _run(bn, jnp.ones(shape), state, **kwargs)


def test_pytorch_style_momentum_warns_at_construction():
  with pytest.warns(UserWarning, match="PyTorch's momentum=0.1 is jaxbn's momentum=0.9") as record:
    jaxbn.equinox.BatchNorm(C, "batch", momentum=0.1, mode="batch")
  assert record[0].filename == __file__  # points at the caller's line


# Equinox is optional: only jaxbn.equinox imports it, and names the extra when it is missing.
def test_equinox_is_imported_by_jaxbn_equinox_only(monkeypatch):
  code = "import sys, jaxbn, jaxbn.linen, jaxbn.nnx; assert 'equinox' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
  monkeypatch.setitem(sys.modules, "equinox", None)  # as if Equinox were not installed
  monkeypatch.delitem(sys.modules, "jaxbn.equinox")
  message = 'jaxbn.equinox needs equinox, which is not installed: pip install "jaxbn[equinox]"'
  with pytest.raises(ImportError, match=re.escape(message)):
    importlib.import_module("jaxbn.equinox")


def test_readme_example_runs():
  (block,) = [
    b
    for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    if "jaxbn.equinox" in b
  ]
  namespace = {}
  exec(block, namespace)
  model, state, y = namespace["model"], namespace["state"], namespace["y"]
  assert y.shape == (8, 16, 16, 16) and state.get(model.bn.batch_counter) == 1
