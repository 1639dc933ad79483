"""Runs the contenders interleaved and assembles the results document.

For each (shape, dtype, mode) every contender is compiled first (compile time
recorded apart), warmed up, then timed a few calls at a time in a shuffled
order, so that a slow spell of the machine hits all of them alike; the median
over all timed calls is reported. JAX and PyTorch contenders take turns in
blocks (see ``time_interleaved``).
A bandwidth probe (``x + 1``, one read and one write) runs in the JAX rounds;
the ideal time of a mode is its minimal traffic over the probe's bandwidth:

    forward            3 N elements: read x for the statistics, read x, write y
    forward+backward   8 N: the forward, then read dy and x for the two sums,
                       read dy and x and write dx
    inference          2 N: read x, write y

Ratios ``x_ideal``, ``x_flax`` and ``x_torch`` divide a row's time by the
ideal time, by ``flax-linen``'s and by PyTorch's in the shape's layout
(``torch-channels-last`` for NHWC shapes, ``torch-nchw`` for NCHW and NC
ones; see ``TORCH_BY_LAYOUT``) for the same mode, shape and dtype: below 1 is
faster.

After the shapes come the workloads, end-to-end training steps (see
``run_workloads``).
"""

import datetime
import importlib
import math
import os
import platform
import random
import statistics
import sys
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
    unavailable,
)
from .shapes import SHAPES, Shape

IDEAL_ELEMENT_PASSES = {"forward": 3, "forward+backward": 8, "inference": 2}
# The PyTorch contender that x_torch divides by, for each layout of a shape.
TORCH_BY_LAYOUT = {"NHWC": "torch-channels-last", "NCHW": "torch-nchw", "NC": "torch-nchw"}
# Modules `benchmarks.<name>` of end-to-end training steps (see `run_workloads`).
WORKLOADS = ("resnet", "equinox")
# A case timed while other processes took this share of the cores is noisy: the table and
# the chart mark it, and with `wait_idle` it is timed again.
BUSY = 0.1
_SETTLE_SECONDS = 0.05  # idle time between phases, for spinning threads to sleep
_ATTEMPTS = 3


@dataclass(frozen=True)
class Config:
  """What to run."""

  shapes: Sequence[Shape] = SHAPES
  dtypes: Sequence[str] = ("float32", "bfloat16")
  modes: Sequence[str] = MODES
  contenders: Sequence[str] = JAX_CONTENDERS + TORCH_CONTENDERS
  torch: Any = None  # the torch module, or None to leave PyTorch out
  torch_device: str = "cpu"  # "cuda" to run PyTorch on the GPU
  reps: int = 50
  workload_reps: int = 20  # timed steps per contender of a workload
  warmup: int = 3
  calls_per_sample: int = 1  # calls queued back to back per timed sample (see time_interleaved)
  quick: bool = False
  progress: str = "bar"  # "bar", "lines" (one per finished case) or "off": see `progress`
  wait_idle: float = 0.0  # seconds to wait, before each case, for other processes to go idle
  notes: list[str] = field(default_factory=list)


def retain_freed_memory() -> str | None:
  """Makes glibc's malloc keep freed memory for reuse; returns a note, or None if not glibc.

  By default glibc returns large freed blocks to the system, and the next
  allocation of that size takes one page fault per 4 KiB page (about 1 us
  each on this kind of virtual machine: 12 ms per call for the two 25 MB
  outputs of a training step). Whether a block goes back depends on what the
  previous calls allocated, so a contender's time changed threefold with the
  contenders timed before it. One arena, no ``mmap`` and no trimming make
  every contender reuse its memory, so that the timings measure the kernels;
  scratch memory still shows in ``peak_bytes``. Call before the first thread
  of JAX or PyTorch starts.
  """
  import ctypes
  import ctypes.util

  name = ctypes.util.find_library("c")
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError, TypeError):
    return None
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  if not all(mallopt(opt, value) for opt, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))):
    return None
  return "glibc malloc set to keep freed memory (one arena, no mmap, no trimming)."


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _block(out) -> None:
  """Waits until ``out``, JAX arrays or PyTorch tensors, is computed."""
  for leaf in jax.tree.leaves(out):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
    elif getattr(leaf, "is_cuda", False):
      import torch

      torch.cuda.synchronize()  # waits for every queued kernel, so once is enough
      return


