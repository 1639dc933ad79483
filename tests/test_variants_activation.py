"""Fused activation and residual: ``z = act(bn(x) + r)`` in the same passes."""

import functools

import _reference_variants as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import IMPLEMENTATIONS, assert_close, tolerance
from jax._src.ad_checkpoint import saved_residuals
from jax.test_util import check_grads

import jaxbn

ACTIVATIONS = [None, "relu", "leaky_relu"]
SLOPE = 0.2  # a slope far from the default, so that a dropped slope shows.


def _inputs(shape, axis, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  nd = len(shape)
  c = shape[axis]
  x = ref.expand(rng.uniform(-2, 2, c), axis, nd) + ref.expand(
      rng.uniform(0.5, 2, c), axis, nd) * rng.standard_normal(shape)
  x = jnp.asarray(x, dtype)
  residual = jnp.asarray(rng.standard_normal(shape), dtype)
  state = jaxbn.BatchNormState(jnp.asarray(rng.uniform(-1, 1, c), jnp.float32),
                               jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                               jnp.asarray(0, jnp.int32))
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), dtype)
  bias = jnp.asarray(rng.uniform(-1, 1, c), dtype)
  return x, residual, state, scale, bias


def _bn(x, residual, state, scale, bias, *, training, axis, activation, implementation):
  return jaxbn.batch_norm(x, state, scale, bias, training=training, axis=axis, momentum=0.9,
                          activation=activation, negative_slope=SLOPE, residual=residual,
                          implementation=implementation)[0]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("shape", "axis", "dtype"), [
    ((4, 3, 5, 6), -1, jnp.float32),
    ((4, 6, 3, 5), 1, jnp.float32),
    ((4, 3, 5, 6), -1, jnp.bfloat16),
], ids=["nhwc", "nchw", "nhwc-bf16"])
def test_outputs_against_the_reference(activation, shape, axis, dtype):
  x, residual, state, scale, bias = _inputs(shape, axis, dtype)

  @jax.jit
  def run(x, residual, state, scale, bias):
    return {(impl, training, with_residual): _bn(
        x, residual if with_residual else None, state, scale, bias, training=training,
        axis=axis, activation=activation, implementation=impl)
            for impl in IMPLEMENTATIONS for training in (True, False)
            for with_residual in (True, False)}

  x64, r64 = np.asarray(x, np.float64), np.asarray(residual, np.float64)
  mean, var = ref.batch_stats(x64, axis)
  for (impl, training, with_residual), z in run(x, residual, state, scale, bias).items():
    stats = (mean, var) if training else (state.mean, state.var)
    u = ref.normalize(x64, *stats, scale, bias, axis) + (r64 if with_residual else 0)
    assert z.dtype == dtype and z.shape == shape
    assert_close(z, ref.activation(u, activation, SLOPE), 4 * tolerance(dtype),
                 f"{impl} {training=} {with_residual=}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_gradients_equal_plain_autodiff(activation):
  x, residual, state, scale, bias = _inputs((4, 5, 3, 2), 1)
  mask = jnp.asarray(np.random.default_rng(3).random((4, 1, 3, 2)) < 0.7)

  def loss(implementation, x, residual, scale, bias):
    z, new = jaxbn.batch_norm(x, state, scale, bias, training=True, axis=1, mask=mask,
                              activation=activation, negative_slope=SLOPE, residual=residual,
                              implementation=implementation)
    return jnp.sum(jnp.sin(3 * z)) + jnp.sum(new.mean)

  grads = jax.jit(lambda *args: [jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3))(
      *args) for impl in IMPLEMENTATIONS])(x, residual, scale, bias)
  *custom, reference = grads  # IMPLEMENTATIONS ends with the reference
  for grads in custom:
    for ours, want, name in zip(grads, reference, ["x", "residual", "scale", "bias"], strict=True):
      assert_close(ours, np.asarray(want, np.float64), 1e-4, name)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_check_grads_float64(activation):
  with jax.enable_x64(True):
    x, residual, state, scale, bias = _inputs((6, 3), -1, jnp.float64, seed=5)

    def f(x, residual, scale, bias):
      z, _ = jaxbn.batch_norm(x, state, scale, bias, training=True, activation=activation,
                              negative_slope=SLOPE, residual=residual)
      return z

    # Finite differences need every pre-activation away from the kink.
    u = jaxbn.batch_norm(x, state, scale, bias, training=True, residual=residual)[0]
    assert np.min(np.abs(u)) > 1e-2
    check_grads(jax.jit(f), (x, residual, scale, bias), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_keeps_x_and_the_output_only(activation, dtype):
  # Reverse mode keeps `x`, the output `z` (not when the activation is the identity)
  # and per-feature values; not the residual, a mask, `x - K` or a float32 copy.
  x, residual, state, scale, bias = _inputs((4, 3, 5, 6), -1, dtype)

  def f(x, residual, scale, bias):
    z, _ = jaxbn.batch_norm(x, state, scale, bias, training=True, activation=activation,
                            residual=residual)
    return z

  saved = [why for aval, why in saved_residuals(f, x, residual, scale, bias)
           if aval.size == x.size and aval.dtype == dtype]
  assert len(saved) == len([aval for aval, _ in saved_residuals(f, x, residual, scale, bias)
                            if aval.size == x.size])
  expected = 1 if activation is None else 2
  assert len(saved) == expected, saved
  assert "from the argument x" in saved


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(activation="gelu"), ValueError,
     r"`activation` must be one of \(None, 'relu', 'leaky_relu'\), got 'gelu'"),
    (dict(activation="leaky_relu", negative_slope=-0.1), ValueError,
     r"`negative_slope` must be a finite float >= 0, got -0\.1"),
    (dict(activation="leaky_relu", negative_slope=jnp.float32(0.1)), TypeError,
     r"`negative_slope` must be a Python float \(it is static\)"),
    (dict(residual=jnp.ones((5, 1))), ValueError,
     r"`residual` has shape \(5, 1\), but it is added to the normalized input of shape "
     r"\(5, 3\); give it exactly that shape"),
    (dict(residual=jnp.ones((5, 3), jnp.int32)), TypeError,
     r"`residual` must be floating point, got dtype int32"),
])
@pytest.mark.parametrize("training", [True, False])
def test_bad_input(kwargs, error, match, training):
  x = jnp.ones((5, 3))
  with pytest.raises(error, match=match):
    jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(3), training=training, **kwargs))(x)


