"""The paper's few-shot evaluation ("5-shot linear"; ViT paper Sec. 4.1): L2-regularised linear regression
from frozen pre-logit features to labels, with big_vision's conventions (evaluators/fewshot_lsr.py).

  config.evals.fewshot = ConfigDict(dict(type="fewshot", datasets={"cifar10": ("cifar10", "train", "test")},
                                         shots=(1, 5, 10, 25), seeds=3, l2_reg=2.0**10, pp=..., batch_size=256,
                                         every_steps=0))
For each dataset and seed, one random order of each class's train examples; the n-shot support set is
the first n of each (so a seed's 1-, 5-, 10- and 25-shot sets are nested). Features are standardised
with the support set's mean and std + 1e-5, a constant bias feature of 100 is appended, targets are
2 * onehot - 1, W = (X^T X + l2 I)^-1 X^T Y, and the test split is classified by argmax.
"""

from collections.abc import Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from mixer import dataset, guards, input_pipeline, sharding, steps

KEYS = ("datasets", "shots", "seeds", "l2_reg", "pp", "batch_size")
BIAS = 100.0  # big_vision's bias feature: large, so that l2_reg barely shrinks the bias weights.
STD_EPSILON = 1e-5  # big_vision's: keeps a feature that is constant over the support set finite.


def validate(settings, where: str) -> None:
  for name, spec in settings.datasets.items():
    if isinstance(spec, str) or len(spec) != 3 or not all(isinstance(part, str) for part in spec):
      raise ValueError(f"{where}.datasets.{name}={spec!r} must be (tfds name, train split, test split)")
  if not settings.shots or not all(isinstance(n, int) and n > 0 for n in settings.shots):
    raise ValueError(f"{where}.shots={settings.shots!r} must be positive integers")
  for key in ("seeds", "batch_size"):
    if not isinstance(settings[key], int) or settings[key] <= 0:
      raise ValueError(f"{where}.{key}={settings[key]!r} must be a positive integer")
  if not settings.l2_reg > 0:
    raise ValueError(f"{where}.l2_reg={settings.l2_reg!r} must be positive")


def class_permutations(labels: np.ndarray, seed: int, num_classes: int) -> list[np.ndarray]:
  """Per class, the indices of its examples in one random order drawn under `seed` (big_vision's draw)."""
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def support_indices(permutations: Sequence[np.ndarray], shots: int) -> np.ndarray:
  """The n-shot support set: the first `shots` of every class's permutation, class by class."""
  for c, members in enumerate(permutations):
    if len(members) < shots:
      raise ValueError(f"class {c} has {len(members)} training examples, fewer than {shots} shots")
  return np.concatenate([members[:shots] for members in permutations])


def _with_bias(standardised: np.ndarray) -> np.ndarray:
  return np.pad(standardised, ((0, 0), (0, 1)), constant_values=BIAS)


class LinearRegression:
  """The closed-form ridge on support features, in float64 on the host: with the bias feature at 100,
  X^T X spans eight orders of magnitude, more than float32 resolves; at ImageNet's size it takes seconds."""

  def __init__(self, support: np.ndarray, support_labels: np.ndarray, num_classes: int, l2_reg: float):
    x = np.asarray(support, np.float64)
    self.mean, self.std = x.mean(0), x.std(0) + STD_EPSILON
    x = _with_bias((x - self.mean) / self.std)
    y = 2.0 * np.eye(num_classes)[support_labels] - 1.0
    # weights: [features + 1, classes], the bias feature's row last.
    self.weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ y)

  def predict(self, features: np.ndarray) -> np.ndarray:
    standardised = (np.asarray(features, np.float64) - self.mean) / self.std
    return np.argmax(standardised @ self.weights[:-1] + BIAS * self.weights[-1], axis=1)  # no padded copy.


def accuracy(support: np.ndarray, support_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
             num_classes: int, l2_reg: float) -> float:
  """Top-1 on `test` of the ridge regression fitted on `support`."""
  regression = LinearRegression(support, support_labels, num_classes, l2_reg)
  return float(np.mean(regression.predict(test) == test_labels))


def extract(features_fn: Callable, params, batches: Iterable, progress: str | None = None,
            stop: Callable[[int], bool] | None = None):
  """(features, labels, indices) of every real example in `batches`, gathered from all processes.

  Waits for the device every steps.sync_every() batches (XLA:CPU meshes deadlock with too many in flight).
  guards.StopRequested when stop(i) is true before the i-th batch.
  """
  batches = guards.until_stopped(batches, stop)
  if progress:
    # On a terminal only: in a log file its lines would run into the results printed after it.
    batches = tqdm(batches, desc=progress, leave=False, disable=True if jax.process_index() > 0 else None)
  outputs, every = [], steps.sync_every()
  for i, batch in enumerate(batches, 1):
    outputs.append((features_fn(params, batch["image"]), batch["label"], batch["index"], batch["mask"]))
    if i % every == 0:
      jax.block_until_ready(outputs[-1][0])
  features, labels, indices, mask = (np.concatenate([np.asarray(multihost_utils.process_allgather(o[i], tiled=True))
                                                     for o in outputs]) for i in range(4))
  keep = mask > 0
  order = np.argsort(indices[keep])
  return features[keep][order], labels[keep][order], indices[keep][order]


