"""jaxbn under Equinox's test settings: ``jax_numpy_dtype_promotion="strict"``.

Equinox runs its tests with strict dtype promotion (and rank promotion raising,
as our conftest does), and so may its users. The functional API and
``jaxbn.equinox.BatchNorm`` promote explicitly: under
``jax.numpy_dtype_promotion("strict")``, with half-precision inputs and float32
state, every call gives the numbers it gives under standard promotion.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
import jaxbn.equinox
from tests import _reference

C = 3
# Half precision against float32 state and parameters: what needs an explicit promotion.
# Every call in bfloat16; float16 takes the same paths, checked on a few.
FLOAT16_CALLS = ("train", "grad", "inference", "batch_stats", "init_state")


def _input(dtype, shape=(8, 4, C)):
  rng = np.random.default_rng(0)
  return jnp.asarray(1.0 + 2.0 * rng.normal(size=shape), dtype)


def _loss(y):
  return jnp.sum(jnp.sin(y.astype(jnp.float32)))


SCALE, BIAS = jnp.array([0.5, 1.0, 2.0]), jnp.array([0.1, -0.2, 0.3])
MASK = jnp.arange(8)[:, None, None] < 6


def _train(x, **kwargs):
  state = jaxbn.init_renorm_state(C) if "renorm" in kwargs else jaxbn.init_state(C)
  return jaxbn.batch_norm(x, state, SCALE, BIAS, training=True, **kwargs)


def _grad(x, **kwargs):
  return jax.grad(
    lambda x, scale: _loss(
      jaxbn.batch_norm(x, jaxbn.init_state(C), scale, BIAS, training=True, **kwargs)[0]
    ),
    (0, 1),
  )(x, SCALE)


CALLS = {
  "train": lambda x: _train(x),
  "train_reference": lambda x: _train(x, implementation="reference"),
  "train_mask": lambda x: _train(x, mask=MASK),
  "train_residual_relu": lambda x: _train(x, residual=x, activation="relu"),
  "grad": lambda x: _grad(x, residual=x, activation="leaky_relu"),
  "grad_reference": lambda x: _grad(x, implementation="reference"),
  "grad_inplace": lambda x: _grad(x, activation="leaky_relu", inplace=True),
  "jvp": lambda x: jax.jvp(lambda x: _train(x)[0], (x,), (x,)),
  "inference": lambda x: jaxbn.batch_norm(
    x, jaxbn.init_state(C), SCALE, BIAS, training=False, residual=x, activation="relu"
  ),
  "calibration": lambda x: _train(x, use_batch_stats=False),
  "renorm": lambda x: _train(x, renorm=jaxbn.Renorm(r_max=lambda t: 1 + t / 10)),
  "ghost_unbiased_mask": lambda x: _train(x, virtual_batch_size=4, unbiased_var=True, mask=MASK),
  "debiased_skip": lambda x: _train(x, averaging="debiased_ema", skip_nonfinite=True),
  "cumulative": lambda x: _train(x, averaging="cumulative"),
  "named_axis": lambda x: jax.vmap(
    lambda x: _train(x, axis_name="i", mask=jnp.bool_(True)),
    axis_name="i",
    out_axes=(0, None),
  )(x),
  "batch_stats": lambda x: jaxbn.batch_stats(x, mask=MASK),
  "normalize": lambda x: jaxbn.normalize(x, jnp.ones(C), jnp.ones(C) * 2, SCALE, BIAS),
  "normalize_grad": lambda x: jax.grad(
    lambda x: _loss(jaxbn.normalize(x, jnp.ones(C), jnp.ones(C) * 2, SCALE, BIAS))
  )(x),
  "update_running_stats": lambda x: jaxbn.update_running_stats(
    jaxbn.init_state(C),
    *jaxbn.batch_stats(x),
    averaging="debiased_ema",
    unbiased_var=True,
    batch_count=32,
  ),
  "init_state": lambda x: (jaxbn.init_state(C, x.dtype), jaxbn.init_renorm_state(C, x.dtype)),
  "fold_batch_norm": lambda x: jaxbn.fold_batch_norm(
    jnp.ones((5, C), x.dtype), jnp.zeros(C, x.dtype), mean=jnp.ones(C), var=jnp.ones(C)
  ),
}


def _assert_same(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize(
  ("call", "dtype"),
  [(call, jnp.bfloat16) for call in CALLS] + [(call, jnp.float16) for call in FLOAT16_CALLS],
  ids=lambda v: v if isinstance(v, str) else jnp.dtype(v).name,
)
def test_functional_api_under_strict_promotion(call, dtype):
  x = _input(dtype)
  with jax.numpy_dtype_promotion("strict"):  # the promotion errors are raised while tracing
    got = jax.jit(CALLS[call])(x)
  _assert_same(got, jax.jit(CALLS[call])(x))


@pytest.mark.parametrize(
  ("mode", "x_dtype", "module_dtype"),
  [("batch", jnp.bfloat16, None), ("ema", jnp.float16, jnp.bfloat16)],
  ids=["batch-bf16_input", "ema_renorm-f16_input-bf16_module"],
)
def test_module_under_strict_promotion(mode, x_dtype, module_dtype):
  settings = {"renorm": jaxbn.Renorm()} if mode == "ema" else {"unbiased_var": True}
  bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
    C, "batch", mode=mode, dtype=module_dtype, activation="relu", **settings
  )
  x = jnp.moveaxis(_input(x_dtype), -1, 1)  # (N, C, 4): channels first per example

  @eqx.filter_jit
  def steps(bn, state, x):
    def train(x, state):
      return bn(x, state, residual=x)

    vmapped = jax.vmap(train, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, state = vmapped(x, state)
    grads = jax.grad(lambda x: _loss(vmapped(x, state)[0]))(x)
    inference = jax.vmap(eqx.nn.inference_mode(bn), in_axes=(0, None), out_axes=(0, None))
    return y, grads, inference(x, state)

  with jax.numpy_dtype_promotion("strict"):
    got = steps(bn, state, x)
  want = steps(bn, state, x)
  _reference.assert_trees_close(got, want)
  y = got[0]
  assert y.dtype == jnp.promote_types(x_dtype, module_dtype or jnp.float32)
