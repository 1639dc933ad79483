"""Porting batch norm from and to PyTorch and Keras, conventions included.

Every library normalizes the same way, ``y = (x - mean) / sqrt(var + epsilon)
* scale + bias`` (Ioffe & Szegedy, 2015), and every library stores the mean and
variance it uses in inference as they are, so converting weights never changes
a value. What differs is the bookkeeping of training, and each difference
silently breaks a port that misses it:

=========  ==================================  =======  ===============  ========
library    ``momentum`` weighs                 epsilon  stored variance  features
=========  ==================================  =======  ===============  ========
jaxbn      the old value (0.99)                1e-5     biased           axis=-1
Flax       the old value (0.99)                1e-5     biased           axis=-1
Keras 3    the old value (0.99)                1e-3     biased           axis=-1
PyTorch    the new batch (0.1); None: average  1e-5     unbiased         dim 1
=========  ==================================  =======  ===============  ========

PyTorch's ``momentum=0.1`` is jaxbn's ``momentum=0.9``; its ``momentum=None``
is the cumulative average (``averaging="cumulative"``); and it folds the
unbiased batch variance ``var * n / (n - 1)`` into the running variance
(``unbiased_var=True``) while normalizing the batch with the biased one.

- ``preset`` turns a library's own settings into keyword arguments of
  ``jaxbn.batch_norm`` that reproduce its training-mode update exactly.
- ``from_torch``/``to_torch`` and ``from_keras``/``to_keras`` convert one
  layer: weights, running statistics and settings, as a ``Layer``.
- ``torch_to_linen`` moves every batch-norm layer of a PyTorch ``state_dict``
  into the variables of a Flax model, matching layers by name.

Nothing is guessed: a missing or unexpected key, per-channel arrays whose
shapes disagree, a layout that does not fit the declared feature axes, or a
non-finite statistic raise a ``ValueError`` that names the layer and the key.
PyTorch is imported only by ``to_torch``; Keras never is.
"""

import math
import re
from collections.abc import Mapping
from numbers import Real
from typing import Any, Literal, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _validation
from jaxbn._state import BatchNormState

Library = Literal["torch", "keras", "flax"]
LIBRARIES = ("torch", "keras", "flax")


class Settings(TypedDict, total=False):
  """Keyword arguments of ``jaxbn.batch_norm`` that fix a library's conventions.

  A key that is absent takes ``jaxbn.batch_norm``'s default.
  """

  axis: int | tuple[int, ...]  # the feature axis or axes of the input.
  momentum: float  # the weight of the old running value (jaxbn's direction).
  epsilon: float
  averaging: Literal["ema", "cumulative"]
  unbiased_var: bool  # fold var * n / (n - 1) into the running variance.


class Layer(NamedTuple):
  """One batch-norm layer in jaxbn's terms.

  The fields plug straight into ``jaxbn.batch_norm``::

      y, state = jaxbn.batch_norm(x, layer.state, **layer.params,
                                  training=True, **layer.settings)

  and ``params`` has the names and shapes of ``jaxbn.linen.BatchNorm``'s
  ``params`` collection.
  """

  params: dict[str, jax.Array]  # "scale" and "bias", each [C], when the layer has them.
  state: BatchNormState  # running mean and variance [C] (float32 or wider), count [].
  settings: Settings


class _LibraryDefault:
  """Marks an argument that takes the library's own default."""

  def __repr__(self) -> str:
    return "<library default>"


_DEFAULT: Any = _LibraryDefault()

# Each library's defaults, in its own conventions: (momentum, epsilon, axis).
_DEFAULTS = {
    "torch": (0.1, 1e-5, 1),
    "keras": (0.99, 1e-3, -1),
    "flax": (0.99, 1e-5, -1),
}


