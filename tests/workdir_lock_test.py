"""Tests for mixer/workdir_lock.py: unreadable and stale locks, the heartbeat, and a lock being written now."""

import json
import os
import socket
import threading
import time

import pytest

from mixer import workdir_lock


def _lock(workdir, text, age_s=0.0):
  path = workdir / workdir_lock.LOCK_FILE
  path.write_text(text)
  os.utime(path, (time.time() - age_s, time.time() - age_s))
  return path


@pytest.mark.parametrize("text", ["", "{\"host\": \"node-3\", \"pi"])
def test_an_unreadable_young_lock_names_the_file_to_delete(tmp_path, text):
  path = _lock(tmp_path, text)
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=rf"has a lock that cannot be read \(.*\), last written \d+ s ago, .* delete {path} and"):
    with workdir_lock.held(str(tmp_path)):
      pytest.fail("took a lock that may be live")
  assert path.read_text() == text  # left alone


def test_an_unreadable_lock_older_than_the_heartbeat_allows_is_replaced(tmp_path, caplog):
  path = _lock(tmp_path, "", age_s=workdir_lock.STALE_AFTER_S + 5)
  with caplog.at_level("WARNING"), workdir_lock.held(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert f"Removing the lock {path}: it cannot be read (it is empty) and has not been refreshed" in caplog.text
  assert not path.exists()


def test_another_hosts_lock_is_live_until_its_heartbeat_stops(tmp_path, caplog):
  holder = json.dumps({"host": "node-3", "pid": 1234, "started": "2026-01-01 00:00:00"})
  path = _lock(tmp_path, holder, age_s=workdir_lock.STALE_AFTER_S - 30)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=r"in use by another trainer: host node-3, pid 1234"):
    with workdir_lock.held(str(tmp_path)):
      pass
  _lock(tmp_path, holder, age_s=workdir_lock.STALE_AFTER_S + 5)
  with caplog.at_level("WARNING"), workdir_lock.held(str(tmp_path)):
    assert json.loads(path.read_text())["host"] == socket.gethostname()
  assert f"Removing the stale lock {path} of host node-3, pid 1234: it has not been refreshed for" in caplog.text


def test_a_lock_being_written_by_a_starting_trainer_is_read_once_written(tmp_path):
  path = _lock(tmp_path, "")  # created (O_EXCL) a moment ago; its content follows.
  holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}  # a live process
  writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(holder)))
  writer.start()
  with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by another trainer: .*pid {os.getppid()}"):
    with workdir_lock.held(str(tmp_path)):
      pass
  writer.join()


def test_the_holder_refreshes_its_lock_until_it_releases_it(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  path = tmp_path / workdir_lock.LOCK_FILE
  with workdir_lock.held(str(tmp_path)):
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5
  assert not path.exists()
  assert not [t for t in threading.enumerate() if t.name == "workdir-lock-heartbeat"]
