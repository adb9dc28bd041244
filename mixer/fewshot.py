"""The paper's few-shot evaluation: L2-regularised linear regression from frozen pre-logit features to
labels (ViT paper Sec. 4.1; "5-shot linear" in the Mixer paper), solved in closed form on device.

For each dataset, n shots and seed: n examples per class are sampled from the train split; features
are standardised with that support set's mean and std, a constant bias column is appended, targets are
2 * onehot - 1, W = (X^T X + l2 I)^-1 X^T Y, and the test split is classified by argmax.
"""

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixer import input_pipeline


def sample_support(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """Indices of exactly `shots` examples of every class, drawn without replacement under `seed`."""
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise ValueError(f"class {c} has {len(members)} training examples, fewer than {shots} shots")
    chosen.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(chosen))


def _standardiser(support):
  mean, std = support.mean(0), support.std(0) + 1e-8
  return lambda x: jnp.concatenate([(x - mean) / std, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


@functools.partial(jax.jit, static_argnums=2)
def fit(support: jax.Array, support_labels: jax.Array, num_classes: int, l2_reg: float) -> jax.Array:
  """W = (X^T X + l2 I)^-1 X^T Y for standardised features X with a bias column, Y = 2 onehot - 1."""
  x = _standardiser(support)(support)
  y = 2.0 * jax.nn.one_hot(support_labels, num_classes, dtype=x.dtype) - 1.0
  return jnp.linalg.solve(x.T @ x + l2_reg * jnp.eye(x.shape[1], dtype=x.dtype), x.T @ y)


@functools.partial(jax.jit, static_argnums=4)
def _fit_and_score(support, support_labels, test, test_labels, num_classes, l2_reg):
  w = fit(support, support_labels, num_classes, l2_reg)
  predictions = jnp.argmax(_standardiser(support)(test) @ w, axis=1)
  return jnp.mean(predictions == test_labels)


def linear_regression_accuracy(support: np.ndarray, support_labels: np.ndarray, test: np.ndarray,
                               test_labels: np.ndarray, num_classes: int, l2_reg: float) -> float:
  """Top-1 on `test` of the closed-form ridge regression fitted on `support` (float32, on device)."""
  return float(_fit_and_score(jnp.asarray(support, jnp.float32), jnp.asarray(support_labels),
                              jnp.asarray(test, jnp.float32), jnp.asarray(test_labels), num_classes,
                              jnp.float32(l2_reg)))


def extract(features_fn: Callable, params, batches: Iterable, progress: str | None = None, sync_every: int = 16):
  """(features, labels, indices) of every real example in `batches`, gathered from all processes.

  Waits for the device every `sync_every` batches (XLA:CPU meshes deadlock with too many in flight).
  """
  if progress:
    from tqdm import tqdm
    # On a terminal only: in a log file its lines would run into the results printed after it.
    batches = tqdm(batches, desc=progress, leave=False, disable=True if jax.process_index() > 0 else None)
  outputs = []
  for i, batch in enumerate(batches, 1):
    outputs.append((features_fn(params, batch["image"]), batch["label"], batch["index"], batch["mask"]))
    if i % sync_every == 0:
      jax.block_until_ready(outputs[-1][0])
  features, labels, indices, mask = (np.concatenate([np.asarray(multihost_utils.process_allgather(o[i], tiled=True))
                                                     for o in outputs]) for i in range(4))
  keep = mask > 0
  order = np.argsort(indices[keep])
  return features[keep][order], labels[keep][order], indices[keep][order]


def make_features_fn(model, params_sharding, mesh):
  """Jitted pre-logit features (after the head LayerNorm and mean pooling) over the whole mesh."""
  from mixer import sharding

  def features(params, images):
    return model.apply({"params": params}, images, train=False, pre_logits=True)

  return jax.jit(features, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def run(fewshot_config, model, params, params_sharding, mesh, data_dir=None, progress: bool = False) -> dict:
  """Few-shot top-1 per dataset and shot count, averaged over seeds; per-seed values beside them.

  Returns {dataset: {shots: mean accuracy}} under "mean", {dataset: {shots: [per seed]}} under "seeds", and
  {dataset: [shots]} under "skipped": the shot counts that a class of the dataset's train split cannot supply.
  """
  features_fn = make_features_fn(model, params_sharding, mesh)
  means, per_seed, skipped = {}, {}, {}
  for name, (tfds_name, train_split, test_split) in fewshot_config.datasets.items():
    builder = input_pipeline.get_builder(_dataset_config(tfds_name, data_dir))  # embedded ones prepare here.
    num_classes = builder.info.features["label"].num_classes
    labels = input_pipeline.read_labels(builder, train_split)
    # A shot count that some class cannot supply (Flowers-102 has 10 train images per class) is left out
    # for this dataset, with a warning and a record under "skipped", not an error that loses every result.
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    shot_counts = [shots for shots in fewshot_config.shots if shots <= smallest]
    if len(shot_counts) < len(fewshot_config.shots):
      skipped[name] = [shots for shots in fewshot_config.shots if shots > smallest]
      logging.warning("Few-shot %s: skipping %s shots, its smallest class has %d %s examples", name,
                      skipped[name], smallest, train_split)
    supports = {(shots, seed): sample_support(labels, shots, seed, num_classes)
                for shots in shot_counts for seed in range(fewshot_config.seeds)}
    if not supports:
      continue
    needed = np.unique(np.concatenate(list(supports.values())))
    pp = fewshot_config.pp
    train = extract(features_fn, params, input_pipeline.selection_iterator(
        builder, train_split, needed, pp, fewshot_config.batch_size, mesh),
        progress=f"{name} {train_split} features" if progress else None)
    test = extract(features_fn, params, input_pipeline.selection_iterator(
        builder, test_split, None, pp, fewshot_config.batch_size, mesh),
        progress=f"{name} {test_split} features" if progress else None)
    position = {index: row for row, index in enumerate(train[2])}
    means[name], per_seed[name] = {}, {}
    for shots in shot_counts:
      accuracies = []
      for seed in range(fewshot_config.seeds):
        rows = [position[i] for i in supports[(shots, seed)]]
        accuracies.append(linear_regression_accuracy(train[0][rows], train[1][rows], test[0], test[1],
                                                     num_classes, fewshot_config.l2_reg))
      per_seed[name][shots] = accuracies
      means[name][shots] = float(np.mean(accuracies))
  return {"mean": means, "seeds": per_seed, "skipped": skipped}


def scalars(results: dict) -> dict[str, float]:
  """{"fewshot/cifar10_5shot": accuracy, ...}: the metric-writer names of run()'s means."""
  return {f"fewshot/{name}_{shots}shot": accuracy
          for name, by_shots in results["mean"].items() for shots, accuracy in by_shots.items()}


def table(results: dict) -> str:
  """A text table: one row per dataset, one column per shot count (mean top-1 over seeds, in %)."""
  shots = sorted({s for by_shots in results["mean"].values() for s in by_shots}, key=int)
  lines = [f"{'dataset':20}" + "".join(f"{f'{s}-shot':>10}" for s in shots)]
  for name, by_shots in results["mean"].items():
    lines.append(f"{name:20}" + "".join(f"{100 * by_shots[s]:10.2f}" if s in by_shots else f"{'-':>10}"
                                        for s in shots))
  return "\n".join(lines)


def _dataset_config(tfds_name, data_dir):
  import ml_collections
  return ml_collections.ConfigDict({"dataset": tfds_name, "data_dir": data_dir, "bad_images": "fail"})