def preset(
    library: Library,
    *,
    momentum: float | None = _DEFAULT,
    epsilon: float = _DEFAULT,
    axis: _validation.Axis = _DEFAULT,
) -> Settings:
  """Settings that make ``jaxbn.batch_norm`` update like ``library`` does.

  ``momentum`` and ``epsilon`` are given in the library's own convention, as
  they appear in its layer; ``axis`` is the feature axis of the input that
  jaxbn will see. The result, for ``jaxbn.batch_norm(..., **settings)``:

  =========  ===========================  =======  ============  ============  =====
  library    ``momentum``                 epsilon  averaging     unbiased_var  axis
  =========  ===========================  =======  ============  ============  =====
  ``torch``  ``1 - momentum`` (0.9)       1e-5     ``"ema"``     True          1
  ``torch``  ``momentum=None``: absent    1e-5     cumulative    True          1
  ``keras``  ``momentum`` (0.99)          1e-3     ``"ema"``     False         -1
  ``flax``   ``momentum`` (0.99)          1e-5     ``"ema"``     False         -1
  =========  ===========================  =======  ============  ============  =====

  With ``torch`` the running mean after a step is ``(1 - m) * old + m *
  batch_mean`` for PyTorch's ``m``, and the running variance folds in the
  unbiased ``batch_var * n / (n - 1)``; with ``momentum=None`` each step
  averages, ``old + (batch - old) / (count + 1)``, so ``state.count`` must
  carry PyTorch's ``num_batches_tracked`` (``from_torch`` does that).
  ``jaxbn.batch_norm`` warns when a float momentum below 0.5 reaches it with
  ``averaging="ema"``: ``preset("keras", momentum=0.1)`` is most likely a
  PyTorch momentum given to the wrong preset.

  Args:
    library: ``"torch"``, ``"keras"`` or ``"flax"``.
    momentum: the library's momentum; by default its own default (PyTorch
      0.1, Keras and Flax 0.99). ``None`` is valid for ``torch`` only.
    epsilon: added to the variance; by default the library's (1e-5, Keras
      1e-3).
    axis: the feature axis or axes of jaxbn's input; by default 1 for
      ``torch`` (NCHW inputs as PyTorch sees them) and -1 otherwise. Pass
      ``axis=-1`` when a PyTorch model is ported to NHWC inputs.

  Returns:
    A ``Settings`` dict with ``axis``, ``epsilon``, ``averaging``,
    ``unbiased_var`` and, unless averaging cumulatively, ``momentum``.

  Raises:
    ValueError: if ``library`` is unknown, ``momentum`` lies outside [0, 1],
      ``epsilon`` is negative, or ``momentum=None`` is given for a library
      other than ``torch``.

  Examples:
    >>> import jaxbn.interop
    >>> jaxbn.interop.preset("torch", momentum=0.1)
    {'axis': 1, 'epsilon': 1e-05, 'momentum': 0.9, 'averaging': 'ema', 'unbiased_var': True}
    >>> jaxbn.interop.preset("keras")
    {'axis': -1, 'epsilon': 0.001, 'momentum': 0.99, 'averaging': 'ema', 'unbiased_var': False}
  """
  if library not in LIBRARIES:
    raise ValueError(f"`library` must be one of {LIBRARIES}, got {library!r}.")
  default_momentum, default_epsilon, default_axis = _DEFAULTS[library]
  momentum = default_momentum if momentum is _DEFAULT else momentum
  epsilon = default_epsilon if epsilon is _DEFAULT else epsilon
  axis = default_axis if axis is _DEFAULT else axis
  _validation.check_fraction(epsilon, "epsilon", 0.0, math.inf)
  if momentum is None and library != "torch":
    raise ValueError(
        f"`momentum=None` (a cumulative average) is PyTorch's; {library} needs a "
        "momentum in [0, 1], the weight of the old running value."
    )
  if momentum is not None:
    _validation.check_fraction(momentum, "momentum", 0.0, 1.0)
  settings = Settings(axis=axis, epsilon=epsilon)
  if library != "torch":
    settings.update(momentum=momentum, averaging="ema", unbiased_var=False)
  elif momentum is None:
    settings.update(averaging="cumulative", unbiased_var=True)
  else:
    settings.update(momentum=_flip(momentum), averaging="ema", unbiased_var=True)
  return settings


def _flip(momentum):
  """``1 - momentum``: PyTorch's weight of the new batch <-> jaxbn's weight of the old value.

  Rounded to 12 decimals, far below float32's resolution, so that a round
  trip gives back the decimal one started from (``1 - (1 - 0.1)`` is not 0.1).
  """
  return round(1 - momentum, 12) if isinstance(momentum, Real) else 1 - momentum


