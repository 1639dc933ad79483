"""The kernels' primitives under every transformation they promise.

Derivatives: ``check_grads`` of first and second order in forward and
reverse mode in float64 (the primitives' reference lowering, so every rule
runs), and jvp, vjp, jacfwd and hessian in float32 against the fused XLA
pieces. Then vmap (an ensemble, nested, with an axis name), what reverse mode
keeps, the bytes of the compiled step, jax.export with a symbolic batch, and
sharding (a sharded jit must not gather ``x``; shard_map runs the kernel).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from test_kernels import (
    FUSED,
    LAYOUTS,
    custom_calls,
    first_sample,
    inputs,
    make_mask,
    reduction_axes,
    train_step,
)

from jaxbn import _kernels as kernels

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"jaxbn's kernels are not loaded: {kernels.reason()}"
)

f32, bf16, f64 = jnp.float32, jnp.bfloat16, jnp.float64

# One batch-norm variant per layout, with the options that change the rules.
VARIANTS = [
    ("nhwc", dict(mask="row", activation="leaky_relu", negative_slope=0.2, residual=True)),
    ("nchw", dict(mask="full")),
    ("ghost", dict(activation="leaky_relu", negative_slope=0.3)),
    ("mlp", dict(residual=True)),
]


def variant(name, options, dtype, seed=0):
  """``(step(x, scale, bias, residual), (x, scale, bias, residual))`` of a ``VARIANTS`` entry."""
  shape, kept = LAYOUTS[name]
  if name != "mlp":  # small enough for Jacobians and finite differences
    shape = tuple(min(size, 4) for size in shape)
  x, scale, bias = inputs(shape, kept, dtype, seed)
  rng = np.random.default_rng(seed + 1)
  mask = make_mask(options.get("mask"), shape, kept, rng)
  residual = jnp.asarray(rng.standard_normal(shape), dtype) if options.get("residual") else None

  def step(pieces, x, scale, bias, residual):
    return train_step(pieces, kept, x, scale, bias, mask, options.get("activation"),
                      options.get("negative_slope", 0.0), residual)

  return step, (x, scale, bias, residual)


def test_check_grads_float64_every_variant():
  # First and second derivatives, forward and reverse, of the variants of
  # every layout in one compiled function; float64 lowers each primitive to
  # its reference.
  with jax.enable_x64(True):
    steps, args = zip(*(variant(n, o, f64, seed=i) for i, (n, o) in enumerate(VARIANTS[:3])),
                      strict=True)

    @jax.jit
    def f(args):
      return [step(kernels, *a) for step, a in zip(steps, args, strict=True)]

    check_grads(f, (list(args),), order=2, modes=("fwd", "rev"))


def test_check_grads_float64_in_the_shift_and_every_operand():
  # The rules of the primitives themselves: the shift K carries derivatives
  # here (batch norm passes it without), and so do a, b and the residual.
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    shape, kept = (5, 3, 4), (1,)
    axes = reduction_axes(3, kept)
    x, shift, a, b, residual = (
        jnp.asarray(rng.standard_normal(s))
        for s in (shape, (1, 3, 1), (1, 3, 1), (1, 3, 1), shape)
    )
    mask = make_mask("full", shape, kept, rng)

    @jax.jit
    def f(x, shift, a, b, residual):
      s1, s2 = kernels.shifted_sums(axes, x, x, shift, mask)
      z = kernels.shifted_affine_act("leaky_relu", 0.25, x, x, shift, a * s2, b + s1, residual)
      return z, kernels.shifted_affine(x, x, shift, a, b)

    check_grads(f, (x, shift, a, b, residual), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("name, options", VARIANTS, ids=[n for n, _ in VARIANTS])
def test_forward_and_reverse_mode_match_the_fused_path(name, options):
  step, (x, scale, bias, residual) = variant(name, options, f32, seed=5)
  rng = np.random.default_rng(6)
  tangents = (jnp.asarray(rng.standard_normal(x.shape), f32), 0.1 * scale, 0.1 * bias)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), f32)

  def derivatives(pieces_is_kernels, x, scale, bias):
    pieces = kernels if pieces_is_kernels else FUSED
    fn = functools.partial(step, pieces, residual=residual)
    y, vjp = jax.vjp(fn, x, scale, bias)
    return y, vjp(cotangent), jax.jvp(fn, (x, scale, bias), tangents)[1]

  derivatives = jax.jit(derivatives, static_argnums=0)
  got, want = derivatives(True, x, scale, bias), derivatives(False, x, scale, bias)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())))


def test_jacfwd_and_hessian_match_the_fused_path():
  step, (x, scale, bias, residual) = variant("nhwc", VARIANTS[0][1], f32, seed=7)
  weights = jnp.asarray(np.random.default_rng(8).standard_normal(x.shape), f32)

  def loss(pieces, x, scale, bias):
    return jnp.sum(weights * jnp.sin(step(pieces, x, scale, bias, residual)))

  for transform in (jax.jacfwd(functools.partial(step, residual=residual), argnums=(1, 2)),
                    jax.hessian(loss, argnums=(1, 2))):
    got = jax.jit(functools.partial(transform, kernels))(x, scale, bias)
    want = jax.jit(functools.partial(transform, FUSED))(x, scale, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))


# ---------------------------------------------------------------------------
# vmap


def ensemble(members, shape, kept, seed=9):
  """A stack of ``members`` inputs ``(x, scale, bias)``, each with its own data."""
  parts = [inputs(shape, kept, f32, seed + i) for i in range(members)]
  return tuple(jnp.stack(p) for p in zip(*parts, strict=True))


def test_vmap_ensemble_is_one_kernel_call_with_per_member_statistics():
  kept = (3,)
  x, scale, bias = ensemble(3, (2, 3, 5, 6), kept)
  step = functools.partial(train_step, kernels, kept, activation="relu")
  batched = jax.vmap(step)
  want = jnp.stack([step(*(v[i] for v in (x, scale, bias))) for i in range(3)])
  np.testing.assert_allclose(jax.jit(batched)(x, scale, bias), want, rtol=1e-5, atol=1e-5)
  assert sorted(custom_calls(batched, x, scale, bias)) == [
      "jaxbn_shifted_affine", "jaxbn_shifted_sums"]
  # Reverse mode of the ensemble folds the members into the kernel's groups too.
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(batched(*a))), argnums=(0, 1, 2)))
  want_grads = [jax.grad(lambda *a: jnp.sum(jnp.sin(step(*a))), argnums=(0, 1, 2))(
      *(v[i] for v in (x, scale, bias))) for i in range(3)]
  for got, member in zip(grads(x, scale, bias), zip(*want_grads, strict=True), strict=True):
    np.testing.assert_allclose(got, jnp.stack(member), rtol=1e-4, atol=1e-5)


def test_nested_vmap_with_shared_parameters():
  kept = (1,)
  x, _, _ = ensemble(6, (5, 4, 3), kept)
  x = x.reshape((2, 3) + x.shape[1:])
  scale, bias = jnp.linspace(0.5, 1.5, 4), jnp.linspace(-1, 1, 4)  # shared: broadcast
  step = functools.partial(train_step, kernels, kept)
  got = jax.jit(jax.vmap(jax.vmap(step, (0, None, None)), (0, None, None)))(x, scale, bias)
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(got[i, j], step(x[i, j], scale, bias), rtol=1e-5, atol=1e-5)


# Regression: per example (one entry per feature), a vmapped MLP ran the sums as one kernel
# task per entry, 40 ms for 512 x 512 where XLA's elementwise pieces take 0.2 ms.
def test_one_entry_per_feature_takes_xla_elementwise_pieces():
  x, scale, bias = inputs((8, 16), (1,), f32, seed=11)
  per_example = jax.vmap(functools.partial(train_step, kernels, (0,)), (0, None, None))
  assert custom_calls(per_example, x, scale, bias) == []
  want = jax.vmap(functools.partial(train_step, FUSED, (0,)), (0, None, None))(x, scale, bias)
  np.testing.assert_allclose(jax.jit(per_example)(x, scale, bias), want, rtol=1e-6, atol=1e-6)


def synced_step(pieces, axis_name, x, scale, bias):
  """Batch norm over a batch split along a vmapped ``axis_name``: the sums are psum'd."""
  kept = (1,)
  axes = reduction_axes(x.ndim, kept)
  shift = jax.lax.pmean(first_sample(x, kept), axis_name)  # one K for every member
  s1, s2 = jax.lax.psum(pieces.shifted_sums(axes, x, x, shift, None), axis_name)
  count = x.size // s1.size * jax.lax.axis_size(axis_name)
  delta = s1 / count
  a = jax.lax.rsqrt((s2 - s1 * delta) / count + 1e-5) * scale.reshape(shift.shape)
  return pieces.shifted_affine(x, x, shift, a, bias.reshape(shift.shape) - delta * a)


