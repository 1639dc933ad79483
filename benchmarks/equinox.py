"""Benchmark of an Equinox training step: ``python -m benchmarks.equinox [--quick]``.

Equinox models are written per example and vmapped over the batch with an
``axis_name``, which each BatchNorm uses for its batch statistics. Two such
models, each built once with ``equinox.nn.BatchNorm`` and once with
``jaxbn.equinox.BatchNorm`` (the one-import swap), plus ``jaxbn-relu`` (jaxbn's
class with the ReLU fused into it, ``activation="relu"``):

* ``cnn``: (conv 3x3 -> BatchNorm -> relu) x 2 -> global mean -> linear, on
  ``(3, H, W)`` images;
* ``mlp``: (linear -> BatchNorm -> relu) x 2 -> linear.

A training step is ``eqx.filter_jit`` of ``eqx.filter_value_and_grad`` of the
mean cross-entropy through ``jax.vmap(model, axis_name="batch")``, threading
the ``eqx.nn.State``, then a plain SGD update of the parameters; the inference
step is the vmapped ``eqx.nn.inference_mode(model)``. The contenders run in the
same process, taking turns in a shuffled order (``runner.time_interleaved``),
and each row reports the median after warm-up, the first call (compilation)
apart, and ``x_equinox``: the time over Equinox's class's for the same model,
mode and step (below 1 is faster).

``run()`` returns the rows (a list of dicts) and ``main()`` prints them;
``step_rows(config)`` gives the training steps to the main suite as workloads
(``python -m benchmarks``, see ``runner.run_workloads``).
"""

import argparse
import statistics
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn.equinox

from .runner import cores, measure, progress, time_interleaved

CONTENDERS = ("equinox", "jaxbn", "jaxbn-relu")
MODES = ("batch", "ema")
STEPS = ("train", "inference")
CLASSES = 10
LEARNING_RATE = 0.01


class Model(NamedTuple):
  """A model to time: ``kind`` ("cnn" or "mlp"), its batch and its widths."""

  kind: str
  batch: int
  input_shape: tuple[int, ...]  # one example
  width: int

  @property
  def key(self) -> str:
    return f"{self.kind}-{self.batch}x{'x'.join(map(str, self.input_shape))}-w{self.width}"


FULL_MODELS = (Model("cnn", 64, (3, 32, 32), 32), Model("mlp", 512, (784,), 512))
QUICK_MODELS = (Model("cnn", 16, (3, 16, 16), 16), Model("mlp", 128, (784,), 256))


class Net(eqx.Module):
  """(layer -> BatchNorm -> relu) x 2 -> [global mean] -> linear, on one example."""

  layers: tuple
  norms: tuple
  head: eqx.nn.Linear
  fused_relu: bool = eqx.field(static=True)

  def __init__(self, model: Model, contender: str, mode: str, key):
    keys = jax.random.split(key, 3)
    width, channels = model.width, model.input_shape[0]
    if model.kind == "cnn":
      self.layers = (
          eqx.nn.Conv2d(channels, width, 3, padding=1, key=keys[0]),
          eqx.nn.Conv2d(width, width, 3, padding=1, key=keys[1]),
      )
    else:
      self.layers = (
          eqx.nn.Linear(channels, width, key=keys[0]),
          eqx.nn.Linear(width, width, key=keys[1]),
      )
    self.fused_relu = contender == "jaxbn-relu"
    if contender == "equinox":
      self.norms = tuple(eqx.nn.BatchNorm(width, "batch", mode=mode) for _ in self.layers)
    else:
      activation = "relu" if self.fused_relu else None
      self.norms = tuple(
          jaxbn.equinox.BatchNorm(width, "batch", mode=mode, activation=activation)
          for _ in self.layers
      )
    self.head = eqx.nn.Linear(width, CLASSES, key=keys[2])

  def __call__(self, x, state):
    for layer, norm in zip(self.layers, self.norms, strict=True):
      x, state = norm(layer(x), state)
      if not self.fused_relu:
        x = jax.nn.relu(x)
    if x.ndim > 1:
      x = jnp.mean(x, axis=tuple(range(1, x.ndim)))
    return self.head(x), state


def _loss(net, state, x, labels):
  logits, state = jax.vmap(
      net, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
  )(x, state)
  log_probs = jax.nn.log_softmax(logits)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
  return loss, state


@eqx.filter_jit
def train_step(net, state, x, labels):
  """One SGD step: ``(net, state, loss)``."""
  (loss, state), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(net, state, x, labels)
  net = eqx.apply_updates(net, jax.tree.map(lambda g: -LEARNING_RATE * g, grads))
  return net, state, loss


@eqx.filter_jit
def inference_step(net, state, x):
  """Logits with the running statistics."""
  logits, _ = jax.vmap(
      eqx.nn.inference_mode(net), in_axes=(0, None), out_axes=(0, None)
  )(x, state)
  return logits


