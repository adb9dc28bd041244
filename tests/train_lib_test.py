"""Tests for mixer/train_lib.py: the train step, the loop with resume, and config validation."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mixer import (
  console,
  evaluators,
  input_pipeline,
  models,
  optim,
  predict,
  run_record,
  setup,
  steps,
  train_lib,
  trees,
)
from tests import profiling_test
from tests.conftest import REPO, restore_params, run_python, small_config


def _step_fixture(config):
  mesh, builder, info = setup.setup(config)
  model = setup.create_model(config, info)
  schedule = optim.create_schedule(config, 100)
  tx = optim.create_optimizer(config, schedule)
  state, state_sharding = steps.create_train_state(model, tx, info.image_shape, mesh, config.seed,
                                                   config.param_sharding)
  step = steps.make_train_step(config, model, tx, schedule, model.num_classes, state_sharding, mesh)
  batch = next(input_pipeline.train_iterator(config, builder, info, mesh))
  return state, step, batch


@pytest.mark.trains
@pytest.mark.parametrize("loss", ["softmax_xent", "sigmoid_xent"])
def test_train_step_fits_a_batch(data_dir, loss):
  state, step, batch = _step_fixture(small_config(data_dir, loss=loss, warmup_steps=1))
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.5 * losses[0]
  if loss == "softmax_xent":  # sigmoid first spends its steps pushing all 10 biases negative.
    assert float(metrics["accuracy"]) > 0.9


@pytest.mark.trains
def test_train_step_donates_the_state(data_dir):
  state, step, batch = _step_fixture(small_config(data_dir))
  old_kernel = state.params["head"]["kernel"]
  step(state, batch, jax.random.key(0))
  assert old_kernel.is_deleted()


@pytest.mark.trains
def test_gradient_accumulation_gives_the_same_update(data_dir):
  results = []
  for accum in (1, 4):
    # SGD: its update is linear in the gradient, so any accumulation error would show undistorted.
    config = small_config(data_dir, grad_accum_steps=accum, warmup_steps=1, **{"optim.name": "sgd"})
    state, step, batch = _step_fixture(config)
    state = jax.tree.map(lambda x: x + 0.0, state)  # a copy: the step donates it.
    for _ in range(3):
      state, metrics = step(state, batch, jax.random.key(0))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (params_1, metrics_1), (params_4, metrics_4) = results
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.trains
def test_mixup_and_stochastic_depth_train(data_dir):
  config = small_config(data_dir, mixup=0.5, warmup_steps=1, **{"model.stoch_depth": 0.1})
  state, step, batch = _step_fixture(config)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0]


def test_multilabel_targets_and_precision_at_1():
  labels = jnp.array([[0, 2, -1], [1, -1, -1]])
  targets = steps.to_targets(labels, 4)
  np.testing.assert_array_equal(targets, [[1, 0, 1, 0], [0, 1, 0, 0]])
  logits = jnp.array([[0.0, 5.0, 1.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
  np.testing.assert_array_equal(steps.correct_at_1(logits, targets), [False, True])
  np.testing.assert_array_equal(steps.to_targets(jnp.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
  # Training accuracy counts the example's own labels (a mixup-mixed example's dominant ones, weight >= 1/2, not
  # its neighbour's); a multi-label example's every label.
  logits = jnp.array([[0.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
  np.testing.assert_array_equal(steps.train_correct(logits, jnp.array([1, 1, 0])), [False, True, False])
  multi = jnp.array([[1, -1], [1, 3], [0, 2]])
  np.testing.assert_array_equal(steps.train_correct(logits, multi), [False, True, True])
  # -1 pads a list; it is never a prediction.
  np.testing.assert_array_equal(steps.train_correct(jnp.zeros((1, 4)), jnp.array([[-1, -1]])), [False])


def test_losses_match_their_definitions():
  logits = jnp.array([[2.0, -1.0, 0.5]])
  labels = jax.nn.one_hot(jnp.array([0]), 3)
  p = np.exp([2.0, -1.0, 0.5]) / np.exp([2.0, -1.0, 0.5]).sum()
  np.testing.assert_allclose(steps.softmax_xent(logits, labels), [-np.log(p[0])], rtol=1e-6)
  s = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5])))
  expected = -(np.log(s[0]) + np.log(1 - s[1]) + np.log(1 - s[2]))
  np.testing.assert_allclose(steps.sigmoid_xent(logits, labels), [expected], rtol=1e-6)


def test_schedule_warms_up_then_decays_to_zero():
  config = small_config("unused", lr=1.0, warmup_steps=10)
  for kind in ("linear", "cosine"):
    config.schedule = kind
    schedule = optim.create_schedule(config, 110)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)
  assert float(optim.create_schedule(config, 110)(60)) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint


@pytest.mark.trains
def test_train_and_evaluate_then_resume(data_dir, tmp_path, caplog):
  workdir = str(tmp_path)
  config = small_config(data_dir, total_steps=30, checkpoint_every_steps=10, log_every_steps=5,
                        profile_start_step=6, profile_num_steps=2, **{"evals.eval.every_steps": 15})
  history = train_lib.train_and_evaluate(config, workdir)
  [trace] = profiling_test.traces(workdir)  # WORKDIR/plugins/profile/RUN/HOST.xplane.pb, as TensorBoard reads it
  assert profiling_test.traced_train_steps(trace) == [6, 7]
  assert [e["step"] for e in history["eval"]] == [15, 30]
  assert history["eval"][-1]["top1"] > 0.5  # chance is 0.1
  assert history["eval"][-1]["num_examples"] == 359
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "30"]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  # The speed from the second fetch of metrics on (the first starts the clock); no MFU: a CPU's peak is unknown.
  assert "tflops_per_device" not in history["train"][0] and "mfu" not in history["train"][-1]
  assert all(t["tflops_per_device"] > 0 for t in history["train"][1:])
  startup = history["startup"]  # in process, "auto" keeps the session's cache (tests/conftest.py)
  assert startup["cache_dir"] == os.environ["MIXER_TESTS_JAX_CACHE"] and startup["from_cache"] in (True, False)
  assert 0 < startup["compile_seconds"] < startup["first_step_seconds"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 30

  config.total_steps = 40  # a longer run from the same workdir continues from step 30, once allowed.
  with pytest.raises(run_record.RunChangedError, match=r"(?s)at step 30 .*total_steps: 30 -> 40"):
    train_lib.train_and_evaluate(config, workdir)
  config.allow_changes = "total_steps"
  with caplog.at_level("WARNING"):
    resumed = train_lib.train_and_evaluate(config, workdir)
  assert [t["step"] for t in resumed["train"]] == [35, 40]
  assert "not profiling, this run resumes after step 30" in caplog.text
  assert profiling_test.traces(workdir) == [trace]  # past the profiled steps: no second trace.
  assert run_record.changes(workdir) == [{"step": 30, "key": "total_steps", "old": 30, "new": 40}]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 30  # the record of steps 1..30 is not rewritten.
  assert resumed["final_step"] == 40
  step, params = restore_params(config, workdir)
  assert step == 40
  config.optim.name = "sgd"  # only the params are read: the run's optimizer state does not matter.
  step, sgd_params = restore_params(config, workdir)
  assert step == 40 and jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, sgd_params))
  config.optim.name = "adam"

  again = train_lib.train_and_evaluate(config, workdir)  # nothing left to do: no steps, no change.
  assert again["train"] == [] and again["final_step"] == 40


def test_bad_optimizer_and_schedule_name_the_key():
  with pytest.raises(ValueError, match=r"config.optim.name='lamb'"):
    optim.create_optimizer(small_config("unused", **{"optim.name": "lamb"}), optim.create_schedule(
        small_config("unused"), 10))
  with pytest.raises(ValueError, match=r"config.schedule='step'"):
    optim.create_schedule(small_config("unused", schedule="step"), 10)
  with pytest.raises(ValueError, match=r"config.warmup_steps=20"):
    optim.create_schedule(small_config("unused", warmup_steps=20), 10)


_TRAIN_AND_PRINT = """
import json, sys
from tests.conftest import small_config
from mixer import setup, train_lib
config = small_config({data_dir!r}, total_steps=12, **{overrides!r})
history = train_lib.train_and_evaluate(config, {workdir!r})
print(json.dumps(history))
"""


def _train_in_subprocess(data_dir, workdir, devices, **overrides):
  out = run_python(_TRAIN_AND_PRINT.format(data_dir=data_dir, workdir=workdir, overrides=overrides),
                   devices=devices)
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.trains
@pytest.mark.multidevice
@pytest.mark.subprocess
def test_batch_not_divisible_by_devices_fails_at_start(data_dir, tmp_path):
  with pytest.raises(AssertionError, match=r"config.batch_size=36 is not a positive multiple of the 8 devices"):
    _train_in_subprocess(data_dir, str(tmp_path), devices=8, batch_size=36)


def test_weight_decay_masks_kernels_only_with_looped_or_scanned_blocks():
  config = small_config("unused")
  params = models.create_model(config.model, 10).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  decayed = {k for k, v in trees.flatten(optim.decay_mask(params)).items() if v}
  assert decayed and all(k.endswith("/kernel") for k in decayed)
  assert "MixerBlock_0/token_mixing/Dense_0/kernel" in decayed and "MixerBlock_0/LayerNorm_0/scale" not in decayed
  # Stacked blocks ([blocks, ...] leaves, so biases and scales are 2-D): the same parameters decay.
  scanned = trees.flatten(optim.decay_mask(models.stack_blocks(params)))
  assert {k.removeprefix("MixerBlocks/") for k, v in scanned.items() if v and k.startswith("MixerBlocks")} == {
      k.removeprefix("MixerBlock_0/") for k in decayed if k.startswith("MixerBlock_0/")}


@pytest.mark.trains
@pytest.mark.subprocess
def test_a_folder_run_records_its_classes_and_refuses_a_changed_folder(data_dir, tmp_path):
  images, workdir = tmp_path / "images", str(tmp_path / "workdir")
  for label, name in enumerate(("cat", "dog", "owl")):  # 3 classes of 4 train and 2 test images
    for split, count in (("train", 4), ("test", 2)):
      (images / split / name).mkdir(parents=True)
      for i in range(count):
        Image.fromarray(np.full((16, 16, 3), 60 * label + 10 * i, np.uint8)).save(images / split / name / f"{i}.png")
  config = small_config(data_dir, dataset=f"folder:{images}", total_steps=2, warmup_steps=1, batch_size=4,
                        eval_batch_size=4, **{"evals.eval.every_steps": 0})
  history = train_lib.train_and_evaluate(config, workdir)
  assert history["headline"] == ("eval", "top1")  # declared by the classification evaluator
  assert not os.path.exists(os.path.join(workdir, "plugins"))  # no profile unless asked for.
  assert console.final_message(history, config.dataset, workdir).startswith(
      f"Trained steps 1..2; no evaluator with a headline result ran at the end (config.evals). Evaluate the "
      f"checkpoint in {workdir} with `python evaluate.py --workdir {workdir}`")
  again = train_lib.train_and_evaluate(config, workdir)
  assert console.final_message(again, config.dataset, workdir).startswith(
      f"Nothing to train: the checkpoint in {workdir} is already at step 2")
  assert run_record.class_names(workdir) == sorted(os.listdir(images / "train"))

  (images / "train" / "dog").rename(images / "train" / "zog")  # same shapes, another labelling.
  (images / "test" / "dog").rename(images / "test" / "zog")
  with pytest.raises(run_record.RunChangedError, match=r"(?s)at step 2 .*class_names: .*\"zog\""):
    train_lib.train_and_evaluate(config, workdir)
  # Predictions keep the names the run trained with, not the folder's new ones; top-1 against the relabelled
  # folder is refused in one line.
  assert predict.class_names(config, 3, workdir) == ["cat", "dog", "owl"]
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1 and "Top-1" not in result.stdout, result
  assert re.fullmatch(r"evaluate.py: error: --workdir=\S+ was trained on 3 classes that differ from this dataset's 3 "
                      r"\(1: 'dog' vs 'owl'; 2: 'owl' vs 'zog'; recorded in its dataset.json\): .*\n",
                      result.stderr), result.stderr


class _ImplicitTransfer:
  """An evaluator module whose evaluator adds a host array to a parameter on the device: an implicit
  host-to-device copy (the kind the guard catches on CPU too; a device-to-host read there is zero-copy)."""
  KEYS = ()

  @staticmethod
  def validate(settings, where):
    del settings, where

  class Evaluator:
    headline = None

    def __init__(self, name, settings, predict, data):
      del name, predict, data
      self.every_steps = settings.every_steps

    def run(self, params, stop=None):
      del stop
      return {"head_sum": float(jax.device_get((params["head"]["bias"] + np.ones(10, np.float32)).sum()))}

    def scalars(self, results):
      return results


@pytest.mark.trains
def test_the_loop_refuses_implicit_host_device_transfers(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(evaluators.TYPES, "implicit", _ImplicitTransfer)
  config = small_config(data_dir, total_steps=2, warmup_steps=1)
  config.evals.slow = ml_collections.ConfigDict(dict(type="implicit", every_steps=1))
  with pytest.raises(Exception, match=r"Disallowed host-to-device transfer"):
    train_lib.train_and_evaluate(config, str(tmp_path))
