"""Tests for mixer/compilation.py: where the compilation cache goes, and a compile that says whether it was a hit."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer import compilation, setup
from tests.conftest import small_config


def test_cache_dir_follows_the_workdir_the_processes_and_what_jax_was_given(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  cache_dir = compilation.cache_dir
  assert cache_dir("none", "gs://bucket/runs/b16", 64) is None
  assert cache_dir("/data/cache", "gs://bucket/runs/b16", 1) == "/data/cache"
  assert cache_dir("auto", "gs://bucket/runs/b16/", 64) == "gs://bucket/runs/jax_compilation_cache"  # the bucket's
  assert cache_dir("auto", "/shared/runs/b16", 4) == "/shared/runs/jax_compilation_cache"  # where all processes read
  assert cache_dir("auto", "workdir", 1) == str(tmp_path / "mixer" / "jax_compilation_cache")  # the machine's own
  assert cache_dir("auto", "gs://bucket/runs/b16", 64, given="/set/by/JAX_COMPILATION_CACHE_DIR") == \
      "/set/by/JAX_COMPILATION_CACHE_DIR"
  for bad in ("", "  "):
    with pytest.raises(ValueError, match=r"config.compile_cache_dir=.* must be 'auto', 'none' or a directory"):
      setup.validate_config(small_config("unused", compile_cache_dir=bad), 1, 1)


def test_a_second_compile_loads_from_the_cache_and_the_process_setting_comes_back(tmp_path):
  before = jax.config.jax_compilation_cache_dir  # the test session's cache (tests/conftest.py)
  x = jnp.ones((8, 8))
  results = []
  for _ in range(2):
    # A new function object each time (as a new process would have): the same program, not jax's in-memory cache.
    step = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())
    with compilation.persistent_cache(str(tmp_path / "cache"), "unused") as path:
      assert path == str(tmp_path / "cache") and jax.config.jax_compilation_cache_dir == path
      compiled = compilation.compile_ahead(step, x)
    results.append(compiled)
    assert float(compiled.step(x)) == pytest.approx(float(np.tanh(np.ones((8, 8)) @ np.ones((8, 8))).sum()))
  assert [c.from_cache for c in results] == [False, True]
  assert results[0].cost["flops"] == results[1].cost["flops"] >= 2 * 8 * 8 * 8  # the matmul at least
  assert os.listdir(tmp_path / "cache")
  assert jax.config.jax_compilation_cache_dir == before
  with compilation.persistent_cache("none", "unused") as path:
    assert path is None and jax.config.jax_compilation_cache_dir is None
    assert compilation.compile_ahead(jax.jit(lambda a: a + 1), x).from_cache is None
  assert jax.config.jax_compilation_cache_dir == before
