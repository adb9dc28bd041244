"""Tests for mixer/checkpoints.py: orbax save/restore of a sharded train state, keep-last-K."""

import os

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


@pytest.mark.slow
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
