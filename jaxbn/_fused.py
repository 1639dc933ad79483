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


@partial(jax.checkpoint, static_argnums=(0,))
def _sums_tangent(axes, x, shift, mask, dx):
  """``(sum(dx), 2 sum((x - K) dx))`` over the valid entries.

  Checkpointed: reverse mode recomputes ``x - K`` and the mask's selection in
  the backward pass instead of saving them.
  """
  dx = _masked(mask, dx)
  return jnp.sum(dx, axes, keepdims=True), 2 * jnp.sum((x - shift) * dx, axes, keepdims=True)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def shifted_sums(axes, x, shift, mask):
  """Same as ``shifted_sums_reference``; reverse mode saves only ``x`` and ``K``."""
  # Each sum recomputes `x - K` from `x`. Shared (with the other sum or with
  # the normalization), `x - K` would be written to memory once and read again;
  # the barrier on the O(C) shift keeps XLA from merging the subtractions, so
  # each reduction reads `x` directly.
  shift1, shift2 = jax.lax.optimization_barrier((shift, shift))
  s1 = jnp.sum(_masked(mask, x - shift1), axes, keepdims=True)
  s2 = jnp.sum(jnp.square(_masked(mask, x - shift2)), axes, keepdims=True)
  return s1, s2


@shifted_sums.defjvp
def _shifted_sums_jvp(axes, primals, tangents):
  x, shift, mask = primals
  dx = tangents[0]  # `shift` carries no gradient (see `_first_valid_sample`).
  return shifted_sums(axes, x, shift, mask), _sums_tangent(axes, x, shift, mask, dx)


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
