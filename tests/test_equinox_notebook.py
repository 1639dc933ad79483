"""``notebooks/05_equinox.ipynb`` runs and its numbers say what its text claims.

Run like the other notebooks (see ``tests/test_notebooks.py``): in a fresh kernel, the key
numbers read from the JSON its ``summary`` cell prints.
"""

from tests.test_notebooks import run_notebook


def test_equinox_notebook_swaps_the_class_and_reads_the_running_variance_right():
  s = run_notebook("05_equinox")
  # mode="batch": Equinox's class reads var + m^t / (1 - m^t); jaxbn's the variance itself,
  # up to the lag of a moving average behind weights that change.
  assert s["batch_mode_var_ratio/equinox/step1"] > 100
  assert s["batch_mode_var_ratio/equinox/step300"] > 1.3
  for t in (1, 5, 20):
    assert abs(s[f"batch_mode_var_ratio/jaxbn/step{t}"] - 1) < 0.1, t
  assert 0.75 < s["batch_mode_var_ratio/jaxbn/step300"] < 1.1
  # The same training; inference reads the same statistics right.
  assert s["batch_mode_first_loss_diff"] < 1e-5
  assert abs(s["batch_mode_final_loss/equinox"] - s["batch_mode_final_loss/jaxbn"]) < 0.02
  assert s["batch_mode_test_acc/jaxbn/step300"] > s["batch_mode_test_acc/equinox/step300"] + 0.3
  # A checkpoint of Equinox's model loads into jaxbn's, which then reads it right.
  assert s["checkpoint_max_diff"] == 0
  assert s["equinox_checkpoint_acc/read_by_jaxbn"] > 0.7
  # mode="ema": Equinox normalizes training batches with the running average (equinox #659).
  assert s["ema_mode_final_loss/lr0.3/jaxbn"] < 0.5 * s["ema_mode_final_loss/lr0.3/equinox"]
  assert s["ema_mode_final_loss/lr1.0/equinox"] > 10  # diverges
  assert s["ema_mode_final_loss/lr1.0/jaxbn"] < 0.2
  assert s["ema_mode_test_acc/lr1.0/jaxbn"] > 0.7
