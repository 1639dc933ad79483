"""The kernels as JAX primitives, each beside its plain-JAX reference.

Every operand is in the ``(G, A, C, B)`` view of ``jaxbn._kernels._layout``:
``x``-sized arrays are ``(G, A, C, B)``, per-feature ones ``(G, 1, C, 1)``
and masks ``(G, A, 1, B)`` (a "row" mask, the same for every feature) or
``(G, A, C, B)``. The sums run over the axes ``(1, 3)``. With ``K`` the
shift, ``m`` the mask and ``act'(z) = 1 if z > 0 else s``::

    shifted_sums_p(x, stored, K, [m])              -> (sum m (x - K), sum m (x - K)^2)
    weighted_sums_p(t, stored, K, [m], [z]; s)     -> (sum w t, sum w t (x - K)),
                                                      w = m act'(z)      (linear in t)
    shifted_affine_p(x, stored, K, a, b, [r]; s)   -> z = act((x - K) a + b + r)
    affine_tangent_p([u], [da], [db], stored, K, [z]; s)
                                                   -> act'(z) (u + (x - K) da + db)
                                                                 (linear in u, da, db)

``x`` is the input in the compute dtype (at least float32): only its
tangent is used. ``stored`` is the same values as the caller holds them,
possibly in half precision: the kernels read it as stored and convert in
registers. ``z`` has the dtype of ``stored``; sums and per-feature values
the compute dtype.

Differentiation is arranged so that reverse mode moves the fewest bytes.
The tangent of the sums is ``(w1, 2 w2)`` with ``(w1, w2) =
weighted_sums_p(dx, ...)``; the tangent of the affine map is
``affine_tangent_p(dx a + dr, da, db, ...)``. Transposed, ``affine_tangent_p``
gives ``da, db`` from one kernel pass over ``(dz, z, x)``, and both linear
primitives give their ``N``-sized cotangents as plain elementwise JAX, which
XLA fuses into the one pass that writes ``dx``:
``dx = a act'(z) dz + m (c1 + c2 (x - K))``. Forward: 3 N bytes (sums 1 N,
affine 2 N); backward: 5 N (7 N with an activation, which reads ``z``).
Reverse mode keeps ``stored``, ``z`` (with an activation), the mask and
per-feature values: never ``x - K`` or a float32 copy of ``x``.

The linear primitives are differentiated again (``hessian``,
``check_grads(order=2)``) through their linear operands by themselves, and
through the others by the forward mode of their references, which is plain
JAX and so transposable.

Lowering: on CPU, the compiled kernel when it is loaded and takes the
operands (float32, bfloat16 or float16 storage; float32 per-feature values),
the shapes are not empty, and XLA does not partition the module over several
devices (a custom call there would make XLA gather ``x`` on every device; see
``_partitioned``). Everywhere else, and for float64, the reference.
``affine_tangent_p`` runs only in forward mode and is always its reference.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from jaxbn._kernels import _layout, _library

SUM_AXES = (1, 3)  # A and B
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
ACTIVATION_CODES = {1.0: 0, 0.0: 1}  # the kernel's Act: identity, relu; any other slope leaky


# ---------------------------------------------------------------------------
# References: the XLA formulation of each primitive, with its signature.


def masked_value(mask, value):
  """``value`` where ``mask`` holds, 0 elsewhere; ``value`` itself for no mask."""
  return value if mask is None else jnp.where(mask, value, jnp.zeros_like(value))


def gate(slope: float, z, value):
  """``act'(z) value = value if z > 0 else slope value``; ``value`` itself without ``z``."""
  return value if z is None else jnp.where(z > 0, value, slope * value)


def activate(slope: float, u):
  """``act(u)``: ``u`` (slope 1), ``max(u, 0)`` (slope 0, never -0 or NaN), or leaky."""
  if slope == 1.0:
    return u
  return jnp.where(u > 0, u, jnp.zeros_like(u) if slope == 0.0 else slope * u)


