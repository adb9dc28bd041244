"""Shared fixtures: a tfds data_dir with the embedded digits prepared once, small configs and a small model."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a test needs beyond the process it runs in (pyproject.toml describes each). A test with any of them is
# also `slow`; a test with none is `unit`: `python -m pytest -m unit` is the fast tier.
HEAVY_MARKERS = ("trains", "multidevice", "tpu_compile", "peer", "subprocess")

# The test files that take longest on 2 CPU cores, longest first (per-file sums of the times in a --junitxml report).
# .ci/run hands whole files to 2 workers in collection order (--dist loadfile --no-loadscope-reorder):
# starting the long ones first keeps one worker from finishing its last long file alone.
LONGEST_FILES = ("reliability_test.py", "sharding_test.py", "finetune_test.py", "multihost_test.py", "readme_test.py",
                 "train_lib_test.py", "tpu_test.py", "benchmarks_test.py", "fewshot_test.py", "experiments_test.py",
                 "models_test.py", "pretraining_test.py", "export_test.py", "cli_test.py", "predict_test.py")


def pytest_configure(config):
  """One persistent XLA compilation cache for the session and its pytest-xdist workers: many tests compile the same
  small train and eval steps in process (each train_and_evaluate call would compile them anew). A fresh directory
  per session, so no run reuses another's. Not for the python processes tests start: loading a cached CPU
  executable logs native errors (a target-feature mismatch) into the stderr that those tests read as a user would."""
  if not hasattr(config, "workerinput") and "MIXER_TESTS_JAX_CACHE" not in os.environ:  # the main process
    config.jax_cache = tempfile.mkdtemp(prefix="mixer-tests-jax-cache-")
    os.environ["MIXER_TESTS_JAX_CACHE"] = config.jax_cache  # the workers inherit it; jax does not read it
  if "MIXER_TESTS_JAX_CACHE" in os.environ:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ["MIXER_TESTS_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if getattr(config, "jax_cache", None):
    shutil.rmtree(config.jax_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    heavy = [m for m in HEAVY_MARKERS if item.get_closest_marker(m)]
    item.add_marker("slow" if heavy else "unit")
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding the prepared digits dataset (prepared through our own pipeline)."""
  from configs import default
  from mixer import dataset
  path = str(tmp_path_factory.mktemp("tfds"))
  config = default.get_config()
  config.data_dir = path
  dataset.get_builder(config)
  return path


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> tuple[str, dict]:
  """(workdir, history as JSON) of the default config trained for 100 steps, with top-1 and few-shot logged at
  steps 50 and 100: the trained workdir that the few-shot, visualize and export tests read. Trained once per
  session, also across pytest-xdist workers (they share the parent of their base temporary directories)."""
  import json

  import filelock

  from mixer import train_lib
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  workdir = root / "trained_run"
  with filelock.FileLock(str(root / "trained_run.lock")):
    if not (root / "trained_run.json").exists():
      config = small_config(data_dir, total_steps=100, batch_size=64, warmup_steps=10, log_every_steps=10,
                            **{"evals.eval.every_steps": 50, "evals.fewshot.every_steps": 50})
      history = train_lib.train_and_evaluate(config, str(workdir))
      (root / "trained_run.json").write_text(json.dumps(history))
  return str(workdir), json.loads((root / "trained_run.json").read_text())


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
  config.evals.eval.every_steps = 1000
  config.checkpoint_every_steps = 1000
  return override(config, **overrides)


def model_and_params(num_classes=10, image_size=16, **kwargs):
  """A small Mixer (Ti/4 on 16px RGB), its params as numpy with non-trivial values everywhere, and 2 images."""
  import jax
  import numpy as np

  from mixer import models
  model = models.MlpMixer(num_classes=num_classes, **{**models.variant_kwargs("Ti/4"), **kwargs})
  x = jax.random.normal(jax.random.key(0), (2, image_size, image_size, 3))
  params = model.init(jax.random.key(1), x)["params"]
  # Non-trivial values everywhere (the head starts at zero).
  # In numpy: jax.random on each of the ~40 shapes would compile ~40 programs (seconds on 2 cores).
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), jax.device_get(params))
  return model, params, x


def restore_params(config, workdir: str):
  """(step, params) of the workdir's newest checkpoint on the config's mesh, restored as evaluate.py does."""
  from mixer import checkpoints, setup, steps
  mesh, _, info = setup.setup(config)
  abstract = steps.abstract_params(setup.create_model(config, info), info.image_shape, mesh, config.param_sharding)
  return checkpoints.restore_params(workdir, abstract)


@contextlib.contextmanager
def record_training_rows():
  """Taps the input pipeline meanwhile: yields a list to which each training batch's rows, as this process made
  them, are appended as [label, digest of the image]. Prefetching makes a few more batches than a run trains: its
  first len(history["train"]) are those it trained on (with log_every_steps=1)."""
  import hashlib

  from mixer import sharding
  rows, make_global = [], sharding.global_batches

  def recording(local_batches, mesh, depth):
    def tap():
      for local in local_batches:
        if "mask" not in local:  # a training batch (evaluation batches carry a mask)
          rows.append([[int(label), hashlib.sha1(image.tobytes()).hexdigest()[:12]]
                       for label, image in zip(local["label"], local["image"], strict=True)])
        yield local
    return make_global(tap(), mesh, depth)
  sharding.global_batches = recording
  try:
    yield rows
  finally:
    sharding.global_batches = make_global


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
  multi-device XLA:CPU hangs ignore SIGTERM.
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


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CORRUPT_IMAGE = "train/seven/corrupt.png"


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> str:
  """Your own images, as a user has them: scikit-learn's digits rendered as 32px RGB PNG files in
  SPLIT/CLASS/ folders (40 per class: 32 train, 8 test), plus one corrupt PNG (CORRUPT_IMAGE)."""
  import numpy as np
  from PIL import Image
  from sklearn import datasets
  root = tmp_path_factory.mktemp("images")
  digits = datasets.load_digits()
  counts = {}
  for image, label in zip(digits.images, digits.target, strict=True):
    n = counts.setdefault(label, 0)
    if n == 40:
      continue
    counts[label] = n + 1
    split = "train" if n < 32 else "test"
    pixels = np.kron(np.round(image * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))  # 8 -> 32px
    rgb = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)
    os.makedirs(root / split / DIGIT_NAMES[label], exist_ok=True)
    Image.fromarray(rgb).save(root / split / DIGIT_NAMES[label] / f"{n:03d}.png")
  (root / CORRUPT_IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
  return str(root)
