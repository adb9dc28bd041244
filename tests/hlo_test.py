"""Tests for benchmarks/hlo.py: reading compiled HLO gives exact bytes and matmul FLOPs of known programs."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import hlo  # noqa: E402


def _entry_kernels(fn, *args):
  instructions, entry = hlo.parse(jax.jit(fn).lower(*args).compile().as_text())
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
  moved = hlo.array_bytes(kernel["shape"]) + sum(hlo.array_bytes(instructions[o]["shape"]) for o in kernel["operands"])
  assert moved == 2 * x.nbytes
  assert hlo.category(kernel, computations) == "elementwise fusion" and hlo.matmul_flops(
      kernel, instructions, computations) == 0


def test_transposes_and_reductions_are_told_apart():
  x = jnp.ones((64, 96))
  (transpose,), _, computations = _entry_kernels(lambda x: x.T.copy(), x)
  assert hlo.category(transpose, computations) == "transpose/copy"
  kernels, _, computations = _entry_kernels(lambda x: jnp.sum(jnp.exp(x), axis=0), x)
  assert hlo.category(kernels[0], computations) == "elementwise fusion"  # exp
  assert hlo.category(kernels[-1], computations) == "reduction fusion"  # the sum (last, the output)


@pytest.mark.parametrize("shape,expected", [("(bf16[8,196]{1,0}, f32[])", 8 * 196 * 2 + 4), ("pred[3]", 3),
                                            ("s32[2,2]{1,0}", 16), ("s4[8]", 4), ("f8e4m3fn[3]", 3)])
def test_array_bytes_of_shape_strings(shape, expected):
  assert hlo.array_bytes(shape) == expected


def test_a_scanned_matmul_counts_once_per_trip():
  def scanned(x, w):
    return jax.lax.scan(lambda c, w_i: (jnp.tanh(c @ w_i), None), x, w)[0]
  kernels, instructions, computations = _entry_kernels(scanned, jnp.ones((8, 16)), jnp.ones((4, 16, 16)))
  assert sum(hlo.matmul_flops(k, instructions, computations) for k in kernels) == 4 * 2 * 8 * 16 * 16