# ----------------------------------------------------------------------------
# Host-side checks shared by the converters.


def _label(name: str | None) -> str:
  return "the batch-norm layer" if name is None else f"layer {name!r}"


def _host_array(value: Any) -> np.ndarray:
  """A NumPy copy of an array, a PyTorch tensor or a Keras variable.

  Always a copy: ``Tensor.numpy()`` shares the tensor's memory and JAX may
  alias host memory, so a converted state would follow PyTorch's in-place
  updates of its buffers.
  """
  if hasattr(value, "detach"):  # a torch.Tensor; torch itself is not imported.
    value = value.detach().cpu()
    try:
      return value.numpy().copy()
    except TypeError:  # NumPy has no bfloat16: go through float32, exactly.
      return value.float().numpy().astype(jnp.bfloat16)
  return np.asarray(value).copy()


def _check_keys(weights: Any, keys: tuple[str, ...], label: str) -> None:
  """Checks that ``weights`` is a mapping with exactly ``keys``."""
  if not isinstance(weights, Mapping):
    raise TypeError(
        f"{label}: the weights must be a mapping from names to arrays, got "
        f"{type(weights).__name__}."
    )
  for key in keys:
    if key not in weights:
      raise ValueError(
          f"{label}: key {key!r} is missing; expected the keys {list(keys)}, "
          f"got {sorted(weights)}."
      )
  unexpected = sorted(set(weights) - set(keys))
  if unexpected:
    raise ValueError(
        f"{label}: unexpected keys {unexpected}; expected exactly {list(keys)}: the "
        "keys of one layer, without a prefix, as its settings say it has."
    )


def _per_channel(
    weights: Mapping[str, Any], keys: tuple[str, ...], var_key: str, label: str
) -> dict[str, np.ndarray]:
  """Host arrays of ``keys``, checked to be finite float vectors of one length."""
  arrays = {key: _host_array(weights[key]) for key in keys}
  first = keys[0]
  for key, value in arrays.items():
    if value.ndim != 1:
      raise ValueError(
          f"{label}: key {key!r} has shape {value.shape}, a layout with "
          f"{value.ndim} axes, but batch norm over a single feature axis keeps "
          "one value per channel, of shape (C,)."
      )
    if value.shape != arrays[first].shape:
      raise ValueError(
          f"{label}: key {key!r} has shape {value.shape} but key {first!r} has "
          f"shape {arrays[first].shape}; every per-channel array must have the same."
      )
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{label}: key {key!r} must be floating point, got dtype {value.dtype}.")
    if not np.all(np.isfinite(value.astype(np.float64))):
      raise ValueError(f"{label}: key {key!r} holds non-finite values ({value}).")
  if np.any(arrays[var_key] < 0):
    raise ValueError(f"{label}: key {var_key!r} holds negative variances ({arrays[var_key]}).")
  return arrays


def _state(mean: np.ndarray, var: np.ndarray, count: int) -> BatchNormState:
  dtype = jnp.promote_types(jnp.result_type(mean, var), jnp.float32)
  return BatchNormState(jnp.asarray(mean, dtype), jnp.asarray(var, dtype), jnp.int32(count))


def _single_channel_axis(layer: Layer, library: str) -> tuple[int, ...]:
  """Checks ``layer`` has one feature axis, as ``library`` needs; returns ``(C,)``."""
  shape = tuple(jnp.shape(layer.state.mean))
  axis = layer.settings.get("axis", -1)
  n_axes = len(axis) if isinstance(axis, tuple | list) else 1
  if len(shape) != 1 or n_axes != 1:
    raise ValueError(
        f"{library} normalizes over a single channel axis, but this layer has "
        f"`axis`={axis!r} and running statistics of shape {shape}; only layers "
        "with one feature axis (statistics of shape (C,)) convert."
    )
  for name, value in layer.params.items():
    if tuple(jnp.shape(value)) != shape:
      raise ValueError(
          f"params[{name!r}] has shape {jnp.shape(value)}, but the running "
          f"statistics have shape {shape}; they must agree."
      )
  return shape


# ----------------------------------------------------------------------------
# PyTorch.

