"""Folding a trained batch norm into the preceding Dense or Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close
from jax import lax

import jaxbn
from jaxbn._folding import fold_batch_norm, fold_batch_norm_params


def _trained_bn(features, rng):
  """BN variables as training leaves them: statistics and affine params far from init."""
  return (
      {"scale": jnp.asarray(rng.uniform(0.5, 2, features) * rng.choice([-1, 1], features),
                            jnp.float32),
       "bias": jnp.asarray(rng.normal(0, 1, features), jnp.float32)},
      {"mean": jnp.asarray(rng.normal(0, 2, features), jnp.float32),
       "var": jnp.asarray(rng.uniform(0.1, 3, features), jnp.float32)},
  )


@pytest.mark.parametrize(("layer", "x_shape"), [
    (nn.Dense(5, use_bias=False), (4, 3)),
    (nn.Dense(5), (4, 3)),
    (nn.Conv(6, (3, 3), use_bias=False), (2, 7, 7, 3)),  # NHWC, HWIO kernel
    (nn.Conv(6, (3, 3), feature_group_count=3), (2, 7, 7, 3)),  # grouped, with a bias
], ids=["dense", "dense-bias", "conv-nhwc", "conv-grouped-bias"])
def test_linen_layer_and_batch_norm_fold_into_one_layer(layer, x_shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1, 2, x_shape), jnp.float32)
  model = nn.Sequential([layer, nn.BatchNorm(use_running_average=True, epsilon=1e-3)])
  variables = model.init(jax.random.key(0), x)
  features = variables["params"]["layers_0"]["kernel"].shape[-1]
  bn_params, bn_stats = _trained_bn(features, rng)
  params = {"layers_0": variables["params"]["layers_0"], "layers_1": bn_params}
  y = model.apply({"params": params, "batch_stats": {"layers_1": bn_stats}}, x)

  folded = fold_batch_norm_params(params["layers_0"], bn_params, bn_stats, epsilon=1e-3)
  y_folded = layer.clone(use_bias=True).apply({"params": folded}, x)
  assert_close(y_folded, np.asarray(y, np.float64), 2e-5)


def test_nchw_oihw_plain_arrays():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0, 1, (2, 4, 6, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(0, 0.3, (5, 4, 3, 3)), jnp.float32)  # OIHW
  bias = jnp.asarray(rng.normal(0, 1, 5), jnp.float32)
  bn_params, bn_stats = _trained_bn(5, rng)
  state = jaxbn.BatchNormState(bn_stats["mean"], bn_stats["var"], jnp.asarray(0, jnp.int32))

  def conv(x, kernel, bias):
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + bias[None, :, None, None]

  y, _ = jaxbn.batch_norm(conv(x, kernel, bias), state, bn_params["scale"], bn_params["bias"],
                          training=False, axis=1)
  new_kernel, new_bias = fold_batch_norm(kernel, bias, mean=state.mean, var=state.var,
                                         scale=bn_params["scale"], offset=bn_params["bias"],
                                         out_axis=0)
  assert new_kernel.shape == kernel.shape and new_kernel.dtype == kernel.dtype
  assert_close(conv(x, new_kernel, new_bias), np.asarray(y, np.float64), 2e-5)


def test_against_the_float64_formula():
  rng = np.random.default_rng(2)
  kernel = rng.normal(0, 1, (3, 4))
  mean, var, scale = rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4)
  k, b = fold_batch_norm(jnp.asarray(kernel, jnp.float32), None, mean=mean, var=var,
                         scale=scale, epsilon=1e-3)
  mul = scale / np.sqrt(var + 1e-3)
  assert_close(k, kernel * mul, 1e-6)
  assert_close(b, -mean * mul, 1e-6)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(mean=jnp.zeros(3)), ValueError,
     r"`mean` has shape \(3,\), but the kernel of shape \(3, 4\) has 4 output features along "
     r"`out_axis`=-1; `mean` must have shape \(4,\)"),
    (dict(out_axis=2), ValueError, r"`out_axis`=2 is out of range for an input of rank 2"),
    (dict(epsilon=-1.0), ValueError, r"`epsilon` must lie in \[0\.0, inf\], got -1\.0"),
    (dict(kernel=jnp.ones((3, 4), jnp.int32)), TypeError, r"`kernel` must be a floating-point"),
])
def test_bad_input(kwargs, error, match):
  args = dict(kernel=jnp.ones((3, 4)), mean=jnp.zeros(4), var=jnp.ones(4))
  args.update(kwargs)
  kernel = args.pop("kernel")
  with pytest.raises(error, match=match):
    fold_batch_norm(kernel, None, **args)
