"""The compiled CPU kernels (``jaxbn._kernels``): values, layouts and the compiled program.

Each wrapper is checked against a float64 NumPy reference and against the
XLA-fused piece it replaces (``_fused``, ``_activation``), over layouts
(features last, NCHW, ghost batches, no kept axis), masks (none, one per
row, full, a feature masked out entirely), residuals, activations (with
infinite inputs) and the storage dtypes float32, bfloat16 and float16;
float64 takes the primitives' reference lowering. ``test_kernels_transforms``
holds the transformations (derivatives, vmap, export, sharding) and
``test_kernels_runtime`` determinism across thread counts and the fallback.

The helpers here (``inputs``, ``train_step``, ``FUSED``) are shared with
those files.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _activation, _fused
from jaxbn import _kernels as kernels
from jaxbn._kernels import _primitives

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"jaxbn's kernels are not loaded: {kernels.reason()}"
)

f32, bf16, f16, f64 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64
KERNEL_DTYPES = [f32, bf16, f16]


def dtype_id(dtype) -> str:
  """A test id: the dtype's name ("stored": that of the input; "none": no operand)."""
  return dtype if isinstance(dtype, str) else "none" if dtype is None else jnp.dtype(dtype).name
# |error| of a sum, relative to the sum of the magnitudes it adds (float32 accumulation).
SUM_TOLERANCE = 2e-6
# |error| of an output, relative to its magnitude + 1: a rounding of the output's dtype.
OUTPUT_TOLERANCE = {jnp.dtype(f32): 2e-6, jnp.dtype(bf16): 2**-8, jnp.dtype(f16): 2**-10}

# (shape, kept axes): the layouts the kernels take, with sizes that are not
# multiples of the vector width, single rows and features, and enough
# entries for several tasks.
LAYOUTS = {
    "mlp": ((8, 16), (1,)),
    "nhwc": ((3, 5, 7, 19), (3,)),
    "nchw": ((3, 19, 5, 7), (1,)),
    "ghost": ((3, 4, 5, 2, 6), (0, 4)),
    "one-row": ((1, 37), (1,)),
    "one-feature": ((4, 1, 9, 9), (1,)),
    "features-first": ((6, 40), (0,)),
    "wide": ((5, 9000), (1,)),
    "many-tasks": ((300, 9, 35), (2,)),
    "whole-vectors": ((70, 9, 64), (2,)),  # rows of 4 vectors, over two tasks
    "rows-in-blocks": ((37, 150), (1,)),  # rows of 3 chunks, read a block of rows at a time
    "nchw-many-tasks": ((7, 33, 41, 43), (1,)),
}

FUSED = SimpleNamespace(
    shifted_sums=_fused.shifted_sums,
    shifted_affine=_fused.shifted_affine,
    shifted_affine_act=_activation.shifted_affine_act,
)


def reduction_axes(ndim, kept):
  return tuple(i for i in range(ndim) if i not in kept)


def keepdims_shape(shape, kept):
  return tuple(size if i in kept else 1 for i, size in enumerate(shape))


def make_mask(kind, shape, kept, rng):
  """None, a mask constant along the features ("row"), a full one, or one without feature 0."""
  if kind is None:
    return None
  if kind == "row":
    mask = rng.uniform(size=tuple(1 if i in kept else s for i, s in enumerate(shape))) > 0.3
  else:
    mask = rng.uniform(size=shape) > 0.3
  if kind == "feature-out":
    mask[tuple(0 if i in kept else slice(None) for i in range(len(shape)))] = False
  return jnp.asarray(mask)


def inputs(shape, kept, dtype, seed=0):
  """``(x, scale, bias)``: data away from zero, per-feature parameters of the kept shape."""
  rng = np.random.default_rng(seed)
  features = tuple(shape[i] for i in kept)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 5, dtype)
  parameter_dtype = jnp.promote_types(dtype, f32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, features), parameter_dtype)
  bias = jnp.asarray(rng.standard_normal(features), parameter_dtype)
  return x, scale, bias


def first_sample(x, kept):
  """``K``: the first entry of every feature, without a gradient."""
  first = tuple(slice(None) if i in kept else slice(0, 1) for i in range(x.ndim))
  return jax.lax.stop_gradient(x[first])


