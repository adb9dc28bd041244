"""Tests for mixer/transfer.py: token mixing carried to a larger token grid (paper App. C) or resampled."""

import jax
import numpy as np
import pytest

from mixer import transfer, trees
from tests.conftest import model_and_params


def test_block_diagonal_token_mixing_identity_for_k2():
  """Logits of a 2x image equal the mean of the logits of its 4 quadrants (paper App. C)."""
  model, params, _ = model_and_params()
  wide = model.clone(tokens_mlp_dim=4 * model.tokens_mlp_dim)
  big_params = transfer.block_diagonal_token_mixing(params, (4, 4), (8, 8))
  image = jax.random.normal(jax.random.key(5), (3, 32, 32, 3))
  trees.check_shapes(big_params, jax.eval_shape(lambda: wide.init(jax.random.key(0), image))["params"], "K=2")
  quadrants = [image[:, i:i + 16, j:j + 16] for i in (0, 16) for j in (0, 16)]
  expected = np.mean([model.apply({"params": params}, q) for q in quadrants], axis=0)
  np.testing.assert_allclose(wide.apply({"params": big_params}, image), expected, atol=1e-5)


def test_non_integer_resolution_ratio_is_an_error():
  _, params, _ = model_and_params()
  with pytest.raises(ValueError, match=r"token grid \(6, 6\) is not an integer multiple K of the pre-trained \(4, 4\)"):
    transfer.block_diagonal_token_mixing(params, (4, 4), (6, 6))


def test_resampling_to_the_same_grid_keeps_token_mixing_and_touches_nothing_else():
  _, params, _ = model_and_params()
  same = transfer.resample_token_mixing(params, (4, 4), (4, 4))
  for (path, got), want in zip(trees.flatten(same).items(), trees.flatten(params).values(), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)
  smaller = transfer.resample_token_mixing(params, (4, 4), (2, 2))
  assert smaller["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape == (4, 64)  # D_S unchanged
  assert smaller["MixerBlock_0"]["channel_mixing"] is params["MixerBlock_0"]["channel_mixing"]
