"""Shared fixtures: a tfds data_dir with the embedded digits prepared once, and small configs."""

import contextlib
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding the prepared digits dataset (prepared through our own pipeline)."""
  from configs import default
  from mixer import input_pipeline
  path = str(tmp_path_factory.mktemp("tfds"))
  config = default.get_config()
  config.data_dir = path
  input_pipeline.get_builder(config)
  return path


def small_config(data_dir: str, **overrides):
  """The default config, shortened for tests."""
  from configs import default
  config = default.get_config()
  config.data_dir = data_dir
  config.batch_size = 32
  config.eval_batch_size = 64
  config.total_steps = 12
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return override(config, **overrides)


def override(config, **overrides):
  """Sets config fields by dotted name ("model.variant") and returns the config."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def run_python(code: str, devices: int = 1, timeout: int = 600, **env) -> str:
  """Runs `code` in a fresh interpreter with `devices` simulated CPU devices; returns its stdout.

  The device count must be fixed before jax starts, hence a subprocess. `timeout -s KILL` because
  multi-device XLA:CPU hangs ignore SIGTERM (../shared/ENVIRONMENT.md).
  """
  full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                  TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env)
  result = subprocess.run(["timeout", "-s", "KILL", str(timeout), sys.executable, "-c", code],
                          env=full_env, cwd=REPO, capture_output=True, text=True)
  if result.returncode != 0:
    raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-5000:]}")
  return result.stdout


@contextlib.contextmanager
def mock_tfds(name: str, data_dir: str, splits: dict[str, int]):
  """tfds.testing.mock_data for a dataset we cannot download, with real split metadata.

  Writes the builder's own DatasetInfo with the given split sizes into data_dir, so that the
  pipeline sees a prepared dataset of that many (random, correctly encoded) examples per split.
  """
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
  info = builder.info
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=None)
      for split, n in splits.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=max(splits.values()), policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=data_dir):
    yield
