"""Tests for mixer/guards.py: stop requests (SIGTERM, Ctrl-C) and the batches an evaluation abandons for them."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mixer import guards
from tests.conftest import REPO


def test_a_first_ctrl_c_asks_the_loop_to_stop():
  with guards.Preemption() as preemption:
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
    except KeyboardInterrupt:
      pytest.fail("the first Ctrl-C raised instead of asking the loop to checkpoint")
    assert preemption.signal == signal.SIGINT and preemption.requested(step=1, sync_point=False)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit
  assert signal.set_wakeup_fd(-1) == -1  # and the wakeup pipe removed


def test_until_stopped_asks_before_each_batch():
  asked = []
  assert list(guards.until_stopped("abc", lambda i: asked.append(i) or False)) == ["a", "b", "c"]
  assert asked == [1, 2, 3, 4]
  with pytest.raises(guards.StopRequested, match="before batch 2"):
    list(guards.until_stopped("abc", lambda i: i == 2))


# Waits in native code for seconds (a jitted loop, fetched as the training loop fetches its metrics).
_BUSY = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from mixer import guards
  busy = jax.jit(lambda x: jax.lax.fori_loop(0, 1600, lambda _, y: jnp.tanh(y @ y), x))
  x = jnp.ones((512, 512)) / 512
  busy.lower(x).compile()
  try:
    with guards.Preemption():
      print("busy", flush=True)
      for _ in range(20):
        np.asarray(busy(x))
  except KeyboardInterrupt:
    sys.exit(130)
  print("finished the work")
""")


@pytest.mark.subprocess
def test_two_ctrl_c_while_busy_in_native_code_abort_at_once():
  # Default signal handling (not a background job's ignored SIGINT), as at a terminal.
  process = subprocess.Popen([sys.executable, "-c", _BUSY], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  try:
    assert process.stdout.readline() == "busy\n", process.stderr.read()
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    sent = time.time()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    elapsed = time.time() - sent
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      "-c: error: aborted by a second Ctrl-C: steps since the newest complete checkpoint are lost")
  assert "finished the work" not in stdout
  assert elapsed < 2, f"exited {elapsed:.1f}s after the second Ctrl-C"


# Process 0 is asked to stop before batch 3 (as SIGTERM would); process 1 never is. Both must abandon at the
# same batch, the next sync point (every 4): an evaluation abandoned by one only would hang the other's
# collectives.
_TWO_PROCESSES = textwrap.dedent("""
  import sys
  import jax
  jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={process_id})
  from mixer import guards
  preemption = guards.Preemption()

  def batches():
    for i in range(1, 100):
      if i == 3 and jax.process_index() == 0:
        preemption.signal = 15
      yield i

  done = []
  try:
    for batch in guards.until_stopped(batches(), lambda i: preemption.requested(i, i % 4 == 0)):
      done.append(batch)
  except guards.StopRequested as e:
    print(jax.process_index(), done[-1], e, flush=True)
""")


@pytest.mark.subprocess
@pytest.mark.multidevice
def test_processes_agree_on_abandoning_an_evaluation():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  processes = [subprocess.Popen(["timeout", "-s", "KILL", "120", sys.executable, "-c",
                                 _TWO_PROCESSES.format(port=port, process_id=i)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate()[0].strip().splitlines()[-1] for p in processes]  # after gloo's own lines
  assert outputs == ["0 3 stop requested before batch 4", "1 3 stop requested before batch 4"], outputs