def make_features_fn(predict: Callable, mesh):
  """Jitted pre-logit features (after the head LayerNorm and mean pooling) over the whole mesh."""
  return jax.jit(lambda params, images: predict(params, images)[1]["pre_logits"],
                 out_shardings=sharding.batch_sharding(mesh))


class Evaluator:
  """Few-shot top-1 per dataset and shot count, averaged over seeds, from the model's pre-logit features."""

  headline = None  # a table of datasets and shot counts, not one number.

  def __init__(self, name: str, settings, predict: Callable, data):
    self.name, self.settings, self.every_steps = name, settings, settings.every_steps
    self.data_dir, self.mesh, self.progress = data.data_dir, data.mesh, data.progress  # its own datasets
    self.features_fn = make_features_fn(predict, data.mesh)

  def run(self, params, stop: Callable[[int], bool] | None = None) -> dict:
    """{"mean": {dataset: {shots: mean top-1}}, "seeds": {dataset: {shots: [per seed]}}, "skipped": {dataset:
    [shots]}}: "skipped" holds the shot counts that some class of the dataset's train split cannot supply.

    guards.StopRequested when stop(i) is true before a batch (or, with i=0, before a dataset)."""
    settings = self.settings
    means, per_seed, skipped = {}, {}, {}
    for name, (tfds_name, train_split, test_split) in settings.datasets.items():
      if stop is not None and stop(0):
        raise guards.StopRequested(f"stop requested before few-shot dataset {name}")
      builder = dataset.get_builder(_dataset_config(tfds_name, self.data_dir))  # embedded ones prepare here.
      num_classes = builder.info.features["label"].num_classes
      labels = input_pipeline.read_labels(builder, train_split)
      # A shot count that some class cannot supply (Flowers-102 has 10 train images per class) is left out
      # for this dataset, with a warning and a record under "skipped", not an error that loses every result.
      smallest = int(np.bincount(labels, minlength=num_classes).min())
      shot_counts = [shots for shots in settings.shots if shots <= smallest]
      if len(shot_counts) < len(settings.shots):
        skipped[name] = [shots for shots in settings.shots if shots > smallest]
        logging.warning("Few-shot %s: skipping %s shots, its smallest class has %d %s examples", name,
                        skipped[name], smallest, train_split)
      if not shot_counts:
        continue
      permutations = [class_permutations(labels, seed, num_classes) for seed in range(settings.seeds)]
      # Only the largest support set of each seed is decoded: it holds the smaller ones.
      needed = np.unique(np.concatenate([support_indices(p, max(shot_counts)) for p in permutations]))
      train = extract(self.features_fn, params, input_pipeline.selection_iterator(
          builder, train_split, needed, settings.pp, settings.batch_size, self.mesh),
          progress=f"{name} {train_split} features" if self.progress else None, stop=stop)
      test = extract(self.features_fn, params, input_pipeline.selection_iterator(
          builder, test_split, None, settings.pp, settings.batch_size, self.mesh),
          progress=f"{name} {test_split} features" if self.progress else None, stop=stop)
      row = {index: i for i, index in enumerate(train[2])}
      means[name], per_seed[name] = {}, {}
      for shots in shot_counts:
        rows = [[row[i] for i in support_indices(p, shots)] for p in permutations]
        per_seed[name][shots] = [accuracy(train[0][r], train[1][r], test[0], test[1], num_classes, settings.l2_reg)
                                 for r in rows]
        means[name][shots] = float(np.mean(per_seed[name][shots]))
    return {"mean": means, "seeds": per_seed, "skipped": skipped}

  def scalars(self, results: dict) -> dict[str, float]:
    """{"cifar10_5shot": mean top-1, ...} (TensorBoard's fewshot/cifar10_5shot)."""
    return {f"{name}_{shots}shot": top1
            for name, by_shots in results["mean"].items() for shots, top1 in by_shots.items()}

  def summary(self, results: dict, step) -> str:
    return (f"Few-shot linear regression top-1 (%), mean of {self.settings.seeds} seeds, step {step}:\n"
            f"{table(results)}")

  def file_tag(self) -> str:
    return self.name


def table(results: dict) -> str:
  """A text table: one row per dataset, one column per shot count (mean top-1 over seeds, in %)."""
  shots = sorted({s for by_shots in results["mean"].values() for s in by_shots}, key=int)
  lines = [f"{'dataset':20}" + "".join(f"{f'{s}-shot':>10}" for s in shots)]
  for name, by_shots in results["mean"].items():
    lines.append(f"{name:20}" + "".join(f"{100 * by_shots[s]:10.2f}" if s in by_shots else f"{'-':>10}"
                                        for s in shots))
  return "\n".join(lines)


def _dataset_config(tfds_name, data_dir):
  return ml_collections.ConfigDict({"dataset": tfds_name, "data_dir": data_dir, "bad_images": "fail"})
