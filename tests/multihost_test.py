"""Two processes on this machine (CPU devices, collectives over loopback) train, save and resume, and
match one process on the same global batches."""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.trains, pytest.mark.multidevice, pytest.mark.subprocess]

_PHASES = """
import json, sys
import jax
from absl import logging
logging.set_verbosity("info")  # the log line that says where the trace went
if {num_processes} > 1:
  jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes={num_processes},
                             process_id={process_id})
from tests.conftest import small_config
from mixer import train_lib
out = []
for total in (4, 8):  # train 4 steps and save; then a second run resumes from the checkpoint to 8.
  # train[:64] with a global batch of 64: every step's global batch is the same 64 examples, however
  # the processes split them, so 1 and 2 processes see the same global batches.
  config = small_config({data_dir!r}, train_split="train[:64]", batch_size=64, total_steps=total,
                        checkpoint_every_steps=4, warmup_steps=1, allow_changes="total_steps",
                        profile_start_step={profile_start_step}, profile_num_steps=2, **{{"evals.eval.every_steps": 4}})
  out.append(train_lib.train_and_evaluate(config, {workdir!r}))
print(json.dumps({{"process": jax.process_index(), "count": jax.process_count(), "runs": out}}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes, data_dir, workdir, profile_start_step=0):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "300", sys.executable, "-c",
       _PHASES.format(num_processes=num_processes, port=port, process_id=i, data_dir=data_dir, workdir=workdir,
                      profile_start_step=profile_start_step)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]
  results = []
  for p in procs:
    stdout, stderr = p.communicate()
    assert p.returncode == 0, stderr[-5000:]
    results.append({**json.loads(stdout.strip().splitlines()[-1]), "log": stderr})
  return results


def test_two_processes_train_save_resume_and_match_one(data_dir, tmp_path):
  two = _launch(2, data_dir, str(tmp_path / "two"), profile_start_step=2)  # a trace of steps 2..3
  one = _launch(1, data_dir, str(tmp_path / "one"))[0]
  assert [r["count"] for r in two] == [2, 2] and sorted(r["process"] for r in two) == [0, 1]
  # Only process 0 writes a trace; the resumed run (past step 2) writes none.
  assert [("Profiled steps 2..3" in r["log"], r["log"].count("not profiling")) for r in two] == [
      (r["process"] == 0, 1) for r in two]
  assert len(glob.glob(str(tmp_path / "two" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4", "8"]  # one shared directory.
  for multi in two:
    first, resumed = multi["runs"]
    assert [t["step"] for t in resumed["train"]] == [5, 6, 7, 8]  # the second run resumed at step 4.
    for phase in (0, 1):
      np.testing.assert_allclose([t["loss"] for t in multi["runs"][phase]["train"]],
                                 [t["loss"] for t in one["runs"][phase]["train"]], rtol=1e-5, atol=1e-6)
      assert multi["runs"][phase]["eval"][-1]["top1"] == pytest.approx(one["runs"][phase]["eval"][-1]["top1"],
                                                                       abs=1 / 359 + 1e-6)
      assert multi["runs"][phase]["eval"][-1]["num_examples"] == 359  # both processes' halves, once.
