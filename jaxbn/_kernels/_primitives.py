"""The kernels as JAX primitives, each beside its plain-JAX reference.

Operands keep the caller's shapes; the static ``layout`` (``_layout.Layout``)
says which axes are features and which are reduced. ``x``-sized operands
have the input's shape, per-feature ones size 1 on the reduction axes
(keepdims), and a mask is either a "row" mask (size 1 on the feature axes:
the same for every feature) or of the input's shape. With ``K`` the shift,
``m`` the mask and ``act'(z) = 1 if z > 0 else s``::

    shifted_sums_p(x, stored, K, [m])              -> (sum m (x - K), sum m (x - K)^2)
    weighted_sums_p(t, stored, K, [m], [z]; s)     -> (sum w t, sum w t (x - K)),
                                                      w = m act'(z)      (linear in t)
    shifted_affine_p(x, stored, K, a, b, [r]; s)   -> z = act((x - K) a + b + r)
    affine_tangent_p([u], [da], [db], stored, K, [z]; s)
                                                   -> act'(z) (u + (x - K) da + db)
                                                                 (linear in u, da, db)

``x`` is the input in the compute dtype (at least float32): only its
tangent is used. ``stored`` holds the same values as the caller keeps them,
possibly in half precision: the kernels read it as stored and convert in
registers. ``z`` has the dtype of ``stored``; sums and per-feature values
the compute dtype. ``s`` is 1 without an activation, 0 for relu.

Differentiation is arranged so that reverse mode moves the fewest bytes.
The tangent of the sums is ``(w1, 2 w2)`` with ``(w1, w2) =
weighted_sums_p(dx, ...)``; the tangent of the affine map is
``affine_tangent_p(dx a + dr, da, db - a dK, ...)``. Transposed,
``affine_tangent_p`` gives ``da, db`` from one kernel pass over
``(dz, z, x)``, and both linear primitives give their ``x``-sized cotangents
as plain elementwise JAX, which XLA fuses into the one pass that writes
``dx = a act'(z) dz + m (c1 + c2 (x - K))``. Forward: 3 N bytes (sums 1 N,
affine 2 N); backward: 5 N (7 N with an activation, which reads ``z``).
Reverse mode keeps ``stored`` itself, ``z`` (with an activation), the mask
and per-feature values: never ``x - K`` or a float32 copy of ``x``.

The linear primitives are differentiated again (``hessian``,
``check_grads(order=2)``) through their linear operands by themselves, and
through the others by the forward mode of their references, which is plain
JAX and so transposable.

Lowering: on CPU, the compiled kernel when it is loaded and takes the
operands (float32, bfloat16 or float16 storage; float32 per-feature values),
the shapes are not empty, XLA does not partition the module over several
devices (see ``_partitioned``), and the module is not for ``jax.export``
(see ``kernels_in_export``). Everywhere else, and for float64, the
reference. ``affine_tangent_p`` runs only in forward mode and is always its
reference.
"""

import contextlib
import contextvars
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from jaxbn import _activation, _fused
from jaxbn._kernels import _layout, _library

TARGETS = ("jaxbn_shifted_sums", "jaxbn_weighted_sums", "jaxbn_shifted_affine")
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ACTIVATION_CODES = {1.0: 0, 0.0: 1}  # the kernel's Act: identity, relu; other slopes leaky


# ---------------------------------------------------------------------------
# References: the XLA formulation of each primitive, with its signature.


def open_entries(mask, slope: float, z):
  """Where ``x - K`` takes part in the derivatives: valid, and open if relu.

  Elsewhere it is replaced by 0 before any product, so that an infinite ``x``
  (padding) there gives 0, not ``0 * inf = NaN``. None: everywhere.
  """
  closed_relu = z is not None and slope == 0.0
  if not closed_relu:
    return mask
  return z > 0 if mask is None else jnp.logical_and(mask, z > 0)


def shifted_sums_reference(x, stored, shift, mask=None, *, layout):
  """``(sum m (x - K), sum m (x - K)^2)`` over the reduction axes, read from ``stored``."""
  return _fused.shifted_sums_reference(layout.reduced, stored.astype(x.dtype), shift, mask)


