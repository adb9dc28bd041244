"""Preemption, crash safety, exact resume, the non-finite guard, determinism, and bad input."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer import checkpoints, sharding, train_lib
from tests.conftest import REPO, small_config

# Random everywhere a resumed run could diverge: augmentation, dropout, stochastic depth, mixup.
RANDOM_RUN = ["--config.pp_train=decode(channels=1)|resize(20)|inception_crop(16)|flip_lr|value_range(-1, 1)",
              "--config.model.dropout_rate=0.1", "--config.model.stoch_depth=0.1", "--config.mixup=0.2",
              "--config.batch_size=32", "--config.log_every_steps=1", "--config.eval_every_steps=1000",
              "--config.warmup_steps=10"]


def _train(workdir, data_dir, *flags, **popen):
  command = [sys.executable, "train.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}", *RANDOM_RUN, *flags]
  popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
  return subprocess.Popen(command, cwd=REPO, text=True, **popen)


def _finish(process, timeout=600):
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout + stderr


def _params(workdir):
  step, params = checkpoints.load_orbax_params(workdir)
  return step, jax.tree.leaves(params)


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical(data_dir, tmp_path):
  total = ["--config.total_steps=60", "--config.checkpoint_every_steps=1000"]
  code, log = _finish(_train(tmp_path / "straight", data_dir, *total))
  assert code == 0, log[-3000:]

  interrupted = _train(tmp_path / "stopped", data_dir, *total, "--verbosity=1")  # the metric writer's lines
  for line in interrupted.stderr:  # wait until training is under way, then preempt it.
    if "[10] train/" in line:
      interrupted.send_signal(signal.SIGTERM)
      break
  code, log = _finish(interrupted)
  assert code == 143, log[-3000:]
  assert "Preempted at step" in log and "rerun the same command to resume" in log
  stopped_at = int(log.split("Preempted at step ")[1].split(":")[0])
  assert 10 <= stopped_at < 60
  assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == [str(stopped_at)]

  code, log = _finish(_train(tmp_path / "stopped", data_dir, *total))  # the same command resumes.
  assert code == 0 and f"Restored checkpoint from step {stopped_at}" in log, log[-3000:]
  (step_a, straight), (step_b, resumed) = _params(tmp_path / "straight"), _params(tmp_path / "stopped")
  assert step_a == step_b == 60
  for a, b in zip(straight, resumed, strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical, not merely close.


@pytest.mark.slow
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
  # A large state (B-size blocks on 4x4 tokens: ~690 MB with Adam) so that each save takes a while.
  flags = ["--config.model.variant=B/4", "--config.total_steps=6", "--config.checkpoint_every_steps=2",
           "--config.batch_size=8", "--config.keep_checkpoints=2", "--config.warmup_steps=1"]
  with open(tmp_path / "log.txt", "w") as log_file:  # a file, not a pipe nobody reads while we poll
    process = _train(tmp_path, data_dir, *flags, stdout=log_file, stderr=subprocess.STDOUT)
  directory = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:  # checkpoint 2 complete, 4 being written
    names = os.listdir(directory) if directory.exists() else []
    if "2" in names and any(n.startswith("4.") and "tmp" in n for n in names):
      process.kill()
      break
    time.sleep(0.005)
  process.wait()
  assert process.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
  assert any("tmp" in n for n in os.listdir(directory))  # the unfinished save is there...
  code, log = _finish(_train(tmp_path, data_dir, *flags, "--config.checkpoint_every_steps=1000"))
  assert code == 0, log[-3000:]
  assert "Restored checkpoint from step 2" in log  # ...and ignored: the newest complete one is used.
  assert "Final test top-1" in log
  assert not any("tmp" in n for n in os.listdir(directory))


def _nan_config(data_dir, policy):
  # lr 1e30 after one warm-up step: the step-2 update makes the parameters huge, the step-3 loss NaN.
  return small_config(data_dir, lr=1e30, warmup_steps=1, total_steps=8, checkpoint_every_steps=1,
                      keep_checkpoints=10, nan_policy=policy)


def test_non_finite_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(data_dir, tmp_path):
  with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite loss or gradients at step 3 .*from step 2"):
    train_lib.train_and_evaluate(_nan_config(data_dir, "stop"), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_non_finite_updates_can_be_skipped(data_dir, tmp_path):
  history = train_lib.train_and_evaluate(_nan_config(data_dir, "skip"), str(tmp_path))
  assert [t["nonfinite"] for t in history["train"]] == [0, 0, 1, 1, 1, 1, 1, 1]
  manager = checkpoints.create_manager(str(tmp_path), small_config(data_dir))
  after_2 = jax.tree.leaves(manager.restore(2)["params"])
  state_8 = manager.restore(8)
  after_8 = jax.tree.leaves(state_8["params"])
  manager.close()
  # The learning-rate schedule's step count advanced with every step; Adam's (bias correction) only with
  # the 2 updates it made, like its moments.
  leaves = {sharding.path_string(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(state_8["opt_state"])[0]}
  counts = {path.removesuffix("count"): int(leaf) for path, leaf in leaves.items() if path.endswith("/count")}
  adam = {parent for parent in counts if any(path.startswith(parent + "mu/") for path in leaves)}
  assert len(adam) == 1 and len(counts) >= 2
  assert {parent: (2 if parent in adam else 8) for parent in counts} == counts
  for a, b in zip(after_2, after_8, strict=True):  # the skipped steps left the parameters alone.
    np.testing.assert_array_equal(a, b)


def test_same_config_and_seed_give_the_same_params(data_dir, tmp_path):
  config = small_config(data_dir, total_steps=10, mixup=0.2, **{"model.dropout_rate": 0.1})
  runs = []
  for name in ("a", "b"):
    train_lib.train_and_evaluate(config, str(tmp_path / name))
    runs.append(_params(tmp_path / name)[1])
  for a, b in zip(*runs, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def broken_data_dir(tmp_path_factory):
  """A real tfds dataset of 40 PNG images per split, 2 of them unreadable."""
  path = str(tmp_path_factory.mktemp("broken"))
  images = [b"\x89PNG broken" if i in (3, 7) else tf.io.encode_png(np.full((8, 8, 1), 6 * i, np.uint8)).numpy()
            for i in range(40)]
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                                         "label": tfds.features.ClassLabel(num_classes=2)})
  split = lambda: tf.data.Dataset.from_tensor_slices({"image": images, "label": [i % 2 for i in range(40)]})
  tfds.dataset_builders.store_as_tfds_dataset(name="broken_digits", version="1.0.0", features=features,
                                              split_datasets={"train": split(), "test": split()}, data_dir=path)
  return path


def test_unreadable_image_fails_naming_the_dataset(broken_data_dir, tmp_path):
  config = small_config(broken_data_dir, dataset="broken_digits", batch_size=8, total_steps=6)
  with pytest.raises(ValueError, match=r"an image of broken_digits:train could not be read .*bad_images=skip"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_unreadable_images_can_be_skipped_and_counted(broken_data_dir, tmp_path, caplog):
  config = small_config(broken_data_dir, dataset="broken_digits", batch_size=8, total_steps=6, bad_images="skip")
  with caplog.at_level("WARNING"):
    history = train_lib.train_and_evaluate(config, str(tmp_path))
  assert history["final_step"] == 6
  assert "Skipped 2 unreadable images of broken_digits so far" in caplog.text
  assert history["eval"][-1]["num_examples"] == 38  # the test split's 40, less its 2 broken images


def test_checkpoint_of_another_model_lists_the_mismatches(data_dir, tmp_path):
  train_lib.train_and_evaluate(small_config(data_dir, total_steps=4), str(tmp_path))
  with pytest.raises(ValueError) as error:
    train_lib.train_and_evaluate(small_config(data_dir, total_steps=6, **{"model.variant": "Ti/8"}), str(tmp_path))
  message = str(error.value)
  assert "checkpoint" in message and "does not fit the model" in message
  assert "params/stem/kernel has shape (4, 4, 1, 128), the model needs (8, 8, 1, 128)" in message
  assert "params/MixerBlock_0/token_mixing/Dense_0/kernel has shape (16, 64), the model needs (4, 64)" in message


def test_workdir_that_is_not_writable_fails_at_start(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"--workdir=.*a_file/run is not writable"):
    train_lib.train_and_evaluate(small_config(data_dir, total_steps=4), str(blocker / "run"))


def test_unknown_config_key_is_named(tmp_path):
  result = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path}", "--config.learning_rate=0.1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "learning_rate" in result.stderr
