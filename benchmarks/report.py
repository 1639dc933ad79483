"""The results document: its schema, terminal tables, the JSON file and a chart.

The document (one per device and day, ``<device>-<YYYY-MM-DD>.json``; quick
runs add ``-quick``)::

    {"device": "cpu", "device_kind": str, "date": "YYYY-MM-DD",
     "jax_version": str, "flax_version": str, "torch_version": str | null,
     "torch_device": "cpu" | "cuda" | null (absent in older documents),
     "cores": int, "quick": bool, "copy_gbps": {"<shape-key>/<dtype>": float},
     "results": [{"contender", "mode", "shape", "layout", "dtype", "median_ms",
                  "gbps", "x_ideal", "x_flax", "x_torch", "residual_bytes",
                  "peak_bytes", "other_load", ...}],
     # absent in documents made before the workloads and kernels:
     "kernels_available": bool, "duration_s": float,
     "workloads": [{"workload", "contender", "baseline", "dtype", "batch_shape",
                    "median_ms", "compile_ms", "x_baseline", "norm_ms",
                    "norm_share", "other_load"}]}

``gbps`` is the minimal traffic of the mode over the median time; the ``x_``
ratios divide the row's time by the other's (below 1 is faster). A result's
``layout`` is the memory layout of the contender's input, the ideal row's the
shape's. In ``jaxbn`` rows made before ``jaxbn-fused`` existed, ``jaxbn`` is
the fused implementation, then the default. A workload row is one training
step with one normalization layer: ``x_baseline`` divides its time by the
``baseline`` contender's; ``norm_ms`` is its time minus that of the same
step without normalization, ``norm_share`` that over its time.
"""

import json
import math
from pathlib import Path

from .contenders import JAX_CONTENDERS, MODES, TORCH_CONTENDERS
from .runner import BUSY

CONTENDERS = JAX_CONTENDERS + TORCH_CONTENDERS + ("ideal",)
DTYPES = ("float32", "bfloat16")

_TOP_LEVEL = {
    "device": str,
    "device_kind": str,
    "date": str,
    "jax_version": str,
    "flax_version": (str, type(None)),
    "torch_version": (str, type(None)),
    "cores": int,
    "quick": bool,
    "copy_gbps": dict,
    "results": list,
}
_OPTIONAL_TOP_LEVEL = {"kernels_available": bool, "duration_s": float, "workloads": list}
_WORKLOAD_ROW = {
    "workload": str,
    "contender": str,
    "baseline": str,
    "dtype": str,
    "batch_shape": list,
    "median_ms": float,
    "compile_ms": (float, type(None)),
    "x_baseline": float,
    "norm_ms": (float, type(None)),
    "norm_share": (float, type(None)),
    "other_load": (float, type(None)),
}
_ROW = {
    "contender": str,
    "mode": str,
    "shape": list,
    "layout": str,
    "dtype": str,
    "median_ms": float,
    "gbps": float,
    "x_ideal": float,
    "x_flax": (float, type(None)),
    "x_torch": (float, type(None)),
    "residual_bytes": (int, type(None)),
    "peak_bytes": (int, type(None)),
}


def validate(doc: dict) -> None:
  """Raises ``ValueError`` naming the first field that breaks the schema."""

  def check(record, fields, where):
    for name, types in fields.items():
      if name not in record:
        raise ValueError(f"{where}: missing field {name!r}")
      value = record[name]
      if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"{where}: {name!r} is a bool, expected {types}")
      if not isinstance(value, types):
        raise ValueError(f"{where}: {name!r} is {value!r}, expected {types}")

  check(doc, _TOP_LEVEL, "document")
  check(doc, {k: v for k, v in _OPTIONAL_TOP_LEVEL.items() if k in doc}, "document")
  for key, gbps in doc["copy_gbps"].items():
    if not (isinstance(gbps, float) and gbps > 0):
      raise ValueError(f"copy_gbps[{key!r}] is {gbps!r}, expected a positive float")
  for i, row in enumerate(doc["results"]):
    where = f"results[{i}]"
    check(row, _ROW, where)
    for name, allowed in (("contender", CONTENDERS), ("mode", MODES), ("dtype", DTYPES)):
      if row[name] not in allowed:
        raise ValueError(f"{where}: {name!r} is {row[name]!r}, expected one of {allowed}")
    if not all(isinstance(d, int) and d > 0 for d in row["shape"]):
      raise ValueError(f"{where}: 'shape' is {row['shape']!r}, expected positive ints")
    _check_positive(row, ("median_ms", "gbps", "x_ideal"), where)
  for i, row in enumerate(doc.get("workloads", [])):
    where = f"workloads[{i}]"
    check(row, _WORKLOAD_ROW, where)
    if row["dtype"] not in DTYPES:
      raise ValueError(f"{where}: 'dtype' is {row['dtype']!r}, expected one of {DTYPES}")
    _check_positive(row, ("median_ms", "x_baseline"), where)


def _check_positive(row: dict, names, where: str) -> None:
  for name in names:
    if not (math.isfinite(row[name]) and row[name] > 0):
      raise ValueError(f"{where}: {name!r} is {row[name]!r}, expected a positive number")


