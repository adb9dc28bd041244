"""Tests for mixer/profiling.py: which steps a run traces, and a trace of exactly those steps in the workdir's
plugins/profile/RUN/HOST.xplane.pb (TensorBoard's layout). tests/train_lib_test.py traces a real run."""

import glob
import os

import jax
import jax.numpy as jnp

from mixer import profiling
from tests.conftest import small_config


def traces(workdir) -> list[str]:
  return sorted(glob.glob(os.path.join(str(workdir), "plugins", "profile", "*", "*.xplane.pb")))


def traced_train_steps(path: str) -> list[int]:
  """The step_num of each StepTraceAnnotation("train") event in a trace, in order."""
  steps = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      steps += [dict(event.stats)["step_num"] for event in line.events if event.name == "train"]
  return sorted(steps)


def _config(start, num):
  return small_config("unused", profile_start_step=start, profile_num_steps=num)


def test_traced_steps_count_from_one_and_zero_is_off(caplog):
  assert profiling.traced_steps(_config(0, 5), start_step=0, num_steps=100) == range(0)
  assert profiling.traced_steps(_config(1, 1), start_step=0, num_steps=100) == range(1, 2)
  assert profiling.traced_steps(_config(20, 5), start_step=10, num_steps=100) == range(20, 25)
  with caplog.at_level("WARNING"):
    assert profiling.traced_steps(_config(20, 5), start_step=22, num_steps=100) == range(0)
    assert "not profiling, this run resumes after step 22" in caplog.text
    assert profiling.traced_steps(_config(20, 5), start_step=20, num_steps=100) == range(0)  # resumes at 21
    assert profiling.traced_steps(_config(120, 5), start_step=0, num_steps=100) == range(0)
    assert "not profiling, the run ends at step 100" in caplog.text
    assert profiling.traced_steps(_config(98, 5), start_step=0, num_steps=100) == range(98, 101)
    assert "the run ends at step 100, so the trace ends there" in caplog.text


def _loop(trace: profiling.StepTrace, num_steps: int, stop_at: int | None = None) -> None:
  """A training loop's shape: begin, a jitted step under its StepTraceAnnotation, end."""
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
  state = jnp.ones((32, 32))
  with jax.transfer_guard("disallow"), trace:
    for step in range(1, num_steps + 1):
      trace.begin(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state = step_fn(state)
      if step == stop_at:
        break
      trace.end(step, state)


def test_a_trace_holds_exactly_the_steps_asked_for(tmp_path, caplog):
  trace = profiling.StepTrace(_config(3, 2), str(tmp_path), start_step=0, num_steps=8)
  with caplog.at_level("INFO"):
    _loop(trace, 8)
  [path] = traces(tmp_path)
  assert str(trace.path) == path and os.path.getsize(path) > 0
  assert glob.glob(os.path.join(os.path.dirname(path), "*.trace.json.gz"))  # what Perfetto opens
  assert traced_train_steps(path) == [3, 4]
  assert f"Profiled steps 3..4: {path}. View it with `tensorboard --logdir {tmp_path}`" in caplog.text


def test_a_run_stopped_in_the_window_keeps_the_steps_it_traced(tmp_path, caplog):
  with caplog.at_level("INFO"):  # as the loop breaks on SIGTERM, or an error leaves it
    _loop(profiling.StepTrace(_config(2, 5), str(tmp_path), start_step=0, num_steps=8), 8, stop_at=3)
  [path] = traces(tmp_path)
  assert traced_train_steps(path) == [2, 3]
  assert "Profiled steps 2..3 (the run stopped at step 3; asked for 2..6)" in caplog.text


def test_off_writes_nothing(tmp_path):
  _loop(profiling.StepTrace(_config(0, 5), str(tmp_path), start_step=0, num_steps=4), 4)
  assert os.listdir(tmp_path) == []
