"""Synchronized vs local batch statistics on 8 host devices.

Run ``python -m benchmarks.distributed [--quick]`` from the repository root. The
batch of each shape is split over 8 CPU devices of one process
(``--xla_force_host_platform_device_count=8``); each row is one batch-norm layer
in one style:

* ``jaxbn shard_map``: ``batch_norm(..., axis_name="batch")`` inside ``shard_map``;
* ``jaxbn shard_map local``: the same without ``axis_name``: per-device statistics,
  no communication (the floor);
* ``jaxbn jit explicit`` / ``jaxbn jit auto``: ``jit`` of the global batch sharded
  over a mesh with Explicit / Auto axes, no ``axis_name``;
* ``flax shard_map``: ``flax.linen.BatchNorm(axis_name="batch")`` inside ``shard_map``
  (equal-weight ``pmean`` of the per-device moments; exact only when every device
  holds as many valid entries).

For each row: the median time of a step (``forward``: ``y`` and the running
statistics; ``forward+backward``: also the VJP for a given ``dy``), the
collectives in the compiled program and the bytes each device puts into them.
The 8 devices share this machine's cores, so the times say what the
synchronization adds to the arithmetic, not what a network would cost; the
bytes are what travels on a real one.

Prints a table and writes ``results/distributed-<device>-<date>.json``.
"""

import os

# The host platform's device count is fixed when JAX starts: set it before importing it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
from collections import Counter  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402

from .contenders import EPSILON, MOMENTUM, make_data  # noqa: E402
from .runner import _version, cores, time_interleaved  # noqa: E402
from .shapes import MLP, RESNET_MID, RESNET_WIDE  # noqa: E402

DEVICES = 8
SHAPES = (RESNET_MID, RESNET_WIDE, MLP)
MODES = ("forward", "forward+backward")
STYLES = (
    "jaxbn shard_map",
    "jaxbn shard_map local",
    "jaxbn jit explicit",
    "jaxbn jit auto",
    "flax shard_map",
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(.*?replica_groups=(\S+)"
)
_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collectives(hlo_text: str) -> list[dict]:
  """The collectives of a compiled program: kind, result bytes, bytes each device puts in."""
  found = []
  for result_type, kind, groups in _HLO_COLLECTIVE.findall(hlo_text):
    result_bytes = sum(
        _ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type)
    )
    group_size = _group_size(groups)
    # An all-gather's result holds every device's piece; the others keep the operand's size.
    sent = result_bytes // group_size if kind == "all-gather" else result_bytes
    found.append({"kind": kind, "result_bytes": result_bytes, "bytes_per_device": sent})
  return found


def _group_size(groups: str) -> int:
  """Devices per group from an HLO ``replica_groups`` field."""
  if groups.startswith("{{"):
    return len(groups[2:].split("}")[0].split(","))
  if match := re.match(r"\[(\d+),(\d+)\]", groups):  # iota form: [groups,size]<=[n]
    return int(match.group(2))
  return DEVICES  # mesh form: the tests here reduce over the whole mesh


def _jaxbn_layer(x, scale, bias, axis_name=None):
  state = jaxbn.init_state(x.shape[-1])
  return jaxbn.batch_norm(
      x, state, scale, bias, training=True, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name
  )