def file_stem(doc: dict) -> str:
  return f"{doc['device']}-{doc['date']}" + ("-quick" if doc["quick"] else "")


def save(doc: dict, directory: Path) -> Path:
  """Writes ``<stem>.json`` into ``directory``; returns its path."""
  validate(doc)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"{file_stem(doc)}.json"
  path.write_text(json.dumps(doc, indent=1) + "\n")
  return path


def _megabytes(value):
  return "" if value is None else f"{value / 2**20:.1f}"


def _ratio(value):
  return "" if value is None else f"{value:.2f}"


def _noisy(row: dict) -> bool:
  """Whether other processes took ``BUSY`` or more of the cores while the row was timed."""
  return (row.get("other_load") or 0) >= BUSY


def _busy_mark(row: dict) -> str:
  return "*" if _noisy(row) else " "


def _key(shape) -> str:
  return "x".join(map(str, shape))


def table(doc: dict) -> str:
  """The results as text, one block per dtype and mode, one row per contender."""
  header = (
      f"{'shape':>16} {'contender':<20} {'layout':<6} {'ms':>9} {'GB/s':>7} {'x-ideal':>8} "
      f"{'x-flax':>7} {'x-torch':>8} {'resid MB':>9} {'peak MB':>8} {'compile ms':>10}"
  )
  order = {name: i for i, name in enumerate(CONTENDERS)}
  lines = [
      f"{doc['device_kind']} ({doc.get('processor', '')}), {doc['cores']} cores, "
      f"jax {doc['jax_version']}, flax {doc['flax_version']}, torch {doc['torch_version']}"
      + (f" on {doc['torch_device']}" if doc.get("torch_device") else ""),
      "x-ratios are time / the other's time: below 1 is faster. ideal: the minimal traffic "
      "at the bandwidth of x + 1.",
  ]
  if "kernels_available" in doc:
    lines.append(
        "jaxbn: the default implementation; compiled kernels "
        + ("loaded." if doc["kernels_available"] else "not available.")
    )
  if "other_load_median" in doc:
    lines.append(
        f"Other processes took {doc['other_load_median']:.0%} of the cores while a case "
        f"was timed (median over cases; max {doc['other_load_max']:.0%}); * marks cases "
        f"where they took {BUSY:.0%} or more."
    )
  for dtype in DTYPES:
    for mode in MODES:
      rows = [r for r in doc["results"] if r["dtype"] == dtype and r["mode"] == mode]
      if not rows:
        continue
      rows.sort(key=lambda r: (-math.prod(r["shape"]), r["shape"], order[r["contender"]]))
      lines += ["", f"== {mode}, {dtype} ==", header]
      previous = None
      for r in rows:
        key = _key(r["shape"])
        compile_ms = r.get("compile_ms")
        label = key if key != previous else ""
        lines.append(
            f"{label:>16} {r['contender']:<20} {r['layout']:<6} {r['median_ms']:8.3f}"
            f"{_busy_mark(r)} {r['gbps']:7.2f} {r['x_ideal']:8.2f} {_ratio(r['x_flax']):>7} "
            f"{_ratio(r['x_torch']):>8} {_megabytes(r['residual_bytes']):>9} "
            f"{_megabytes(r['peak_bytes']):>8} "
            f"{'' if compile_ms is None else f'{compile_ms:.0f}':>10}"
        )
        previous = key
  return "\n".join(lines)


def workload_table(doc: dict) -> str:
  """The workloads as text: one row per training step and normalization layer."""
  lines = [
      "",
      "== workloads: one training step (forward, backward, update) ==",
      "x-base: time / the baseline's; norm ms: time - the step's without normalization; "
      "share: norm ms / time.",
      f"{'workload':<17} {'dtype':<9} {'batch':<13} {'contender':<12} {'ms':>9} "
      f"{'x-base':>7} {'norm ms':>8} {'share':>6} {'compile ms':>10}",
  ]
  for r in doc.get("workloads", []):
    norm_ms = "" if r["norm_ms"] is None else f"{r['norm_ms']:.1f}"
    share = "" if r["norm_share"] is None else f"{r['norm_share']:.0%}"
    compile_ms = "" if r["compile_ms"] is None else f"{r['compile_ms']:.0f}"
    lines.append(
        f"{r['workload']:<17} {r['dtype']:<9} {_key(r['batch_shape']):<13} "
        f"{r['contender']:<12} {r['median_ms']:8.2f}{_busy_mark(r)} "
        f"{r['x_baseline']:7.2f} {norm_ms:>8} {share:>6} {compile_ms:>10}"
    )
  return "\n".join(lines)


