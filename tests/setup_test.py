"""Run setup: config validation, the order of the start-up checks, and what a kept head must match."""

import dataclasses
import json
import os
import socket
import time

import pytest

from mixer import dataset, run_record, setup, train_lib, workdir_lock
from tests.conftest import small_config


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 12, r"config.batch_size=12 is not a positive multiple of the 8 devices"),
    ("eval_batch_size", 20, r"config.eval_batch_size=20"),
    ("model.variant", "Q/16", r"config.model.variant='Q/16'"),
    ("loss", "hinge", r"config.loss='hinge'"),
    ("log_every_steps", 0, r"config.log_every_steps=0"),
    ("grad_accum_steps", 3, r"config.grad_accum_steps=3 does not divide the batch of each of the 8 data shards, 4"),
    ("param_sharding", "embed=rows", r"config.param_sharding='embed=rows'"),
    # Values that train without an error but cannot be right: -0.1 is gradient ascent, a clip of 0 zeroes updates.
    ("lr", -0.1, r"config.lr=-0.1 must be positive and finite"),
    ("lr", 0.0, r"config.lr=0.0 must be positive"),
    ("lr", float("nan"), r"config.lr=nan must be positive"),
    ("lr", float("inf"), r"config.lr=inf must be positive and finite"),
    ("weight_decay", -1e-4, r"config.weight_decay=-0.0001 must be 0 or more"),
    ("warmup_steps", -5, r"config.warmup_steps=-5 must be 0 or more"),
    ("grad_clip_norm", 0.0, r"config.grad_clip_norm=0.0 must be positive"),
    ("mixup", -0.2, r"config.mixup=-0.2 must be 0 or more"),
    ("optim.b2", 1.0, r"config.optim.b2=1.0 is not in \[0, 1\)"),
    ("optim.momentum", -0.9, r"config.optim.momentum=-0.9 is not in \[0, 1\)"),
    ("shuffle_buffer", 0, r"config.shuffle_buffer=0 must be positive"),
    ("max_labels", 0, r"config.max_labels=0 must be positive"),
    ("prefetch_to_device", -1, r"config.prefetch_to_device=-1 must be 0 or more"),
    ("profile_start_step", -1, r"config.profile_start_step=-1 must be a step \(the first is 1\) or 0 \(no trace\)"),
    ("profile_num_steps", 0, r"config.profile_num_steps=0 must be 1 or more"),
    ("input_shards", 3, r"config.input_shards=3 is not 0 \(one per process\) or a positive divisor of config.batch_"),
    ("input_shards", -1, r"config.input_shards=-1"),
])
def test_bad_config_fails_at_start_naming_the_key(key, value, match):
  config = small_config("unused", **{key: value})
  with pytest.raises(ValueError, match=match):
    setup.validate_config(config, num_devices=8, num_processes=1)


def test_a_run_length_in_epochs_must_be_finite():
  setup.validate_config(small_config("unused", total_steps=-1, total_epochs=2.5), num_devices=8, num_processes=1)
  with pytest.raises(ValueError, match=r"config.total_epochs=nan must be positive and finite"):
    setup.validate_config(small_config("unused", total_steps=-1, total_epochs=float("nan")), 8, 1)


def test_gradient_accumulation_splits_each_data_shard():
  # 8 devices as 4 data shards x 2 model: each shard's 2 rows split into 2 micro-batches of 1.
  config = small_config("unused", batch_size=8, grad_accum_steps=2, mesh={"data": 4, "model": 2})
  setup.validate_config(config, num_devices=8, num_processes=1)
  with pytest.raises(ValueError, match=r"config.grad_accum_steps=4 does not divide the batch of each of the 4"):
    setup.validate_config(small_config("unused", batch_size=8, grad_accum_steps=4,
                                       mesh={"data": 4, "model": 2}), num_devices=8, num_processes=1)
  # The model axis given as -1 ("the rest"): 2 data shards of 8 rows, 4 micro-batches of 2.
  setup.validate_config(small_config("unused", batch_size=16, grad_accum_steps=4,
                                     mesh={"data": 2, "model": -1}), num_devices=8, num_processes=1)


@pytest.mark.unit
def test_a_live_lock_is_refused_before_the_data_is_read(tmp_path):
  workdir, data_dir = tmp_path / "workdir", tmp_path / "tfds"
  workdir.mkdir()
  data_dir.mkdir()
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))  # this process: alive.
  with pytest.raises(workdir_lock.WorkdirLockedError, match=r"is in use by another trainer"):
    train_lib.train_and_evaluate(small_config(str(data_dir)), str(workdir))
  assert os.listdir(data_dir) == []  # the embedded dataset was not prepared: the lock came first.


def test_a_kept_head_must_have_been_trained_on_the_same_classes(tmp_path):
  record = {"class_names": ["cat", "dog"], "label_subset": "", "splits": {"train": 8}, "tfds_name": "folder"}
  run_record.start(small_config("unused"), str(tmp_path), record, step=None)
  setup.check_same_classes(str(tmp_path), ("cat", "dog"), "config.init.checkpoint", "")
  for other in (("dog", "cat"), ("cat", "dog", "eel")):
    with pytest.raises(ValueError, match=r"config.init.checkpoint=.* was trained on 2 classes that differ"):
      setup.check_same_classes(str(tmp_path), other, "config.init.checkpoint", "")
  setup.check_same_classes(str(tmp_path / "model.npz"), ("eel",), "config.init.checkpoint", "")  # no record


def test_data_that_changed_beyond_its_classes_is_named(tmp_path, caplog):
  record = {"class_names": ["cat", "dog"], "label_subset": "", "splits": {"train": 8}, "tfds_name": "folder",
            "files_sha256": "a" * 64}
  run_record.start(small_config("unused"), str(tmp_path), record, step=None)
  same = dataset.DatasetInfo(name="folder:x", train_split="train", held_out=None, label_key="label",
                             label_subset=None, multilabel=False, max_labels=16, class_names=("cat", "dog"),
                             num_train_examples=8, num_eval_examples=0, min_local_train_examples=8,
                             image_shape=(16, 16, 3), fingerprint=record)
  assert not setup.warn_if_data_changed(str(tmp_path), same)
  grown = dataclasses.replace(same, fingerprint={**record, "splits": {"train": 9}, "files_sha256": "b" * 64})
  with caplog.at_level("WARNING"):
    assert setup.warn_if_data_changed(str(tmp_path), grown)
  assert "folder:x is not the data that the run in" in caplog.text and '"train": 8} -> {"train": 9}' in caplog.text
  assert not setup.warn_if_data_changed(str(tmp_path / "released.npz"), grown)  # no record to compare with
