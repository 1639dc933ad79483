"""A ResNet training step with Flax's BatchNorm, with jaxbn's, and without normalization.

The network is the CIFAR ResNet-20 of He et al. (2016, section 4.2) in Flax
linen, NHWC: a 3x3 convolution, three stages of three basic blocks (16, 32 and
64 channels; the second and third stages halve the resolution, with a 1x1
convolution on the shortcut), global average pooling and a dense layer of 10
classes. Its 21 BatchNorm layers see 6.4 M activations per training batch of
32 images of 32x32x3, as many as the 32x56x56x64 shape of the per-shape table.

A step is what a training loop jits: the softmax cross-entropy and its
gradient (``jax.value_and_grad``), an SGD update with momentum 0.9 (optax),
and the new ``batch_stats``. The step is built three times, only the
normalization layer changed:

* ``flax-linen``: ``flax.linen.BatchNorm``;
* ``jaxbn``: ``jaxbn.linen.BatchNorm`` (a drop-in subclass, with the default
  implementation) on the same variables (``init_variables``);
* ``no-norm``: a layer that returns its input.

Each is compiled ahead of time (compile time apart), and they are timed
taking turns (``runner.measure``); rows report median step times.
BatchNorm's share of a step is (step time - ``no-norm``'s) / step time: what
the normalization costs, if XLA compiles the rest of the step alike.
"""

import functools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn.linen

from .contenders import compile_ahead
from .runner import Config, measure, progress

WORKLOAD = "resnet20"
BASELINE = "flax-linen"
BATCH_SHAPE = (32, 32, 32, 3)
STAGES = (3, 3, 3)
WIDTHS = (16, 32, 64)
CLASSES = 10
MOMENTUM = 0.9  # of the running statistics, as in Flax's examples
LEARNING_RATE = 0.1


class NoNorm(nn.Module):
  """Takes BatchNorm's arguments and returns its input: the step without normalization."""

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  def __call__(self, x):
    return x


NORMS = {"flax-linen": nn.BatchNorm, "jaxbn": jaxbn.linen.BatchNorm, "no-norm": NoNorm}


class BasicBlock(nn.Module):
  """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``, 3x3 convolutions."""

  features: int
  strides: int
  norm: Callable[[], nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, self.features, use_bias=False, dtype=self.dtype)
    y = nn.relu(self.norm()(conv((3, 3), self.strides)(x)))
    y = self.norm()(conv((3, 3))(y))
    if x.shape != y.shape:
      x = self.norm()(conv((1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet for small images: ``stages[i]`` basic blocks of ``widths[i]`` channels."""

  norm: type[nn.Module]
  stages: Sequence[int] = STAGES
  widths: Sequence[int] = WIDTHS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(
        self.norm, use_running_average=not train, momentum=MOMENTUM, dtype=self.dtype
    )
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm()(x))
    for stage, (blocks, width) in enumerate(zip(self.stages, self.widths, strict=True)):
      for block in range(blocks):
        x = BasicBlock(width, 2 if stage and not block else 1, norm, self.dtype)(x)
    return nn.Dense(CLASSES, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


def train_step(model: ResNet, optimizer: optax.GradientTransformation):
  """The training step, to jit.

  ``step(params, batch_stats, opt_state, x, labels)`` returns the new
  ``params``, ``batch_stats`` and ``opt_state``, and the loss.
  """

  def loss_fn(params, batch_stats, x, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return loss.mean(), updates.get("batch_stats", {})

  def step(params, batch_stats, opt_state, x, labels):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, batch_stats), grads = grad_fn(params, batch_stats, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def _batch(batch_shape, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(batch_shape, np.float32), dtype)
  return x, jnp.arange(batch_shape[0]) % CLASSES


def init_variables(model: ResNet, x: jax.Array) -> dict:
  """The variables of ``model`` for input ``x``, made with NumPy.

  Kernels are He-normal, ``scale`` and ``var`` ones, the rest zeros. The
  shapes come from ``jax.eval_shape`` of ``model.init``: running ``init``
  compiled Flax's random initializers for several seconds.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = path[-1].key
    if name == "kernel":
      he_std = np.sqrt(2 / math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) * he_std, leaf.dtype)
    return jnp.full(leaf.shape, 1 if name in ("scale", "var") else 0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, shapes)


def compiled_steps(dtype, stages=STAGES, widths=WIDTHS, batch_shape=BATCH_SHAPE):
  """``{norm: (run, compile_ms)}``: the compiled training step with each of ``NORMS``."""
  x, labels = _batch(batch_shape, dtype)
  flax_variables = init_variables(ResNet(nn.BatchNorm, stages, widths, dtype), x)
  optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)
  steps = {}
  for name, norm in NORMS.items():
    model = ResNet(norm, stages, widths, dtype)
    variables = init_variables(model, x) if name == "no-norm" else flax_variables
    params = variables["params"]
    args = (params, variables.get("batch_stats", {}), optimizer.init(params), x, labels)
    run, compile_ms, _ = compile_ahead(train_step(model, optimizer), args)
    steps[name] = (run, compile_ms)
  return steps


def _rows(dtype, batch_shape, samples, compile_ms, other_load) -> list[dict]:
  medians = {name: statistics.median(times) for name, times in samples.items()}
  rows = []
  for name, ms in medians.items():
    norm_ms = None if name == "no-norm" else ms - medians["no-norm"]
    rows.append({
        "workload": WORKLOAD,
        "contender": name,
        "baseline": BASELINE,
        "dtype": dtype,
        "batch_shape": list(batch_shape),
        "median_ms": ms,
        "compile_ms": compile_ms[name],
        "x_baseline": ms / medians[BASELINE],
        "norm_ms": norm_ms,
        "norm_share": None if norm_ms is None else norm_ms / ms,
        "other_load": other_load,
    })
  return rows


def step_rows(
    config: Config, stages=STAGES, widths=WIDTHS, batch_shape=BATCH_SHAPE
) -> list[dict]:
  """Times the training step with each normalization, per dtype of ``config``.

  Returns one row per dtype and normalization (see ``report.validate``).
  """
  rows = []
  for dtype in progress(config.dtypes, config.progress, lambda d: f"{WORKLOAD} step, {d}"):
    steps = compiled_steps(jnp.dtype(dtype), stages, widths, batch_shape)
    runs = {name: run for name, (run, _) in steps.items()}
    samples, other_load = measure([runs], config, config.workload_reps)
    compile_ms = {name: ms for name, (_, ms) in steps.items()}
    rows += _rows(dtype, batch_shape, samples, compile_ms, other_load)
  return rows
