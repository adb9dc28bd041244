"""Preemption, crash safety, exact resume, the non-finite guard, determinism, and bad input."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer import checkpoints, guards, params_io, setup, train_lib, trees, workdir_lock
from tests import checkpoints_test
from tests.conftest import REPO, override, restore_params, small_config

# Random everywhere a resumed run could diverge: augmentation, dropout, stochastic depth, mixup.
RANDOM_RUN = ["--config.pp_train=decode(channels=1)|resize(20)|inception_crop(16)|flip_lr|value_range(-1, 1)",
              "--config.model.dropout_rate=0.1", "--config.model.stoch_depth=0.1", "--config.mixup=0.2",
              "--config.batch_size=32", "--config.log_every_steps=1", "--config.evals.eval.every_steps=1000",
              "--config.warmup_steps=10"]


def _train(workdir, data_dir, *flags, **popen):
  command = [sys.executable, "train.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}", *RANDOM_RUN, *flags]
  popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
  return subprocess.Popen(command, cwd=REPO, text=True, **popen)


def _finish(process, timeout=600):
  stdout, stderr = process.communicate(timeout=timeout)
  return process.returncode, stdout + stderr


def _params(workdir):
  step, params = checkpoints.restore_params(workdir)
  return step, jax.tree.leaves(params)


@pytest.mark.trains
@pytest.mark.subprocess
def test_sigterm_during_an_evaluation_checkpoints_in_seconds_and_the_resumed_run_is_bit_identical(data_dir, tmp_path):
  # Evaluations at steps 50 and 60; the first one compiles its step, then runs 6 batches.
  total = ["--config.total_steps=60", "--config.checkpoint_every_steps=1000", "--config.evals.eval.every_steps=50"]
  code, log = _finish(_train(tmp_path / "straight", data_dir, *total, "--config.compile_cache_dir=none"))
  assert code == 0, log[-3000:]
  assert re.search(r"First step after [0-9.]+ s \(compile [0-9.]+ s, no compilation cache\)", log), log[-3000:]

  cache = f"--config.compile_cache_dir={tmp_path / 'cache'}"  # empty: the first start compiles
  interrupted = _train(tmp_path / "stopped", data_dir, *total, cache, "--verbosity=1")  # its debug lines
  seen = []
  for line in interrupted.stderr:  # wait until the first evaluation is under way, then preempt it.
    seen.append(line)
    if "Step 50: evaluating eval" in line:
      interrupted.send_signal(signal.SIGTERM)
      sent = time.time()
      break
  code, log = _finish(interrupted)
  first_start = "".join(seen) + log
  elapsed = time.time() - sent
  assert code == 143, log[-3000:]
  assert "Preempted at step 50:" in log and "rerun the same command to resume" in log
  assert "Step 50: abandoned evaluator eval to stop" in log and "Step 50: eval top1" not in log
  assert "[51] train/" not in log
  assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["50"]
  assert elapsed < 30, f"exited {elapsed:.1f}s after SIGTERM"  # the bound that preemption notices give
  print(f"exited {elapsed:.1f}s after SIGTERM during an evaluation")

  code, log = _finish(_train(tmp_path / "stopped", data_dir, *total, cache))  # the same command resumes.
  assert code == 0 and "Restored checkpoint from step 50" in log, log[-3000:]
  # The restart loads the train step that the first start compiled into the cache, in at most 30% of the time.
  first = re.search(r"First step after [0-9.]+ s \(compile ([0-9.]+) s, cached in \S+ for a restart\)", first_start)
  again = re.search(r"First step after [0-9.]+ s \(compile ([0-9.]+) s, from the cache\)", log)
  assert first and again, (first_start[-3000:], log[-3000:])
  assert float(again.group(1)) <= 0.3 * float(first.group(1)), (first.group(0), again.group(0))
  assert "cpu_aot_loader" not in log  # XLA:CPU's lines on loading a cached executable: not on the quiet console
  print(f"{first.group(0)}; resumed: {again.group(0)}")
  (step_a, straight), (step_b, resumed) = _params(tmp_path / "straight"), _params(tmp_path / "stopped")
  assert step_a == step_b == 60
  for a, b in zip(straight, resumed, strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical, not merely close.


@pytest.mark.trains
@pytest.mark.subprocess
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
  # Saves every 2 steps. When a save's temporary directory appears the trainer is stopped (SIGSTOP), so that what
  # is on disk stays as it is: a save still unfinished gets the SIGKILL, a finished one lets the run go on to the
  # next save. No large state is needed to make a save last long enough to be caught.
  flags = ["--config.total_steps=20", "--config.checkpoint_every_steps=2", "--config.batch_size=8",
           "--config.keep_checkpoints=2", "--config.warmup_steps=1"]
  with open(tmp_path / "log.txt", "w") as log_file:  # a file, not a pipe nobody reads while we poll
    process = _train(tmp_path, data_dir, *flags, stdout=log_file, stderr=subprocess.STDOUT)
  directory = tmp_path / "checkpoints"
  saving = lambda names: [n for n in names if "tmp" in n]
  caught, deadline = None, time.time() + 300
  while caught is None and time.time() < deadline and process.poll() is None:
    if saving(os.listdir(directory) if directory.exists() else []):
      process.send_signal(signal.SIGSTOP)
      names = os.listdir(directory)  # as the killed process leaves it
      complete = sorted(int(n) for n in names if n.isdigit())
      if saving(names) and complete:
        caught = (int(saving(names)[0].split(".")[0]), complete[-1])
        process.kill()
      process.send_signal(signal.SIGCONT)  # killed, or runs on to its next save
    time.sleep(0.002)
  process.wait()
  assert caught and process.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
  saved_at, previous = caught
  assert previous == saved_at - 2 and str(previous) in os.listdir(directory)  # the save before it finished
  assert saving(os.listdir(directory))  # the unfinished save is there...
  code, log = _finish(_train(tmp_path, data_dir, *flags, "--config.checkpoint_every_steps=1000"))
  assert code == 0, log[-3000:]
  assert f"Restored checkpoint from step {previous}" in log  # ...and ignored: the newest complete one is used.
  assert "Final test top-1" in log
  assert not saving(os.listdir(directory))


def _nan_config(data_dir, policy):
  # lr 1e30 after one warm-up step: the step-2 update makes the parameters huge, the step-3 loss NaN.
  return small_config(data_dir, lr=1e30, warmup_steps=1, total_steps=8, checkpoint_every_steps=1,
                      keep_checkpoints=10, nan_policy=policy)


@pytest.mark.trains
def test_non_finite_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(data_dir, tmp_path):
  with pytest.raises(guards.NonFiniteLossError, match=r"non-finite loss or gradients at step 3 .*from step 2"):
    train_lib.train_and_evaluate(_nan_config(data_dir, "stop"), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.trains
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
  leaves = trees.flatten(state_8["opt_state"])
  counts = {path.removesuffix("count"): int(leaf) for path, leaf in leaves.items() if path.endswith("/count")}
  adam = {parent for parent in counts if any(path.startswith(parent + "mu/") for path in leaves)}
  assert len(adam) == 1 and len(counts) >= 2
  assert {parent: (2 if parent in adam else 8) for parent in counts} == counts
  for a, b in zip(after_2, after_8, strict=True):  # the skipped steps left the parameters alone.
    np.testing.assert_array_equal(a, b)


@pytest.mark.trains
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


@pytest.mark.unit
def test_unreadable_image_fails_naming_the_dataset(broken_data_dir, tmp_path):
  config = small_config(broken_data_dir, dataset="broken_digits", batch_size=8, total_steps=6)
  with pytest.raises(ValueError, match=r"an image of broken_digits:train could not be read .*bad_images=skip"):
    train_lib.train_and_evaluate(config, str(tmp_path))


@pytest.mark.trains
def test_unreadable_images_can_be_skipped_and_counted(broken_data_dir, tmp_path, caplog):
  config = small_config(broken_data_dir, dataset="broken_digits", batch_size=8, total_steps=6, bad_images="skip")
  with caplog.at_level("WARNING"):
    history = train_lib.train_and_evaluate(config, str(tmp_path))
  assert history["final_step"] == 6
  assert "Skipped 2 unreadable images of broken_digits so far" in caplog.text
  assert history["eval"][-1]["num_examples"] == 38  # the test split's 40, less its 2 broken images


@pytest.mark.unit
def test_workdir_that_is_not_writable_fails_at_start(data_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ValueError, match=r"--workdir=.*a_file/run is not writable"):
    train_lib.train_and_evaluate(small_config(data_dir, total_steps=4), str(blocker / "run"))


@pytest.fixture(scope="module")
def trained_workdir(data_dir, tmp_path_factory):
  """A finished run with a checkpoint at each of its 5 steps; tests work on copies (copy_workdir)."""
  path = tmp_path_factory.mktemp("trained") / "run"
  config = small_config(data_dir, total_steps=5, warmup_steps=1, checkpoint_every_steps=1, keep_checkpoints=10)
  train_lib.train_and_evaluate(config, str(path))
  return path, config


def copy_workdir(trained_workdir, tmp_path):
  source, config = trained_workdir
  shutil.copytree(source, tmp_path / "run")
  return tmp_path / "run", override(config.copy_and_resolve_references(), total_steps=6, allow_changes="total_steps")


def _tree(path):
  return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.trains
def test_a_rerun_with_another_model_names_the_config_keys_and_changes_nothing(trained_workdir, tmp_path):
  workdir, config = copy_workdir(trained_workdir, tmp_path)
  before = _tree(workdir)
  with pytest.raises(ValueError) as error:  # checkpoints.CheckpointMismatchError
    train_lib.train_and_evaluate(override(config, **{"model.variant": "Ti/8"}), str(workdir))
  message = str(error.value)
  assert f"differs from {workdir / 'config.json'}" in message
  assert "model.variant='Ti/8' (saved: 'Ti/4')" in message and "total_steps=6 (saved: 5)" in message
  assert "does not fit the model" in message
  assert "params/stem/kernel has shape (4, 4, 1, 128), the model needs (8, 8, 1, 128)" in message
  assert "params/MixerBlock_0/token_mixing/Dense_0/kernel has shape (16, 64), the model needs (4, 64)" in message
  assert _tree(workdir) == before  # config.json, checkpoints and logs as they were; no lock left behind.


def _damage_newest_checkpoints(workdir):
  """Keeps steps 1 and 2 intact; damages 3-5 and adds an empty step 6, as a full disk or a bad copy would."""
  directory = workdir / "checkpoints"
  for data_file in (directory / "3" / "default").rglob("d/*"):  # garbled arrays: half of every file.
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
  (directory / "4" / "default" / "manifest.ocdbt").unlink()
  (directory / "5" / "default" / "_METADATA").unlink()
  (directory / "6").mkdir()


@pytest.mark.trains
def test_damaged_newest_checkpoints_are_moved_aside_and_the_newest_intact_one_resumes(trained_workdir, tmp_path,
                                                                                      caplog):
  workdir, config = copy_workdir(trained_workdir, tmp_path)
  _damage_newest_checkpoints(workdir)
  with caplog.at_level("WARNING"):
    step, params = restore_params(config, str(workdir))  # evaluate.py's way
  assert step == 2 and jax.tree.leaves(params)
  for bad in ("6", "5", "4", "3"):
    assert f"Checkpoint {workdir / 'checkpoints' / bad} is damaged" in caplog.text
  assert "Using checkpoint step 2" in caplog.text
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["1", "2", "3", "4", "5", "6"]  # read-only

  caplog.clear()
  with caplog.at_level("WARNING"):
    history = train_lib.train_and_evaluate(config, str(workdir))
  assert history["final_step"] == 6 and history["train"][0]["step"] == 3  # resumed from step 2
  assert "_METADATA is missing" in caplog.text and "manifest.ocdbt is missing" in caplog.text
  assert "it is empty" in caplog.text and "cannot be read (ValueError: OUT_OF_RANGE" in caplog.text
  assert sorted(os.listdir(workdir / "checkpoints_damaged")) == ["3-unreadable", "4-no_manifest", "5-no_METADATA",
                                                                 "6-empty"]
  assert len(list((workdir / "checkpoints_damaged" / "3-unreadable").rglob("*"))) > 5  # moved whole, not deleted
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["1", "2", "3", "4", "5", "6"]  # new 3-6


@pytest.mark.trains
@pytest.mark.subprocess
def test_a_full_disk_stops_the_run_at_the_failed_save_with_one_line(data_dir, tmp_path):
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  with checkpoints_test.full_disk(directory, size="1M") as made:  # less than one checkpoint (about 2 MB)
    if made is None:
      pytest.skip("needs root to mount a small tmpfs")
    command = [sys.executable, "train.py", f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
               "--config.total_steps=60", "--config.checkpoint_every_steps=2", "--config.batch_size=32",
               "--config.warmup_steps=1", "--config.log_every_steps=1"]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(checkpoints_test.NATIVE_LOGS)]
  assert lines[-1].startswith(f"train.py: error: saving the checkpoint of step 2 ({directory / '2'}) failed: "
                              f"OSError: [Errno 28] No space left on device (ENOSPC, writing {directory}"), lines[-1]
  # The whole of stderr: what train.py says at start, progress lines, and that one error: no orbax errors, no
  # "Event loop is closed" tracebacks (588 of them on a full disk before).
  assert [line for line in lines if "rror" in line or "Traceback" in line] == [lines[-1]], result.stderr[-5000:]
  assert all(line.startswith(("Model ", "Data ", "Training ", "First step ", "step ")) for line in lines[:-1]), lines
  # Stopped at the first step after orbax reported the failure: only steps dispatched while its threads were
  # starting to write (tens of milliseconds each) follow the save of step 2.
  logged = [e.step for f in tmp_path.glob("events.*") for e in tf.compat.v1.train.summary_iterator(str(f))
            if any(v.tag == "train/loss" for v in e.summary.value)]
  assert logged and max(logged) <= 6, logged
  print(f"exited {time.time() - started:.1f}s after start")


def _wait_for(path, text, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if path.exists() and text in path.read_text():
      return
    time.sleep(0.1)
  raise AssertionError(f"{text!r} not seen:\n{path.read_text()[-3000:] if path.exists() else ''}")


@pytest.mark.trains
@pytest.mark.subprocess
def test_one_trainer_per_workdir_and_ctrl_c_checkpoints(data_dir, tmp_path, caplog):
  workdir, log = tmp_path / "run", tmp_path / "log.txt"
  flags = ["--config.total_steps=5000", "--config.checkpoint_every_steps=5000", "--config.batch_size=32",
           "--config.warmup_steps=1", "--config.log_every_steps=1", "--verbosity=1"]  # the metric writer's lines
  with open(log, "w") as log_file:
    process = subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                                *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=log_file, text=True)
  try:
    _wait_for(log, "[3] train/", process)
    config = small_config(data_dir, total_steps=4, warmup_steps=1)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by another trainer: host {socket.gethostname()}, pid {process.pid}"):
      train_lib.train_and_evaluate(config, str(workdir))  # a second trainer, while the first one runs.
    assert json.loads((workdir / "train.lock").read_text())["pid"] == process.pid  # the holder's lock kept
    process.send_signal(signal.SIGINT)  # Ctrl-C
    stdout, _ = process.communicate(timeout=120)
  finally:
    process.kill()
  stderr = log.read_text()
  assert process.returncode == 130, stderr[-3000:]
  assert "Ctrl-C: finishing this step, then checkpointing and exiting" in stderr
  stopped_at = int(stdout.split("Interrupted (Ctrl-C): stopped at step ")[1].split(" ")[0])
  assert os.listdir(workdir / "checkpoints") == [str(stopped_at)] and stopped_at >= 3
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  assert not (workdir / "train.lock").exists()

  # A lock left by a killed run (its pid no longer running on this host) does not block a restart.
  (workdir / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": process.pid}))
  with caplog.at_level("WARNING"):
    history = train_lib.train_and_evaluate(override(config, total_steps=stopped_at, allow_changes="total_steps"),
                                           str(workdir))
  assert history["final_step"] == stopped_at
  assert f"Removing the stale lock {workdir / 'train.lock'} of host {socket.gethostname()}, pid {process.pid}" \
      in caplog.text
  assert not (workdir / "train.lock").exists()


@pytest.mark.trains
def test_skipping_non_finite_steps_gives_up_past_max_nonfinite_steps(data_dir, tmp_path, caplog):
  config = override(_nan_config(data_dir, "skip"), max_nonfinite_steps=3)
  expected = r"at step 6: 4 steps in a row skipped, more than config.max_nonfinite_steps=3"
  with caplog.at_level("WARNING"), pytest.raises(guards.NonFiniteLossError, match=expected):
    train_lib.train_and_evaluate(config, str(tmp_path))
  for step in (3, 4, 5):
    assert f"Step {step}: non-finite loss or gradients" in caplog.text
  assert "update skipped (3 in a row, 3 in this run)" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["1", "2", "3", "4", "5"]  # none after step 5


def _cli_error(*args):
  result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  return result.stderr.strip()


@pytest.mark.subprocess
def test_bad_flags_fail_in_one_line_naming_the_flag(tmp_path):
  # Each fails while the flags are parsed (well under a second).
  assert _cli_error(f"--workdir={tmp_path}", "--config.learning_rate=0.1") == (
      "train.py: error: unknown config key learning_rate (--config.learning_rate); config has no key like it  "
      "(--verbose shows the traceback)")
  message = _cli_error(f"--workdir={tmp_path}", "--config.model.varient=B/16")
  assert message.startswith("train.py: error: unknown config key model.varient (--config.model.varient); "
                            "did you mean --config.model.variant"), message
  assert _cli_error("--config=no_such_config.py", "--config.lr=0.1") == (
      f"train.py: error: --config=no_such_config.py: no such file {os.path.join(REPO, 'no_such_config.py')}")


def test_bad_config_values_and_files_are_named(data_dir, tmp_path):
  for key, value, message in (("model.variant", "Ti/0", r"config.model.variant='Ti/0': the patch size must be"),
                              ("label_subset", "9-5", r"config.label_subset='9-5' selects no class")):
    with pytest.raises(ValueError, match=message):
      setup.validate_config(small_config(data_dir, **{key: value}), 1, 1)
  config = small_config(data_dir, **{"init.checkpoint": str(tmp_path / "missing")})
  with pytest.raises(FileNotFoundError, match=r"config.init.checkpoint='.*missing': .*missing does not exist"):
    setup.load_pretrained(config, setup.setup(config)[2])
  notes = tmp_path / "notes.txt"
  notes.write_text("not parameters")
  with pytest.raises(ValueError, match=r"notes.txt is not a readable .npz of parameters"):
    params_io.load(str(notes))
