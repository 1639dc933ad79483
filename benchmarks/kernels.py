"""Timings of the kernels against XLA, PyTorch and the memory-bound ideal (a development tool).

Run ``python -m benchmarks.kernels [--dtype float32 bfloat16] [--rounds 7]``
on CPU. All contenders of a row run in one process and are timed as in the
suite (``runner.time_interleaved``: after warm-up, turns in a shuffled order,
PyTorch in a phase of its own, freed memory kept by the allocator); each time
is a median. The machine's bandwidth varies from run to run: compare ratios.

Per input shape (features last, and NCHW with ``axis=1``), with ``N`` the
bytes of ``x``:

* ``sums``: the one-pass shifted sums against ``_fused.shifted_sums`` (two
  passes): reads N. XLA's plain ``sum(x)`` (one output) for comparison.
* ``bwd sums``: the backward reductions ``sum(dz), sum(dz (x - K))`` in one
  pass against XLA's reductions of the same: reads 2 N.
* ``affine``: ``(x - K) a + b`` against XLA's elementwise fusion: 2 N.
* ``step``: a training step's forward and backward (statistics, the affine
  map, then the gradients of x, scale and bias) built from the kernels,
  from the fused XLA pieces, and PyTorch's ``batch_norm`` on channels-last
  tensors (its own backward), against the ideal: 8 N bytes at the
  bandwidth of ``x + 1`` (which reads and writes N).
"""

import argparse
import functools
import os
import statistics

# PyTorch's OpenMP threads would otherwise spin between its calls, taking the
# cores from XLA's threads that run in turn with them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import runner
from jaxbn import _activation, _fused
from jaxbn import _kernels as kernels
from jaxbn._kernels import _primitives

SHAPES = (  # (shape, feature axis)
    ((32, 56, 56, 64), 3),
    ((64, 14, 14, 256), 3),
    ((32, 7, 7, 2048), 3),
    ((4096, 1024), 1),
    ((32, 64, 56, 56), 1),
)
TINY = ((8, 16), 1)  # the fixed cost of a call
FUSED = (_fused.shifted_sums, _fused.shifted_affine, _activation.shifted_affine_act)
KERNELS = (kernels.shifted_sums, kernels.shifted_affine, kernels.shifted_affine_act)


def train_step(pieces, axis, x, scale, bias):
  """Batch norm's training output from ``pieces`` (sums, affine), as ``jaxbn.batch_norm``."""
  sums, affine, _ = pieces
  axes = tuple(i for i in range(x.ndim) if i != axis)
  xc = x.astype(jnp.float32)
  first = tuple(slice(None) if i == axis else slice(0, 1) for i in range(x.ndim))
  shift = jax.lax.stop_gradient(xc[first])
  s1, s2 = sums(axes, xc, x, shift, None)
  n = x.size // x.shape[axis]
  delta = s1 / n
  a = jax.lax.rsqrt((s2 - s1 * delta) / n + 1e-5) * scale.reshape(shift.shape)
  return affine(xc, x, shift, a, bias.reshape(shift.shape) - delta * a)


def forward_and_backward(pieces, axis):
  def run(x, scale, bias, dz):
    z, vjp = jax.vjp(functools.partial(train_step, pieces, axis), x, scale, bias)
    return z, vjp(dz)

  return jax.jit(run)


