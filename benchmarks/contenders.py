"""The implementations under test, each built into a ready-to-time ``Case``.

A contender is built for one input ``Shape``, dtype and mode:

* ``"forward"``: one training step, ``y`` and the new running statistics;
* ``"forward+backward"``: the training step and its VJP for a given ``dy``:
  ``y``, the new statistics, ``dx``, ``dscale`` and ``dbias``;
* ``"inference"``: ``y`` from the running statistics.

JAX contenders are jitted and compiled ahead of time (the compile time is kept
apart from the run time), so a call runs only the compiled executable.
``jaxbn`` is ``jaxbn.batch_norm`` as users call it, with the default
``implementation``; ``jaxbn-kernel``, ``jaxbn-fused`` (the XLA path) and
``jaxbn-reference`` name theirs. Every contender normalizes over the shape's
feature axis (``axis=1`` for NCHW shapes).
PyTorch contenders call ``torch.nn.functional.batch_norm`` eagerly, as people
use it (cuDNN on a GPU). Every contender gets the same data, momentum 0.99
(PyTorch's 0.01) and epsilon 1e-5; scale and bias are float32 parameters,
the output has the input's dtype.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

from .shapes import Shape

MODES = ("forward", "forward+backward", "inference")
JAX_CONTENDERS = (
    "jaxbn",
    "jaxbn-kernel",
    "jaxbn-fused",
    "jaxbn-reference",
    "flax-linen",
    "flax-linen-fastvar",
    "flax-nnx",
)
# The `implementation` each jaxbn contender passes; None passes none (the default).
JAXBN_IMPLEMENTATIONS = {
    "jaxbn": None,
    "jaxbn-kernel": "kernel",
    "jaxbn-fused": "fused",
    "jaxbn-reference": "reference",
}
TORCH_CONTENDERS = ("torch-nchw", "torch-channels-last")
MOMENTUM = 0.99
EPSILON = 1e-5


class Case(NamedTuple):
  """One contender, ready to time: ``run()`` makes one call and returns its outputs."""

  contender: str
  layout: str  # the memory layout of x, e.g. "NHWC" or "NCHW"
  run: Callable[[], Any]
  compile_ms: float | None  # None for eager contenders
  residual_bytes: int | None  # what the VJP keeps for the backward pass; None in inference
  peak_bytes: int | None  # arguments + outputs + scratch of the compiled call


def make_data(shape: Shape, dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(x, dy)`` as NumPy arrays in ``dtype``; ``x`` has mean 0.5 and std 2."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape.shape, np.float32) * 2 + 0.5
  dy = rng.standard_normal(shape.shape, np.float32)
  return tuple(np.asarray(jnp.asarray(a, dtype)) for a in (x, dy))


def compile_ahead(fn, args) -> tuple[Callable[[], Any], float, int]:
  """Compiles ``fn(*args)``; returns ``(call, compile_ms, peak_bytes)``."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_ms = (time.perf_counter() - start) * 1e3
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
  return (lambda: compiled(*args)), compile_ms, peak


def residuals(f, *args) -> list[jax.ShapeDtypeStruct]:
  """The arrays ``jax.vjp(f, *args)`` keeps for the backward pass, as shapes and dtypes."""
  return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))


def nbytes(arrays) -> int:
  """The bytes of ``arrays`` (arrays or shapes and dtypes) together."""
  return int(sum(a.size * a.dtype.itemsize for a in arrays))


def residual_bytes(f, *args) -> int:
  """Bytes of what ``jax.vjp(f, *args)`` keeps for the backward pass."""
  return nbytes(residuals(f, *args))


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _jax_case(name, layout, mode, step, params, x, dy, extra) -> Case:
  """Builds a case from ``step(params, x, extra) -> (y, new_stats)``.

  ``params`` are differentiated together with ``x``; ``extra`` (running
  statistics) is not.
  """
  if mode == "forward+backward":

    def fn(params, x, extra, dy):
      (y, stats), vjp = jax.vjp(lambda p, x: step(p, x, extra), params, x)
      dparams, dx = vjp((dy, _zeros_like(stats)))
      return y, stats, dx, dparams

    args = (params, x, extra, dy)
  else:
    fn, args = step, (params, x, extra)
  run, compile_ms, peak = compile_ahead(fn, args)
  residuals = None
  if mode != "inference":
    residuals = residual_bytes(lambda p, x: step(p, x, extra), params, x)
  return Case(name, layout, run, compile_ms, residuals, peak)


def unavailable() -> dict[str, str]:
  """The JAX contenders this jaxbn cannot run, each with the reason."""
  kernels_available = getattr(jaxbn, "kernels_available", None)
  if kernels_available is None:
    return {"jaxbn-kernel": "this jaxbn has no compiled kernels (no jaxbn.kernels_available)."}
  if not kernels_available():
    return {"jaxbn-kernel": "jaxbn.kernels_available() is False: no compiled kernels loaded."}
  return {}


def _jaxbn_step(implementation, training, axis):
  chosen = {} if implementation is None else {"implementation": implementation}

  def step(params, x, state):
    return jaxbn.batch_norm(
        x,
        state,
        params["scale"],
        params["bias"],
        training=training,
        axis=axis,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        **chosen,
    )

  return step


