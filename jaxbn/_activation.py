"""Batch norm, residual add and activation in the same passes: ``z = act(bn(x) + r)``.

This is cuDNN's BN-add-ReLU and TensorFlow's fused batch norm with a side
input. With ``y = (x - K) a + b`` the normalized features (per-feature ``K``,
``a``, ``b``; see ``_fused``) and ``r`` an optional residual of the shape of
``x``::

    u = y + r        z = act(u)
    relu(u) = max(u, 0)        leaky_relu(u) = u if u > 0 else negative_slope * u

Both activations are piecewise linear with ``act'(u) = 1`` for ``u > 0`` and
``s`` (0 for relu, ``negative_slope`` for leaky_relu) otherwise. As ``s >= 0``,
``u > 0`` exactly where ``z > 0``, so the derivative is read off the output::

    dz = act'(z) * (dx a + (x - K) da + db + dr)     act'(z) = 1 if z > 0 else s

The tangent is linear, so forward and reverse mode both work; reverse mode
keeps ``x`` (recomputing ``x - K``), the output ``z`` (which the next layer
usually keeps anyway) and O(C) values, and the backward pass is the same two
reductions and one elementwise pass as without the activation. The residual
``r`` itself is not kept: ``dr = act'(z) dz_out``. Half-precision inputs are
read, kept and written in their own dtype, as in ``_fused``.
"""

from functools import partial
from numbers import Real
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _fused

Activation = Literal["relu", "leaky_relu"] | None
ACTIVATIONS = (None, "relu", "leaky_relu")


def check(activation, negative_slope, residual, x_shape) -> None:
  """Trace-time checks of ``activation``, ``negative_slope`` and ``residual``."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}.")
  if isinstance(negative_slope, bool) or not isinstance(negative_slope, Real):
    raise TypeError(
        f"`negative_slope` must be a Python float (it is static), got {negative_slope!r}."
    )
  if not 0 <= negative_slope < float("inf"):
    raise ValueError(
        f"`negative_slope` must be a finite float >= 0, got {negative_slope}; with a "
        "negative slope the sign of the output would not tell the side of the kink."
    )
  if residual is None:
    return
  if tuple(jnp.shape(residual)) != tuple(x_shape):
    raise ValueError(
        f"`residual` has shape {tuple(jnp.shape(residual))}, but it is added to the "
        f"normalized input of shape {tuple(x_shape)}; give it exactly that shape."
    )
  dtype = jnp.result_type(residual)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`residual` must be floating point, got dtype {dtype}.")


def slope(activation, negative_slope) -> float:
  """``s``, the derivative of the activation for ``u <= 0``."""
  return {None: 1.0, "relu": 0.0, "leaky_relu": float(negative_slope)}[activation]


def _negative_branch(s: float, value: jax.Array):
  """``s * value``, exactly 0 for ``s = 0`` (relu): never ``0 * inf = NaN`` or ``-0.``."""
  return s * value if s else jnp.zeros_like(value)


def activate(s: float, u: jax.Array) -> jax.Array:
  """``act(u)`` for the slope ``s`` of its negative branch: 1 (none), 0 (relu), else leaky.

  A NaN stays NaN, ``relu(-inf) = 0`` and ``leaky_relu(-inf) = -inf``. relu is
  ``max(u, 0)`` itself: XLA fuses it with the layers around it as it does
  ``jax.nn.relu``, where a select took a vmapped Equinox CNN's inference from
  10 to 21 ms. (Its derivative at 0 is not used: the callers' rules gate with
  ``z > 0``.)
  """
  if s == 1.0:
    return u
  if s == 0.0:
    return jnp.maximum(u, jnp.zeros_like(u))
  return jnp.where(u <= 0, s * u, u)


def apply(u: jax.Array, activation, negative_slope) -> jax.Array:
  """``act(u)`` for the ``activation`` argument (see ``activate``)."""
  return activate(slope(activation, negative_slope), u)


def gate(s: float, z, value):
  """``act'(z) value``: ``value`` where ``z > 0``, else ``s value`` (exactly 0 for relu).

  ``value`` itself without ``z`` (no activation).
  """
  if z is None:
    return value
  return jnp.where(z > 0, value, _negative_branch(s, value))


def add_and_apply(y, residual, activation, negative_slope) -> jax.Array:
  """``act(y + r)`` under plain autodiff."""
  if residual is not None:
    y = y + residual.astype(y.dtype)
  return apply(y, activation, negative_slope)


def reference_apply(centered, a, b, residual, activation, negative_slope) -> jax.Array:
  """``act(centered * a + b + r)`` under plain autodiff, with ``centered = x - K``.

  With relu, the entries whose output is 0 pass ``centered = 0`` on (the
  double ``where`` of JAX's FAQ): their derivatives are 0, also where ``x`` is
  infinite, rather than ``0 * inf = NaN``.
  """

  def pre_activation(centered):
    return add_and_apply(centered * a + b, residual, None, 0.0)

  u = pre_activation(centered)
  if slope(activation, negative_slope):
    return apply(u, activation, negative_slope)
  closed = lax.stop_gradient(u) <= 0  # NaN stays open, and NaN
  u = pre_activation(jnp.where(closed, jnp.zeros_like(centered), centered))
  return jnp.where(closed, jnp.zeros_like(u), u)


@_fused.recomputed(static_argnums=(0,))
def tangent_from_output(s: float, z: jax.Array, t: jax.Array) -> jax.Array:
  """``act'(z) * t``, recomputed from ``z`` rather than saved as a mask."""
  return gate(s, z, t)


@_fused.recomputed(static_argnums=(0,))
def _open_centered_product(s: float, z, stored, shift, t):
  """``(x - K) * t`` where ``act'(z) != 0``, 0 elsewhere; recomputed, never saved.

  With relu an entry whose output is 0 contributes nothing to the derivatives,
  also where ``x`` is infinite (``0 * inf`` would be NaN).
  """
  return _fused._centered_product(stored, shift, t, None if s else z > 0)


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def shifted_affine_act(activation, negative_slope, x, stored, shift, a, b, residual):
  """``act((x - K) a + b + r)`` in the dtype of ``stored``; ``K, a, b`` per feature.

  ``x`` (the compute dtype, whose tangent is used) and ``stored`` (the
  caller's array, whose values are read) are as in ``_fused.shifted_sums``;
  ``r`` is None or an array of the shape of ``x``, in any float dtype.
  """
  del x
  y = (stored.astype(shift.dtype) - shift) * a + b
  return add_and_apply(y, residual, activation, negative_slope).astype(stored.dtype)


@shifted_affine_act.defjvp
def _shifted_affine_act_jvp(activation, negative_slope, primals, tangents):
  x, stored, shift, a, b, residual = primals
  dx, _, _, da, db, dresidual = tangents  # `stored` gives values; `shift` has no gradient.
  z = shifted_affine_act(activation, negative_slope, x, stored, shift, a, b, residual)
  s = slope(activation, negative_slope)
  terms = (dx * a, _open_centered_product(s, z, stored, shift, da), db)
  du = _fused.tangent_sum(terms, stored.dtype)
  if residual is not None:
    # Added apart: a residual that is not differentiated has a constant tangent.
    du = du + dresidual.astype(du.dtype)
  if activation is None:
    return z, du
  return z, tangent_from_output(s, z, du)
