"""Orbax checkpoints of the train state under <workdir>/checkpoints: periodic, async, keep last K.

Failed saves surface at once, in one line, damaged steps are moved aside, and the params alone restore for
evaluation.
"""

import errno
import logging as std_logging
import os
import re
import sys
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mixer import trees

DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/, so that orbax never lists or deletes what is in it.


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint holds arrays of another model or optimizer than the one being restored."""


class _SaveWatch(std_logging.Filter):
  """Orbax's background save threads log a failure (each thread its own lines, several per save) long before
  the main thread can see it, and tensorstore then reports a traceback for each write still pending on the
  closed event loop ("RuntimeError: Event loop is closed", hundreds on a full disk). While a save is in
  flight, its error records mark it as failed, so that the loop stops at its next step, and go to the debug
  log with those tracebacks: the failure is reported once, by CheckpointSaveError."""

  def __init__(self):
    super().__init__()
    self.in_flight = self.failed = False
    self._unraisablehook = None

  def install(self) -> None:
    if self._unraisablehook is None:
      logging.get_absl_logger().addFilter(self)
      self._unraisablehook, sys.unraisablehook = sys.unraisablehook, self._quiet_closed_loops

  def filter(self, record: std_logging.LogRecord) -> bool:
    if self.in_flight and record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      self.failed = True
      logging.debug("orbax, saving a checkpoint: %s", record.getMessage())
      return False
    return True

  def _quiet_closed_loops(self, unraisable) -> None:
    # Reported (PyErr_WriteUnraisable) by tensorstore's threads for each write whose asyncio loop a failed
    # save has closed.
    closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
    if self.in_flight and closed_loop and any(frame.name == "call_soon_threadsafe"
                                              for frame in traceback.extract_tb(unraisable.exc_traceback)):
      logging.debug("orbax, saving a checkpoint: a pending write found its event loop closed")
      return
    self._unraisablehook(unraisable)


_WATCH = _SaveWatch()


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  # The training loop decides when to save (config.checkpoint_every_steps, the last step, SIGTERM).
  # Saves go to a temporary directory that is renamed when complete: a save killed half-way leaves
  # the previous checkpoints intact, and the leftover is removed when the next run starts.
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
  _WATCH.install()
  return ocp.CheckpointManager(_directory(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler())


def _directory(workdir: str) -> epath.Path:
  return absolute(workdir) / "checkpoints"


def absolute(path: str) -> epath.Path:
  """A user's path, made absolute as orbax requires (gs:// and the like already are)."""
  return epath.Path(path) if "://" in str(path) else epath.Path(path).absolute()


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of a tree of arrays: what restore lays the arrays out as."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> bool:
  """Starts an async save of `state` as `step`; orbax renames it into place once it is complete.

  The previous save must have succeeded (CheckpointSaveError otherwise): a save started after a failed
  one waits forever for it in orbax's background threads.
  """
  wait_until_saved(manager)
  _WATCH.in_flight, _WATCH.failed = True, False
  try:
    return manager.save(step, args=ocp.args.StandardSave(state), force=True)
  except OSError as e:
    raise _save_error(manager, step, e) from e


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Blocks until the pending async save is complete; CheckpointSaveError if it failed."""
  step = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:  # orbax re-raises whatever its background thread raised.
    raise _save_error(manager, step, e) from e  # in flight still: the rest of its noise stays quiet.
  _WATCH.in_flight = _WATCH.failed = False


def raise_if_save_failed(manager: ocp.CheckpointManager) -> None:
  """CheckpointSaveError as soon as the async save in flight has failed; returns at once while it is being
  written without error."""
  if _WATCH.failed or not manager.is_saving_in_progress():
    wait_until_saved(manager)


def _save_error(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> CheckpointSaveError:
  complete = [s for s in manager.all_steps() if s != step]
  newest = f"is from step {max(complete)}" if complete else "is none"
  return CheckpointSaveError(
      f"saving the checkpoint of step {step} ({manager.directory / str(step)}) failed: {_os_error(error)}. "
      f"Training stopped so that no more steps go unsaved; the newest complete checkpoint {newest}. Free space "
      f"or fix the permissions of {manager.directory}, then rerun the same command to resume.")


def _os_error(error: Exception) -> str:
  """The OS error under a failed save, in one line: tensorstore reports one inside a long message of its own
  (RESOURCE_EXHAUSTED: Error writing ... [os_error_code='28'])."""
  if isinstance(error, OSError):
    return f"{type(error).__name__}: {error}"
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    number = int(code.group(1))
    where = re.search(r'Failed (?:writing|to write[^"]*): "([^"]+)"', str(error))
    return (f"OSError: [Errno {number}] {os.strerror(number)} ({errno.errorcode.get(number, '?')}"
            f"{', writing ' + where.group(1) if where else ''})")
  return f"{type(error).__name__}: {_first_line(error)}"


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

  A damaged newer checkpoint (empty, missing files, unreadable arrays) is moved aside into
  <workdir>/checkpoints_damaged with a warning, never deleted. A checkpoint of another model or optimizer
  is a CheckpointMismatchError that lists every differing array.
  """
  restore = lambda step: manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return _newest_that_restores(manager, restore, abstract_state, move_aside=True)


