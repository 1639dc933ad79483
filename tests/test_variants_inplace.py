"""In-Place Activated BatchNorm: the backward pass keeps the output, not the input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close
from jax import lax
from jax._src.ad_checkpoint import saved_residuals
from jax.test_util import check_grads

import jaxbn

SLOPE = 0.2


def _inputs(shape, axis, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[axis]
  x = jnp.asarray(1 + 1.5 * rng.standard_normal(shape), dtype)
  residual = jnp.asarray(rng.standard_normal(shape), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c), dtype)
  bias = jnp.asarray(rng.uniform(-1, 1, c), dtype)
  return x, residual, scale, bias


def _bn(x, residual, scale, bias, *, inplace, activation, axis=-1, mask=None, **kwargs):
  state = jaxbn.init_state(scale.shape, scale.dtype)
  return jaxbn.batch_norm(x, state, scale, bias, training=True, axis=axis, mask=mask,
                          activation=activation, negative_slope=SLOPE, residual=residual,
                          inplace=inplace, **kwargs)


@pytest.mark.parametrize("activation", [None, "leaky_relu"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_same_values_and_gradients_as_fused(activation, with_residual):
  x, residual, scale, bias = _inputs((4, 3, 5, 2), 1)
  residual = residual if with_residual else None
  mask = jnp.asarray(np.random.default_rng(1).random((4, 1, 5, 2)) < 0.7)

  def loss(inplace, x, residual, scale, bias):
    z, new = _bn(x, residual, scale, bias, inplace=inplace, activation=activation, axis=1,
                 mask=mask)
    return jnp.sum(jnp.sin(2 * z)), (z, new)

  @jax.jit
  def both(*args):
    return [jax.grad(functools.partial(loss, inplace), argnums=(0, 1, 2, 3), has_aux=True)(*args)
            for inplace in (True, False)]

  (grads, (z, new)), (grads_fused, (z_fused, new_fused)) = both(x, residual, scale, bias)
  np.testing.assert_array_equal(z, z_fused)  # the forward pass is the same arithmetic
  for a, b in zip(new, new_fused, strict=True):
    assert_close(a, np.asarray(b, np.float64), 1e-6)
  for name, g, g_fused in zip(["x", "residual", "scale", "bias"], grads, grads_fused,
                              strict=True):
    if g_fused is None:
      assert g is None
    else:
      assert_close(g, np.asarray(g_fused, np.float64), 1e-4, name)


def test_check_grads_float64_and_second_derivatives_raise():
  with jax.enable_x64(True):
    x, residual, scale, bias = _inputs((6, 3), -1, jnp.float64, seed=5)
    mask = jnp.asarray(np.random.default_rng(2).random((6, 1)) < 0.8)
    u, _ = _bn(x, residual, scale, bias, inplace=False, activation=None, mask=mask)
    assert np.min(np.abs(u)) > 1e-2  # finite differences stay on one side of the kink.

    def f(x, residual, scale, bias):
      return _bn(x, residual, scale, bias, inplace=True, activation="leaky_relu", mask=mask)[0]

    check_grads(jax.jit(f), (x, residual, scale, bias), order=1, modes=["fwd", "rev"])
    # Documented: first derivatives only; a second one raises rather than being wrong.
    with pytest.raises(ValueError, match=r"`inplace=True` gives first derivatives only"):
      jax.hessian(lambda x: jnp.sum(f(x, residual, scale, bias) ** 2))(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_keeps_the_output_and_never_x(with_residual, dtype):
  # Half precision keeps the half-precision output, not a float32 copy of it.
  x, residual, scale, bias = _inputs((4, 3, 5, 6), -1, dtype)

  def f(x, residual, scale, bias):
    return _bn(x, residual if with_residual else None, scale, bias, inplace=True,
               activation="leaky_relu")[0]

  saved = [why for aval, why in saved_residuals(f, x, residual, scale, bias)
           if aval.size == x.size]
  assert all(aval.dtype == dtype for aval, _ in saved_residuals(f, x, residual, scale, bias)
             if aval.size == x.size)
  assert "from the argument x" not in saved
  assert len(saved) == 1 + with_residual, saved  # z, and r when there is one.


def test_a_conv_network_keeps_one_buffer_per_layer_instead_of_two():
  # conv -> BN -> leaky_relu, three times. Fused: the input x, each BN's input and each
  # BN's output (the next conv's input; the last one for the activation). In place the
  # BN inputs go: one activation-sized buffer per layer instead of two.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  kernels = [jnp.asarray(rng.standard_normal((3, 3, 4, 4)) / 6, jnp.float32) for _ in range(3)]

  def net(kernels, x, inplace):
    for w in kernels:
      h = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x, _ = jaxbn.batch_norm(h, jaxbn.init_state(4), jnp.ones(4), jnp.zeros(4), training=True,
                              activation="leaky_relu", inplace=inplace)
    return x

  def activation_sized(inplace):
    saved = saved_residuals(functools.partial(net, inplace=inplace), kernels, x)
    return len([aval for aval, _ in saved if aval.size == x.size])

  assert activation_sized(inplace=False) == 1 + 2 * 3
  assert activation_sized(inplace=True) == 1 + 3  # x, then each BN's output


def test_across_devices_with_groups_under_vmap():
  x, _, scale, bias = _inputs((4, 6, 3), -1, seed=3)
  groups = [[0, 2], [1, 3]]

  def loss(inplace, x):
    def one(x):
      return _bn(x, None, scale, bias, inplace=inplace, activation="leaky_relu",
                 axis_name="devices", axis_index_groups=groups)[0]
    return jnp.sum(jnp.cos(jax.vmap(one, axis_name="devices")(x)))

  grads = jax.jit(lambda x: [jax.grad(functools.partial(loss, i))(x) for i in (True, False)])(x)
  assert_close(grads[0], np.asarray(grads[1], np.float64), 1e-5)


def test_zero_scale_gives_nan_gradients():
  # Documented: x_hat = (z - bias) / scale cannot be recovered where scale is 0.
  x, _, scale, bias = _inputs((5, 3), -1)
  scale = scale.at[0].set(0.0)
  grad = jax.grad(lambda x: jnp.sum(_bn(x, None, scale, bias, inplace=True,
                                        activation=None)[0] ** 2))(x)
  assert np.isnan(grad[:, 0]).all() and np.isfinite(grad[:, 1:]).all()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(activation="relu"), ValueError,
     r"`inplace=True` recovers the normalized input from the output, so it needs an "
     r"invertible activation.*got `activation`='relu'"),
    (dict(activation="leaky_relu", negative_slope=0.0), ValueError,
     r"invertible activation.*'leaky_relu' with `negative_slope`=0\.0"),
    (dict(implementation="reference"), ValueError,
     r"`inplace=True` is a backward pass of the fused implementation; got "
     r"`implementation`='reference'"),
    (dict(inplace=1), TypeError, r"`inplace` must be a Python bool, got 1"),
])
def test_bad_input(kwargs, error, match):
  kwargs.setdefault("inplace", True)
  with pytest.raises(error, match=match):
    jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, **kwargs))(
        jnp.ones((5, 3)))


# Regression: jvp and grad of a jitted vmap with an axis name raised "div: arrays must have
# the same number of dimensions" (the rule's zero sums were not batched like their tangents).
@pytest.mark.parametrize("axis", [0, -1], ids=["per-example", "per-row"])
def test_derivatives_of_a_jitted_vmap_with_an_axis_name(axis):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 5, 3) if axis == -1 else (4, 3)), jnp.float32)

  def bn(x, inplace):
    return jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, axis=axis, inplace=inplace,
                            activation="leaky_relu", axis_name="i")[0]

  for transform in (lambda f: jax.jvp(f, (x,), (jnp.cos(x),))[1],
                    lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)):
    got, want = (transform(jax.jit(jax.vmap(functools.partial(bn, inplace=i), axis_name="i")))
                 for i in (True, False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
