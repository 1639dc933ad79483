"""Two processes, 4 CPU devices each, one global mesh: synchronized batch norm must
reproduce one device running the whole batch.

The processes are those of ``notebooks/multiprocess_sync_bn.py`` (the runnable
example), started on localhost with ``jax.distributed.initialize`` and gloo CPU
collectives. Its padded batch leaves the two processes 16 and 5 valid rows and
two devices none, so equal weighting of devices or processes would show.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "notebooks" / "multiprocess_sync_bn.py"


def _load_example():
  spec = importlib.util.spec_from_file_location("multiprocess_sync_bn", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


example = _load_example()


def test_two_processes_match_one_device(tmp_path):
  results = example.launch(str(tmp_path / "results.npz"), timeout=100)
  reference = example.single_process_reference()
  assert {"reference/batch_stats/BatchNorm_0/var", "reference/grad/Dense_0/kernel"} <= set(
      reference
  )
  for name, want in reference.items():
    for style in ("jit", "shard_map"):
      got = results[name.replace("reference/", f"{style}/")]
      if name.endswith("grad/Dense_0/bias"):
        # Batch norm subtracts the mean right after this bias: its gradient is 0 up to
        # rounding, on one device and on eight.
        np.testing.assert_array_less(np.abs(got), 1e-7, err_msg=f"{style}: {name}")
        continue
      # float32 rounding of sums over 21 rows of values up to ~1e2.
      np.testing.assert_allclose(
          got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{style}: {name}"
      )


def test_launch_fails_clearly_when_the_group_does_not_finish(tmp_path):
  # A group that hangs (e.g. a peer never joins) must not hang the test suite.
  with pytest.raises(TimeoutError, match="did not finish within 0.5 s and were killed"):
    example.launch(str(tmp_path / "results.npz"), timeout=0.5)
