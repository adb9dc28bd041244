"""Top-1 and mean loss over every example of a split of the config's dataset (padding masked out), through
the eval preprocessing (config.pp_eval) in batches of config.eval_batch_size.

  config.evals.eval = ConfigDict(dict(type="classification", split="test", every_steps=100))
"""

from collections.abc import Callable

from mixer import dataset, guards, input_pipeline, steps

KEYS = ("split",)


def validate(settings, where: str) -> None:
  if not isinstance(settings.split, str) or not settings.split:
    raise ValueError(f"{where}.split={settings.split!r} must name a split of config.dataset")


class Evaluator:
  """Top-1 on settings.split, of the model's logits on the mesh."""

  def __init__(self, name: str, settings, config, model, mesh, params_sharding, builder, progress: bool = False):
    del progress  # one jitted step per batch: fast enough without a progress bar.
    self.split, self.every_steps = settings.split, settings.every_steps
    self.dataset, self.sync_every = config.dataset, config.sync_every_steps
    dataset.check_split(config, builder, f"evals.{name}.split", self.split)
    self._eval_step = steps.make_eval_step(config, model, model.num_classes, params_sharding, mesh)
    self._batches = lambda: input_pipeline.eval_iterator(config, builder, info, mesh, self.split)

  def run(self, params, stop: Callable[[int], bool] | None = None) -> dict:
    """{"split", "top1", "loss", "num_examples"}; guards.StopRequested when stop(i) is true before a batch."""
    batches = guards.until_stopped(self._batches(), stop)
    return {"split": self.split, **steps.evaluate(self._eval_step, params, batches, sync_every=self.sync_every)}

  def scalars(self, results: dict) -> dict[str, float]:
    return {k: v for k, v in results.items() if k != "split"}

  def summary(self, results: dict, step) -> str:
    return (f"Top-1 ({self.dataset}:{self.split}, step {step}, {results['num_examples']} examples): "
            f"{results['top1']:.4f}")

  def file_tag(self) -> str:
    """How evaluate.py's JSON file name tells this evaluation apart: the split."""
    return self.split.replace(":", "_")
