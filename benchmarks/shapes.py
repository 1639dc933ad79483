"""Input shapes shared by the benchmarks and the tests.

A shape's ``layout`` names its axes and so says where the features are: most
keep them on the last axis (NHWC for images, NC for an MLP), the layout JAX
and Flax use; the NCHW ones keep them on axis 1, PyTorch's default, and time
``axis=1`` against PyTorch on contiguous NCHW tensors. PyTorch rows see the
NHWC data as NCHW.

On an accelerator the batches are ``ACCELERATOR_BATCH_FACTOR`` times larger
(see ``for_platform``): a GPU's last-level cache holds tens of megabytes (50 MB
on an H100, 60 MB on an H200) and a kernel launch costs microseconds, so the
CPU shapes would time the cache and the launches, not the memory bandwidth.
"""

from typing import NamedTuple


class Shape(NamedTuple):
  """A benchmark input: a name, the array shape and its memory layout."""

  name: str
  shape: tuple[int, ...]
  layout: str  # "NHWC", "NCHW" or "NC": the axis named C holds the features.

  @property
  def key(self) -> str:
    """A compact label, e.g. ``"32x56x56x64"``."""
    return "x".join(map(str, self.shape))

  @property
  def axis(self) -> int:
    """The feature axis, where ``layout`` has its ``C``."""
    return self.layout.index("C")

  @property
  def features(self) -> int:
    return self.shape[self.axis]


RESNET_STEM = Shape("resnet50-conv2", (32, 56, 56, 64), "NHWC")
RESNET_MID = Shape("resnet50-conv4", (64, 14, 14, 256), "NHWC")
RESNET_WIDE = Shape("resnet50-conv5", (32, 7, 7, 2048), "NHWC")
MLP = Shape("mlp", (4096, 1024), "NC")
TINY = Shape("tiny", (8, 16), "NC")
# The first two ResNet shapes as PyTorch lays them out.
RESNET_STEM_NCHW = Shape("resnet50-conv2-nchw", (32, 64, 56, 56), "NCHW")
RESNET_MID_NCHW = Shape("resnet50-conv4-nchw", (64, 256, 14, 14), "NCHW")

SHAPES = (RESNET_STEM, RESNET_MID, RESNET_WIDE, MLP, TINY, RESNET_STEM_NCHW, RESNET_MID_NCHW)
BY_NAME = {s.name: s for s in SHAPES}
ACCELERATOR_BATCH_FACTOR = 8


def for_platform(platform: str) -> tuple[Shape, ...]:
  """The shapes to time on a JAX platform (``"cpu"``, ``"gpu"``, ``"tpu"``).

  On an accelerator every shape but ``tiny`` has its batch multiplied by
  ``ACCELERATOR_BATCH_FACTOR``: 32x56x56x64 becomes 256x56x56x64 (205 MB in
  float32). ``tiny`` stays as it is, to show the fixed cost of a call.
  """
  if platform == "cpu":
    return SHAPES
  return tuple(
      s if s is TINY else s._replace(shape=(s.shape[0] * ACCELERATOR_BATCH_FACTOR,) + s.shape[1:])
      for s in SHAPES
  )
