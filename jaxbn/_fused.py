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

How XLA best meets that bound depends on the backend, so the rules take one
of two shapes, chosen at trace time by ``jax.default_backend()``:

* XLA:CPU fuses a reduction with its elementwise producer but has no fast
  multi-output reduction. Optimization barriers keep each pass reading the
  caller's array (rather than a materialized ``x - K`` or float32 copy), and
  the recomputation inside the checkpoints is kept apart from the forward
  pass. Forward: ``S1`` and ``S2`` (one read of ``x`` each), then ``y`` (read
  ``x``, write ``y``): 4 N, the minimum being 3 N. Backward: ``sum(dy)``,
  ``sum(dy * (x - K))`` and ``dx = dy * a + g1 + g2 (x - K)``: 6 N, the
  minimum being 5 N.
* XLA:GPU (and TPU) fuses sibling reductions of the same input into one
  kernel and duplicates cheap elementwise producers into their consumers, and
  the barriers would stop exactly that. Without them the forward pass reads
  ``x`` once for both sums and the backward reads ``dy`` and ``x`` once for
  both: 8 N in all, the minimum. (On an H200, forward+backward of a
  256x56x56x64 float32 batch runs in the time of 8 N bytes at the bandwidth
  of ``x + 1``.)

Half-precision inputs are read and written in their own dtype: each pass
converts in registers, and no float32 copy of ``x`` or ``dy`` reaches memory.
The rules take the input twice for that: ``x`` in the compute dtype (at least
float32), whose tangent they use, and ``stored``, the array it was cast from,
whose values they read. Cotangents of ``x`` thus add up in float32.

Collectives stay outside these rules, so they compose with ``vmap`` axis
names, ``shard_map`` and ``pmap``.
"""

from functools import partial, wraps

import jax
import jax.numpy as jnp
from jax import lax


def masked(mask, value):
  """``value`` where ``mask`` holds, 0 elsewhere; ``value`` itself for no mask."""
  return value if mask is None else jnp.where(mask, value, jnp.zeros_like(value))


def shifted_sums_reference(axes, x, shift, mask):
  """``(sum(x - K), sum((x - K)^2))`` over ``axes`` of the valid entries, plain autodiff."""
  deviation = masked(mask, x - shift)
  return (
      jnp.sum(deviation, axes, keepdims=True),
      jnp.sum(jnp.square(deviation), axes, keepdims=True),
  )


def for_xla_cpu() -> bool:
  """Whether to shape the passes for XLA:CPU (see the module docstring)."""
  return jax.default_backend() == "cpu"


def separate_passes(values):
  """On XLA:CPU, ``optimization_barrier(values)``: XLA keeps each part's passes apart.

  Elsewhere ``values`` as they are, for XLA to fuse.
  """
  return lax.optimization_barrier(values) if for_xla_cpu() else values


def recomputed(fun=None, *, static_argnums=()):
  """``jax.checkpoint``: reverse mode recomputes ``fun`` in the backward pass, saving nothing.

  On XLA:CPU the recomputation is kept apart from the forward pass
  (``prevent_cse``); elsewhere XLA may fuse the two, as it does best.
  """
  if fun is None:
    return partial(recomputed, static_argnums=static_argnums)
  apart = jax.checkpoint(fun, static_argnums=static_argnums)
  fusible = jax.checkpoint(fun, static_argnums=static_argnums, prevent_cse=False)

  @wraps(fun)
  def call(*args):
    return (apart if for_xla_cpu() else fusible)(*args)

  return call


def tangent_sum(terms, dtype):
  """``sum(terms)`` as a tangent of ``dtype``, with the terms in the compute dtype.

  For a half-precision output, reverse mode transposes each term separately.
  On XLA:CPU, with one conversion of the sum, the float32 cotangent ``dy``
  would be written to memory and read by the three backward passes; converted
  per term (the barrier keeps XLA from merging the conversions), each pass
  reads the half-precision ``dy``, and forward mode pays with one rounding per
  term. XLA:GPU converts inside each pass by itself.
  """
  if terms[0].dtype == dtype:
    return sum(terms[1:], terms[0])
  if not for_xla_cpu():
    return sum(terms[1:], terms[0]).astype(dtype)
  terms = separate_passes(tuple(jnp.broadcast_to(t, terms[0].shape).astype(dtype) for t in terms))
  return sum(terms[1:], terms[0])


@recomputed
def _centered_product(x, shift, t, valid=None):
  """``(x - K) * t`` in the dtype of ``t``, recomputed rather than saved when differentiated.

  Entries where ``valid`` (if given) is False give 0, even where ``x`` is
  infinite (``0 * inf`` would be NaN).
  """
  return masked(valid, x.astype(t.dtype) - shift) * t


@recomputed(static_argnums=(0,))
def _sums_tangent(axes, stored, shift, mask, dx):
  """``(sum(dx), 2 sum((x - K) dx))`` over the valid entries.

  Checkpointed: reverse mode recomputes ``x - K`` and the mask's selection in
  the backward pass instead of saving them.
  """
  dx = masked(mask, dx)
  return jnp.sum(dx, axes, keepdims=True), 2 * jnp.sum(
      _centered_product(stored, shift, dx, mask), axes, keepdims=True
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
  # On XLA:CPU each sum converts and shifts `stored` itself. Shared, `x - K`
  # (or the float32 copy of a half-precision input) would be written to memory
  # once and read back by both reductions.
  (stored1, shift1), (stored2, shift2) = separate_passes(((stored, shift), (stored, shift)))
  deviation1 = masked(mask, stored1.astype(shift.dtype) - shift1)
  deviation2 = masked(mask, stored2.astype(shift.dtype) - shift2)
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
  return y, tangent_sum(terms, stored.dtype)
