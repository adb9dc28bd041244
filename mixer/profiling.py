"""A jax.profiler trace of chosen training steps (config.profile_start_step, config.profile_num_steps), written
into the workdir, where TensorBoard's profile tab (and Perfetto, from its .trace.json.gz) reads it."""

import jax
from absl import logging
from etils import epath

PROFILE_DIR = ("plugins", "profile")  # jax.profiler writes LOG_DIR/plugins/profile/RUN/HOST.xplane.pb.


def traced_steps(config, start_step: int, num_steps: int) -> range:
  """The loop steps (numbered from 1) this run traces: config.profile_num_steps from config.profile_start_step
  (0: none), cut at the run's last step; none when the run resumes at or past the first of them: a trace
  holds the steps asked for from their first, or none (the log says why)."""
  first = config.profile_start_step
  if not first:
    return range(0)
  last = first + config.profile_num_steps - 1
  asked = f"config.profile_start_step={first}, profile_num_steps={config.profile_num_steps}"
  if first <= start_step:
    logging.warning("%s: not profiling, this run resumes after step %d (profile_start_step may change on "
                    "resume: set it to a later step to profile this run)", asked, start_step)
    return range(0)
  if first > num_steps:
    logging.warning("%s: not profiling, the run ends at step %d", asked, num_steps)
    return range(0)
  if last > num_steps:
    logging.warning("%s: the run ends at step %d, so the trace ends there", asked, num_steps)
  return range(first, min(last, num_steps) + 1)


class StepTrace:
  """Traces the loop's steps `traced_steps(...)`: `begin(step, state)` before a step, `end(step, state)` at the
  end of its iteration; leaving the `with` block stops a trace that an early stop (SIGTERM, an error) cut short.

  The trace starts once the previous step's device work is done, so none of it is mixed in, and stops once the
  last traced step's is, so the trace holds all of its device work. The loop otherwise waits only every
  steps.sync_every() steps: each edge adds one such wait, and the first traced step starts on an idle device
  (trace a few steps and read the later ones). Every process waits at these edges; only process 0 writes a
  trace (as flax's examples and MaxText by default): each process runs the same program, so one host's
  devices show a step; a slow host shows in process 0's trace as time waiting in collectives.
  """

  def __init__(self, config, workdir: str, start_step: int, num_steps: int):
    self.steps = traced_steps(config, start_step, num_steps)
    self.workdir = epath.Path(workdir)
    self.writes = jax.process_index() == 0
    self.path: epath.Path | None = None  # the trace written, once it is.
    self._running_since = None  # the first traced step while a trace runs.
    self._last_begun = None
    self._before: set[epath.Path] = set()  # the runs under plugins/profile before this trace.
    if self.steps and self.writes:
      logging.info("Profiling steps %d..%d into %s", self.steps[0], self.steps[-1], self.workdir.joinpath(*PROFILE_DIR))

  def __enter__(self) -> "StepTrace":
    return self

  def __exit__(self, *exc_info) -> None:
    if self._running_since is not None:
      self._stop(self._last_begun)

  def begin(self, step: int, state) -> None:
    self._last_begun = step
    if self.steps and step == self.steps[0]:
      jax.block_until_ready(state)  # the previous step's work is not part of the trace.
      if self.writes:
        self._before = set(self._runs())
        jax.profiler.start_trace(str(self.workdir))
        self._running_since = step

  def end(self, step: int, state) -> None:
    if self.steps and step == self.steps[-1]:
      jax.block_until_ready(state)  # the trace holds the last traced step's device work.
      if self._running_since is not None:
        self._stop(step)

  def _runs(self) -> list[epath.Path]:
    directory = self.workdir.joinpath(*PROFILE_DIR)
    return list(directory.iterdir()) if directory.is_dir() else []

  def _stop(self, step: int) -> None:
    jax.profiler.stop_trace()
    first, self._running_since = self._running_since, None
    new = [run for run in self._runs() if run not in self._before] or self._runs()
    files = sorted(f for run in new for f in run.glob("*.xplane.pb"))
    self.path = files[-1] if files else self.workdir.joinpath(*PROFILE_DIR)
    cut = ""
    if step != self.steps[-1]:
      cut = f" (the run stopped at step {step}; asked for {self.steps[0]}..{self.steps[-1]})"
    logging.info("Profiled steps %d..%d%s: %s. View it with `tensorboard --logdir %s` (Profile tab; needs `pip "
                 "install tensorboard-plugin-profile`), or open the .trace.json.gz beside it in "
                 "https://ui.perfetto.dev", first, step, cut, self.path, self.workdir)
