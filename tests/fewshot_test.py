"""Tests for mixer/evaluators/fewshot.py against big_vision's few-shot formula written out in numpy: the
bias feature of 100 and std + 1e-5, nested support sets, and the evaluator on the digits."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mixer import evaluators, preprocess, setup, steps
from mixer.evaluators import fewshot
from tests.conftest import REPO, small_config


def big_vision_ridge(support, labels, test, num_classes, l2_reg, bias=100.0, epsilon=1e-5):
  """(weights, test predictions) as big_vision's fewshot_lsr.py computes them: through the eigenvectors of
  x^T x (N >= D) or of x x^T (D > N), in float64."""
  mean, std = support.mean(0), support.std(0) + epsilon
  x = np.pad((support - mean) / std, ((0, 0), (0, 1)), constant_values=bias)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  if len(x) >= x.shape[1]:
    eigs, q = np.linalg.eigh(x.T @ x)
    lhs, rhs = q, q.T @ (x.T @ y)
  else:
    eigs, q = np.linalg.eigh(x @ x.T)
    lhs, rhs = x.T @ q, q.T @ y
  weights = (lhs / (eigs + l2_reg)) @ rhs
  return weights, np.argmax(np.pad((test - mean) / std, ((0, 0), (0, 1)), constant_values=bias) @ weights, 1)


def _unbalanced_problem(n=(40, 10), dim=4, signal=2.0, seed=0):
  """Two classes, unbalanced, far from the origin, told apart by feature 0; feature 1 is nearly constant
  (std ~1e-5, so that the epsilon added to the std matters)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat([0, 1], n)
  test_labels = np.repeat([0, 1], 100)
  support, test = (rng.normal(size=(len(y), dim)) + 5.0 for y in (labels, test_labels))
  support[:, 0] += signal * labels
  test[:, 0] += signal * test_labels
  support[:, 1] = test[:, 1] = 3.0
  support[:, 1] += 1e-5 * rng.normal(size=len(labels))
  return support, labels, test, test_labels


def test_regression_is_big_visions_where_the_bias_constant_decides():
  support, labels, test, test_labels = _unbalanced_problem()
  regression = fewshot.LinearRegression(support, labels, 2, 2.0**10)
  weights, predictions = big_vision_ridge(support, labels, test, 2, 2.0**10)
  np.testing.assert_allclose(regression.weights, weights, rtol=1e-9, atol=1e-15)
  np.testing.assert_array_equal(regression.predict(test), predictions)
  assert fewshot.accuracy(support, labels, test, test_labels, 2, 2.0**10) == np.mean(predictions == test_labels)
  # The case is one where the constants matter: a bias feature of 1 (regularised like any weight) moves a
  # quarter of the predictions, and std + 1e-8 changes the weights.
  _, with_bias_1 = big_vision_ridge(support, labels, test, 2, 2.0**10, bias=1.0)
  assert np.mean(with_bias_1 != predictions) > 0.2
  assert not np.allclose(big_vision_ridge(support, labels, test, 2, 2.0**10, epsilon=1e-8)[0], weights, rtol=1e-3)


def test_regression_with_more_features_than_support_examples():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 5)  # 5-shot, 4 classes: 20 examples of 64 features (big_vision's x x^T case)
  support = rng.normal(size=(20, 64)) * rng.uniform(0.5, 3, 64) + np.eye(4, 64)[labels] * 3
  test = rng.normal(size=(50, 64)) + 1.0
  weights, predictions = big_vision_ridge(support, labels, test, 4, 2.0**10)
  regression = fewshot.LinearRegression(support, labels, 4, 2.0**10)
  np.testing.assert_allclose(regression.weights, weights, rtol=1e-8, atol=1e-14)
  np.testing.assert_array_equal(regression.predict(test), predictions)


def test_support_sets_are_nested_balanced_and_seeded():
  labels = np.random.default_rng(0).integers(0, 7, 500)
  permutations = fewshot.class_permutations(labels, seed=3, num_classes=7)
  sets = {n: fewshot.support_indices(permutations, n) for n in (1, 5, 10, 25)}
  for small, large in ((1, 5), (5, 10), (10, 25)):
    assert set(sets[small]) < set(sets[large])
  for n, chosen in sets.items():
    assert len(set(chosen)) == 7 * n and np.all(np.bincount(labels[chosen], minlength=7) == n)
  # big_vision's draw: one rng per seed, a permutation of each class's indices in class order.
  rng = np.random.default_rng(3)
  expected = np.concatenate([rng.permutation(np.where(labels == c)[0])[:5] for c in range(7)])
  np.testing.assert_array_equal(sets[5], expected)
  other = fewshot.support_indices(fewshot.class_permutations(labels, seed=4, num_classes=7), 5)
  assert not np.array_equal(np.sort(sets[5]), np.sort(other))
  with pytest.raises(ValueError, match="class 6 has 1 training examples, fewer than 5 shots"):
    fewshot.support_indices(fewshot.class_permutations(np.array([0, 1, 2, 3, 4, 5] * 5 + [6]), 0, 7), 5)


