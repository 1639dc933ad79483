"""Gradients of batch norm: finite differences in float64, forward and reverse mode, memory.

``check_grads`` compares first and second derivatives, in forward and reverse
mode, with finite differences in float64 (64-bit types are enabled only inside
these tests). The fused implementation must agree with plain autodiff of the
reference formula, keep only ``x`` and per-feature values for the backward
pass, and let no gradient into the running statistics.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import jaxbn
from tests._reference import IMPLEMENTATIONS

# (shape, feature axes): last axis, NCHW, several feature axes.
LAYOUTS = [((6, 3), -1), ((3, 2, 4), 1), ((3, 4, 2), (0, 2))]


def _inputs(shape, axis, dtype, seed=0, masked=False):
  rng = np.random.default_rng(seed)
  axes = axis if isinstance(axis, tuple) else (axis,)
  feature_shape = tuple(shape[a] for a in axes)
  x = jnp.asarray(2 + 1.5 * rng.standard_normal(shape), dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, feature_shape), dtype)
  bias = jnp.asarray(rng.standard_normal(feature_shape), dtype)
  mask = None
  if masked:  # one flag per position, broadcast along the feature axes
    mask_shape = tuple(1 if i in [a % len(shape) for a in axes] else d for i, d in enumerate(shape))
    mask = rng.random(mask_shape) < 0.7
    mask.flat[:2] = True
    mask = jnp.asarray(mask)
  return x, scale, bias, mask


def _batch_norm(x, scale, bias, *, axis, mask, implementation, training=True):
  state = jaxbn.init_state(scale.shape, scale.dtype)
  y, _ = jaxbn.batch_norm(
      x, state, scale, bias, training=training, axis=axis, mask=mask,
      implementation=implementation,
  )
  return y


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_check_grads_float64(implementation):
  # One function of every layout, with and without a mask, so that the first and
  # second derivatives of all of them are checked by one (compiled) check_grads.
  with jax.enable_x64(True):
    inputs = [_inputs(shape, axis, jnp.float64, seed=i, masked=True)
              for i, (shape, axis) in enumerate(LAYOUTS)]
    masks = [mask for *_, mask in inputs]

    @jax.jit
    def f(xs, scales, biases):
      ys = []
      for x, scale, bias, mask, (_, axis) in zip(xs, scales, biases, masks, LAYOUTS, strict=True):
        for m in (None, mask):
          ys.append(_batch_norm(x, scale, bias, axis=axis, mask=m, implementation=implementation))
      return ys

    args = tuple(zip(*[(x, scale, bias) for x, scale, bias, _ in inputs], strict=True))
    assert all(y.dtype == jnp.float64 for y in f(*args))
    check_grads(f, args, order=2, modes=("fwd", "rev"))


def test_check_grads_float64_inference():
  # Inference normalizes with the running statistics: gradients w.r.t. x, scale, bias.
  with jax.enable_x64(True):
    x, scale, bias, _ = _inputs((5, 3), -1, jnp.float64)
    f = jax.jit(functools.partial(
        _batch_norm, axis=-1, mask=None, implementation="fused", training=False
    ))
    check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"))


def test_check_grads_float64_normalize_in_all_inputs():
  # normalize differentiates in x, mean, var, scale and bias (the running
  # statistics too), also with a fused activation and residual.
  with jax.enable_x64(True):
    x, scale, bias, _ = _inputs((6, 4), -1, jnp.float64)
    rng = np.random.default_rng(5)
    mean = jnp.asarray(rng.standard_normal(4))
    var = jnp.asarray(rng.uniform(0.5, 2.0, 4))
    residual = jnp.asarray(rng.standard_normal(x.shape))

    def f(x, mean, var, scale, bias, residual):
      state = jaxbn.BatchNormState(mean, var, jnp.zeros((), jnp.int32))
      plain = jaxbn.normalize(x, mean, var, scale, bias)
      fused = jaxbn.batch_norm(x, state, scale, bias, training=False,
                               activation="leaky_relu", negative_slope=0.2, residual=residual)[0]
      return plain, fused

    check_grads(jax.jit(f), (x, mean, var, scale, bias, residual), order=2,
                modes=("fwd", "rev"))


def test_normalize_keeps_only_x_for_the_backward_pass():
  x, scale, bias, _ = _inputs((6, 5, 4), -1, jnp.float32)
  mean, var = jnp.zeros(4), jnp.ones(4)
  vjp_fn = jax.eval_shape(lambda *a: jax.vjp(jaxbn.normalize, *a)[1], x, mean, var, scale, bias)
  assert [leaf.size for leaf in jax.tree.leaves(vjp_fn) if leaf.size > 4] == [x.size]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        pytest.param((8, 5), -1, id="last"),
        pytest.param((3, 4, 5, 6), 1, id="nchw"),
        pytest.param((4, 5, 6, 3), (1, 3), id="axes-1-3"),
    ],
)
def test_fused_and_reference_gradients_agree(shape, axis, masked):
  x, scale, bias, mask = _inputs(shape, axis, jnp.float32, seed=1, masked=masked)
  cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)

  @jax.jit
  def vjps(x, scale, bias):
    out = []
    for implementation in IMPLEMENTATIONS:
      f = functools.partial(_batch_norm, axis=axis, mask=mask, implementation=implementation)
      y, vjp = jax.vjp(f, x, scale, bias)
      out.append((y, vjp(cotangent)))
    return out

  *custom, (y_ref, grads_ref) = vjps(x, scale, bias)  # the reference comes last
  for y, grads in custom:
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for g, g_ref, name in zip(grads, grads_ref, ("x", "scale", "bias"), strict=True):
      size = float(np.max(np.abs(g_ref)))
      np.testing.assert_allclose(g, g_ref, atol=2e-5 * max(size, 1.0), err_msg=name)


def test_forward_mode_jvp_jacfwd_hessian():
  # Forward mode works through the fused custom rules and matches the reference.
  x, scale, bias, mask = _inputs((5, 3), -1, jnp.float32, seed=3, masked=True)
  rng = np.random.default_rng(4)
  tangents = tuple(jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for v in (x, scale, bias))
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  @jax.jit
  def derivatives(x, scale, bias):
    out = {}
    for implementation in IMPLEMENTATIONS:
      f = functools.partial(_batch_norm, axis=-1, mask=mask, implementation=implementation)

      def loss(x, scale, bias, f=f):
        return jnp.sum(weights * jnp.sin(f(x, scale, bias)))

      out[implementation] = (
          jax.jvp(f, (x, scale, bias), tangents),
          jax.jacfwd(f)(x, scale, bias),
          jax.jacrev(f)(x, scale, bias),
          jax.hessian(loss, argnums=(0, 1))(x, scale, bias),
      )
    return out

  out = derivatives(x, scale, bias)
  for implementation in ("kernel", "fused"):
    (y, y_dot), jac_fwd, jac_rev, hessian = out[implementation]
    assert y_dot.shape == x.shape and jac_fwd.shape == x.shape + x.shape
    np.testing.assert_allclose(jac_fwd, jac_rev, atol=1e-5)
    for name, ours, reference in zip(
        ("jvp", "jacfwd", "jacrev", "hessian"), out[implementation], out["reference"], strict=True
    ):
      for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"{implementation} {name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_gradient_flows_into_the_new_state(implementation):
  x, scale, bias, mask = _inputs((6, 3), -1, jnp.float32, seed=5, masked=True)

  def state_sum(x, scale, bias, field):
    _, new_state = jaxbn.batch_norm(
        x, jaxbn.init_state(3), scale, bias, training=True, mask=mask,
        implementation=implementation,
    )
    return jnp.sum(getattr(new_state, field))

  grads = jax.jit(lambda *args: [
      jax.grad(state_sum, argnums=(0, 1, 2))(*args, field) for field in ("mean", "var")
  ])(x, scale, bias)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))


_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def _saved_residuals(capsys, f, *args):
  """``(shape, origin)`` of each array ``f``'s reverse mode keeps, as JAX prints them."""
  capsys.readouterr()
  print_saved_residuals(f, *args)
  out = []
  for line in capsys.readouterr().out.splitlines():
    match = _RESIDUAL.match(line)
    assert match, line
    shape = tuple(int(d) for d in match.group(2).split(",") if d)
    out.append((match.group(1), shape, match.group(3)))
  return out