def _flax_layer(x, scale, bias, axis_name="batch"):
  bn = nn.BatchNorm(
      use_running_average=False, momentum=MOMENTUM, epsilon=EPSILON, axis_name=axis_name
  )
  stats = {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  return y, updates["batch_stats"]


def _layer(style, mesh):
  """``f(x, scale, bias) -> (y, running statistics)`` on the global batch."""
  if style.startswith("jaxbn jit"):
    return _jaxbn_layer
  if style == "flax shard_map":
    local = _flax_layer
  else:
    axis_name = None if style.endswith("local") else "batch"
    local = partial(_jaxbn_layer, axis_name=axis_name)
  # Local statistics differ per device: return them per device (P("batch")).
  stats_spec = P("batch") if style.endswith("local") else P()

  def per_device(x, scale, bias):
    y, stats = local(x, scale, bias)
    if style.endswith("local"):
      stats = jax.tree.map(lambda v: v[None], stats)
    return y, stats

  return jax.shard_map(
      per_device, mesh=mesh, in_specs=(P("batch"), P(), P()), out_specs=(P("batch"), stats_spec)
  )


def _program(style, mode, mesh):
  layer = _layer(style, mesh)
  if mode == "forward":
    return layer

  def forward_backward(x, scale, bias, dy):
    (y, stats), vjp = jax.vjp(layer, x, scale, bias)
    return y, stats, vjp((dy, jax.tree.map(jnp.zeros_like, stats)))

  return forward_backward


def run(shapes=SHAPES, modes=MODES, styles=STYLES, reps=20, warmup=3) -> dict:
  """Times every (shape, mode, style); returns the results document."""
  meshes = {
      axis_type: jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))
      for axis_type in (AxisType.Explicit, AxisType.Auto)
  }
  rows = []
  for shape in shapes:
    x, dy = make_data(shape, jnp.float32)
    scale = jnp.ones(shape.features, jnp.float32)
    bias = jnp.zeros(shape.features, jnp.float32)
    for mode in modes:
      runs, found = {}, {}
      for style in styles:
        mesh = meshes[AxisType.Auto if style.endswith("auto") else AxisType.Explicit]
        batch = NamedSharding(mesh, P("batch"))
        args = (jax.device_put(x, batch), scale, bias)
        if mode == "forward+backward":
          args += (jax.device_put(dy, batch),)
        compiled = jax.jit(_program(style, mode, mesh)).lower(*args).compile()
        runs[style] = partial(compiled, *args)
        found[style] = collectives(compiled.as_text())
      samples = time_interleaved(runs, reps, warmup)
      local_ms = statistics.median(samples.get("jaxbn shard_map local", [float("nan")]))
      for style in styles:
        median = statistics.median(samples[style])
        rows.append(
            {
                "style": style,
                "mode": mode,
                "shape": list(shape.shape),
                "features": shape.features,
                "median_ms": median,
                "x_local": median / local_ms,
                "collectives": dict(sorted(Counter(c["kind"] for c in found[style]).items())),
                "bytes_per_device": sum(c["bytes_per_device"] for c in found[style]),
            }
        )
  return {
      "device": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "devices": DEVICES,
      "date": datetime.date.today().isoformat(),
      "jax_version": jax.__version__,
      "flax_version": _version("flax"),
      "cores": cores(),
      "reps": reps,
      "results": rows,
  }


def table(doc: dict) -> str:
  """The results as a text table."""
  lines = [
      f"{doc['devices']} {doc['device']} devices on {doc['cores']} cores, jax {doc['jax_version']};"
      " bytes: what each device puts into the collectives of one layer",
      f"{'shape':<15} {'mode':<17} {'style':<22} {'ms':>8} {'x local':>8} {'bytes':>7}"
      "  collectives",
  ]
  for row in doc["results"]:
    shape = "x".join(map(str, row["shape"]))
    kinds = ", ".join(f"{n} {k}" for k, n in row["collectives"].items()) or "none"
    lines.append(
        f"{shape:<15} {row['mode']:<17} {row['style']:<22} {row['median_ms']:>8.2f} "
        f"{row['x_local']:>8.2f} {row['bytes_per_device']:>7}  {kinds}"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__)
  parser.add_argument("--quick", action="store_true", help="one shape, 5 rounds")
  parser.add_argument("--reps", type=int, default=20, help="timed rounds per case")
  parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
  parser.add_argument("--no-save", action="store_true", help="print the table only")
  args = parser.parse_args(argv)
  doc = run(shapes=SHAPES[:1] if args.quick else SHAPES, reps=5 if args.quick else args.reps)
  print(table(doc))
  if not args.no_save:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"distributed-{doc['device']}-{doc['date']}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
