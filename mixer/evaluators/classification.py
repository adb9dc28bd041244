"""Top-1 and mean loss over every example of a split of the run's dataset (padding masked out), through
the eval preprocessing (config.pp_eval) in batches of config.eval_batch_size.

  config.evals.eval = ConfigDict(dict(type="classification", split="test", every_steps=100))
"""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from mixer import guards, sharding, steps

KEYS = ("split",)


def validate(settings, where: str) -> None:
  if not isinstance(settings.split, str) or not settings.split:
    raise ValueError(f"{where}.split={settings.split!r} must name a split of config.dataset")


def make_eval_step(predict: Callable, loss: str, num_classes: int, mesh, params_sharding=None) -> Callable:
  """Jitted (params, batch) -> sums of correct predictions, loss and real (unpadded) examples, replicated."""
  loss_fn = steps.LOSSES[loss]

  def eval_step(params, batch):
    logits, _ = predict(params, batch["image"])
    targets, mask = steps.to_targets(batch["label"], num_classes), batch["mask"]
    return {"correct": jnp.sum(steps.correct_at_1(logits, targets) * mask),
            "loss": jnp.sum(loss_fn(logits, targets) * mask), "count": jnp.sum(mask)}

  in_shardings = None if params_sharding is None else (params_sharding, sharding.batch_sharding(mesh))
  return jax.jit(eval_step, in_shardings=in_shardings, out_shardings=sharding.replicated(mesh))


def evaluate(eval_step: Callable, params, batches: Iterable) -> dict[str, float]:
  """Top-1 and mean loss over every example the batches hold (padding masked out).

  Waits for the device every steps.sync_every() batches: XLA:CPU meshes deadlock with too many steps in flight,
  and the host should not run unboundedly ahead anyway.
  """
  totals, every = None, steps.sync_every()
  for i, batch in enumerate(batches, 1):
    sums = eval_step(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if i % every == 0:
      jax.block_until_ready(totals)
  totals = jax.device_get(totals)
  return {"top1": float(totals["correct"] / totals["count"]), "loss": float(totals["loss"] / totals["count"]),
          "num_examples": int(totals["count"])}


class Evaluator:
  """Top-1 on settings.split of the run's dataset, from the predict function's logits."""

  headline = "top1"

  def __init__(self, name: str, settings, predict: Callable, data):
    self.split, self.every_steps = settings.split, settings.every_steps
    self.dataset = data.info.name
    data.info.check_split(data.builder, f"evals.{name}.split", self.split)
    self._eval_step = make_eval_step(predict, data.loss, data.info.num_classes, data.mesh)
    self._batches = lambda: data.batches(self.split)

  def run(self, params, stop: Callable[[int], bool] | None = None) -> dict:
    """{"split", "top1", "loss", "num_examples"}; guards.StopRequested when stop(i) is true before a batch."""
    return {"split": self.split, **evaluate(self._eval_step, params, guards.until_stopped(self._batches(), stop))}

  def scalars(self, results: dict) -> dict[str, float]:
    return {k: v for k, v in results.items() if k != "split"}

  def summary(self, results: dict, step) -> str:
    return (f"Top-1 ({self.dataset}:{self.split}, step {step}, {results['num_examples']} examples): "
            f"{results['top1']:.4f}")

  def file_tag(self) -> str:
    """How evaluate.py's JSON file name tells this evaluation apart: the split."""
    return self.split.replace(":", "_")