def weighted_sums_reference(t, stored, shift, mask=None, z=None, *, layout, slope=1.0):
  """``(sum w t, sum w t (x - K))`` with ``w = m act'(z)``, in the dtype of ``shift``."""
  weighted = _fused.masked(mask, _activation.gate(slope, z, t.astype(shift.dtype)))
  deviation = _fused.masked(open_entries(mask, slope, z), stored.astype(shift.dtype) - shift)
  return (
      jnp.sum(weighted, layout.reduced, keepdims=True),
      jnp.sum(weighted * deviation, layout.reduced, keepdims=True),
  )


def shifted_affine_reference(x, stored, shift, a, b, residual=None, *, layout, slope=1.0):
  """``act((x - K) a + b + r)`` in the dtype of ``stored``."""
  del layout
  u = (stored.astype(x.dtype) - shift) * a + b
  if residual is not None:
    u = u + residual.astype(u.dtype)
  return _activation.activate(slope, u).astype(stored.dtype)


def affine_tangent_reference(u, da, db, stored, shift, z=None, *, layout, slope=1.0):
  """``act'(z) (u + (x - K) da + db)`` in the dtype of ``stored``; ``None`` terms are 0."""
  del layout
  terms = [] if u is None else [u]
  if da is not None:
    deviation = _fused.masked(open_entries(None, slope, z), stored.astype(shift.dtype) - shift)
    terms.append(deviation * da)
  if db is not None:
    terms.append(db)
  total = jnp.broadcast_to(sum(terms[1:], terms[0]), stored.shape)
  return _activation.gate(slope, z, total).astype(stored.dtype)


# ---------------------------------------------------------------------------
# Exports: by default the XLA formulation, decided when a function is traced.


_kernels_in_export = contextvars.ContextVar("jaxbn_kernels_in_export", default=False)


def _in_export() -> bool:
  """The primitives' ``in_export`` parameter: whether an export may keep the kernel."""
  return _kernels_in_export.get()


@contextlib.contextmanager
def kernels_in_export():
  """Functions traced within this context keep the kernels when ``jax.export``-ed.

  By default an exported program takes the XLA formulation instead: it then
  runs wherever JAX runs, without jaxbn's compiled library, and passes
  ``jax.export``'s check that custom calls have stable targets. With the
  kernels, export with ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t)
  for t in TARGETS]``, and load the program where jaxbn's kernels are
  installed (``import jaxbn`` registers them). The choice is made when a
  function is traced: ``jax.jit`` reuses a trace made outside the context.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn import _kernels as kernels
    >>> checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in kernels.TARGETS]
    >>> with kernels.kernels_in_export():
    ...   exported = jax.export.export(jax.jit(jnp.sin), disabled_checks=checks)(jnp.ones(3))
  """
  token = _kernels_in_export.set(True)
  try:
    yield
  finally:
    _kernels_in_export.reset(token)


# ---------------------------------------------------------------------------
# Binding: optional operands are left out, with flags saying which are there.


def _split(operands, *present):
  """``operands`` with ``None`` put in for the optional ones that are absent."""
  operands, out = list(operands), []
  for here in present:
    out.append(operands.pop(0) if here else None)
  return out + operands


def _aligned(*operands):
  """``operands`` varying over the same ``shard_map`` axes (a no-op elsewhere).

  A primitive needs its operands to agree on the manual axes they vary over;
  per-feature values after a ``psum`` vary over none, ``x`` over the batch's.
  """
  varying = [
      getattr(getattr(jax.typeof(v), "mat", None), "varying", frozenset()) for v in operands
  ]
  union = frozenset().union(*varying)
  return [
      v if not union - axes else jax.lax.pcast(v, tuple(union - axes), to="varying")
      for v, axes in zip(operands, varying, strict=True)
  ]


def _present(*optional):
  return [v for v in optional if v is not None]


def shifted_sums(x, stored, shift, mask=None, *, layout):
  """Binds ``shifted_sums_p``: ``(S1, S2)`` keepdims-shaped, in the dtype of ``x``."""
  operands = [x, stored, shift, *_present(mask)]
  return tuple(
      shifted_sums_p.bind(
          *_aligned(*operands), layout=layout, masked=mask is not None, in_export=_in_export()
      )
  )


