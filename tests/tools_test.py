"""Tests for tools/: hlo.py reads compiled HLO (exact bytes and matmul FLOPs of known programs),
compiled_cost.py prices a step from it, step_profile.py reads a trace; each tool also runs end to end."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

sys.path[:0] = [os.path.join(REPO, "tools"), os.path.join(REPO, "benchmarks")]
import compiled_cost  # noqa: E402
import hlo  # noqa: E402
import step_profile  # noqa: E402


def _entry_kernels(fn, *args, donate=()):
  instructions, entry = hlo.parse(jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text())
  computations = hlo.bodies(instructions)
  kernels = [r for r in computations[entry] if r["opcode"] not in ("parameter", "tuple", "bitcast", "constant")]
  return kernels, instructions, computations


def test_a_matmul_counts_2mnk_flops_and_its_operands_and_output_bytes():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16), jnp.bfloat16)
  kernels, instructions, computations = _entry_kernels(lambda a, b: a @ b.astype(jnp.float32), a, b)
  flops = sum(hlo.matmul_flops(k, instructions, computations) for k in kernels)
  assert flops == 2 * 64 * 32 * 16
  assert [hlo.category(k, computations) for k in kernels if hlo.matmul_flops(k, instructions, computations)] == [
      "matmul"]


def test_elementwise_kernels_move_their_operands_and_outputs():
  x = jnp.ones((128, 256))
  kernels, instructions, computations = _entry_kernels(lambda x: jnp.tanh(x) * 2 + 1, x)
  (kernel,) = kernels
  assert hlo.kernel_bytes(kernel, instructions, computations) == 2 * x.nbytes
  assert hlo.category(kernel, computations) == "elementwise fusion" and hlo.matmul_flops(
      kernel, instructions, computations) == 0


def test_transposes_and_reductions_are_told_apart():
  x = jnp.ones((64, 96))
  (transpose,), _, computations = _entry_kernels(lambda x: x.T.copy(), x)
  assert hlo.category(transpose, computations) == "transpose/copy"
  kernels, _, computations = _entry_kernels(lambda x: jnp.sum(jnp.exp(x), axis=0), x)
  assert hlo.category(kernels[0], computations) == "elementwise fusion"  # exp
  assert hlo.category(kernels[-1], computations) == "reduction fusion"  # the sum (last, the output)


def test_a_slice_read_and_an_in_place_update_move_only_the_slice():
  stack, row = jnp.ones((16, 1024)), jnp.ones((1, 1024))
  (read,), instructions, computations = _entry_kernels(
      lambda s, i: jax.lax.dynamic_slice_in_dim(s, i, 1) * 2, stack, 3)
  assert hlo.kernel_bytes(read, instructions, computations) == 2 * row.nbytes + 4  # row in, row out, index
  (update,), instructions, computations = _entry_kernels(
      lambda s, r, i: jax.lax.dynamic_update_slice_in_dim(s, r * 2, i, 0), stack, row, 3, donate=(0,))
  assert update["shape"].startswith("f32[16,1024]")  # one kernel that writes into the donated stack
  assert hlo.kernel_bytes(update, instructions, computations) == 2 * row.nbytes + 4


def test_compiled_cost_counts_a_loops_kernels_once_per_trip():
  def scanned(x, w):
    return jax.lax.scan(lambda c, w_i: (jnp.tanh(c @ w_i), None), x, w)[0]
  text = jax.jit(scanned).lower(jnp.ones((8, 16)), jnp.ones((4, 16, 16))).compile().as_text()
  rows = compiled_cost.kernel_costs(text)
  (matmul,) = [r for r in rows if r["category"] == "matmul"]
  assert matmul["launches"] == 4 and matmul["flops"] == 4 * 2 * 8 * 16 * 16
  summary = compiled_cost.summarize(rows, peak_tflops=1.0, bandwidth_tbs=1.0, architecture_flops=matmul["flops"])
  assert summary["kernels"] == sum(r["launches"] for r in rows) > len(rows)


@pytest.mark.parametrize("shape,expected", [("(bf16[8,196]{1,0}, f32[])", 8 * 196 * 2 + 4), ("pred[3]", 3),
                                            ("s32[2,2]{1,0}", 16), ("s4[8]", 4), ("f8e4m3fn[3]", 3)])
def test_array_bytes_of_shape_strings(shape, expected):
  assert hlo.array_bytes(shape) == expected


def test_a_scanned_matmul_counts_once_per_trip():
  def scanned(x, w):
    return jax.lax.scan(lambda c, w_i: (jnp.tanh(c @ w_i), None), x, w)[0]
  kernels, instructions, computations = _entry_kernels(scanned, jnp.ones((8, 16)), jnp.ones((4, 16, 16)))
  assert sum(hlo.matmul_flops(k, instructions, computations) for k in kernels) == 4 * 2 * 8 * 16 * 16


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


@pytest.mark.subprocess
def test_step_profile_splits_the_step_by_op_kind_and_model_part(tmp_path):
  out = subprocess.run([sys.executable, "tools/step_profile.py", "--variant", "Ti/4", "--resolution", "32",
                        "--batch", "8", "--device", "cpu", "--steps", "2", "--trace_dir", str(tmp_path / "trace"),
                        "--json", str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "p.json").read_text())
  assert result["by_category"]["matmul"]["ms_per_step"] > 0
  for part in ("token_mixing", "channel_mixing"):
    assert {f"{part} forward", f"{part} backward"} <= set(result["by_model_part"])
  assert sum(row["share"] for row in result["by_category"].values()) == pytest.approx(1.0)
  # Every traced op was matched to an instruction of the compiled step and timed.
  assert 0 < result["busy_ms_per_step"] <= result["op_ms_per_step"] + 1e-6
  assert result["top_ops"] and all(op["ms_per_step"] > 0 for op in result["top_ops"])
  assert any(op["model_part"].startswith("channel_mixing") for op in result["top_ops"])


@pytest.mark.subprocess
def test_compiled_cost_counts_the_architectures_matmul_flops(tmp_path):
  out = subprocess.run([sys.executable, "tools/compiled_cost.py", "--variant", "Ti/4", "--resolution", "32",
                        "--batch", "8", "--target", "cpu", "--json", str(tmp_path / "c.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "c.json").read_text())
  # Forward + backward matmuls = 3x the forward FLOPs, except the stem's: a convolution (forward and weight
  # gradient; no input gradient), which the matmul category does not hold. Ti/4 at 32px: 64 tokens of 4*4*3.
  stem = 2 * 64 * (4 * 4 * 3) * 128
  assert result["matmul_tflop_per_step"] * 1e12 == pytest.approx(
      result["architecture_tflop_per_step"] * 1e12 - 3 * 8 * stem, rel=1e-9)
  # 4 blocks x 2 MLPs x 2 Dense x (forward, input gradient, kernel gradient).
  assert result["by_category"]["matmul"]["kernels"] >= 3 * 2 * 2 * 4
  assert result["non_matmul_gbytes_per_step"] > 0
  assert 0 < result["roofline"]["mfu_bound"] <= 1