def _split(operands, *present):
  """``operands`` with ``None`` put in for the optional ones that are absent."""
  operands, out = list(operands), []
  for here in present:
    out.append(operands.pop(0) if here else None)
  return out + operands


def shifted_sums_reference(x, stored, shift, mask=None):
  """``(sum m (x - K), sum m (x - K)^2)`` over ``(A, B)``, read from ``stored``."""
  deviation = masked_value(mask, stored.astype(x.dtype) - shift)
  return (
      jnp.sum(deviation, SUM_AXES, keepdims=True),
      jnp.sum(deviation * deviation, SUM_AXES, keepdims=True),
  )


def weighted_sums_reference(t, stored, shift, mask=None, z=None, *, slope=1.0):
  """``(sum w t, sum w t (x - K))`` with ``w = m act'(z)``, in the dtype of ``shift``."""
  weighted = masked_value(mask, gate(slope, z, t.astype(shift.dtype)))
  deviation = stored.astype(shift.dtype) - shift
  return (
      jnp.sum(weighted, SUM_AXES, keepdims=True),
      jnp.sum(weighted * deviation, SUM_AXES, keepdims=True),
  )


def shifted_affine_reference(x, stored, shift, a, b, residual=None, *, slope=1.0):
  """``act((x - K) a + b + r)`` in the dtype of ``stored``."""
  u = (stored.astype(x.dtype) - shift) * a + b
  if residual is not None:
    u = u + residual.astype(u.dtype)
  return activate(slope, u).astype(stored.dtype)


def affine_tangent_reference(u, da, db, stored, shift, z=None, *, slope=1.0):
  """``act'(z) (u + (x - K) da + db)`` in the dtype of ``stored``; ``None`` terms are 0."""
  terms = [u] if u is not None else []
  if da is not None:
    terms.append((stored.astype(shift.dtype) - shift) * da)
  if db is not None:
    terms.append(db)
  total = jnp.broadcast_to(sum(terms[1:], terms[0]), stored.shape)
  return gate(slope, z, total).astype(stored.dtype)


# ---------------------------------------------------------------------------
# Binding, with the optional operands as flags.


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


def shifted_sums(x, stored, shift, mask=None):
  operands = [x, stored, shift] + ([mask] if mask is not None else [])
  return tuple(shifted_sums_p.bind(*_aligned(*operands), masked=mask is not None))


def weighted_sums(t, stored, shift, mask=None, z=None, *, slope=1.0):
  gated = z is not None and slope != 1.0
  operands = [t, stored, shift] + [v for v in (mask, z if gated else None) if v is not None]
  return tuple(
      weighted_sums_p.bind(
          *_aligned(*operands), masked=mask is not None, gated=gated, slope=float(slope)
      )
  )


def shifted_affine(x, stored, shift, a, b, residual=None, *, slope=1.0):
  operands = [x, stored, shift, a, b] + ([residual] if residual is not None else [])
  return shifted_affine_p.bind(
      *_aligned(*operands), has_residual=residual is not None, slope=float(slope)
  )


def affine_tangent(u, da, db, stored, shift, z=None, *, slope=1.0):
  gated = z is not None and slope != 1.0
  linear = [v for v in (u, da, db) if v is not None]
  operands = linear + [stored, shift] + ([z] if gated else [])
  return affine_tangent_p.bind(
      *_aligned(*operands),
      has_u=u is not None,
      has_da=da is not None,
      has_db=db is not None,
      gated=gated,
      slope=float(slope),
  )


def _sums_args(operands, masked):
  x, stored, shift, mask = _split(operands, True, True, True, masked)
  return x, stored, shift, mask


def _weighted_args(operands, masked, gated):
  return _split(operands, True, True, True, masked, gated)


def _affine_args(operands, has_residual):
  return _split(operands, True, True, True, True, True, has_residual)


def _tangent_args(operands, has_u, has_da, has_db, gated):
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