def weighted_sums(t, stored, shift, mask=None, z=None, *, layout, slope=1.0):
  """Binds ``weighted_sums_p``: ``(sum w t, sum w t (x - K))`` in the dtype of ``shift``."""
  z = None if slope == 1.0 else z  # act' = 1: no gate to read
  return tuple(
      weighted_sums_p.bind(
          *_aligned(t, stored, shift, *_present(mask, z)),
          layout=layout, masked=mask is not None, gated=z is not None, slope=float(slope),
          in_export=_in_export(),
      )
  )


def shifted_affine(x, stored, shift, a, b, residual=None, *, layout, slope=1.0):
  """Binds ``shifted_affine_p``: ``act((x - K) a + b + r)`` in the dtype of ``stored``."""
  return shifted_affine_p.bind(
      *_aligned(x, stored, shift, a, b, *_present(residual)),
      layout=layout, has_residual=residual is not None, slope=float(slope),
      in_export=_in_export(),
  )


def affine_tangent(u, da, db, stored, shift, z=None, *, layout, slope=1.0):
  """Binds ``affine_tangent_p``: ``act'(z) (u + (x - K) da + db)``; ``None`` terms are 0."""
  z = None if slope == 1.0 else z
  return affine_tangent_p.bind(
      *_aligned(*_present(u, da, db), stored, shift, *_present(z)),
      layout=layout, has_u=u is not None, has_da=da is not None, has_db=db is not None,
      gated=z is not None, slope=float(slope),
  )


def _sums_args(operands, masked, **_):
  return _split(operands, True, True, True, masked)


def _weighted_args(operands, masked, gated, **_):
  return _split(operands, True, True, True, masked, gated)


def _affine_args(operands, has_residual, **_):
  return _split(operands, True, True, True, True, True, has_residual)


def _tangent_args(operands, has_u, has_da, has_db, gated, **_):
  return _split(operands, has_u, has_da, has_db, True, True, gated)


# ---------------------------------------------------------------------------
# The primitives: abstract evaluation and implementation.


def _primitive(name, multiple_results):
  primitive = Primitive(name)
  primitive.multiple_results = multiple_results
  primitive.def_impl(partial(xla.apply_primitive, primitive))
  return primitive


shifted_sums_p = _primitive("jaxbn_shifted_sums", True)
weighted_sums_p = _primitive("jaxbn_weighted_sums", True)
shifted_affine_p = _primitive("jaxbn_shifted_affine", False)
affine_tangent_p = _primitive("jaxbn_affine_tangent", False)


def _check(name, layout, stored, shift, mask=None):
  """Per-feature values of the keepdims shape and a row or full boolean mask, or a ValueError."""
  shapes = (layout.row_mask(stored.shape), stored.shape)
  if shift.shape != layout.keepdims(stored.shape) or (
      mask is not None and (mask.shape not in shapes or mask.dtype != jnp.bool_)
  ):
    raise ValueError(
        f"{name}: with features on the axes {layout.groups + layout.features} of an input of "
        f"shape {stored.shape}, per-feature values must have the shape "
        f"{layout.keepdims(stored.shape)} and a boolean mask one of {shapes}; got "
        f"{shift.shape}{'' if mask is None else f' and a {mask.dtype} mask {mask.shape}'}."
    )


@shifted_sums_p.def_abstract_eval
def _shifted_sums_abstract(*operands, layout, masked, in_export):
  x, stored, shift, mask = _sums_args(operands, masked)
  _check("shifted_sums", layout, stored, shift, mask)
  return [shift.update(dtype=x.dtype, weak_type=False)] * 2


@weighted_sums_p.def_abstract_eval
def _weighted_sums_abstract(*operands, layout, masked, gated, slope, in_export):
  _, stored, shift, mask, _ = _weighted_args(operands, masked, gated)
  _check("weighted_sums", layout, stored, shift, mask)
  return [shift.update(weak_type=False)] * 2


@shifted_affine_p.def_abstract_eval
def _shifted_affine_abstract(*operands, layout, has_residual, slope, in_export):
  _, stored, shift, *_ = _affine_args(operands, has_residual)
  _check("shifted_affine", layout, stored, shift)
  return stored.update(weak_type=False)


@affine_tangent_p.def_abstract_eval
def _affine_tangent_abstract(*operands, layout, has_u, has_da, has_db, gated, slope):
  *_, stored, shift, _ = _tangent_args(operands, has_u, has_da, has_db, gated)
  _check("affine_tangent", layout, stored, shift)
  return stored.update(weak_type=False)