_TORCH_STATS = ("running_mean", "running_var", "num_batches_tracked")
_TORCH_AFFINE = ("weight", "bias")
_TORCH_KEYS = _TORCH_AFFINE + _TORCH_STATS
_TORCH_AFFINE_TO_FLAX = (("weight", "scale"), ("bias", "bias"))


def _torch_arrays(state_dict: Any, affine: bool, label: str) -> tuple[dict[str, np.ndarray], int]:
  """Checked per-channel arrays of one PyTorch layer, and its ``num_batches_tracked``."""
  required = (_TORCH_AFFINE if affine else ()) + _TORCH_STATS
  _check_keys(state_dict, required, label)
  count = _host_array(state_dict["num_batches_tracked"])
  if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer) or count < 0:
    raise ValueError(
        f"{label}: key 'num_batches_tracked' must be a non-negative integer scalar, "
        f"got {count!r} of shape {count.shape}."
    )
  keys = tuple(k for k in required if k != "num_batches_tracked")
  return _per_channel(state_dict, keys, "running_var", label), int(count)


def from_torch(
    state_dict: Mapping[str, Any],
    *,
    eps: float,
    momentum: float | None,
    affine: bool = True,
    axis: _validation.Axis = 1,
    name: str | None = None,
) -> Layer:
  """Converts one PyTorch ``BatchNorm{1,2,3}d`` (or ``SyncBatchNorm``) layer.

  ``eps`` and ``momentum`` are attributes of the PyTorch module, not part of
  its state dict, and must be given: ``from_torch(bn.state_dict(),
  eps=bn.eps, momentum=bn.momentum)``. The values are carried over unchanged
  (``weight`` -> ``scale``, ``bias`` -> ``bias``, ``running_mean`` ->
  ``state.mean``, ``running_var`` -> ``state.var``, ``num_batches_tracked`` ->
  ``state.count``); the conventions go into ``settings``, which are
  ``preset("torch", momentum=momentum, epsilon=eps, axis=axis)``.

  Args:
    state_dict: the layer's ``state_dict()``: ``weight`` and ``bias`` (when
      ``affine``), ``running_mean``, ``running_var`` (each of shape ``(C,)``)
      and ``num_batches_tracked`` (an integer scalar). Tensors, NumPy or JAX
      arrays.
    eps: the module's ``eps``.
    momentum: the module's ``momentum`` (weight of the new batch) or ``None``.
    affine: the module's ``affine``: whether ``weight`` and ``bias`` exist.
    axis: the feature axis of the inputs jaxbn will see: 1 for NCHW (as in
      PyTorch), -1 once the model takes NHWC inputs.
    name: the layer's name, used in error messages.

  Returns:
    A ``Layer``: params ``{"scale", "bias"}`` in the tensors' dtype (none when
    not ``affine``), the running state in float32 or wider, and the settings.

  Raises:
    TypeError: if ``state_dict`` is not a mapping.
    ValueError: naming the layer and the key, if a key is missing or
      unexpected, an array is not of shape ``(C,)`` or disagrees with the
      others, a value is not finite, or a variance is negative; and if
      ``eps`` or ``momentum`` are out of range.

  Examples:
    >>> import torch, jax.numpy as jnp, jaxbn, jaxbn.interop
    >>> bn = torch.nn.BatchNorm2d(3)
    >>> layer = jaxbn.interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum)
    >>> y, state = jaxbn.batch_norm(
    ...     jnp.ones((2, 3, 4, 4)), layer.state, **layer.params, training=False, **layer.settings)
  """
  settings = preset("torch", momentum=momentum, epsilon=eps, axis=axis)
  arrays, count = _torch_arrays(state_dict, affine, _label(name))
  params = (
      {"scale": jnp.asarray(arrays["weight"]), "bias": jnp.asarray(arrays["bias"])}
      if affine
      else {}
  )
  return Layer(params, _state(arrays["running_mean"], arrays["running_var"], count), settings)


