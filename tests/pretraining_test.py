"""The paper's pre-training configs run end to end on tfds.testing.mock_data (ImageNet-1k, ImageNet-21k
and a JFT-style multi-label dataset), shrunk to a tiny model; and the ImageNet-21k builder's reading."""

import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import mixer_imagenet21k, mixer_imagenet2012, mixer_jft
from mixer import setup, train_lib
from mixer.datasets import imagenet21k
from tests.conftest import mock_tfds


def _shrink(config, data_dir, workdir):
  """The recipe as it is (pipeline, loss, mixup, optimizer), on a tiny model for a few steps."""
  config.data_dir = data_dir
  config.model.variant = "Ti/32"
  config.model.dtype = "float32"
  config.param_sharding = "replicated"
  config.batch_size, config.eval_batch_size = 8, 8
  config.total_steps, config.warmup_steps = 3, 1
  config.log_every_steps, config.evals.eval.every_steps, config.checkpoint_every_steps = 1, 3, 3
  config.shuffle_buffer = 16
  return train_lib.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("name,get_config,splits", [
    ("imagenet2012", mixer_imagenet2012.get_config, {"train": 16, "validation": 16}),
    ("imagenet21k/fall11", mixer_imagenet21k.get_config, {"train": 16, "validation": 16}),
])
@pytest.mark.trains
def test_pretraining_recipe_runs_on_mock_data(name, get_config, splits, tmp_path):
  config = get_config("b16")
  assert "randaugment" in config.pp_train and config.mixup > 0
  with mock_tfds(name, str(tmp_path / "data"), splits):
    history = _shrink(config, str(tmp_path / "data"), str(tmp_path / "work"))
  assert [t["step"] for t in history["train"]] == [1, 2, 3]
  assert all(np.isfinite(t["loss"]) for t in history["train"])
  assert history["eval"][-1]["num_examples"] == 16


@pytest.mark.trains
def test_jft_style_config_trains_on_multilabel_data(tmp_path):
  """ImageNet-ReaL has a Sequence of labels per image, the shape of JFT's."""
  config = mixer_jft.get_config("b16")
  config.dataset, config.label_key, config.max_labels = "imagenet2012_real", "real_label", 4
  config.train_split = config.evals.eval.split = "validation"
  assert config.loss == "sigmoid_xent" and "randaugment" not in config.pp_train and config.mixup == 0
  with mock_tfds("imagenet2012_real", str(tmp_path / "data"), {"validation": 16}):
    history = _shrink(config, str(tmp_path / "data"), str(tmp_path / "work"))
  assert len(history["train"]) == 3 and all(np.isfinite(t["loss"]) for t in history["train"])
  # 1000 independent sigmoids from a zero head: the first loss is 1000 * log(2).
  assert history["train"][0]["loss"] == pytest.approx(1000 * np.log(2), rel=1e-3)


def _jpeg(value):
  return tf.io.encode_jpeg(np.full((6, 6, 3), value, np.uint8)).numpy()


def test_imagenet21k_reads_class_tars_and_folders(tmp_path):
  root = tmp_path / "imagenet21k"
  root.mkdir()
  for synset, count in (("n0002", 7), ("n0001", 6)):
    with tarfile.open(root / f"{synset}.tar", "w") as tar:
      for i in range(count):
        data = _jpeg(10 * i)
        info = tarfile.TarInfo(f"{synset}_{i:03d}.JPEG")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  (root / "n0003").mkdir()
  for i in range(6):
    (root / "n0003" / f"n0003_{i}.JPEG").write_bytes(_jpeg(i))
  png = tf.io.encode_png(np.full((6, 6, 3), 77, np.uint8)).numpy()
  (root / "n0003" / "n0003_9.JPEG").write_bytes(png)  # a PNG named .JPEG: stored re-encoded as JPEG.
  (root / "README.txt").write_text("not a class")
  synsets = imagenet21k.list_synsets(str(root))
  assert synsets == ["n0001", "n0002", "n0003"]
  names = [n for n, _ in imagenet21k.read_class(str(root), "n0002")]
  assert names == [f"n0002_{i:03d}.JPEG" for i in range(7)]
  builder = tfds.builder("imagenet21k/fall11", data_dir=str(tmp_path / "data"))
  held_out = list(builder._generate_examples(str(root), synsets, held_out=True))
  train = list(builder._generate_examples(str(root), synsets, held_out=False))
  assert len(held_out) == 3 * imagenet21k.HELD_OUT_PER_CLASS and len(train) == 20 - len(held_out)
  assert {k for k, _ in held_out}.isdisjoint(k for k, _ in train)
  assert sorted({ex["label"] for _, ex in train}) == [0, 1, 2]
  assert imagenet21k.as_jpeg(b"\x89PNG truncated") == b"\x89PNG truncated"  # unreadable: kept for bad_images.
  stored = dict(train)["n0003_9.JPEG"]["image"].getvalue()
  decoded = tf.io.decode_jpeg(stored).numpy()  # JPEG now: what decode_jpeg_and_inception_crop reads.
  assert decoded.shape == (6, 6, 3) and abs(int(decoded.mean()) - 77) <= 1


def test_imagenet21k_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="mixer/datasets/imagenet21k.py"):
    imagenet21k.list_synsets(str(tmp_path / "missing"))
  assert os.path.basename(imagenet21k.__file__) == "imagenet21k.py"


@pytest.mark.parametrize("module", [mixer_imagenet2012, mixer_imagenet21k, mixer_jft])
@pytest.mark.parametrize("arg", ["s32", "s16", "b32", "b16", "l32", "l16", "h14"])
def test_every_variant_of_every_pretraining_config_validates(module, arg):
  config = module.get_config(arg)
  assert config.model.variant == f"{arg[0].upper()}/{arg[1:]}"
  setup.validate_config(config, num_devices=256, num_processes=32)
