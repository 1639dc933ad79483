"""Batch statistics: one pass over the data, stable, masked, exact across devices.

The statistics of features ``x`` over the reduction axes are computed from
shifted sums. With ``K`` one sample of ``x`` per feature and ``n`` the number
of valid entries::

    S1 = sum(x - K)      S2 = sum((x - K)^2)
    mean = K + S1 / n    M2 = S2 - S1^2 / n    var = M2 / n

Both sums are taken in one pass. Unlike ``E[x^2] - E[x]^2`` the cancellation
in ``M2`` is only as large as ``(mean - K)^2 / var``, a small number because
``K`` is drawn from the data itself, so the error does not grow with the
data's offset. Devices combine their ``(n, mean, M2)`` with Chan's parallel
formula, weighted by their counts, in one collective.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxbn import _implementations, _validation
from jaxbn._implementations import LocalOps
from jaxbn._kernels._layout import is_one

AxisName = Any  # a hashable axis name, or a tuple of them.


class Moments(NamedTuple):
  """Per-feature moments, with size-1 reduction axes kept for broadcasting.

  The mean is held as ``shift + delta`` with ``shift`` a sample of the data:
  ``x - shift`` and ``delta`` are small and exact even where ``mean`` itself
  would round (float32 has a spacing of 1e-3 near 1e4).
  """

  count: jax.Array  # number of valid entries.
  shift: jax.Array  # K: a sample of this device's data.
  delta: jax.Array  # mean - K.
  m2: jax.Array  # sum of squared deviations from the mean over the valid entries.

  @property
  def mean(self) -> jax.Array:
    return self.shift + self.delta

  @property
  def var(self) -> jax.Array:
    return self.m2 / jnp.maximum(self.count, 1)


def compute_dtype(dtype) -> jnp.dtype:
  """Reductions run in at least float32, whatever the input's precision."""
  # An explicit promotion: the lattice's answer also under jax_numpy_dtype_promotion="strict".
  with jax.numpy_dtype_promotion("standard"):
    return jnp.promote_types(dtype, jnp.float32)


def _first_valid_sample(x: jax.Array, axes: tuple[int, ...], mask) -> jax.Array:
  """Returns ``K``: per feature, the first valid entry of ``x`` (0 if none).

  Any value gives exact statistics; one drawn from the data keeps the
  cancellation in ``M2`` small. Gradients do not flow through ``K``: the
  statistics do not depend on it.
  """
  if any(x.shape[i] == 0 for i in axes):  # an empty batch has no sample to take
    shift = jnp.zeros([1 if i in axes else n for i, n in enumerate(x.shape)], x.dtype)
  elif mask is None:
    first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    shift = x[first]
  else:
    valid = jnp.broadcast_to(mask, x.shape)
    shift = x
    for ax in axes:
      index = jnp.argmax(valid, axis=ax, keepdims=True)
      shift = jnp.take_along_axis(shift, index, axis=ax)
      valid = jnp.take_along_axis(valid, index, axis=ax)
    shift = jnp.where(valid, shift, jnp.zeros_like(shift))
  return lax.stop_gradient(_replicated_along(shift, axes, jax.typeof(x).sharding.mesh))


def _replicated_along(value: jax.Array, axes: tuple[int, ...], mesh) -> jax.Array:
  """Under ``jit`` with ``Auto`` mesh axes, keeps the size-1 ``axes`` of ``value`` replicated.

  XLA would otherwise shard them like the batch they came from, and move ``K``
  between devices at each of its uses instead of once.
  """
  types = getattr(mesh, "axis_types", ())
  if not types or any(t != jax.sharding.AxisType.Auto for t in types):
    return value
  spec = P(*(None if i in axes else P.UNCONSTRAINED for i in range(value.ndim)))
  return lax.with_sharding_constraint(value, jax.NamedSharding(mesh, spec))


