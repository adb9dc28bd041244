"""One trainer per workdir: two would delete each other's checkpoints (keep last K) and race at every save.

<workdir>/train.lock names the trainer that holds the workdir (host, pid, start time). The holder refreshes the
file's modification time every HEARTBEAT_S seconds, so a lock that nobody refreshes can be told from a live one
even where its content cannot be read or its process cannot be asked (another host).
"""

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "train.lock"
HEARTBEAT_S = 10  # how often the holder refreshes the lock file's modification time.
# A lock not refreshed for this long has no live holder: a few missed heartbeats, plus clock skew between
# the hosts of a network file system (its server sets the time).
STALE_AFTER_S = 120


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock."""


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """Holds <workdir>/train.lock (host, pid, start time) while the block runs; process 0 takes it.

  A lock whose process is gone (same host, pid not running) is stale: it is replaced, with a warning.
  So is a lock of another host, or one that cannot be read (empty, garbled), that nobody has refreshed for
  STALE_AFTER_S seconds; a younger unreadable one is an error that names the file to delete.
  On local and network file systems the lock is created atomically (O_EXCL). On object stores (gs://)
  there is no atomic create: the lock is written and read back, so two trainers started within the
  same second may both pass.
  """
  path = epath.Path(workdir) / LOCK_FILE
  error = None
  if jax.process_index() == 0:
    try:
      _acquire(path)
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:  # every process fails when process 0 could not take the lock.
    locked = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(locked) and error is None:
      error = WorkdirLockedError(f"--workdir={workdir} is in use by another trainer (see process 0's error)")
  if error is not None:
    raise error
  heartbeat = _Heartbeat(path) if jax.process_index() == 0 else None
  try:
    yield
  finally:
    if heartbeat is not None:
      heartbeat.stop()
      _release(path)


class _Heartbeat:
  """A daemon thread that refreshes the lock file's modification time every HEARTBEAT_S seconds until stop()."""

  def __init__(self, path: epath.Path):
    self.path, self._stopped = path, threading.Event()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    failing = False
    while not self._stopped.wait(HEARTBEAT_S):
      try:
        _touch(self.path)
        failing = False
      except OSError as e:  # deleted by hand, or a flaky disk: the lock may look stale to others, nothing worse.
        if not failing:
          logging.warning("Could not refresh the lock %s: %s", self.path, e)
        failing = True

  def stop(self) -> None:
    self._stopped.set()
    self._thread.join()


def _touch(path: epath.Path) -> None:
  if "://" in str(path):  # object stores have no utime: rewriting the object renews its time.
    path.write_text(path.read_text())
  else:
    os.utime(path)


def _age_s(path: epath.Path) -> float | None:
  """Seconds since the lock file was last written or refreshed; None when it is gone."""
  try:
    return max(0.0, time.time() - path.stat().mtime)
  except (OSError, FileNotFoundError):
    return None


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _acquire(path: epath.Path) -> None:
  me = _holder()
  for _ in range(2):  # a second try after removing a stale lock.
    if _create_exclusive(path, json.dumps(me)):
      return
    holder, problem = _read(path)
    if problem is not None:  # maybe half-written by a trainer starting right now: it writes within microseconds.
      time.sleep(1)
      holder, problem = _read(path)
    age = _age_s(path)
    if age is None:  # removed meanwhile: try again.
      continue
    if problem is not None:
      if age <= STALE_AFTER_S:
        raise WorkdirLockedError(
            f"--workdir={path.parent} has a lock that cannot be read ({problem}), last written {age:.0f} s ago, "
            f"so a trainer may be starting or running there; if none is, delete {path} and rerun.")
      logging.warning("Removing the lock %s: it cannot be read (%s) and has not been refreshed for %.0f s (a "
                      "running trainer refreshes it every %d s).", path, problem, age, HEARTBEAT_S)
    else:
      stale = _stale(holder, age)
      if stale is None:
        raise WorkdirLockedError(
            f"--workdir={path.parent} is in use by another trainer: host {holder.get('host')}, pid "
            f"{holder.get('pid')}, since {holder.get('started')} ({path}). Two trainers on one workdir delete "
            f"each other's checkpoints: stop that one first, or, if it is no longer running, delete {path}.")
      logging.warning("Removing the stale lock %s of host %s, pid %s: %s.", path, holder.get("host"),
                      holder.get("pid"), stale)
    path.unlink(missing_ok=True)
  raise WorkdirLockedError(f"could not take the lock {path}: another trainer keeps creating it")


def _read(path: epath.Path) -> tuple[dict, str | None]:
  """(holder, None), or ({}, what is wrong) for a lock that cannot be read."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return {}, None
  except OSError as e:
    return {}, f"{type(e).__name__}: {e}"
  if not text.strip():
    return {}, "it is empty"
  try:
    holder = json.loads(text)
  except ValueError:
    return {}, f"it is not the JSON a trainer writes: {text[:40]!r}"
  if not isinstance(holder, dict):
    return {}, f"it is not the JSON a trainer writes: {text[:40]!r}"
  return holder, None


def _create_exclusive(path: epath.Path, text: str) -> bool:
  if "://" in str(path):  # object stores: no O_EXCL; write, then check that ours is what is there.
    if path.exists():
      return False
    path.write_text(text)
    return path.read_text() == text
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _stale(holder: dict, age_s: float) -> str | None:
  """Why the lock has no live holder: a process of this host that is no longer running, or, of another host
  (whose processes cannot be asked), a lock not refreshed for STALE_AFTER_S seconds. None: it may be live."""
  if holder.get("host") != socket.gethostname():
    return f"it has not been refreshed for {age_s:.0f} s" if age_s > STALE_AFTER_S else None
  not_running = "that process is not running"
  try:
    pid = int(holder.get("pid", -1))
  except (TypeError, ValueError):
    return not_running
  if pid <= 0:
    return not_running
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return not_running
  except PermissionError:  # alive, another user's.
    return None
  try:  # a zombie (exited, not yet reaped by its parent) is not running either.
    return not_running if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z" else None
  except OSError:
    return None


def _release(path: epath.Path) -> None:
  try:
    holder = json.loads(path.read_text())
    if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
      path.unlink()
  except (OSError, ValueError):  # already gone; nothing to release.
    pass
