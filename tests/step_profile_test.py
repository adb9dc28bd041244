"""benchmarks/step_profile.py reads a GPU trace: only the device timeline counts, kernels are tied to HLO ops
by their hlo_op argument or their name, and kernels of no op are reported, not dropped silently."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import hlo  # noqa: E402
import step_profile  # noqa: E402


def _write_trace(directory, events):
  path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_a_gpu_trace_counts_device_kernels_by_hlo_op_and_reports_the_rest(tmp_path):
  text = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  instructions, entry = hlo.parse(text)
  ops = [name for name, r in instructions.items() if r["computation"] == entry and r["opcode"] != "parameter"]
  matched_by_arg, matched_by_name = ops[0], ops[-1]
  _write_trace(tmp_path, [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 500, "name": matched_by_name},  # host side: not counted
      {"ph": "X", "pid": 7, "tid": 2, "ts": 10, "dur": 30, "name": "sm90_xmma_gemm_bf16",
       "args": {"hlo_op": matched_by_arg}},
      {"ph": "X", "pid": 7, "tid": 2, "ts": 40, "dur": 20, "name": matched_by_name},
      {"ph": "X", "pid": 7, "tid": 2, "ts": 60, "dur": 8, "name": "memcpy_DtoD"},
  ])
  ops, unmatched = step_profile.device_op_events(str(tmp_path), instructions)
  assert ops == [(matched_by_arg, 10.0, 30.0), (matched_by_name, 40.0, 20.0)]
  assert unmatched == {"memcpy_DtoD": 8.0}
  summary = step_profile.summarize(ops, instructions, steps=2, step_ms=1.0, train_flops=1e9, top=5, unmatched=unmatched)
  assert summary["op_ms_per_step"] == pytest.approx(0.025)
  assert summary["busy_ms_per_step"] == pytest.approx(0.025)
  assert summary["unmatched_ms_per_step"] == pytest.approx(0.004)
  assert summary["top_unmatched"] == [{"event": "memcpy_DtoD", "ms_per_step": pytest.approx(0.004)}]
