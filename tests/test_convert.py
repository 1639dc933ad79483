"""bfloat16 conversions (jaxbn._convert) and the one rounding of a bfloat16 ``dx``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _convert
from tests import _reference


def _float32_bit_patterns():
  """Random patterns plus the edges: zeros, infinities, NaNs, overflow, ties, subnormals."""
  rng = np.random.default_rng(0)
  bits = [rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)]
  edges = [0x00000000, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7F7FFFFF, 0x7F7F8000,
           0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x00008000, 0x00018000, 0x007FFFFF]
  edges = np.array(edges, np.uint32)
  bits += [edges, edges | np.uint32(0x80000000)]
  return np.concatenate(bits).view(np.float32)


def test_rounding_to_bfloat16_gives_the_bits_of_the_conversion():
  v = _float32_bit_patterns()
  got = np.asarray(jax.jit(_convert.round_p.bind)(v)).astype(np.float32)
  want = np.asarray(jax.jit(lambda v: v.astype(jnp.bfloat16))(v)).astype(np.float32)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  normal = ~np.isnan(want) & (np.abs(v) >= np.finfo(np.float32).tiny)  # XLA may flush these
  np.testing.assert_array_equal(got[normal].view(np.uint32), want[normal].view(np.uint32))


def test_conversions_are_linear_and_each_others_transpose():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)
  f = lambda x: jnp.sum(_convert.upcast(x) * w)  # noqa: E731
  np.testing.assert_array_equal(jax.grad(f)(x), w.astype(jnp.bfloat16))
  y, t = jax.jvp(_convert.upcast, (x,), (x,))
  np.testing.assert_array_equal(y, x.astype(jnp.float32))
  np.testing.assert_array_equal(t, x.astype(jnp.float32))
  y, t = jax.jvp(_convert.round_p.bind, (w,), (2 * w,))
  np.testing.assert_array_equal(t, (2 * w).astype(jnp.bfloat16))
  (back,) = jax.linear_transpose(_convert.round_p.bind, w)(x)
  np.testing.assert_array_equal(back, x.astype(jnp.float32))
  np.testing.assert_array_equal(jax.vmap(_convert.upcast)(x), x.astype(jnp.float32))
  np.testing.assert_array_equal(jax.vmap(_convert.round_p.bind)(w), w.astype(jnp.bfloat16))


def test_exported_conversions_run_at_any_batch_size():
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 3"), jnp.bfloat16)
  f = jax.grad(lambda x: jnp.sum(jnp.sin(_convert.upcast(x))))
  exported = jax.export.deserialize(jax.export.export(jax.jit(f))(spec).serialize())
  for rows in (2, 5):
    x = jnp.linspace(-2, 2, rows * 3, dtype=jnp.bfloat16).reshape(rows, 3)
    np.testing.assert_array_equal(exported.call(x), f(x))


# (With an activation the gate reads the output, rounded to bfloat16 in one run and not in the
# other; the in-place backward reads it by design.)
_VARIANTS = {
    "plain": {},
    "masked": {"mask": True},
    "ghost_batches": {"virtual_batch_size": 8},
}


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("implementation", _reference.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, axis", [((16, 5, 5, 8), -1), ((16, 8, 5, 5), 1)])
def test_bfloat16_dx_is_the_float32_dx_rounded_once(shape, axis, implementation, variant):
  """The gradients of every use of ``x`` add up in float32, then round to bfloat16 once."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 + rng.normal(size=shape), jnp.bfloat16)
  dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  features = shape[axis]
  scale = jnp.asarray(1 + 0.1 * rng.normal(size=features), jnp.float32)
  kwargs = dict(_VARIANTS[variant])
  if kwargs.pop("mask", False):
    kwargs["mask"] = jnp.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1)) % 3 > 0

  def dx(x, dy):
    def f(x):
      y, _ = jaxbn.batch_norm(
          x, jaxbn.init_state(features), scale, training=True, axis=axis,
          implementation=implementation, **kwargs,
      )
      return y

    return jax.vjp(f, x)[1](dy)[0]

  got = jax.jit(dx)(x, dy)
  want = jax.jit(dx)(x.astype(jnp.float32), dy.astype(jnp.float32)).astype(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.view(jnp.uint16), want.view(jnp.uint16))
