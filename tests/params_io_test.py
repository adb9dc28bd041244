"""Tests for mixer/params_io.py: the released .npz layout and our orbax workdirs, read as the same params."""

import jax
import numpy as np
import pytest

from mixer import checkpoints, models, params_io, trees
from tests.conftest import model_and_params, small_config


def test_released_npz_layout_round_trip_gives_the_same_logits(tmp_path):
  model, params, x = model_and_params()
  path = str(tmp_path / "released.npz")
  params_io.save_npz(params, path)
  with np.load(path) as data:  # the released layout: flat "/"-joined keys.
    assert "MixerBlock_0/token_mixing/Dense_0/kernel" in data.files and "pre_head_layer_norm/scale" in data.files
  loaded = params_io.load(path)
  trees.check_shapes(loaded, params, path)
  np.testing.assert_array_equal(model.apply({"params": loaded}, x), model.apply({"params": params}, x))


def test_corrupted_npz_names_the_file(tmp_path):
  _, params, _ = model_and_params()
  path = tmp_path / "broken.npz"
  params_io.save_npz(params, str(path))
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"broken.npz is not a readable .npz"):
    params_io.load(str(path))


def test_orbax_workdir_and_scanned_params_load_in_the_released_layout(tmp_path):
  _, params, _ = model_and_params()
  state = {"params": models.stack_blocks(params), "step": np.int32(7)}
  manager = checkpoints.create_manager(str(tmp_path), small_config("unused"))
  checkpoints.save(manager, 7, jax.device_put(state))
  manager.wait_until_finished()
  manager.close()
  step, raw = checkpoints.restore_params(str(tmp_path))
  assert step == 7 and "MixerBlocks" in raw
  loaded = params_io.load(str(tmp_path))
  trees.check_shapes(loaded, params, "workdir")
  np.testing.assert_array_equal(loaded["MixerBlock_3"]["channel_mixing"]["Dense_1"]["kernel"],
                                params["MixerBlock_3"]["channel_mixing"]["Dense_1"]["kernel"])
