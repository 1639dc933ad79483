"""What ``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` share beyond Flax's module."""

from jaxbn._renorm import RenormState
from jaxbn._state import BatchNormState

# Module settings passed to ``batch_norm`` under the same names.
VARIANT_SETTINGS = (
    "averaging",
    "unbiased_var",
    "skip_nonfinite",
    "activation",
    "negative_slope",
    "inplace",
    "renorm",
    "virtual_batch_size",
)


def variants(module, residual, use_batch_stats, update_stats) -> dict:
  """The keyword arguments of ``batch_norm`` that ``module`` passes beyond Flax's."""
  return dict(
      {name: getattr(module, name) for name in VARIANT_SETTINGS},
      residual=residual,
      use_batch_stats=use_batch_stats,
      update_stats=update_stats,
  )


def state_type(module) -> type:
  """``RenormState`` for batch renormalization, else ``BatchNormState``."""
  return BatchNormState if module.renorm is None else RenormState


def keeps_count(module) -> bool:
  """Whether the module stores the update count.

  The debiased and cumulative averages and renorm's schedules need the step; a
  plain EMA does not, so by default the variables are Flax's.
  """
  return module.averaging != "ema" or module.renorm is not None
