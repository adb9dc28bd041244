"""What the entry points share: a quiet console (library noise with --verbosity=1), multi-process start,
config files read by path (the default one included) and a run's saved config."""

import contextlib
import importlib.util
import inspect
import json
import logging as std_logging
import os
import re
import sys
import tempfile
import uuid

import ml_collections
from absl import flags, logging
from etils import epath

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")


flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with the cluster's auto-detected "
                  "settings (TPU pods, SLURM, Open MPI, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process job started by "
                    "hand; with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed() -> None:
  """Joins the multi-process job, if this is one: must run before any JAX computation."""
  import jax  # here, not at the top: a bad flag is reported before jax's second of import time.
  if flags.FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                               num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id)
  elif flags.FLAGS.multihost:
    jax.distributed.initialize()
  else:
    start_backends()
    return
  start_backends()
  logging.info("Process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


# Library lines that say nothing to a researcher (TensorFlow's start-up banners; libtpu's complaints on
# a host that is no TPU VM; XLA:CPU's target-feature lines on loading an executable from the compilation cache,
# two per executable): dropped by default, shown with --verbosity=1.
_NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|cpu_feature_guard|"
    r"To enable the following instructions|rebuild TensorFlow with the appropriate|TPU accelerator type|"
    r"TPU_WORKER_HOSTNAMES|TPU worker hostnames|Logging before InitGoogle|Source Location Trace|"
    r"libtpu_init_utils|cpu_aot_loader|^\s*$")
_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mixer/, train.py, evaluate.py
_CHATTY = ("/orbax/", "/jax/", "/jaxlib/", "/tensorflow_datasets/", "/clu/", "/matplotlib/", "/etils/")


def verbose() -> bool:
  """--verbosity=1 (absl's flag) or more: show library logs and native start-up messages."""
  return logging.get_verbosity() >= logging.DEBUG


class _QuietLibraries(std_logging.Filter):
  """Keeps our INFO lines and other libraries' warnings; drops their INFO lines and the warnings that
  orbax, jax, tfds and clu log on every restore or compile."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR or verbose():
      return True
    ours = record.pathname.startswith(_OURS) and "site-packages" not in record.pathname
    if ours:
      return True
    return record.levelno >= std_logging.WARNING and not any(p in record.pathname for p in _CHATTY)


class _Plain(std_logging.Formatter):
  """Messages without absl's prefix (time, thread, file): `WARNING: ...` marks the exceptional ones."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = record.getMessage()
    return message if record.levelno < std_logging.WARNING else f"{record.levelname}: {message}"


@contextlib.contextmanager
def _native_stderr_filtered():
  """Captures what native code writes to stderr meanwhile and passes on all but the known noise."""
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines()
              if not _NATIVE_NOISE.search(line)]
      if kept:
        print("\n".join(kept), file=sys.stderr)


def setup_logging() -> None:
  """A quiet console by default: our lines without absl's prefixes, no library chatter; everything
  with --verbosity=1."""
  handler = logging.get_absl_handler()
  handler.addFilter(_QuietLibraries())
  if not verbose():
    handler.setFormatter(_Plain())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose() else "1")
  # Imported here, after TF_CPP_MIN_LOG_LEVEL is set and inside the filter: TensorFlow prints its start-up
  # banners when it is first imported.
  with _native_stderr_filtered():
    import tensorflow as tf
    import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX.
  if not verbose():
    tfds.disable_progress_bar()


def start_backends() -> None:
  """Starts JAX's backends now (after initialize_distributed), so that their start-up noise is filtered."""
  import jax  # as in initialize_distributed
  with _native_stderr_filtered():
    jax.devices()


def load_config_file(spec: str, flag: str = "--config") -> ml_collections.ConfigDict:
  """get_config() of a config file, by path, as ml_collections' config flag reads `spec` ("file.py" or
  "file.py:arg", the argument passed to get_config). A missing file, a file without get_config, an argument
  to a config that takes none, and a ValueError of get_config (a bad argument) raise in one line naming
  `flag`=`spec`; any other error of the file's own code propagates as it is."""
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{flag}={spec}: no such file {os.path.abspath(path)}")
  module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
  if module_spec is None:
    raise ValueError(f"{flag}={spec}: not a Python file (a config file is a .py file with get_config())")
  module = importlib.util.module_from_spec(module_spec)
  with _package_importable(path):
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
      raise ValueError(f"{flag}={spec}: {path} defines no get_config(), so it is not a config file")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if colon and not takes_arg:
      raise ValueError(f"{flag}={spec}: {path} takes no argument (pass {flag}={path})")
    try:
      return get_config(arg) if colon else get_config()
    except ValueError as e:
      raise ValueError(f"{flag}={spec}: {e}") from e


@contextlib.contextmanager
def _package_importable(path: str):
  """Puts the folder above a config file's folder on sys.path meanwhile, if its folder is a package: our
  configs import each other as the package `configs` (`from configs import default`), which a process
  started outside the repository (an installed mixer, another current directory) cannot find otherwise."""
  folder = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(folder)
  added = os.path.isfile(os.path.join(folder, "__init__.py")) and root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    yield
  finally:
    if added:
      sys.path.remove(root)


def check_writable(directory: str, flag: str, hint: str = "") -> None:
  """Creates `directory` (the value of `flag`, e.g. "--output_dir") if needed, and fails now, in one line
  ending with `hint`, if no file can be written into it: before the work whose results would go there."""
  try:
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)  # local paths and gs:// alike.
    probe = path / f".write_test_{uuid.uuid4().hex[:8]}"  # each process of a job its own, on a shared directory.
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"{flag}={directory} is not writable: {e}{hint}") from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote into its workdir (config.json), over today's defaults."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory that train.py wrote "
                            f"(or pass --config)")
  # The defaults first, so that a workdir written before a field existed still evaluates.
  config = load_config_file(DEFAULT_CONFIG)
  saved = json.loads(path.read_text())
  if "evals" in saved:  # the run's own evaluators, not the defaults' beside them.
    config.evals = ml_collections.ConfigDict(saved.pop("evals"))
  _update(config, saved)
  return config


def _update(config: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _update(config[key], value)
    elif isinstance(value, dict):
      config[key] = ml_collections.ConfigDict(value)
    else:
      with config.ignore_type():
        config[key] = value
