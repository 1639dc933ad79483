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

  def dims(self, shape) -> tuple:
    """``(G, A, C, B)``: the products of the sizes of each block."""
    return tuple(math.prod(shape[i] for i in block) for block in self)

  def per_feature(self, shape) -> tuple:
    """``(G, 1, C, 1)``, the view of per-feature values."""
    g, _, c, _ = self.dims(shape)
    return (g, 1, c, 1)

  def row_mask(self, shape) -> tuple:
    """``(G, A, 1, B)``, the view of a mask that is the same for every feature."""
    g, a, _, b = self.dims(shape)
    return (g, a, 1, b)


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
