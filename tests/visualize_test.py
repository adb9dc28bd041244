"""Tests for mixer/visualize.py: the weight mosaic, the scalars read back, and the PNG."""

import subprocess
import sys

import numpy as np
import pytest

from mixer import train_lib, visualize
from tests.conftest import REPO, small_config


def test_weight_mosaic_tiles_each_unit_as_its_token_grid():
  kernel = np.arange(16 * 5, dtype=np.float32).reshape(16, 5)
  mosaic = visualize.weight_mosaic(kernel, (4, 4), units=5)
  assert mosaic.shape == (2 * 5 - 1, 3 * 5 - 1)  # 2 x 3 tiles of 4 x 4 with 1-pixel gaps
  np.testing.assert_array_equal(mosaic[0:4, 5:9], kernel[:, 1].reshape(4, 4))
  np.testing.assert_array_equal(mosaic[5:9, 5:9], kernel[:, 4].reshape(4, 4))
  assert np.isnan(mosaic[4, 0]) and np.isnan(mosaic[5:9, 10:14]).all()  # a gap and the unused 6th tile


@pytest.mark.slow
def test_visualize_writes_a_png_of_weights_and_curves(data_dir, tmp_path):
  config = small_config(data_dir, total_steps=20, log_every_steps=10, **{"evals.eval.every_steps": 10})
  config.evals.fewshot.every_steps, config.evals.fewshot.shots, config.evals.fewshot.seeds = 10, (1, 5), 1
  train_lib.train_and_evaluate(config, str(tmp_path))
  scalars = visualize.read_scalars(str(tmp_path))
  assert [s for s, _ in scalars["fewshot/digits_5shot"]] == [10, 20]
  assert [s for s, _ in scalars["eval/top1"]] == [10, 20]
  out = tmp_path / "fig.png"
  result = subprocess.run([sys.executable, "-m", "mixer.visualize", f"--workdir={tmp_path}", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  import matplotlib.image
  image = matplotlib.image.imread(out)
  assert image.shape[0] > 300 and image.shape[1] > 1500  # 3 weight panels and the curves, side by side
  assert image[..., :3].std() > 0.05  # not a blank canvas
