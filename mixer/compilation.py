"""Compiling a run's steps once per machine: JAX's persistent compilation cache where config.compile_cache_dir
puts it, and the train step compiled ahead of the loop, timed, with whether it came from that cache.

A restart after preemption, or a resumed run, then loads its executables instead of compiling them again.
"""

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator

import jax
from absl import logging
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from mixer import cli

AUTO, OFF = "auto", "none"
CACHE_FOLDER = "jax_compilation_cache"
_HIT, _REQUEST = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/compile_requests_use_cache"


def cache_dir(setting: str, workdir: str, num_processes: int, given: str | None = None) -> str | None:
  """Where the run's compilation cache is (None: no cache), for config.compile_cache_dir = `setting`:

    "none"  no persistent cache.
    "auto"  `given`, the cache JAX already has (JAX_COMPILATION_CACHE_DIR, jax.config), as someone chose it; else
            beside a gs:// workdir (gs://BUCKET/runs/jax_compilation_cache for gs://BUCKET/runs/NAME): every host
            of a pod reads it, and the bucket outlives the VMs that a preemption takes away; else, for a local
            workdir and one process, $XDG_CACHE_HOME/mixer/jax_compilation_cache (~/.cache/...), the machine's
            own, which every run on it shares (an executable is compiled for the machine that loads it); else
            (several processes, so a workdir they share) beside the workdir, where they all read what process 0
            writes (JAX writes entries from process 0 only).
    a path  there (local or gs://).
  """
  if setting == OFF:
    return None
  if setting != AUTO:
    return setting
  if given:
    return given
  if "://" in workdir:
    return str(epath.Path(workdir.rstrip("/")).parent / CACHE_FOLDER)
  if num_processes > 1:
    return os.path.join(os.path.dirname(os.path.abspath(workdir.rstrip("/"))), CACHE_FOLDER)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mixer", CACHE_FOLDER)


def validate(setting) -> None:
  """Fails at start, naming the key, on a value that is not "auto", "none" or a path."""
  if not isinstance(setting, str) or not setting.strip():
    raise ValueError(f"config.compile_cache_dir={setting!r} must be {AUTO!r}, {OFF!r} or a directory (local or "
                     f"gs://)")


def _use(path: str | None) -> None:
  """Points JAX's cache at `path`. JAX opens its cache once, at the first compile that consults it, and keeps
  that one whatever jax_compilation_cache_dir says later: a different path needs reset_cache() to take effect."""
  if path == jax.config.jax_compilation_cache_dir:
    return
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)


@contextlib.contextmanager
def persistent_cache(setting: str, workdir: str) -> Iterator[str | None]:
  """Uses the cache of config.compile_cache_dir (cache_dir above) meanwhile; yields its path (None: none). The
  process's previous setting is restored after, for callers that train in process (notebooks, tests). A directory
  that cannot be created fails the run when the config names it, and is done without (a warning) when chosen."""
  previous = jax.config.jax_compilation_cache_dir
  path = cache_dir(setting, workdir, jax.process_count(), previous)
  if path is not None:
    try:
      epath.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      if setting != AUTO:
        raise ValueError(f"config.compile_cache_dir={setting} cannot be created: {e}; pass another directory, or "
                         f"{OFF!r}") from None
      logging.warning("No compilation cache: %s cannot be created (%s); config.compile_cache_dir names another",
                      path, e)
      path = None
  _use(path)
  try:
    yield path
  finally:
    _use(previous)


def quiet_cache_loads():
  """Drops what XLA:CPU logs to stderr on loading a cached executable (a target-feature line per load; only
  the quiet console: --verbosity=1 shows it). A no-op on accelerators and without a cache."""
  if jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir:
    return cli._native_stderr_filtered()
  return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Compiled:
  step: Callable  # the compiled executable: called as the jitted function was
  seconds: float  # tracing, lowering and compiling (or loading from the cache)
  from_cache: bool | None  # None: no persistent cache was consulted
  cost: dict  # XLA's cost analysis of the compiled program, per device (flops, bytes accessed, ...)


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program as one dict (per device: flops, bytes accessed, and on TPU the
  compiler's optimal_seconds); jax returns a list of one on some versions and backends, or None."""
  cost = compiled.cost_analysis()
  return dict((cost[0] if isinstance(cost, list) else cost) or {})


def compile_ahead(jitted, *args) -> Compiled:
  """`jitted` lowered and compiled for `args` (arrays, or ShapeDtypeStructs with shardings) now, not at its first
  call. It goes into the persistent cache whatever its compile time (JAX's threshold,
  jax_persistent_cache_min_compile_time_secs, is for the many small programs): it is what a restart waits for.

  Whether it came from the cache, JAX says through jax.monitoring events; only this thread's count, so that a
  compile elsewhere meanwhile does not."""
  thread, events = threading.get_ident(), []

  def listen(event: str, **kwargs) -> None:
    del kwargs
    if event in (_HIT, _REQUEST) and threading.get_ident() == thread:
      events.append(event)

  start = time.monotonic()
  jax.monitoring.register_event_listener(listen)
  threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    with quiet_cache_loads():
      compiled = jitted.lower(*args).compile()
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    jax.monitoring.unregister_event_listener(listen)
  seconds = time.monotonic() - start
  cost = cost_analysis(compiled)
  # JAX asks its cache also when no directory is set (and finds nothing there): no directory, no answer.
  from_cache = (_HIT in events) if _REQUEST in events and jax.config.jax_compilation_cache_dir else None
  logging.debug("Compiled in %.1f s (from the persistent cache: %s); XLA's cost analysis: %.4g FLOPs per device",
                seconds, from_cache, cost.get("flops", float("nan")))
  return Compiled(compiled, seconds, from_cache, cost)


def first_step_line(seconds: float, compiled: Compiled, cache: str | None) -> str:
  """"First step after 12.3 s (compile 8.1 s, from the cache)": the line a run prints once its first train step
  has run, `seconds` after it started."""
  if compiled.from_cache:
    how = "from the cache"
  elif cache is None:
    how = "no compilation cache"
  elif compiled.from_cache is None:
    how = f"not cacheable in {cache}"
  else:  # JAX writes from process 0 only.
    how = f"cached in {cache} for a restart" if jax.process_index() == 0 else f"not in the cache {cache}"
  return f"First step after {seconds:.1f} s (compile {compiled.seconds:.1f} s, {how})"
