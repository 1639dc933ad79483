"""The kernels behind the signatures of the fused pieces they replace.

``shifted_sums``, ``shifted_affine`` and ``shifted_affine_act`` take exactly
the arguments of ``_fused.shifted_sums``, ``_fused.shifted_affine`` and
``_activation.shifted_affine_act`` and compute the same values, with the
same convention: ``x`` in the compute dtype gives the tangent, ``stored`` (the
caller's array) the values. They find the ``(G, A, C, B)`` view of the input
(``_layout``) and call the primitives (``_primitives``) on the arrays as
they are, which run the compiled kernels on CPU.

They fall back to those fused functions when the kernels are not loaded
(``available()`` is False) or the layout has no ``(G, A, C, B)`` view.
Float64 takes the primitives, whose CPU lowering is then their reference.
"""

import jax
import jax.numpy as jnp

from jaxbn import _activation, _fused
from jaxbn._kernels import _layout, _library, _primitives


def _view(x, kept):
  """The layout of ``x`` with features ``kept``, or None when the kernels cannot take it.

  Nor when each feature has a single entry (per example under ``vmap``, say):
  with nothing to reduce, every piece is elementwise, which XLA fuses, where
  the kernels would run one task per entry.
  """
  if not _library.available():
    return None
  if all(_layout.is_one(n) for i, n in enumerate(x.shape) if i not in kept):
    return None
  return _layout.layout(x.shape, kept)


def _padded_shape(value, ndim):
  shape = jnp.shape(value)
  return (1,) * (ndim - len(shape)) + tuple(shape)


def _mask_operand(layout, mask, shape):
  """``mask`` as a row mask (size 1 on the features) if it is the same for every feature.

  A full mask, of the input's shape, otherwise.
  """
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape(_padded_shape(mask, len(shape)))
  if all(_layout.is_one(mask.shape[i]) for i in layout.features):
    return jnp.broadcast_to(mask, layout.row_mask(shape))
  return jnp.broadcast_to(mask, shape)


def shifted_sums(axes, x, stored, shift, mask):
  """``(sum(x - K), sum((x - K)^2))`` over ``axes`` of the valid entries, in one pass.

  The signature and values of ``_fused.shifted_sums``: ``x`` in the compute
  dtype (only its tangent is used), ``stored`` the caller's array (read as
  stored), ``shift`` keepdims-shaped in the compute dtype, ``mask`` None or
  boolean broadcastable to ``x``.

  Returns:
    ``(S1, S2)`` with size-1 reduction axes, in the compute dtype.
  """
  axes = tuple(sorted(a % x.ndim for a in axes))
  layout = _view(x, [i for i in range(x.ndim) if i not in axes])
  if layout is None:
    return _fused.shifted_sums(axes, x, stored, shift, mask)
  keep = layout.keepdims(x.shape)
  return _primitives.shifted_sums(
      x,
      stored,
      jnp.broadcast_to(shift, keep).astype(x.dtype),
      None if mask is None else _mask_operand(layout, mask, x.shape),
      layout=layout,
  )


def _affine(x, stored, shift, a, b, residual, slope):
  """``act((x - K) a + b + r)`` through the primitive; None when the kernels cannot take it."""
  per_feature = [_padded_shape(v, x.ndim) for v in (shift, a, b)]
  kept = [i for i in range(x.ndim) if any(not _layout.is_one(s[i]) for s in per_feature)]
  layout = _view(x, kept)
  if layout is None:
    return None
  keep = layout.keepdims(x.shape)
  shift, a, b = (jnp.broadcast_to(v, keep).astype(x.dtype) for v in (shift, a, b))
  return _primitives.shifted_affine(
      x, stored, shift, a, b, None if residual is None else jnp.asarray(residual),
      layout=layout, slope=slope,
  )


def shifted_affine(x, stored, shift, a, b) -> jax.Array:
  """``y = (x - K) * a + b`` in the dtype of ``stored``; ``K, a, b`` per feature.

  The signature and values of ``_fused.shifted_affine``; one pass that reads
  ``stored`` and writes ``y``.
  """
  y = _affine(x, stored, shift, a, b, None, 1.0)
  return _fused.shifted_affine(x, stored, shift, a, b) if y is None else y


def shifted_affine_act(activation, negative_slope, x, stored, shift, a, b, residual) -> jax.Array:
  """``act((x - K) a + b + r)`` in the dtype of ``stored``; ``K, a, b`` per feature.

  The signature and values of ``_activation.shifted_affine_act``, except
  that ``relu`` gives 0 (never NaN) for ``-inf``; one pass that reads
  ``stored`` (and ``r``) and writes ``z``.
  """
  z = _affine(
      x, stored, shift, a, b, residual, _activation.slope(activation, negative_slope)
  )
  if z is None:
    return _activation.shifted_affine_act(
        activation, negative_slope, x, stored, shift, a, b, residual
    )
  return z