@pytest.mark.parametrize(
    ("dtype", "masked"),
    [
        pytest.param(jnp.float32, False, id="float32"),
        pytest.param(jnp.float32, True, id="float32-masked"),
        pytest.param(jnp.bfloat16, False, id="bfloat16"),
    ],
)
def test_fused_saves_only_x_and_per_feature_values(capsys, dtype, masked):
  # Reverse mode through the fused path keeps x itself (the caller's array) and
  # O(C) values: no array of x's size is computed and kept, with a mask broadcast
  # along the features or with a half-precision x (not its float32 copy).
  shape = (4, 6, 6, 5)
  x, scale, bias, mask = _inputs(shape, -1, dtype, masked=masked)
  size = int(np.prod(shape))

  def residuals(implementation):
    def f(x, scale, bias):
      return _batch_norm(x, scale, bias, axis=-1, mask=mask, implementation=implementation)

    saved = _saved_residuals(capsys, f, x, scale, bias)
    return [r for r in saved if int(np.prod(r[1])) == size]

  fused = residuals("fused")
  assert [origin for _, _, origin in fused] == ["from the argument x"], fused
  assert fused[0][0] == {jnp.float32: "f32", jnp.bfloat16: "bf16"}[dtype]
  reference = residuals("reference")
  assert len([r for r in reference if not r[2].startswith("from the argument")]) >= 2, reference
