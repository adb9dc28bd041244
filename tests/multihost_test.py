"""Two processes on this machine (CPU devices, collectives over loopback) train, save and resume; one process
resumes their run with the same global batches and bit-identical results."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from mixer import checkpoints, trees
from tests.conftest import REPO

pytestmark = [pytest.mark.trains, pytest.mark.multidevice, pytest.mark.subprocess]

# Each run's losses, evaluations, and the rows it trained on as this process's input pipeline made them.
_PHASES = """
import json, sys
import jax
from absl import logging
logging.set_verbosity("info")  # the log line that says where the trace went
if {num_processes} > 1:
  jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes={num_processes},
                             process_id={process_id})
from tests.conftest import record_training_rows, small_config
from mixer import train_lib

out = []
for total in {phases}:  # each run resumes from the checkpoint of the one before (allow_changes: its length).
  # 192 examples in batches of 32: an epoch is 6 steps of 16 examples from each of 2 input shards (one per
  # process when two processes start the run); the runs end at step 4 (mid-epoch) and 8 (in the second epoch).
  config = small_config({data_dir!r}, train_split="train[:192]", batch_size=32, total_steps=total,
                        checkpoint_every_steps=4, warmup_steps=1, allow_changes="total_steps", mixup=0.2,
                        profile_start_step={profile_start_step}, profile_num_steps=2,
                        pp_train="decode(channels=1)|resize(20)|inception_crop(16)|flip_lr|value_range(-1, 1)",
                        **{{"evals.eval.every_steps": 4, "model.dropout_rate": 0.1}})
  with record_training_rows() as rows:
    history = train_lib.train_and_evaluate(config, {workdir!r})
  out.append({{**history, "rows": rows[:len(history["train"])]}})
print(json.dumps({{"process": jax.process_index(), "count": jax.process_count(), "runs": out}}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes, data_dir, workdir, phases=(4, 8), devices=1, profile_start_step=0):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen(
      ["timeout", "-s", "KILL", "300", sys.executable, "-c",
       _PHASES.format(num_processes=num_processes, port=port, process_id=i, data_dir=data_dir, workdir=workdir,
                      phases=tuple(phases), profile_start_step=profile_start_step)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]
  results = []
  for p in procs:
    stdout, stderr = p.communicate()
    assert p.returncode == 0, stderr[-5000:]
    results.append({**json.loads(stdout.strip().splitlines()[-1]), "log": stderr})
  return results


def _computed(train: list[dict]) -> list[dict]:
  """The logged training metrics without the clock's (TFLOP/s, MFU): what the computation gave."""
  return [{k: v for k, v in t.items() if k not in ("tflops_per_device", "mfu")} for t in train]


def _params(workdir):
  step, params = checkpoints.restore_params(str(workdir))
  return step, {key: np.asarray(value) for key, value in trees.flatten(params).items()}


def test_two_processes_train_save_resume_and_one_process_resumes_their_run_bit_identically(data_dir, tmp_path):
  two = _launch(2, data_dir, str(tmp_path / "two"), profile_start_step=2)  # a trace of steps 2..3
  assert [r["count"] for r in two] == [2, 2] and sorted(r["process"] for r in two) == [0, 1]
  # Only process 0 writes a trace; the resumed run (past step 2) writes none.
  assert [("Profiled steps 2..3" in r["log"], r["log"].count("not profiling")) for r in two] == [
      (r["process"] == 0, 1) for r in two]
  assert len(glob.glob(str(tmp_path / "two" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4", "8"]  # one shared directory.
  assert json.loads((tmp_path / "two" / "config.json").read_text())["input_shards"] == 2  # one per process.
  for multi in two:
    first, resumed = multi["runs"]
    assert [t["step"] for t in resumed["train"]] == [5, 6, 7, 8]  # the second run resumed at step 4.
    assert multi["runs"][1]["eval"][-1]["num_examples"] == 359  # both processes' halves, once.
  two.sort(key=lambda r: r["process"])
  assert _computed(two[0]["runs"][1]["train"]) == _computed(two[1]["runs"][1]["train"])  # the global loss, by each.
  # The global batch: process 0's rows, then process 1's (one device each, in process order on the mesh).
  global_rows = lambda runs, phase: [a + b for a, b in zip(runs[0]["runs"][phase]["rows"],
                                                           runs[1]["runs"][phase]["rows"], strict=True)]
  assert len(global_rows(two, 1)) == 4 and len(global_rows(two, 1)[0]) == 32

  # One process with two devices resumes a copy of the run at step 4: it reads both input shards.
  shutil.copytree(tmp_path / "two", tmp_path / "one")
  shutil.rmtree(tmp_path / "one" / "checkpoints" / "8")
  one = _launch(1, data_dir, str(tmp_path / "one"), phases=(8,), devices=2)[0]
  assert one["count"] == 1 and [t["step"] for t in one["runs"][0]["train"]] == [5, 6, 7, 8]
  assert one["runs"][0]["rows"] == global_rows(two, 1)  # the same examples, augmented alike, in the same rows.
  # Losses, accuracy, gradient norms: bit for bit.
  assert _computed(one["runs"][0]["train"]) == _computed(two[0]["runs"][1]["train"])
  # Evaluation batches are made per process (two halves of the split, each padded, or the whole): the same
  # examples, the loss summed in another order.
  (eval_one,), (eval_two,) = one["runs"][0]["eval"], two[0]["runs"][1]["eval"]
  assert eval_one["top1"] == eval_two["top1"] and eval_one["num_examples"] == eval_two["num_examples"] == 359
  assert eval_one["loss"] == pytest.approx(eval_two["loss"], rel=1e-6)
  (step_two, params_two), (step_one, params_one) = _params(tmp_path / "two"), _params(tmp_path / "one")
  assert step_two == step_one == 8 and params_two.keys() == params_one.keys()
  for key, value in params_two.items():
    np.testing.assert_array_equal(params_one[key], value, err_msg=key)