def torch_step(shape, axis, dtype):
  """PyTorch's batch_norm forward and backward on the same data, or None without PyTorch."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  if len(shape) == 4 and axis == 3:  # NHWC data: an NCHW tensor in channels-last memory
    n, h, w, c = shape
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
  else:
    x = torch.randn(*shape, dtype=dtype)
  features = x.shape[1]
  x.requires_grad_(True)
  weight = torch.ones(features, requires_grad=True)
  bias = torch.zeros(features, requires_grad=True)
  dy = torch.randn_like(x)

  def run():
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    y.backward(dy)
    return y

  return run


def _call(fn, *args):
  return functools.partial(jax.jit(fn), *args)


def measure(shape, axis, dtype, rounds):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  dz = jnp.asarray(rng.standard_normal(shape), dtype)
  features = shape[axis]
  scale, bias = jnp.ones(features), jnp.zeros(features)
  kept = (axis,)
  layout = kernels.layout(shape, kept)
  axes = layout.reduced
  keep = layout.keepdims(shape)
  shift = jnp.full(keep, 0.1, jnp.float32)
  xc = x.astype(jnp.float32)
  reference_sums = functools.partial(_primitives.weighted_sums_reference, layout=layout)
  contenders = {
      "copy": _call(lambda x: x + 1, x),
      "sums kernel": _call(functools.partial(kernels.shifted_sums, axes), xc, x, shift, None),
      "sums xla": _call(functools.partial(_fused.shifted_sums, axes), xc, x, shift, None),
      "plain sum xla": _call(lambda x: jnp.sum(x, axes, dtype=jnp.float32), x),
      "bwd sums kernel": _call(
          functools.partial(_primitives.weighted_sums, layout=layout), dz, x, shift),
      "bwd sums xla": _call(reference_sums, dz, x, shift),
      "affine kernel": _call(kernels.shifted_affine, xc, x, shift, shift, shift),
      "affine xla": _call(_fused.shifted_affine, xc, x, shift, shift, shift),
      "step kernels": functools.partial(forward_and_backward(KERNELS, axis), x, scale, bias, dz),
      "step fused": functools.partial(forward_and_backward(FUSED, axis), x, scale, bias, dz),
  }
  phases = [contenders]
  torch_run = torch_step(shape, axis, dtype)
  if torch_run is not None:
    phases.append({"step torch": torch_run})
  samples = runner.time_interleaved(phases, reps=rounds, warmup=2)
  seconds = {name: statistics.median(ms) / 1e3 for name, ms in samples.items()}
  return seconds, x.size * x.dtype.itemsize


COLUMNS = (
    "shape", "dtype", "copy GB/s", "sums GB/s", "sums: XLA / kernel", "plain sum GB/s",
    "bwd sums GB/s", "bwd sums: XLA / kernel", "affine GB/s", "affine: XLA / kernel",
    "step ms", "step / ideal", "step: fused / kernels", "step: kernels / torch",
)


def report(shape, axis, dtype, t, n):
  """One markdown table row of ``COLUMNS``."""
  bandwidth = 2 * n / t["copy"]
  ideal = 8 * n / bandwidth
  cells = [
      f"{'x'.join(map(str, shape))}" + ("" if axis == len(shape) - 1 else f" (axis {axis})"),
      dtype,
      f"{bandwidth / 1e9:.1f}",
      f"{n / t['sums kernel'] / 1e9:.1f}",
      f"{t['sums xla'] / t['sums kernel']:.2f}",
      f"{n / t['plain sum xla'] / 1e9:.1f}",
      f"{2 * n / t['bwd sums kernel'] / 1e9:.1f}",
      f"{t['bwd sums xla'] / t['bwd sums kernel']:.2f}",
      f"{2 * n / t['affine kernel'] / 1e9:.1f}",
      f"{t['affine xla'] / t['affine kernel']:.2f}",
      f"{t['step kernels'] * 1e3:.3f}",
      f"{t['step kernels'] / ideal:.2f}",
      f"{t['step fused'] / t['step kernels']:.2f}",
      f"{t['step kernels'] / t['step torch']:.2f}" if "step torch" in t else "-",
  ]
  return "| " + " | ".join(cells) + " |"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  runner.retain_freed_memory()
  print(f"jax {jax.__version__}, kernels {kernels.available()} ({kernels.isa()}), "
        f"{os.cpu_count()} CPUs\n")
  print("| " + " | ".join(COLUMNS) + " |")
  print("|" + "---|" * len(COLUMNS))
  for dtype in args.dtype:
    for shape, axis in SHAPES:
      t, n = measure(shape, axis, dtype, args.rounds)
      print(report(shape, axis, dtype, t, n), flush=True)
  for dtype in args.dtype:
    t, _ = measure(*TINY, dtype, args.rounds)
    print(f"\n{'x'.join(map(str, TINY[0]))} {dtype}, microseconds per call: " + ", ".join(
        f"{name} {seconds * 1e6:.1f}" for name, seconds in t.items()))


if __name__ == "__main__":
  main()
