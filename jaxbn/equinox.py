"""``jaxbn.equinox.BatchNorm``: a drop-in for ``equinox.nn.BatchNorm``.

Same constructor, fields, call and ``eqx.nn.State`` layout, so
``eqx.nn.make_with_state``, ``eqx.nn.inference_mode``, ``eqx.nn.Sequential``
and checkpoints made with ``eqx.tree_serialise_leaves`` work unchanged, and
``isinstance(m, eqx.nn.BatchNorm)`` holds. The math is ``jaxbn.batch_norm``:
one-pass statistics in at least float32, exact across the named axes (a tuple
of names over nested vmaps too), the fused backward, and its variants as
keyword arguments. Two fixes of Equinox's arithmetic read its state as it is
stored: training normalizes with the batch statistics in both modes, and
``mode="batch"`` reads its running variance without the bias of its initial 1.
Complex inputs go to Equinox's implementation.
"""

import math
from collections.abc import Hashable, Sequence
from numbers import Integral, Real
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _validation

_validation.require("equinox", extra="equinox", user="jaxbn.equinox")

import equinox as eqx  # noqa: E402

from jaxbn import _activation, _core, _inplace, _modules, _renorm, _stats  # noqa: E402
from jaxbn._renorm import Renorm, RenormState  # noqa: E402
from jaxbn._state import BatchNormState  # noqa: E402

# Constructor keywords passed to `batch_norm` under the same names: the Flax modules' but
# `averaging` (each mode's state fixes it) and `virtual_batch_size` (no batch axis per example).
VARIANT_SETTINGS = tuple(
    name for name in _modules.VARIANT_SETTINGS if name not in ("averaging", "virtual_batch_size")
)


