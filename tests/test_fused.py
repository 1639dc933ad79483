"""Structural properties of the fused training path (``implementation="fused"``).

What it keeps for the backward pass, the scratch memory of its compiled
forward and backward passes, and its half-precision path, which reads the
caller's array as stored. ``test_gradients.py`` holds the float64
``check_grads``, forward mode and the float32 agreement with the reference.

The rules take one shape for XLA:CPU and another for accelerators (see
``jaxbn._fused``); the ``passes`` fixture runs a test under both, whatever
the backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from benchmarks.shapes import RESNET_MID, TINY
from jaxbn import _fused
from tests._reference import IMPLEMENTATIONS

f32, bf16 = jnp.float32, jnp.bfloat16


@pytest.fixture(params=["xla-cpu", "accelerator"])
def passes(request, monkeypatch):
  """Shapes the fused rules for XLA:CPU or for an accelerator, as the test asks."""
  monkeypatch.setattr(_fused, "for_xla_cpu", lambda: request.param == "xla-cpu")
  jax.clear_caches()  # traces of the rules made for the other shape
  yield request.param
  jax.clear_caches()


def _inputs(shape, axis, dtype, masked=False, seed=0):
  rng = np.random.default_rng(seed)
  features = shape[axis]
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, dtype)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, features), f32)
  bias = jnp.asarray(rng.standard_normal(features), f32)
  mask = jnp.asarray(rng.uniform(size=shape) > 0.3) if masked else None
  return x, scale, bias, mask


def _train(implementation, axis, mask, x, scale, bias):
  """``(y, new_state)`` of a training step, as a function of ``(x, scale, bias)``."""
  state = jaxbn.init_state(x.shape[axis])
  return jaxbn.batch_norm(
      x, state, scale, bias, training=True, axis=axis, mask=mask, implementation=implementation
  )


def _output(implementation, axis, mask, x, scale, bias):
  return _train(implementation, axis, mask, x, scale, bias)[0]


@pytest.mark.parametrize(
    "shape, axis, masked",
    [
        pytest.param(TINY.shape, -1, False, id="mlp"),
        pytest.param((3, 4, 5, 6), 1, False, id="nchw"),
        pytest.param((4, 5, 6, 3), -1, True, id="nhwc-masked"),
    ],
)
def test_fused_keeps_only_x_and_per_feature_values(passes, shape, axis, masked):
  x, scale, bias, mask = _inputs(shape, axis, f32, masked)
  fn = functools.partial(_output, "fused", axis, mask)
  vjp_fn = jax.eval_shape(lambda *p: jax.vjp(fn, *p)[1], x, scale, bias)
  sizes = sorted(leaf.size for leaf in jax.tree.leaves(vjp_fn))
  x_sized = [s for s in sizes if s > shape[axis]]
  # x itself, the mask when there is one (both inputs), and a handful of per-feature values.
  assert x_sized == [x.size] * (2 if masked else 1)
  assert len(sizes) - len(x_sized) <= 16


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's buffer assignment")
@pytest.mark.parametrize("dtype", [f32, bf16], ids=["float32", "bfloat16"])
def test_compiled_step_needs_no_x_sized_scratch(dtype):
  # Regressions: the two statistics sums shared one materialized `x - K`, and a
  # half-precision x or dy was copied to float32 in memory before the passes.
  x = jax.ShapeDtypeStruct(RESNET_MID.shape, dtype)
  per_feature = jax.ShapeDtypeStruct((RESNET_MID.features,), f32)
  limit = x.size * x.dtype.itemsize // 100
  train = functools.partial(_train, "fused", -1, None)

  def forward_and_backward(x, scale, bias, dy):
    (y, state), vjp = jax.vjp(train, x, scale, bias)
    return y, state, vjp((dy, jax.tree.map(jnp.zeros_like, state)))

  for fn, args in ((train, (x, per_feature, per_feature)),
                   (forward_and_backward, (x, per_feature, per_feature, x))):
    compiled = jax.jit(fn).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < limit, fn


def test_half_precision_residual_is_the_callers_array(passes):
  x, scale, bias, _ = _inputs((4, 6, 5), -1, bf16)
  vjp_fn = jax.eval_shape(
      lambda *p: jax.vjp(functools.partial(_output, "fused", -1, None), *p)[1], x, scale, bias
  )
  (x_sized,) = [leaf for leaf in jax.tree.leaves(vjp_fn) if leaf.size == x.size]
  assert x_sized.dtype == bf16


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_half_precision_matches_reference(passes, masked):
  # The fused path reads bfloat16 as stored and sums cotangents in float32; the
  # reference casts x first. Outputs, gradients and forward-mode tangents agree
  # to a few bfloat16 roundings of the largest entry.
  x, scale, bias, mask = _inputs((8, 5, 6), -1, bf16, masked, seed=1)
  rng = np.random.default_rng(2)
  dy = jnp.asarray(rng.standard_normal(x.shape), bf16)
  tangents = (jnp.asarray(rng.standard_normal(x.shape), bf16), 0.1 * scale, 0.1 * bias)

  @jax.jit
  def derivatives(x, scale, bias):
    out = {}
    for implementation in IMPLEMENTATIONS:
      fn = functools.partial(_output, implementation, -1, mask)
      y, vjp = jax.vjp(fn, x, scale, bias)
      out[implementation] = (y, vjp(dy), jax.jvp(fn, (x, scale, bias), tangents)[1])
    return out

  out = derivatives(x, scale, bias)
  for implementation in ("kernel", "fused"):
    ours, reference = out[implementation], out["reference"]
    assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, atol=3 * 2**-8 * np.abs(b).max(), err_msg=implementation)


def test_fused_gradients_equal_reference_with_axis_name():
  # The statistics are combined across the vmapped axis outside the custom
  # rules, so `grad(vmap(..., axis_name))` works and agrees with plain autodiff.
  x, scale, bias, _ = _inputs((4, 6, 3), -1, f32)

  def loss(implementation, x, scale, bias):
    def one(x):
      y, _ = jaxbn.batch_norm(
          x, jaxbn.init_state(3), scale, bias, training=True, axis_name="batch",
          implementation=implementation,
      )
      return y

    return jnp.sum(jnp.sin(jax.vmap(one, axis_name="batch")(x)))

  *custom, reference = [  # the reference comes last
      jax.jit(jax.grad(functools.partial(loss, i), argnums=(0, 1, 2)))(x, scale, bias)
      for i in IMPLEMENTATIONS
  ]
  for grads in custom:
    for ours, want in zip(grads, reference, strict=True):
      np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "variant",
    [{}, {"activation": "relu", "residual": True}, {"activation": "leaky_relu", "inplace": True}],
    ids=["plain", "relu-residual", "inplace"],
)
def test_accelerator_passes_compute_what_the_cpu_passes_compute(variant, dtype, monkeypatch):
  x, scale, bias, _ = _inputs((6, 4, 5), -1, dtype, seed=3)
  rng = np.random.default_rng(4)
  dy = jnp.asarray(rng.standard_normal(x.shape), dtype)
  residual = jnp.asarray(rng.standard_normal(x.shape), dtype) if variant.get("residual") else None
  kwargs = {**variant, "residual": residual, "implementation": "fused"}
  tangents = (jnp.asarray(rng.standard_normal(x.shape), dtype), 0.1 * scale, 0.1 * bias)

  def step(x, scale, bias):
    return jaxbn.batch_norm(x, jaxbn.init_state(5), scale, bias, training=True, **kwargs)[0]

  def derivatives(x, scale, bias):
    y, vjp = jax.vjp(step, x, scale, bias)
    return y, vjp(dy), jax.jvp(step, (x, scale, bias), tangents)[1]

  out, kept_apart = {}, {}
  for shape in ("xla-cpu", "accelerator"):
    monkeypatch.setattr(_fused, "for_xla_cpu", lambda shape=shape: shape == "xla-cpu")
    jax.clear_caches()  # traces of the rules made for the other shape
    fn = derivatives
    jaxpr = str(jax.make_jaxpr(fn)(x, scale, bias))
    kept_apart[shape] = "optimization_barrier" in jaxpr or "prevent_cse=True" in jaxpr
    out[shape] = jax.jit(fn)(x, scale, bias)
  jax.clear_caches()
  assert kept_apart == {"xla-cpu": True, "accelerator": False}
  tolerance = 1e-5 if dtype == f32 else 2 * 2**-8
  for cpu, accelerator in zip(
      jax.tree.leaves(out["xla-cpu"]), jax.tree.leaves(out["accelerator"]), strict=True
  ):
    assert cpu.dtype == accelerator.dtype
    cpu, accelerator = np.asarray(cpu, np.float32), np.asarray(accelerator, np.float32)
    np.testing.assert_allclose(accelerator, cpu, atol=tolerance * np.abs(cpu).max())
