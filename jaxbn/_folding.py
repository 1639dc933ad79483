"""Folding a trained batch norm into the linear layer before it, for inference.

In inference batch norm is a fixed per-feature affine map, so after a Dense
or convolution layer ``h = W x + c`` it can be merged into the layer's kernel
and bias. With ``rstd = 1 / sqrt(var + epsilon)`` per output feature ``o``::

    BN(h) = (h - mean) * scale * rstd + offset
          = (W * (scale * rstd)[o]) x + ((c - mean) * scale * rstd + offset)

so ``W'[..., o, ...] = W[..., o, ...] * scale[o] * rstd[o]`` and
``c' = (c - mean) * scale * rstd + offset``: one layer, one pass, the same
outputs up to rounding. (Jacob et al., 2018, section 3.2, fold batch norm
before quantization.)
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn import _stats, _validation


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    *,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    offset: ArrayLike | None = None,
    epsilon: float = 1e-5,
    out_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
  """Returns the kernel and bias of ``BN(layer(x))`` as one layer (see the module docstring).

  Args:
    kernel: the layer's kernel; its output features lie along ``out_axis``:
      ``-1`` for Flax's ``Dense`` ``(in, out)`` and ``Conv`` ``(H, W, in, out)``
      (NHWC), ``0`` for PyTorch-style ``(out, in)`` and ``OIHW`` kernels (NCHW).
    bias: the layer's bias ``(out,)``, or None for a layer without one.
    mean: the batch norm's running mean ``(out,)``.
    var: its running (biased) variance ``(out,)``.
    scale: its scale (gamma) ``(out,)``, or None for 1.
    offset: its bias (beta) ``(out,)``, or None for 0.
    epsilon: the batch norm's epsilon.
    out_axis: the axis of ``kernel`` that holds the output features.

  Returns:
    ``(kernel, bias)``: the folded kernel, of the shape and dtype of
    ``kernel``, and the folded bias ``(out,)`` (the layer that uses them needs
    a bias, e.g. ``use_bias=True``). The arithmetic runs in at least float32.

  Raises:
    ValueError: if ``out_axis`` is out of range, a per-feature array does not
      have the shape ``(out,)``, or ``epsilon`` is negative.
    TypeError: if an array is not floating point.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> kernel, bias = jaxbn.fold_batch_norm(
    ...     jnp.ones((2, 1)), None, mean=jnp.array([1.0]), var=jnp.array([4.0]), epsilon=0.0)
    >>> kernel.ravel(), bias
    (Array([0.5, 0.5], dtype=float32), Array([-0.5], dtype=float32))
  """
  _validation.check_input(kernel, "kernel")
  kernel = jnp.asarray(kernel)
  (axis,) = _validation.canonicalize_axes(out_axis, kernel.ndim, "out_axis")
  features = (kernel.shape[axis],)
  for name, value in (("bias", bias), ("mean", mean), ("var", var), ("scale", scale),
                      ("offset", offset)):
    if value is not None and tuple(jnp.shape(value)) != features:
      raise ValueError(
          f"`{name}` has shape {tuple(jnp.shape(value))}, but the kernel of shape "
          f"{kernel.shape} has {features[0]} output features along `out_axis`={out_axis}; "
          f"`{name}` must have shape {features} (is `out_axis` right for this layout?)."
      )
    _validation.check_per_feature(value, features, name)
  _validation.check_fraction(epsilon, "epsilon", 0.0, float("inf"))
  dtype = _stats.compute_dtype(kernel.dtype)
  mean, var = (jnp.asarray(v, dtype) for v in (mean, var))
  mul = jax.lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * jnp.asarray(scale, dtype)
  new_bias = -mean if bias is None else jnp.asarray(bias, dtype) - mean
  new_bias = new_bias * mul
  if offset is not None:
    new_bias = new_bias + jnp.asarray(offset, dtype)
  shape = [1] * kernel.ndim
  shape[axis] = features[0]
  new_kernel = kernel.astype(dtype) * mul.reshape(shape)
  bias_dtype = kernel.dtype if bias is None else jnp.result_type(bias)
  return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_batch_norm_params(
    layer_params: dict[str, Any],
    bn_params: dict[str, Any],
    bn_stats: dict[str, Any],
    *,
    epsilon: float = 1e-5,
) -> dict[str, jax.Array]:
  """Folds a linen ``BatchNorm`` into the linen ``Dense`` or ``Conv`` before it.

  Flax kernels hold their output features last, in every layout.

  Args:
    layer_params: the layer's params, ``{"kernel": ..., "bias": ...}`` (no
      ``"bias"`` for ``use_bias=False``), e.g. ``variables["params"]["Conv_0"]``.
    bn_params: the batch norm's params, ``{"scale", "bias"}`` or a subset, e.g.
      ``variables["params"]["BatchNorm_0"]`` (``{}`` without scale and bias).
    bn_stats: its running statistics ``{"mean", "var"}``, e.g.
      ``variables["batch_stats"]["BatchNorm_0"]``.
    epsilon: the batch norm's epsilon (Flax's default is 1e-5).

  Returns:
    ``{"kernel", "bias"}``: the params of the same layer with
    ``use_bias=True``, which alone computes what the pair computed in
    inference.

  Raises:
    ValueError, TypeError: as ``fold_batch_norm``; KeyError if a required
    entry is missing.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
    >>> x = jnp.ones((2, 3))
    >>> model = nn.Sequential([nn.Dense(4, use_bias=False), nn.BatchNorm(True)])
    >>> v = model.init(jax.random.key(0), x)
    >>> folded = jaxbn.fold_batch_norm_params(
    ...     v["params"]["layers_0"], v["params"]["layers_1"], v["batch_stats"]["layers_1"])
    >>> y = nn.Dense(4).apply({"params": folded}, x)
  """
  kernel, bias = fold_batch_norm(
      layer_params["kernel"],
      layer_params.get("bias"),
      mean=bn_stats["mean"],
      var=bn_stats["var"],
      scale=bn_params.get("scale"),
      offset=bn_params.get("bias"),
      epsilon=epsilon,
      out_axis=-1,
  )
  return {"kernel": kernel, "bias": bias}
