"""Tests for mixer/checkpoints.py: orbax save/restore of a sharded train state, keep-last-K."""

import contextlib
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import checkpoints, sharding
from tests.conftest import model_and_params, small_config


def _state(value):
  mesh = sharding.create_mesh({"data": -1, "model": 1})
  tree = {"params": {"w": jnp.full((4, 3), value)}, "step": jnp.array(int(value), jnp.int32)}
  return jax.device_put(tree, sharding.replicated(mesh))


def test_save_restore_roundtrip_and_keep_last_k(tmp_path):
  config = small_config("unused", keep_checkpoints=2)
  manager = checkpoints.create_manager(str(tmp_path), config)
  for step in (1, 2, 3):
    checkpoints.save(manager, step, _state(float(step)))
  manager.wait_until_finished()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  step, restored = checkpoints.restore_latest(manager, checkpoints.abstract(_state(0.0)))
  manager.close()
  assert step == 3
  np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 3), 3.0))
  assert restored["params"]["w"].sharding == _state(0.0)["params"]["w"].sharding


def test_restore_from_an_empty_workdir_is_none(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), small_config("unused"))
  assert checkpoints.restore_latest(manager, checkpoints.abstract(_state(0.0))) == (None, None)
  manager.close()


def test_an_unfinished_save_is_not_restored(tmp_path):
  """orbax writes into a temporary directory and renames it when complete: a leftover is ignored."""
  config = small_config("unused")
  manager = checkpoints.create_manager(str(tmp_path), config)
  checkpoints.save(manager, 5, _state(5.0))
  manager.wait_until_finished()
  manager.close()
  os.makedirs(tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-123")
  manager = checkpoints.create_manager(str(tmp_path), config)
  step, restored = checkpoints.restore_latest(manager, checkpoints.abstract(_state(0.0)))
  manager.close()
  assert step == 5 and float(restored["params"]["w"][0, 0]) == 5.0


def test_params_restore_alone_onto_a_mesh_and_a_wrong_model_lists_the_arrays(tmp_path):
  _, params, _ = model_and_params()
  adam_like = {"mu": params, "nu": params, "count": np.int32(3)}
  manager = checkpoints.create_manager(str(tmp_path), small_config("unused"))
  checkpoints.save(manager, 9, jax.device_put({"params": params, "opt_state": adam_like, "step": np.int32(9)}))
  manager.wait_until_finished()
  manager.close()
  replicated = sharding.replicated(sharding.create_mesh({"data": -1, "model": 1}))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  step, restored = checkpoints.restore_params(str(tmp_path), abstract)
  assert step == 9 and jax.tree.structure(restored) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
    assert got.sharding == replicated
    np.testing.assert_array_equal(np.asarray(got), want)
  _, other, _ = model_and_params(num_classes=7)
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other)
  with pytest.raises(ValueError, match=r"(?s)does not fit the model \(2 problems\).*head/bias has shape \(10,\)"):
    checkpoints.restore_params(str(tmp_path / "checkpoints"), wrong)


# Lines that native libraries (TF, XLA, libtpu) print themselves, bypassing Python's logging.
NATIVE_LOGS = ("W0000", "E0000", "I0000", "WARNING: All log messages", "WARNING: Logging before", "Failed to find host",
               "=== Source Location", "learning/")


@contextlib.contextmanager
def full_disk(directory, size: str):
  """Mounts a tmpfs of `size` on `directory` (None where mounting is not permitted: not root, a container)."""
  if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                      str(directory)], capture_output=True).returncode:
    yield None
    return
  try:
    yield directory
  finally:
    subprocess.run(["umount", str(directory)], check=True)


def test_a_save_on_a_full_disk_fails_in_one_line_naming_the_step_and_the_os_error(tmp_path, capfd):
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  with full_disk(directory, size="64k") as made:
    if made is None:
      pytest.skip("needs root to mount a small tmpfs")
    manager = checkpoints.create_manager(str(tmp_path), small_config("unused"))
    mesh = sharding.create_mesh({"data": -1, "model": 1})
    w = np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)  # 1 MB that does not compress
    state = jax.device_put({"w": w, "step": np.int32(3)}, sharding.replicated(mesh))
    checkpoints.save(manager, 3, state)
    with pytest.raises(checkpoints.CheckpointSaveError) as error:
      for _ in range(1000):  # the training loop's check, each step
        checkpoints.raise_if_save_failed(manager)
        time.sleep(0.01)
    message = str(error.value)
    assert message.startswith(f"saving the checkpoint of step 3 ({directory / '3'}) failed: OSError: [Errno 28] No "
                              f"space left on device (ENOSPC, writing {directory}"), message
    assert "\n" not in message and "the newest complete checkpoint is none" in message
    time.sleep(1)  # tensorstore's writes still pending when the save failed
    with contextlib.suppress(checkpoints.CheckpointSaveError):
      manager.close()
  captured = capfd.readouterr()
  assert "Event loop is closed" not in captured.err and "Traceback" not in captured.err, captured.err[-3000:]
  assert "ERROR" not in captured.err, captured.err[-3000:]
