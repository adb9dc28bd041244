"""Tests for mixer/predict.py beyond the README's commands (tests/readme_test.py runs those)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default, mixer_b16_imagenet2012
from mixer import models, predict, run_record
from tests.conftest import CORRUPT_IMAGE, REPO, small_config


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


def test_class_names_come_from_the_run_record_not_the_folder_as_it_is_now(tmp_path, caplog):
  from PIL import Image
  images, workdir = tmp_path / "images", tmp_path / "workdir"
  workdir.mkdir()
  for name in ("cat", "dog"):
    (images / name).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / name / "1.png")
  config = small_config("unused", dataset=f"folder:{images}")
  record = {"class_names": ["cat", "dog"], "label_subset": "", "splits": {}, "tfds_name": "folder"}
  run_record.start(config, str(workdir), record, step=None)
  (images / "dog").rename(images / "ant")  # sorts first: label 0 would be read as "ant" from the folder
  with caplog.at_level("WARNING"):
    assert predict.class_names(config, 2, str(workdir)) == ["cat", "dog"]
  assert "no longer has the classes that the run in" in caplog.text and "['ant', 'cat']" in caplog.text
  assert predict.class_names(config, 2) == ["ant", "cat"]  # without a run: the folder as it is


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


def test_bad_top_and_batch_size_are_refused_before_any_work():
  for top, batch_size, bad in ((0, 32, "top=0"), (-3, 32, "top=-3"), (5, 0, "batch_size=0")):
    with pytest.raises(ValueError, match=f"^{bad} must be 1 or more$"):
      predict.predict(default.get_config(), None, None, ["unread.png"], top=top, batch_size=batch_size)


@pytest.mark.subprocess
def test_command_line_errors_are_one_line_each(digits_folder, tmp_path):
  image = f"{digits_folder}/test/one/032.png"
  (tmp_path / "empty").mkdir()
  (tmp_path / "no_checkpoint").mkdir()
  (tmp_path / "no_checkpoint" / "config.json").write_text("{}")
  workdir = f"--workdir={tmp_path / 'no_checkpoint'}"
  cases = {  # arguments: what the one line must say
      (workdir, "--top=0", image): "--top=0 must be 1 or more",
      (workdir, "--top=-3", image): "--top=-3 must be 1 or more",
      (workdir, "--batch_size=0", image): "--batch_size=0 must be 1 or more",
      (workdir, str(tmp_path / "missing.png")): "missing.png is not a file or directory",
      (workdir, str(tmp_path / "empty")): "empty is a directory without images",
      (f"--workdir={tmp_path / 'empty'}", image): "empty/config.json does not exist",
      (workdir, image): "no orbax checkpoint in",
      ("--checkpoint=x.npz", "--config=nope.py", image): "--config=nope.py: no such file",
  }
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for args, message in cases.items():
    out = subprocess.run([sys.executable, "-m", "mixer.predict", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode in (1, 2) and len(lines) == 1 and message in lines[0], (args, out.stderr[-3000:])
