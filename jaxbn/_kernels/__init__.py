"""jaxbn's compiled CPU kernels, as JAX primitives with every transformation rule.

Three pieces of the training step run as C++ kernels (XLA FFI handlers on
XLA's intra-op thread pool) where XLA:CPU is slow: the shifted sums in one
pass, the affine map with activation and residual, and the backward
reductions in one pass. The functions here take the signatures of the fused
pieces they replace (``_fused.shifted_sums``, ``_fused.shifted_affine``,
``_activation.shifted_affine_act``); see ``_ops``, ``_primitives`` and
``csrc/``.

Forward and backward move the fewest bytes: 3 N forward (N the bytes of
``x``), 5 N backward (7 N with an activation), against 4 N and 6 N for the
fused XLA path on CPU. Results are bitwise the same whatever the number of
threads.

``available()`` tells whether the kernels are loaded; ``reason()`` why not.
``jax.export`` lowers them to the XLA formulation, so that exported programs
run anywhere; ``kernels_in_export()`` keeps the kernels there.
They are not when the build found no C++17 compiler, or with
``JAXBN_DISABLE_KERNELS=1``: the functions then fall back to the XLA path.
"""

from jaxbn._kernels._layout import Layout as Layout
from jaxbn._kernels._layout import layout as layout
from jaxbn._kernels._library import DISABLE_ENV as DISABLE_ENV
from jaxbn._kernels._library import available as available
from jaxbn._kernels._library import isa as isa
from jaxbn._kernels._library import reason as reason
from jaxbn._kernels._ops import shifted_affine as shifted_affine
from jaxbn._kernels._ops import shifted_affine_act as shifted_affine_act
from jaxbn._kernels._ops import shifted_sums as shifted_sums
from jaxbn._kernels._primitives import TARGETS as TARGETS
from jaxbn._kernels._primitives import kernels_in_export as kernels_in_export

available()  # load and register the kernels now, so exported programs find them too

__all__ = [
    "DISABLE_ENV",
    "Layout",
    "TARGETS",
    "available",
    "isa",
    "kernels_in_export",
    "layout",
    "reason",
    "shifted_affine",
    "shifted_affine_act",
    "shifted_sums",
]
