"""One trainer per workdir: two would delete each other's checkpoints (keep last K) and race at every save.

<workdir>/train.lock names the trainer that holds the workdir (host, pid, start time).
"""

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock."""


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """Holds <workdir>/train.lock (host, pid, start time) while the block runs; process 0 takes it.

  A lock whose process is gone (same host, pid not running) is stale: it is replaced, with a warning.
  On local and network file systems the lock is created atomically (O_EXCL). On object stores (gs://)
  there is no atomic create: the lock is written and read back, so two trainers started within the
  same second may both pass, and a lock left by a killed run on another host must be removed by hand.
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
  try:
    yield
  finally:
    if jax.process_index() == 0:
      _release(path)


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _acquire(path: epath.Path) -> None:
  me = _holder()
  for _ in range(2):  # a second try after removing a stale lock.
    if _create_exclusive(path, json.dumps(me)):
      return
    try:
      holder = json.loads(path.read_text())
    except (OSError, ValueError):  # removed meanwhile, or half-written by a trainer starting now.
      time.sleep(1)
      holder = json.loads(path.read_text()) if path.exists() else {}
    if holder and not _is_stale(holder):
      raise WorkdirLockedError(
          f"--workdir={path.parent} is in use by another trainer: host {holder.get('host')}, pid "
          f"{holder.get('pid')}, since {holder.get('started')} ({path}). Two trainers on one workdir delete "
          f"each other's checkpoints: stop that one first, or, if it is no longer running, delete {path}.")
    if holder:
      logging.warning("Removing the stale lock %s of host %s, pid %s: that process is not running.",
                      path, holder.get("host"), holder.get("pid"))
      path.unlink(missing_ok=True)
  raise WorkdirLockedError(f"could not take the lock {path}: another trainer keeps creating it")


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


def _is_stale(holder: dict) -> bool:
  """Whether the holder is a process of this host that is no longer running (another host's is never)."""
  if holder.get("host") != socket.gethostname():
    return False
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's.
    return False
  try:  # a zombie (exited, not yet reaped by its parent) is not running either.
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return False


def _release(path: epath.Path) -> None:
  try:
    holder = json.loads(path.read_text())
    if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
      path.unlink()
  except (OSError, ValueError):  # already gone; nothing to release.
    pass