def test_vmap_with_axis_name_keeps_the_collectives_outside():
  x, scale, bias = inputs((4, 6, 3), (2,), f32, seed=10)  # members of shape (6, 3)

  def loss(pieces, x, scale, bias):
    y = jax.vmap(functools.partial(synced_step, pieces, "batch"), (0, None, None),
                 axis_name="batch")(x, scale, bias)
    return jnp.sum(jnp.sin(y)), y

  got = jax.jit(jax.value_and_grad(functools.partial(loss, kernels), (0, 1, 2), has_aux=True))
  want = jax.jit(jax.value_and_grad(functools.partial(loss, FUSED), (0, 1, 2), has_aux=True))
  for g, w in zip(jax.tree.leaves(got(x, scale, bias)), jax.tree.leaves(want(x, scale, bias)),
                  strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# What reverse mode keeps, and the bytes the compiled step moves


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_reverse_mode_keeps_x_and_per_feature_values(activation, dtype):
  # x (the caller's array), the output z when an activation reads it, and
  # per-feature values: no x - K, no float32 copy of x.
  shape, kept = LAYOUTS["nhwc"]
  x, scale, bias = inputs(shape, kept, dtype)
  step = functools.partial(train_step, kernels, kept, activation=activation)
  vjp = jax.eval_shape(lambda *a: jax.vjp(step, *a)[1], x, scale, bias)
  leaves = jax.tree.leaves(vjp)
  large = [(leaf.shape, leaf.dtype) for leaf in leaves if leaf.size > shape[-1]]
  assert large == [(x.shape, x.dtype)] * (1 if activation is None else 2)
  assert len(leaves) - len(large) <= 12


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's passes")
@pytest.mark.parametrize("activation", [None, "relu"])
def test_compiled_step_makes_one_elementwise_pass_and_no_scratch(activation):
  # Forward: sums (1 N) and the affine map (2 N); backward: the reductions
  # (2 N, 3 N reading z) and one fused pass writing dx (3 N, 4 N reading z).
  shape, kept = (64, 14, 14, 256), (3,)
  x = jax.ShapeDtypeStruct(shape, bf16)
  per_feature = jax.ShapeDtypeStruct((256,), f32)
  step = functools.partial(train_step, kernels, kept, activation=activation)

  def forward_and_backward(x, scale, bias, dz):
    z, vjp = jax.vjp(step, x, scale, bias)
    return z, vjp(dz)

  compiled = jax.jit(forward_and_backward).lower(x, per_feature, per_feature, x).compile()
  entry = compiled.as_text().split("ENTRY")[1]
  x_sized = [line for line in entry.splitlines()
             if " fusion(" in line and "bf16[64,14,14,256]" in line.split("fusion(")[0]]
  assert len(x_sized) == 1, x_sized  # dx
  assert compiled.memory_analysis().temp_size_in_bytes < x.size * x.dtype.itemsize // 100


# ---------------------------------------------------------------------------
# Export, sharding


def test_export_with_a_symbolic_batch_size():
  # By default an export takes the XLA formulation (portable, no custom call);
  # in kernels_in_export() the kernels, which read their shapes from the
  # buffers at run time: one export runs any batch.
  kept = (1,)
  _, scale, bias = inputs((8, 16), kept, f32)
  step = functools.partial(train_step, kernels, kept, activation="relu")
  loss_grad = jax.grad(lambda x, s, b: jnp.sum(jnp.sin(step(x, s, b))), argnums=(0, 1, 2))
  batch = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 16"), f32)
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in kernels.TARGETS]
  for fn in (step, loss_grad):
    portable = jax.export.export(jax.jit(fn))(batch, scale, bias)
    with kernels.kernels_in_export():  # a new function: traced anew, in the context
      fast = jax.export.export(jax.jit(functools.partial(fn)), disabled_checks=checks)(
          batch, scale, bias)
    assert "jaxbn_" not in portable.mlir_module()
    assert "jaxbn_shifted_sums" in fast.mlir_module()
    for n in (5, 37):
      x, _, _ = inputs((n, 16), kept, f32, seed=n)
      want = jax.jit(fn)(x, scale, bias)
      for exported in (portable, fast):
        for g, w in zip(jax.tree.leaves(exported.call(x, scale, bias)), jax.tree.leaves(want),
                        strict=True):
          np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def auto_mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_sharded_jit_does_not_gather_x():
  # A custom call would be opaque to the SPMD partitioner, which would gather
  # x onto every device; under partitioning the primitives lower to XLA.
  mesh = auto_mesh()
  x, scale, bias = inputs((64, 6, 32), (2,), f32)
  sharded = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
  step = functools.partial(train_step, kernels, (2,), activation="relu")
  loss_grad = jax.grad(lambda *a: jnp.sum(jnp.sin(step(*a))), argnums=(0, 1, 2))
  for fn in (step, loss_grad):
    text = jax.jit(fn).lower(sharded, scale, bias).compile().as_text()
    assert "all-gather" not in text and "jaxbn_" not in text
    for g, w in zip(jax.tree.leaves(jax.jit(fn)(sharded, scale, bias)),
                    jax.tree.leaves(jax.jit(fn)(x, scale, bias)), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_shard_map_runs_the_kernel_on_each_shard():
  mesh = auto_mesh()
  x, scale, bias = inputs((64, 6, 32), (2,), f32)
  sharded = jax.device_put(x, jax.NamedSharding(mesh, P("data")))

  def local(pieces, x, scale, bias):  # each device normalizes its own shard
    return jax.shard_map(functools.partial(train_step, pieces, (2,)), mesh=mesh,
                         in_specs=(P("data"), P(), P()), out_specs=P("data"))(x, scale, bias)

  def loss(pieces, x, scale, bias):
    return jnp.sum(jnp.sin(local(pieces, x, scale, bias)))

  assert "jaxbn_shifted_sums" in jax.jit(functools.partial(local, kernels)).lower(
      sharded, scale, bias).compile().as_text()
  for fn in (local, jax.grad(loss, argnums=(1, 2, 3))):
    got = jax.jit(functools.partial(fn, kernels))(sharded, scale, bias)
    want = jax.jit(functools.partial(fn, FUSED))(sharded, scale, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_pmap_runs_the_kernel_on_each_device():
  x, scale, bias = inputs((8, 6, 5), (2,), f32)  # one example of (6, 5) per device
  step = functools.partial(train_step, kernels, (1,))
  mapped = jax.pmap(step, in_axes=(0, None, None))
  assert "jaxbn_shifted_sums" in mapped.lower(x, scale, bias).compile().as_text()
  want = jnp.stack([train_step(FUSED, (1,), x[i], scale, bias) for i in range(8)])
  np.testing.assert_allclose(mapped(x, scale, bias), want, rtol=1e-5, atol=1e-5)
