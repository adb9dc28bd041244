"""Evaluators chosen by config.evals, as big_vision's: one module per type, one config entry per evaluator.

  config.evals.eval = ConfigDict(dict(type="classification", split="test", every_steps=100))
An entry's name is its TensorBoard prefix (eval/top1) and its key in the training history and in
evaluate.py's JSON; `type` names a module here; `every_steps` runs it every N training steps and at the
last (0: only from evaluate.py); the other keys are the type's own (its module's KEYS).

Each type's Evaluator is built from (name, its config entry, predict, data): `predict(params, images) ->
(logits, {"pre_logits": ...})` is all it sees of the model, and `data` (Data below) the run's dataset. It has
run(params, stop=None) -> results (JSON-able), scalars(results) -> {metric: float} (written as NAME/metric),
`headline`: the metric that is the run's result (None when it has none), summary(results, step) -> the text
evaluate.py prints, and file_tag() -> what names its results in evaluate.py's JSON file name.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import tensorflow_datasets as tfds

from mixer import dataset
from mixer.evaluators import classification, fewshot

TYPES = {"classification": classification, "fewshot": fewshot}
# Taken by the training metrics (train/...), the training history and evaluate.py's JSON.
RESERVED_NAMES = ("train", "step", "dataset", "start_step", "final_step", "headline", "preempted_at", "signal",
                  "startup")
# Config keys that config.evals replaced: a config.json from before then fails with this hint.
_REPLACED = {"eval_split": "config.evals.eval.split", "eval_every_steps": "config.evals.eval.every_steps",
             "fewshot": "config.evals.fewshot"}


@dataclasses.dataclass(frozen=True)
class Data:
  """The run's data as evaluators read it: its facts, its builder, and every example of a split in batches."""
  info: dataset.DatasetInfo
  builder: tfds.core.DatasetBuilder
  batches: Callable[[str], Iterator[dict]]  # split -> global batches (config.pp_eval), each example once, "mask"
  loss: str  # config.loss: how the run scores its logits (softmax_xent, sigmoid_xent)
  data_dir: str | None  # where other tfds datasets are prepared (few-shot's)
  mesh: jax.sharding.Mesh
  progress: bool = False  # progress bars, for evaluate.py on a terminal


class Evaluator(Protocol):
  every_steps: int
  headline: str | None

  def run(self, params, stop: Callable[[int], bool] | None = None) -> dict[str, Any]: ...

  def scalars(self, results: dict) -> dict[str, float]: ...

  def summary(self, results: dict, step) -> str: ...

  def file_tag(self) -> str: ...


def validate(config) -> None:
  """Fails, naming config.evals.NAME.KEY, on an unknown type, a missing or unknown key, or a bad every_steps."""
  for old, new in _REPLACED.items():
    if old in config:
      raise ValueError(f"config.{old} is no longer read: evaluators are set in config.evals (now {new}); "
                       f"a config.json written before that change needs the same edit")
  for name, settings in config.evals.items():
    where = f"config.evals.{name}"
    if name in RESERVED_NAMES:
      raise ValueError(f"{where}: {name!r} is a reserved name ({', '.join(RESERVED_NAMES)})")
    kind = settings.get("type")
    if kind not in TYPES:
      raise ValueError(f"{where}.type={kind!r} is not one of {', '.join(TYPES)}")
    keys = ("type", "every_steps", *TYPES[kind].KEYS)
    missing = [k for k in keys if k not in settings]
    if missing:
      raise ValueError(f"{where}.{missing[0]} is missing: a {kind} evaluator needs {', '.join(keys)}")
    unknown = [k for k in settings if k not in keys]
    if unknown:
      raise ValueError(f"{where}.{unknown[0]} is not a key of a {kind} evaluator ({', '.join(keys)})")
    if not isinstance(settings.every_steps, int) or settings.every_steps < 0:
      raise ValueError(f"{where}.every_steps={settings.every_steps!r} must be 0 (evaluate.py only) or more")
    TYPES[kind].validate(settings, where)


def from_config(evals_config, predict: Callable, data: Data, names=None) -> dict[str, Evaluator]:
  """The evaluators of config.evals (only `names` when given, in config order)."""
  return {name: TYPES[settings.type].Evaluator(name, settings, predict, data)
          for name, settings in evals_config.items() if names is None or name in names}


def headline(evaluators: dict[str, Evaluator]) -> tuple[str, str] | None:
  """(name, metric) of the run's result: the first evaluator that declares a headline metric."""
  return next(((name, e.headline) for name, e in evaluators.items() if e.headline), None)


def due(evaluator: Evaluator, step: int, last_step: int) -> bool:
  """Whether a training run evaluates at `step`: every `every_steps` steps and at the last (never with 0)."""
  return bool(evaluator.every_steps) and (step % evaluator.every_steps == 0 or step == last_step)
