"""jaxbn: batch normalization for JAX, functional at the core.

Pure functions (``batch_stats``, ``normalize``, ``batch_norm``) thread an
explicit ``BatchNormState``; ``jaxbn.linen`` and ``jaxbn.nnx`` hold drop-in
Flax modules built on them.
"""

from importlib.metadata import PackageNotFoundError, version

from jaxbn import interop as interop
from jaxbn._core import batch_norm as batch_norm
from jaxbn._core import normalize as normalize
from jaxbn._state import BatchNormState as BatchNormState
from jaxbn._state import init_state as init_state
from jaxbn._stats import batch_stats as batch_stats

try:
  __version__ = version("jaxbn")
except PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_stats",
    "init_state",
    "interop",
    "normalize",
]