def _check_view(name, big, per_feature):
  if big.ndim != 4 or per_feature.shape != (big.shape[0], 1, big.shape[2], 1):
    raise ValueError(
        f"{name}: operands must be in the (G, A, C, B) view with per-feature values of shape "
        f"(G, 1, C, 1); got {big.shape} and {per_feature.shape}."
    )


def _per_feature_aval(shift, dtype):
  return shift.update(dtype=jnp.dtype(dtype), weak_type=False)


@shifted_sums_p.def_abstract_eval
def _shifted_sums_abstract(*operands, masked):
  x, stored, shift, _ = _sums_args(operands, masked)
  _check_view("shifted_sums", stored, shift)
  return [_per_feature_aval(shift, x.dtype)] * 2


@weighted_sums_p.def_abstract_eval
def _weighted_sums_abstract(*operands, masked, gated, slope):
  _, stored, shift, _, _ = _weighted_args(operands, masked, gated)
  _check_view("weighted_sums", stored, shift)
  return [_per_feature_aval(shift, shift.dtype)] * 2


@shifted_affine_p.def_abstract_eval
def _shifted_affine_abstract(*operands, has_residual, slope):
  _, stored, shift, *_ = _affine_args(operands, has_residual)
  _check_view("shifted_affine", stored, shift)
  return stored.update(weak_type=False)


@affine_tangent_p.def_abstract_eval
def _affine_tangent_abstract(*operands, has_u, has_da, has_db, gated, slope):
  *_, stored, shift, _ = _tangent_args(operands, has_u, has_da, has_db, gated)
  _check_view("affine_tangent", stored, shift)
  return stored.update(weak_type=False)


# Each primitive's reference, taking its operands and parameters.


def _shifted_sums_ref(*operands, masked):
  return shifted_sums_reference(*_sums_args(operands, masked))


def _weighted_sums_ref(*operands, masked, gated, slope):
  return weighted_sums_reference(*_weighted_args(operands, masked, gated), slope=slope)


def _shifted_affine_ref(*operands, has_residual, slope):
  return shifted_affine_reference(*_affine_args(operands, has_residual), slope=slope)


def _affine_tangent_ref(*operands, has_u, has_da, has_db, gated, slope):
  args = _tangent_args(operands, has_u, has_da, has_db, gated)
  return affine_tangent_reference(*args, slope=slope)


REFERENCES = {
    shifted_sums_p: _shifted_sums_ref,
    weighted_sums_p: _weighted_sums_ref,
    shifted_affine_p: _shifted_affine_ref,
    affine_tangent_p: _affine_tangent_ref,
}


# ---------------------------------------------------------------------------
# Forward mode.


def _is_zero(tangent) -> bool:
  return type(tangent) is ad.Zero


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


def _shifted_sums_jvp(primals, tangents, *, masked):
  x, stored, shift, mask = _sums_args(primals, masked)
  dx, _, dshift, _ = _sums_args(tangents, masked)  # `stored` lends its values only
  s1, s2 = shifted_sums_p.bind(*primals, masked=masked)
  ds1 = ds2 = None
  if not _is_zero(dx):
    w1, w2 = weighted_sums(dx, stored, shift, mask)
    ds1, ds2 = w1, 2 * w2
  if not _is_zero(dshift):  # d/dK sum m (x - K) = -n,  d/dK sum m (x - K)^2 = -2 S1
    if mask is None:
      count = jnp.asarray(stored.shape[1] * stored.shape[3], x.dtype)
    else:
      count = jnp.sum(mask, SUM_AXES, keepdims=True, dtype=x.dtype)
    ds1, ds2 = _add(ds1, -count * dshift), _add(ds2, -2 * s1 * dshift)
  return (s1, s2), (
      _zero_like(s1) if ds1 is None else ds1,
      _zero_like(s2) if ds2 is None else ds2,
  )


