"""Tests for mixer/checkpoints.py: orbax save/restore of a sharded train state, keep-last-K."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import checkpoints, sharding
from tests.conftest import small_config


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


def _model_and_params(num_classes=10, image_size=16, **kwargs):
  from mixer import models
  model = models.MlpMixer(num_classes=num_classes, **{**models.variant_kwargs("Ti/4"), **kwargs})
  x = jax.random.normal(jax.random.key(0), (2, image_size, image_size, 3))
  params = model.init(jax.random.key(1), x)["params"]
  # Non-trivial values everywhere (the head starts at zero).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  return model, jax.device_get(params), x


def test_released_npz_layout_round_trip_gives_the_same_logits(tmp_path):
  model, params, x = _model_and_params()
  path = str(tmp_path / "released.npz")
  checkpoints.save_npz(params, path)
  with np.load(path) as data:  # the released layout: flat "/"-joined keys.
    assert "MixerBlock_0/token_mixing/Dense_0/kernel" in data.files and "pre_head_layer_norm/scale" in data.files
  loaded = checkpoints.load_pretrained(path)
  checkpoints.check_params(loaded, params, path)
  np.testing.assert_array_equal(model.apply({"params": loaded}, x), model.apply({"params": params}, x))


def test_corrupted_npz_names_the_file(tmp_path):
  _, params, _ = _model_and_params()
  path = tmp_path / "broken.npz"
  checkpoints.save_npz(params, str(path))
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"broken.npz is not a readable .npz"):
    checkpoints.load_pretrained(str(path))


def test_mismatched_params_list_every_problem():
  _, params, _ = _model_and_params()
  _, other, _ = _model_and_params(num_classes=7)
  del other["MixerBlock_2"]["LayerNorm_1"]
  other["extra_layer"] = {"kernel": np.zeros(3)}
  with pytest.raises(ValueError) as error:
    checkpoints.check_params(other, params, "model.npz")
  message = str(error.value)
  assert "model.npz does not fit the model (5 problems)" in message
  assert "missing MixerBlock_2/LayerNorm_1/bias (128,)" in message
  assert "missing MixerBlock_2/LayerNorm_1/scale (128,)" in message
  assert "unexpected extra_layer/kernel (3,)" in message
  assert "head/kernel has shape (128, 7), the model needs (128, 10)" in message
  assert "head/bias has shape (7,), the model needs (10,)" in message


def test_block_diagonal_token_mixing_identity_for_k2():
  """Logits of a 2x image equal the mean of the logits of its 4 quadrants (paper App. C)."""
  model, params, _ = _model_and_params()
  wide = model.clone(tokens_mlp_dim=4 * model.tokens_mlp_dim)
  big_params = checkpoints.block_diagonal_token_mixing(params, (4, 4), (8, 8))
  image = jax.random.normal(jax.random.key(5), (3, 32, 32, 3))
  checkpoints.check_params(big_params, jax.eval_shape(lambda: wide.init(jax.random.key(0), image))["params"], "K=2")
  quadrants = [image[:, i:i + 16, j:j + 16] for i in (0, 16) for j in (0, 16)]
  expected = np.mean([model.apply({"params": params}, q) for q in quadrants], axis=0)
  np.testing.assert_allclose(wide.apply({"params": big_params}, image), expected, atol=1e-5)


def test_non_integer_resolution_ratio_is_an_error():
  _, params, _ = _model_and_params()
  with pytest.raises(ValueError, match=r"token grid \(6, 6\) is not an integer multiple K of the pre-trained \(4, 4\)"):
    checkpoints.block_diagonal_token_mixing(params, (4, 4), (6, 6))


def test_orbax_workdir_and_scanned_params_load_in_the_released_layout(tmp_path):
  from mixer import models
  _, params, _ = _model_and_params()
  state = {"params": models.stack_blocks(params), "step": np.int32(7)}
  manager = checkpoints.create_manager(str(tmp_path), small_config("unused"))
  checkpoints.save(manager, 7, jax.device_put(state))
  manager.wait_until_finished()
  manager.close()
  step, raw = checkpoints.load_orbax_params(str(tmp_path))
  assert step == 7 and "MixerBlocks" in raw
  loaded = checkpoints.load_pretrained(str(tmp_path))
  checkpoints.check_params(loaded, params, "workdir")
  np.testing.assert_array_equal(loaded["MixerBlock_3"]["channel_mixing"]["Dense_1"]["kernel"],
                                params["MixerBlock_3"]["channel_mixing"]["Dense_1"]["kernel"])


def test_params_restore_alone_onto_a_mesh_and_a_wrong_model_lists_the_arrays(tmp_path):
  _, params, _ = _model_and_params()
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
  _, other, _ = _model_and_params(num_classes=7)
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other)
  with pytest.raises(ValueError, match=r"(?s)does not fit the model \(2 problems\).*head/bias has shape \(10,\)"):
    checkpoints.restore_params(str(tmp_path / "checkpoints"), wrong)