# Regression: relu of a -inf pre-activation returned NaN (0 * -inf) and negative ones -0.;
# it shows with inf padding in masked-out entries, which are still normalized.
PADDING = np.array([-np.inf, np.inf, np.nan, -3e38])


def _padded(dtype=jnp.float32):
  """(x, mask): 6 valid rows of 3 features, then 4 masked rows of padding values."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal((6, 3)), np.repeat(PADDING[:, None], 3, 1)])
  return jnp.asarray(x, dtype), jnp.asarray(np.arange(10) < 6)[:, None]


# "inference" normalizes with the running statistics; "renorm" and "inplace" are the variants.
PATHS = {
    "kernel": dict(implementation="kernel"),
    "fused": dict(implementation="fused"),
    "reference": dict(implementation="reference"),
    "inference": dict(training=False),
    "renorm": dict(renorm=jaxbn.Renorm(r_max=1.5, d_max=0.5)),
    "inplace": dict(inplace=True),
}


def _padded_step(path, activation, x, mask, scale, bias):
  kwargs = dict(training=True, mask=mask, activation=activation, negative_slope=SLOPE)
  kwargs.update(PATHS[path])
  state = jaxbn.init_renorm_state(3) if "renorm" in kwargs else jaxbn.init_state(3)
  return jaxbn.batch_norm(x, state, scale, bias, **kwargs)


@pytest.mark.parametrize(("path", "activation"), [
    (path, activation) for path in PATHS for activation in ("relu", "leaky_relu")
    if not (path == "inplace" and activation == "relu")  # not invertible: refused
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activations_of_infinite_and_nan_padding_follow_their_definition(path, activation, dtype):
  x, mask = _padded(dtype)
  scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, -0.2, 0.3])
  y, state = jax.jit(functools.partial(_padded_step, path, activation))(x, mask, scale, bias)
  y = np.asarray(y, np.float32)
  assert np.isfinite(y[:6]).all() and all(np.isfinite(v).all() for v in state[:2])
  negative = 0.0 if activation == "relu" else -np.inf
  np.testing.assert_array_equal(y[6], negative)  # act(-inf)
  np.testing.assert_array_equal(y[7], np.inf)  # act(inf)
  assert np.isnan(y[8]).all()  # act(nan)
  if activation == "relu":
    np.testing.assert_array_equal(np.signbit(y[6:8]), False)  # +0., never -0.
    assert not np.signbit(y[:6][y[:6] == 0]).any()
    np.testing.assert_array_equal(y[9], 0.0)


@pytest.mark.parametrize("path", ["kernel", "fused", "reference", "renorm"])
def test_relu_gradients_with_minus_inf_padding_equal_those_with_finite_padding(path):
  x, mask = _padded()
  x = x[:8].at[7].set(-1e30)  # valid rows, then -inf and -1e30 padding
  mask = mask[:8]
  scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, -0.2, 0.3])

  def loss(x, scale, bias):
    y, _ = _padded_step(path, "relu", x, mask, scale, bias)
    return jnp.sum(jnp.sin(y) * jnp.arange(1.0, 25.0).reshape(8, 3))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  got = grad(x, scale, bias)
  want = grad(x.at[6].set(-1e30), scale, bias)  # a finite padding gives the same zeros
  for g, w in zip(got, want, strict=True):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[0][6:], 0.0)
  tangents = (jnp.ones_like(x).at[6].set(0.0), jnp.ones(3), jnp.ones(3))
  assert np.isfinite(jax.jvp(loss, (x, scale, bias), tangents)[1])


# Regression: relu as a select (`where(u <= 0, 0, u)`) kept XLA from fusing it with the layers
# around it as it fuses `jax.nn.relu`: a vmapped Equinox CNN's inference took 21 ms, 10 without.
def test_fused_relu_is_a_maximum_as_jax_nn_relu_is():
  x = jnp.ones((4, 3))
  state = jaxbn.init_state(3)
  for training in (False, True):
    step = functools.partial(
        jaxbn.batch_norm, state=state, training=training, activation="relu", implementation="fused"
    )
    jaxpr = str(jax.make_jaxpr(lambda x: step(x)[0])(x))  # noqa: B023
    assert "max" in jaxpr and "select_n" not in jaxpr, training
