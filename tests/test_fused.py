"""Structural properties of the fused training path (``implementation="fused"``).

What it keeps for the backward pass, how much scratch memory its compiled
forward and backward passes need, forward-mode autodiff through its custom
rules, and gradients equal to plain autodiff of the reference formula.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from benchmarks.shapes import RESNET_MID, TINY

# (shape, feature axis, mask kind): the benchmarks' tiny MLP shape, NHWC, NCHW,
# and NHWC with a mask that drops 30% of the entries.
LAYOUTS = [
    pytest.param(TINY.shape, -1, None, id="mlp"),
    pytest.param((4, 5, 6, 3), -1, None, id="nhwc"),
    pytest.param((3, 4, 5, 6), 1, None, id="nchw"),
    pytest.param((4, 5, 6, 3), -1, "random", id="nhwc-masked"),
]


def _inputs(shape, axis, mask_kind, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  features = shape[axis]
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, features), dtype)
  bias = jnp.asarray(rng.standard_normal(features), dtype)
  mask = None if mask_kind is None else jnp.asarray(rng.uniform(size=shape) > 0.3)
  return x, scale, bias, mask


def _train(implementation, axis, mask, x, scale, bias):
  """``y`` of a training step, as a function of ``(x, scale, bias)``."""
  state = jaxbn.init_state(x.shape[axis], x.dtype)
  y, _ = jaxbn.batch_norm(
      x, state, scale, bias, training=True, axis=axis, mask=mask, implementation=implementation
  )
  return y


def _residual_sizes(fn, *primals):
  """Sizes of the arrays ``jax.vjp(fn, *primals)`` keeps for the backward pass."""
  vjp_fn = jax.eval_shape(lambda *p: jax.vjp(fn, *p)[1], *primals)
  return sorted(leaf.size for leaf in jax.tree.leaves(vjp_fn))


@pytest.mark.parametrize("shape, axis, mask_kind", LAYOUTS)
def test_fused_keeps_only_x_and_per_feature_values(shape, axis, mask_kind):
  x, scale, bias, mask = _inputs(shape, axis, mask_kind)
  sizes = _residual_sizes(functools.partial(_train, "fused", axis, mask), x, scale, bias)
  features = shape[axis]
  # One array of x's size (x itself), the mask when there is one, the rest per feature.
  n_sized = [s for s in sizes if s > features]
  assert n_sized == [x.size] * (1 if mask is None else 2)
  assert len(sizes) - len(n_sized) <= 16  # O(C): a handful of per-feature vectors


def test_reference_keeps_more_than_x():
  # The contrast the fused rules exist for: plain autodiff of the textbook
  # formula keeps x-sized intermediates besides x.
  x, scale, bias, _ = _inputs(TINY.shape, -1, None)
  fused = _residual_sizes(functools.partial(_train, "fused", -1, None), x, scale, bias)
  reference = _residual_sizes(functools.partial(_train, "reference", -1, None), x, scale, bias)
  assert sum(s == x.size for s in fused) == 1
  assert sum(s == x.size for s in reference) >= 2


def _forward_and_backward(x, scale, bias, dy):
  (y, state), vjp = jax.vjp(functools.partial(_train_with_state, "fused"), x, scale, bias)
  return y, state, vjp((dy, jax.tree.map(jnp.zeros_like, state)))


def _train_with_state(implementation, x, scale, bias):
  return jaxbn.batch_norm(
      x, jaxbn.init_state(x.shape[-1]), scale, bias, training=True, implementation=implementation
  )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="scratch sizes are XLA:CPU's")
def test_compiled_fused_step_needs_no_x_sized_scratch():
  # Regression: the two statistics sums shared one materialized `x - K`, an
  # x-sized scratch buffer written once and read twice.
  x = jax.ShapeDtypeStruct(RESNET_MID.shape, jnp.float32)
  per_feature = jax.ShapeDtypeStruct((RESNET_MID.features,), jnp.float32)
  x_bytes = x.size * 4
  forward = jax.jit(functools.partial(_train_with_state, "fused"))
  compiled = forward.lower(x, per_feature, per_feature).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < x_bytes // 100
  compiled = jax.jit(_forward_and_backward).lower(x, per_feature, per_feature, x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < x_bytes // 100


@pytest.mark.parametrize("shape, axis, mask_kind", LAYOUTS)
def test_fused_gradients_equal_reference(shape, axis, mask_kind):
  x, scale, bias, mask = _inputs(shape, axis, mask_kind)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  grads = {}
  for implementation in ("fused", "reference"):
    fn = jax.jit(functools.partial(_train, implementation, axis, mask))
    y, vjp = jax.vjp(fn, x, scale, bias)
    grads[implementation] = (y, *vjp(dy))
  for fused, reference in zip(grads["fused"], grads["reference"], strict=True):
    np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_fused_gradients_equal_reference_with_axis_name():
  # The statistics are combined across the vmapped axis outside the custom
  # rules, so `grad(vmap(..., axis_name))` works and agrees with plain autodiff.
  x, scale, bias, _ = _inputs((4, 6, 3), -1, None)

  def loss(implementation, x, scale, bias):
    def one(x):
      state = jaxbn.init_state(3)
      y, _ = jaxbn.batch_norm(
          x, state, scale, bias, training=True, axis_name="batch", implementation=implementation
      )
      return y

    y = jax.vmap(one, axis_name="batch")(x)
    return jnp.sum(jnp.sin(y))

  grads = [
      jax.jit(jax.grad(functools.partial(loss, i), argnums=(0, 1, 2)))(x, scale, bias)
      for i in ("fused", "reference")
  ]
  for fused, reference in zip(*grads, strict=True):
    np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_forward_mode_matches_reference(mask_kind):
  # jvp, jacfwd and hessian go through the custom JVP rules (float64).
  with jax.enable_x64(True):
    x, scale, bias, mask = _inputs((6, 3), -1, mask_kind, jnp.float64)
    tangents = tuple(jnp.ones_like(a) * 0.1 for a in (x, scale, bias))

    def loss(implementation, x, scale, bias):
      return jnp.sum(jnp.sin(_train(implementation, -1, mask, x, scale, bias)))

    @jax.jit
    def derivatives(x, scale, bias):
      results = {}
      for implementation in ("fused", "reference"):
        fn = functools.partial(_train, implementation, -1, mask)
        hessian = jax.hessian(functools.partial(loss, implementation), argnums=(0, 1, 2))
        results[implementation] = (
            jax.jvp(fn, (x, scale, bias), tangents),
            jax.jacfwd(fn)(x, scale, bias),
            hessian(x, scale, bias),
        )
      # Reverse mode of the fused path, to check against its forward mode.
      jacrev = jax.jacrev(functools.partial(_train, "fused", -1, mask))(x, scale, bias)
      return results, jacrev

    results, jacrev = derivatives(x, scale, bias)

    def close(a, b):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)

    jax.tree.map(close, results["fused"], results["reference"])
    jax.tree.map(close, results["fused"][1], jacrev)


@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_fused_check_grads_second_order(mask_kind):
  with jax.enable_x64(True):
    x, scale, bias, mask = _inputs((5, 2, 3), -1, mask_kind, jnp.float64)
    fn = jax.jit(functools.partial(_train, "fused", -1, mask))
    check_grads(fn, (x, scale, bias), order=2, modes=("fwd", "rev"))
