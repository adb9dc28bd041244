"""Tests for mixer/trees.py: leaves named by their paths, and shape checks that list every problem."""

import numpy as np
import pytest

from mixer import trees
from tests.conftest import model_and_params


def test_flatten_and_unflatten_round_trip_params_and_configs():
  _, params, _ = model_and_params()
  flat = trees.flatten(params)
  assert flat["MixerBlock_0/token_mixing/Dense_0/kernel"] is params["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"]
  assert trees.unflatten(flat).keys() == params.keys()
  assert trees.flatten(trees.unflatten(flat)).keys() == flat.keys()
  config = {"lr": 0.1, "model": {"variant": "B/16", "tokens_mlp_dim": None}, "shots": (1, 5)}
  assert trees.flatten(config, ".", is_leaf=trees.is_not_dict) == {
      "lr": 0.1, "model.variant": "B/16", "model.tokens_mlp_dim": None, "shots": (1, 5)}


def test_mismatched_params_list_every_problem():
  _, params, _ = model_and_params()
  _, other, _ = model_and_params(num_classes=7)
  del other["MixerBlock_2"]["LayerNorm_1"]
  other["extra_layer"] = {"kernel": np.zeros(3)}
  with pytest.raises(ValueError) as error:
    trees.check_shapes(other, params, "model.npz")
  message = str(error.value)
  assert "model.npz does not fit the model (5 problems)" in message
  assert "missing MixerBlock_2/LayerNorm_1/bias (128,)" in message
  assert "missing MixerBlock_2/LayerNorm_1/scale (128,)" in message
  assert "unexpected extra_layer/kernel (3,)" in message
  assert "head/kernel has shape (128, 7), the model needs (128, 10)" in message
  assert "head/bias has shape (7,), the model needs (10,)" in message
