"""Executes each notebook in a fresh kernel and checks the key numbers it prints.

Every notebook ends with a cell tagged ``summary`` that prints its key results as JSON; these
tests parse it, so a change that breaks a claim the notebook makes shows here. Each notebook
is its own test, so ``pytest -n 2`` runs two at a time.
"""

import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests import _environment

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300


def _kernel_env(**extra: str) -> dict[str, str]:
  """The environment of a user's kernel: one CPU device, the source tree importable."""
  env = _environment.one_device(**extra)
  env.pop("MPLBACKEND", None)  # keep the inline backend, so figures become PNG outputs
  return env


def run_notebook(name: str, **env: str) -> dict:
  """Executes ``notebooks/<name>.ipynb`` and returns the JSON its ``summary`` cell prints.

  Raises ``nbclient.exceptions.CellExecutionError`` on the first cell that fails.
  """
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = NotebookClient(
      nb,
      timeout=CELL_TIMEOUT_S,
      kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute(env=_kernel_env(**env))
  stderr = [
      o.text for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"
  ]
  assert not stderr, f"{name} wrote to stderr (a warning?):\n" + "\n".join(stderr)
  (cell,) = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
  return json.loads("".join(o.text for o in cell.outputs if o.get("name") == "stdout"))


def test_quickstart_running_averages_converge_to_the_data_statistics():
  s = run_notebook("01_quickstart")
  assert s["state_count"] == 1500  # one update per training step
  assert s["test_accuracy"] > 0.9
  assert s["running_mean_max_error_in_std"] < 0.05
  # The stored variance is the average biased batch variance: (n-1)/n of the true one.
  assert abs(s["running_var_ratio"] - s["expected_var_ratio"]) < 0.03
  # The start is forgotten as 0.99**t: ln(3653) / -ln(0.99) = 815 steps for the farthest mean.
  assert 600 < s["steps_until_means_within_0.1_std"] < 1100
  # averaging="debiased_ema" forgets the start at once; unbiased_var=True removes the (n-1)/n.
  assert s["debiased_ema_steps_within_0.1_std"] < 100
  assert abs(s["unbiased_var_ratio"] - 1) < 0.03
  # Batch statistics of an unrepresentative batch hurt; the running averages do not.
  assert s["one_class_acc_running"] - s["one_class_acc_batch_stats"] > 0.3


def test_flax_models_swap_in_without_other_changes():
  s = run_notebook("02_flax_models")
  assert s["linen_init_max_diff"] == 0 and s["nnx_init_max_diff"] == 0
  for key in ("loss", "batch_stats", "grads", "eval", "training_loss", "checkpoint_cross"):
    assert s[f"linen_{key}_max_diff"] < 1e-5, key
  for key in ("loss", "state", "eval"):
    assert s[f"nnx_{key}_max_diff"] < 1e-5, key
  assert s["linen_flax_accuracy"] > 0.85
  assert abs(s["linen_flax_accuracy"] - s["linen_jaxbn_accuracy"]) < 0.01
  assert s["layout_max_diff"] < 1e-5
  # Data at N(1e4, 1): jaxbn's variance is accurate, Flax's default is not.
  assert s["offset_1e4_var_rel_error/jaxbn"] < 1e-3
  assert s["offset_1e4_var_rel_error/flax"] > 0.1


def test_why_batch_norm_claims_measured_on_digits():
  s = run_notebook("03_why_batch_norm")
  # 1. Wide input ranges: gradients proportional to the input's scale, exploding at a normal lr.
  assert 0.8 < s["wide_gradient_slope"] < 1.1
  assert s["wide_row_gradient_spread"] > 100 * s["standardized_row_gradient_spread"]
  assert s["first_layer_grad_ratio_wide_vs_standardized"] > 100
  assert s["val_acc_lr1e-2/wide"] < 0.2
  assert s["peak_grad_lr1e-2/wide"] > 1e6
  for name in ("standardized", "wide + input batch norm"):
    assert s[f"val_acc_lr1e-2/{name}"] > 0.95, name
  assert s["best_val_acc/wide"] < s["best_val_acc/standardized"] - 0.2
  # 2. Batch norm allows larger learning rates and reaches 95% in fewer steps.
  for model in ("MLP", "CNN"):
    assert s[f"max_lr/{model}/bn"] >= 2 * s[f"max_lr/{model}/plain"], model
    assert s[f"steps_best_lr/{model}/bn"] < s[f"steps_best_lr/{model}/plain"], model
    assert s[f"final_val_acc_lr0.05/{model}/bn"] > 0.95, model
  # 3. Tiny batches: the running variance is (b-1)/b of the truth; batch norm degrades.
  assert abs(s["running_var_ratio_b2"] - 0.5) < 0.05
  assert abs(s["running_var_ratio_b128"] - 127 / 128) < 0.01
  assert abs(s["unbiased_running_var_ratio_b2"] - 1) < 0.05
  assert s["tiny_batch_val_acc/bn/b2"] < s["tiny_batch_val_acc/plain/b2"] - 0.2
  assert s["tiny_batch_val_acc/bn/b32"] > 0.95
  # 4. With tiny batches batch norm's training and inference modes disagree; renorm aligns
  # them and lifts the inference accuracy at batches of 2.
  assert s["small_batch_losses_finite"] == 1
  for b in (2, 4, 8, 32):
    for variant in ("bn", "renorm"):
      assert 0 <= s[f"inference_val_acc/{variant}/b{b}"] <= 1, (variant, b)
    assert abs(s[f"train_minus_inference/renorm/b{b}"]) < 0.03, b
  for b in (2, 4):
    assert s[f"train_minus_inference/bn/b{b}"] < -0.1, b
  assert s["inference_val_acc/renorm/b2"] > s["inference_val_acc/bn/b2"] + 0.15
  for variant in ("bn", "renorm"):
    assert s[f"inference_val_acc/{variant}/b32"] > 0.95, variant
  # 5. Ghost batches: noisier training (higher loss), validation accuracy within a point.
  for v in (64, 32, 16, 8):
    assert 0.95 < s[f"ghost_val_acc/V{v}"] <= 1, v
    assert abs(s[f"ghost_val_acc/V{v}"] - s["ghost_val_acc/V256"]) < 0.01, v
  assert 0.95 < s["ghost_val_acc/V256"] <= 1
  assert s["ghost_train_loss/V16"] > 3 * s["ghost_train_loss/V256"]
  assert s["ghost_train_loss/V8"] > 2 * s["ghost_train_loss/V32"]


def _results_documents(directory: Path) -> list[Path]:
  """Files in ``directory`` that follow the benchmark suite's results schema."""
  paths = []
  for path in sorted(directory.glob("*.json")):
    doc = json.loads(path.read_text())
    if "copy_gbps" in doc and doc.get("results") and "contender" in doc["results"][0]:
      paths.append(path)
  return paths


def _newest_per_device(directory: Path) -> dict[str, dict]:
  """The newest document of each device, with its file name under ``"file"``.

  Newest: the latest date, then a full run over a quick one, then the last file name.
  """
  newest = {}
  for path in _results_documents(directory):
    doc = json.loads(path.read_text()) | {"file": path.name}
    key = (doc["date"], not doc["quick"], doc["file"])
    other = newest.get(doc["device"])
    if other is None or key > (other["date"], not other["quick"], other["file"]):
      newest[doc["device"]] = doc
  return newest


def _write_fixture(
    directory: Path,
    device: str,
    date: str,
    quick: bool,
    jaxbn_slowdown: float = 1.5,
    workloads: bool = False,
) -> None:
  """A small document in the results schema; ``jaxbn_slowdown`` tells documents apart.

  With ``workloads``, in the schema that added the training steps; else in the first one.
  """
  shapes = {"64x14x14x256": [64, 14, 14, 256], "4096x1024": [4096, 1024], "8x16": [8, 16]}
  passes = {"forward": 3, "forward+backward": 8, "inference": 2}
  slowdown = {"ideal": 1.0, "jaxbn": jaxbn_slowdown, "flax-linen": 3.0, "torch-nchw": 2.0}
  rows = []
  for key, shape in shapes.items():
    for mode, n_passes in passes.items():
      traffic = n_passes * math.prod(shape) * 4
      ideal_ms = traffic / (10.0 * 1e6)  # at 10 GB/s
      for contender, factor in slowdown.items():
        ms = ideal_ms * factor * (1.1 if key == "8x16" else 1.0)
        rows.append({
            "contender": contender, "mode": mode, "shape": shape,
            "layout": "NHWC" if len(shape) == 4 else "NC", "dtype": "float32",
            "median_ms": ms, "gbps": traffic / (ms * 1e6), "x_ideal": ms / ideal_ms,
            "x_flax": ms / (ideal_ms * slowdown["flax-linen"] * (1.1 if key == "8x16" else 1.0)),
            "x_torch": None, "residual_bytes": None, "peak_bytes": None,
        })
  doc = {"device": device, "device_kind": device, "date": date, "jax_version": "0",
         "flax_version": "0", "torch_version": None, "cores": 2, "quick": quick,
         "copy_gbps": {f"{k}/float32": 10.0 for k in shapes}, "results": rows}
  if workloads:
    doc["kernels_available"], doc["duration_s"] = False, 60.0
    doc["workloads"] = [
        {"workload": "resnet20", "contender": contender, "baseline": "flax-linen",
         "dtype": "float32", "batch_shape": [32, 32, 32, 3], "median_ms": ms,
         "compile_ms": 4000.0, "x_baseline": ms / 100.0, "norm_ms": norm_ms,
         "norm_share": None if norm_ms is None else norm_ms / ms, "other_load": 0.0}
        for contender, ms, norm_ms in (("flax-linen", 100.0, 30.0), ("jaxbn", 90.0, 20.0),
                                       ("no-norm", 70.0, None))
    ]
  name = f"{device}-{date}" + ("-quick" if quick else "")
  (directory / f"{name}.json").write_text(json.dumps(doc))


def _write_fixtures(directory: Path) -> None:
  """Documents of two devices; the newest of each is the one whose jaxbn is 1.5x the ideal."""
  _write_fixture(directory, "gpu", "2000-01-01", quick=False)
  _write_fixture(directory, "gpu", "2000-01-01", quick=True, jaxbn_slowdown=2.5)  # quick loses
  _write_fixture(directory, "cpu", "1999-12-31", quick=False, jaxbn_slowdown=2.5)  # older
  _write_fixture(directory, "cpu", "2000-01-01", quick=True, workloads=True)  # the newest
  # Another schema (the distributed benchmark's): skipped.
  (directory / "distributed-cpu-2000-01-02.json").write_text(
      json.dumps({"device": "cpu", "date": "2000-01-02", "results": [{"devices": 8}]}))


@pytest.mark.parametrize("results", ["committed", "fixtures"])
def test_benchmarks_notebook_reads_the_newest_results(results, tmp_path):
  directory = ROOT / "benchmarks" / "results"
  if results == "fixtures" or not _results_documents(directory):  # none committed: fixtures
    directory = tmp_path
    _write_fixtures(directory)
  s = run_notebook("04_benchmarks", JAXBN_BENCHMARK_RESULTS=str(directory))["devices"]
  newest = _newest_per_device(directory)
  assert list(s) == sorted(newest, key=lambda device: (device != "cpu", device))
  for device, doc in newest.items():
    entry, rows = s[device], doc["results"]
    assert entry["source"] == doc["file"], device
    assert entry["rows"] == len(rows), device
    assert set(entry["contenders"]) == {r["contender"] for r in rows}, device
    assert set(entry["shapes"]) == {"x".join(map(str, r["shape"])) for r in rows}, device
    for mode in {r["mode"] for r in rows}:
      for dtype in {r["dtype"] for r in rows}:
        case = ("jaxbn", mode, dtype)
        mine = [r for r in rows if (r["contender"], r["mode"], r["dtype"]) == case]
        for field in ("x_flax", "x_torch", "x_ideal"):
          key = f"jaxbn_{field}_geomean/{mode}/{dtype}"
          values = [r[field] for r in mine if r[field] is not None]
          if not values:
            assert key not in entry, (device, key)
            continue
          expected = math.exp(sum(map(math.log, values)) / len(values))
          assert entry[key] == pytest.approx(expected, rel=1e-9), (device, key)
    workloads = {
        f"{w['workload']}_x_baseline/{w['contender']}/{w['dtype']}": w["x_baseline"]
        for w in doc.get("workloads", [])
    }
    assert {k: v for k, v in entry.items() if "_x_baseline/" in k} == workloads, device
  if results == "fixtures":
    assert len([k for k in s["cpu"] if "_x_baseline/" in k]) == 3
