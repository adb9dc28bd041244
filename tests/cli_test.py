"""train.py and evaluate.py errors a user meets, where evaluate.py writes its results, and the quiet console's
filter (tests/readme_test.py runs the README's commands: training, resume, the same top-1 from evaluate.py on one
and two devices; tests/errors_test.py the config errors)."""

import json
import logging as std_logging
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from absl import logging

from mixer import cli
from tests.conftest import REPO, small_config

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


@pytest.mark.subprocess
def test_evaluate_without_a_run_names_the_missing_file(tmp_path):
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert f"{tmp_path}/config.json does not exist" in result.stderr


@pytest.mark.subprocess
def test_evaluate_on_a_config_json_from_before_config_evals_names_the_moved_keys(tmp_path):
  (tmp_path / "config.json").write_text('{"eval_split": "test", "fewshot": {"every_steps": 0}}')
  result = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.eval_split is no longer read: evaluators are set in config.evals (now config.evals.eval.split)" in (
      result.stderr), result.stderr[-3000:]


def _immutable(path) -> bool:
  """chattr +i: even root cannot create files in it. False where the file system or user cannot."""
  if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
    return False
  try:
    (path / "probe").write_text("")
  except OSError:
    return True
  subprocess.run(["chattr", "-i", str(path)], check=True)
  return False


NEEDS_CHATTR = "needs chattr +i (root, on ext4/xfs/btrfs) to make a directory that even root cannot write"


def test_check_writable_creates_the_directory_or_names_it_in_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cli.check_writable("results/eval", "--output_dir")  # relative, as users type it
  assert os.listdir(tmp_path / "results" / "eval") == []  # created, and the probe file removed
  locked = tmp_path / "run"
  locked.mkdir()
  if not _immutable(locked):
    pytest.skip(NEEDS_CHATTR)
  try:
    with pytest.raises(ValueError) as error:
      cli.check_writable("run", "--workdir", hint="; --output_dir=DIR writes the results elsewhere")
  finally:
    subprocess.run(["chattr", "-i", str(locked)], check=True)
  assert re.fullmatch(r"--workdir=run is not writable: \[Errno 1\] Operation not permitted: 'run/.write_test_\w+'; "
                      r"--output_dir=DIR writes the results elsewhere", str(error.value)), error.value


@pytest.mark.subprocess
def test_evaluate_refuses_a_read_only_workdir_before_evaluating_and_writes_to_output_dir(data_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(small_config(data_dir).to_json_best_effort())
  if not _immutable(workdir):
    pytest.skip(NEEDS_CHATTR)
  evaluate = [sys.executable, os.path.join(REPO, "evaluate.py"), "--workdir=run", "--random_init"]
  try:
    refused = subprocess.run(evaluate, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    written = subprocess.run([*evaluate, "--output_dir=results/eval"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
  finally:
    subprocess.run(["chattr", "-i", str(workdir)], check=True)
  assert refused.returncode == 1, refused.stderr[-3000:]
  assert re.fullmatch(r"evaluate.py: error: --workdir=run is not writable: \[Errno 1\] Operation not permitted: "
                      r"'run/.write_test_\w+'; --output_dir=DIR writes the results elsewhere  \(--verbose shows the "
                      r"traceback\)", refused.stderr.splitlines()[-1]), refused.stderr[-3000:]
  assert "Top-1" not in refused.stdout  # refused before evaluating, not after
  assert written.returncode == 0, written.stderr[-3000:]
  assert "Results written to results/eval/eval_test_random_init.json" in written.stdout, written.stdout
  results = json.loads((tmp_path / "results" / "eval" / "eval_test_random_init.json").read_text())
  assert (results["dataset"], results["step"], results["eval"]["num_examples"]) == ("digits", "init", 359)
  assert results["eval"]["loss"] == pytest.approx(math.log(10), rel=1e-5)  # the new head is zero: uniform
  assert os.listdir(workdir) == ["config.json"]


def test_a_saved_config_is_read_over_the_default_file_without_the_configs_package(tmp_path, monkeypatch):
  # mixer reads configs/default.py by path: an installed mixer has no configs/ package to import.
  monkeypatch.setitem(sys.modules, "configs", None)  # `import configs` raises ImportError
  monkeypatch.setitem(sys.modules, "configs.default", None)
  (tmp_path / "config.json").write_text('{"lr": 0.5, "model": {"variant": "S/16"}}')
  config = cli.load_config(str(tmp_path))
  assert (config.lr, config.model.variant, config.model.dropout_rate) == (0.5, "S/16", 0.0)  # the rest: defaults
  assert config.dataset == "digits"