def local_moments(
    x: jax.Array, axes: tuple[int, ...], mask, *, ops: LocalOps, stored: jax.Array | None = None
) -> Moments:
  """Moments of ``x`` on this device.

  Args:
    x: the input; the sums run in the compute dtype (the fused sums read a
      half-precision ``x`` as it is, converting in registers).
    axes: the reduction axes.
    mask: ``None`` or a boolean array broadcastable to ``x``.
    ops: the implementation of the shifted sums and their derivatives.
    stored: where ``x`` is the caller's conversion of a half-precision array
      to the compute dtype, that array, which the sums read. The caller's
      one conversion then carries the gradients of all its uses, so that
      ``dx`` is rounded to half precision once.

  Returns:
    ``Moments`` with size-1 reduction axes, in the compute dtype.
  """
  stored = x if stored is None else stored
  x = x.astype(compute_dtype(x.dtype))
  shift = _first_valid_sample(stored, axes, mask).astype(x.dtype)
  s1, s2 = ops.shifted_sums(axes, x, stored, shift, mask)
  if mask is None:
    count = jnp.full(s1.shape, x.size // s1.size, x.dtype)
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, keepdims=True, dtype=x.dtype)
  delta = s1 / jnp.maximum(count, 1)
  # S2 - S1^2/n is >= 0 in exact arithmetic; clamp the rounding.
  return Moments(count, shift, delta, jnp.maximum(s2 - s1 * delta, 0))


def _gather(value: jax.Array, axis_name: AxisName, axis_index_groups) -> jax.Array:
  """The ``value`` of every device in this device's group, stacked on a new leading axis."""
  try:
    return _gather_groups(value, axis_name, axis_index_groups)
  except NotImplementedError:
    # `vmap`, and `psum` in `shard_map`, have no groups: take all, keep this group's rows.
    groups = np.asarray(axis_index_groups)
    group_of = np.argsort(groups.ravel()) // groups.shape[1]  # index -> its group
    members = jnp.asarray(groups)[jnp.asarray(group_of)[lax.axis_index(axis_name)]]
    return _gather_groups(value, axis_name, None)[members]


def _gather_groups(value, axis_name, axis_index_groups):
  names = _names(axis_name)
  if not _is_varying(value, axis_name):  # vmap, pmap
    if len(names) == 1:
      return lax.all_gather(value, axis_name, axis_index_groups=axis_index_groups)
    if axis_index_groups is not None:
      raise NotImplementedError  # groups of several axes: take all, `_gather` keeps the group.
    # One `all_gather` cannot span nested `vmap`s (or a `pmap` and a `vmap`): gather
    # along each name, the last one innermost, as `axis_index(names)` numbers them.
    for name in reversed(names):
      value = lax.all_gather(value, name)
    return value.reshape((-1,) + value.shape[len(names):])
  # In `shard_map`, a `psum` of `value` placed in this device's slot: unlike an
  # `all_gather`, its result is typed as the same on every device (so statistics
  # may leave with `out_specs=P()`), and its transpose is a local sum, not a
  # slice that XLA would recompute inside the backward's elementwise pass.
  index = lax.axis_index(axis_name)
  if axis_index_groups is None:
    size, position = lax.axis_size(axis_name), index
  else:
    groups = np.asarray(axis_index_groups)
    size = groups.shape[1]
    position = jnp.asarray(np.argsort(groups.ravel()) % size)[index]  # place in its group
  slots = jnp.arange(size).reshape((size,) + (1,) * value.ndim)
  placed = jnp.where(slots == position, value[None], jnp.zeros_like(value[None]))
  return lax.psum(placed, axis_name, axis_index_groups=axis_index_groups)


def all_reduce_moments(
    moments: Moments, axis_name: AxisName | None, axis_index_groups, *, one_entry: bool = False
) -> Moments:
  """Combines the moments of all devices along ``axis_name`` (Chan et al., 1979).

  One collective per step gathers ``(n_i, K_i, delta_i, M2_i)`` of the ``G``
  devices of the group (``4 C`` numbers each for ``C`` features): an
  ``all_gather`` under ``vmap`` and ``pmap``, a ``psum`` of a ``(G, 4, C)``
  array in ``shard_map``. Then, relative to the shift ``K`` of the first device
  in the group that holds data, with ``d_i = (K_i - K) + delta_i`` and
  ``n = sum n_i``::

      delta = sum(n_i d_i) / n
      M2 = sum(M2_i + n_i (d_i - delta)^2)

  Exact whatever the number of valid entries on each device, zero included,
  and the same bits on every device of a group. The result is ``centered``.
  Where each device holds one entry per feature (``one_entry``, known from
  the shapes: a per-example ``vmap``), the gathered moments would be four
  times the data; ``_all_reduce_by_sums`` sums them instead.
  """
  _validation.check_axis_name(axis_name)
  _validation.check_axis_index_groups(axis_index_groups, axis_name)
  if axis_name is None:
    return centered(moments)
  if one_entry and axis_index_groups is None and not _is_varying(moments.count, axis_name):
    return _all_reduce_by_sums(moments, axis_name)
  stacked = jnp.stack(jnp.broadcast_arrays(*moments))
  gathered = _gather(stacked, axis_name, axis_index_groups)
  counts, shifts, deltas, m2s = jnp.moveaxis(gathered, 1, 0)
  first = jnp.argmax(counts > 0, axis=0, keepdims=True)
  shift = jnp.take_along_axis(shifts, first, axis=0)
  deltas = (shifts - shift) + deltas
  count = jnp.sum(counts, axis=0, keepdims=True)
  delta = jnp.sum(counts * deltas, axis=0, keepdims=True) / jnp.maximum(count, 1)
  m2 = jnp.sum(m2s + counts * jnp.square(deltas - delta), axis=0)
  return centered(Moments(count[0], shift[0], delta[0], m2))


