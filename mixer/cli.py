"""What train.py and evaluate.py share: quieter library logs and the default config's path."""

import json
import logging as std_logging
import os

import ml_collections
from absl import flags, logging
from etils import epath

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")
_CHATTY = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")


flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with the cluster's auto-detected "
                  "settings (TPU pods, SLURM, Open MPI, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process job started by "
                    "hand; with --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed() -> None:
  """Joins the multi-process job, if this is one: must run before any JAX computation."""
  import jax
  if flags.FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=flags.FLAGS.coordinator_address,
                               num_processes=flags.FLAGS.num_processes, process_id=flags.FLAGS.process_id)
  elif flags.FLAGS.multihost:
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


class _QuietLibraries(std_logging.Filter):
  """Drops INFO records from libraries that log every checkpoint write and compile."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def setup_logging() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote into its workdir (config.json), over today's defaults."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory that train.py wrote "
                            f"(or pass --config)")
  # The defaults first, so that a workdir written before a field existed still evaluates.
  from configs import default
  config = default.get_config()
  _update(config, json.loads(path.read_text()))
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