# Each primitive's reference, taking its operands and parameters.
REFERENCES = {
    shifted_sums_p: lambda *o, layout, masked, in_export: shifted_sums_reference(
        *_sums_args(o, masked), layout=layout),
    weighted_sums_p: lambda *o, layout, slope, in_export, **flags: weighted_sums_reference(
        *_weighted_args(o, **flags), layout=layout, slope=slope),
    shifted_affine_p: lambda *o, layout, slope, in_export, **flags: shifted_affine_reference(
        *_affine_args(o, **flags), layout=layout, slope=slope),
    affine_tangent_p: lambda *o, layout, slope, **flags: affine_tangent_reference(
        *_tangent_args(o, **flags), layout=layout, slope=slope),
}


# ---------------------------------------------------------------------------
# Forward mode.


def _is_zero(tangent) -> bool:
  return type(tangent) is ad.Zero


def _nonzero(tangent):
  return None if _is_zero(tangent) else tangent


def _zero_like(value):
  return ad.Zero(jax.typeof(value).to_tangent_aval())


def _add(total, term):
  """``total + term`` where ``None`` is a zero."""
  if term is None:
    return total
  return term if total is None else total + term


def _reference_tangent(reference, operands, tangents, positions, **params):
  """The tangent of ``reference(*operands)`` through ``operands[positions]``, others held.

  ``None`` when those tangents are all zero. Plain JAX, so it transposes.
  """
  live = [i for i in positions if operands[i] is not None and not _is_zero(tangents[i])]
  if not live:
    return None

  def through(*values):
    args = list(operands)
    for i, value in zip(live, values, strict=True):
      args[i] = value
    return reference(*args, **params)

  return jax.jvp(through, [operands[i] for i in live], [tangents[i] for i in live])[1]


def _shifted_sums_jvp(primals, tangents, *, layout, masked, in_export):
  x, stored, shift, mask = _sums_args(primals, masked)
  dx, _, dshift, _ = _sums_args(tangents, masked)  # `stored` lends its values only
  s1, s2 = shifted_sums_p.bind(*primals, layout=layout, masked=masked, in_export=in_export)
  ds1 = ds2 = None
  if not _is_zero(dx):
    w1, w2 = weighted_sums(dx, stored, shift, mask, layout=layout)
    ds1, ds2 = w1, 2 * w2
  if not _is_zero(dshift):  # d/dK sum m (x - K) = -n,  d/dK sum m (x - K)^2 = -2 S1
    if mask is None:
      count = math.prod(stored.shape[i] for i in layout.reduced)
    else:
      count = jnp.sum(mask, layout.reduced, keepdims=True, dtype=x.dtype)
    ds1, ds2 = _add(ds1, -count * dshift), _add(ds2, -2 * s1 * dshift)
  return (s1, s2), (
      _zero_like(s1) if ds1 is None else ds1,
      _zero_like(s2) if ds2 is None else ds2,
  )


def _weighted_sums_jvp(primals, tangents, *, layout, masked, gated, slope, in_export):
  params = dict(layout=layout, masked=masked, gated=gated, slope=slope, in_export=in_export)
  out = weighted_sums_p.bind(*primals, **params)
  d1 = d2 = None
  if not _is_zero(tangents[0]):  # linear in t
    d1, d2 = weighted_sums_p.bind(tangents[0], *primals[1:], **params)
  # Through x, K and z (whose derivative vanishes), by the reference.
  through = _reference_tangent(
      weighted_sums_reference, _weighted_args(primals, masked, gated),
      _weighted_args(tangents, masked, gated), (1, 2, 4), layout=layout, slope=slope,
  )
  if through is not None:
    d1, d2 = _add(d1, through[0]), _add(d2, through[1])
  return out, [_zero_like(o) if d is None else d for o, d in zip(out, (d1, d2), strict=True)]


