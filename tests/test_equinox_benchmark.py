"""Smoke test of ``benchmarks.equinox``: a tiny model, one round, the rows' schema."""

import pytest

from benchmarks import equinox as bench


def test_run_returns_a_row_per_contender_and_step(capsys):
  tiny = bench.Model("cnn", 4, (3, 5, 5), 4)
  rows = bench.run(reps=1, warmup=1, models=(tiny,), modes=("batch",))
  assert {(r["contender"], r["step"]) for r in rows} == {
    (c, s) for c in bench.CONTENDERS for s in bench.STEPS
  }
  for row in rows:
    assert row["model"] == tiny.key and row["batch"] == 4 and row["mode"] == "batch"
    assert row["median_ms"] > 0 and row["compile_ms"] > 0
    if row["contender"] == "equinox":
      assert row["x_equinox"] == pytest.approx(1.0)
  bench.print_table(rows)
  assert "x equinox" in capsys.readouterr().out


def test_step_rows_are_workloads_of_the_main_suite(monkeypatch):
  from benchmarks import report, runner

  tiny = bench.Model("cnn", 4, (3, 5, 5), 4)
  monkeypatch.setattr(bench, "QUICK_MODELS", (tiny,))
  config = runner.Config(quick=True, workload_reps=1, warmup=1)
  rows = bench.step_rows(config)
  assert [r["contender"] for r in rows] == list(bench.CONTENDERS)
  for row in rows:
    assert row["workload"] == "equinox-cnn-batch" and row["batch_shape"] == [4, 3, 5, 5]
  assert rows[0]["x_baseline"] == 1.0
  doc = {
      "device": "cpu", "device_kind": "cpu", "date": "2026-01-01", "jax_version": "0",
      "flax_version": "0", "torch_version": None, "cores": 2, "quick": True,
      "copy_gbps": {}, "results": [], "workloads": rows,
  }
  report.validate(doc)
  assert "equinox-cnn-batch" in report.workload_table(doc)
