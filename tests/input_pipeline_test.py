"""Tests for mixer/input_pipeline.py's iterators on the embedded digits and on mocked ImageNet."""

import collections

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import mixer_b16_imagenet2012
from mixer import dataset, input_pipeline, preprocess, sharding
from tests.conftest import mock_tfds, small_config


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh({"data": -1, "model": 1})


def _setup(config):
  builder = dataset.get_builder(config)
  return builder, dataset.get_info(config, builder)


def test_eval_covers_the_split_exactly_once(data_dir, mesh):
  config = small_config(data_dir, eval_batch_size=64)
  builder, info = _setup(config)
  labels = collections.Counter()
  num_batches = 0
  for batch in input_pipeline.eval_iterator(config, builder, info, mesh):
    mask = np.asarray(batch["mask"]).astype(bool)
    assert batch["image"].shape == (64, 16, 16, 1)
    labels.update(np.asarray(batch["label"])[mask].tolist())
    num_batches += 1
  assert num_batches == -(-info.num_eval_examples // 64)
  expected = collections.Counter(int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="test")))
  assert labels == expected and sum(labels.values()) == info.num_eval_examples


def test_train_batches_are_global_arrays_in_range(data_dir, mesh):
  config = small_config(data_dir)
  builder, info = _setup(config)
  batch = next(input_pipeline.train_iterator(config, builder, info, mesh))
  assert isinstance(batch["image"], jax.Array)
  assert batch["image"].shape == (32, 16, 16, 1) and batch["label"].shape == (32,)
  assert batch["image"].sharding == sharding.batch_sharding(mesh)
  image = np.asarray(batch["image"])
  assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1


def test_resume_sees_the_same_batches_across_epochs(data_dir, mesh):
  config = small_config(data_dir, batch_size=256, pp_train="decode(channels=1)|inception_crop(16)|flip_lr")
  builder, info = _setup(config)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  assert per_epoch == info.num_train_examples // 256
  steps = 2 * per_epoch + 2
  it = input_pipeline.train_iterator(config, builder, info, mesh)
  straight = [jax.tree.map(np.asarray, next(it)) for _ in range(steps)]
  for start in (3, per_epoch, per_epoch + 1):
    it = input_pipeline.train_iterator(config, builder, info, mesh, start_step=start)
    for step in range(start, steps):
      batch = next(it)
      np.testing.assert_array_equal(np.asarray(batch["image"]), straight[step]["image"])
      np.testing.assert_array_equal(np.asarray(batch["label"]), straight[step]["label"])
  # Epochs are shuffled differently, and augmentations differ from step to step.
  assert not np.array_equal(straight[0]["label"], straight[per_epoch]["label"])


def test_an_epoch_is_the_same_number_of_batches_on_every_process(data_dir):
  # A process may hold more examples than the smallest one (uneven splits, label_subset); it still
  # yields steps_per_epoch batches, so that all processes start each epoch at the same step.
  config = small_config(data_dir, batch_size=64)
  builder, info = _setup(config)
  full = input_pipeline.steps_per_epoch(config, info)
  assert sum(1 for _ in input_pipeline._train_epoch(config, builder, info, 0, 0, full)) == full
  assert sum(1 for _ in input_pipeline._train_epoch(config, builder, info, 0, 2, full - 3)) == full - 5


def test_each_epoch_visits_distinct_examples(data_dir, mesh):
  config = small_config(data_dir, batch_size=64)
  builder, info = _setup(config)
  it = input_pipeline.train_iterator(config, builder, info, mesh)
  images = np.concatenate([np.asarray(next(it)["image"]) for _ in range(input_pipeline.steps_per_epoch(config, info))])
  unique = np.unique(images.reshape(len(images), -1), axis=0)
  assert len(unique) >= 0.97 * len(images)  # a few digits are pixel-identical in the source data.


def test_batch_larger_than_the_data_is_an_error(data_dir, mesh):
  config = small_config(data_dir, batch_size=4096)
  builder, info = _setup(config)
  with pytest.raises(ValueError, match=r"config.batch_size=4096"):
    next(input_pipeline.train_iterator(config, builder, info, mesh))


def test_imagenet2012_config_on_mock_data(tmp_path, mesh):
  config = mixer_b16_imagenet2012.get_config()
  config.data_dir = str(tmp_path)
  config.batch_size, config.eval_batch_size = 8, 16
  with mock_tfds("imagenet2012", str(tmp_path), {"train": 24, "validation": 24}):
    builder, info = _setup(config)
    assert info.num_classes == 1000 and info.num_train_examples == 24
    assert info.image_shape == (224, 224, 3)
    it = input_pipeline.train_iterator(config, builder, info, mesh)
    for _ in range(4):  # more than one epoch
      batch = next(it)
      assert batch["image"].shape == (8, 224, 224, 3)
      image = np.asarray(batch["image"])
      assert -1.0 <= image.min() and image.max() <= 1.0
      assert np.all((0 <= np.asarray(batch["label"])) & (np.asarray(batch["label"]) < 1000))
    masks = [float(b["mask"].sum()) for b in input_pipeline.eval_iterator(config, builder, info, mesh)]
    assert masks == [16.0, 8.0]


