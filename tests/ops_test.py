"""Tests for mixer/ops.py: LayerNorm and gelu equal flax's and jax's in value and gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import ops


def _inputs(dtype, shape=(2, 5, 32)):
  keys = jax.random.split(jax.random.key(0), 4)
  x = (3.0 * jax.random.normal(keys[0], shape) + 1.0).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(keys[1], shape[-1:])
  bias = 0.1 * jax.random.normal(keys[2], shape[-1:])
  dy = jax.random.normal(keys[3], shape).astype(dtype)
  return x, scale, bias, dy


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_flax_in_value_and_gradient(dtype):
  x, scale, bias, dy = _inputs(dtype)

  def flax_norm(x, scale, bias):
    return nn.LayerNorm(dtype=x.dtype).apply({"params": {"scale": scale, "bias": bias}}, x)

  def ours(x, scale, bias):
    return ops.LayerNorm(dtype=x.dtype).apply({"params": {"scale": scale, "bias": bias}}, x)

  y, vjp = jax.vjp(ours, x, scale, bias)
  grads = vjp(dy)
  # The reference: flax in float32 from the same inputs; ours equals it up to the rounding to `dtype`.
  y_ref, vjp_ref = jax.vjp(flax_norm, x.astype(jnp.float32), scale, bias)
  grads_ref = vjp_ref(dy.astype(jnp.float32))
  tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  assert y.dtype == grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == jnp.float32
  np.testing.assert_allclose(np.float32(y), y_ref, rtol=tol, atol=tol * 4)
  for ours_grad, reference in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(np.float32(ours_grad), reference, rtol=tol, atol=tol)


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_equals_jax_in_value_and_gradient(approximate, dtype):
  x, _, _, dy = _inputs(dtype)
  y_theirs = jax.nn.gelu(x, approximate=approximate)
  y_ours, vjp_ours = jax.vjp(lambda x: ops.gelu(x, approximate), x)
  np.testing.assert_array_equal(y_ours, y_theirs)  # the forward pass is jax's own.
  (ours,) = vjp_ours(dy)
  # The reference gradient in float32 from the same inputs; ours is its rounding to `dtype`.
  _, vjp_f32 = jax.vjp(lambda x: jax.nn.gelu(x, approximate=approximate), x.astype(jnp.float32))
  (reference,) = vjp_f32(dy.astype(jnp.float32))
  assert ours.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  np.testing.assert_allclose(np.float32(ours), reference, rtol=tol, atol=tol)


def _saved(fn, x):
  """The arrays that jax.vjp keeps for the backward pass of fn at x."""
  return jax.tree.leaves(jax.vjp(fn, x)[1])


def test_backward_passes_save_only_the_input():
  x, scale, bias, _ = _inputs(jnp.bfloat16, shape=(4, 16, 64))
  full_size = lambda arrays: [a for a in arrays if a.size == x.size]
  ours = _saved(lambda x: ops.gelu(x, True), x)
  assert len(ours) == 1 and ours[0].dtype == jnp.bfloat16
  assert len(full_size(_saved(lambda x: jax.nn.gelu(x, approximate=True), x))) > 1  # what autodiff keeps.
  ours = _saved(lambda x: ops.layer_norm(x, scale, bias, 1e-6, jnp.bfloat16), x)
  assert [a.dtype for a in full_size(ours)] == [jnp.bfloat16]  # the input; then two float32 per row.
  assert sum(a.size for a in ours) == x.size + 2 * x.size // 64 + 2 * 64  # + scale and bias
  flax_norm = lambda x: nn.LayerNorm(dtype=jnp.bfloat16).apply({"params": {"scale": scale, "bias": bias}}, x)
  assert sum(a.nbytes for a in full_size(_saved(flax_norm, x))) >= 2 * x.nbytes