# Tick values per decade on the log axes, densest first (see `log_ticks`).
_MANTISSAS = (
    (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
    (1, 1.5, 2, 3, 5, 7),
    (1, 2, 5),
    (1, 3),
    (1,),
)
MAX_TICKS = 7
_FOOTER_INCHES = 0.9  # below the panels: the legend, and what "ideal" is
# A bar more than this many times the median of its panel is clipped and labeled.
OUTLIER = 4.0
IDEAL_NOTE = (
    "ideal (dashed line at 1): the least memory traffic of the mode (forward 3N, "
    "forward+backward 8N, inference 2N bytes for an x of N bytes) at the bandwidth of x + 1 "
    "measured in the same run.\nBars run from the ideal to the time over it. Hatched: other "
    f"processes took {BUSY:.0%} or more of the cores meanwhile (* in the table). Bars cut at "
    "the top are labeled with their value."
)


def log_ticks(low: float, high: float, max_ticks: int = MAX_TICKS) -> list[float]:
  """Round values to label on a log axis from ``low`` to ``high``, at most ``max_ticks``.

  The densest of ``_MANTISSAS`` per decade that fits; beyond, every k-th
  power of ten. Labels of a log axis's default minor ticks pile up when the
  axis spans several decades (2, 3, ..., 9 in each).
  """
  decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
  for mantissas in _MANTISSAS:
    ticks = [m * 10.0**d for d in decades for m in mantissas if low <= m * 10.0**d <= high]
    if len(ticks) <= max_ticks:
      return ticks
  stride = math.ceil(len(ticks) / max_ticks)
  return ticks[::stride]


def _bar_top(values: list[float]) -> float:
  """The top of a panel's axis: all bars, or ``OUTLIER`` times their median if less."""
  ordered = sorted(values)
  return min(ordered[-1], max(2.0, OUTLIER * ordered[len(ordered) // 2]))


def _panel(ax, rows: list[dict], names: list[str]) -> None:
  """Bars of x-ideal per shape (groups) and contender (colors) on a readable log axis."""
  from matplotlib import ticker

  layouts = {tuple(r["shape"]): r["layout"] for r in rows if r["contender"] == "ideal"}
  shapes = sorted(layouts, key=lambda s: (-math.prod(s), s))
  by_key = {(r["contender"], tuple(r["shape"])): r for r in rows}
  top = _bar_top([r["x_ideal"] for r in rows])
  low = min(1.0, *(r["x_ideal"] for r in rows)) / 1.25
  width = 0.8 / max(1, len(names))
  for k, name in enumerate(names):
    for s, shape in enumerate(shapes):
      row = by_key.get((name, shape))
      if row is None:
        continue
      x = s + (k - (len(names) - 1) / 2) * width
      height = min(row["x_ideal"], top)
      ax.bar(x, height - 1, width, bottom=1, color=f"C{k}", edgecolor="black",
             linewidth=0, hatch="////" if _noisy(row) else None)
      if row["x_ideal"] > top:
        ax.annotate(f"{row['x_ideal']:.1f}", (x, top), ha="center", va="bottom", fontsize=7,
                    rotation=90)
  ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
  ax.set_yscale("log")
  ax.set_ylim(low, top * 1.6)
  ax.yaxis.set_major_locator(ticker.FixedLocator(log_ticks(low, top * 1.6)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xticks(range(len(shapes)), [f"{_key(s)}\n{layouts[s]}" for s in shapes], fontsize=8)
  ax.set_ylabel("time / ideal time (lower is better)")


def figure(doc: dict):
  """The chart of x-ideal: one panel per dtype and mode, a legend and what "ideal" is."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch

  dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in doc["results"])]
  present = {r["contender"] for r in doc["results"]} - {"ideal"}
  names = [c for c in CONTENDERS if c in present]
  shapes = len({tuple(r["shape"]) for r in doc["results"]})
  height = 4.0 * len(dtypes) + _FOOTER_INCHES
  fig, axes = plt.subplots(
      len(dtypes),
      len(MODES),
      figsize=(max(6.0, 1.1 * shapes) * len(MODES), height),
      squeeze=False,
  )
  for (i, dtype), (j, mode) in ((a, b) for a in enumerate(dtypes) for b in enumerate(MODES)):
    rows = [r for r in doc["results"] if r["dtype"] == dtype and r["mode"] == mode]
    if rows:
      _panel(axes[i][j], rows, names)
    axes[i][j].set_title(f"{mode}, {dtype}")
  handles = [Patch(color=f"C{k}", label=name) for k, name in enumerate(names)]
  handles += [
      Line2D([], [], color="black", linestyle="--", label="ideal"),
      Patch(facecolor="white", edgecolor="black", hatch="////", label="noisy"),
  ]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small",
             bbox_to_anchor=(0.5, 0.45 / height))
  fig.text(0.5, 0.05 / height, IDEAL_NOTE, ha="center", va="bottom", fontsize="small")
  fig.suptitle(
      f"Batch norm on {doc['device_kind']} ({doc.get('processor', '')}, {doc['cores']} cores), "
      f"{doc['date']}"
  )
  fig.tight_layout(rect=(0, _FOOTER_INCHES / height, 1, 1))
  return fig


def plot(doc: dict, path: Path) -> Path:
  """Writes ``figure(doc)`` as a PNG to ``path``; returns the path."""
  import matplotlib.pyplot as plt

  fig = figure(doc)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