def _shifted_affine_jvp(primals, tangents, *, layout, has_residual, slope, in_export):
  x, stored, shift, a, b, _ = _affine_args(primals, has_residual)
  dx, _, dshift, da, db, dresidual = _affine_args(tangents, has_residual)
  z = shifted_affine_p.bind(
      *primals, layout=layout, has_residual=has_residual, slope=slope, in_export=in_export
  )
  # dz = act'(z) (dx a + dr + (x - K) da + (db - a dK))
  u = None if _is_zero(dx) else dx * a
  if has_residual and not _is_zero(dresidual):
    u = _add(u, dresidual.astype(x.dtype))
  if u is not None:
    u = jnp.broadcast_to(u, stored.shape)
  db = _nonzero(db)
  if not _is_zero(dshift):
    db = _add(db, -a * dshift)
  if u is None and _is_zero(da) and db is None:
    return z, _zero_like(z)
  return z, affine_tangent(u, _nonzero(da), db, stored, shift, z, layout=layout, slope=slope)


def _affine_tangent_jvp(primals, tangents, *, layout, slope, **flags):
  out = affine_tangent_p.bind(*primals, layout=layout, slope=slope, **flags)
  args, dargs = _tangent_args(primals, **flags), _tangent_args(tangents, **flags)
  total = None
  linear = [None if v is None else _nonzero(dv) for v, dv in zip(args[:3], dargs[:3], strict=True)]
  if any(v is not None for v in linear):  # linear in u, da, db
    total = affine_tangent(*linear, *args[3:], layout=layout, slope=slope)
  # Through x, K and z (whose derivative vanishes), by the reference.
  total = _add(total, _reference_tangent(
      affine_tangent_reference, args, dargs, (3, 4, 5), layout=layout, slope=slope))
  return out, _zero_like(out) if total is None else total


ad.primitive_jvps[shifted_sums_p] = _shifted_sums_jvp
ad.primitive_jvps[weighted_sums_p] = _weighted_sums_jvp
ad.primitive_jvps[shifted_affine_p] = _shifted_affine_jvp
ad.primitive_jvps[affine_tangent_p] = _affine_tangent_jvp


# ---------------------------------------------------------------------------
# Reverse mode: transposes of the linear primitives.


def _value(operand):
  if ad.is_undefined_primal(operand):
    raise NotImplementedError(
        "jaxbn kernels: only the linear operands of weighted_sums_p and affine_tangent_p "
        "can be transposed."
    )
  return operand


def _weighted_sums_transpose(cts, *operands, layout, masked, gated, slope, in_export):
  """``t_bar = w (c1 + c2 (x - K))``, plain JAX that XLA fuses into its consumer."""
  t, stored, shift, mask, z = _weighted_args(operands, masked, gated)
  stored, shift = _value(stored), _value(shift)
  ct1, ct2 = (_nonzero(ct) for ct in cts)
  none = [None] * len(operands)
  if not ad.is_undefined_primal(t) or (ct1 is None and ct2 is None):
    return none
  deviation = _fused.masked(open_entries(mask, slope, z), stored.astype(shift.dtype) - shift)
  total = jnp.broadcast_to(_add(None if ct2 is None else ct2 * deviation, ct1), stored.shape)
  t_bar = _fused.masked(mask, _activation.gate(slope, z, total))
  return [t_bar.astype(t.aval.dtype)] + none[1:]


def _affine_tangent_transpose(ct, *operands, layout, slope, **flags):
  """``u_bar = act'(z) ct`` (plain JAX, fused into ``dx``); ``da, db`` from one kernel pass."""
  u, da, db, stored, shift, z = _tangent_args(operands, **flags)
  stored, shift = _value(stored), _value(shift)
  cts = dict(u=None, da=None, db=None)
  if not _is_zero(ct):
    if u is not None and ad.is_undefined_primal(u):
      cts["u"] = _activation.gate(slope, z, ct.astype(u.aval.dtype))
    needs = {name: v is not None and ad.is_undefined_primal(v) for name, v in (("da", da),
                                                                              ("db", db))}
    if any(needs.values()):  # db_bar = sum act'(z) ct,  da_bar = sum act'(z) ct (x - K)
      sums = weighted_sums(ct, stored, shift, None, z, layout=layout, slope=slope)
      for (name, value), total in zip((("db", db), ("da", da)), sums, strict=True):
        if needs[name]:
          cts[name] = total.astype(value.aval.dtype)
  linear = [name for name, v in (("u", u), ("da", da), ("db", db)) if v is not None]
  return [cts[name] for name in linear] + [None] * (len(operands) - len(linear))


