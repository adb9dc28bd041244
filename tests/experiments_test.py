"""The permutation experiment (paper Fig. 4) runs end to end and writes its PNG and JSON."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.trains, pytest.mark.subprocess]


def test_permutation_experiment_writes_curves_and_numbers(data_dir, tmp_path):
  out = tmp_path / "perm.png"
  result = subprocess.run([sys.executable, "-m", "mixer.experiments.permutation", f"--out={out}", "--steps=10",
                           "--eval_every=5", f"--data_dir={data_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  numbers = json.loads((tmp_path / "perm.json").read_text())
  for model in ("Mixer", "CNN"):
    assert set(numbers["final_top1"][model]) == {"original", "patch + pixel shuffle", "global shuffle"}
    for permutation, curve in numbers["curves"][model].items():
      assert [step for step, _ in curve] == [5, 10]
      # Each top-1 counts correct answers over the whole test split (359 digits), and the final one is the table's.
      assert all(round(top1 * 359) == pytest.approx(top1 * 359, abs=1e-3) for _, top1 in curve)  # float32
      assert numbers["final_top1"][model][permutation] == curve[-1][1]
  import matplotlib.image
  assert matplotlib.image.imread(out).shape[1] > 1000