def to_torch(layer: Layer) -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a layer to a PyTorch state dict and the arguments of its module.

  The inverse of ``from_torch``::

      state_dict, kwargs = to_torch(layer)
      bn = torch.nn.BatchNorm2d(**kwargs)
      bn.load_state_dict(state_dict)

  Values are carried over unchanged. ``momentum`` is turned around (jaxbn's
  0.9 is PyTorch's 0.1) and ``averaging="cumulative"`` becomes
  ``momentum=None``. A layer that has only one of ``scale`` and ``bias`` gets
  the other as ones or zeros, which is exact. PyTorch always folds the
  unbiased variance into its running variance: a layer trained with
  ``unbiased_var=False`` converts exactly, and further training in PyTorch
  then follows PyTorch's rule.

  Args:
    layer: a ``Layer``, e.g. from ``from_torch`` or built from a model's
      variables with ``settings=preset("flax", momentum=...)``.

  Returns:
    ``(state_dict, kwargs)``: ``weight``, ``bias`` (when the layer has
    params), ``running_mean``, ``running_var`` and ``num_batches_tracked`` as
    CPU tensors; and ``num_features``, ``eps``, ``momentum``, ``affine`` for
    the module's constructor.

  Raises:
    ValueError: if the layer has more than one feature axis, its arrays
      disagree in shape, or it averages with ``"debiased_ema"``, which PyTorch
      cannot express.
  """
  import torch

  (channels,) = _single_channel_axis(layer, "PyTorch")
  settings = layer.settings
  averaging = settings.get("averaging", "ema")
  if averaging == "cumulative":
    momentum = None
  elif averaging == "ema":
    momentum = _flip(float(settings.get("momentum", 0.99)))
  else:
    raise ValueError(
        f"PyTorch's running averages are an exponential moving average or a cumulative "
        f"one; `averaging`={averaging!r} has no PyTorch equivalent."
    )

  def tensor(value):
    value = np.asarray(value)
    if value.dtype == jnp.bfloat16:
      return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(value.copy())

  state_dict = {}
  affine = bool(layer.params)
  if affine:
    dtype = jnp.result_type(*layer.params.values())
    state_dict["weight"] = tensor(layer.params.get("scale", np.ones(channels, dtype)))
    state_dict["bias"] = tensor(layer.params.get("bias", np.zeros(channels, dtype)))
  state_dict["running_mean"] = tensor(layer.state.mean)
  state_dict["running_var"] = tensor(layer.state.var)
  state_dict["num_batches_tracked"] = torch.tensor(int(layer.state.count), dtype=torch.long)
  kwargs = {
      "num_features": channels,
      "eps": float(settings.get("epsilon", 1e-5)),
      "momentum": momentum,
      "affine": affine,
  }
  return state_dict, kwargs


# ----------------------------------------------------------------------------
# Keras.

_KERAS_STATS = ("moving_mean", "moving_variance")


def from_keras(
    weights: Mapping[str, Any],
    *,
    epsilon: float,
    momentum: float,
    axis: int,
    center: bool = True,
    scale: bool = True,
    name: str | None = None,
) -> Layer:
  """Converts one Keras ``BatchNormalization`` layer.

  ``epsilon``, ``momentum`` and ``axis`` are the layer's attributes and must
  be given; with Keras 3::

      weights = {v.name: v for v in bn.weights}
      layer = from_keras(weights, epsilon=bn.epsilon, momentum=bn.momentum, axis=bn.axis,
                         center=bn.center, scale=bn.scale)

  Keras and jaxbn share the momentum direction and the biased stored
  variance, and Keras's ``axis`` (the feature axis, counted with the batch
  axis) is jaxbn's ``axis``; the settings are ``preset("keras",
  momentum=momentum, epsilon=epsilon, axis=axis)``. Keras keeps no update
  count: ``state.count`` is 0.

  Args:
    weights: ``gamma`` (when ``scale``), ``beta`` (when ``center``),
      ``moving_mean`` and ``moving_variance``, each of shape ``(C,)``.
    epsilon: the layer's ``epsilon`` (Keras's default is 1e-3).
    momentum: the layer's ``momentum`` (weight of the old value, 0.99).
    axis: the layer's ``axis``.
    center: the layer's ``center``: whether ``beta`` exists.
    scale: the layer's ``scale``: whether ``gamma`` exists.
    name: the layer's name, used in error messages.

  Returns:
    A ``Layer`` with params ``scale`` (from ``gamma``) and ``bias`` (from
    ``beta``) as present, the running state and the settings.

  Raises:
    TypeError: if ``weights`` is not a mapping.
    ValueError: naming the layer and the key, if a key is missing or
      unexpected, an array is not of shape ``(C,)`` or disagrees with the
      others, a value is not finite, or a variance is negative; and if
      ``axis`` is not an int, or ``epsilon`` or ``momentum`` are out of range.
  """
  if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
    raise ValueError(
        f"Keras's `axis` is a single int (the feature axis), got {axis!r}."
    )
  settings = preset("keras", momentum=momentum, epsilon=epsilon, axis=int(axis))
  label = _label(name)
  required = ("gamma",) * scale + ("beta",) * center + _KERAS_STATS
  _check_keys(weights, required, label)
  arrays = _per_channel(weights, required, "moving_variance", label)
  params = {
      param: jnp.asarray(arrays[key])
      for param, key in (("scale", "gamma"), ("bias", "beta"))
      if key in arrays
  }
  return Layer(params, _state(arrays["moving_mean"], arrays["moving_variance"], 0), settings)


def to_keras(layer: Layer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Converts a layer to Keras weights and the arguments of its layer.

  The inverse of ``from_keras``::

      weights, kwargs = to_keras(layer)
      bn = keras.layers.BatchNormalization(**kwargs)
      bn.build(input_shape)
      for v in bn.weights:
        v.assign(weights[v.name])

  Values are carried over unchanged. Keras always folds the biased variance
  into its running variance: a layer trained with ``unbiased_var=True``
  converts exactly, and further training in Keras then follows Keras's rule.

  Args:
    layer: a ``Layer``.

  Returns:
    ``(weights, kwargs)``: ``gamma`` and ``beta`` (as the layer has
    ``scale`` and ``bias``), ``moving_mean`` and ``moving_variance`` as NumPy
    arrays; and ``axis``, ``momentum``, ``epsilon``, ``center``, ``scale`` for
    the layer's constructor.

  Raises:
    ValueError: if the layer has more than one feature axis, its arrays
      disagree in shape, or it does not average with ``"ema"``: Keras has
      neither a cumulative nor a debiased average.
  """
  _single_channel_axis(layer, "Keras")
  settings = layer.settings
  averaging = settings.get("averaging", "ema")
  if averaging != "ema":
    raise ValueError(
        f"Keras's running averages are exponential moving averages; `averaging`="
        f"{averaging!r} has no Keras equivalent. Choose a momentum, e.g. "
        "`layer._replace(settings=preset('keras', momentum=0.99))`."
    )
  axis = settings.get("axis", -1)
  weights = {}
  for param, key in (("scale", "gamma"), ("bias", "beta")):
    if param in layer.params:
      weights[key] = np.asarray(layer.params[param])
  weights["moving_mean"] = np.asarray(layer.state.mean)
  weights["moving_variance"] = np.asarray(layer.state.var)
  kwargs = {
      "axis": axis[0] if isinstance(axis, tuple | list) else axis,
      "momentum": float(settings.get("momentum", 0.99)),
      "epsilon": float(settings.get("epsilon", 1e-5)),
      "center": "bias" in layer.params,
      "scale": "scale" in layer.params,
  }
  return weights, kwargs


