"""Tests for mixer/predict.py beyond the README's commands (tests/readme_test.py runs those)."""

import importlib.util

import numpy as np
import pytest

from configs import default, mixer_b16_imagenet2012
from mixer import models, predict
from tests.conftest import CORRUPT_IMAGE, small_config


def test_imagenet_classes_get_readable_names_where_timm_has_them():
  names = predict.class_names(mixer_b16_imagenet2012.get_config(), 1000)
  assert len(names) == 1000 and names[0].endswith("(n01440764)")
  if importlib.util.find_spec("timm") is None:  # found, not imported: torch beside TF in one process crashes
    pytest.skip("timm is not installed (benchmarks/requirements.txt)")
  assert names[0] == "tench, Tinca tinca (n01440764)"


def test_class_names_follow_label_subset_and_fall_back_to_indices(data_dir):
  config = small_config(data_dir, label_subset="5-9")
  assert predict.class_names(config, 5) == ["5", "6", "7", "8", "9"]
  assert predict.class_names(config, 3) == ["class 0", "class 1", "class 2"]  # not the dataset's model


def test_unreadable_and_missing_images_are_named(digits_folder, tmp_path):
  config = default.get_config()
  model = models.create_model(config.model, 10)
  import jax
  params = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 16, 16, 1)))["params"])
  good = f"{digits_folder}/test/one/032.png"
  results = predict.predict(config, model, params, [good, f"{digits_folder}/{CORRUPT_IMAGE}"], top=3)
  assert [t["index"] for t in results[0]["top"]] and len(results[0]["top"]) == 3
  assert results[1]["file"].endswith(CORRUPT_IMAGE) and results[1]["error"].startswith("not a readable image (")
  assert "{{" not in results[1]["error"]
  with pytest.raises(FileNotFoundError, match="nothere.png is not a file or directory"):
    predict.image_paths([str(tmp_path / "nothere.png")])
  with pytest.raises(ValueError, match="is a directory without images"):
    predict.image_paths([str(tmp_path)])
