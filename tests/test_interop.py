"""Porting: presets and converters checked against the real PyTorch and Keras.

Parity means: for several training steps and then in eval mode, the outputs,
the running statistics and the gradients of ``jaxbn.batch_norm`` with the
library's preset equal the library's to float32 rounding.
"""

import functools
import os

# Keras picks its backend once, at import; without this it imports TensorFlow.
os.environ["KERAS_BACKEND"] = "jax"

import _torch_models  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import jaxbn  # noqa: E402
from jaxbn import interop  # noqa: E402

STEPS = 3
# Two test workers share two cores: keep PyTorch from spawning a thread per core.
torch.set_num_threads(1)


def assert_f32_equal(actual, expected, err_msg=""):
  """Equal to float32 rounding: relative 1e-5 of the largest magnitude (about 100 ulps)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=err_msg)


def numpy(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


# --------------------------------------------------------------------------
# Conventions, pinned against the libraries' own defaults.


def test_presets_match_library_defaults():
  bn = torch.nn.BatchNorm2d(3)
  assert interop.preset("torch") == interop.preset("torch", momentum=bn.momentum, epsilon=bn.eps)
  # PyTorch's momentum weighs the new batch: its 0.1 is our 0.9.
  assert interop.preset("torch")["momentum"] == 0.9
  k = keras.layers.BatchNormalization()
  assert interop.preset("keras") == interop.preset(
      "keras", momentum=k.momentum, epsilon=k.epsilon, axis=k.axis
  )
  assert interop.preset("keras")["epsilon"] == 1e-3  # Keras's epsilon is not 1e-5.
  import flax.linen as nn

  f = nn.BatchNorm()
  assert interop.preset("flax") == interop.preset(
      "flax", momentum=f.momentum, epsilon=f.epsilon, axis=f.axis
  )


def test_preset_table():
  assert interop.preset("torch", momentum=0.1) == {
      "axis": 1, "epsilon": 1e-5, "momentum": 0.9, "averaging": "ema", "unbiased_var": True
  }
  assert interop.preset("torch", momentum=None, axis=-1) == {
      "axis": -1, "epsilon": 1e-5, "averaging": "cumulative", "unbiased_var": True
  }
  assert interop.preset("keras", momentum=0.9, axis=1) == {
      "axis": 1, "epsilon": 1e-3, "momentum": 0.9, "averaging": "ema", "unbiased_var": False
  }
  assert interop.preset("flax") == {
      "axis": -1, "epsilon": 1e-5, "momentum": 0.99, "averaging": "ema", "unbiased_var": False
  }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(library="pytorch"), "library"),
        (dict(library="keras", momentum=None), "momentum=None"),
        (dict(library="torch", momentum=1.5), "momentum"),
        (dict(library="flax", epsilon=-1.0), "epsilon"),
    ],
)
def test_preset_rejects_bad_settings(kwargs, match):
  library = kwargs.pop("library")
  with pytest.raises(ValueError, match=match):
    interop.preset(library, **kwargs)


def test_pytorch_style_momentum_in_keras_preset_warns():
  # A PyTorch momentum (0.1) given to a preset that weighs the old value.
  x = jnp.arange(8.0).reshape(4, 2)
  with pytest.warns(UserWarning, match="momentum"):
    jaxbn.batch_norm(x, jaxbn.init_state(2), training=True, **interop.preset("keras", momentum=0.1))


# --------------------------------------------------------------------------
# PyTorch parity.


def _randomize_torch(bn: torch.nn.Module, generator: torch.Generator) -> None:
  """Moves a fresh module away from its identity initialization."""
  c = bn.num_features
  with torch.no_grad():
    bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
    bn.bias.copy_(torch.randn(c, generator=generator))
    bn.running_mean.copy_(torch.randn(c, generator=generator))
    bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    bn.num_batches_tracked.fill_(2)


def _jaxbn_step(settings):
  """A jitted step: output, new state and gradients (d/dx, d/dparams) of <cotangent, y>."""

  @functools.partial(jax.jit, static_argnames="training")
  def step(x, params, state, cotangent, *, training):
    def f(x, params):
      return jaxbn.batch_norm(x, state, **params, training=training, **settings)

    y, vjp, new_state = jax.vjp(f, x, params, has_aux=True)
    dx, dparams = vjp(cotangent)
    return y, new_state, dx, dparams

  return step


@pytest.mark.parametrize(
    "module, shape",
    [
        (torch.nn.BatchNorm1d, (7, 3)),
        (torch.nn.BatchNorm1d, (4, 3, 5)),
        (torch.nn.BatchNorm2d, (4, 3, 5, 6)),
        (torch.nn.BatchNorm3d, (2, 3, 3, 4, 2)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_parity_train_then_eval(module, shape, momentum):
  generator = torch.Generator().manual_seed(0)
  bn = module(shape[1], momentum=momentum)
  _randomize_torch(bn, generator)
  layer = interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum)
  params, state = layer.params, layer.state
  jaxbn_step = _jaxbn_step(layer.settings)
  for step in range(STEPS + 1):
    training = step < STEPS
    bn.train(training)
    x = torch.randn(shape, generator=generator) * 3 + 2
    cotangent = torch.randn(shape, generator=generator)
    x.requires_grad_(True)
    bn.zero_grad()
    y_torch = bn(x)
    y_torch.backward(cotangent)
    y, state, dx, dparams = jaxbn_step(
        numpy(x), params, state, numpy(cotangent), training=training
    )
    where = f"step {step} ({'train' if training else 'eval'})"
    assert_f32_equal(y, numpy(y_torch), f"output, {where}")
    assert_f32_equal(state.mean, numpy(bn.running_mean), f"running mean, {where}")
    assert_f32_equal(state.var, numpy(bn.running_var), f"running var, {where}")
    assert int(state.count) == int(bn.num_batches_tracked), where
    assert_f32_equal(dx, numpy(x.grad), f"d/dx, {where}")
    assert_f32_equal(dparams["scale"], numpy(bn.weight.grad), f"d/dweight, {where}")
    assert_f32_equal(dparams["bias"], numpy(bn.bias.grad), f"d/dbias, {where}")


def test_torch_parity_channels_last():
  # A PyTorch model ported to NHWC inputs: same numbers with axis=-1.
  generator = torch.Generator().manual_seed(1)
  bn = torch.nn.BatchNorm2d(3)
  _randomize_torch(bn, generator)
  layer = interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum, axis=-1)
  state = layer.state
  for _ in range(2):
    x = torch.randn(4, 3, 5, 6, generator=generator) - 1
    y_torch = bn(x)
    y, state = jaxbn.batch_norm(
        numpy(x).transpose(0, 2, 3, 1), state, **layer.params, training=True, **layer.settings
    )
    assert_f32_equal(y, numpy(y_torch).transpose(0, 2, 3, 1))
  assert_f32_equal(state.var, numpy(bn.running_var))


def test_converted_state_does_not_follow_torch_buffers():
  # Regression: `Tensor.numpy()` shares memory, and JAX may alias host memory,
  # so the converted running mean changed when PyTorch trained in place.
  bn = torch.nn.BatchNorm1d(2)
  layer = interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum)
  bn(torch.ones(4, 2) * 5)
  np.testing.assert_array_equal(layer.state.mean, [0.0, 0.0])


def test_torch_round_trip_is_exact():
  generator = torch.Generator().manual_seed(2)
  modules = (
      torch.nn.BatchNorm2d(3, momentum=0.03, eps=1e-3),
      torch.nn.BatchNorm1d(3, momentum=None),
  )
  for bn in modules:
    _randomize_torch(bn, generator)
    state_dict, kwargs = interop.to_torch(
        interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum)
    )
    assert kwargs == {"num_features": 3, "eps": bn.eps, "momentum": bn.momentum, "affine": True}
    assert state_dict.keys() == bn.state_dict().keys()
    for key, value in bn.state_dict().items():
      assert state_dict[key].dtype == value.dtype, key
      assert torch.equal(state_dict[key], value), key
    type(bn)(**kwargs).load_state_dict(state_dict)


def test_torch_without_affine_and_bfloat16():
  bn = torch.nn.BatchNorm1d(2, affine=False)
  layer = interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum, affine=False)
  assert layer.params == {}
  state_dict, kwargs = interop.to_torch(layer)
  assert not kwargs["affine"] and "weight" not in state_dict
  bn = torch.nn.BatchNorm1d(2).to(torch.bfloat16)
  with torch.no_grad():
    bn.weight.fill_(1.5)
  layer = interop.from_torch(bn.state_dict(), eps=bn.eps, momentum=bn.momentum)
  assert layer.params["scale"].dtype == jnp.bfloat16 and layer.state.mean.dtype == jnp.float32
  state_dict, _ = interop.to_torch(layer)
  assert state_dict["weight"].dtype == torch.bfloat16
  assert torch.equal(state_dict["weight"], bn.weight.detach())


# --------------------------------------------------------------------------
# Keras parity (Keras 3 on the JAX backend).


def _keras_layer(shape, axis, generator):
  layer = keras.layers.BatchNormalization(axis=axis, momentum=0.9)
  layer.build(shape)
  c = shape[axis]
  layer.gamma.assign(generator.uniform(0.5, 1.5, c))
  layer.beta.assign(generator.normal(size=c))
  layer.moving_mean.assign(generator.normal(size=c))
  layer.moving_variance.assign(generator.uniform(0.5, 2.0, c))
  return layer


@pytest.mark.parametrize("shape, axis", [((7, 3), -1), ((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1)])
def test_keras_parity_train_then_eval(shape, axis):
  generator = np.random.default_rng(0)
  bn = _keras_layer(shape, axis, generator)
  layer = interop.from_keras(
      {v.name: v for v in bn.weights}, epsilon=bn.epsilon, momentum=bn.momentum, axis=bn.axis
  )
  trainable = [v.value for v in bn.trainable_variables]  # [gamma, beta]
  moving = [v.value for v in bn.non_trainable_variables]  # [moving_mean, moving_variance]
  params, state = layer.params, layer.state
  jaxbn_step = _jaxbn_step(layer.settings)

  @functools.partial(jax.jit, static_argnames="training")
  def keras_step(x, trainable, moving, cotangent, *, training):
    def f(x, trainable):
      return bn.stateless_call(trainable, moving, x, training=training)

    y, vjp, new_moving = jax.vjp(f, x, trainable, has_aux=True)
    return y, new_moving, *vjp(cotangent)

  for step in range(STEPS + 1):
    training = step < STEPS
    x = np.float32(generator.normal(size=shape) * 3 + 2)
    cotangent = np.float32(generator.normal(size=shape))
    y_keras, moving, dx_keras, (dgamma, dbeta) = keras_step(
        x, trainable, moving, cotangent, training=training
    )
    y, state, dx, dparams = jaxbn_step(x, params, state, cotangent, training=training)
    where = f"step {step} ({'train' if training else 'eval'})"
    assert_f32_equal(y, y_keras, f"output, {where}")
    assert_f32_equal(state.mean, moving[0], f"moving mean, {where}")
    assert_f32_equal(state.var, moving[1], f"moving variance, {where}")
    assert_f32_equal(dx, dx_keras, f"d/dx, {where}")
    assert_f32_equal(dparams["scale"], dgamma, f"d/dgamma, {where}")
    assert_f32_equal(dparams["bias"], dbeta, f"d/dbeta, {where}")


def test_keras_round_trip_is_exact():
  bn = _keras_layer((2, 4, 3), 1, np.random.default_rng(3))
  weights = {v.name: np.asarray(v) for v in bn.weights}
  layer = interop.from_keras(
      weights, epsilon=bn.epsilon, momentum=bn.momentum, axis=bn.axis, name=bn.name
  )
  back, kwargs = interop.to_keras(layer)
  assert kwargs == {"axis": 1, "momentum": 0.9, "epsilon": 1e-3, "center": True, "scale": True}
  for key, value in weights.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back[key].dtype == value.dtype, key
  restored = keras.layers.BatchNormalization(**kwargs)
  restored.build((2, 4, 3))
  for v in restored.weights:
    v.assign(back[v.name])
  x = np.random.default_rng(4).normal(size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(restored(x, training=False), bn(x, training=False))


def test_keras_without_center():
  bn = keras.layers.BatchNormalization(center=False)
  bn.build((2, 3))
  layer = interop.from_keras(
      {v.name: v for v in bn.weights}, epsilon=bn.epsilon, momentum=bn.momentum, axis=bn.axis,
      center=False,
  )
  assert set(layer.params) == {"scale"}
  weights, kwargs = interop.to_keras(layer)
  assert "beta" not in weights and kwargs["center"] is False and kwargs["scale"] is True


# --------------------------------------------------------------------------
# Bad input: a ValueError naming the layer and the key.


def _torch_state_dict():
  return {k: v.clone() for k, v in torch.nn.BatchNorm2d(3).state_dict().items()}


@pytest.mark.parametrize(
    "key", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
)
def test_torch_missing_key(key):
  state_dict = _torch_state_dict()
  del state_dict[key]
  with pytest.raises(ValueError, match=rf"layer 'stem\.bn'.*{key!r}"):
    interop.from_torch(state_dict, eps=1e-5, momentum=0.1, name="stem.bn")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("running_var", torch.ones(4), r"'running_var' has shape \(4,\) but key 'weight'"),
        ("weight", torch.ones(1, 3, 1, 1), r"'weight' has shape \(1, 3, 1, 1\), a layout"),
        ("running_var", -torch.ones(3), "'running_var' holds negative"),
        ("running_mean", torch.tensor([0.0, float("nan"), 0.0]), "'running_mean' holds non-finite"),
        ("num_batches_tracked", torch.tensor(1.5), "'num_batches_tracked' must be"),
        ("running_meen", torch.zeros(3), r"unexpected keys \['running_meen'\]"),
    ],
)
def test_torch_bad_values(key, value, match):
  state_dict = _torch_state_dict()
  state_dict[key] = value
  with pytest.raises(ValueError, match=rf"layer 'bn1'.*{match}"):
    interop.from_torch(state_dict, eps=1e-5, momentum=0.1, name="bn1")


def test_keras_bad_input():
  weights = {
      "gamma": np.ones(3), "beta": np.zeros(3), "moving_mean": np.zeros(3),
      "moving_variance": np.ones(3),
  }
  with pytest.raises(ValueError, match="layer 'bn'.*'moving_variance' is missing"):
    interop.from_keras(
        {k: v for k, v in weights.items() if k != "moving_variance"},
        epsilon=1e-3, momentum=0.99, axis=-1, name="bn",
    )
  with pytest.raises(ValueError, match=r"layer 'bn'.*'beta' has shape \(2,\)"):
    interop.from_keras(
        weights | {"beta": np.zeros(2)}, epsilon=1e-3, momentum=0.99, axis=-1, name="bn"
    )
  with pytest.raises(ValueError, match="single int"):
    interop.from_keras(weights, epsilon=1e-3, momentum=0.99, axis=(1, 2))


def test_layers_that_other_libraries_cannot_express():
  layer = interop.Layer({}, jaxbn.init_state((4, 3)), {"axis": (-2, -1)})
  with pytest.raises(ValueError, match="single channel axis"):
    interop.to_torch(layer)
  with pytest.raises(ValueError, match="single channel axis"):
    interop.to_keras(layer)
  cumulative = interop.Layer({}, jaxbn.init_state(3), interop.preset("torch", momentum=None))
  with pytest.raises(ValueError, match="'cumulative' has no Keras equivalent"):
    interop.to_keras(cumulative)
  debiased = interop.Layer({}, jaxbn.init_state(3), {"averaging": "debiased_ema"})
  with pytest.raises(ValueError, match="'debiased_ema' has no PyTorch equivalent"):
    interop.to_torch(debiased)


# --------------------------------------------------------------------------
# A whole model: PyTorch training, then Flax linen inference, layer by layer.


def test_cnn_trained_in_torch_matches_linen_layer_by_layer():
  torch.manual_seed(0)
  model = _torch_models.TorchNet()
  x = _torch_models.train_torch(model, steps=3)
  assert int(model.bn.num_batches_tracked) == 3

  torch_outputs = {}
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.register_forward_hook(
          lambda m, args, out, name=name: torch_outputs.__setitem__(name, numpy(out))
      )
  with torch.no_grad():
    logits = numpy(model(torch.from_numpy(x)))

  flax_model = _torch_models.FlaxNet()
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  # Only the variables' shapes: every leaf gets replaced.
  variables = jax.eval_shape(flax_model.init, jax.random.key(0), x_nhwc)
  variables, unmapped = interop.torch_to_linen(model.state_dict(), variables)
  assert unmapped == interop.Unmapped(torch=(), flax=())
  variables = _torch_models.convs_and_dense_to_linen(model.state_dict(), variables)

  apply = jax.jit(
      functools.partial(
          flax_model.apply,
          capture_intermediates=lambda m, _: isinstance(m, jaxbn.linen.BatchNorm),
      )
  )
  out, intermediates = apply(variables, x_nhwc)
  flax_outputs = intermediates["intermediates"]
  for torch_name, flax_path in [
      ("bn", ("bn",)),
      ("layer1.0.bn1", ("layer1_0", "bn1")),
      ("layer1.0.bn2", ("layer1_0", "bn2")),
  ]:
    node = flax_outputs
    for key in flax_path:
      node = node[key]
    (y,) = node["__call__"]
    assert_f32_equal(y, torch_outputs[torch_name].transpose(0, 2, 3, 1), torch_name)
  assert_f32_equal(out, logits, "logits")


def test_torch_to_linen_reports_what_it_cannot_map():
  model = _torch_models.TorchNet()
  x = jnp.zeros((1, 5, 5, 3))
  variables = jax.eval_shape(_torch_models.FlaxNet(block_name="block").init, jax.random.key(0), x)
  new_variables, unmapped = interop.torch_to_linen(model.state_dict(), variables)
  assert unmapped == interop.Unmapped(
      torch=("layer1.0.bn1", "layer1.0.bn2"), flax=("block/bn1", "block/bn2")
  )
  # The unmapped Flax layers keep their values; the mapped one is filled.
  assert new_variables["batch_stats"]["block"] == variables["batch_stats"]["block"]
  with torch.no_grad():
    model.layer1[0].bn1.running_var.fill_(3.0)
  names = {"layer1.0.bn1": "block/bn1", "layer1.0.bn2": "block/bn2"}
  new_variables, unmapped = interop.torch_to_linen(model.state_dict(), variables, names=names)
  assert unmapped == interop.Unmapped(torch=(), flax=())
  np.testing.assert_array_equal(new_variables["batch_stats"]["block"]["bn1"]["var"], [3.0] * 4)


def _flax_bn_variables(feature_shape, use_scale=True):
  params = {"bias": jnp.zeros(feature_shape)}
  if use_scale:
    params["scale"] = jnp.ones(feature_shape)
  stats = {"mean": jnp.zeros(feature_shape), "var": jnp.ones(feature_shape)}
  return params, stats


def test_torch_to_linen_never_pairs_ambiguous_names():
  bn = torch.nn.BatchNorm1d(3).state_dict()
  state_dict = {f"{p}.{k}": v for p in ("a_b.c", "a.b_c") for k, v in bn.items()}
  params, stats = _flax_bn_variables(3)
  variables = {"params": {"a": {"b": {"c": params}}}, "batch_stats": {"a": {"b": {"c": stats}}}}
  _, unmapped = interop.torch_to_linen(state_dict, variables)
  assert unmapped == interop.Unmapped(torch=("a.b_c", "a_b.c"), flax=("a/b/c",))


@pytest.mark.parametrize(
    "feature_shape, use_scale, match",
    [
        ((4,), True, r"layer 'bn'.*'weight' has shape \(3,\).*'scale' has shape \(4,\)"),
        ((5, 3), True, r"layer 'bn'.*'weight'.*'scale' has shape \(5, 3\).*2 feature axes"),
        ((3,), False, r"layer 'bn'.*PyTorch layer has 'weight'"),
    ],
)
def test_torch_to_linen_rejects_mismatched_layers(feature_shape, use_scale, match):
  state_dict = {f"bn.{k}": v for k, v in torch.nn.BatchNorm2d(3).state_dict().items()}
  params, stats = _flax_bn_variables(feature_shape, use_scale)
  variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
  with pytest.raises(ValueError, match=match):
    interop.torch_to_linen(state_dict, variables)


def test_torch_to_linen_rejects_bad_names_and_keys():
  state_dict = {f"bn.{k}": v for k, v in torch.nn.BatchNorm2d(3).state_dict().items()}
  params, stats = _flax_bn_variables(3)
  variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
  with pytest.raises(ValueError, match="'bn2', which is not a batch-norm layer of the state"):
    interop.torch_to_linen(state_dict, variables, names={"bn2": "bn"})
  with pytest.raises(ValueError, match="'norm', which is not a batch-norm layer of the Flax"):
    interop.torch_to_linen(state_dict, variables, names={"bn": "norm"})
  del state_dict["bn.bias"]
  with pytest.raises(ValueError, match=r"layer 'bn' \(Flax 'bn'\).*'bias' is missing"):
    interop.torch_to_linen(state_dict, variables)
  with pytest.raises(ValueError, match="batch_stats"):
    interop.torch_to_linen(state_dict, {"params": variables["params"]})
