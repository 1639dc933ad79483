"""In-Place Activated BatchNorm (Rota Bulò, Porzi & Kontschieder, CVPR 2018).

The fused backward pass (``_fused``, ``_activation``) keeps the input ``x`` of
each batch norm. In a network the input of a batch norm is the output of a
convolution, which nothing else keeps: it is one activation-sized buffer per
layer held only for batch norm. With an invertible activation the normalized
features can be recovered from the output instead, which the next layer keeps
anyway::

    z = act(u),  u = (x - K) a + b + r                      (forward)
    x - K = (act^-1(z) - r - b) / a                          (backward)
    act^-1(z) = z if z > 0 else z / s,   act'(z) = 1 if z > 0 else s

for the identity (``s = 1``) and leaky_relu (``s = negative_slope > 0``).
Reverse mode then keeps ``z``, the residual ``r`` if there is one, and O(C)
per-feature values; never ``x``.

Collectives stay outside the custom rules. The step is written as:

1. the moments of ``stop_gradient(x)``, combined across devices, give the
   coefficients ``a0, b0`` and ``z = act((x - K) a0 + b0 + r)`` (``z`` is
   differentiable in ``x`` and ``r`` only);
2. ``carry_sums`` is zero, but its tangent is that of the shifted sums,
   ``(sum dx, 2 sum (x - K) dx)``, with ``x - K`` recovered from ``z``; added
   to this device's moments before the cross-device combine, it gives the
   moments and the coefficients ``a, b`` their full derivatives;
3. ``output`` returns ``z`` itself (the same array, so the backward pass and
   the next layer keep one buffer), with the tangent of
   ``act((x - K) a + b + r)``::

       dz = act'(z) * (dx a + (x - K) da + db + dr)

The values are those of the plain step and the first derivatives are exact, in
forward and reverse mode. Returning ``z`` itself costs the second derivatives
(its own derivative lacks the statistics' part), so differentiating twice
raises instead of returning wrong numbers: use the fused backward for
Hessians.

The recovery divides by ``a = scale * rstd``: every ``scale`` entry must be
nonzero, or the gradients are NaN (the paper keeps ``|scale| + eps`` for this
reason). The recovered ``x - K`` carries the rounding of ``z``, so gradients
are as accurate as the output's dtype allows.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _activation, _fused, _stats


def check(activation, negative_slope, implementation) -> None:
  """``inplace=True`` needs an invertible activation and custom rules (not the reference)."""
  if activation == "relu" or (activation == "leaky_relu" and negative_slope == 0):
    raise ValueError(
        f"`inplace=True` recovers the normalized input from the output, so it needs an "
        f"invertible activation: None, or 'leaky_relu' with `negative_slope` > 0; got "
        f"`activation`={activation!r} with `negative_slope`={negative_slope}."
    )
  if implementation == "reference":
    raise ValueError(
        "`inplace=True` is a backward pass of the fused implementation; got "
        "`implementation`='reference' (plain autodiff, without custom rules): use 'auto' "
        "(the default), 'kernel' or 'fused'."
    )


def _recover(s, z, residual, a, b):
  """``x - K = (act^-1(z) - r - b) / a``, in the dtype of ``a``."""
  z = z.astype(a.dtype)
  u = z if s == 1.0 else jnp.where(z > 0, z, z / s)
  if residual is not None:
    u = u - residual.astype(a.dtype)
  return (u - b) / a


@_fused.recomputed(static_argnums=(0,))
def _recovered_product(s, z, residual, a, b, t):
  """``(x - K) * t`` with ``x - K`` recovered from ``z``; recomputed, never saved."""
  return _recover(s, z, residual, a, b) * t


@jax.custom_jvp
def _first_order_only(value):
  """The identity, which refuses to be differentiated: it guards the rules' coefficients."""
  return value


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  raise ValueError(
      "`inplace=True` gives first derivatives only (forward or reverse mode); a second "
      "derivative (hessian, jacfwd of grad, grad of grad) needs the fused backward pass: "
      "pass `inplace=False`."
  )


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def carry_sums(axes, s, x, z, residual, a, b, offset, mask):
  """Zeros shaped like the sums over ``axes``, carrying the tangent of the shifted sums.

  Tangent: ``(sum(dx), 2 sum((x - K + offset) dx))`` over the valid entries,
  ``x - K`` recovered from ``z`` (``offset`` moves the sums to this device's
  shift). The inputs other than ``x`` carry no tangent: they only say where
  ``x - K`` is found.
  """
  del s, z, residual, a, b, offset, mask
  # Zeros that depend on `x`: under `vmap` they are batched like their tangents (a
  # constant would not be, which `jvp` of a jitted `vmap` cannot reconcile). XLA
  # folds the select and drops the sum.
  zeros = jnp.where(False, jnp.sum(x, axes, keepdims=True), jnp.zeros((), x.dtype))
  return zeros, zeros


