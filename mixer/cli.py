"""What train.py and evaluate.py share: quieter library logs and the default config's path."""

import logging as std_logging
import os

from absl import logging

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "default.py")
_CHATTY = ("/orbax/", "/jax/_src/", "/tensorflow_datasets/")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO records from libraries that log every checkpoint write and compile."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def setup_logging() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to JAX.
