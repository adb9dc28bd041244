"""Tests for mixer/visualize.py: the weight mosaic, the scalars read back, and the PNG."""

import subprocess
import sys

import numpy as np
import pytest

from mixer import visualize
from tests.conftest import REPO


def test_weight_mosaic_tiles_each_unit_as_its_token_grid():
  kernel = np.arange(16 * 5, dtype=np.float32).reshape(16, 5)
  mosaic = visualize.weight_mosaic(kernel, (4, 4), units=5)
  assert mosaic.shape == (2 * 5 - 1, 3 * 5 - 1)  # 2 x 3 tiles of 4 x 4 with 1-pixel gaps
  np.testing.assert_array_equal(mosaic[0:4, 5:9], kernel[:, 1].reshape(4, 4))
  np.testing.assert_array_equal(mosaic[5:9, 5:9], kernel[:, 4].reshape(4, 4))
  assert np.isnan(mosaic[4, 0]) and np.isnan(mosaic[5:9, 10:14]).all()  # a gap and the unused 6th tile


@pytest.mark.trains
@pytest.mark.subprocess
def test_visualize_writes_a_png_of_weights_and_curves(trained_run, tmp_path):
  workdir, history = trained_run
  scalars = visualize.read_scalars(workdir)
  assert scalars["fewshot/digits_5shot"] == [(f["step"], pytest.approx(f["mean"]["digits"]["5"]))
                                              for f in history["fewshot"]]
  assert scalars["eval/top1"] == [(e["step"], pytest.approx(e["top1"])) for e in history["eval"]]
  assert [s for s, _ in scalars["eval/top1"]] == [50, 100]
  out = tmp_path / "fig.png"
  result = subprocess.run([sys.executable, "-m", "mixer.visualize", f"--workdir={workdir}", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  import matplotlib.image
  image = matplotlib.image.imread(out)
  assert image.shape[0] > 300 and image.shape[1] > 1500  # 3 weight panels and the curves, side by side
  assert image[..., :3].std() > 0.05  # not a blank canvas
