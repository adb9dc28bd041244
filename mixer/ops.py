"""LayerNorm and gelu with hand-written backward passes that keep only what the gradient needs.

Autodiff of the flax/jax versions saves float32 copies and intermediates (the normalised input, tanh
of the pre-activation) at the full activation size, and the backward pass reads them back: memory
traffic that dominates the non-matmul time of a Mixer step on a GPU. Here the forward pass saves the
input only (and two float32 statistics per token for LayerNorm) and the backward pass recomputes the
rest inside one fused kernel. Values equal flax's nn.LayerNorm and jax.nn.gelu, and gradients equal
theirs up to one rounding to the input dtype (tests compare both). Being custom_vjp functions, they
support reverse-mode autodiff (grad, vjp, grad of grad) but not forward mode (jax.jvp), which nothing
here uses.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _norm_stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Mean and 1/std over the last axis in float32 (the variance as E[x^2] - E[x]^2, as flax computes it)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype) -> jax.Array:
  """(x - mean) / std * scale + bias over the last axis, computed in float32, returned in `dtype`."""
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, rstd = _norm_stats(x, epsilon)
  y = (x.astype(jnp.float32) - mean) * rstd * scale + bias
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, residuals, dy):
  del epsilon, dtype
  x, mean, rstd, scale, bias = residuals
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  g = dy * scale
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
  axes = tuple(range(x.ndim - 1))
  return dx.astype(x.dtype), jnp.sum(dy * x_hat, axis=axes).astype(scale.dtype), jnp.sum(dy, axis=axes).astype(
      bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
  """jax.nn.gelu; its backward pass recomputes the derivative from x instead of saving intermediates."""
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
  return jax.nn.gelu(x, approximate=approximate), x


def _gelu_bwd(approximate, x, dy):
  z = x.astype(jnp.float32)
  if approximate:  # d/dz of z/2 (1 + tanh(c (z + 0.044715 z^3))), c = sqrt(2/pi).
    c = math.sqrt(2 / math.pi)
    t = jnp.tanh(c * (z + 0.044715 * z**3))
    slope = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
  else:  # d/dz of z Phi(z) = Phi(z) + z phi(z).
    slope = 0.5 * (1 + jax.lax.erf(z / math.sqrt(2))) + z * jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
  return ((dy.astype(jnp.float32) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (scale, bias over the last axis) and values, with ops.layer_norm's backward."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)