def _linen_step(fast_variance, training, dtype, axis):
  import flax.linen as nn

  module = nn.BatchNorm(
      use_running_average=not training,
      axis=axis,
      momentum=MOMENTUM,
      epsilon=EPSILON,
      dtype=dtype,
      use_fast_variance=fast_variance,
  )

  def step(params, x, stats):
    variables = {"params": params, "batch_stats": stats}
    if not training:
      return module.apply(variables, x), stats
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  return module, step


def _nnx_step(features, training, dtype, axis):
  from flax import nnx

  model = nnx.BatchNorm(
      features,
      use_running_average=not training,
      axis=axis,
      momentum=MOMENTUM,
      epsilon=EPSILON,
      dtype=dtype,
      rngs=nnx.Rngs(0),
  )
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def step(params, x, stats):
    model = nnx.merge(graphdef, params, stats, copy=True)
    y = model(x)
    return y, nnx.state(model, nnx.BatchStat)

  return params, stats, step


def jax_cases(shape: Shape, dtype, mode: str, names=JAX_CONTENDERS) -> list[Case]:
  """Compiles the JAX contenders ``names`` for one shape, dtype and mode."""
  x_np, dy_np = make_data(shape, dtype)
  x, dy = jnp.asarray(x_np), jnp.asarray(dy_np)
  features = shape.features
  training = mode != "inference"
  cases = []
  for name in names:
    if name in JAXBN_IMPLEMENTATIONS:
      params = {"scale": jnp.ones(features), "bias": jnp.zeros(features)}
      state = jaxbn.init_state(features)
      step = _jaxbn_step(JAXBN_IMPLEMENTATIONS[name], training, shape.axis)
      cases.append(_jax_case(name, shape.layout, mode, step, params, x, dy, state))
    elif name in ("flax-linen", "flax-linen-fastvar"):
      module, step = _linen_step(name == "flax-linen-fastvar", training, dtype, shape.axis)
      variables = module.init(jax.random.key(0), x)
      cases.append(
          _jax_case(
              name, shape.layout, mode, step, variables["params"], x, dy, variables["batch_stats"]
          )
      )
    elif name == "flax-nnx":
      params, stats, step = _nnx_step(features, training, dtype, shape.axis)
      cases.append(_jax_case(name, shape.layout, mode, step, params, x, dy, stats))
    else:
      raise ValueError(f"unknown JAX contender {name!r}; expected one of {JAX_CONTENDERS}")
  return cases


def torch_cases(shape: Shape, dtype, mode: str, torch, device: str = "cpu") -> list[Case]:
  """The PyTorch contenders for one shape, dtype and mode, on ``device`` ("cpu" or "cuda").

  NHWC shapes give two rows: ``torch-nchw`` (PyTorch's default contiguous
  layout) and ``torch-channels-last`` (NHWC memory, the same bytes the JAX
  contenders read). NCHW and ``(N, C)`` shapes have PyTorch's layout already:
  one row, ``torch-nchw``.
  """
  import torch.nn.functional as F

  x_np, dy_np = make_data(shape, jnp.float32)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[jnp.dtype(dtype).name]
  features = shape.features
  training = mode != "inference"

  def tensor(a):
    return torch.from_numpy(np.array(a)).to(device, torch_dtype)

  layouts = [("torch-nchw", shape.layout)]
  if shape.layout == "NHWC":
    layouts = [("torch-nchw", "NCHW"), ("torch-channels-last", "NHWC")]
  # PyTorch indexes the axes N, C, then the others: NHWC data is permuted to NCHW.
  torch_axes = "NC" + "".join(a for a in shape.layout if a not in "NC")
  permutation = [shape.layout.index(a) for a in torch_axes]
  cases = []
  for name, layout in layouts:
    x, dy = tensor(x_np).permute(permutation), tensor(dy_np).permute(permutation)
    memory_format = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    weight = torch.ones(features, device=device, requires_grad=True)
    bias = torch.zeros(features, device=device, requires_grad=True)
    running_mean = torch.zeros(features, device=device)
    running_var = torch.ones(features, device=device)

    def batch_norm(x, weight=weight, bias=bias, mean=running_mean, var=running_var):
      return F.batch_norm(x, mean, var, weight, bias, training, 1 - MOMENTUM, EPSILON)

    if mode == "forward+backward":
      x.requires_grad_(True)

      def run(x=x, dy=dy, weight=weight, bias=bias, batch_norm=batch_norm):
        y = batch_norm(x)
        return y, torch.autograd.grad(y, (x, weight, bias), dy)

    else:

      def run(x=x, batch_norm=batch_norm):
        with torch.no_grad():
          return batch_norm(x)

    residuals = None
    if training:
      residuals = _torch_residual_bytes(torch, batch_norm, x.detach().requires_grad_(True))
    cases.append(Case(name, layout, run, None, residuals, None))
  return cases


def _torch_residual_bytes(torch, batch_norm, x) -> int:
  """Bytes autograd saves for the backward pass, each storage counted once."""
  saved = {}

  def pack(tensor):
    saved[tensor.untyped_storage().data_ptr()] = tensor.numel() * tensor.element_size()
    return tensor

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
    batch_norm(x)
  return int(sum(saved.values()))


def copy_case(shape: Shape, dtype) -> Callable[[], Any]:
  """The bandwidth probe: ``x + 1``, one read and one write of every element."""
  x = jnp.asarray(make_data(shape, dtype)[0])
  run, _, _ = compile_ahead(lambda x: x + jnp.asarray(1, x.dtype), (x,))
  return run
