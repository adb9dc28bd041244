"""train.py and evaluate.py errors a user meets, and the quiet console's filter (tests/readme_test.py runs
the README's commands: training, resume, the same top-1 from evaluate.py on one and two devices)."""

import logging as std_logging
import os
import subprocess
import sys

import pytest
from absl import logging

from mixer import cli
from tests.conftest import REPO

SITE = os.path.dirname(os.path.dirname(std_logging.__file__)) + "/site-packages"


def _record(path: str, level: int) -> std_logging.LogRecord:
  return std_logging.LogRecord("x", level, path, 1, "message", None, None)


def test_library_logs_are_quiet_unless_verbose():
  quiet = cli._QuietLibraries()
  ours = os.path.join(REPO, "mixer", "train_lib.py")
  assert quiet.filter(_record(ours, std_logging.INFO))
  assert not quiet.filter(_record(f"{SITE}/orbax/checkpoint/checkpoint_manager.py", std_logging.INFO))
  assert not quiet.filter(_record(f"{SITE}/orbax/checkpoint/checkpoint_manager.py", std_logging.WARNING))
  assert not quiet.filter(_record(f"{SITE}/clu/metric_writers/logging_writer.py", std_logging.INFO))
  assert quiet.filter(_record(f"{SITE}/orbax/checkpoint/checkpoint_manager.py", std_logging.ERROR))
  assert quiet.filter(_record(f"{SITE}/somelib/x.py", std_logging.WARNING))  # others' warnings stay
  before = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.DEBUG)  # --verbosity=1
    assert quiet.filter(_record(f"{SITE}/orbax/checkpoint/checkpoint_manager.py", std_logging.INFO))
  finally:
    logging.set_verbosity(before)
  assert cli._NATIVE_NOISE.search("I0000 00:00:1796296780.879848 6677 port.cc:153] oneDNN custom operations are on.")
  assert not cli._NATIVE_NOISE.search("W external/xla/xla/service/gpu: GPU not found, falling back to CPU")


@pytest.mark.slow
def test_evaluate_without_a_run_names_the_missing_file(tmp_path):
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f"{tmp_path}/config.json does not exist" in result.stderr


@pytest.mark.slow
def test_evaluate_on_a_config_json_from_before_config_evals_names_the_moved_keys(tmp_path):
  (tmp_path / "config.json").write_text('{"eval_split": "test", "fewshot": {"every_steps": 0}}')
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.eval_split is no longer read: evaluators are set in config.evals (now config.evals.eval.split)" in (
      result.stderr), result.stderr[-3000:]