# ----------------------------------------------------------------------------
# Whole PyTorch models into Flax linen variables.


class Unmapped(NamedTuple):
  """The batch-norm layers ``torch_to_linen`` could not pair, on each side."""

  torch: tuple[str, ...]  # PyTorch layer prefixes, e.g. "layer1.0.bn1".
  flax: tuple[str, ...]  # Flax module paths, e.g. "layer1_0/bn1".


def _canonical(name: str) -> tuple[str, ...]:
  """``'layer1.0.bn1'``, ``'layer1_0/bn1'`` and ``'layer1/0/bn1'`` all give the same key."""
  return tuple(re.split(r"[./_]", name))


def _torch_layers(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The batch-norm layers of a state dict (those with a running mean), by prefix."""
  layers = {}
  for key in state_dict:
    if key == "running_mean" or key.endswith(".running_mean"):
      prefix = key[: -len("running_mean")].rstrip(".")
      dot = f"{prefix}." if prefix else ""
      layers[prefix] = {k: state_dict[dot + k] for k in _TORCH_KEYS if dot + k in state_dict}
  return layers


def _flax_layers(batch_stats: Mapping[str, Any], path: tuple[str, ...] = ()):
  """Paths of the batch-norm layers (``mean`` and ``var`` leaves) in a ``batch_stats`` tree."""
  if not isinstance(batch_stats.get("mean", {}), Mapping) and "var" in batch_stats:
    yield path
  for key, value in batch_stats.items():
    if isinstance(value, Mapping):
      yield from _flax_layers(value, path + (key,))


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any]:
  for key in path:
    tree = tree.get(key, {})
  return tree


def _copy(tree: Any) -> Any:
  """Nested mappings as nested dicts; leaves shared."""
  if isinstance(tree, Mapping):
    return {key: _copy(value) for key, value in tree.items()}
  return tree


def _pair_by_name(torch_names, flax_paths, names):
  """Pairs explicitly named layers, then those whose canonical names match uniquely."""
  by_path = {"/".join(path): path for path in flax_paths}
  pairs = {}
  for torch_name, flax_name in (names or {}).items():
    if torch_name not in torch_names:
      raise ValueError(
          f"`names` maps {torch_name!r}, which is not a batch-norm layer of the state "
          f"dict; its batch-norm layers are {sorted(torch_names)}."
      )
    if flax_name not in by_path:
      raise ValueError(
          f"`names` maps {torch_name!r} to {flax_name!r}, which is not a batch-norm "
          f"layer of the Flax variables; those are {sorted(by_path)}."
      )
    if by_path[flax_name] in pairs.values():
      raise ValueError(f"`names` maps two PyTorch layers to the Flax layer {flax_name!r}.")
    pairs[torch_name] = by_path[flax_name]
  torch_by_key, flax_by_key = {}, {}
  for name in torch_names:
    if name not in pairs:
      torch_by_key.setdefault(_canonical(name), []).append(name)
  for path in flax_paths:
    if path not in pairs.values():
      flax_by_key.setdefault(_canonical("/".join(path)), []).append(path)
  for key, torch_group in torch_by_key.items():
    flax_group = flax_by_key.get(key, [])
    if len(torch_group) == 1 and len(flax_group) == 1:  # ambiguous names are never paired.
      pairs[torch_group[0]] = flax_group[0]
  unmapped = Unmapped(
      torch=tuple(sorted(n for n in torch_names if n not in pairs)),
      flax=tuple(sorted("/".join(p) for p in flax_paths if p not in pairs.values())),
  )
  return pairs, unmapped


def _place(value: np.ndarray, target: Any, label: str, key: str, flax_key: str):
  """``value`` as a JAX array of ``target``'s dtype, after checking the shapes agree."""
  shape, target_shape = value.shape, tuple(target.shape)
  if len(target_shape) != 1:
    raise ValueError(
        f"{label}: key {key!r} has shape {shape}, one value per channel, but the Flax "
        f"variable {flax_key!r} has shape {target_shape}: that layer's `axis` names "
        f"{len(target_shape)} feature axes. Give it a single feature axis."
    )
  if shape != target_shape:
    raise ValueError(
        f"{label}: key {key!r} has shape {shape}, but the Flax variable {flax_key!r} "
        f"has shape {target_shape}; the layers do not match."
    )
  return jnp.asarray(value, target.dtype)


def torch_to_linen(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    names: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], Unmapped]:
  """Copies every batch-norm layer of a PyTorch state dict into Flax variables.

  A PyTorch batch-norm layer is a prefix ``p`` with a key ``p.running_mean``;
  a Flax one is a module path whose ``batch_stats`` hold ``mean`` and ``var``
  (``jaxbn.linen.BatchNorm`` or ``flax.linen.BatchNorm``). A layer's
  ``weight``, ``bias``, ``running_mean`` and ``running_var`` go to
  ``params/scale``, ``params/bias``, ``batch_stats/mean`` and
  ``batch_stats/var``, cast to the dtypes of the Flax variables.

  Naming rule: a PyTorch prefix and a Flax path are paired when

  1. ``names`` maps the one to the other (the Flax path joined by ``/``,
     e.g. ``{"downsample.1": "shortcut_bn"}``); otherwise
  2. they are equal once ``.``, ``/`` and ``_`` are all read as the same
     separator: ``layer1.0.bn1`` pairs with ``layer1_0/bn1`` and with
     ``layer1/0/bn1``. Names that collide on one side under this rule are
     not paired.

  Layers left unpaired are returned, never guessed at. Keys of other layers
  (convolutions, linear layers) are left to the caller.

  The layers' settings are attributes of the Flax modules, not variables:
  build them with PyTorch's epsilon and with ``momentum = 1 - torch_momentum``
  (``jaxbn.linen.BatchNorm(momentum=0.9, epsilon=1e-5)`` for PyTorch's
  defaults). Flax keeps no update count: ``num_batches_tracked`` is checked
  and then dropped.

  Args:
    state_dict: a PyTorch model's ``state_dict()``.
    variables: the Flax model's variables, with collections ``params`` and
      ``batch_stats``: from ``model.init(key, x)``, or only their shapes from
      ``jax.eval_shape(model.init, key, x)`` when every leaf gets replaced.
    names: optional explicit pairs ``{torch_prefix: flax_path}``.

  Returns:
    ``(new_variables, unmapped)``: ``variables`` as nested dicts with the
    paired layers replaced, and an ``Unmapped`` of the PyTorch prefixes and
    Flax paths that were left alone.

  Raises:
    ValueError: naming the layer and the key, if a paired PyTorch layer lacks
      a key (``weight`` without ``bias``, or the reverse), has a key the Flax
      layer lacks (or the reverse), has arrays whose shapes disagree with each
      other or with the Flax variables (a Flax layer with several feature
      axes included); if ``names`` refers to a layer that does not exist; or
      if ``variables`` has no ``batch_stats`` collection.

  Examples:
    >>> import jax, jax.numpy as jnp, torch, jaxbn.interop, jaxbn.linen
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> state_dict = torch_model.state_dict()
    >>> bn = jaxbn.linen.BatchNorm(use_running_average=True, momentum=0.9)
    >>> variables = bn.init(jax.random.key(0), jnp.zeros((1, 3)))
    >>> _, unmapped = jaxbn.interop.torch_to_linen(state_dict, variables)
    >>> unmapped  # PyTorch's layer "1" and the Flax root "" do not match by name
    Unmapped(torch=('1',), flax=('',))
    >>> variables, unmapped = jaxbn.interop.torch_to_linen(state_dict, variables, names={"1": ""})
    >>> unmapped
    Unmapped(torch=(), flax=())
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}.")
  if not isinstance(variables, Mapping) or "batch_stats" not in variables:
    raise ValueError(
        "`variables` must hold the collections 'params' and 'batch_stats', as "
        "`model.init(key, x)` returns for a model with batch norm; got "
        f"{sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__}."
    )
  torch_layers = _torch_layers(state_dict)
  pairs, unmapped = _pair_by_name(
      torch_layers, list(_flax_layers(variables["batch_stats"])), names
  )
  new_variables = _copy(variables)
  for torch_name, path in pairs.items():
    layer = torch_layers[torch_name]
    label = f"layer {torch_name!r} (Flax {'/'.join(path)!r})"
    affine = any(key in layer for key in _TORCH_AFFINE)
    arrays, _ = _torch_arrays(layer, affine, label)
    params = _subtree(new_variables.get("params", {}), path)
    stats = _subtree(new_variables["batch_stats"], path)
    for key, flax_name in _TORCH_AFFINE_TO_FLAX:
      if (key in arrays) != (flax_name in params):
        has, lacks = ("PyTorch", "Flax") if key in arrays else ("Flax", "PyTorch")
        raise ValueError(
            f"{label}: the {has} layer has {key!r} (Flax {flax_name!r}) and the {lacks} one "
            "does not; match `affine` with `use_scale` and `use_bias`."
        )
      if key in arrays:
        params[flax_name] = _place(arrays[key], params[flax_name], label, key, flax_name)
    stats["mean"] = _place(arrays["running_mean"], stats["mean"], label, "running_mean", "mean")
    stats["var"] = _place(arrays["running_var"], stats["var"], label, "running_var", "var")
  return new_variables, unmapped


__all__ = [
    "Layer",
    "Settings",
    "Unmapped",
    "from_keras",
    "from_torch",
    "preset",
    "to_keras",
    "to_torch",
    "torch_to_linen",
]
