"""Command line: ``python -m benchmarks [--quick] [options]``.

Times batch norm on each shape, prints a table, then times the workloads
(end-to-end training steps) and prints theirs; writes
``results/<device>-<date>.json`` and a PNG chart beside it (quick runs: into
the user's cache directory, outside the checkout).
"""

import argparse
import os
import sys
import time
from pathlib import Path

# JAX would take 75% of a GPU's memory at start, leaving PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

from . import contenders, report, runner  # noqa: E402
from .shapes import BY_NAME, for_platform  # noqa: E402

# --quick: every shape and mode in float32, fewer rounds.
QUICK_DTYPES = ("float32",)
QUICK_REPS = 20
QUICK_WORKLOAD_REPS = 8
RESULTS = Path(__file__).parent / "results"
# On an accelerator a timed sample queues 10 calls (see runner.time_interleaved).
ACCELERATOR_CALLS_PER_SAMPLE = 10


def quick_results_dir() -> Path:
  """Where ``--quick`` writes: ``$XDG_CACHE_HOME/jaxbn/benchmarks``, or ``~/.cache/...``.

  Outside the checkout, so that quick runs leave no untracked files beside the
  committed results.
  """
  cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(cache) / "jaxbn" / "benchmarks"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument(
      "--quick",
      action="store_true",
      help=f"{', '.join(QUICK_DTYPES)} only, {QUICK_REPS} timed calls per case and "
      f"{QUICK_WORKLOAD_REPS} steps per workload contender; writes "
      f"<device>-<date>-quick.json into {quick_results_dir()} unless --out says otherwise",
  )
  parser.add_argument(
      "--shapes",
      nargs="+",
      choices=list(BY_NAME),
      help="shapes to run, by name (on GPU and TPU with 8 times the batch; see shapes.py)",
  )
  parser.add_argument("--dtypes", nargs="+", choices=list(report.DTYPES), help="dtypes to run")
  parser.add_argument("--modes", nargs="+", choices=list(contenders.MODES), help="modes to run")
  parser.add_argument(
      "--contenders",
      nargs="+",
      choices=list(contenders.JAX_CONTENDERS + contenders.TORCH_CONTENDERS),
      help="contenders to run (default: all)",
  )
  parser.add_argument(
      "--reps",
      type=int,
      help=f"timed calls per contender and case (default {runner.Config.reps})",
  )
  parser.add_argument(
      "--workloads",
      nargs="+",
      choices=runner.WORKLOADS,
      default=runner.WORKLOADS,
      help="end-to-end training steps to time after the shapes (default: all; "
      "one whose module or dependencies are missing is skipped with a note)",
  )
  parser.add_argument("--no-workloads", action="store_true", help="time the shapes only")
  parser.add_argument(
      "--workload-reps",
      type=int,
      help=f"timed steps per workload contender (default {runner.Config.workload_reps})",
  )
  parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
  parser.add_argument(
      "--system-allocator",
      action="store_true",
      help="leave glibc malloc as configured (freed memory goes back to the system, and "
      "timings include page faults that depend on the order of the contenders)",
  )
  parser.add_argument(
      "--wait-idle",
      type=float,
      default=0.0,
      metavar="SECONDS",
      help="on a shared machine, wait up to SECONDS before each case for other "
      "processes to go idle, and time a case again (twice at most) when they took "
      "over 10%% of the cores meanwhile (default: do not wait)",
  )
  parser.add_argument(
      "--out",
      type=Path,
      help="directory for the JSON and PNG (default: benchmarks/results, where the "
      f"committed results live; with --quick, {quick_results_dir()})",
  )
  parser.add_argument("--no-save", action="store_true", help="print the table only")
  return parser


def main(argv=None) -> int:
  start = time.perf_counter()
  args = _parser().parse_args(argv)
  notes = []
  if not args.system_allocator:
    note = runner.retain_freed_memory()
    notes.append(note or "the system allocator is not glibc; left as it is.")
  platform = jax.default_backend()
  torch, torch_device = None, "cpu"
  if not args.no_torch:
    try:
      import torch
    except ImportError as error:
      notes.append(f"PyTorch rows skipped: torch is not importable ({error}).")
    else:
      torch.set_num_threads(runner.cores())
      if platform == "gpu" and torch.cuda.is_available():
        torch_device = "cuda"
      elif platform != "cpu":
        notes.append(f"PyTorch runs on the CPU: it has no device for JAX's {platform!r}.")
  shapes = for_platform(platform)
  names = args.contenders or runner.Config.contenders
  skipped = {n: why for n, why in contenders.unavailable().items() if n in names}
  notes += [f"{name} skipped: {why}" for name, why in skipped.items()]
  config = runner.Config(
      shapes=[s for s in shapes if s.name in args.shapes] if args.shapes else shapes,
      dtypes=args.dtypes or (QUICK_DTYPES if args.quick else report.DTYPES),
      modes=args.modes or contenders.MODES,
      contenders=[n for n in names if n not in skipped],
      torch=torch,
      torch_device=torch_device,
      reps=args.reps or (QUICK_REPS if args.quick else runner.Config.reps),
      workload_reps=args.workload_reps
      or (QUICK_WORKLOAD_REPS if args.quick else runner.Config.workload_reps),
      calls_per_sample=1 if platform == "cpu" else ACCELERATOR_CALLS_PER_SAMPLE,
      quick=args.quick,
      wait_idle=args.wait_idle,
      progress="bar" if sys.stderr.isatty() else "lines",
      notes=notes,
  )
  for note in notes:
    print(note, file=sys.stderr)
  doc = runner.run(config)
  print(report.table(doc))
  if not args.no_workloads:
    doc["workloads"], skipped_workloads = runner.run_workloads(args.workloads, config)
    for note in skipped_workloads:
      print(note, file=sys.stderr)
    doc["notes"] += skipped_workloads
    print(report.workload_table(doc))
  doc["duration_s"] = time.perf_counter() - start
  print(f"\n{doc['duration_s']:.0f} s from the start of main to the last timing.")
  if not args.no_save:
    path = report.save(doc, args.out or (quick_results_dir() if args.quick else RESULTS))
    png = report.plot(doc, path.with_suffix(".png"))
    print(f"wrote {path} and {png.name}")
    if args.quick and args.out is None:
      print(f"(quick runs go to {path.parent}, not to benchmarks/results; --out chooses)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