def _all_reduce_by_sums(moments: Moments, axis_name: AxisName) -> Moments:
  """``all_reduce_moments`` in two ``psum`` calls, which ``vmap`` makes two reductions.

  With ``m_i = K_i + delta_i`` each device's mean, the first sum gives the
  shift ``K = sum(n_i m_i) / n``, a rounding of the mean; the second sums
  the deviations ``d_i = m_i - K``, each exact near ``K``::

      delta = sum(n_i d_i) / n
      M2 = sum(M2_i + n_i d_i^2) - n delta^2

  ``delta`` is a rounding error of ``K``: the subtraction cancels nothing.
  """
  n_i, m_i = moments.count, moments.mean
  count, total = lax.psum((n_i, n_i * m_i), axis_name)
  n = jnp.maximum(count, 1)
  shift = lax.stop_gradient(total / n)
  d_i = m_i - shift
  s1, s2 = lax.psum((n_i * d_i, moments.m2 + n_i * d_i * d_i), axis_name)
  delta = s1 / n
  return centered(Moments(count, shift, delta, jnp.maximum(s2 - s1 * delta, 0)))


def _is_varying(value: jax.Array, axis_name: AxisName) -> bool:
  """Whether ``value`` varies along all of ``axis_name`` (in ``shard_map``; not in ``vmap``)."""
  varying = getattr(getattr(jax.typeof(value), "mat", None), "varying", frozenset())
  return set(_names(axis_name)) <= varying


def centered(moments: Moments) -> Moments:
  """The same moments with the shift moved to the rounded mean: ``K' = fl(K + delta)``.

  ``delta' = (K - K') + delta`` keeps ``K' + delta'`` the mean and carries its
  gradient (``K'`` has none). ``x - K'`` is as exact as ``x - K`` (both shifts
  lie among the data) and, the mean being central, smaller: ``(x - K') a +
  b`` then rounds relative to ``x - mean`` (an output near 0 is accurate
  to its own size), where ``(x - K) a + b`` rounds relative to ``x - K``.
  """
  shift = lax.stop_gradient(moments.shift + moments.delta)
  return moments._replace(shift=shift, delta=(moments.shift - shift) + moments.delta)


def _names(entry) -> tuple[str, ...]:
  """The mesh axis names of one entry of a ``PartitionSpec``."""
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _explicit_mesh_axes(x: jax.Array, axes: tuple[int, ...]) -> tuple[str, ...]:
  """Mesh axes along which an explicitly sharded ``x`` splits the reduction axes."""
  spec = getattr(jax.typeof(x).sharding, "spec", None) or ()
  return tuple(n for i, entry in enumerate(spec) if i in axes for n in _names(entry))


