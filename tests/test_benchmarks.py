"""Smoke tests of the benchmark suite: the tiny shape, few rounds, the schema, the chart."""

import builtins
import functools
import json
import math
from itertools import pairwise

import jax
import numpy as np
import pytest

import jaxbn
from benchmarks import __main__ as cli
from benchmarks import contenders, report, resnet, runner
from benchmarks.contenders import JAX_CONTENDERS, MODES
from benchmarks.shapes import (
    ACCELERATOR_BATCH_FACTOR,
    RESNET_STEM_NCHW,
    SHAPES,
    TINY,
    Shape,
    for_platform,
)


def tiny_run(*options, contenders=("jaxbn",)) -> list[str]:
  """Arguments for ``contenders`` on the tiny shape: float32, one timed call, no workloads."""
  return [
      "--shapes", TINY.name, "--dtypes", "float32", "--contenders", *contenders, "--reps", "1",
      "--no-workloads", "--system-allocator", *options,
  ]

# A ResNet of two one-block stages, 4 and 8 channels, on a batch of 2 images of 8x8.
SMALL_RESNET = {"stages": (1, 1), "widths": (4, 8), "batch_shape": (2, 8, 8, 3)}


def test_cli_writes_a_valid_document_and_chart(tmp_path, capsys):
  cli.main([
      "--shapes", TINY.name, "--dtypes", "float32", "--reps", "2", "--out", str(tmp_path),
      "--system-allocator", "--no-workloads",
  ])
  (path,) = tmp_path.glob("*.json")
  doc = json.loads(path.read_text())
  report.validate(doc)
  assert path.with_suffix(".png").stat().st_size > 0
  assert path.stem == f"{doc['device']}-{doc['date']}"
  contenders_run = {r["contender"] for r in doc["results"]}
  expected = set(JAX_CONTENDERS) - set(contenders.unavailable()) | {"ideal"}
  if doc["torch_version"] is not None:
    expected.add("torch-nchw")  # an (N, C) input has no channels-last layout
  assert contenders_run == expected
  assert {r["mode"] for r in doc["results"]} == set(MODES)
  assert list(doc["copy_gbps"]) == [f"{TINY.key}/float32"]
  by_key = {(r["contender"], r["mode"]): r for r in doc["results"]}
  for mode in MODES:
    assert by_key[("flax-linen", mode)]["x_flax"] == pytest.approx(1.0)
    assert by_key[("ideal", mode)]["x_ideal"] == pytest.approx(1.0)
  # Residuals are reported for the training modes of differentiable contenders.
  assert by_key[("jaxbn", "forward+backward")]["residual_bytes"] > 0
  assert by_key[("jaxbn", "inference")]["residual_bytes"] is None
  assert doc["kernels_available"] == ("jaxbn-kernel" in contenders_run)
  table = capsys.readouterr().out
  assert "== forward+backward, float32 ==" in table and "jaxbn-reference" in table


def test_progress_prints_one_line_per_case_when_stderr_is_not_a_terminal(capsys):
  # Without a terminal the progress bar printed nothing until the run ended.
  cli.main(tiny_run("--modes", "forward", "inference", "--no-save"))
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
  assert [line.split(" done")[0] for line in lines] == [
      "[1/2] 8x16 NC float32 forward", "[2/2] 8x16 NC float32 inference"
  ]


def test_quick_run_writes_outside_the_checkout(tmp_path, monkeypatch, capsys):
  # --quick wrote into benchmarks/results and left untracked files in the checkout.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  committed = sorted(cli.RESULTS.iterdir())
  cli.main(tiny_run("--quick", "--modes", "inference"))
  (path,) = (tmp_path / "jaxbn" / "benchmarks").glob("*.json")
  assert path.stem.endswith("-quick") and path.with_suffix(".png").exists()
  assert sorted(cli.RESULTS.iterdir()) == committed
  assert str(path.parent) in capsys.readouterr().out
  assert cli.quick_results_dir() == path.parent


@pytest.mark.parametrize("kernels", ["missing", "not loaded"])
def test_kernel_contender_is_skipped_with_a_note_when_kernels_are_unavailable(
    kernels, monkeypatch, capsys
):
  if kernels == "missing":
    monkeypatch.delattr(jaxbn, "kernels_available", raising=False)
  else:
    monkeypatch.setattr(jaxbn, "kernels_available", lambda: False, raising=False)
  cli.main(tiny_run("--modes", "inference", "--no-save", contenders=("jaxbn-kernel", "jaxbn")))
  out, err = capsys.readouterr()
  assert "jaxbn-kernel skipped: " in err
  assert "jaxbn-kernel" not in out and "jaxbn" in out


def test_cli_runs_without_torch(monkeypatch, capsys):
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  cli.main(tiny_run("--modes", "inference", "--no-save", contenders=("jaxbn", "torch-nchw")))
  out, err = capsys.readouterr()
  assert "PyTorch rows skipped" in err
  assert "torch-nchw" not in out and "jaxbn" in out