@carry_sums.defjvp
def _carry_sums_jvp(axes, s, primals, tangents):
  x, z, residual, a, b, offset, mask = primals
  a, b, offset = (_first_order_only(v) for v in (a, b, offset))
  dx = _fused.masked(mask, tangents[0])
  ds1 = jnp.sum(dx, axes, keepdims=True)
  ds2 = 2 * (jnp.sum(_recovered_product(s, z, residual, a, b, dx), axes, keepdims=True)
             + offset * ds1)
  return carry_sums(axes, s, x, z, residual, a, b, offset, mask), (ds1, ds2)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def output(s, z, x, residual, a0, b0, a, b):
  """Returns ``z``, differentiated as ``act((x - K) a + b + r)`` with ``x - K`` from ``z``.

  ``a0, b0`` are the coefficients that made ``z`` (values equal to ``a, b``,
  without derivatives); the tangent of ``z`` itself is not used. The rule
  returns ``z`` itself as the primal output, so that reverse mode keeps the
  one array that the next layer keeps too.
  """
  del x, residual, a0, b0, a, b
  return z


@output.defjvp
def _output_jvp(s, primals, tangents):
  z, x, residual, a0, b0, a, b = primals
  _, dx, dresidual, _, _, da, db = tangents
  a0, b0, a = (_first_order_only(v) for v in (a0, b0, a))
  du = dx * a + _recovered_product(s, z, residual, a0, b0, da) + db
  if residual is not None:
    du = du + dresidual
  dz = du if s == 1.0 else _activation.tangent_from_output(s, z, du)
  return z, dz.astype(z.dtype)


def normalize_with_batch_stats(
    ops,
    x,
    stored,
    feature_axes,
    coefficients,
    mask,
    axis_name,
    axis_index_groups,
    activation,
    negative_slope,
    residual,
):
  """``(act((x - K) a + b + r), moments)`` whose reverse mode keeps the output, not ``x``.

  Args:
    ops: the implementation (``_implementations.LocalOps``) of the values of the
      sums and of ``z``; the derivatives are this module's.
    x: the input in the compute dtype.
    stored: the caller's array (``x`` before the cast): ``z`` takes its dtype,
      so a half-precision network keeps half-precision outputs only.
    feature_axes: the axes kept by the statistics.
    coefficients: ``moments -> (a, b)`` with ``y = (x - K) a + b``.
    mask, axis_name, axis_index_groups: as in ``batch_norm``.
    activation, negative_slope: an invertible activation (see ``check``).
    residual: ``None`` or an array of the shape of ``x``, in any float dtype.

  Returns:
    ``(z, moments)``: the output and the moments of the (global) batch.
  """
  s = _activation.slope(activation, negative_slope)
  axes = _stats.reduction_axes(x.ndim, feature_axes)
  values = lax.stop_gradient((x, stored, residual))  # the rules below give the derivatives
  local = _stats.local_moments(values[1], axes, mask, ops=ops)
  reduce = partial(
      _stats.all_reduce_moments,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      one_entry=_stats.has_one_entry(x.shape, axes),
  )
  moments0 = reduce(local)
  a0, b0 = (lax.stop_gradient(v) for v in coefficients(moments0))
  shift = moments0.shift
  z = ops.shifted_affine(*values[:2], shift, a0, b0, values[2], activation, negative_slope)
  s1, s2 = carry_sums(axes, s, x, z, residual, a0, b0, shift - local.shift, mask)
  n = jnp.maximum(local.count, 1)
  local = local._replace(
      delta=local.delta + s1 / n, m2=local.m2 + s2 - s1 * (2 * local.delta + s1 / n)
  )
  moments = reduce(local)
  a, b = coefficients(moments)
  return output(s, z, x, residual, a0, b0, a, b), moments
