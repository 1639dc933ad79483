"""Synchronized batch norm across processes: a runnable example.

Two processes on this machine, each with 4 CPU devices, form one mesh of 8
devices, as two hosts with 4 accelerators each would. A small network
(Dense -> jaxbn.linen.BatchNorm -> relu -> Dense) takes one training step on a
global batch of 32 rows, of which only 21 are valid: the padding sits at the
end, so the second process holds 5 valid rows and two of its devices none. The
batch statistics are still those of the 21 valid rows.

The step runs in the two styles JAX offers:

* ``jit``: the batch is a global array sharded over the mesh axis ``"batch"``;
  the model has no ``axis_name`` and jaxbn finds the sharding itself;
* ``shard_map``: each device runs the model on its rows with
  ``BatchNorm(axis_name="batch")``.

Run it with ``python notebooks/multiprocess_sync_bn.py``: it starts the two
processes, collects their results and compares them with one process running
the whole batch on one device.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
BATCH, FEATURES, HIDDEN = 32, 5, 8
VALID = 21  # rows 21..31 are padding


def batch():
  """The global batch: inputs far from zero, targets, and the valid rows."""
  rng = np.random.default_rng(0)
  x = (100.0 + 3.0 * rng.normal(size=(BATCH, FEATURES))).astype(np.float32)
  target = rng.normal(size=BATCH).astype(np.float32)
  mask = np.arange(BATCH) < VALID
  return x, mask, target


def make_model(axis_name=None):
  import flax.linen as nn

  import jaxbn.linen

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      h = nn.Dense(HIDDEN)(x)
      h = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name)(
          h, mask=mask[:, None]
      )
      return nn.Dense(1)(nn.relu(h))[:, 0]

  return Net()


def init_variables():
  import jax

  x, mask, _ = batch()
  return make_model().init(jax.random.key(0), x, mask)


def loss_and_updates(model, params, batch_stats, x, mask, target, axis_name=None):
  """Mean squared error over the valid rows (of all devices when ``axis_name`` is set)."""
  import jax
  import jax.numpy as jnp

  pred, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, mask, mutable=["batch_stats"]
  )
  squared = jnp.sum(jnp.where(mask, jnp.square(pred - target), 0.0))
  count = jnp.sum(mask)
  if axis_name is not None:
    squared, count = jax.lax.psum((squared, count), axis_name)
  return squared / count, (pred, updates["batch_stats"])


def jit_step(variables, x, mask, target):
  """Sharded ``jit``: ``x`` may be a global array; nothing in the model names devices."""
  import jax

  grad_fn = jax.grad(loss_and_updates, argnums=1, has_aux=True)
  step = jax.jit(grad_fn, static_argnums=0)
  grads, (pred, batch_stats) = step(
      make_model(), variables["params"], variables["batch_stats"], x, mask, target
  )
  return grads, pred, batch_stats


def shard_map_step(variables, mesh, x, mask, target):
  """``shard_map``: each device sees its rows; BatchNorm and the loss sum over ``"batch"``."""
  from functools import partial

  import jax
  from jax.sharding import PartitionSpec as P

  model = make_model(axis_name="batch")
  grad_fn = jax.grad(partial(loss_and_updates, model, axis_name="batch"), has_aux=True)
  # Gradients, batch statistics and the loss are the same on every device: P().
  step = jax.shard_map(
      grad_fn,
      mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
      out_specs=(P(), (P("batch"), P())),
  )
  grads, (pred, batch_stats) = jax.jit(step)(
      variables["params"], variables["batch_stats"], x, mask, target
  )
  return grads, pred, batch_stats


def flatten(style, grads, pred, batch_stats):
  """Results as ``{name: numpy array}``."""
  from flax import traverse_util

  out = {f"{style}/pred": np.asarray(pred)}
  for prefix, tree in (("grad", grads), ("batch_stats", batch_stats)):
    for path, value in traverse_util.flatten_dict(tree, sep="/").items():
      out[f"{style}/{prefix}/{path}"] = np.asarray(value)
  return out


def single_process_reference():
  """One device, the whole batch: what every style must reproduce."""
  variables = init_variables()
  return flatten("reference", *jit_step(variables, *batch()))


def worker(process_id, port, out_path):
  """One process of the group: joins the others, runs both styles, saves the results."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}",
      num_processes=NUM_PROCESSES,
      process_id=process_id,
      initialization_timeout=60,
      heartbeat_timeout_seconds=10,
      shutdown_timeout_seconds=10,
  )
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  # Auto axes let XLA place the collectives of the Dense layers' gradients too; with
  # Explicit axes (the default of `jax.make_mesh`) jaxbn needs one collective instead
  # of two, but every contraction over the batch must then name its output sharding.
  mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("batch"))
  # Every process builds its own rows of the global arrays (here from the same seed).
  x, mask, target = (
      jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
      for a in batch()
  )
  variables = init_variables()
  results = {}
  for style, outputs in (
      ("jit", jit_step(variables, x, mask, target)),
      ("shard_map", shard_map_step(variables, mesh, x, mask, target)),
  ):
    # Copy the sharded outputs to every process before leaving the group.
    results.update(flatten(style, *multihost_utils.process_allgather(outputs, tiled=True)))
  if process_id == 0:
    np.savez(out_path, **results)
  jax.distributed.shutdown()


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(out_path, timeout=120.0):
  """Runs the worker processes and returns their results; fails clearly on timeout.

  Raises:
    TimeoutError: if the group has not finished within ``timeout`` seconds (the
      processes are killed first).
    RuntimeError: if a process fails; the message holds the end of its output.
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
  )
  port = free_port()
  command = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--out", out_path]
  procs = [
      subprocess.Popen(
          [*command, "--process-id", str(i)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(NUM_PROCESSES)
  ]
  try:
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    tails = "\n".join(
        f"--- process {i} ---\n{proc.communicate()[0][-2000:]}" for i, proc in enumerate(procs)
    )
    raise TimeoutError(
        f"the {NUM_PROCESSES} processes did not finish within {timeout} s and were killed; "
        f"their output ends with:\n{tails}"
    ) from None
  for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
    if proc.returncode != 0:
      raise RuntimeError(f"process {i} exited with code {proc.returncode}:\n{log[-4000:]}")
  with np.load(out_path) as data:
    return dict(data)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, help="run as this worker (set by the launcher)")
  parser.add_argument("--port", type=int)
  parser.add_argument("--out")
  args = parser.parse_args()
  if args.process_id is not None:
    worker(args.process_id, args.port, args.out)
    return
  with tempfile.TemporaryDirectory() as tmp:
    results = launch(os.path.join(tmp, "results.npz"))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  reference = single_process_reference()
  print("max |difference| to one device running the whole batch, and max |value|:")
  print(f"{'result':<32} {'jit':>10} {'shard_map':>10} {'|value|':>10}")
  for name, want in reference.items():
    key = name.removeprefix("reference/")
    diffs = [np.abs(results[f"{style}/{key}"] - want).max() for style in ("jit", "shard_map")]
    print(f"{key:<32} {diffs[0]:>10.1e} {diffs[1]:>10.1e} {np.abs(want).max():>10.1e}")


if __name__ == "__main__":
  main()