def _weighted_sums_jvp(primals, tangents, *, masked, gated, slope):
  params = dict(masked=masked, gated=gated, slope=slope)
  out = weighted_sums_p.bind(*primals, **params)
  t, *rest = primals
  dt = tangents[0]
  d1 = d2 = None
  if not _is_zero(dt):  # linear in t
    d1, d2 = weighted_sums_p.bind(dt.astype(t.dtype), *rest, **params)
  # Through x, K and z (whose derivative vanishes), by the reference.
  args = _weighted_args(primals, masked, gated)
  dargs = _weighted_args(tangents, masked, gated)
  through = _reference_tangent(
      weighted_sums_reference, args, dargs, (1, 2, 4), slope=slope
  )
  if through is not None:
    d1, d2 = _add(d1, through[0]), _add(d2, through[1])
  return out, [_zero_like(o) if d is None else d for o, d in zip(out, (d1, d2), strict=True)]


def _shifted_affine_jvp(primals, tangents, *, has_residual, slope):
  x, stored, shift, a, b, residual = _affine_args(primals, has_residual)
  dx, _, dshift, da, db, dresidual = _affine_args(tangents, has_residual)
  z = shifted_affine_p.bind(*primals, has_residual=has_residual, slope=slope)
  # dz = act'(z) (dx a + (x - K) da + (db - a dK) + dr)
  u = None if _is_zero(dx) else dx * a
  if has_residual and not _is_zero(dresidual):
    u = _add(u, dresidual.astype(x.dtype))
  if u is not None:
    u = jnp.broadcast_to(u, stored.shape)
  da = None if _is_zero(da) else da
  db = None if _is_zero(db) else db
  if not _is_zero(dshift):
    db = _add(db, -a * dshift)
  if u is None and da is None and db is None:
    return z, _zero_like(z)
  return z, affine_tangent(u, da, db, stored, shift, z, slope=slope)


def _affine_tangent_jvp(primals, tangents, *, has_u, has_da, has_db, gated, slope):
  flags = dict(has_u=has_u, has_da=has_da, has_db=has_db, gated=gated)
  out = affine_tangent_p.bind(*primals, **flags, slope=slope)
  args = _tangent_args(primals, **flags)
  dargs = _tangent_args(tangents, **flags)
  linear = [
      None if v is None or _is_zero(dv) else dv
      for v, dv in zip(args[:3], dargs[:3], strict=True)
  ]
  total = None
  if any(v is not None for v in linear):  # linear in u, da, db
    total = affine_tangent(*linear, *args[3:], slope=slope)
  # Through x, K and z (whose derivative vanishes), by the reference.
  total = _add(total, _reference_tangent(affine_tangent_reference, args, dargs, (3, 4, 5),
                                         slope=slope))
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


def _weighted_sums_transpose(cts, *operands, masked, gated, slope):
  """``t_bar = w (c1 + c2 (x - K))``, plain JAX that XLA fuses into its consumer."""
  t, stored, shift, mask, z = _weighted_args(operands, masked, gated)
  stored, shift, mask, z = (None if v is None else _value(v) for v in (stored, shift, mask, z))
  ct1, ct2 = cts
  none = [None] * len(operands)
  if not ad.is_undefined_primal(t) or (_is_zero(ct1) and _is_zero(ct2)):
    return none
  dtype = shift.dtype
  total = None
  if not _is_zero(ct2):
    total = ct2 * (stored.astype(dtype) - shift)
  if not _is_zero(ct1):
    total = _add(total, ct1)
  t_bar = masked_value(mask, gate(slope, z, jnp.broadcast_to(total, stored.shape)))
  return [t_bar.astype(t.aval.dtype)] + none[1:]


