"""The two local pieces of batch norm, and the implementations that compute them.

Everything ``batch_norm`` does on arrays of the size of ``x`` comes down to
two local pieces, computed on one device's shard (``K``, ``a`` and ``b`` per
feature, broadcast against ``x``; ``m`` an optional mask)::

    shifted_sums:    S1 = sum m (x - K)    S2 = sum m (x - K)^2
    shifted_affine:  z = act((x - K) a + b + r)

The rest (the cross-device combine, the moments, the per-feature
coefficients, the running averages) is O(C) plain JAX, shared by every
implementation. An implementation is a ``LocalOps``: the two pieces with the
same signatures, and their differentiation rules.

* ``"reference"``: the formulas under plain autodiff.
* ``"fused"``: XLA's fusion with custom rules that keep only ``x`` and O(C)
  values for the backward pass (``_fused``, ``_activation``); the fastest
  formulation on GPU and TPU.
* ``"kernel"``: jaxbn's compiled CPU kernels as JAX primitives (``_kernels``),
  which take both sums in one pass and reach the minimal traffic; they fall
  back to ``"fused"`` where the library was not built.
* ``"auto"`` (the default): ``"kernel"`` on CPU where the kernels loaded,
  ``"fused"`` elsewhere; ``"fused"`` also to normalize with given statistics
  (inference), which is one elementwise pass: XLA fuses it with its
  neighbours (a convolution's bias, the activation, a change of layout),
  where a custom call would stand between them (a vmapped Equinox CNN's
  inference took 34 ms with the kernel, 10 ms with XLA's fusion).

``resolve`` is the one place that turns the ``implementation`` argument into
a ``LocalOps``; the contract tests run every implementation.
"""

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax

from jaxbn import _activation, _fused, _kernels

Implementation = Literal["auto", "kernel", "fused", "reference"]
IMPLEMENTATIONS = ("auto", "kernel", "fused", "reference")


class LocalOps(NamedTuple):
  """One implementation of the local pieces.

  Both take ``x`` twice: ``x`` in the compute dtype (at least float32), whose
  derivatives they follow, and ``stored``, the caller's array with the same
  values, which they read (a half-precision input is then read as stored and
  converted in registers; see ``_fused``).
  """

  name: str
  # (axes, x, stored, shift, mask) -> (S1, S2), with size-1 reduction axes.
  shifted_sums: Callable
  # (x, stored, shift, a, b, residual, activation, negative_slope) -> z in stored's dtype.
  shifted_affine: Callable


def _reference_sums(axes, x, stored, shift, mask):
  del stored
  return _fused.shifted_sums_reference(axes, x, shift, mask)


def _reference_affine(x, stored, shift, a, b, residual, activation, negative_slope):
  return _activation.reference_apply(
      x - shift, a, b, residual, activation, negative_slope
  ).astype(stored.dtype)


def _fused_affine(x, stored, shift, a, b, residual, activation, negative_slope):
  if activation is None and residual is None:
    return _fused.shifted_affine(x, stored, shift, a, b)
  return _activation.shifted_affine_act(
      activation, negative_slope, x, stored, shift, a, b, residual
  )


def _kernel_affine(x, stored, shift, a, b, residual, activation, negative_slope):
  if activation is None and residual is None:
    return _kernels.shifted_affine(x, stored, shift, a, b)
  return _kernels.shifted_affine_act(activation, negative_slope, x, stored, shift, a, b, residual)


REFERENCE = LocalOps("reference", _reference_sums, _reference_affine)
FUSED = LocalOps("fused", _fused.shifted_sums, _fused_affine)
KERNEL = LocalOps("kernel", _kernels.shifted_sums, _kernel_affine)
_BY_NAME = {ops.name: ops for ops in (KERNEL, FUSED, REFERENCE)}


def resolve(implementation: Implementation, *, batch_stats: bool = True) -> LocalOps:
  """The ``LocalOps`` of an ``implementation`` argument.

  ``"auto"`` is decided while tracing, by ``jax.default_backend()`` and by
  ``batch_stats``: whether the step takes statistics of the batch (else it
  only normalizes with given ones).

  Raises:
    ValueError: if ``implementation`` is not one of ``IMPLEMENTATIONS``.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}."
    )
  if implementation == "auto":
    on_cpu = jax.default_backend() == "cpu"
    return KERNEL if batch_stats and on_cpu and _kernels.available() else FUSED
  return _BY_NAME[implementation]