ad.primitive_transposes[weighted_sums_p] = _weighted_sums_transpose
ad.primitive_transposes[affine_tangent_p] = _affine_tangent_transpose


# ---------------------------------------------------------------------------
# Batching: the mapped axis joins the groups, so each member has its own statistics.


def _batch(primitive, args, dims, *, layout, **params):
  """Moves the mapped axis to the front, where it becomes the leading group axis.

  Unmapped per-feature values and masks are broadcast. When an unmapped
  operand is ``x``-sized (``jacfwd``: mapped tangents of one input), copying
  it for every member would cost more than it saves: the reference runs.
  """
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
  out_dims = [0, 0] if primitive.multiple_results else 0
  position = 1  # of `stored`, after the optional linear operands of affine_tangent_p
  if primitive is affine_tangent_p:
    position = sum(params[flag] for flag in ("has_u", "has_da", "has_db"))
  stored, stored_dim = args[position], dims[position]
  x_shape = tuple(n for i, n in enumerate(stored.shape) if i != stored_dim)
  if any(
      d is None and jnp.issubdtype(a.dtype, jnp.floating) and a.shape == x_shape
      for a, d in zip(args, dims, strict=True)
  ):
    reference = partial(REFERENCES[primitive], layout=layout, **params)
    out = jax.vmap(reference, in_axes=tuple(dims))(*args)
    return (list(out) if primitive.multiple_results else out), out_dims
  moved = [
      jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
      for a, d in zip(args, dims, strict=True)
  ]
  out = primitive.bind(*moved, layout=layout.with_leading_group(), **params)
  return (list(out) if primitive.multiple_results else out), out_dims


for _p in REFERENCES:
  batching.primitive_batchers[_p] = partial(_batch, _p)


# ---------------------------------------------------------------------------
# Lowering.


def _partitioned(ctx) -> bool:
  """Whether XLA's SPMD partitioner splits this module over more than one device.

  A custom call is opaque to the partitioner, which would then gather ``x``
  onto every device before it; the reference partitions like any JAX code.
  A single-device program, and a ``shard_map`` body whose mesh axes are all
  manual (``pmap`` bodies too), run the kernel on their own shard. The axis
  contexts are private JAX types: anything unrecognized counts as
  partitioned, which is always correct.
  """
  context = getattr(ctx.module_context, "axis_context", None)
  sharding_context = getattr(mlir, "ShardingContext", None)
  spmd_context = getattr(mlir, "SPMDAxisContext", None)
  if sharding_context is not None and isinstance(context, sharding_context):
    return context.num_devices > 1
  if spmd_context is not None and isinstance(context, spmd_context):
    try:
      sizes = dict(context.mesh.shape)
      manual = frozenset(context.manual_axes)
    except (AttributeError, TypeError):
      return True
    return any(size > 1 for name, size in sizes.items() if name not in manual)
  return True


def _kernel_takes(stored, shift, others=(), same=()) -> bool:
  """Kernel storage for ``stored``; float32 ``shift``; ``others`` float32 or like ``stored``.

  ``same`` must be stored exactly like ``stored``.
  """
  return (
      stored.dtype in KERNEL_DTYPES
      and shift.dtype == jnp.float32
      and all(o.dtype in (jnp.dtype(jnp.float32), stored.dtype) for o in others)
      and all(o.dtype == stored.dtype for o in same)
  )


def _exporting(ctx) -> bool:
  """Whether this module is lowered for ``jax.export``."""
  parameters = getattr(ctx.module_context, "lowering_parameters", None)
  return bool(getattr(parameters, "for_export", False))


def _use_kernel(ctx, stored, in_export) -> bool:
  """Whether this module runs a kernel on ``stored`` (known empty shapes take the reference)."""
  nonempty = all(not isinstance(d, int) or d > 0 for d in stored.shape)
  return (
      nonempty
      and not _partitioned(ctx)
      and (in_export or not _exporting(ctx))
      and _library.available()
  )


def _squeezed(shape) -> tuple:
  """``shape`` without its sizes of 1.

  XLA:CPU gives a reshape's size-1 axes a layout of its own choosing and then
  copies the array into the row-major layout a custom call asks for; without
  them the reshape of the caller's array stays a free bitcast.
  """
  return tuple(d for d in shape if not _layout.is_one(d))


