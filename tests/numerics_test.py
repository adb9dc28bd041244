"""Guards the pinned jax against the XLA:CPU fusion bug that made jax 0.10.2 wrong here."""

import jax
import jax.numpy as jnp
import numpy as np


def test_jitted_matmul_mean_is_correct():
  # jaxlib 0.10.2 returned 3.7e19 for this on AMD Zen 4 (an XLA:CPU fusion bug).
  result = jax.jit(lambda a: (a @ jnp.ones((64, 32))).mean())(np.ones((256, 64), np.float32))
  np.testing.assert_allclose(float(result), 64.0, rtol=1e-6)


def test_jitted_dense_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(128, 96)).astype(np.float32), rng.normal(size=(96, 80)).astype(np.float32)
  ours = jax.jit(lambda x, y: jax.nn.gelu(x @ y).sum(axis=0))(a, b)
  expected = np.asarray(jax.nn.gelu(jnp.asarray(a.astype(np.float64) @ b.astype(np.float64)))).sum(axis=0)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-3)