def _sharded_moments(x, axes, mask, mesh_axes, *, ops, stored) -> Moments:
  """Moments of an explicitly sharded ``x``: per shard, then one collective.

  Under ``jit`` the shift ``K`` of the whole array would be a sample held by one
  device; each shard takes its own instead, so the only collective is the one
  that gathers the shards' moments (see ``all_reduce_moments``).
  """
  sharding = jax.typeof(x).sharding
  # Outside `jit` the array holds the mesh of real devices that `reshard` needs.
  mesh = sharding.mesh if isinstance(x, jax.core.Tracer) else x.sharding.mesh
  x_spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  stats_spec = P(*(None if i in axes else s for i, s in enumerate(x_spec)))
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    mask_spec = P(*(None if n == 1 else s for n, s in zip(mask.shape, x_spec, strict=True)))
    mask = jax.sharding.reshard(mask, jax.NamedSharding(mesh, mask_spec))
  else:
    mask_spec = None

  def shard_moments(x, mask, stored):
    local = local_moments(x, axes, mask, ops=ops, stored=stored)
    return all_reduce_moments(local, mesh_axes, None)

  return jax.shard_map(
      shard_moments,
      mesh=mesh,
      in_specs=(P(*x_spec), mask_spec, None if stored is None else P(*x_spec)),
      out_specs=Moments(*(stats_spec,) * 4),
      axis_names={n for entry in x_spec for n in _names(entry)},
  )(x, mask, stored)


def has_one_entry(shape: tuple[int, ...], axes: tuple[int, ...]) -> bool:
  """Whether ``shape`` holds one entry per feature (a symbolic size is never known to be 1)."""
  return all(is_one(shape[i]) for i in axes)


def feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[i] for i in feature_axes)


def reduction_axes(ndim: int, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(i for i in range(ndim) if i not in feature_axes)


def batch_stats(
    x: jax.typing.ArrayLike,
    axis: _validation.Axis = -1,
    *,
    mask: jax.typing.ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance of ``x`` over every axis but the feature axes.

  With ``R`` the entries of the reduction axes that ``mask`` keeps (on every
  device along ``axis_name``), for each feature ``c``::

      mean[c] = 1/|R| sum_{r in R} x[r, c]
      var[c] = 1/|R| sum_{r in R} (x[r, c] - mean[c])^2

  computed in one pass with shifted sums (see the module docstring): the
  error does not grow with the data's offset.

  Args:
    x: floating-point array, e.g. ``(N, H, W, C)``.
    axis: the feature axis or axes, which are kept (Keras/Flax meaning);
      negative values count from the end.
    mask: optional boolean array broadcastable to ``x``; entries where it is
      False do not count at all.
    axis_name: optional name (or tuple of names) of a mapped axis (``vmap``,
      ``pmap``, ``shard_map``) over which the batch is split; statistics are
      then those of the whole batch.
    axis_index_groups: optional groups of indices along ``axis_name`` that
      compute statistics separately, as in ``jax.lax.psum``.

  Returns:
    ``(mean, var)``, each of the feature shape (``x.shape`` at ``axis``), in
    float32 for half-precision inputs and in ``x.dtype`` otherwise. A feature
    with no valid entry gets mean 0 and variance 0.

  Raises:
    TypeError: if ``x`` is not floating point or ``mask`` is not boolean.
    ValueError: if ``axis`` is out of range or repeated, or ``mask`` does not
      broadcast to ``x``.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> mean, var = jaxbn.batch_stats(jnp.array([[1., 10.], [3., 30.]]))
    >>> mean, var
    (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32))
  """
  _validation.check_input(x)
  x = jnp.asarray(x)
  feature_axes = _validation.canonicalize_axes(axis, x.ndim)
  _validation.check_mask(mask, x.shape)
  moments = global_moments(
      x,  # read as stored: the reductions cast to the compute dtype themselves
      feature_axes,
      mask,
      axis_name,
      axis_index_groups,
      ops=_implementations.resolve("auto"),
  )
  shape = feature_shape(x.shape, feature_axes)
  return moments.mean.reshape(shape), moments.var.reshape(shape)


def global_moments(
    x, feature_axes, mask, axis_name, axis_index_groups, *, ops, stored=None
) -> Moments:
  """Moments over the whole batch: all shards of ``x`` and all devices along ``axis_name``.

  ``stored`` as in ``local_moments``.
  """
  axes = reduction_axes(x.ndim, feature_axes)
  mesh_axes = _explicit_mesh_axes(x, axes)
  if mesh_axes:
    moments = _sharded_moments(x, axes, mask, mesh_axes, ops=ops, stored=stored)
  else:
    moments = local_moments(x, axes, mask, ops=ops, stored=stored)
  return all_reduce_moments(
      moments, axis_name, axis_index_groups, one_entry=has_one_entry(x.shape, axes)
  )