def _affine_tangent_transpose(ct, *operands, has_u, has_da, has_db, gated, slope):
  """``u_bar = act'(z) ct`` (plain JAX, fused into ``dx``); ``da, db`` from one kernel pass."""
  flags = dict(has_u=has_u, has_da=has_da, has_db=has_db, gated=gated)
  u, da, db, stored, shift, z = _tangent_args(operands, **flags)
  stored, shift = _value(stored), _value(shift)
  z = None if z is None else _value(z)
  if _is_zero(ct):
    return [None] * len(operands)
  cts = {}
  if u is not None and ad.is_undefined_primal(u):
    cts["u"] = gate(slope, z, ct.astype(u.aval.dtype))
  needs_da = da is not None and ad.is_undefined_primal(da)
  needs_db = db is not None and ad.is_undefined_primal(db)
  if needs_da or needs_db:  # db_bar = sum act'(z) ct,  da_bar = sum act'(z) ct (x - K)
    db_bar, da_bar = weighted_sums(ct, stored, shift, None, z, slope=slope)
    if needs_da:
      cts["da"] = da_bar.astype(da.aval.dtype)
    if needs_db:
      cts["db"] = db_bar.astype(db.aval.dtype)
  linear = [name for name, here in (("u", has_u), ("da", has_da), ("db", has_db)) if here]
  return [cts.get(name) for name in linear] + [None] * (len(operands) - len(linear))


ad.primitive_transposes[weighted_sums_p] = _weighted_sums_transpose
ad.primitive_transposes[affine_tangent_p] = _affine_tangent_transpose


# ---------------------------------------------------------------------------
# Batching: the mapped axis joins G, so each member has its own statistics.


def _large(value) -> bool:
  """An ``x``-sized floating-point operand (per-feature values and masks are cheap to copy)."""
  return (
      jnp.issubdtype(value.dtype, jnp.floating)
      and value.ndim == 4
      and not (value.shape[1] == 1 and value.shape[3] == 1)
  )


