"""The README's examples run as written and do what they say."""

import pathlib
import re
import tomllib

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


# Regression: the example printed nothing, so a reader could not see that it learned.
def test_training_loop_example_learns_and_says_so(capsys):
  namespace = {}
  exec(_python_blocks()[0], namespace)
  state, pred, x, y = (namespace[k] for k in ("state", "pred", "x", "y"))
  assert int(state.count) == 500
  printed = capsys.readouterr().out.splitlines()
  losses = [float(line.split()[-1]) for line in printed if "mean training loss" in line]
  assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]
  test_error, baseline = (float(v) for v in re.findall(r"[\d.]+", printed[-1])[-2:])
  assert "test error" in printed[-1] and test_error < 0.5 * baseline
  np.testing.assert_allclose(test_error, np.mean((np.asarray(pred) - np.asarray(y)) ** 2), 1e-3)
  # The running mean tracks the pre-normalization activations of the data.
  h = np.asarray(x @ namespace["params"]["w"])
  np.testing.assert_allclose(state.mean, h.mean(0), atol=0.5 * h.std(0).max())


def test_readme_says_what_the_training_loop_needs_installed():
  text = README.read_text()
  example = text[text.index("## A training loop"):text.index("```python")]
  assert "optax" in example and '".[flax]"' in example


# Regression: setuptools warned on every install that the TOML table form of the license is
# deprecated.
def test_the_license_is_an_spdx_expression():
  project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0"
