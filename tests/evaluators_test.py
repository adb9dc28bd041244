"""Tests for mixer/evaluators: the registry's checks of config.evals, and the classification evaluator
(the few-shot one: tests/fewshot_test.py)."""

import jax
import ml_collections
import pytest

from mixer import evaluators, guards, setup, steps
from tests.conftest import small_config


@pytest.mark.parametrize("key,value,match", [
    ("evals.eval.type", "retrieval", r"config.evals.eval.type='retrieval' is not one of classification, fewshot"),
    ("evals.eval.every_steps", -1, r"config.evals.eval.every_steps=-1 must be 0 \(evaluate.py only\) or more"),
    ("evals.fewshot.shots", (1, 0), r"config.evals.fewshot.shots=\(1, 0\) must be positive integers"),
    ("evals.fewshot.seeds", 0, r"config.evals.fewshot.seeds=0 must be a positive integer"),
    ("evals.fewshot.l2_reg", 0.0, r"config.evals.fewshot.l2_reg=0.0 must be positive"),
    ("evals.fewshot.datasets", {"digits": ("digits", "train")},
     r"config.evals.fewshot.datasets.digits=\('digits', 'train'\) must be \(tfds name, train split, test split\)"),
])
def test_bad_values_name_the_key(key, value, match):
  config = small_config("unused", **{key: value})
  with pytest.raises(ValueError, match=match):
    evaluators.validate(config)


def test_missing_unknown_reserved_and_replaced_keys_are_named():
  config = small_config("unused")
  del config.evals.eval["split"]
  with pytest.raises(ValueError, match=r"config.evals.eval.split is missing: a classification evaluator needs type, "
                                       r"every_steps, split"):
    evaluators.validate(config)
  config = small_config("unused")
  config.evals.eval.batch_size = 8
  with pytest.raises(ValueError, match=r"config.evals.eval.batch_size is not a key of a classification evaluator"):
    evaluators.validate(config)
  config = small_config("unused")
  config.evals.train = ml_collections.ConfigDict(dict(type="classification", split="train", every_steps=0))
  with pytest.raises(ValueError, match=r"config.evals.train: 'train' is a reserved name"):
    evaluators.validate(config)
  config = small_config("unused")  # a config.json from before config.evals
  config.eval_split = "test"
  with pytest.raises(ValueError, match=r"config.eval_split is no longer read: .* \(now config.evals.eval.split\)"):
    setup.validate_config(config, num_devices=1, num_processes=1)


def test_due_every_n_steps_and_at_the_last_never_with_0():
  periodic = type("Periodic", (), {"every_steps": 5})()
  assert [step for step in range(1, 13) if evaluators.due(periodic, step, 12)] == [5, 10, 12]
  periodic.every_steps = 0
  assert not any(evaluators.due(periodic, step, 12) for step in range(1, 13))


def _stop_at_call(n, asked):
  """A stop request that says yes at its n-th call, noting what it was asked in `asked`."""
  return lambda i: asked.append(i) or len(asked) == n


def test_classification_evaluator_on_a_split_of_the_digits_and_a_stop_request(data_dir):
  config = small_config(data_dir, **{"evals.fewshot.batch_size": 8})
  config.evals.train_top1 = ml_collections.ConfigDict(dict(type="classification", split="validation", every_steps=0))
  mesh, builder, info = setup.setup(config)
  model = setup.create_model(config, info)
  params = jax.jit(lambda: steps.init_params(model, info.image_shape, 0))()
  predict, data = steps.make_predict_fn(model), setup.eval_data(config, builder, info, mesh)
  with pytest.raises(ValueError, match=r"config.evals.train_top1.split='validation' is not a split of 'digits'"):
    evaluators.from_config(config.evals, predict, data)
  config.evals.train_top1.split = "train[:100]"
  built = evaluators.from_config(config.evals, predict, data, names=["train_top1", "eval"])
  assert list(built) == ["eval", "train_top1"]  # config order, which ConfigDict sorts.
  assert evaluators.headline(built) == ("eval", "top1")  # the first that declares one: the run's result
  results = built["train_top1"].run(params)
  assert built["train_top1"].run(params, stop=lambda i: False) == results
  assert results["split"] == "train[:100]" and results["num_examples"] == 100
  assert built["train_top1"].scalars(results) == {k: results[k] for k in ("top1", "loss", "num_examples")}
  assert built["train_top1"].summary(results, step=3) == (
      f"Top-1 (digits:train[:100], step 3, 100 examples): {results['top1']:.4f}")
  assert built["train_top1"].file_tag() == "train[_100]"

  # A stop request (SIGTERM) during an evaluation is asked for before each batch (and, few-shot, before each
  # dataset), and abandons the evaluation.
  built.update(evaluators.from_config(config.evals, predict, data, names=["fewshot"]))
  assert built["fewshot"].headline is None
  for name, asked_before_stopping in (("train_top1", [1, 2, 3]), ("fewshot", [0, 1, 2, 3])):
    asked = []
    with pytest.raises(guards.StopRequested):
      built[name].run(params, stop=_stop_at_call(len(asked_before_stopping), asked))
    assert asked == asked_before_stopping, name
