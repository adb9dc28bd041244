"""Tests for benchmarks/hlo.py: reading compiled HLO gives exact bytes and matmul FLOPs of known programs."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import compiled_cost  # noqa: E402
import hlo  # noqa: E402


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