def _batch(primitive, args, dims, **params):
  """Folds the mapped axis into G: ``(V, G, ...) -> (V * G, ...)``.

  Unmapped per-feature values and masks are broadcast. When an unmapped
  operand is ``x``-sized (``jacfwd``: mapped tangents of one input), copying
  it ``V`` times would cost more than it saves: the reference runs instead.
  """
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
  out_dims = [0, 0] if primitive.multiple_results else 0
  if any(d is None and _large(a) for a, d in zip(args, dims, strict=True)):
    reference = partial(REFERENCES[primitive], **params)
    out = jax.vmap(reference, in_axes=tuple(dims))(*args)
    return (list(out) if primitive.multiple_results else out), out_dims
  folded = []
  for a, d in zip(args, dims, strict=True):
    a = jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
    folded.append(a.reshape((size * a.shape[1],) + a.shape[2:]))
  out = primitive.bind(*folded, **params)

  def unfold(o):
    return o.reshape((size, o.shape[0] // size) + o.shape[1:])

  if primitive.multiple_results:
    return [unfold(o) for o in out], out_dims
  return unfold(out), out_dims


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


def _constant_nonempty(aval) -> bool:
  """True for a shape known now with no zero size; symbolic shapes go to the kernel."""
  return all(not isinstance(d, int) or d > 0 for d in aval.shape)


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


def _use_kernel(ctx, stored) -> bool:
  """Whether this module runs the kernel on operands it takes, viewed like ``stored``."""
  return _constant_nonempty(stored) and not _partitioned(ctx) and _library.available()


def _squeezed_shape(shape) -> tuple:
  return tuple(d for d in shape if not _layout.is_one(d))


def _squeezed(value):
  """``value`` without its axes of size 1.

  XLA:CPU gives a reshape's size-1 axes a layout of its own choosing and then
  copies the array to the row-major layout a custom call asks for; without
  them the reshape of the caller's array stays a free bitcast.
  """
  return value.reshape(_squeezed_shape(value.shape))


def _call(target, operands, results, **attributes):
  """The kernel ``target`` on ``operands`` (squeezed), with ``results`` shaped like these.

  ``view`` tells the kernel which of ``(G, A, C, B)`` the first operand's
  squeezed axes are (bits 8, 4, 2, 1).
  """
  view = sum(8 >> k for k, d in enumerate(operands[0].shape) if not _layout.is_one(d))
  squeezed = [jax.ShapeDtypeStruct(_squeezed_shape(r.shape), r.dtype) for r in results]
  out = jax.ffi.ffi_call(target, squeezed)(
      *map(_squeezed, operands), view=np.int64(view), **attributes
  )
  return [o.reshape(r.shape) for o, r in zip(out, results, strict=True)]


def _shifted_sums_kernel(*operands, masked):
  x, stored, shift, mask = _sums_args(operands, masked)
  # `x` is not passed: only its tangent matters, so XLA never computes it.
  return _call(
      "jaxbn_shifted_sums",
      [stored, shift] + ([mask] if masked else []),
      [jax.ShapeDtypeStruct(shift.shape, x.dtype)] * 2,
      row_mask=masked and _layout.is_one(mask.shape[2]),
  )


def _weighted_sums_kernel(*operands, masked, gated, slope):
  t, stored, shift, mask, z = _weighted_args(operands, masked, gated)
  return _call(
      "jaxbn_weighted_sums",
      [t, stored, shift] + [v for v in (mask, z) if v is not None],
      [jax.ShapeDtypeStruct(shift.shape, shift.dtype)] * 2,
      slope=np.float32(slope),
      masked=masked,
      gated=gated,
      row_mask=masked and _layout.is_one(mask.shape[2]),
  )


def _shifted_affine_kernel(*operands, has_residual, slope):
  _, stored, shift, a, b, residual = _affine_args(operands, has_residual)
  (z,) = _call(
      "jaxbn_shifted_affine",
      [stored, shift, a, b] + ([residual] if has_residual else []),
      [jax.ShapeDtypeStruct(stored.shape, stored.dtype)],
      slope=np.float32(slope),
      activation=np.int64(ACTIVATION_CODES.get(slope, 2)),
  )
  return z


def _cpu_lowering(primitive, kernel, takes):
  """The kernel where ``takes(avals, **params)`` and ``_use_kernel``; else the reference."""
  kernel = mlir.lower_fun(kernel, multiple_results=primitive.multiple_results)

  def rule(ctx, *operands, **params):
    if takes(ctx.avals_in, **params) and _use_kernel(ctx, ctx.avals_in[1]):
      return kernel(ctx, *operands, **params)
    return _reference_lowering[primitive](ctx, *operands, **params)

  return rule


def _sums_takes(avals, masked):
  _, stored, shift, _ = _sums_args(avals, masked)
  return _kernel_takes(stored, shift)


def _weighted_takes(avals, masked, gated, slope):
  t, stored, shift, _, z = _weighted_args(avals, masked, gated)
  return _kernel_takes(stored, shift, [t], [] if z is None else [z])


def _affine_takes(avals, has_residual, slope):
  _, stored, shift, a, b, residual = _affine_args(avals, has_residual)
  residuals = [] if residual is None else [residual]
  return _kernel_takes(stored, shift, residuals, []) and a.dtype == b.dtype == jnp.float32


_reference_lowering = {
    p: mlir.lower_fun(reference, multiple_results=p.multiple_results)
    for p, reference in REFERENCES.items()
}
for _p, _rule in _reference_lowering.items():
  mlir.register_lowering(_p, _rule)
mlir.register_lowering(
    shifted_sums_p, _cpu_lowering(shifted_sums_p, _shifted_sums_kernel, _sums_takes),
    platform="cpu",
)
mlir.register_lowering(
    weighted_sums_p, _cpu_lowering(weighted_sums_p, _weighted_sums_kernel, _weighted_takes),
    platform="cpu",
)
mlir.register_lowering(
    shifted_affine_p, _cpu_lowering(shifted_affine_p, _shifted_affine_kernel, _affine_takes),
    platform="cpu",
)
