"""What ``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` share beyond Flax's module."""

import inspect
import math
import warnings

import jax.numpy as jnp

from jaxbn import _core, _validation
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
# The keyword defaults of `batch_norm`: a variant is requested when it differs from its own.
_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(_core.batch_norm).parameters.items()
}


def call_arguments(
    module, x, *, training, mask, axis_name, residual, use_batch_stats, update_stats
) -> tuple[tuple[int, ...], bool, dict] | None:
  """What a module's call passes to ``batch_norm`` beyond Flax's arguments.

  Returns ``(feature_axes, updates_stats, variants)``: the canonical feature
  axes, whether the running statistics are updated, and the variant keyword
  arguments; or None when ``x`` goes to Flax's implementation (see
  ``flax_fallback``).
  """
  uses_batch_stats, updates_stats = _core._resolve_switches(
      training, use_batch_stats, update_stats
  )
  variants = dict(
      {name: getattr(module, name) for name in VARIANT_SETTINGS},
      residual=residual,
      use_batch_stats=use_batch_stats,
      update_stats=update_stats,
  )
  feature_axes = _validation.canonicalize_axes(module.axis, jnp.ndim(x))
  if flax_fallback(
      x,
      feature_axes,
      training=uses_batch_stats or updates_stats,
      mask=mask,
      axis_name=axis_name,
      variants=variants,
  ):
    return None
  return feature_axes, updates_stats, variants


def stat_names(module) -> tuple[str, ...]:
  """The running statistics ``module`` stores, in the order of its state's fields.

  Flax's ``mean`` and ``var``; the update count only for the debiased and
  cumulative averages and renorm's schedules, which need the step; renorm's
  own statistics only with renorm. By default the variables are Flax's.
  """
  keeps_count = module.averaging != "ema" or module.renorm is not None
  return tuple(name for name in _state_type(module)._fields if name != "count" or keeps_count)


def running_state(module, values: dict):
  """The ``BatchNormState`` or ``RenormState`` of ``values`` (by name).

  Without a stored count the state's count is 0: nothing reads it then.
  """
  return _state_type(module)(**{"count": jnp.zeros((), jnp.int32)} | values)


def _state_type(module) -> type:
  return BatchNormState if module.renorm is None else RenormState


def flax_fallback(x, feature_axes, *, training: bool, mask, axis_name, variants=None) -> bool:
  """Whether the Flax modules hand ``x`` to Flax's implementation; warns when degenerate.

  Flax accepts two inputs that ``jaxbn.batch_norm`` refuses: complex ``x``, and
  training on a single value per feature (no ``mask``, no ``axis_name``), where
  the batch variance is 0. Both keep Flax's behaviour in the modules. Flax's
  implementation has none of jaxbn's variants, so such an input with a variant
  requested is an error rather than a plain batch norm in disguise.

  Args:
    x: the module's input.
    feature_axes: the canonical feature axes.
    training: whether batch statistics are computed (to normalize or to update).
    mask: the module's ``mask``.
    axis_name: the module's ``axis_name`` (None while a linen module initializes).
    variants: the keyword arguments of ``jaxbn.batch_norm`` that the module
      passes beyond Flax's, by name; one is requested when it differs from its
      default there.

  Raises:
    ValueError: if such an input comes with a requested variant.
  """
  shape = jnp.shape(x)
  if jnp.iscomplexobj(x):
    reason = f"a complex input (dtype {jnp.result_type(x)})"
    fix = "normalize the real and imaginary parts as separate features"
  else:
    single = math.prod(shape) == math.prod(shape[a] for a in feature_axes)
    if not (training and single and mask is None and axis_name is None):
      return False
    reason = f"a single value per feature (input of shape {shape}, feature axes {feature_axes})"
    fix = (
        "use a batch with more values per feature (when initializing too), or the running "
        "statistics (use_running_average=True, model.eval())"
    )
  requested = [
      f"`{name}`"
      for name, value in (variants or {}).items()
      if not (
          value is None
          if _DEFAULTS[name] is None
          else isinstance(value, type(_DEFAULTS[name])) and value == _DEFAULTS[name]
      )
  ]
  if requested:
    raise ValueError(
        f"BatchNorm got {reason}, which jaxbn hands to Flax's implementation, but that "
        f"has none of jaxbn's variants, and {', '.join(requested)} asked for one; {fix}, "
        "or leave out those settings."
    )
  if jnp.iscomplexobj(x):
    return True
  warnings.warn(
      f"BatchNorm in training mode got a single value per feature (input of shape "
      f"{shape}, feature axes {feature_axes}): the batch variance is 0, so the output "
      "is the bias alone and the running variance decays towards 0. This follows "
      "Flax; jaxbn.batch_norm raises here. Use a larger batch, or the running "
      "statistics (use_running_average=True, model.eval()) for single examples.",
      UserWarning,
      stacklevel=3,
  )
  return True
