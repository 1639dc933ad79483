"""The kernels behind the signatures of the fused pieces they replace.

``shifted_sums``, ``shifted_affine`` and ``shifted_affine_act`` take exactly
the arguments of ``_fused.shifted_sums``, ``_fused.shifted_affine`` and
``_activation.shifted_affine_act`` and compute the same values, with the
same convention: ``x`` in the compute dtype gives the tangent, ``stored`` (the
caller's array) the values. They view the arrays as ``(G, A, C, B)``
(``_layout``) and call the primitives (``_primitives``), which run the
compiled kernels on CPU.

They fall back to those fused functions when the kernels are not loaded
(``available()`` is False) or the layout has no ``(G, A, C, B)`` view.
Float64 takes the primitives, whose CPU lowering is then their reference.
"""

import jax
import jax.numpy as jnp

from jaxbn import _activation, _fused
from jaxbn._kernels import _layout, _library, _primitives


def _view(x, kept):
  """The layout of ``x`` with features ``kept``, or None when the kernels cannot take it."""
  if not _library.available():
    return None
  return _layout.layout(x.shape, kept)


def _padded_shape(value, ndim):
  shape = jnp.shape(value)
  return (1,) * (ndim - len(shape)) + tuple(shape)


def _mask_view(view, mask, shape):
  """``mask`` as a row mask ``(G, A, 1, B)`` if it is the same for every feature, else full."""
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape(_padded_shape(mask, len(shape)))
  if all(_layout.is_one(mask.shape[i]) for i in view.features):
    row = tuple(1 if i in view.features else size for i, size in enumerate(shape))
    return jnp.broadcast_to(mask, row).reshape(view.row_mask(shape))
  return jnp.broadcast_to(mask, shape).reshape(view.dims(shape))


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
  kept = [i for i in range(x.ndim) if i not in axes]
  view = _view(x, kept)
  if view is None:
    return _fused.shifted_sums(axes, x, stored, shift, mask)
  keep = tuple(1 if i in axes else size for i, size in enumerate(x.shape))
  dims = view.dims(x.shape)
  s1, s2 = _primitives.shifted_sums(
      x.reshape(dims),
      stored.reshape(dims),
      jnp.broadcast_to(shift, keep).astype(x.dtype).reshape(view.per_feature(x.shape)),
      None if mask is None else _mask_view(view, mask, x.shape),
  )
  return s1.reshape(keep), s2.reshape(keep)


def _affine_view(x, per_feature):
  """The view for the per-feature operands' kept axes, and their keepdims shape."""
  shapes = [_padded_shape(v, x.ndim) for v in per_feature]
  kept = [i for i in range(x.ndim) if any(not _layout.is_one(s[i]) for s in shapes)]
  keep = tuple(size if i in kept else 1 for i, size in enumerate(x.shape))
  return _view(x, kept), keep


def _affine(x, stored, shift, a, b, residual, slope):
  """``act((x - K) a + b + r)`` through the primitive; None when the kernels cannot take it."""
  view, keep = _affine_view(x, (shift, a, b))
  if view is None:
    return None
  dims, per_feature = view.dims(x.shape), view.per_feature(x.shape)
  shift, a, b = (jnp.broadcast_to(v, keep).astype(x.dtype).reshape(per_feature)
                 for v in (shift, a, b))
  z = _primitives.shifted_affine(
      x.reshape(dims),
      stored.reshape(dims),
      shift,
      a,
      b,
      None if residual is None else jnp.asarray(residual).reshape(dims),
      slope=slope,
  )
  return z.reshape(x.shape)


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