def test_folder_dataset_names_a_corrupt_image_and_skips_it_on_request(digits_folder, tmp_path, mesh):
  from tests.conftest import CORRUPT_IMAGE, DIGIT_NAMES
  config = small_config(str(tmp_path), dataset=f"folder:{digits_folder}")
  with pytest.raises(ValueError, match=f"{digits_folder}/{CORRUPT_IMAGE} is not a readable image.*bad_images=skip"):
    _setup(config)
  config.bad_images = "skip"
  builder, info = _setup(config)
  assert builder.info.features["label"].names == sorted(DIGIT_NAMES)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 320, 80)
  assert info.image_shape == (16, 16, 1)  # the default pp on 32px RGB PNGs
  labels = collections.Counter()
  for batch in input_pipeline.eval_iterator(config, builder, info, mesh):
    labels.update(np.asarray(batch["label"])[np.asarray(batch["mask"]) > 0].tolist())
  assert labels == {c: 8 for c in range(10)}
  assert _setup(config)[0].data_dir == builder.data_dir  # prepared once per version of the folder


def test_label_subset_of_listed_classes_relabels_them_in_listed_order(data_dir, mesh):
  config = small_config(data_dir, label_subset="7,2,4", eval_batch_size=64)
  builder, info = _setup(config)
  stored = collections.Counter(int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="test")))
  assert info.num_classes == 3 and info.num_eval_examples == stored[7] + stored[2] + stored[4]
  labels = collections.Counter()
  for batch in input_pipeline.eval_iterator(config, builder, info, mesh):
    labels.update(np.asarray(batch["label"])[np.asarray(batch["mask"]) > 0].tolist())
  assert labels == {0: stored[7], 1: stored[2], 2: stored[4]}


def test_train_percent_trains_on_the_first_examples_of_the_split(data_dir, mesh):
  config = small_config(data_dir, train_percent=10, batch_size=16)
  builder, info = _setup(config)
  assert info.num_train_examples == 144  # tfds rounds 10% of the 1438 train examples.
  stored = builder.as_dataset(split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  pp = preprocess.get_preprocess_fn(config.pp_train)
  first = stored.take(144).map(lambda ex: pp({"image": ex["image"]})["image"])
  first = {image.tobytes() for image in first.as_numpy_iterator()}
  it = input_pipeline.train_iterator(config, builder, info, mesh)
  seen = {image.tobytes() for _ in range(input_pipeline.steps_per_epoch(config, info))
          for image in np.asarray(next(it)["image"])}
  assert len(seen) > 100 and seen <= first  # a few digits are pixel-identical.


def test_input_shards_fill_their_blocks_of_each_batch_in_shard_order(data_dir, mesh):
  # One process reading the 2 input shards that 2 processes read one each: shard i fills the i-th half of every
  # global batch, its own epochs and augmentation, from any step on (digits: 1438 examples, 719 per shard, so
  # 22 batches of 32 from each, an epoch of 22 steps).
  config = small_config(data_dir, batch_size=64, input_shards=2,
                        pp_train="decode(channels=1)|inception_crop(16)|flip_lr")
  builder, info = _setup(config)
  assert input_pipeline.steps_per_epoch(config, info, builder) == 22
  shards = [list(input_pipeline._train_epoch(config, builder, info, 0, 0, 22, shard).as_numpy_iterator())
            for shard in (0, 1)]
  for start in (0, 20):
    it = input_pipeline.train_iterator(config, builder, info, mesh, start_step=start)
    for step in range(start, start + 3):  # into the second epoch from step 20
      batch = jax.tree.map(np.asarray, next(it))
      if step < 22:
        for key in ("image", "label"):
          np.testing.assert_array_equal(batch[key], np.concatenate([shards[0][step][key], shards[1][step][key]]))
  # One shard per process, said explicitly, is the default's order.
  default = input_pipeline.train_iterator(small_config(data_dir, batch_size=64), builder, info, mesh)
  explicit = input_pipeline.train_iterator(small_config(data_dir, batch_size=64, input_shards=1), builder, info, mesh)
  for _ in range(2):
    np.testing.assert_array_equal(np.asarray(next(default)["image"]), np.asarray(next(explicit)["image"]))
