"""Bad input raises at trace time, naming the argument, what was received and what was expected.

Every case runs eagerly and under ``jax.jit`` with all array arguments traced:
the checks look only at static properties, so they fire while tracing.
"""

import importlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)), jnp.float32)
STATE = jaxbn.init_state(3)


def _bn(**kwargs):
  """``batch_norm(x, state, scale, bias, training=True, **kwargs)`` with arrays as arguments."""
  kwargs.setdefault("training", True)
  return lambda x, state, scale=None, bias=None: jaxbn.batch_norm(x, state, scale, bias, **kwargs)


def _bn_mask(**kwargs):
  kwargs.setdefault("training", True)
  return lambda x, state, mask: jaxbn.batch_norm(x, state, mask=mask, **kwargs)


def _stats(**kwargs):
  return lambda x, mask=None: jaxbn.batch_stats(x, mask=mask, **kwargs)


def _normalize(**kwargs):
  return lambda x, mean, var, scale=None: jaxbn.normalize(x, mean, var, scale, **kwargs)


ONES3, ONES4 = jnp.ones(3), jnp.ones(4)

# (function, array arguments, exception, regex the message must match).
CASES = {
    # axis
    "axis-out-of-range": (
        _bn(axis=2), (X, STATE), ValueError,
        r"`axis`=2 is out of range for an input of rank 2: each entry must lie in \[-2, 1\]",
    ),
    "axis-negative-out-of-range": (
        _stats(axis=-3), (X,), ValueError,
        r"`axis`=-3 is out of range for an input of rank 2.*\[-2, 1\]",
    ),
    "axis-tuple-out-of-range": (
        _normalize(axis=(0, 5)), (X, jnp.ones((5, 3)), jnp.ones((5, 3))), ValueError,
        r"`axis`=\(0, 5\) is out of range for an input of rank 2",
    ),
    "axis-duplicate": (
        _bn(axis=(1, -1)), (X, STATE), ValueError,
        r"`axis`=\(1, -1\) names the same axis twice .*give each feature axis once",
    ),
    "axis-float": (
        _bn(axis=1.0), (X, STATE), TypeError,
        r"`axis` must be an int or a tuple of ints, got 1\.0",
    ),
    "axis-bool": (
        _stats(axis=True), (X,), TypeError,
        r"`axis` must be an int or a tuple of ints, got True",
    ),
    "axis-none": (
        _stats(axis=None), (X,), TypeError,
        r"`axis` must be an int or a tuple of ints, got None",
    ),
    "axis-empty": (
        _stats(axis=()), (X,), ValueError,
        r"`axis` must name at least one feature axis, got \(\)",
    ),
    # x
    "x-int": (
        _bn(), (X.astype(jnp.int32), STATE), TypeError,
        r"`x` must be a floating-point array .*got dtype int32.*astype\(jnp\.float32\)",
    ),
    "x-bool": (
        _stats(), (X > 0,), TypeError,
        r"`x` must be a floating-point array .*got dtype bool",
    ),
    "x-int-normalize": (
        _normalize(), (X.astype(jnp.int8), ONES3, ONES3), TypeError,
        r"`x` must be a floating-point array .*got dtype int8",
    ),
    "x-scalar": (
        _stats(), (jnp.float32(1.0),), ValueError,
        r"`x` must have at least one axis, got a scalar",
    ),
    # state, scale, bias, mean, var
    "state-shape": (
        _bn(), (X, jaxbn.init_state(4)), ValueError,
        r"`state\.mean` has shape \(4,\), but the feature shape .* is \(3,\)",
    ),
    "state-shape-nchw-default-axis": (
        _bn(), (jnp.ones((2, 3, 4, 4)), jaxbn.init_state(3)), ValueError,
        r"`state\.mean` has shape \(3,\), but the feature shape .* is \(4,\)",
    ),
    "state-var-shape": (
        _bn(), (X, STATE._replace(var=jnp.ones((1, 3)))), ValueError,
        r"`state\.var` has shape \(1, 3\), but the feature shape .* is \(3,\)",
    ),
    "state-count-shape": (
        _bn(), (X, STATE._replace(count=jnp.zeros(3, jnp.int32))), ValueError,
        r"`state\.count` must be a scalar, got shape \(3,\)",
    ),
    "state-not-a-state": (
        _bn(), (X, {"mean": ONES3, "var": ONES3}), TypeError,
        r"`state` must be a BatchNormState\(mean, var, count\).*init_state\(\(3,\)\).*got dict",
    ),
    "scale-shape": (
        _bn(), (X, STATE, ONES4), ValueError,
        r"`scale` has shape \(4,\), but the feature shape .* is \(3,\)",
    ),
    "bias-shape": (
        _bn(), (X, STATE, None, jnp.ones((3, 1))), ValueError,
        r"`bias` has shape \(3, 1\), but the feature shape .* is \(3,\)",
    ),
    "scale-int": (
        _bn(), (X, STATE, jnp.ones(3, jnp.int32)), TypeError,
        r"`scale` must be floating point, got dtype int32",
    ),
    "scale-shape-inference": (
        _bn(training=False), (X, STATE, ONES4), ValueError,
        r"`scale` has shape \(4,\), but the feature shape .* is \(3,\)",
    ),
    "normalize-mean-shape": (
        _normalize(), (X, ONES4, ONES3), ValueError,
        r"`mean` has shape \(4,\), but the feature shape .* is \(3,\)",
    ),
    "normalize-var-shape": (
        _normalize(axis=0), (X, jnp.ones(5), ONES3), ValueError,
        r"`var` has shape \(3,\), but the feature shape .* is \(5,\)",
    ),
    "normalize-scale-shape": (
        _normalize(), (X, ONES3, ONES3, ONES4), ValueError,
        r"`scale` has shape \(4,\), but the feature shape .* is \(3,\)",
    ),
    # mask
    "mask-not-broadcasting": (
        _bn_mask(), (X, STATE, jnp.ones((4, 3), bool)), ValueError,
        r"`mask` has shape \(4, 3\), which does not broadcast to the input shape \(5, 3\)",
    ),
    "mask-higher-rank": (
        _stats(), (X, jnp.ones((2, 5, 3), bool)), ValueError,
        r"`mask` has shape \(2, 5, 3\), which does not broadcast to the input shape \(5, 3\)",
    ),
    "mask-float": (
        _bn_mask(), (X, STATE, jnp.ones((5, 3))), TypeError,
        r"`mask` must be boolean .*got dtype float32",
    ),
    "mask-int-batch-stats": (
        _stats(), (X, jnp.ones((5, 1), jnp.int32)), TypeError,
        r"`mask` must be boolean .*got dtype int32",
    ),
    "mask-inference": (
        _bn_mask(training=False), (X, STATE, jnp.ones((5, 2), bool)), ValueError,
        r"`mask` has shape \(5, 2\), which does not broadcast",
    ),
    # training needs a batch
    "single-entry-per-feature": (
        _bn(), (X[:1], STATE), ValueError,
        r"needs more than one value per feature, but `x` of shape \(1, 3\) with `axis`=-1 "
        r"has a single one",
    ),
    # Regression: an empty training batch failed deep inside with an IndexError.
    "empty-batch": (
        _bn(), (jnp.ones((0, 3)), STATE), ValueError,
        r"needs more than one value per feature, but `x` of shape \(0, 3\)",
    ),
    "single-entry-per-feature-all-axes": (
        _bn(axis=(0, 1)), (X, jaxbn.init_state((5, 3))), ValueError,
        r"`x` of shape \(5, 3\) with `axis`=\(0, 1\) has a single one",
    ),
    # scalars and flags
    "momentum-above-one": (
        _bn(momentum=1.5), (X, STATE), ValueError,
        r"`momentum` must lie in \[0\.0, 1\.0\], got 1\.5",
    ),
    "momentum-negative": (
        _bn(momentum=-0.1), (X, STATE), ValueError,
        r"`momentum` must lie in \[0\.0, 1\.0\], got -0\.1",
    ),
    "epsilon-negative": (
        _bn(epsilon=-1e-3), (X, STATE), ValueError,
        r"`epsilon` must lie in \[0\.0, inf\], got -0\.001",
    ),
    "epsilon-negative-normalize": (
        _normalize(epsilon=-1.0), (X, ONES3, ONES3), ValueError,
        r"`epsilon` must lie in \[0\.0, inf\], got -1\.0",
    ),
    "momentum-per-feature": (
        lambda x, state, momentum: jaxbn.batch_norm(x, state, training=True, momentum=momentum),
        (X, STATE, jnp.full(3, 0.9)), ValueError,
        r"`momentum` must be a scalar, got an array of shape \(3,\)",
    ),
    "epsilon-per-feature-normalize": (
        _normalize(epsilon=np.full(3, 1e-5)), (X, ONES3, ONES3), ValueError,
        r"`epsilon` must be a scalar, got an array of shape \(3,\)",
    ),
    "normalize-without-mean": (
        lambda x, var: jaxbn.normalize(x, None, var), (X, ONES3), TypeError,
        r"`mean` is required: an array of the feature shape \(3,\)",
    ),
    "training-array": (
        lambda x, state, training: jaxbn.batch_norm(x, state, training=training),
        (X, STATE, jnp.asarray(True)), TypeError,
        r"`training` must be a Python bool, got .*static argument under jit",
    ),
    "training-int": (
        _bn(training=1), (X, STATE), TypeError,
        r"`training` must be a Python bool, got 1",
    ),
    "training-missing": (
        lambda x, state: jaxbn.batch_norm(x, state), (X, STATE), TypeError,
        r"missing 1 required keyword-only argument: 'training'",
    ),
    "implementation-unknown": (
        _bn(implementation="pallas"), (X, STATE), ValueError,
        r"`implementation` must be one of \('auto', 'kernel', 'fused', 'reference'\), got 'pallas'",
    ),
    # axis_name outside a map that binds it
    "axis-name-unbound": (
        _bn(axis_name="batch"), (X, STATE), NameError,
        r"`axis_name`='batch': the axis 'batch' is not bound.*axis_name='batch'",
    ),
    "axis-name-unbound-batch-stats": (
        _stats(axis_name="devices"), (X,), NameError,
        r"`axis_name`='devices': the axis 'devices' is not bound",
    ),
}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_raises_a_teaching_error(case, mode):
  fn, args, error, match = case
  if mode == "jit":
    fn = jax.jit(fn)
  with pytest.raises(error, match=match):
    fn(*args)