class BatchNorm(eqx.nn.BatchNorm):
  r"""Batch normalization (Ioffe & Szegedy, 2015) as an Equinox module.

  Construct and call it exactly like ``equinox.nn.BatchNorm``: one example
  ``x`` of shape ``(input_size, *spatial)`` inside ``jax.vmap`` (or
  ``jax.pmap``) with a matching ``axis_name`` (a name or a sequence of names),
  ``bn(x, state, *, key=None, inference=None) -> (y, state)``. For each
  channel ``c``, with the mean and biased variance taken over the spatial axes
  and every example along ``axis_name``::

      y[c] = (x[c] - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]

  Training normalizes with the batch statistics (exact across devices:
  count-weighted, see ``jaxbn.batch_stats``) and updates the running ones;
  inference normalizes with the running statistics, needs no named axis and
  leaves ``state`` as it is. ``momentum`` weighs the old running value (as in
  Equinox, Flax and Keras). The state holds what Equinox's class stores, in
  its layout and dtype (``dtype``, float32 by default), so checkpoints load
  both ways:

  - ``mode="batch"``: ``batch_state_index`` holds the exponential moving
    averages ``h`` of the batch mean and biased variance, started at ``h_0 =
    (0, 1)``, and ``batch_counter`` the number of updates ``t``. Inference reads
    them zero-debiased (``running_stats`` gives the values)::

        h_t = momentum * h_(t-1) + (1 - momentum) * batch_t
        read_t = (h_t - momentum^t h_0) / (1 - momentum^t)     (h_t at t = 0)

    which weighs the batches as ``jaxbn.batch_norm(averaging="debiased_ema")``
    does. Equinox divides by ``1 - momentum^t`` without subtracting
    ``momentum^t`` from the variance, which adds ``momentum^t / (1 -
    momentum^t)`` to it: 99 after one step at ``momentum=0.99``. The stored
    ``h`` keeps the rounding of its representation: float32 holds ``h_t``
    near ``momentum^t`` to about 1e-7, so a variance read shortly after the
    start is exact to about ``1e-7 / (1 - momentum^t)`` only.
  - ``mode="ema"`` (the default, Equinox's ``"legacy"``, here without its
    warning): ``ema_state_index`` holds the moving averages seeded with the
    first batch's statistics (``ema_first_time_index`` is True until then), and
    inference reads them as they are (before the first update, as mean 0 and
    variance 1, not Equinox's uninitialized buffers). Equinox normalizes each
    training step with the moving average that includes this batch (Equinox
    issue #659), which scales the gradient through the statistics by ``1 -
    momentum``; here training normalizes with the batch's own statistics,
    as ``mode="batch"`` and every other library do.

  Then come jaxbn's variants (see ``jaxbn.batch_norm`` for their math), as
  keyword-only constructor arguments, off by default:

  - ``unbiased_var``: fold the unbiased batch variance into the running one,
    as PyTorch does (``n`` counts every entry along ``axis_name``).
  - ``skip_nonfinite``: leave the state unchanged (counter and first-time flag
    included) after a batch whose statistics are not all finite.
  - ``activation``: None, ``"relu"`` or ``"leaky_relu"``, fused with the
    normalization and applied after the call's ``residual``;
    ``negative_slope`` is the slope of ``"leaky_relu"`` for negative inputs.
  - ``inplace``: the In-Place ABN backward pass, which keeps the output
    instead of the input (an invertible activation and nonzero weights).
  - ``renorm``: None, or a ``jaxbn.Renorm`` of Python floats or schedules for
    Batch Renormalization, with ``mode="ema"``: the statistics then follow
    Keras's ``renorm=True`` (``var`` derived from a moving standard deviation),
    seeded with the first batch, and a further ``StateIndex``
    (``renorm_state_index``) holds ``(count, std, renorm_mean, renorm_std)``.
    ``mode="batch"`` stores plain moving averages, which renorm's moving
    standard deviation is not, so it refuses ``renorm``.

  The call also takes ``residual=`` (an array of the shape of ``x`` added
  before the activation) and ``mask=`` (a boolean broadcastable to ``x``,
  e.g. one per example: entries where it is False do not count towards the
  batch statistics). Ghost batches (``virtual_batch_size``) are not offered:
  they split an array axis of the batch, and here the batch is the named axis
  of a vmap.

  The output has the dtype of ``x`` promoted with ``weight`` (``x``'s own
  without ``channelwise_affine``); the statistics are reduced in at least
  float32.

  Raises:
    NameError: in training, outside a ``vmap``/``pmap`` that binds
      ``axis_name``, as Equinox's class.
    ValueError, TypeError: for settings and inputs that ``jaxbn.batch_norm``
      refuses, naming the argument (most at construction).

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
    ...     3, "batch", momentum=0.9, mode="batch")
    >>> train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> x = jnp.arange(12.0).reshape(4, 3)  # 4 examples of 3 channels
    >>> y, state = train(x, state)
    >>> mean, var = bn.running_stats(state)  # one step: the batch's variance, 11.25
    >>> var.round(4)  # (Equinox's class reads (0.9 + 0.1 * 11.25) / (1 - 0.9) = 20.25)
    Array([11.25, 11.25, 11.25], dtype=float32)
    >>> y, state = eqx.nn.inference_mode(bn)(x[0], state)  # one example, no vmap

    A fused ``relu(bn(x) + shortcut)``:

    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
    ...     3, "batch", mode="batch", activation="relu")
    >>> y, state = jax.vmap(
    ...     lambda x: bn(x, state, residual=x), axis_name="batch", out_axes=(0, None))(x)
  """

  unbiased_var: bool = eqx.field(static=True)
  skip_nonfinite: bool = eqx.field(static=True)
  activation: _activation.Activation = eqx.field(static=True)
  negative_slope: float = eqx.field(static=True)
  inplace: bool = eqx.field(static=True)
  renorm: Renorm | None = eqx.field(static=True)
  renorm_state_index: eqx.nn.StateIndex | None

  def __init__(
      self,
      input_size: int,
      axis_name: Hashable | Sequence[Hashable],
      eps: float = 1e-5,
      channelwise_affine: bool = True,
      momentum: float = 0.99,
      inference: bool = False,
      dtype=None,
      mode: Literal["ema", "batch", "legacy"] = "legacy",
      *,
      unbiased_var: bool = False,
      skip_nonfinite: bool = False,
      activation: _activation.Activation = None,
      negative_slope: float = 0.01,
      inplace: bool = False,
      renorm: Renorm | None = None,
  ):
    """Arguments as ``equinox.nn.BatchNorm``, then the variants (see the class docstring).

    Raises:
      ValueError: if ``mode`` is unknown, ``input_size`` is not a positive int,
        ``momentum`` lies outside [0, 1], ``eps`` is negative, a variant
        setting is invalid (as in ``jaxbn.batch_norm``), or ``renorm`` comes
        with ``mode="batch"``.
      TypeError: if a flag is not a Python bool or ``renorm`` not a ``Renorm``.
    """
    if mode == "legacy":  # Equinox's default: "ema", which trains well here (no warning)
      mode = "ema"
    if isinstance(input_size, bool) or not isinstance(input_size, Integral) or input_size < 1:
      raise ValueError(f"`input_size` must be a positive int, got {input_size!r}.")
    super().__init__(
        input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, mode
    )
    settings = dict(
        unbiased_var=unbiased_var, skip_nonfinite=skip_nonfinite, activation=activation,
        negative_slope=negative_slope, inplace=inplace, renorm=renorm,
    )
    _check_settings(self.mode, momentum, eps, **settings)
    for name, value in settings.items():
      setattr(self, name, value)
    self.renorm_state_index = None
    if renorm is not None:  # in the dtype of the moving averages, at least float32
      initial = _renorm.init_renorm_state(input_size, self.ema_state_index.init[0].dtype)
      self.renorm_state_index = eqx.nn.StateIndex(
          (initial.count, initial.std, initial.renorm_mean, initial.renorm_std)
      )

  def __call__(
      self,
      x: jax.Array,
      state: eqx.nn.State,
      *,
      key=None,
      inference: bool | None = None,
      residual: jax.Array | None = None,
      mask: jax.Array | None = None,
  ) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example ``x`` and returns ``(y, state)``.

    Args:
      x: one example, of shape ``(input_size, *spatial)``.
      state: the ``eqx.nn.State`` holding the running statistics.
      key: ignored, as in Equinox.
      inference: overrides ``self.inference`` when a Python bool: True
        normalizes with the running statistics and returns ``state``
        unchanged; False with the batch's and updates them.
      residual: optional array of the shape of ``x`` added to the normalized
        input before the ``activation`` (a ResNet shortcut).
      mask: optional boolean array broadcastable to ``x`` (a scalar drops the
        whole example); entries where it is False do not count towards the
        batch statistics.

    Returns:
      ``(y, state)``: ``y`` of the shape of ``x``, and the updated state.

    Raises:
      NameError: in training, if no enclosing map binds ``axis_name``.
      ValueError: if ``x`` does not have ``input_size`` channels on axis 0, or
        as ``jaxbn.batch_norm`` for ``residual`` and ``mask``; or a variant
        comes with a complex input (handed to Equinox's implementation).
      TypeError: if ``inference`` is not a Python bool, or ``x`` is not a
        floating-point array.
    """
    del key
    if inference is None:
      inference = self.inference
    if not isinstance(inference, bool | np.bool_):
      raise TypeError(
          f"`inference` must be a Python bool or None (then `self.inference` decides), got "
          f"{inference!r}; it selects the computation at trace time: switch it with "
          "`eqx.nn.inference_mode(model)` rather than passing an array."
      )
    inference = bool(inference)
    if self._is_complex(x, state):
      self._check_no_variant(x, residual, mask)
      return super().__call__(x, state, inference=inference)
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] != self.input_size:
      raise ValueError(
          f"BatchNorm(input_size={self.input_size}) takes one example of shape "
          f"({self.input_size}, *spatial), channels first, got `x` of shape {x.shape}; call "
          f"it inside `jax.vmap(bn, axis_name={self.axis_name!r}, in_axes=(0, None), "
          "out_axes=(0, None))` for a batch."
      )
    if self.weight is not None:  # the output's dtype, as Equinox's `x * weight + bias`
      with jax.numpy_dtype_promotion("standard"):
        x = x.astype(jnp.promote_types(x.dtype, self.weight.dtype))
    with jax.named_scope("jaxbn.equinox.BatchNorm"):
      running, momentum = self._running_state(state, inference)
      y, new = _core.batch_norm(
          x,
          running,
          self.weight,
          self.bias,
          training=not inference,
          axis=0,
          momentum=momentum,
          epsilon=self.eps,
          mask=mask,
          axis_name=None if inference else _axis_name(self.axis_name),
          residual=residual,
          **{name: getattr(self, name) for name in VARIANT_SETTINGS},
      )
      if not inference:
        state = self._write(state, running, new)
    return y, state

  def running_stats(self, state: eqx.nn.State) -> tuple[jax.Array, jax.Array]:
    """The mean and variance inference normalizes with, read from ``state``.

    With ``mode="batch"`` the zero-debiased moving averages (see the class
    docstring), in at least float32; with ``mode="ema"`` the stored ones (0
    and 1 before the first update). Leaves ``state`` valid.
    """
    running, _ = self._running_state(state, inference=True)
    return running.mean, running.var

  def _running_state(self, state, inference):
    """The ``batch_norm`` state that ``state`` stores, in at least float32, and the momentum.

    ``mode="batch"``: the moving averages as stored for training, read
    zero-debiased for inference. ``mode="ema"``: the stored averages, or mean 0
    and variance 1 before the first update, which then takes momentum 0 (it
    stores the batch's statistics). With renorm, its statistics follow.
    """
    if self.mode == "batch":
      count = state.get(self.batch_counter)
      mean, var = _at_least_float32(state.get(self.batch_state_index))
      momentum = jnp.asarray(self.momentum, mean.dtype)
      if inference:
        mean = _zero_debiased(mean, 0.0, count, momentum)
        var = jnp.maximum(_zero_debiased(var, 1.0, count, momentum), 0)  # clamp the rounding
      return BatchNormState(mean, var, count), momentum
    first_time = state.get(self.ema_first_time_index)
    mean, var = _at_least_float32(state.get(self.ema_state_index))
    mean, var = jnp.where(first_time, 0, mean), jnp.where(first_time, 1, var)
    momentum = jnp.where(first_time, 0, jnp.asarray(self.momentum, mean.dtype))
    if self.renorm is None:
      return BatchNormState(mean, var, jnp.zeros((), jnp.int32)), momentum
    count, *stds = state.get(self.renorm_state_index)
    return RenormState(mean, var, count, *_at_least_float32(stds)), momentum

  def _write(self, state, running, new):
    """``state`` holding ``new``, in the stored dtypes; an update that was skipped counts not."""
    updated = new.count != running.count
    if self.mode == "batch":
      counter = state.get(self.batch_counter)  # weakly typed, as Equinox made it
      state = state.set(self.batch_counter, jnp.where(updated, counter + 1, counter))
      return _set(state, self.batch_state_index, (new.mean, new.var))
    first_time = state.get(self.ema_first_time_index)
    state = state.set(self.ema_first_time_index, first_time & ~updated)
    state = _set(state, self.ema_state_index, (new.mean, new.var))
    if self.renorm is not None:
      state = _set(
          state, self.renorm_state_index, (new.count, new.std, new.renorm_mean, new.renorm_std)
      )
    return state

  def _is_complex(self, x, state) -> bool:
    stored = self.batch_state_index if self.mode == "batch" else self.ema_state_index
    values = (x, self.weight, *state.get(stored))
    return any(v is not None and jnp.iscomplexobj(v) for v in values)

  def _check_no_variant(self, x, residual, mask) -> None:
    """Complex inputs go to Equinox's implementation, which has none of jaxbn's variants."""
    settings = {name: getattr(self, name) for name in VARIANT_SETTINGS}
    calls = {"residual": residual, "mask": mask}
    requested = [f"`{name}`" for name, v in settings.items() if v != _modules._DEFAULTS[name]]
    requested += [f"`{name}`" for name, value in calls.items() if value is not None]
    if requested:
      raise ValueError(
          f"BatchNorm got a complex input or parameters (dtype {jnp.result_type(x)}), which "
          f"jaxbn hands to Equinox's implementation, but that has none of jaxbn's variants, "
          f"and {', '.join(requested)} asked for one; normalize the real and imaginary parts "
          "as separate channels, or leave out those settings."
      )


def _check_settings(
    mode, momentum, eps, unbiased_var, skip_nonfinite, activation, negative_slope, inplace,
    renorm,
) -> None:
  """``batch_norm``'s checks of the static settings, at construction."""
  if isinstance(momentum, bool) or not isinstance(momentum, Real):
    raise TypeError(f"`momentum` must be a Python float in [0, 1], got {momentum!r}.")
  if isinstance(eps, bool) or not isinstance(eps, Real):
    raise TypeError(f"`eps` must be a Python float >= 0, got {eps!r}.")
  _validation.check_fraction(eps, "eps", 0.0, math.inf)
  # Warns on a PyTorch-style momentum, which weighs the new value.
  _core._check_averaging(momentum, "ema", unbiased_var, True, skip_nonfinite, stacklevel=6)
  _activation.check(activation, negative_slope, None, ())
  if not isinstance(inplace, bool):
    raise TypeError(f"`inplace` must be a Python bool, got {inplace!r}.")
  if inplace:
    _inplace.check(activation, negative_slope, "fused")
  if renorm is None:
    return
  _renorm.check(renorm, _renorm.init_renorm_state(1))
  if mode != "ema":
    raise ValueError(
        "`renorm` needs mode='ema': batch renormalization keeps Keras's moving averages of "
        "the mean and of the standard deviation, and mode='batch' stores zero-debiased "
        "averages of the mean and variance that cannot hold them."
    )


def _zero_debiased(hidden, initial, count, momentum):
  """``(h_t - m^t h_0) / (1 - m^t)``: the moving average ``h_t`` started at ``h_0``, debiased.

  ``h_t = m^t h_0 + (1 - m) sum_i m^(t - i) s_i`` weighs the ``t`` values
  ``s_i`` with weights summing to ``1 - m^t``; the result is their average
  with those weights. Before any update (``t = 0``), and at ``m = 1`` where
  nothing moves, it is ``h_t`` itself.
  """
  decayed = momentum ** count.astype(hidden.dtype)
  weight = 1 - decayed
  safe = jnp.where(weight > 0, weight, 1)
  return jnp.where(weight > 0, (hidden - decayed * initial) / safe, hidden)


def _at_least_float32(values):
  return tuple(v.astype(_stats.compute_dtype(v.dtype)) for v in values)


def _set(state, index, values):
  """``state.set(index, values)`` with each value in the dtype stored there."""
  stored = state.get(index)
  return state.set(index, tuple(v.astype(s.dtype) for v, s in zip(values, stored, strict=True)))


def _axis_name(axis_name):
  """Equinox takes a sequence of names (a list too); JAX's collectives take a tuple."""
  if isinstance(axis_name, Sequence) and not isinstance(axis_name, str):
    return tuple(axis_name)
  return axis_name


__all__ = ["BatchNorm"]
