"""Trace-time checks that turn bad input into errors that say how to fix it.

Every check here looks only at static properties (shapes, dtypes, Python
numbers), so it runs once while tracing and costs nothing at run time.
"""

import importlib.util
from collections.abc import Sequence
from numbers import Real
from typing import Any

import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int]


def require(package: str, *, extra: str, user: str) -> None:
  """Raises an ``ImportError`` that gives the install command when ``package`` is missing.

  Flax and Equinox are optional dependencies, imported only by the modules
  that wrap them (``user``).
  """
  if importlib.util.find_spec(package) is None:
    raise ImportError(
        f"{user} needs {package}, which is not installed: pip install \"jaxbn[{extra}]\" "
        f"(or pip install {package})."
    )


def canonicalize_axes(axis: Axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
  """Returns the feature axes as sorted non-negative ints.

  Raises:
    TypeError: if an entry of ``axis`` is not an int.
    ValueError: if an entry is out of range for an array of rank ``ndim`` or
      appears twice.
  """
  axes = tuple(axis) if isinstance(axis, Sequence) else (axis,)
  if not axes:
    raise ValueError(f"`{name}` must name at least one feature axis, got {axis!r}.")
  positive = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, int | np.integer):
      raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{name}`={axis!r} is out of range for an input of rank {ndim}: "
          f"each entry must lie in [{-ndim}, {ndim - 1}]."
      )
    positive.append(int(a) % ndim)
  if len(set(positive)) != len(positive):
    raise ValueError(
        f"`{name}`={axis!r} names the same axis twice (as {sorted(positive)} "
        f"for an input of rank {ndim}); give each feature axis once."
    )
  return tuple(sorted(positive))


def check_input(x: Any, name: str = "x") -> None:
  """Checks that ``x`` is a floating-point array of rank at least 1."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array (float32, bfloat16, float16 or "
        f"float64), got dtype {dtype}; cast it first, e.g. `{name}.astype(jnp.float32)`."
    )
  if jnp.ndim(x) == 0:
    raise ValueError(f"`{name}` must have at least one axis, got a scalar.")


def check_per_feature(
    value: Any, feature_shape: tuple[int, ...], name: str, required: bool = False
) -> None:
  """Checks that a per-feature array (scale, bias, mean, var) has the feature shape.

  ``None`` passes unless ``required``.
  """
  if value is None:
    if required:
      raise TypeError(f"`{name}` is required: an array of the feature shape {feature_shape}.")
    return
  shape = tuple(jnp.shape(value))
  if shape != feature_shape:
    raise ValueError(
        f"`{name}` has shape {shape}, but the feature shape of the input along "
        f"`axis` is {feature_shape}; `{name}` must have exactly that shape."
    )
  dtype = jnp.result_type(value)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"`{name}` must be floating point, got dtype {dtype}.")


def check_state(state: Any, feature_shape: tuple[int, ...]) -> None:
  """Checks a ``BatchNormState`` against the feature shape of the input."""
  fields = ("mean", "var", "count")
  if not all(hasattr(state, f) for f in fields):
    raise TypeError(
        "`state` must be a BatchNormState(mean, var, count), e.g. from "
        f"`jaxbn.init_state({feature_shape})`, got {type(state).__name__}."
    )
  for field in ("mean", "var"):
    check_per_feature(getattr(state, field), feature_shape, f"state.{field}", required=True)
  if jnp.shape(state.count) != ():
    raise ValueError(
        f"`state.count` must be a scalar, got shape {jnp.shape(state.count)}."
    )


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> None:
  """Checks that ``mask`` is boolean and broadcasts to the input's shape."""
  if mask is None:
    return
  mask_shape = tuple(jnp.shape(mask))
  try:
    broadcast = jnp.broadcast_shapes(mask_shape, x_shape)
  except ValueError:
    broadcast = None
  if broadcast != x_shape:
    raise ValueError(
        f"`mask` has shape {mask_shape}, which does not broadcast to the input "
        f"shape {x_shape}; give a boolean mask of shape {x_shape} or one with "
        "size-1 axes where it is constant."
    )
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(
        f"`mask` must be boolean (True marks the entries that count), got dtype "
        f"{jnp.result_type(mask)}."
    )


def check_fraction(value: Any, name: str, low: float, high: float) -> None:
  """Checks a scalar lies in [low, high]; of a traced value only the shape is known."""
  if jnp.ndim(value) != 0:
    raise ValueError(f"`{name}` must be a scalar, got an array of shape {jnp.shape(value)}.")
  if isinstance(value, Real) and not low <= value <= high:
    raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value}.")


def check_axis_name(axis_name: Any) -> None:
  """Checks that every name in ``axis_name`` (if any) is bound by an enclosing map."""
  from jax import lax

  if axis_name is None:
    return
  for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
    try:
      lax.axis_size(name)
    except NameError:
      raise NameError(
          f"`axis_name`={axis_name!r}: the axis {name!r} is not bound. Call batch "
          f"norm inside a map that defines it, e.g. `jax.vmap(f, axis_name={name!r})`, "
          f"`jax.shard_map(f, mesh=mesh, in_specs=P({name!r}), out_specs=...)` or "
          f"`jax.pmap(f, axis_name={name!r})`; or pass `axis_name=None` for "
          "statistics of the local batch (sharded `jax.jit` needs no axis name)."
      ) from None


def check_axis_index_groups(axis_index_groups: Any, axis_name: Any) -> None:
  """Checks that ``axis_index_groups`` partitions the indices of ``axis_name``.

  The groups must be equally large and hold every index in
  ``range(axis_size)`` exactly once, as ``jax.lax.psum`` requires.

  Raises:
    ValueError: if they do not, or if groups come without an ``axis_name``.
  """
  if axis_index_groups is None:
    return
  if axis_name is None:
    raise ValueError(
        f"`axis_index_groups`={axis_index_groups!r} was given without `axis_name`; "
        "the groups split a mapped axis, so also pass the `axis_name` they index."
    )
  from jax import lax

  size = lax.axis_size(axis_name)
  half = size // 2 if size % 2 == 0 else size
  example = [list(range(half)), list(range(half, size))] if half < size else [list(range(size))]
  expected = (
      f"expected equally large groups that hold each index in range({size}) of axis "
      f"{axis_name!r} exactly once, e.g. {example}"
  )
  try:
    groups = [[int(i) for i in group] for group in axis_index_groups]
  except TypeError:
    raise ValueError(
        f"`axis_index_groups` must be a sequence of sequences of ints, got "
        f"{axis_index_groups!r}; {expected}."
    ) from None
  sizes = sorted({len(group) for group in groups})
  if len(sizes) != 1:
    raise ValueError(
        f"`axis_index_groups`={groups!r} has groups of sizes {sizes}; {expected}."
    )
  indices = sorted(i for group in groups for i in group)
  if indices != list(range(size)):
    raise ValueError(f"`axis_index_groups`={groups!r} does not partition the axis; {expected}.")
