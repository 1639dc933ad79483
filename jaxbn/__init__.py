"""jaxbn: batch normalization for JAX, functional at the core.

Pure functions (``batch_stats``, ``normalize``, ``batch_norm``) thread an
explicit ``BatchNormState``; ``jaxbn.linen`` and ``jaxbn.nnx`` hold drop-in
Flax modules built on them. ``jaxbn.recompute_stats`` (the same as
``jaxbn.linen.recompute_stats``) needs Flax and imports it on first use.
"""

from importlib.metadata import PackageNotFoundError, version

from jaxbn import interop as interop
from jaxbn._core import batch_norm as batch_norm
from jaxbn._core import normalize as normalize
from jaxbn._core import update_running_stats as update_running_stats
from jaxbn._folding import fold_batch_norm as fold_batch_norm
from jaxbn._folding import fold_batch_norm_params as fold_batch_norm_params
from jaxbn._kernels import available as kernels_available
from jaxbn._renorm import Renorm as Renorm
from jaxbn._renorm import RenormState as RenormState
from jaxbn._renorm import init_renorm_state as init_renorm_state
from jaxbn._state import BatchNormState as BatchNormState
from jaxbn._state import init_state as init_state
from jaxbn._stats import batch_stats as batch_stats


def __getattr__(name: str):
  # `recompute_stats` runs Flax models, and Flax is optional: imported on first use.
  if name == "recompute_stats":
    from jaxbn._precise import recompute_stats

    return recompute_stats
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


try:
  __version__ = version("jaxbn")
except PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
    "BatchNormState",
    "Renorm",
    "RenormState",
    "batch_norm",
    "batch_stats",
    "fold_batch_norm",
    "fold_batch_norm_params",
    "init_renorm_state",
    "init_state",
    "interop",
    "kernels_available",
    "normalize",
    "update_running_stats",
]
