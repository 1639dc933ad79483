"""A half-precision input's gradient: the float32 ``dx`` rounded once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import _reference

# Not with an activation: its gate reads the output, rounded to half precision in one run and
# not in the other (the in-place backward reads it by design).
_VARIANTS = {
    "plain": {},
    "masked": {"mask": True},
    "ghost_batches": {"virtual_batch_size": 8},
}


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("implementation", _reference.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, axis", [((16, 5, 5, 8), -1), ((16, 8, 5, 5), 1)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_dx_is_the_float32_dx_rounded_once(shape, axis, implementation, variant,
                                                          dtype):
  """The gradients of every use of ``x`` add up in float32, then round once.

  (Two conversions of ``x`` gave two rounded cotangents added in half precision: a quarter of
  the entries of a bfloat16 ``dx`` were one or more units in the last place off.)
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 + rng.normal(size=shape), dtype)
  dy = jnp.asarray(rng.normal(size=shape), dtype)
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
  want = jax.jit(dx)(x.astype(jnp.float32), dy.astype(jnp.float32)).astype(dtype)
  assert got.dtype == dtype
  np.testing.assert_array_equal(got.view(jnp.uint16), want.view(jnp.uint16))