def _call(target, layout, operands, results, **attributes):
  """The kernel ``target`` on ``operands`` viewed as (G, A, C, B), without size-1 axes.

  ``operands[0]`` is ``x``-sized; ``view`` tells the kernel which of ``(G, A,
  C, B)`` its axes are (bits 8, 4, 2, 1). Per-feature values become (G, C),
  row masks (G, A, B).
  """
  shape = operands[0].shape
  g, a, c, b = dims = layout.dims(shape)
  views = {shape: dims, layout.keepdims(shape): (g, c), layout.row_mask(shape): (g, a, b)}
  view = sum(8 >> k for k, d in enumerate(dims) if not _layout.is_one(d))
  out = jax.ffi.ffi_call(
      target, [jax.ShapeDtypeStruct(_squeezed(views[r.shape]), r.dtype) for r in results]
  )(*(o.reshape(_squeezed(views[o.shape])) for o in operands), view=np.int64(view), **attributes)
  return [o.reshape(r.shape) for o, r in zip(out, results, strict=True)]


def _row_mask(layout, mask, shape) -> bool:
  return mask is not None and mask.shape != shape


def _shifted_sums_kernel(*operands, layout, masked, in_export):
  x, stored, shift, mask = _sums_args(operands, masked)
  # `x` is not passed: only its tangent matters, so XLA never computes it.
  return _call(
      "jaxbn_shifted_sums", layout, [stored, shift, *_present(mask)],
      [jax.ShapeDtypeStruct(shift.shape, x.dtype)] * 2,
      row_mask=_row_mask(layout, mask, stored.shape),
  )


def _weighted_sums_kernel(*operands, layout, masked, gated, slope, in_export):
  t, stored, shift, mask, z = _weighted_args(operands, masked, gated)
  return _call(
      "jaxbn_weighted_sums", layout, [t, stored, shift, *_present(mask, z)],
      [jax.ShapeDtypeStruct(shift.shape, shift.dtype)] * 2,
      slope=np.float32(slope), masked=masked, gated=gated,
      row_mask=_row_mask(layout, mask, stored.shape),
  )


def _shifted_affine_kernel(*operands, layout, has_residual, slope, in_export):
  _, stored, shift, a, b, residual = _affine_args(operands, has_residual)
  (z,) = _call(
      "jaxbn_shifted_affine", layout, [stored, shift, a, b, *_present(residual)],
      [jax.ShapeDtypeStruct(stored.shape, stored.dtype)],
      slope=np.float32(slope), activation=np.int64(ACTIVATION_CODES.get(slope, 2)),
  )
  return z


def _sums_takes(avals, masked, **_):
  _, stored, shift, _ = _sums_args(avals, masked)
  return _kernel_takes(stored, shift)


def _weighted_takes(avals, masked, gated, **_):
  t, stored, shift, _, z = _weighted_args(avals, masked, gated)
  return _kernel_takes(stored, shift, [t], _present(z))


def _affine_takes(avals, has_residual, **_):
  _, stored, shift, a, b, residual = _affine_args(avals, has_residual)
  return _kernel_takes(stored, shift, _present(residual)) and a.dtype == b.dtype == jnp.float32


def _cpu_lowering(primitive, kernel, takes):
  """The kernel where ``takes(avals, **params)`` and ``_use_kernel``; else the reference."""
  kernel = mlir.lower_fun(kernel, multiple_results=primitive.multiple_results)
  reference = mlir.lower_fun(REFERENCES[primitive], multiple_results=primitive.multiple_results)

  def rule(ctx, *operands, **params):
    if takes(ctx.avals_in, **params) and _use_kernel(ctx, ctx.avals_in[1], params["in_export"]):
      return kernel(ctx, *operands, **params)
    return reference(ctx, *operands, **params)

  return rule


for _p, _reference in REFERENCES.items():
  mlir.register_lowering(_p, mlir.lower_fun(_reference, multiple_results=_p.multiple_results))
for _p, _kernel, _takes in (
    (shifted_sums_p, _shifted_sums_kernel, _sums_takes),
    (weighted_sums_p, _weighted_sums_kernel, _weighted_takes),
    (shifted_affine_p, _shifted_affine_kernel, _affine_takes),
):
  mlir.register_lowering(_p, _cpu_lowering(_p, _kernel, _takes), platform="cpu")
