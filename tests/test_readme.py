"""The README's examples run as written and do what they say."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _opening_commands():
  """The first two shell lines of the README, as (install, run) pairs."""
  lines = [line for line in README.read_text().splitlines() if line.startswith("python3 -m pip")]
  return [tuple(part.split("#")[0].strip() for part in line.split("&&")) for line in lines[:2]]


def test_readme_opens_with_the_benchmark_and_test_commands():
  (_, main_job), (_, tests) = _opening_commands()
  assert main_job == "python3 -m benchmarks --quick"
  assert tests == "python3 -m pytest -n 2 -q"


def test_ci_runs_exactly_the_readme_test_command():
  (_, _), (install, tests) = _opening_commands()
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  assert tests in ci
  assert any(install in line for line in ci)


def test_training_loop_example_threads_the_state():
  namespace = {}
  exec(_python_blocks()[0], namespace)
  state, pred, x = namespace["state"], namespace["pred"], namespace["x"]
  assert int(state.count) == 200
  # The running mean tracks the pre-normalization activations of the last batches.
  h = np.asarray(x @ namespace["params"]["w"])
  np.testing.assert_allclose(state.mean, h.mean(0), atol=0.5 * h.std(0).max())
  assert pred.shape == (64, 1) and np.isfinite(pred).all()