def test_unbound_axis_name_inside_another_map():
  # A vmap binds "batch"; asking for "devices" must still name the missing axis.
  fn = jax.vmap(lambda x: jaxbn.batch_stats(x, axis_name="devices"), axis_name="batch")
  with pytest.raises(NameError, match=r"the axis 'devices' is not bound"):
    fn(X[:, None, :])


def test_errors_raise_while_tracing():
  # eval_shape never computes: the error comes from the static checks alone.
  with pytest.raises(ValueError, match=r"`scale` has shape \(4,\)"):
    jax.eval_shape(_bn(), X, STATE, ONES4)


@pytest.mark.parametrize(
    ("feature_shape", "dtype", "error", "match"),
    [
        (-1, jnp.float32, ValueError,
         r"`feature_shape` must be a non-negative int or a tuple of them, got -1"),
        ((3, -2), jnp.float32, ValueError, r"`feature_shape` .* got \(3, -2\)"),
        ((3.0,), jnp.float32, ValueError, r"`feature_shape` .* got \(3\.0,\)"),
        (3, jnp.int32, TypeError, r"`dtype` must be a floating-point dtype, got int32"),
    ],
    ids=["negative", "tuple-negative", "float-entry", "int-dtype"],
)
def test_init_state_bad_input(feature_shape, dtype, error, match):
  with pytest.raises(error, match=match):
    jaxbn.init_state(feature_shape, dtype)



# Regression: without Flax, `import jaxbn.linen` raised a bare ModuleNotFoundError.
@pytest.mark.parametrize("user", ["jaxbn.linen", "jaxbn.nnx", "jaxbn.recompute_stats"])
def test_flax_modules_without_flax_name_the_extra_to_install(user, monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)  # as if Flax were not installed
  for name in ("jaxbn.linen", "jaxbn.nnx", "jaxbn._precise"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  with pytest.raises(ImportError, match=re.escape(f'{user} needs flax, which is not installed: '
                                                  'pip install "jaxbn[flax]"')):
    if user == "jaxbn.recompute_stats":
      jaxbn.recompute_stats  # noqa: B018
    else:
      importlib.import_module(user)
