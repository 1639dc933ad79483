"""The local math of the training step, with differentiation rules that save only ``x``.

Batch norm is memory bound, so its cost is the bytes it moves. The training
step is written as two local pieces, each with a ``custom_jvp`` rule:

* ``shifted_sums``: ``S1 = sum(x - K)`` and ``S2 = sum((x - K)^2)``, one pass;
* ``shifted_affine``: ``y = (x - K) * a + b`` with per-feature ``a, b``, one pass.

Everything between them (the cross-device combine, ``mean``, ``var``, ``a``,
``b``) is O(C) plain JAX. The tangent rules are linear in the tangents, so
forward mode (``jvp``, ``jacfwd``, ``hessian``) works, and JAX derives reverse
mode by transposing them. The only product of a primal N-sized value with a
tangent is ``(x - K) * t``; it sits inside ``jax.checkpoint``, so reverse mode
saves ``x`` itself (the caller's array, no new memory) plus O(C) values and
recomputes ``x - K`` inside the backward pass's own fusions. The backward pass
is then two reductions, ``sum(dy)`` and ``sum(dy * (x - K))``, and one
elementwise pass ``dx = dy * a + g1 + 2 g2 (x - K)``.

Collectives stay outside these rules, so they compose with ``vmap`` axis
names, ``shard_map`` and ``pmap``.
"""

from functools import partial

import jax
import jax.numpy as jnp


def _masked(mask, value):
  return value if mask is None else jnp.where(mask, value, jnp.zeros_like(value))


def shifted_sums_reference(axes, x, shift, mask):
  """``(sum(x - K), sum((x - K)^2))`` over ``axes`` of the valid entries, plain autodiff."""
  deviation = _masked(mask, x - shift)
  return (
      jnp.sum(deviation, axes, keepdims=True),
      jnp.sum(jnp.square(deviation), axes, keepdims=True),
  )


@jax.checkpoint
def _centered_product(x, shift, t):
  """``(x - K) * t``, recomputed rather than saved when differentiated."""
  return (x - shift) * t


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def shifted_sums(axes, x, shift, mask):
  """Same as ``shifted_sums_reference``; reverse mode saves only ``x`` and ``K``."""
  return shifted_sums_reference(axes, x, shift, mask)


@shifted_sums.defjvp
def _shifted_sums_jvp(axes, primals, tangents):
  x, shift, mask = primals
  dx = tangents[0]  # `shift` carries no gradient (see `_first_valid_sample`).
  sums = shifted_sums(axes, x, shift, mask)
  dx = _masked(mask, dx)
  ds1 = jnp.sum(dx, axes, keepdims=True)
  ds2 = 2 * jnp.sum(_centered_product(x, shift, dx), axes, keepdims=True)
  return sums, (ds1, ds2)


@jax.custom_jvp
def shifted_affine(x, shift, a, b):
  """``y = (x - K) * a + b``: per-feature ``K, a, b`` broadcast against ``x``.

  Subtracting ``K`` first keeps ``y`` accurate for data far from zero, where
  ``x * a + b`` would cancel catastrophically.
  """
  return (x - shift) * a + b


@shifted_affine.defjvp
def _shifted_affine_jvp(primals, tangents):
  x, shift, a, b = primals
  dx, _, da, db = tangents  # `shift` carries no gradient.
  y = shifted_affine(x, shift, a, b)
  return y, dx * a + _centered_product(x, shift, da) + db
