"""The ``(G, A, C, B)`` view of an array that the kernels read.

The kept (feature) axes must be a leading block ``G`` (possibly empty: ghost
batches and vmapped ensembles put their group axis first) plus one contiguous
block ``C``; ``A`` is the product of the reduction axes before ``C`` and
``B`` of those after it. The view is a reshape, which XLA does for free::

    features last, (N, H, W, C), kept (3,)         -> (1, N H W, C, 1)
    NCHW, (N, C, H, W), kept (1,)                  -> (1, N, C, H W)
    ghost batches, (Gr, n, H, W, C), kept (0, 4)   -> (Gr, n H W, C, 1)
    no kept axis (a scalar statistic)              -> (1, 1, 1, N)

Axes of size 1 belong to any block. Other layouts, e.g. kept axes (1, 3) of
a 4-D array, have no such view; they take the XLA path. Sizes may be
symbolic (``jax.export``): only which axes go where is decided here.
"""

import math
from typing import NamedTuple


def is_one(size) -> bool:
  """Whether an axis size is known to be 1 (a symbolic size never is)."""
  return isinstance(size, int) and size == 1


class Layout(NamedTuple):
  """Which axes of an array form ``G``, ``A``, ``C`` and ``B``."""

  groups: tuple[int, ...]
  rows: tuple[int, ...]
  features: tuple[int, ...]
  columns: tuple[int, ...]

  @property
  def reduced(self) -> tuple[int, ...]:
    """The reduction axes (size-1 axes may be missing: they change no sum)."""
    return self.rows + self.columns

  def dims(self, shape) -> tuple:
    """``(G, A, C, B)``: the products of the sizes of each block."""
    return tuple(math.prod(shape[i] for i in block) for block in self)

  def keepdims(self, shape) -> tuple:
    """The shape of per-feature values: ``shape`` with size 1 on the reduction axes."""
    return tuple(1 if i in self.reduced else size for i, size in enumerate(shape))

  def row_mask(self, shape) -> tuple:
    """The shape of a mask that is the same for every feature: size 1 on the features."""
    return tuple(1 if i in self.features else size for i, size in enumerate(shape))

  def with_leading_group(self) -> "Layout":
    """The layout of a stack of such arrays along a new axis 0, each its own group."""
    return Layout(*((0,) * (k == 0) + tuple(i + 1 for i in block) for k, block in enumerate(self)))


def layout(shape, kept) -> Layout | None:
  """The view of an array of ``shape`` whose axes ``kept`` are features, or None.

  Args:
    shape: the array's shape; sizes may be symbolic.
    kept: the feature axes (non-negative), in any order.

  Returns:
    A ``Layout``, or ``None`` when the kept axes are neither a leading block
    nor a leading block plus one contiguous block.

  Examples:
    >>> layout((8, 3, 5, 5), (1,))
    Layout(groups=(), rows=(0,), features=(1,), columns=(2, 3))
    >>> layout((8, 3, 5, 5), (1, 3)) is None
    True
  """
  kept = set(kept)
  axes = [i for i, size in enumerate(shape) if not is_one(size)]  # size 1 goes anywhere
  flags = [i in kept for i in axes]
  leading = 0
  while leading < len(axes) and flags[leading]:
    leading += 1
  features = [j for j in range(leading, len(axes)) if flags[j]]
  if not features:  # all kept axes lead: one run of the rest per group
    return Layout(tuple(axes[:leading]), (), (), tuple(axes[leading:]))
  first, last = features[0], features[-1]
  if last - first + 1 != len(features):
    return None
  return Layout(
      tuple(axes[:leading]),
      tuple(axes[leading:first]),
      tuple(axes[first : last + 1]),
      tuple(axes[last + 1 :]),
  )
