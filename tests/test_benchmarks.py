"""Smoke tests of the benchmark suite: the tiny shape, two rounds, the schema."""

import builtins
import json

import pytest

from benchmarks import __main__ as cli
from benchmarks import report
from benchmarks.contenders import JAX_CONTENDERS, MODES
from benchmarks.shapes import ACCELERATOR_BATCH_FACTOR, SHAPES, TINY, for_platform


def test_cli_writes_a_valid_document_and_chart(tmp_path, capsys):
  cli.main([
      "--shapes", TINY.name, "--dtypes", "float32", "--reps", "2", "--out", str(tmp_path),
      "--system-allocator",
  ])
  (path,) = tmp_path.glob("*.json")
  doc = json.loads(path.read_text())
  report.validate(doc)
  assert path.with_suffix(".png").stat().st_size > 0
  assert path.stem == f"{doc['device']}-{doc['date']}"
  contenders = {r["contender"] for r in doc["results"]}
  expected = set(JAX_CONTENDERS) | {"ideal"}
  if doc["torch_version"] is not None:
    expected.add("torch-nchw")  # an (N, C) input has no channels-last layout
  assert contenders == expected
  assert {r["mode"] for r in doc["results"]} == set(MODES)
  assert list(doc["copy_gbps"]) == [f"{TINY.key}/float32"]
  by_key = {(r["contender"], r["mode"]): r for r in doc["results"]}
  for mode in MODES:
    assert by_key[("flax-linen", mode)]["x_flax"] == pytest.approx(1.0)
    assert by_key[("ideal", mode)]["x_ideal"] == pytest.approx(1.0)
  # Residuals are reported for the training modes of differentiable contenders.
  assert by_key[("jaxbn", "forward+backward")]["residual_bytes"] > 0
  assert by_key[("jaxbn", "inference")]["residual_bytes"] is None
  table = capsys.readouterr().out
  assert "== forward+backward, float32 ==" in table and "jaxbn-reference" in table


def test_cli_runs_without_torch(monkeypatch, capsys):
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  cli.main(
      ["--shapes", TINY.name, "--modes", "inference", "--contenders", "jaxbn", "torch-nchw",
       "--dtypes", "float32", "--reps", "1", "--no-save", "--system-allocator"]
  )
  out, err = capsys.readouterr()
  assert "PyTorch rows skipped" in err
  assert "torch-nchw" not in out and "jaxbn" in out


def _document():
  row = {
      "contender": "jaxbn", "mode": "forward", "shape": [8, 16], "layout": "NC",
      "dtype": "float32", "median_ms": 0.1, "gbps": 1.0, "x_ideal": 2.0, "x_flax": None,
      "x_torch": 0.5, "residual_bytes": 640, "peak_bytes": 1024,
  }
  return {
      "device": "cpu", "device_kind": "cpu", "date": "2025-01-01", "jax_version": "0",
      "flax_version": "0", "torch_version": None, "cores": 2, "quick": True,
      "copy_gbps": {"8x16/float32": 3.0}, "results": [row],
  }


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("cores",), True, "'cores' is a bool"),
        (("results", 0, "contender"), "flax", "'contender' is 'flax'"),
        (("results", 0, "median_ms"), -1.0, "'median_ms' is -1.0"),
        (("results", 0, "peak_bytes"), 1.5, "'peak_bytes' is 1.5"),
        (("copy_gbps", "8x16/float32"), 0.0, "copy_gbps"),
    ],
)
def test_validate_names_the_broken_field(path, value, message):
  doc = _document()
  report.validate(doc)
  target = doc
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    report.validate(doc)



def test_accelerator_shapes_scale_the_batch_and_keep_the_tiny_case():
  assert for_platform("cpu") == SHAPES
  for cpu, gpu in zip(SHAPES, for_platform("gpu"), strict=True):
    assert gpu.name == cpu.name and gpu.layout == cpu.layout and gpu.features == cpu.features
    factor = 1 if cpu is TINY else ACCELERATOR_BATCH_FACTOR
    assert gpu.shape == (cpu.shape[0] * factor,) + cpu.shape[1:]