def _document():
  row = {
      "contender": "jaxbn", "mode": "forward", "shape": [8, 16], "layout": "NC",
      "dtype": "float32", "median_ms": 0.1, "gbps": 1.0, "x_ideal": 2.0, "x_flax": None,
      "x_torch": 0.5, "residual_bytes": 640, "peak_bytes": 1024,
  }
  workload = {
      "workload": "resnet20", "contender": "jaxbn", "baseline": "flax-linen",
      "dtype": "float32", "batch_shape": [32, 32, 32, 3], "median_ms": 100.0,
      "compile_ms": 4000.0, "x_baseline": 0.9, "norm_ms": 20.0, "norm_share": 0.2,
      "other_load": 0.01,
  }
  return {
      "device": "cpu", "device_kind": "cpu", "date": "2025-01-01", "jax_version": "0",
      "flax_version": "0", "torch_version": None, "cores": 2, "quick": True,
      "copy_gbps": {"8x16/float32": 3.0}, "results": [row], "kernels_available": False,
      "duration_s": 60.0, "workloads": [workload],
  }


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("cores",), True, "'cores' is a bool"),
        (("results", 0, "contender"), "flax", "'contender' is 'flax'"),
        (("results", 0, "median_ms"), -1.0, "'median_ms' is -1.0"),
        (("results", 0, "peak_bytes"), 1.5, "'peak_bytes' is 1.5"),
        (("copy_gbps", "8x16/float32"), 0.0, "copy_gbps"),
        (("kernels_available",), 1, "'kernels_available' is 1"),
        (("workloads", 0, "x_baseline"), 0.0, "workloads.0.: 'x_baseline' is 0.0"),
        (("workloads", 0, "norm_share"), "20%", "'norm_share' is '20%'"),
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


def test_validate_accepts_documents_from_before_the_workloads():
  doc = _document()
  for key in ("kernels_available", "duration_s", "workloads"):
    del doc[key]
  report.validate(doc)


def test_accelerator_shapes_scale_the_batch_and_keep_the_tiny_case():
  assert for_platform("cpu") == SHAPES
  for cpu, gpu in zip(SHAPES, for_platform("gpu"), strict=True):
    assert gpu.name == cpu.name and gpu.layout == cpu.layout and gpu.features == cpu.features
    factor = 1 if cpu is TINY else ACCELERATOR_BATCH_FACTOR
    assert gpu.shape == (cpu.shape[0] * factor,) + cpu.shape[1:]


def test_shape_layout_names_the_feature_axis():
  assert [s.axis for s in (TINY, RESNET_STEM_NCHW)] == [1, 1]
  assert RESNET_STEM_NCHW.features == 64
  assert all(s.shape[s.axis] == s.features for s in SHAPES)
  assert len({s.key for s in SHAPES}) == len(SHAPES)  # results are keyed by the shape


def test_nchw_shape_compares_axis_1_with_pytorch_nchw():
  # Every contender must normalize the same axis, and x_torch divide by PyTorch's NCHW time.
  torch = pytest.importorskip("torch")
  shape = Shape("small-nchw", (4, 3, 5, 2), "NCHW")
  x, _ = contenders.make_data(shape, np.float32)
  mean = x.mean(axis=(0, 2, 3), keepdims=True)
  expected = (x - mean) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + contenders.EPSILON)
  names = [n for n in JAX_CONTENDERS if n not in contenders.unavailable()]
  cases = contenders.jax_cases(shape, np.float32, "forward", names)
  cases += contenders.torch_cases(shape, np.float32, "forward", torch)
  assert [c.contender for c in cases] == names + ["torch-nchw"]
  for case in cases:
    y = case.run()
    y = y[0] if isinstance(y, tuple) else y.detach()
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-4, err_msg=case.contender)
    assert case.layout == "NCHW", case.contender
  config = runner.Config(shapes=[shape], dtypes=["float32"], modes=["forward"],
                         contenders=["jaxbn", "torch-nchw"], torch=torch, reps=1,
                         progress="off")
  rows = {r["contender"]: r for r in runner.run(config)["results"]}
  jaxbn_row = rows["jaxbn"]
  assert jaxbn_row["x_torch"] == pytest.approx(
      jaxbn_row["median_ms"] / rows["torch-nchw"]["median_ms"])


def _chart_document(outlier: float, noisy: tuple[str, ...]) -> dict:
  """Two shapes, three contenders near the ideal, flax-nnx ``outlier`` times it."""
  rows = []
  for shape, layout in (([32, 56, 56, 64], "NHWC"), ([8, 16], "NC")):
    for mode in MODES:
      for contender, x_ideal in (("ideal", 1.0), ("jaxbn", 1.1), ("flax-linen", 0.93),
                                 ("torch-nchw", 1.3), ("flax-nnx", outlier)):
        rows.append({
            "contender": contender, "mode": mode, "shape": shape, "layout": layout,
            "dtype": "float32", "median_ms": x_ideal, "gbps": 1 / x_ideal,
            "x_ideal": x_ideal, "x_flax": None, "x_torch": None, "residual_bytes": None,
            "peak_bytes": None, "other_load": 0.5 if contender in noisy else 0.0,
        })
  doc = _document() | {"results": rows}
  report.validate(doc)
  return doc