def train_step(pieces, kept, stored, scale, bias, mask=None, activation=None, negative_slope=0.0,
               residual=None, epsilon=1e-5):
  """A batch-norm training step made of ``pieces`` (``kernels`` or ``FUSED``).

  The statistics come from the shifted sums, the output from the affine map
  (with the activation and residual when given), as in ``jaxbn.batch_norm``.
  """
  axes = reduction_axes(stored.ndim, kept)
  x = stored.astype(jnp.promote_types(stored.dtype, f32))
  shift = first_sample(x, kept)
  s1, s2 = pieces.shifted_sums(axes, x, stored, shift, mask)
  if mask is None:
    count = jnp.asarray(x.size // s1.size, x.dtype)
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, keepdims=True, dtype=x.dtype)
  delta = s1 / jnp.maximum(count, 1)
  var = jnp.maximum(s2 - s1 * delta, 0) / jnp.maximum(count, 1)
  a = jax.lax.rsqrt(var + epsilon) * scale.reshape(shift.shape)
  b = bias.reshape(shift.shape) - delta * a
  if activation is None and residual is None:
    return pieces.shifted_affine(x, stored, shift, a, b)
  return pieces.shifted_affine_act(activation, negative_slope, x, stored, shift, a, b, residual)


def custom_calls(fn, *args) -> list[str]:
  """The jaxbn custom-call targets in the compiled program of ``fn``."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return [t for t in _primitives.TARGETS for _ in range(text.count(f'custom_call_target="{t}"'))]


# ---------------------------------------------------------------------------
# Layout


def test_layout_views_each_supported_layout():
  layout = kernels.layout
  assert layout((32, 56, 56, 64), (3,)).dims((32, 56, 56, 64)) == (1, 32 * 56 * 56, 64, 1)
  assert layout((32, 64, 56, 56), (1,)).dims((32, 64, 56, 56)) == (1, 32, 64, 56 * 56)
  assert layout((4, 8, 7, 7, 64), (0, 4)).dims((4, 8, 7, 7, 64)) == (4, 8 * 49, 64, 1)
  assert layout((6, 5), ()).dims((6, 5)) == (1, 1, 1, 30)
  assert layout((6, 5), (0, 1)).dims((6, 5)) == (30, 1, 1, 1)


def test_layout_rejects_split_features_unless_a_size_one_axis_joins_them():
  assert kernels.layout((4, 5, 6, 3), (1, 3)) is None
  # Size-1 axes belong anywhere: (1, 3) of (4, 5, 1, 3) is one block.
  assert kernels.layout((4, 5, 1, 3), (1, 3)).dims((4, 5, 1, 3)) == (1, 4, 15, 1)


# ---------------------------------------------------------------------------
# Values against float64 NumPy


def numpy_sums(stored, shift, axes, mask):
  deviation = np.asarray(stored, np.float64) - np.asarray(shift, np.float64)
  if mask is not None:
    deviation = deviation * np.broadcast_to(np.asarray(mask), deviation.shape)
  return (
      deviation.sum(axes, keepdims=True),
      np.square(deviation).sum(axes, keepdims=True),
      np.abs(deviation).sum(axes, keepdims=True),
  )


@pytest.mark.parametrize("mask_kind", [None, "row", "full", "feature-out"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shifted_sums_match_float64(layout, dtype, mask_kind):
  shape, kept = LAYOUTS[layout]
  stored, _, _ = inputs(shape, kept, dtype)
  axes = reduction_axes(len(shape), kept)
  mask = make_mask(mask_kind, shape, kept, np.random.default_rng(1))
  x = stored.astype(f32)
  shift = first_sample(x, kept) - 1  # off the data: S1 is not 0
  fn = jax.jit(functools.partial(kernels.shifted_sums, axes))
  s1, s2 = fn(x, stored, shift, mask)
  r1, r2, magnitude = numpy_sums(stored, shift, axes, mask)
  assert s1.dtype == s2.dtype == f32 and s1.shape == s2.shape == shift.shape
  np.testing.assert_allclose(s1, r1, atol=SUM_TOLERANCE * (magnitude.max() + 1))
  np.testing.assert_allclose(s2, r2, rtol=SUM_TOLERANCE, atol=1e-30)
  if mask_kind == "feature-out":  # a feature without valid entries sums to exactly 0
    assert np.all(np.asarray(s1).reshape(-1)[0] == 0) and np.asarray(s2).reshape(-1)[0] == 0
  f1, f2 = jax.jit(functools.partial(_fused.shifted_sums, axes))(x, stored, shift, mask)
  np.testing.assert_allclose(s1, f1, atol=SUM_TOLERANCE * (magnitude.max() + 1))
  np.testing.assert_allclose(s2, f2, rtol=SUM_TOLERANCE)


def numpy_affine(stored, shift, a, b, residual, slope):
  deviation = np.asarray(stored, np.float64) - np.asarray(shift, np.float64)
  u = deviation * np.asarray(a) + np.asarray(b)
  if residual is not None:
    u = u + np.asarray(residual, np.float64)
  with np.errstate(invalid="ignore"):
    return np.where(u > 0, u, 0.0 if slope == 0 else slope * u)


ACTIVATIONS = {"none": (None, 1.0), "relu": ("relu", 0.0), "leaky": ("leaky_relu", 0.2)}


@pytest.mark.parametrize("residual_dtype", [None, "stored", f32], ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["mlp", "nchw", "ghost", "many-tasks"])
def test_shifted_affine_act_matches_float64(layout, dtype, activation, residual_dtype):
  shape, kept = LAYOUTS[layout]
  stored, scale, bias = inputs(shape, kept, dtype)
  rng = np.random.default_rng(2)
  residual = None
  if residual_dtype is not None:
    residual_dtype = dtype if residual_dtype == "stored" else residual_dtype
    residual = jnp.asarray(rng.standard_normal(shape), residual_dtype)
  x = stored.astype(f32)
  shift = first_sample(x, kept)
  a, b = (v.reshape(shift.shape) for v in (scale, bias))
  name, slope = ACTIVATIONS[activation]
  z = jax.jit(functools.partial(kernels.shifted_affine_act, name, slope))(
      x, stored, shift, a, b, residual
  )
  assert z.dtype == stored.dtype and z.shape == stored.shape
  expected = numpy_affine(stored, shift, a, b, residual, 1.0 if name is None else slope)
  tolerance = OUTPUT_TOLERANCE[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(z, np.float64), expected, rtol=tolerance, atol=tolerance)
  fused = jax.jit(functools.partial(_activation.shifted_affine_act, name, slope))(
      x, stored, shift, a, b, residual
  )
  np.testing.assert_allclose(np.asarray(z, np.float64), np.asarray(fused, np.float64),
                             rtol=tolerance, atol=tolerance)
  if name is None and residual is None:
    plain = jax.jit(kernels.shifted_affine)(x, stored, shift, a, b)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(z))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_activations_of_infinities_and_nans(dtype):
  # relu(-inf) is 0, never NaN (0 * -inf) or -0.; leaky_relu(-inf) is -inf; NaN stays NaN.
  shape = (5, 21)
  values = np.array([-np.inf, np.inf, np.nan, -3.0, -0.0, 0.0, 2.0, -1e-3])
  stored = jnp.asarray(np.resize(values, shape), dtype)
  x = stored.astype(f32)
  shift, a, b = jnp.zeros((1, 21)), jnp.full((1, 21), 2.0), jnp.zeros((1, 21))
  relu, leaky = (
      np.asarray(jax.jit(functools.partial(kernels.shifted_affine_act, name, slope))(
          x, stored, shift, a, b, None), np.float64)
      for name, slope in (("relu", 0.0), ("leaky_relu", 0.1))
  )
  stored = np.asarray(stored, np.float64)
  nan = np.isnan(stored)
  assert np.isnan(relu[nan]).all() and np.isnan(leaky[nan]).all()
  assert not np.signbit(relu[~nan]).any()
  np.testing.assert_array_equal(relu[~nan], np.maximum(2 * stored[~nan], 0))
  np.testing.assert_array_equal(leaky[stored == -np.inf], -np.inf)
  np.testing.assert_array_equal(leaky[stored == np.inf], np.inf)


def test_relu_with_infinite_padding_in_masked_entries_keeps_gradients_finite():
  # Masked-out rows of -inf padding, closed by relu: their x - K takes no part
  # in a product, so the gradients equal those with a finite padding.
  rng = np.random.default_rng(7)
  x = jnp.asarray(np.concatenate([rng.standard_normal((6, 3)), np.full((2, 3), -np.inf)]), f32)
  mask = jnp.asarray(np.arange(8) < 6)[:, None]
  scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, -0.2, 0.3])
  weights = jnp.arange(1.0, 25.0).reshape(8, 3) * jnp.asarray(np.arange(8) < 6)[:, None]

  def loss(x, scale, bias):
    z = train_step(kernels, (1,), x, scale, bias, mask, "relu")
    return jnp.sum(jnp.where(weights > 0, jnp.sin(z), 0) * weights)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  got, want = grad(x, scale, bias), grad(x.at[6:].set(-1e30), scale, bias)
  for g, w in zip(got, want, strict=True):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "row", "full"])
@pytest.mark.parametrize("t_dtype", ["stored", f32], ids=dtype_id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_weighted_sums_match_float64(dtype, t_dtype, mask_kind, gated):
  # The backward reductions: sum(w t), sum(w t (x - K)), w = m act'(z).
  view, kept = (2, 37, 19, 6), (0, 2)  # (G, A, C, B)
  rng = np.random.default_rng(3)
  stored = jnp.asarray(rng.standard_normal(view) * 2 + 1, dtype)
  t = jnp.asarray(rng.standard_normal(view), dtype if t_dtype == "stored" else t_dtype)
  z = jnp.asarray(rng.standard_normal(view), dtype) if gated else None
  shift = jnp.asarray(rng.standard_normal((2, 1, 19, 1)), f32)
  mask = make_mask(mask_kind, view, kept, rng)
  if mask_kind == "row":  # (G, A, 1, B)
    mask = jnp.broadcast_to(mask, (2, 37, 1, 6))
  slope = 0.3
  layout = kernels.Layout((0,), (1,), (2,), (3,))
  w1, w2 = jax.jit(functools.partial(_primitives.weighted_sums, layout=layout, slope=slope))(
      t, stored, shift, mask, z)
  weight = np.ones(view) if mask is None else np.broadcast_to(np.asarray(mask), view) * 1.0
  if gated:
    weight = weight * np.where(np.asarray(z, np.float64) > 0, 1.0, slope)
  weighted = weight * np.asarray(t, np.float64)
  deviation = np.asarray(stored, np.float64) - np.asarray(shift, np.float64)
  for got, terms in ((w1, weighted), (w2, weighted * deviation)):
    assert got.dtype == f32 and got.shape == shift.shape
    expected = terms.sum((1, 3), keepdims=True)
    np.testing.assert_allclose(got, expected,
                               atol=SUM_TOLERANCE * (np.abs(terms).sum((1, 3)).max() + 1))


def test_empty_reduction_gives_zero_sums():
  x = jnp.zeros((0, 7), f32)
  s1, s2 = jax.jit(functools.partial(kernels.shifted_sums, (0,)))(x, x, jnp.ones((1, 7)), None)
  np.testing.assert_array_equal(s1, np.zeros((1, 7)))
  np.testing.assert_array_equal(s2, np.zeros((1, 7)))


@pytest.mark.parametrize("activation", [None, "relu"])
def test_float64_takes_the_reference_lowering(activation):
  with jax.enable_x64(True):
    shape, kept = LAYOUTS["nchw"]
    stored, scale, bias = inputs(shape, kept, f64)
    step = functools.partial(train_step, kernels, kept, activation=activation)
    z = jax.jit(step)(stored, scale, bias)
    expected = jax.jit(functools.partial(train_step, FUSED, kept, activation=activation))(
        stored, scale, bias)
    assert z.dtype == f64
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)
    assert custom_calls(step, stored, scale, bias) == []
    assert "jaxbn_shifted_sums" in str(jax.make_jaxpr(step)(stored, scale, bias))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernels are CPU custom calls")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_compiled_step_calls_the_kernels(dtype):
  # Forward: the sums, then the affine map; backward: the reductions in one
  # pass. The final dx is XLA's own elementwise pass.
  shape, kept = LAYOUTS["nhwc"]
  stored, scale, bias = inputs(shape, kept, dtype)
  step = functools.partial(train_step, kernels, kept, activation="relu")

  def forward_and_backward(stored, scale, bias):
    z, vjp = jax.vjp(step, stored, scale, bias)
    return z, vjp(z)

  assert sorted(custom_calls(step, stored, scale, bias)) == [
      "jaxbn_shifted_affine", "jaxbn_shifted_sums"]
  assert sorted(custom_calls(forward_and_backward, stored, scale, bias)) == [
      "jaxbn_shifted_affine", "jaxbn_shifted_sums", "jaxbn_weighted_sums"]


def test_layout_without_a_view_takes_the_fused_path():
  shape, kept = (4, 5, 6, 3), (1, 3)
  stored, scale, bias = inputs(shape, kept, f32)
  step = functools.partial(train_step, kernels, kept)
  assert custom_calls(step, stored, scale, bias) == []
  np.testing.assert_allclose(
      jax.jit(step)(stored, scale, bias),
      jax.jit(functools.partial(train_step, FUSED, kept))(stored, scale, bias),
      rtol=1e-6, atol=1e-6,
  )



@pytest.mark.skipif(not jaxbn.kernels_available(), reason="the kernels did not load")
def test_auto_runs_the_kernels_to_take_statistics_and_xla_to_normalize_with_given_ones():
  # Normalizing with given statistics is one elementwise pass, which XLA fuses with its
  # neighbours; a custom call would stand between them.
  x = jnp.ones((8, 4, 4, 3))
  state = jaxbn.init_state(3)
  step = lambda training: lambda x: jaxbn.batch_norm(x, state, training=training)[0]  # noqa: E731
  assert sorted(custom_calls(step(True), x)) == ["jaxbn_shifted_affine", "jaxbn_shifted_sums"]
  assert custom_calls(step(False), x) == []
  assert custom_calls(lambda x: jaxbn.normalize(x, state.mean, state.var), x) == []
  explicit = lambda x: jaxbn.batch_norm(x, state, training=False, implementation="kernel")[0]  # noqa: E731
  assert custom_calls(explicit, x) == ["jaxbn_shifted_affine"]
