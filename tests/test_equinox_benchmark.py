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