def _tick_labels(ax):
  return [t for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("outlier", [1.05, 40.0, 3e4])
def test_chart_tick_labels_do_not_pile_up_when_a_contender_is_an_outlier(outlier):
  # One contender far from the others made the log axis label every minor tick, on top
  # of each other.
  import matplotlib.pyplot as plt

  fig = report.figure(_chart_document(outlier, noisy=()))
  fig.canvas.draw()
  for ax in fig.axes:
    labels = _tick_labels(ax)
    assert 2 <= len(labels) <= report.MAX_TICKS, [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda box: box.y0)
    for below, above in pairwise(boxes):
      assert below.y1 <= above.y0, [t.get_text() for t in labels]
  clipped = [t.get_text() for ax in fig.axes for t in ax.texts]
  assert clipped == ([f"{outlier:.1f}"] * 2 * len(MODES) if outlier > 10 else [])
  plt.close(fig)


def test_chart_marks_noisy_cases_and_says_what_ideal_is():
  # The table marked noisy cases with *, the chart did not; nor did it say what "ideal" is.
  import matplotlib.pyplot as plt

  fig = report.figure(_chart_document(1.2, noisy=("jaxbn",)))
  hatched = [bar for ax in fig.axes for bar in ax.patches if bar.get_hatch()]
  assert len(hatched) == 2 * len(MODES)  # jaxbn on both shapes in every mode
  texts = " ".join(t.get_text() for t in fig.texts)
  assert "ideal (dashed line at 1): the least memory traffic" in texts
  assert "x + 1" in texts and "Hatched: other processes" in texts
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend[-2:] == ["ideal", "noisy"]
  plt.close(fig)


def test_missing_workload_module_is_skipped_with_a_note():
  rows, notes = runner.run_workloads(["no_such_workload"], runner.Config())
  assert rows == [] and notes == [
      "workload 'no_such_workload' skipped: No module named 'benchmarks.no_such_workload'."
  ]


def test_resnet_steps_share_flax_variables_and_compute_the_same_step():
  # The comparison is fair only if jaxbn's module is a drop-in on Flax's variables.
  x = jax.ShapeDtypeStruct(SMALL_RESNET["batch_shape"], np.float32)
  small = {k: SMALL_RESNET[k] for k in ("stages", "widths")}
  flax_vars, jaxbn_vars = (
      jax.eval_shape(
          functools.partial(resnet.ResNet(resnet.NORMS[name], **small).init, train=False),
          jax.random.key(0),
          x,
      )
      for name in ("flax-linen", "jaxbn")
  )
  assert flax_vars == jaxbn_vars
  steps = resnet.compiled_steps(np.dtype("float32"), **SMALL_RESNET)
  assert list(steps) == ["flax-linen", "jaxbn", "no-norm"]
  (flax_out, _), (jaxbn_out, _) = steps["flax-linen"], steps["jaxbn"]
  for a, b in zip(jax.tree.leaves(flax_out()), jax.tree.leaves(jaxbn_out()), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cli_runs_the_workloads_after_the_shapes(tmp_path, monkeypatch, capsys):
  # Steps that do nothing: the test above compiles the real ones.
  steps = {name: (lambda: None, 1.0) for name in resnet.NORMS}
  monkeypatch.setattr(resnet, "compiled_steps", lambda *args: steps)
  argv = tiny_run("--modes", "inference", "--out", str(tmp_path), "--workload-reps", "2")
  argv.remove("--no-workloads")
  cli.main(argv + ["--workloads", "resnet"])
  (path,) = tmp_path.glob("*.json")
  doc = json.loads(path.read_text())
  report.validate(doc)
  rows = {r["contender"]: r for r in doc["workloads"]}
  assert list(rows) == ["flax-linen", "jaxbn", "no-norm"]
  assert rows["flax-linen"]["x_baseline"] == 1.0
  for name in ("flax-linen", "jaxbn"):
    row = rows[name]
    assert row["norm_ms"] == pytest.approx(row["median_ms"] - rows["no-norm"]["median_ms"])
    assert row["norm_share"] == pytest.approx(row["norm_ms"] / row["median_ms"])
  assert rows["no-norm"]["norm_ms"] is None
  out = capsys.readouterr().out
  assert out.index("== inference, float32 ==") < out.index("== workloads")
  assert math.isfinite(doc["duration_s"])


def test_kernel_piece_timings_cover_every_piece():
  from benchmarks import kernels

  times, nbytes = kernels.measure(*kernels.TINY, "float32", rounds=1)
  assert nbytes == 8 * 16 * 4
  for piece in ("sums kernel", "sums xla", "bwd sums kernel", "affine kernel", "step kernels"):
    assert times[piece] > 0, piece
  assert kernels.report(kernels.TINY[0], kernels.TINY[1], "float32", times, nbytes).count("|") > 5
