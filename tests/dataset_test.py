"""Tests for mixer/dataset.py: preparing the config's dataset and the facts a run reads from it."""

import numpy as np
import pytest

from mixer import dataset
from tests.conftest import small_config


def _setup(config):
  builder = dataset.get_builder(config)
  return builder, dataset.get_info(config, builder)


def test_label_subset_forms():
  assert dataset.label_subset(small_config("unused", label_subset="5-9")) == [5, 6, 7, 8, 9]
  assert dataset.label_subset(small_config("unused", label_subset="0,2,4")) == [0, 2, 4]
  assert dataset.label_subset(small_config("unused", label_subset=" ")) is None
  with pytest.raises(ValueError, match=r"config.label_subset='0-a' is not FIRST-LAST or a,b,c"):
    dataset.label_subset(small_config("unused", label_subset="0-a"))


def test_train_percent_cuts_the_train_split():
  assert dataset.train_split(small_config("unused", train_percent=3)) == "train[:3%]"
  assert dataset.train_split(small_config("unused")) == "train"
  with pytest.raises(ValueError, match=r"config.train_percent=0 is not a whole number in 1..100"):
    dataset.train_split(small_config("unused", train_percent=0))


def test_digits_info(data_dir):
  builder, info = _setup(small_config(data_dir, label_subset="5-9", train_percent=50))
  assert info.class_names == ("5", "6", "7", "8", "9") and info.label_subset == (5, 6, 7, 8, 9)
  assert (info.train_split, info.held_out, info.multilabel) == ("train[:50%]", ("evals.eval.split", "test"), False)
  assert info.image_shape == (16, 16, 1)
  builder, info = _setup(small_config(data_dir))
  assert info.num_classes == 10 and info.label_subset is None
  assert info.num_train_examples + info.num_eval_examples == 1797  # all of scikit-learn's digits.
  assert info.fingerprint == {"class_names": [str(c) for c in range(10)], "label_subset": "",
                              "splits": {"test": 359, "train": 1438}, "tfds_name": builder.info.full_name}
  # Without the data (a compile for a TPU slice): the same facts, no counts.
  metadata = dataset.metadata_info(small_config(data_dir))
  assert (metadata.class_names, metadata.image_shape, metadata.held_out) == (
      info.class_names, info.image_shape, info.held_out)


def test_train_and_eval_preprocessing_of_different_shapes_is_an_error(data_dir):
  config = small_config(data_dir, pp_train="decode(channels=1)|inception_crop(12)|value_range(-1, 1)")
  with pytest.raises(ValueError, match=r"config.pp_train gives images of shape \(12, 12, None\), config.pp_eval "
                                       r"\(16, 16, 1\)"):
    dataset.image_shape(config, dataset.get_builder(config), "test")


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  config = small_config(str(tmp_path), dataset="cifar10")
  with pytest.raises(FileNotFoundError, match=r"config.dataset='cifar10' is not prepared.*tfds build cifar10"):
    dataset.get_builder(config)


def test_unknown_dataset_and_split_name_the_key(data_dir):
  with pytest.raises(ValueError, match=r"config.dataset='no_such_dataset_xyz'"):
    dataset.get_builder(small_config(data_dir, dataset="no_such_dataset_xyz"))
  config = small_config(data_dir, **{"evals.eval.split": "validation"})
  with pytest.raises(ValueError, match=r"config.evals.eval.split='validation' is not a split of 'digits'"):
    _setup(config)


def test_folder_of_class_folders_holds_out_a_test_split(tmp_path):
  from PIL import Image
  for label in ("cat", "dog"):
    (tmp_path / "images" / label).mkdir(parents=True)
    for i in range(10):
      Image.fromarray(np.full((5, 7, 3), 20 * i, np.uint8)).save(tmp_path / "images" / label / f"{i}.jpg")
  builder, info = _setup(small_config(str(tmp_path / "tfds"), dataset=f"folder:{tmp_path / 'images'}"))
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert (info.num_train_examples, info.num_eval_examples) == (16, 4)
  with pytest.raises(FileNotFoundError, match="config.dataset=folder:.*missing is not a directory"):
    _setup(small_config(str(tmp_path / "tfds"), dataset=f"folder:{tmp_path / 'missing'}"))
