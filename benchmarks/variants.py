"""Benchmarks of the batch-norm variants: ``python -m benchmarks.variants [--quick]``.

1. Fused activation and residual. ``relu(bn(x) + r)``, forward and backward,
   computed three ways: inside ``jaxbn.batch_norm`` (``activation="relu",
   residual=r``), as ``jaxbn.batch_norm`` followed by ``relu(y + r)``, and as
   ``flax.linen.BatchNorm`` followed by the same. Median time over interleaved
   rounds (compile time apart) and the bytes the VJP keeps for the backward
   pass (its residuals, the input ``x`` included).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

from .runner import cores, time_interleaved
from .shapes import MLP, RESNET_MID, RESNET_STEM, TINY

FULL_SHAPES = (RESNET_STEM, RESNET_MID, MLP)
QUICK_SHAPES = (RESNET_MID, TINY)


def residual_bytes(f, *args) -> int:
  """Bytes of what ``jax.vjp(f, *args)`` keeps for the backward pass."""
  vjp_fn = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args)
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn)))


def _fused_act_contenders(features):
  """``name -> f(x, r, scale, bias) -> z`` for ``relu(bn(x) + r)`` in training."""
  import flax.linen as nn

  state = jaxbn.init_state(features)
  module = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  stats = {"mean": jnp.zeros(features), "var": jnp.ones(features)}

  def fused(x, r, scale, bias):
    return jaxbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9,
                            activation="relu", residual=r)[0]

  def unfused(x, r, scale, bias):
    y, _ = jaxbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9)
    return jax.nn.relu(y + r)

  def flax_unfused(x, r, scale, bias):
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
    y, _ = module.apply(variables, x, mutable=["batch_stats"])
    return jax.nn.relu(y + r)

  return {"jaxbn-fused": fused, "jaxbn-unfused": unfused, "flax-unfused": flax_unfused}


def bench_fused_activation(shapes, reps, warmup) -> list[dict]:
  """Times forward+backward of each contender on each shape; returns one row per pair."""
  rows = []
  for shape in shapes:
    rng = np.random.default_rng(0)
    x, r, dz = (jnp.asarray(rng.standard_normal(shape.shape), jnp.float32) for _ in range(3))
    scale, bias = jnp.ones(shape.features), jnp.zeros(shape.features)
    args = (x, r, scale, bias)
    runs, compile_ms, residuals = {}, {}, {}
    for name, f in _fused_act_contenders(shape.features).items():

      def step(x, r, scale, bias, dz, f=f):
        z, vjp = jax.vjp(f, x, r, scale, bias)
        return z, vjp(dz)

      start = time.perf_counter()
      compiled = jax.jit(step).lower(*args, dz).compile()
      compile_ms[name] = (time.perf_counter() - start) * 1e3
      runs[name] = lambda compiled=compiled, args=args, dz=dz: compiled(*args, dz)
      residuals[name] = residual_bytes(f, *args)
    samples = time_interleaved(runs, reps, warmup)
    for name, times in samples.items():
      rows.append({"shape": shape.key, "contender": name,
                   "median_ms": statistics.median(times), "compile_ms": compile_ms[name],
                   "residual_bytes": residuals[name], "x_bytes": x.size * x.dtype.itemsize})
  return rows


def _print_fused_activation(rows) -> None:
  print("\nrelu(bn(x) + r), forward+backward, float32, training")
  print(f"{'shape':>16} {'contender':>14} {'median ms':>10} {'compile ms':>10} "
        f"{'residual MB':>12} {'residual / x':>12}")
  for row in rows:
    print(f"{row['shape']:>16} {row['contender']:>14} {row['median_ms']:10.3f} "
          f"{row['compile_ms']:10.0f} {row['residual_bytes'] / 2**20:12.2f} "
          f"{row['residual_bytes'] / row['x_bytes']:12.2f}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="small shapes and few rounds (about a minute on 2 cores)")
  parser.add_argument("--reps", type=int, help="timed rounds per case (default 20, quick 5)")
  args = parser.parse_args(argv)
  reps = args.reps or (5 if args.quick else 20)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {cores()} cores, jax {jax.__version__}")
  rows = bench_fused_activation(QUICK_SHAPES if args.quick else FULL_SHAPES, reps, warmup=2)
  _print_fused_activation(rows)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
