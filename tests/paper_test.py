"""Our configs against every hyperparameter the paper states (mixer/paper.py)."""

import os
import subprocess
import sys

import pytest

from mixer import paper
from tests.conftest import REPO


def test_no_unmarked_difference_from_the_paper():
  assert paper.unmarked_differences() == []


def test_a_changed_hyperparameter_is_caught():
  config = paper.load("mixer_b16_imagenet21k")
  config.pp_train = config.pp_train.replace("randaugment(2, 10)", "randaugment(2, 15)")
  config.warmup_steps = 5_000
  marks = {field: mark for field, _, _, mark in paper.compare("mixer_b16_imagenet21k", config)}
  assert marks["randaugment"] == "UNMARKED" and marks["warmup_steps"] == "UNMARKED"
  assert marks["lr"] == "" and marks["weight_decay_applies_to"].startswith("DIFFERENT")


def test_finetuning_lr_must_be_in_the_papers_grid():
  config = paper.load("finetune_cifar10")
  assert dict((f, m) for f, _, _, m in paper.compare("finetune_cifar10", config))["lr"] == "grid"
  config.lr = 0.1
  assert dict((f, m) for f, _, _, m in paper.compare("finetune_cifar10", config))["lr"] == "UNMARKED"


@pytest.mark.subprocess
def test_the_table_prints_every_config():
  result = subprocess.run([sys.executable, "-m", "mixer.paper"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  for name in paper.NAMES:
    assert f"| {name} |" in result.stdout


def test_a_config_loads_by_name_or_by_path_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path relative to the current directory is read from there.
  relative = os.path.relpath(os.path.join(paper.CONFIGS, "mixer_jft.py"), tmp_path)
  assert paper.load(f"{relative}:s16").to_dict() == paper.load("mixer_jft:s16").to_dict()
  with pytest.raises(ValueError, match=r"config 'mixer_jft_typo' is not in .*configs \(one of default, "):
    paper.load("mixer_jft_typo")
