"""The results document: its schema, a terminal table, the JSON file and a chart.

The document (one per device and day, ``results/<device>-<YYYY-MM-DD>.json``;
quick runs add ``-quick``)::

    {"device": "cpu", "device_kind": str, "date": "YYYY-MM-DD",
     "jax_version": str, "flax_version": str, "torch_version": str | null,
     "torch_device": "cpu" | "cuda" | null (absent in older documents),
     "cores": int, "quick": bool, "copy_gbps": {"<shape-key>/<dtype>": float},
     "results": [{"contender", "mode", "shape", "layout", "dtype", "median_ms",
                  "gbps", "x_ideal", "x_flax", "x_torch", "residual_bytes",
                  "peak_bytes", ...}]}

``gbps`` is the minimal traffic of the mode over the median time; the ``x_``
ratios divide the row's time by the other's (below 1 is faster).
"""

import json
import math
from pathlib import Path

from .contenders import JAX_CONTENDERS, MODES, TORCH_CONTENDERS

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
    for name in ("median_ms", "gbps", "x_ideal"):
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


def table(doc: dict) -> str:
  """The results as text, one block per dtype and mode, one row per contender."""
  header = (
      f"{'shape':>16} {'contender':<20} {'ms':>9} {'GB/s':>7} {'x-ideal':>8} "
      f"{'x-flax':>7} {'x-torch':>8} {'resid MB':>9} {'peak MB':>8} {'compile ms':>10}"
  )
  order = {name: i for i, name in enumerate(CONTENDERS)}
  lines = [
      f"{doc['device_kind']} ({doc.get('processor', '')}), {doc['cores']} cores, "
      f"jax {doc['jax_version']}, flax {doc['flax_version']}, torch {doc['torch_version']}"
      + (f" on {doc['torch_device']}" if doc.get("torch_device") else ""),
      "x-ratios are time / the other's time: below 1 is faster.",
  ]
  if "other_load_median" in doc:
    lines.append(
        f"Other processes took {doc['other_load_median']:.0%} of the cores while a case "
        f"was timed (median over cases; max {doc['other_load_max']:.0%}); * marks cases "
        "where they took 10% or more."
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
        key = "x".join(map(str, r["shape"]))
        compile_ms = r.get("compile_ms")
        busy = "*" if (r.get("other_load") or 0) >= 0.1 else " "
        label = key if key != previous else ""
        lines.append(
            f"{label:>16} {r['contender']:<20} {r['median_ms']:8.3f}{busy} "
            f"{r['gbps']:7.2f} {r['x_ideal']:8.2f} {_ratio(r['x_flax']):>7} "
            f"{_ratio(r['x_torch']):>8} {_megabytes(r['residual_bytes']):>9} "
            f"{_megabytes(r['peak_bytes']):>8} "
            f"{'' if compile_ms is None else f'{compile_ms:.0f}':>10}"
        )
        previous = key
  return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path:
  """Bar charts of time over the ideal time, one panel per dtype and mode (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in doc["results"])]
  present = {r["contender"] for r in doc["results"]} - {"ideal"}
  names = [c for c in CONTENDERS if c in present]
  fig, axes = plt.subplots(
      len(dtypes), len(MODES), figsize=(6 * len(MODES), 4 * len(dtypes)), squeeze=False
  )
  for (i, dtype), (j, mode) in ((a, b) for a in enumerate(dtypes) for b in enumerate(MODES)):
    ax = axes[i][j]
    rows = [r for r in doc["results"] if r["dtype"] == dtype and r["mode"] == mode]
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: -math.prod(s))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
      values = {tuple(r["shape"]): r["x_ideal"] for r in rows if r["contender"] == name}
      xs = [s + (k - (len(names) - 1) / 2) * width for s in range(len(shapes))]
      ax.bar(xs, [values.get(s, 0) for s in shapes], width, label=name)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xticks(range(len(shapes)), ["x".join(map(str, s)) for s in shapes], rotation=20)
    ax.set_title(f"{mode}, {dtype}")
    ax.set_ylabel("time / ideal time (lower is better)")
  axes[0][-1].legend(fontsize="small")
  fig.suptitle(
      f"Batch norm on {doc['device_kind']} ({doc.get('processor', '')}, {doc['cores']} cores), "
      f"{doc['date']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
