"""A run resumed on another slice: 8 simulated CPU devices -> 4 -> 8, with replicated and fsdp parameters. The
checkpoint restores resharded, bit for bit, and training goes on with the same rows in every batch. (2 -> 1
processes: tests/multihost_test.py.)"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import run_python, small_config

pytestmark = [pytest.mark.trains, pytest.mark.multidevice, pytest.mark.subprocess]

LAYOUTS = ("replicated", "fsdp")
STEPS = 6  # checkpoints every 2 steps: 8 devices train 1-2, 4 devices 3-4, 8 devices 5-6.


def config(data_dir: str, param_sharding: str):
  # Random everywhere the device count could matter: augmentation, dropout (its bits drawn for the global
  # batch, jax_threefry_partitionable) and mixup (with the neighbouring row, across devices).
  return small_config(data_dir, train_split="train[:256]", total_steps=STEPS, warmup_steps=1,
                      checkpoint_every_steps=2, keep_checkpoints=STEPS, param_sharding=param_sharding, mixup=0.2,
                      pp_train="decode(channels=1)|resize(20)|inception_crop(16)|flip_lr|value_range(-1, 1)",
                      **{"evals.eval.every_steps": 0, "model.dropout_rate": 0.1})


def record_training_rows() -> list:
  """Taps the input pipeline: each training batch's rows, as this process made them, are appended to the list
  returned, as [label, digest of the image] (prefetching makes a few more batches than are trained)."""
  from mixer import sharding
  rows, make_global = [], sharding.global_batches

  def recording(local_batches, mesh, depth):
    def tap():
      for local in local_batches:
        if "mask" not in local:  # a training batch (evaluation batches carry a mask)
          rows.append([[int(label), hashlib.sha1(image.tobytes()).hexdigest()[:12]]
                       for label, image in zip(local["label"], local["image"], strict=True)])
        yield local
    return make_global(tap(), mesh, depth)
  sharding.global_batches = recording
  return rows


def digest(tree) -> str:
  return hashlib.sha1(b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree))).hexdigest()


def record_restores() -> list:
  """Taps checkpoints.restore_latest: for each state a run restores, appends to the list returned its step, a
  digest of its params, and how a channel-mixing kernel and its Adam moment are split over the devices."""
  from mixer import checkpoints
  restores, restore_latest = [], checkpoints.restore_latest

  def recording(manager, abstract_state):
    step, state = restore_latest(manager, abstract_state)
    if state is None:
      return step, state
    kernel = state.params["MixerBlock_0"]["channel_mixing"]["Dense_0"]["kernel"]
    mu = state.opt_state[1][0].mu["MixerBlock_0"]["channel_mixing"]["Dense_0"]["kernel"]
    restores.append({"step": step, "params": digest(state.params),
                     "shards": [list(x.sharding.shard_shape(x.shape)) for x in (kernel, mu)]})
    return step, state
  checkpoints.restore_latest = recording
  return restores


def resume(data_dir: str, workdirs: dict) -> dict:
  """On this process's devices, for each layout: the run in workdirs[layout] from its newest checkpoint (from
  the start when there is none) to STEPS: its losses, the rows it trained on, the state it restored and a
  digest of that checkpoint's params as saved (read whole onto one device)."""
  from mixer import checkpoints, train_lib
  rows, restores, out = record_training_rows(), record_restores(), {}
  for layout, workdir in workdirs.items():
    saved = os.path.isdir(os.path.join(workdir, "checkpoints"))
    saved = digest(checkpoints.restore_params(workdir)[1]) if saved else None
    rows.clear()
    restores.clear()
    history = train_lib.train_and_evaluate(config(data_dir, layout), workdir)
    out[layout] = {"train": history["train"], "rows": rows[:len(history["train"])],
                   "restored": restores[0] if saved else None, "saved": saved}
  return out


def _resume(data_dir, workdirs, devices):
  out = run_python(f"import json\nfrom tests.slices_test import resume\n"
                   f"print(json.dumps(resume({data_dir!r}, {workdirs!r})))", devices=devices)
  return json.loads(out.strip().splitlines()[-1])


def _copy_at(source, target, step: int) -> str:
  """A copy of the workdir `source` whose newest checkpoint is `step`."""
  shutil.copytree(source, target)
  for name in os.listdir(target / "checkpoints"):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(target / "checkpoints" / name)
  return str(target)


def _params(workdir):
  from mixer import checkpoints
  return checkpoints.restore_params(str(workdir))


def test_a_run_resumes_on_half_and_on_twice_the_devices(data_dir, tmp_path):
  eight = _resume(data_dir, {layout: str(tmp_path / f"8-{layout}") for layout in LAYOUTS}, devices=8)
  four = _resume(data_dir, {layout: _copy_at(tmp_path / f"8-{layout}", tmp_path / f"4-{layout}", 2)
                            for layout in LAYOUTS}, devices=4)
  back = _resume(data_dir, {layout: _copy_at(tmp_path / f"4-{layout}", tmp_path / f"84-{layout}", 4)
                            for layout in LAYOUTS}, devices=8)
  for layout in LAYOUTS:
    straight, resumed, resumed_back = eight[layout], four[layout], back[layout]
    # Resharded exactly: the same bits, split over 4 devices (fsdp: 512 / 4 rows each), then over 8.
    assert resumed["restored"]["step"] == 2 and resumed_back["restored"]["step"] == 4
    split = {"replicated": [[128, 512]] * 2, "fsdp": [[32, 512], [16, 512]]}[layout]
    assert [resumed["restored"]["shards"], resumed_back["restored"]["shards"]] == [[shard] * 2 for shard in split]
    assert resumed["restored"]["params"] == resumed["saved"]
    assert resumed_back["restored"]["params"] == resumed_back["saved"]
    # The same rows, in the same order, in every batch.
    assert [t["step"] for t in resumed["train"]] == [3, 4, 5, 6] and resumed["rows"] == straight["rows"][2:]
    assert [t["step"] for t in resumed_back["train"]] == [5, 6] and resumed_back["rows"] == straight["rows"][4:]
    # Training goes on alike, not bit for bit: each gradient is summed over the rows of 4 devices, then over the
    # devices, instead of 8 (float additions in another order: the losses differ by about 1e-7, relatively).
    losses = lambda run: [t["loss"] for t in run["train"]]
    np.testing.assert_allclose(losses(resumed), losses(straight)[2:], rtol=1e-5)
    np.testing.assert_allclose(losses(resumed_back), losses(straight)[4:], rtol=1e-5)
    # Adam moves a parameter by up to about lr (3e-3) a step whatever the size of its gradient: where a gradient
    # is near zero, its rounding can move the parameter visibly (up to 1.1e-4 measured); most parameters come out
    # bit-identical (the median difference is 0, the mean 4e-9).
    straight_params = jax.tree.leaves(_params(tmp_path / f"8-{layout}")[1])
    for name in ("4", "84"):
      params = jax.tree.leaves(_params(tmp_path / f"{name}-{layout}")[1])
      differences = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                                    for a, b in zip(straight_params, params, strict=True)])
      assert differences.max() < 5e-4 and np.median(differences) == 0 and differences.mean() < 1e-7, name
