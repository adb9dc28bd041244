"""Evaluators chosen by config.evals, as big_vision's: one module per type, one config entry per evaluator.

  config.evals.eval = ConfigDict(dict(type="classification", split="test", every_steps=100))
An entry's name is its TensorBoard prefix (eval/top1) and its key in the training history and in
evaluate.py's JSON; `type` names a module here; `every_steps` runs it every N training steps and at the
last (0: only from evaluate.py); the other keys are the type's own (its module's KEYS).

Each type's Evaluator is built from (name, its config entry, the whole config, the model, the mesh, the
params' sharding, the dataset's tfds builder) and has run(params, stop=None) -> results (JSON-able; stop(i),
asked before the i-th batch of each pass over a split and with i=0 between datasets, abandons the evaluation
with guards.StopRequested when true; every process asks at the same points),
scalars(results) -> {metric: float} (written as NAME/metric), summary(results, step) -> the text
evaluate.py prints, and file_tag() -> what names its results in evaluate.py's JSON file name.
"""

from collections.abc import Callable
from typing import Any, Protocol

from mixer.evaluators import classification, fewshot

TYPES = {"classification": classification, "fewshot": fewshot}
# Taken by the training metrics (train/...), the training history and evaluate.py's JSON.
RESERVED_NAMES = ("train", "step", "dataset", "final_step", "preempted_at", "signal")
# Config keys that config.evals replaced: a config.json from before then fails with this hint.
_REPLACED = {"eval_split": "config.evals.eval.split", "eval_every_steps": "config.evals.eval.every_steps",
             "fewshot": "config.evals.fewshot"}


class Evaluator(Protocol):
  every_steps: int

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


def from_config(config, model, mesh, params_sharding, builder, names=None, progress: bool = False
                ) -> dict[str, Evaluator]:
  """The evaluators of config.evals (only `names` when given, in config order) for the model on the mesh."""
  validate(config)
  return {name: TYPES[settings.type].Evaluator(name, settings, config, model, mesh, params_sharding, builder,
                                               progress=progress)
          for name, settings in config.evals.items() if names is None or name in names}


def due(evaluator: Evaluator, step: int, last_step: int) -> bool:
  """Whether a training run evaluates at `step`: every `every_steps` steps and at the last (never with 0)."""
  return bool(evaluator.every_steps) and (step % evaluator.every_steps == 0 or step == last_step)
