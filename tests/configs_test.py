"""Every config loads, validates for a large mesh, and the ImageNet recipe holds the paper's values."""

import glob
import importlib
import os

import pytest

from mixer import models, preprocess, setup
from tests.conftest import REPO

MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
# Experiments have get_config(); the rest (finetune.py) hold what several experiments share.
CONFIGS = [m for m in MODULES if hasattr(importlib.import_module(f"configs.{m}"), "get_config")]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  devices = 8 if config.dataset == "digits" else 256  # the embedded runs are sized for a CPU.
  setup.validate_config(config, num_devices=devices, num_processes=1)
  models.variant_kwargs(config.model.variant)
  assert "sync_every_steps" not in config  # the library picks it for the backend (steps.sync_every).
  # Few-shot images come in the shape the model is trained on (channels and resolution).
  fewshot = [settings for settings in config.evals.values() if settings.type == "fewshot"]
  assert fewshot and all(_output_shape(settings.pp) == _output_shape(config.pp_eval) for settings in fewshot)


def _output_shape(pp: str) -> tuple:
  import numpy as np
  import tensorflow as tf
  image = tf.io.encode_png(np.zeros((300, 400, 3), np.uint8))
  return tuple(preprocess.get_preprocess_fn(pp)({"image": image, "label": 0})["image"].shape)


def test_b16_imagenet_is_the_papers_recipe():
  from configs import mixer_b16_imagenet2012
  config = mixer_b16_imagenet2012.get_config()
  # Sec. 3 and Table 4 of the paper.
  assert config.model.variant == "B/16" and config.batch_size == 4096
  assert (config.optim.name, config.optim.b1, config.optim.b2) == ("adam", 0.9, 0.999)
  assert (config.lr, config.weight_decay, config.total_epochs) == (1e-3, 0.1, 300)
  assert (config.warmup_steps, config.schedule, config.grad_clip_norm) == (10_000, "linear", 1.0)
  assert config.model.stoch_depth == 0.1
  assert "inception_crop(224)" in config.pp_train and "flip_lr" in config.pp_train
