"""What a training run tells a person at the console: a short header and a progress line with loss,
images/s, TFLOP/s per device and ETA every few seconds on a terminal (less often into a log file)."""

import sys
import time

from absl import logging

from mixer import flops

TERMINAL_EVERY_S = 5.0  # a person watching
LOG_FILE_EVERY_S = 60.0  # a log file read later


def header(variant: str, num_params: int, mesh_shape: dict, dataset: str, num_train: int, num_eval: int,
           num_classes: int, image_shape: tuple, num_steps: int, batch_size: int, start_step: int) -> str:
  mesh = " x ".join(f"{n} {axis}" for axis, n in mesh_shape.items())
  resume = f", resuming at step {start_step}" if start_step else ""
  return (f"Model {variant}: {num_params / 1e6:.2f}M parameters on a {mesh} mesh\n"
          f"Data {dataset}: {num_train} train / {num_eval} eval images, {num_classes} classes, "
          f"{'x'.join(map(str, image_shape))} input\n"
          f"Training {num_steps} steps of batch {batch_size} ({num_steps * batch_size / max(num_train, 1):.1f} "
          f"epochs){resume}")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  return f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
  """Logs `step/total  loss  acc  img/s  TFLOP/s per device (MFU)  ETA` at most every `every_s` seconds, and
  always at the last step. TFLOP/s with `flops_per_image` (a train step's, per device: mixer/flops.py), MFU
  where the device's `peak` FLOP/s is known.

  Speed and ETA count from the first report on, so that compilation does not distort them.
  """

  def __init__(self, total_steps: int, batch_size: int, every_s: float | None = None, clock=time.monotonic,
               flops_per_image: float | None = None, peak: float | None = None):
    self.total, self.batch, self.clock = total_steps, batch_size, clock
    self.flops_per_image, self.peak = flops_per_image, peak
    self.every_s = every_s if every_s is not None else (TERMINAL_EVERY_S if sys.stderr.isatty() else
                                                        LOG_FILE_EVERY_S)
    self._last_time = self._last_step = None
    self._first_time = self._first_step = None

  def due(self, step: int) -> bool:
    return step == self.total or self._last_time is None or self.clock() - self._last_time >= self.every_s

  def line(self, step: int, metrics: dict) -> str:
    now = self.clock()
    parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
    if "accuracy" in metrics:
      parts.append(f"train acc {metrics['accuracy']:.3f}")
    if self._first_time is not None and step > self._first_step and now > self._first_time:
      per_step = (now - self._first_time) / (step - self._first_step)
      parts.append(f"{self.batch / per_step:,.0f} img/s")
      if self.flops_per_image:
        achieved = self.flops_per_image * self.batch / per_step
        parts.append(flops.format_rate(achieved / 1e12, achieved / self.peak if self.peak else None))
      parts.append(f"ETA {_duration(per_step * (self.total - step))}")
    else:
      self._first_time, self._first_step = now, step
    self._last_time, self._last_step = now, step
    return "  ".join(parts)

  def report(self, step: int, metrics: dict) -> None:
    if self.due(step):
      logging.info("%s", self.line(step, metrics))


def final_message(history: dict, dataset: str, workdir: str) -> str:
  """The line a finished run ends with: its headline result (the evaluator and metric that history["headline"]
  names, at its last evaluation), or what was trained and how to evaluate it, or that nothing was left to train."""
  name, metric = history.get("headline") or (None, None)
  if name and history[name]:
    final = history[name][-1]
    where = f"{dataset}:{final['split']}, " if "split" in final else ""
    count = f", {final['num_examples']} examples" if "num_examples" in final else ""
    label = {"top1": "top-1"}.get(metric, metric)
    return f"Final test {label} ({where}step {final['step']}{count}): {final[metric]:.4f}"
  evaluate = f"`python evaluate.py --workdir {workdir}`"
  if history["start_step"] >= history["final_step"]:
    return f"Nothing to train: the checkpoint in {workdir} is already at step {history['final_step']}. " \
           f"Evaluate it with {evaluate}."
  return (f"Trained steps {history['start_step'] + 1}..{history['final_step']}; no evaluator with a headline result "
          f"ran at the end (config.evals). Evaluate the checkpoint in {workdir} with {evaluate}.")