def _newest_that_restores(manager: ocp.CheckpointManager, restore, abstract: Any, move_aside: bool,
                          part=lambda saved: saved) -> tuple[int | None, Any]:
  """Tries the steps newest first; `part` selects what of a saved tree `abstract` describes."""
  directory = epath.Path(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    problem = damage(directory / str(step))
    if problem is None:
      try:
        metadata = manager.item_metadata(step)
        saved = getattr(metadata, "tree", metadata)
        if saved is None:
          raise ValueError("its metadata could not be read")
      except Exception as e:  # a garbled _METADATA: orbax raises json, tensorstore or type errors.
        problem = ("unreadable", f"its metadata cannot be read ({type(e).__name__}: {_first_line(e)})")
    if problem is None:
      try:
        trees.check_shapes(part(saved), abstract, f"checkpoint {directory / str(step)}")
      except (ValueError, KeyError, TypeError) as e:  # an intact checkpoint of another model: the user's to fix.
        raise CheckpointMismatchError(str(e).strip("'\"")) from None
      try:
        return step, restore(step)
      except Exception as e:  # truncated or garbled array files: tensorstore raises several types.
        problem = ("unreadable", f"its arrays cannot be read ({type(e).__name__}: {_first_line(e)})")
    _report_damaged(manager, step, *problem, move_aside)
  return None, None


def damage(step_dir: epath.Path) -> tuple[str, str] | None:
  """(short reason, description) when an orbax step folder lacks what every complete one has."""
  if not any(step_dir.iterdir()):
    return "empty", "it is empty"
  item = step_dir / "default"
  if not (item / "_METADATA").exists():
    return "no_METADATA", f"{item / '_METADATA'} is missing"
  if any(p.name.startswith("ocdbt.process_") for p in item.iterdir()) and not (item / "manifest.ocdbt").exists():
    return "no_manifest", f"{item / 'manifest.ocdbt'} is missing"
  return None


def _report_damaged(manager: ocp.CheckpointManager, step: int, reason: str, description: str,
                    move_aside: bool) -> None:
  step_dir = epath.Path(manager.directory) / str(step)
  if not move_aside:
    logging.warning("Checkpoint %s is damaged: %s. Skipping it for an older one.", step_dir, description)
    return
  target = step_dir.parent.parent / DAMAGED_DIR / f"{step}-{reason}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target = target.parent / f"{target.name}-{int(time.time())}"
    step_dir.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside damaged checkpoint {step}")
  manager.reload()
  logging.warning("Checkpoint %s is damaged: %s. Moved it to %s (not deleted); trying the next newest.",
                  step_dir, description, target)


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:300] if lines else ""


def restore_params(path: str, abstract_params: Any = None) -> tuple[int, Any]:
  """(step, params) of the newest checkpoint of a workdir (or of its checkpoints/ folder).

  Only the params are read, not the optimizer state (twice their size for Adam), so a run of any
  optimizer loads. `abstract_params` gives the shapes, dtypes and shardings to restore to (a mismatch
  is an error that lists every differing array); without it the params come back on one device, as saved.
  """
  path = absolute(path)
  directory = path / "checkpoints" if (path / "checkpoints").exists() else path
  if not directory.is_dir():
    raise FileNotFoundError(f"{path} is not a directory of orbax checkpoints (nor a .npz file)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  if abstract_params is None:
    # Whatever mesh it was saved from, onto one device: the shapes come from the newest intact step.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        metadata = manager.item_metadata(step) if damage(directory / str(step)) is None else None
        saved = getattr(metadata, "tree", metadata)["params"] if metadata is not None else None
      except Exception:  # a damaged step; _newest_that_restores below names it.
        saved = None
      if saved is not None:
        abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved,
                                       is_leaf=trees.has_shape)
        break
  item = {"params": abstract_params}
  restore = lambda step: manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  newest = max(manager.all_steps(), default=None)
  step, restored = (None, None) if abstract_params is None else _newest_that_restores(
      manager, restore, item, move_aside=False, part=lambda saved: {"params": saved["params"]})
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no orbax checkpoint in {directory}" if newest is None else
                            f"no checkpoint in {directory} restores (each is damaged; see the warnings)")
  if step != newest:
    logging.warning("Using checkpoint step %d, the newest that restores in %s", step, directory)
  return step, restored["params"]