def time_interleaved(
    phases: Sequence[dict[str, Callable[[], Any]]],
    reps: int,
    warmup: int,
    blocks: int = 5,
    burst: int = 2,
    calls: int = 1,
) -> dict[str, list[float]]:
  """Times each ``run()`` ``reps`` times, in milliseconds per call.

  A sample is ``calls`` calls made back to back, waiting for the last one
  only, divided by ``calls``. On a CPU one call per sample times the call as a
  user sees it. An accelerator runs the calls queued behind each other, so
  several per sample measure the device's time rather than the host's time
  to launch and wait for one call (tens of microseconds through Python).

  Within a phase, the runs take turns in an order shuffled at each turn
  (seeded, so runs repeat): in a fixed or rotating order each run would
  always follow the same neighbour, and the one after the bandwidth probe
  measured 5-15% slower than the same program elsewhere in the order. Each
  turn makes one untimed call, then ``burst`` timed ones. A run thus meets the memory
  allocator in its own steady state, not in the state its neighbour left: a
  contender that frees large scratch buffers makes glibc return the pages to
  the system, and the next contender pays thousands of page faults per call
  to get them back, which it would not pay in a network made of its own
  layers. Phases (one per framework) alternate in ``blocks`` blocks of turns,
  with a pause between them: PyTorch's OpenMP threads spin for a while after
  each call and would otherwise take the cores from the next JAX call (on 2
  cores a JAX step timed right after a PyTorch call runs several times
  slower).
  """
  samples, shuffle = {}, random.Random(0)
  for runs in phases:
    for name, run in runs.items():
      samples[name] = []
      for _ in range(warmup):
        _block(run())
  turns = -(-reps // burst)
  for block in range(blocks):
    for runs in phases:
      time.sleep(_SETTLE_SECONDS)
      names = list(runs)
      for _ in range(block * turns // blocks, (block + 1) * turns // blocks):
        for name in shuffle.sample(names, len(names)):
          _block(runs[name]())
          for _ in range(burst):
            start = time.perf_counter()
            for _ in range(calls):
              out = runs[name]()
            _block(out)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls)
  return samples


class _CpuMeter:
  """CPU time taken by other processes, from ``/proc`` (Linux; elsewhere it reads 0).

  Timings on a shared machine are only as good as the machine is idle; the
  document records the share of the cores that other processes took.
  """

  def __init__(self):
    self.start = self._read()

  @staticmethod
  def _read():
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
      with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    except OSError:
      return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return sum(fields), busy - int(mine[11]) - int(mine[12])  # minus our utime + stime

  def others(self) -> float:
    """The share of all cores that other processes used since the start."""
    now = self._read()
    if now is None or self.start is None or now[0] == self.start[0]:
      return 0.0
    return max(0.0, (now[1] - self.start[1]) / (now[0] - self.start[0]))


def wait_until_idle(timeout: float, threshold: float = BUSY, interval: float = 1.0) -> float:
  """Waits (at most ``timeout`` s) until other processes use < ``threshold`` of the cores."""
  deadline = time.monotonic() + timeout
  while True:
    meter = _CpuMeter()
    time.sleep(interval)
    share = meter.others()
    if share < threshold or time.monotonic() > deadline:
      return share


def progress(items: Sequence, style: str, label: Callable[[Any], str]):
  """Yields ``items``, showing progress on stderr as ``style`` says.

  ``"bar"``: a tqdm bar, for a terminal. ``"lines"``: one line per finished
  item, with the time since the first began, for a log file or a pipe (a bar
  there prints nothing until it ends). ``"off"``: nothing.
  """
  if style == "bar":
    from tqdm.auto import tqdm

    yield from tqdm(items, unit="case")
    return
  start = time.perf_counter()
  for done, item in enumerate(items, 1):
    yield item
    if style == "lines":
      print(
          f"[{done}/{len(items)}] {label(item)} done, {time.perf_counter() - start:.0f} s",
          file=sys.stderr,
          flush=True,
      )


def measure(
    phases: Sequence[dict[str, Callable[[], Any]]], config: Config, reps: int
) -> tuple[dict[str, list[float]], float]:
  """``time_interleaved`` with ``config``'s settings; returns the samples and the others' load.

  The load is the share of the cores that other processes took while the
  samples were taken. With ``config.wait_idle``, first waits for the other
  processes to go idle, and times again (twice at most) when they took
  ``BUSY`` or more.
  """
  for _ in range(_ATTEMPTS if config.wait_idle else 1):
    if config.wait_idle:
      wait_until_idle(config.wait_idle)
    meter = _CpuMeter()
    samples = time_interleaved(phases, reps, config.warmup, calls=config.calls_per_sample)
    other_load = meter.others()
    if other_load < BUSY:
      break
  return samples, other_load


def _case_label(case) -> str:
  shape, dtype, mode = case
  return f"{shape.key} {shape.layout} {dtype} {mode}"


def _time_case(config: Config, shape: Shape, dtype: str, mode: str):
  """Times the contenders on one case; returns their rows, the copy probe's samples, the load."""
  jax_names = [n for n in config.contenders if n in JAX_CONTENDERS]
  cases = jax_cases(shape, jnp.dtype(dtype), mode, jax_names)
  phases = [{case.contender: case.run for case in cases}]
  phases[0]["copy"] = copy_case(shape, jnp.dtype(dtype))
  if config.torch is not None and set(config.contenders) & set(TORCH_CONTENDERS):
    more = torch_cases(shape, jnp.dtype(dtype), mode, config.torch, config.torch_device)
    more = [case for case in more if case.contender in config.contenders]
    if more:
      phases.append({case.contender: case.run for case in more})
      cases += more
  samples, other_load = measure(phases, config, config.reps)
  rows = [
      {
          "contender": case.contender,
          "mode": mode,
          "shape": list(shape.shape),
          "layout": case.layout,
          "dtype": dtype,
          "median_ms": statistics.median(samples[case.contender]),
          "compile_ms": case.compile_ms,
          "residual_bytes": case.residual_bytes,
          "peak_bytes": case.peak_bytes,
          "other_load": other_load,
      }
      for case in cases
  ]
  return rows, samples["copy"], other_load


def _ideal_row(shape: Shape, dtype: str, mode: str, copy_gbps: float) -> dict:
  """The minimal traffic of ``mode`` at the copy probe's bandwidth, as a row."""
  return {
      "contender": "ideal",
      "mode": mode,
      "shape": list(shape.shape),
      "layout": shape.layout,
      "dtype": dtype,
      "median_ms": _ideal_bytes(mode, shape.shape, dtype) / (copy_gbps * 1e6),
      "compile_ms": None,
      "residual_bytes": None,
      "peak_bytes": None,
      "other_load": None,
  }


def _add_ratios(rows: list[dict]) -> None:
  """Adds ``gbps``, ``x_ideal``, ``x_flax`` and ``x_torch`` to every row (see the module doc)."""
  medians = {
      (r["contender"], r["mode"], tuple(r["shape"]), r["dtype"]): r["median_ms"] for r in rows
  }
  layouts = {tuple(r["shape"]): r["layout"] for r in rows if r["contender"] == "ideal"}
  for row in rows:
    key = (row["mode"], tuple(row["shape"]), row["dtype"])
    ideal = medians[("ideal",) + key]
    flax = medians.get(("flax-linen",) + key)
    torch = medians.get((TORCH_BY_LAYOUT[layouts[key[1]]],) + key)
    ms = row["median_ms"]
    row["gbps"] = _ideal_bytes(*key) / (ms * 1e6)
    row["x_ideal"] = ms / ideal
    row["x_flax"] = ms / flax if flax else None
    row["x_torch"] = ms / torch if torch else None


def run(config: Config) -> dict:
  """Runs the suite; returns the results document (see ``report.validate``)."""
  groups = list(product(config.shapes, config.dtypes, config.modes))
  rows, copy_samples, others = [], {}, []
  for shape, dtype, mode in progress(groups, config.progress, _case_label):
    case_rows, copy, other_load = _time_case(config, shape, dtype, mode)
    rows += case_rows
    copy_samples.setdefault((shape, dtype), []).extend(copy)
    others.append(other_load)
  copy_gbps = {
      f"{shape.key}/{dtype}": 2 * _nbytes(shape.shape, dtype) / (statistics.median(times) * 1e6)
      for (shape, dtype), times in copy_samples.items()
  }
  rows += [
      _ideal_row(shape, dtype, mode, copy_gbps[f"{shape.key}/{dtype}"])
      for shape, dtype, mode in groups
  ]
  _add_ratios(rows)
  return {
      "device": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "processor": _processor(),
      "date": datetime.date.today().isoformat(),
      "jax_version": jax.__version__,
      "flax_version": _version("flax"),
      "torch_version": None if config.torch is None else config.torch.__version__,
      "torch_device": None if config.torch is None else config.torch_device,
      "cores": cores(),
      "quick": config.quick,
      "reps": config.reps,
      "calls_per_sample": config.calls_per_sample,
      "kernels_available": "jaxbn-kernel" not in unavailable(),
      "notes": list(config.notes),
      # The share of all cores other processes took while each case was timed.
      "other_load_median": statistics.median(others),
      "other_load_max": max(others),
      "copy_gbps": copy_gbps,
      "results": rows,
  }


def run_workloads(names: Sequence[str], config: Config) -> tuple[list[dict], list[str]]:
  """Runs the workloads ``names``; returns their rows and notes on those skipped.

  Workload ``name`` is the module ``benchmarks.<name>``, imported here (so that
  its dependencies load only when it runs), with a function
  ``step_rows(config: Config) -> list[dict]`` that times a training step with
  each normalization layer and returns one row per layer and dtype, in the
  schema of ``report.validate``'s ``workloads``. A module or dependency that
  is missing skips the workload with a note.
  """
  rows, notes = [], []
  for name in names:
    try:
      module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as error:
      notes.append(f"workload {name!r} skipped: {error}.")
      continue
    rows += module.step_rows(config)
  return rows, notes


def _nbytes(shape: Sequence[int], dtype: str) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def _ideal_bytes(mode: str, shape: Sequence[int], dtype: str) -> int:
  """The minimal traffic of ``mode`` (see the module doc)."""
  return IDEAL_ELEMENT_PASSES[mode] * _nbytes(shape, dtype)


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
