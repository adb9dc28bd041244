"""What stops a run early: preemption and Ctrl-C requests, and the non-finite loss policy."""

import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mixer import checkpoints


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients stopped being finite (config.nan_policy="stop")."""


class StopRequested(Exception):
  """A stop request (SIGTERM, Ctrl-C) arrived during an evaluation, which was abandoned for it."""


class Preemption:
  """Turns SIGTERM (how clusters preempt) and a first Ctrl-C (SIGINT) into a flag that the loop checks
  between steps, and evaluators between batches; a Ctrl-C after either aborts at once (exit 130), without a
  checkpoint.

  Python runs signal handlers only in the main thread between bytecodes: while that thread waits in native
  code (a jitted step, a device transfer, tf.data, an XLA compile) they wait too, and two Ctrl-C meanwhile
  reach the handler as one. Every signal is also written to a wakeup pipe (signal.set_wakeup_fd), which a
  watcher thread reads: it counts each one as it comes, and aborts on the second.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None
    self.stopping = False  # once requested() said so: all processes agreed to stop.
    self._previous = {}
    self._wakeup = None  # (read fd, write fd, the wakeup fd it replaced, watcher thread) while entered.

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)  # the C-level handler must never block.
      replaced = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      watcher = threading.Thread(target=self._watch, args=(read_fd,), name="ctrl-c-watcher", daemon=True)
      watcher.start()
      self._wakeup = (read_fd, write_fd, replaced, watcher)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal is not None:
      if self._wakeup is not None:
        return  # the watcher aborts (it has seen this Ctrl-C too): one way out, one message.
      raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
    self.signal = signum
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: finishing this step, then checkpointing and exiting (Ctrl-C again aborts "
                      "without a checkpoint)")
    else:
      logging.warning("Received signal %d: finishing this step, then checkpointing", signum)

  def _watch(self, read_fd: int) -> None:
    """Reads the signal numbers that the C-level handler writes, one byte per delivery; aborts on a Ctrl-C
    that follows an earlier SIGTERM or Ctrl-C."""
    seen = False
    try:
      while data := os.read(read_fd, 64):  # empty once __exit__ closes the write end.
        for signum in data:
          if signum == signal.SIGINT and seen:
            prog = os.path.basename(sys.argv[0])
            os.write(2, f"{prog}: error: aborted by a second Ctrl-C: steps since the newest complete checkpoint "
                        f"are lost\n".encode())
            os._exit(130)  # 128 + SIGINT; at once, whatever the main thread is waiting for.
          seen = seen or signum in self.SIGNALS
    finally:
      os.close(read_fd)

  def __exit__(self, *exc):
    if self._wakeup is not None:
      _, write_fd, replaced, watcher = self._wakeup
      signal.set_wakeup_fd(replaced)
      os.close(write_fd)
      watcher.join()
      self._wakeup = None
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def requested(self, step: int, sync_point: bool) -> bool:
    """Whether to stop after `step`; with several processes, all agree at the sync points only (and every
    process must make the same calls). Once true, it stays true."""
    if not self.stopping:
      if jax.process_count() == 1:
        self.stopping = self.signal is not None
      elif sync_point:
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        self.stopping = bool(np.max(flags))
    return self.stopping


def until_stopped(batches: Iterable, stop: Callable[[int], bool] | None) -> Iterator:
  """The batches, but StopRequested before the i-th one (1, 2, ...) when stop(i) says so."""
  iterator = iter(batches)
  for i in itertools.count(1):
    if stop is not None and stop(i):
      raise StopRequested(f"stop requested before batch {i}")
    try:
      batch = next(iterator)
    except StopIteration:
      return
    yield batch


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
