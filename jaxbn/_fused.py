"""The local math of the training step, with differentiation rules that save only ``x``.

Batch norm is memory bound, so its cost is the bytes it moves. The training
step is written as two local pieces, each with a ``custom_jvp`` rule:

* ``shifted_sums``: ``S1 = sum(x - K)`` and ``S2 = sum((x - K)^2)``;
* ``shifted_affine``: ``y = (x - K) * a + b`` with per-feature ``a, b``, one pass.

Everything between them (the cross-device combine, ``mean``, ``var``, ``a``,
``b``) is O(C) plain JAX. The tangent rules are linear in the tangents, so
forward mode (``jvp``, ``jacfwd``, ``hessian``) works, and JAX derives reverse
mode by transposing them. The only products of an N-sized primal value with a
tangent sit inside ``jax.checkpoint``, so reverse mode saves ``x`` itself (the
caller's array, no new memory) plus O(C) values and recomputes ``x - K``
inside the backward pass's own fusions.

Passes over N-sized data (XLA:CPU, one fusion each, no N-sized scratch):

* forward: ``S1`` and ``S2`` (one read of ``x`` each: XLA:CPU fuses a
  reduction with its elementwise producer but has no fast multi-output
  reduction), then ``y`` (read ``x``, write ``y``): 4 N, the minimum being 3 N;
* backward: ``sum(dy)``, ``sum(dy * (x - K))`` and
  ``dx = dy * a + g1 + g2 (x - K)`` (read ``dy``, ``x``, write ``dx``): 6 N,
  the minimum being 5 N.

Half-precision inputs are read and written in their own dtype: each pass
converts in registers, and no float32 copy of ``x`` or ``dy`` reaches memory.
The rules take the input twice for that: ``x`` in the compute dtype (at least
float32), whose tangent they use, and ``stored``, the array it was cast from,
whose values they read. Cotangents of ``x`` thus add up in float32.

Collectives stay outside these rules, so they compose with ``vmap`` axis
names, ``shard_map`` and ``pmap``.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


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
  """``(x - K) * t`` in the dtype of ``t``, recomputed rather than saved when differentiated."""
  return (x.astype(t.dtype) - shift) * t


@partial(jax.checkpoint, static_argnums=(0,))
def _sums_tangent(axes, stored, shift, mask, dx):
  """``(sum(dx), 2 sum((x - K) dx))`` over the valid entries.

  Checkpointed: reverse mode recomputes ``x - K`` and the mask's selection in
  the backward pass instead of saving them.
  """
  dx = _masked(mask, dx)
  return jnp.sum(dx, axes, keepdims=True), 2 * jnp.sum(
      _centered_product(stored, shift, dx), axes, keepdims=True
  )


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def shifted_sums(axes, x, stored, shift, mask):
  """Same as ``shifted_sums_reference(axes, x, shift, mask)``, read from ``stored``.

  Args:
    axes: the reduction axes.
    x: the input in the compute dtype; only its tangent is used.
    stored: the same values as the caller holds them: ``x`` itself, or the
      half-precision array ``x`` was cast from.
    shift: ``K``, per feature, in the compute dtype; carries no gradient.
    mask: ``None`` or a boolean array broadcastable to ``x``.

  Returns:
    ``(S1, S2)`` with size-1 reduction axes. Reverse mode saves only ``stored``
    and ``K``.
  """
  del x
  # Each sum converts and shifts `stored` itself. Shared, `x - K` (or the
  # float32 copy of a half-precision input) would be written to memory once
  # and read back by both reductions; the barrier keeps XLA from merging the
  # two subtractions, so each reduction reads the caller's array.
  (stored1, shift1), (stored2, shift2) = lax.optimization_barrier(
      ((stored, shift), (stored, shift))
  )
  deviation1 = _masked(mask, stored1.astype(shift.dtype) - shift1)
  deviation2 = _masked(mask, stored2.astype(shift.dtype) - shift2)
  return (
      jnp.sum(deviation1, axes, keepdims=True),
      jnp.sum(jnp.square(deviation2), axes, keepdims=True),
  )


@shifted_sums.defjvp
def _shifted_sums_jvp(axes, primals, tangents):
  x, stored, shift, mask = primals
  dx = tangents[0]  # the values come from `stored`, the derivatives from `x`.
  sums = shifted_sums(axes, x, stored, shift, mask)
  return sums, _sums_tangent(axes, stored, shift, mask, dx)


@jax.custom_jvp
def shifted_affine(x, stored, shift, a, b):
  """``y = (x - K) * a + b`` in the dtype of ``stored``; ``K, a, b`` per feature.

  ``x`` and ``stored`` are as in ``shifted_sums``. Subtracting ``K`` first keeps
  ``y`` accurate for data far from zero, where ``x * a + b`` would cancel
  catastrophically.
  """
  del x
  return ((stored.astype(shift.dtype) - shift) * a + b).astype(stored.dtype)


@shifted_affine.defjvp
def _shifted_affine_jvp(primals, tangents):
  x, stored, shift, a, b = primals
  dx, _, _, da, db = tangents  # `stored` gives values only; `shift` carries no gradient.
  y = shifted_affine(x, stored, shift, a, b)
  terms = (dx * a, _centered_product(stored, shift, da), db)
  if stored.dtype == dx.dtype:
    return y, terms[0] + terms[1] + terms[2]
  # Reverse mode transposes each term separately: with one conversion of the
  # sum, the float32 cotangent `dy` would be written to memory and read by the
  # three backward passes; converted per term, each pass reads the
  # half-precision `dy`. The barrier keeps XLA from merging the conversions.
  # Forward mode pays with three roundings of the tangent instead of one.
  terms = lax.optimization_barrier(
      tuple(jnp.broadcast_to(t, dx.shape).astype(stored.dtype) for t in terms)
  )
  return y, terms[0] + terms[1] + terms[2]
