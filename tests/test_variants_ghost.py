"""Ghost (virtual) batches: groups normalized separately, running statistics as tf.keras."""

import functools

import _reference_variants as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close, tolerance
from jax.test_util import check_grads

import jaxbn
from jaxbn._renorm import Renorm, init_renorm_state

F32 = tolerance(jnp.float32)


@pytest.mark.parametrize(("shape", "axis", "masked", "unbiased_var"), [
    ((12, 5, 3), -1, False, False),
    ((8, 3, 4, 2), 1, True, True),
], ids=["nwc", "nchw-masked-unbiased"])
def test_against_the_float64_reference(shape, axis, masked, unbiased_var):
  x, state, scale, bias = ref.inputs(shape, axis)
  mask = None
  if masked:
    mask = np.random.default_rng(1).random((shape[0], 1) + shape[2:]) < 0.8
  kwargs = dict(training=True, axis=axis, momentum=0.9, virtual_batch_size=4, mask=mask,
                unbiased_var=unbiased_var)

  @jax.jit
  def run(x, state, scale, bias):
    return {name: jaxbn.batch_norm(x, state, scale, bias, implementation=impl, inplace=inplace,
                                   **kwargs)
            for name, impl, inplace in [("fused", "fused", False),
                                        ("reference", "reference", False),
                                        ("inplace", "fused", True)]}

  y64, mean64, var64 = ref.ghost(x, state.mean, state.var, scale, bias, virtual_batch_size=4,
                                 axis=axis, momentum=0.9, epsilon=1e-5, mask=mask,
                                 unbiased_var=unbiased_var)
  for name, (y, new) in run(x, state, scale, bias).items():
    assert_close(y, y64, 4 * F32, f"{name} y")
    assert_close(new.mean, mean64, F32, f"{name} mean")
    assert_close(new.var, var64, F32, f"{name} var")


def test_running_statistics_follow_tf_keras():
  # tf.keras groups the strided entries x[g::G]; permuted into contiguous groups, the
  # outputs and the running statistics are the same.
  x, state, _, _ = ref.inputs((12, 5, 3), -1, seed=2)
  groups, size = 3, 4
  y_tf, mean_tf, var_tf = ref.tf_keras_ghost(x, np.asarray(state.mean, np.float64),
                                             np.asarray(state.var, np.float64),
                                             virtual_batch_size=size, momentum=0.9, epsilon=1e-3)
  order = np.arange(12).reshape(size, groups).T.ravel()  # group g's members, g = 0, 1, 2
  y, new = jaxbn.batch_norm(x[order], state, training=True, momentum=0.9, epsilon=1e-3,
                            virtual_batch_size=size)
  assert_close(y, y_tf[order], 4 * F32)
  assert_close(new.mean, mean_tf, F32)
  assert_close(new.var, var_tf, F32)


def test_groups_are_independent_and_gradients_are_exact():
  x, state, scale, bias = ref.inputs((6, 3), -1, seed=3)

  def f(x, implementation="fused"):
    return jaxbn.batch_norm(x, state, scale, bias, training=True, virtual_batch_size=3,
                            implementation=implementation)[0]

  jacobian = np.asarray(jax.jacobian(f)(x))  # [6, 3, 6, 3]
  assert np.all(jacobian[:3, :, 3:] == 0) and np.all(jacobian[3:, :, :3] == 0)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
  g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(f(x, "reference"))))(x)
  assert_close(g, np.asarray(g_ref, np.float64), 1e-5)
  with jax.enable_x64(True):
    check_grads(f, (jnp.asarray(x, jnp.float64),), order=2, modes=["fwd", "rev"])


def test_one_group_is_batch_norm():
  x, state, scale, bias = ref.inputs((6, 4, 3), -1, seed=4)
  bn = functools.partial(jaxbn.batch_norm, x, state, scale, bias, training=True)
  for a, b in zip(jax.tree.leaves(bn(virtual_batch_size=6)), jax.tree.leaves(bn()), strict=True):
    np.testing.assert_array_equal(a, b)


def test_renorm_uses_the_averages_over_groups():
  x, _, scale, bias = ref.inputs((8, 3), -1, seed=5)
  state = init_renorm_state(3)._replace(renorm_mean=jnp.asarray([0.5, -0.5, 0.0]),
                                        renorm_std=jnp.asarray([0.8, 1.5, 1.0]))
  y, new = jaxbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9, epsilon=1e-3,
                            virtual_batch_size=4, renorm=Renorm(r_max=1.2, d_max=0.3))
  x64 = np.asarray(x, np.float64).reshape(2, 4, 3)
  mean, var = x64.mean(1), x64.var(1)
  std = np.sqrt(var.mean(0) + 1e-3)
  r = np.clip(std / np.asarray(state.renorm_std), 1 / 1.2, 1.2)
  d = np.clip((mean.mean(0) - np.asarray(state.renorm_mean)) / np.asarray(state.renorm_std),
              -0.3, 0.3)
  y64 = ((x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-3) * r + d) * np.asarray(
      scale) + np.asarray(bias)
  assert_close(y, y64.reshape(8, 3), 4 * F32)
  assert_close(new.std, 0.9 + 0.1 * std, F32)


def test_across_devices_group_g_gathers_every_devices_group_g():
  x, state, _, _ = ref.inputs((2, 4, 3), -1, seed=6)  # 2 devices, 4 local examples
  y, new = jax.vmap(lambda x: jaxbn.batch_norm(x, state, training=True, momentum=0.0,
                                               virtual_batch_size=2, axis_name="d"),
                    axis_name="d", out_axes=(0, None))(x)
  x64 = np.asarray(x, np.float64).reshape(2, 2, 2, 3)  # device, group, member, feature
  mean, var = x64.mean((0, 2)), x64.var((0, 2))
  assert_close(y, ((x64 - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)).reshape(
      2, 4, 3), 4 * F32)
  assert_close(new.mean, mean.mean(0), F32)
  assert_close(new.var, var.mean(0), F32)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(virtual_batch_size=4), ValueError,
     r"`virtual_batch_size`=4 must be a positive divisor of the batch size 6 \(axis 0 of `x` "
     r"with shape \(6, 3\)\)"),
    (dict(virtual_batch_size=0), ValueError, r"`virtual_batch_size`=0 must be a positive divisor"),
    (dict(virtual_batch_size=2.0), TypeError,
     r"`virtual_batch_size` must be a Python int or None, got 2\.0"),
    (dict(virtual_batch_size=2, axis=(0, 1)), ValueError,
     r"`virtual_batch_size` splits axis 0, the batch axis, but `axis` makes axis 0 a feature"),
    (dict(virtual_batch_size=1), ValueError,
     r"needs more than one value per feature, but `x` of shape \(6, 3\) with `axis`=-1 in "
     r"virtual batches of 1 has a single one"),
])
def test_bad_input(kwargs, error, match):
  x = jnp.ones((6, 3))
  state = jaxbn.init_state((6, 3) if kwargs.get("axis") == (0, 1) else 3)
  with pytest.raises(error, match=match):
    jax.jit(lambda x: jaxbn.batch_norm(x, state, training=True, **kwargs))(x)