@pytest.fixture(scope="module")
def digits_setup(data_dir):
  """The default config's model at initialisation, with its few-shot evaluator reduced to 2 seeds."""
  config = small_config(data_dir)
  config.evals.fewshot.shots, config.evals.fewshot.seeds = (1, 5, 1000), 2  # no digit has 1000 train images.
  mesh, builder, info = setup.setup(config)
  model = setup.create_model(config, info)
  params = jax.jit(lambda: steps.init_params(model, info.image_shape, 0))()
  return config, (model, setup.eval_data(config, builder, info, mesh)), params


def _images_by_hand(data_dir, split: str):
  """Every example of the digits' `split` in stored order, through the few-shot preprocessing."""
  pp = preprocess.get_preprocess_fn(small_config(data_dir).evals.fewshot.pp)
  ds = tfds.builder("digits", data_dir=data_dir).as_dataset(split=split, shuffle_files=False,
                                                           decoders={"image": tfds.decode.SkipDecoding()})
  examples = ds.map(lambda e: {"image": pp({"image": e["image"]})["image"], "label": e["label"]})
  return list(examples.batch(4096).as_numpy_iterator())[0]


def test_evaluator_on_the_digits_is_the_formula_on_the_models_features(data_dir, digits_setup):
  config, (model, data), params = digits_setup
  evaluator = evaluators.from_config(config.evals, steps.make_predict_fn(model), data, names=["fewshot"])
  results = evaluator["fewshot"].run(params)
  assert results["skipped"] == {"digits": [1000]}
  train, test = _images_by_hand(data_dir, "train"), _images_by_hand(data_dir, "test")
  supports = {}  # big_vision's draw: per seed one permutation of each class; the first n of each.
  for seed in range(2):
    rng = np.random.default_rng(seed)
    permutations = [rng.permutation(np.where(train["label"] == c)[0]) for c in range(10)]
    supports.update({(shots, seed): np.concatenate([p[:shots] for p in permutations]) for shots in (1, 5)})
  rows = np.unique(np.concatenate(list(supports.values())))
  # The model's features of those images, by the evaluator's jitted function (compiled already for batches of
  # config.evals.fewshot.batch_size): what is tested is which images and features the evaluator pairs.
  images, batch = np.concatenate([train["image"][rows], test["image"]]), config.evals.fewshot.batch_size
  padded = np.concatenate([images, np.zeros((-len(images) % batch,) + images.shape[1:], images.dtype)])
  features = np.concatenate([evaluator["fewshot"].features_fn(params, padded[i:i + batch])
                             for i in range(0, len(padded), batch)])[:len(images)]
  train_features, test_features = dict(zip(rows, features[:len(rows)], strict=True)), features[len(rows):]
  for shots in (1, 5):
    expected = []
    for seed in range(2):
      support = np.stack([train_features[i] for i in supports[(shots, seed)]])
      predictions = big_vision_ridge(support, train["label"][supports[(shots, seed)]], test_features, 10, 2.0**10)[1]
      expected.append(np.mean(predictions == test["label"]))
    assert results["seeds"]["digits"][shots] == expected
    assert results["mean"]["digits"][shots] == pytest.approx(np.mean(results["seeds"]["digits"][shots]))
  assert evaluator["fewshot"].scalars(results) == {"digits_1shot": results["mean"]["digits"][1],
                                                   "digits_5shot": results["mean"]["digits"][5]}
  table = evaluator["fewshot"].summary(results, step=7)
  assert "mean of 2 seeds, step 7" in table and re.search(r"digits +[0-9.]+ +[0-9.]+\n?$", table)
  assert "1000-shot" not in table


def _five_shot(args):
  result = subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  row = re.search(r"^digits\s+([0-9.]+)\s+([0-9.]+)", result.stdout, re.M)
  assert row, result.stdout
  return float(row.group(2))


@pytest.mark.trains
@pytest.mark.subprocess
def test_trained_features_beat_random_ones_by_a_wide_margin(trained_run):
  workdir, history = trained_run
  assert [f["step"] for f in history["fewshot"]] == [50, 100]  # the periodic evaluator during training
  trained = _five_shot([f"--workdir={workdir}", "--fewshot", "--notop1"])
  random = _five_shot([f"--workdir={workdir}", "--fewshot", "--notop1", "--random_init"])
  assert trained == pytest.approx(100 * history["fewshot"][-1]["mean"]["digits"]["5"], abs=0.005)
  assert trained > random + 10  # docs/evaluation.md's table: the default run against random initialisation
