"""Input shapes shared by the benchmarks and the tests.

Every shape keeps its features on the last axis (NHWC for images, NC for an
MLP), the layout JAX and Flax use. PyTorch rows see the same data as NCHW.
"""

from typing import NamedTuple


class Shape(NamedTuple):
  """A benchmark input: a name, the array shape and its memory layout."""

  name: str
  shape: tuple[int, ...]
  layout: str  # "NHWC" or "NC": the feature axis is the last one.

  @property
  def key(self) -> str:
    """A compact label, e.g. ``"32x56x56x64"``."""
    return "x".join(map(str, self.shape))

  @property
  def features(self) -> int:
    return self.shape[-1]


RESNET_STEM = Shape("resnet50-conv2", (32, 56, 56, 64), "NHWC")
RESNET_MID = Shape("resnet50-conv4", (64, 14, 14, 256), "NHWC")
RESNET_WIDE = Shape("resnet50-conv5", (32, 7, 7, 2048), "NHWC")
MLP = Shape("mlp", (4096, 1024), "NC")
TINY = Shape("tiny", (8, 16), "NC")

SHAPES = (RESNET_STEM, RESNET_MID, RESNET_WIDE, MLP, TINY)
BY_NAME = {s.name: s for s in SHAPES}
