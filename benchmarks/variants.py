"""Benchmarks of the batch-norm variants: ``python -m benchmarks.variants [--quick]``.

1. Fused activation and residual. ``relu(bn(x) + r)``, forward and backward,
   computed three ways: inside ``jaxbn.batch_norm`` (``activation="relu",
   residual=r``), as ``jaxbn.batch_norm`` followed by ``relu(y + r)``, and as
   ``flax.linen.BatchNorm`` followed by the same. Median time over interleaved
   rounds (compile time apart) and the bytes the VJP keeps for the backward
   pass (its residuals, the input ``x`` included).
2. Memory of a 20-layer conv + BN + leaky_relu network, training step, with
   the fused backward (keeps each BN's input) and the In-Place ABN one
   (``inplace=True``: keeps each BN's output, which the next convolution keeps
   anyway): residual bytes and activation-sized residuals as JAX's reverse mode
   asks to keep them, the compiled step's temporary memory as XLA plans it, and
   the step's median time.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxbn

from .contenders import nbytes, residual_bytes, residuals
from .runner import cores, time_interleaved
from .shapes import MLP, RESNET_MID, RESNET_STEM, TINY

FULL_SHAPES = (RESNET_STEM, RESNET_MID, MLP)
QUICK_SHAPES = (RESNET_MID, TINY)


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
    runs, compile_ms, kept = {}, {}, {}
    for name, f in _fused_act_contenders(shape.features).items():

      def step(x, r, scale, bias, dz, f=f):
        z, vjp = jax.vjp(f, x, r, scale, bias)
        return z, vjp(dz)

      start = time.perf_counter()
      compiled = jax.jit(step).lower(*args, dz).compile()
      compile_ms[name] = (time.perf_counter() - start) * 1e3
      runs[name] = lambda compiled=compiled, args=args, dz=dz: compiled(*args, dz)
      kept[name] = residual_bytes(f, *args)
    samples = time_interleaved([runs], reps, warmup)
    for name, times in samples.items():
      rows.append({"shape": shape.key, "contender": name,
                   "median_ms": statistics.median(times), "compile_ms": compile_ms[name],
                   "residual_bytes": kept[name], "x_bytes": x.size * x.dtype.itemsize})
  return rows


def _print_fused_activation(rows) -> None:
  print("\nrelu(bn(x) + r), forward+backward, float32, training")
  print(f"{'shape':>16} {'contender':>14} {'median ms':>10} {'compile ms':>10} "
        f"{'residual MB':>12} {'residual / x':>12}")
  for row in rows:
    print(f"{row['shape']:>16} {row['contender']:>14} {row['median_ms']:10.3f} "
          f"{row['compile_ms']:10.0f} {row['residual_bytes'] / 2**20:12.2f} "
          f"{row['residual_bytes'] / row['x_bytes']:12.2f}")


def _conv_bn_network(kernels, x, inplace):
  """``x -> leaky_relu(bn(conv(x)))``, once per kernel; returns the sum of squares."""
  for w in kernels:
    h = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x, _ = jaxbn.batch_norm(h, jaxbn.init_state(w.shape[-1]), jnp.ones(w.shape[-1]),
                            jnp.zeros(w.shape[-1]), training=True, activation="leaky_relu",
                            inplace=inplace)
  return jnp.sum(jnp.square(x))


def bench_inplace_memory(shape, layers, reps, warmup) -> list[dict]:
  """Residual and compiled memory of the network's training step, fused and in place."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  c = shape[-1]
  kernels = [jnp.asarray(rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)
             for _ in range(layers)]
  rows, runs = [], {}
  for inplace in (False, True):
    name = "in-place" if inplace else "fused"

    def loss(kernels, x, inplace=inplace):
      return _conv_bn_network(kernels, x, inplace)

    leaves = residuals(loss, kernels, x)
    compiled = jax.jit(jax.grad(loss)).lower(kernels, x).compile()
    memory = compiled.memory_analysis()
    runs[name] = lambda compiled=compiled: compiled(kernels, x)
    rows.append({
        "backward": name,
        "residual_bytes": nbytes(leaves),
        "activation_sized": sum(leaf.size == x.size for leaf in leaves),
        "temp_bytes": None if memory is None else memory.temp_size_in_bytes,
    })
  samples = time_interleaved([runs], reps, warmup)
  for row in rows:
    row["median_ms"] = statistics.median(samples[row["backward"]])
  return rows


def _print_inplace_memory(rows, shape, layers) -> None:
  mb = 2**20
  activation = int(np.prod(shape)) * 4
  print(f"\n{layers} x (conv 3x3 -> BN -> leaky_relu), x {'x'.join(map(str, shape))} float32 "
        f"({activation / mb:.2f} MB per activation), training step")
  print(f"{'backward':>9} {'residual MB':>12} {'activation-sized':>17} {'XLA temp MB':>12} "
        f"{'median ms':>10}")
  for row in rows:
    temp = "n/a" if row["temp_bytes"] is None else f"{row['temp_bytes'] / mb:.2f}"
    print(f"{row['backward']:>9} {row['residual_bytes'] / mb:12.2f} "
          f"{row['activation_sized']:17d} {temp:>12} {row['median_ms']:10.2f}")
  print("residual MB / activation-sized: what reverse mode keeps between a separate forward\n"
        "and backward (jax.vjp, remat, offloading). XLA temp: the jitted step as one program,\n"
        "in which XLA may recompute elementwise chains instead of reading what JAX kept.")


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
  shape, layers = ((4, 16, 16, 32) if args.quick else (8, 32, 32, 64)), 20
  _print_inplace_memory(bench_inplace_memory(shape, layers, reps, warmup=2), shape, layers)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
