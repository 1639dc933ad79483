"""Runs the contenders interleaved and assembles the results document.

For each (shape, dtype, mode) every contender is compiled first (compile time
recorded apart), warmed up, then timed call by call in rotating order, one
call of each per round, so that a slow spell of the machine hits all of them
alike; the median over rounds is reported. A bandwidth probe (``x + 1``, one
read and one write) runs in the same rounds; the ideal time of a mode is its
minimal traffic over the probe's bandwidth:

    forward            3 N elements: read x for the statistics, read x, write y
    forward+backward   8 N: the forward, then read dy and x for the two sums,
                       read dy and x and write dx
    inference          2 N: read x, write y

Ratios ``x_ideal``, ``x_flax`` and ``x_torch`` divide a row's time by the
ideal time, by ``flax-linen``'s and by PyTorch's (channels-last where the
shape has that layout, else the default layout) for the same mode, shape and
dtype: below 1 is faster.
"""

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import jax
import jax.numpy as jnp

from .contenders import (
    JAX_CONTENDERS,
    MODES,
    TORCH_CONTENDERS,
    copy_case,
    jax_cases,
    torch_cases,
)
from .shapes import SHAPES, Shape

IDEAL_ELEMENT_PASSES = {"forward": 3, "forward+backward": 8, "inference": 2}


@dataclass(frozen=True)
class Config:
  """What to run."""

  shapes: Sequence[Shape] = SHAPES
  dtypes: Sequence[str] = ("float32", "bfloat16")
  modes: Sequence[str] = MODES
  contenders: Sequence[str] = JAX_CONTENDERS + TORCH_CONTENDERS
  torch: Any = None  # the torch module, or None to leave PyTorch out
  reps: int = 50
  warmup: int = 3
  quick: bool = False
  progress: bool = True
  notes: list[str] = field(default_factory=list)


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _block(out) -> None:
  for leaf in jax.tree.leaves(out):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()


def time_interleaved(
    runs: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> dict[str, list[float]]:
  """Times each ``run()`` ``reps`` times, one call of each per round, in milliseconds."""
  names = list(runs)
  for name in names:
    for _ in range(warmup):
      _block(runs[name]())
  samples = {name: [] for name in names}
  for r in range(reps):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      _block(runs[name]())
      samples[name].append((time.perf_counter() - start) * 1e3)
  return samples


def _torch_reference(mode, shape_key, dtype, medians):
  for name in ("torch-channels-last", "torch-nchw"):
    if (name, mode, shape_key, dtype) in medians:
      return medians[(name, mode, shape_key, dtype)]
  return None


def run(config: Config) -> dict:
  """Runs the suite; returns the results document (see ``report.validate``)."""
  from tqdm.auto import tqdm

  groups = list(product(config.shapes, config.dtypes, config.modes))
  rows, medians, copy_samples = [], {}, {}
  for shape, dtype, mode in tqdm(groups, disable=not config.progress, unit="case"):
    jax_names = [n for n in config.contenders if n in JAX_CONTENDERS]
    cases = jax_cases(shape, jnp.dtype(dtype), mode, jax_names)
    if config.torch is not None:
      more = torch_cases(shape, jnp.dtype(dtype), mode, config.torch)
      cases += [case for case in more if case.contender in config.contenders]
    runs = {case.contender: case.run for case in cases}
    runs["copy"] = copy_case(shape, jnp.dtype(dtype))
    samples = time_interleaved(runs, config.reps, config.warmup)
    copy_samples.setdefault((shape.key, dtype), []).extend(samples.pop("copy"))
    for case in cases:
      median = statistics.median(samples[case.contender])
      medians[(case.contender, mode, shape.key, dtype)] = median
      rows.append(
          {
              "contender": case.contender,
              "mode": mode,
              "shape": list(shape.shape),
              "layout": case.layout,
              "dtype": dtype,
              "median_ms": median,
              "compile_ms": case.compile_ms,
              "residual_bytes": case.residual_bytes,
              "peak_bytes": case.peak_bytes,
          }
      )
  copy_gbps = {}
  for (key, dtype), times in copy_samples.items():
    elements = _size(key)
    copy_gbps[f"{key}/{dtype}"] = 2 * elements * jnp.dtype(dtype).itemsize / (
        statistics.median(times) * 1e6
    )
  for shape, dtype, mode in groups:
    gbps = copy_gbps[f"{shape.key}/{dtype}"]
    ideal_bytes = IDEAL_ELEMENT_PASSES[mode] * _size(shape.key) * jnp.dtype(dtype).itemsize
    ideal_ms = ideal_bytes / (gbps * 1e6)
    medians[("ideal", mode, shape.key, dtype)] = ideal_ms
    rows.append(
        {
            "contender": "ideal",
            "mode": mode,
            "shape": list(shape.shape),
            "layout": shape.layout,
            "dtype": dtype,
            "median_ms": ideal_ms,
            "compile_ms": None,
            "residual_bytes": None,
            "peak_bytes": None,
        }
    )
  for row in rows:
    key = (row["mode"], "x".join(map(str, row["shape"])), row["dtype"])
    ideal_bytes = IDEAL_ELEMENT_PASSES[row["mode"]] * _size(key[1]) * jnp.dtype(key[2]).itemsize
    flax = medians.get(("flax-linen",) + key)
    torch = _torch_reference(*key, medians)
    ms = row["median_ms"]
    row["gbps"] = ideal_bytes / (ms * 1e6)
    row["x_ideal"] = ms / medians[("ideal",) + key]
    row["x_flax"] = ms / flax if flax else None
    row["x_torch"] = ms / torch if torch else None
  return {
      "device": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "processor": _processor(),
      "date": datetime.date.today().isoformat(),
      "jax_version": jax.__version__,
      "flax_version": _version("flax"),
      "torch_version": None if config.torch is None else config.torch.__version__,
      "cores": cores(),
      "quick": config.quick,
      "reps": config.reps,
      "notes": list(config.notes),
      "copy_gbps": copy_gbps,
      "results": rows,
  }


def _size(key: str) -> int:
  size = 1
  for dim in key.split("x"):
    size *= int(dim)
  return size


def _version(package: str) -> str | None:
  from importlib.metadata import PackageNotFoundError, version

  try:
    return version(package)
  except PackageNotFoundError:
    return None


def _processor() -> str:
  """The CPU model, e.g. ``"AMD EPYC"``, for the record."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
