"""What stops a run early: preemption and Ctrl-C requests, and the non-finite loss policy."""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixer import checkpoints


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients stopped being finite (config.nan_policy="stop")."""


class Preemption:
  """Turns SIGTERM (how clusters preempt) and a first Ctrl-C (SIGINT) into a flag that the loop checks
  between steps; a second Ctrl-C aborts at once (KeyboardInterrupt), without a checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal is not None:
      raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
    self.signal = signum
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: finishing this step, then checkpointing and exiting (Ctrl-C again aborts "
                      "without a checkpoint)")
    else:
      logging.warning("Received signal %d: finishing this step, then checkpointing", signum)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def requested(self, step: int, sync_point: bool) -> bool:
    """Whether to stop after `step`; with several processes, all agree at the sync points only."""
    if jax.process_count() == 1:
      return self.signal is not None
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return bool(np.max(flags))


class NonFiniteCount:
  """config.nan_policy="skip": warns at each skipped step, and stops like "stop" past
  config.max_nonfinite_steps in a row or config.max_nonfinite_total in this run."""

  def __init__(self, config, manager):
    self.config, self.manager = config, manager
    self.in_a_row = self.total = 0

  def update(self, step: int, metrics: dict) -> None:
    if not metrics["nonfinite"]:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("Step %d: non-finite loss or gradients (loss=%s, grad_norm=%s); update skipped (%d in a row, "
                    "%d in this run)", step, metrics["loss"], metrics["grad_norm"], self.in_a_row, self.total)
    for key, count, what in (("max_nonfinite_steps", self.in_a_row, "in a row"),
                             ("max_nonfinite_total", self.total, "in this run")):
      if count > self.config[key]:
        checkpoints.wait_until_saved(self.manager)
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {step}: {count} steps {what} skipped, more than "
            f"config.{key}={self.config[key]}; the newest checkpoint in {self.manager.directory} is from step "
            f"{self.manager.latest_step()}. Lower config.lr or raise config.{key}.")
