"""train.py and evaluate.py as a user runs them: overrides, resume, and the same top-1 twice."""

import glob
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

FINAL = r"Final test top-1 \(digits:test, step {step}, 359 examples\): ([0-9.]+)"


def _run(*args, env=None):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))
  assert result.returncode == 0, result.stderr[-5000:]
  return result.stdout + result.stderr


def test_train_resume_and_evaluate(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  overrides = [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.batch_size=64",
               "--config.warmup_steps=5", "--config.eval_every_steps=20", "--config.model.variant=Ti/8"]
  out = _run("train.py", *overrides, "--config.total_steps=40")
  assert re.search(FINAL.format(step=40), out), out[-3000:]
  assert "Model Ti/8" in out and "Restored checkpoint" not in out
  assert glob.glob(f"{workdir}/events.out.tfevents.*") and glob.glob(f"{workdir}/checkpoints/40")

  out = _run("train.py", *overrides, "--config.total_steps=50")  # the same workdir resumes.
  assert "Restored checkpoint from step 40" in out
  trained = re.search(FINAL.format(step=50), out)

  out = _run("evaluate.py", f"--workdir={workdir}")
  evaluated = re.search(r"Top-1 \(digits:test, step 50, 359 examples\): ([0-9.]+)", out)
  assert trained and evaluated, out[-3000:]
  assert evaluated.group(1) == trained.group(1)

  # The same checkpoint through --checkpoint, on a 2-device mesh: the params are laid out on the mesh.
  out = _run("evaluate.py", f"--workdir={workdir}", f"--checkpoint={workdir}",
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  again = re.search(r"Top-1 \(digits:test, step .*w, 359 examples\): ([0-9.]+)", out)
  assert again and again.group(1) == trained.group(1), out[-3000:]


def test_evaluate_without_a_run_names_the_missing_file(tmp_path):
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f"{tmp_path}/config.json does not exist" in result.stderr