def _cases(model: Model, mode: str, contenders):
  """``{(contender, step): run}`` for one model and mode, compiled; and the compile times."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((model.batch, *model.input_shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, CLASSES, model.batch), jnp.int32)
  runs, compile_ms = {}, {}

  def first_call(case, f, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    compile_ms[case] = (time.perf_counter() - start) * 1e3
    return out

  for contender in contenders:
    net, state = eqx.nn.make_with_state(Net)(model, contender, mode, jax.random.key(0))
    net, state, _ = first_call((contender, "train"), train_step, net, state, x, labels)
    net, state, _ = train_step(net, state, x, labels)  # inference reads trained statistics
    first_call((contender, "inference"), inference_step, net, state, x)
    runs[(contender, "train")] = lambda net=net, state=state: train_step(net, state, x, labels)
    runs[(contender, "inference")] = lambda net=net, state=state: inference_step(net, state, x)
  return runs, compile_ms


def run(
    quick: bool = False,
    reps: int | None = None,
    warmup: int = 2,
    models=None,
    modes=None,
    contenders=CONTENDERS,
) -> list[dict]:
  """Times each contender's training and inference steps; returns one row per case.

  Args:
    quick: small models, mode "batch" only, 5 rounds (about 30 s on 2 cores).
    reps: timed calls per case (default 20, quick 5).
    warmup: untimed calls per case before timing.
    models: the ``Model`` s to time (default ``QUICK_MODELS`` or ``FULL_MODELS``).
    modes: Equinox's BatchNorm modes (default ``("batch",)`` when quick, else ``MODES``).
    contenders: names from ``CONTENDERS``; ``"equinox"`` gives ``x_equinox``.

  Returns:
    Rows with ``model``, ``batch``, ``mode``, ``step``, ``contender``,
    ``median_ms``, ``compile_ms`` (the first call) and ``x_equinox`` (None
    without the ``"equinox"`` contender).
  """
  reps = reps or (5 if quick else 20)
  models = models or (QUICK_MODELS if quick else FULL_MODELS)
  modes = modes or (("batch",) if quick else MODES)
  rows = []
  for model in models:
    for mode in modes:
      runs, compile_ms = _cases(model, mode, contenders)
      samples = time_interleaved([runs], reps, warmup)
      medians = {case: statistics.median(times) for case, times in samples.items()}
      for (contender, step), median in medians.items():
        baseline = medians.get(("equinox", step))
        rows.append({
            "model": model.key,
            "batch": model.batch,
            "mode": mode,
            "step": step,
            "contender": contender,
            "median_ms": median,
            "compile_ms": compile_ms[(contender, step)],
            "x_equinox": None if baseline is None else median / baseline,
        })
  return rows


def step_rows(config) -> list[dict]:
  """The training steps as workloads of the main suite, in ``report.validate``'s schema.

  One row per model, mode and contender (float32; ``--quick``: the quick models
  in mode "batch"), timed with ``config``'s settings; the baseline is
  Equinox's class.
  """
  models = QUICK_MODELS if config.quick else FULL_MODELS
  cases = [(model, mode) for model in models for mode in (("batch",) if config.quick else MODES)]
  rows = []
  for model, mode in progress(cases, config.progress, lambda c: f"equinox {c[0].key} {c[1]}"):
    runs, compile_ms = _cases(model, mode, CONTENDERS)
    train = {contender: runs[(contender, "train")] for contender in CONTENDERS}
    samples, other_load = measure([train], config, config.workload_reps)
    medians = {contender: statistics.median(times) for contender, times in samples.items()}
    rows += [{
        "workload": f"equinox-{model.kind}-{mode}",
        "contender": contender,
        "baseline": "equinox",
        "dtype": "float32",
        "batch_shape": [model.batch, *model.input_shape],
        "median_ms": median,
        "compile_ms": compile_ms[(contender, "train")],
        "x_baseline": median / medians["equinox"],
        "norm_ms": None,
        "norm_share": None,
        "other_load": other_load,
    } for contender, median in medians.items()]
  return rows


# (header, row key, width, format) of the printed table.
COLUMNS = (
    ("model", "model", 24, "{}"),
    ("mode", "mode", 5, "{}"),
    ("step", "step", 9, "{}"),
    ("contender", "contender", 10, "{}"),
    ("median ms", "median_ms", 10, "{:.3f}"),
    ("compile ms", "compile_ms", 10, "{:.0f}"),
    ("x equinox", "x_equinox", 9, "{:.2f}"),
)


def print_table(rows) -> None:
  print(" ".join(f"{header:>{width}}" for header, _, width, _ in COLUMNS))
  for row in rows:
    cells = ("" if row[key] is None else form.format(row[key]) for _, key, _, form in COLUMNS)
    widths = (width for _, _, width, _ in COLUMNS)
    print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.equinox", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="small models, mode 'batch', few rounds (about 30 s on 2 cores)")
  parser.add_argument("--reps", type=int, help="timed calls per case (default 20, quick 5)")
  parser.add_argument("--modes", nargs="+", choices=MODES, help="Equinox BatchNorm modes")
  parser.add_argument("--models", nargs="+", choices=("cnn", "mlp"), help="models to time")
  args = parser.parse_args(argv)
  models = QUICK_MODELS if args.quick else FULL_MODELS
  if args.models:
    models = tuple(m for m in models if m.kind in args.models)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), {cores()} cores, "
        f"jax {jax.__version__}, equinox {eqx.__version__}")
  print_table(run(quick=args.quick, reps=args.reps, models=models, modes=args.modes))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
