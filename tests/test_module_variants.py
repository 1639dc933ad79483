"""The variants of ``jaxbn.batch_norm`` in ``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm``.

Each module, set up like a direct call of ``jaxbn.batch_norm``, gives the same
outputs and running statistics over two steps; extra statistics appear only
for the variants that need them, so default modules keep Flax's variables.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import _reference

C, MOMENTUM = 3, 0.8
SHAPE = (8, 2, C)
SCALE = jnp.array([0.5, 1.0, 2.0])
BIAS = jnp.array([0.1, -0.2, 0.3])
KINDS = ("linen", "nnx")
RENORM_STATS = {"count", "std", "renorm_mean", "renorm_std"}


def _input(seed, shape=SHAPE):
  return jnp.asarray(3.0 + 2.0 * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _linen(settings, **kwargs):
  bn = jaxbn.linen.BatchNorm(momentum=MOMENTUM, **settings, **kwargs)
  # With both switches given, init needs no use_running_average (which may be set or not).
  variables = bn.init(jax.random.key(0), _input(0), use_batch_stats=False, update_stats=False)
  return bn, {**variables, "params": {"scale": SCALE, "bias": BIAS}}


def _nnx(settings, **kwargs):
  bn = jaxbn.nnx.BatchNorm(C, momentum=MOMENTUM, rngs=nnx.Rngs(0), **settings, **kwargs)
  bn.scale[...], bn.bias[...] = SCALE, BIAS
  return bn


def _nnx_stats(bn):
  return {name: getattr(bn, name)[...] for name in nnx.state(bn, nnx.BatchStat)}


def _module_steps(kind, settings, xs, call):
  """``[(y, running statistics by name)]`` after each call of the module."""
  writes = call.get("update_stats", True)
  steps = []
  if kind == "linen":
    bn, variables = _linen(settings, use_running_average=False)
    for x in xs:
      if writes:
        y, updates = bn.apply(variables, x, mutable=["batch_stats"], **call)
        variables = {**variables, **updates}
      else:  # no update: the statistics need not be mutable
        y = bn.apply(variables, x, **call)
      steps.append((y, dict(variables["batch_stats"])))
  else:
    bn = _nnx(settings, use_running_average=False)
    for x in xs:
      steps.append((bn(x, **call), _nnx_stats(bn)))
  return steps


def _core_steps(settings, xs, call):
  """``[(y, state)]`` of ``jaxbn.batch_norm`` called directly."""
  state = jaxbn.init_state(C) if settings.get("renorm") is None else jaxbn.init_renorm_state(C)
  steps = []
  for x in xs:
    y, state = jaxbn.batch_norm(
      x, state, SCALE, BIAS, training=True, momentum=MOMENTUM, **settings, **call
    )
    steps.append((y, state))
  return steps


STATS = {"mean", "var"}
CASES = {
  # name: (module settings, call arguments, running statistics kept)
  "frozen": ({}, {"use_batch_stats": False, "update_stats": False}, STATS),
  "calibration": ({}, {"use_batch_stats": False, "update_stats": True}, STATS),
  "relu_residual": ({"activation": "relu"}, {"residual": _input(3)}, STATS),
  "leaky_relu": ({"activation": "leaky_relu", "negative_slope": 0.2}, {}, STATS),
  "debiased_ema": ({"averaging": "debiased_ema"}, {}, STATS | {"count"}),
  "cumulative": ({"averaging": "cumulative"}, {}, STATS | {"count"}),
  "skip_nonfinite": ({"averaging": "cumulative", "skip_nonfinite": True}, {}, STATS | {"count"}),
  "unbiased_var": ({"unbiased_var": True}, {}, STATS),
  "ghost_batches": ({"virtual_batch_size": 4}, {}, STATS),
  "renorm": ({"renorm": jaxbn.Renorm(r_max=1.2, d_max=0.3)}, {}, STATS | RENORM_STATS),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_module_matches_batch_norm_over_two_steps(kind, case):
  settings, call, names = CASES[case]
  skip = settings.get("skip_nonfinite", False)
  xs = [_input(1), _input(2).at[0, 0, 1].set(jnp.nan) if skip else _input(2)]
  got, want = _module_steps(kind, settings, xs, call), _core_steps(settings, xs, call)
  for (y, stats), (y_want, state) in zip(got, want, strict=True):
    assert set(stats) == names
    _reference.assert_trees_close((y, stats), (y_want, {n: getattr(state, n) for n in stats}))
  if "count" in names:  # one update per step, none for the batch holding a NaN
    assert got[-1][1]["count"] == (1 if skip else 2)
  if case == "frozen":  # the statistics are those of a fresh module
    fresh = jaxbn.init_state(C)
    _reference.assert_trees_close(got[-1][1], {"mean": fresh.mean, "var": fresh.var})


@pytest.mark.parametrize("kind", KINDS)
def test_both_switches_need_no_use_running_average(kind):
  x, call = _input(1), {"use_batch_stats": True, "update_stats": False}
  if kind == "linen":
    bn, variables = _linen({})  # use_running_average is None
    y = bn.apply(variables, x, **call)
  else:
    y = _nnx({}, use_running_average=None)(x, **call)
  _reference.assert_trees_close(y, _core_steps({}, [x], call)[0][0])


@pytest.mark.parametrize("kind", KINDS)
def test_inplace_backward_gives_the_same_gradients(kind):
  x, residual = _input(1), _input(3)
  settings = {"activation": "leaky_relu", "negative_slope": 0.1}
  grads = []
  for inplace in (False, True):
    if kind == "linen":
      bn, variables = _linen({**settings, "inplace": inplace}, use_running_average=False)

      def loss(params, x, bn=bn, variables=variables):
        y, _ = bn.apply(
          {**variables, "params": params}, x, residual=residual, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(2.0 * y))

      grads.append(jax.grad(loss, (0, 1))(variables["params"], x))
    else:

      def loss(bn, x):
        return jnp.sum(jnp.sin(2.0 * bn(x, residual=residual)))

      bn = _nnx({**settings, "inplace": inplace})
      grads.append(nnx.grad(loss, argnums=(0, 1))(bn, x))
  _reference.assert_trees_close(grads[1], grads[0])


@pytest.mark.parametrize(
  ("settings", "extra"),
  [
    ({}, set()),
    ({"averaging": "cumulative"}, {"count"}),
    ({"renorm": jaxbn.Renorm()}, RENORM_STATS),
  ],
  ids=["default", "cumulative", "renorm"],
)
def test_variables_are_flax_s_plus_only_what_the_variant_needs(settings, extra):
  x = _input(0)
  flax_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  ours = jaxbn.linen.BatchNorm(use_running_average=False, **settings).init(jax.random.key(0), x)
  assert ours["params"].keys() == flax_vars["params"].keys() == {"scale", "bias"}
  assert set(ours["batch_stats"]) == set(flax_vars["batch_stats"]) | extra
  if extra:  # initialization counts no update
    assert ours["batch_stats"]["count"] == 0 and ours["batch_stats"]["count"].dtype == jnp.int32
  else:
    assert _reference.tree_spec(ours) == _reference.tree_spec(flax_vars)
  flax_state = nnx.state(nnx.BatchNorm(C, rngs=nnx.Rngs(0)))
  nnx_state = nnx.state(jaxbn.nnx.BatchNorm(C, rngs=nnx.Rngs(0), **settings))
  assert set(nnx_state) == set(flax_state) | extra
  if not extra:
    assert _reference.tree_spec(nnx_state) == _reference.tree_spec(flax_state)


ERRORS = [
  # (module settings, input shape (None: complex), call arguments, error, message)
  pytest.param({"averaging": "mean"}, SHAPE, {}, ValueError, "`averaging` must be", id="averaging"),
  pytest.param(
    {"virtual_batch_size": 3}, SHAPE, {}, ValueError, "`virtual_batch_size`=3", id="ghost_size"
  ),
  pytest.param(
    {"inplace": True, "activation": "relu"}, SHAPE, {}, ValueError, "invertible", id="inplace_relu"
  ),
  pytest.param(
    {}, SHAPE, {"use_batch_stats": "yes"}, TypeError, "`use_batch_stats` must", id="switch_type"
  ),
  pytest.param(
    {}, SHAPE, {"residual": _input(1, (8, C))}, ValueError, "`residual` has shape", id="residual"
  ),
  # Flax's implementation, which takes these inputs, has no variants.
  pytest.param(
    {"activation": "relu"}, None, {}, ValueError, "complex.*`activation`", id="complex_fallback"
  ),
  pytest.param(
    {},
    (1, C),
    {"residual": _input(1, (1, C))},
    ValueError,
    "single.*`residual`",
    id="single_fallback",
  ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("settings", "shape", "call", "error", "match"), ERRORS)
def test_bad_settings_raise_batch_norm_s_errors(kind, settings, shape, call, error, match):
  x = _input(1).astype(jnp.complex64) if shape is None else _input(1, shape)
  with pytest.raises(error, match=match):
    if kind == "linen":
      bn = jaxbn.linen.BatchNorm(use_running_average=False, **settings)
      bn.init(jax.random.key(0), x, **call)
    else:
      _nnx(settings)(x, **call)
