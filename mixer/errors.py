"""How train.py and evaluate.py end on an error a user can fix: one line naming the flag, key or file.

The full traceback is printed with --verbose (and logged at debug level).
"""

import difflib
import os
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_bool("verbose", False, "On an error, print its full traceback, not only its one-line message.")

# Errors of bad input: flags, config values, files, the workdir. Our own exception types count too.
_USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, app.UsageError)
_EXIT_WAIT_S = 5  # for background threads (an async checkpoint save) to finish before exiting.


def define_config_file(name: str, default: str | None, help_string: str, **kwargs) -> None:
  """config_flags.DEFINE_config_file, with an unknown --config.KEY reported in one line.

  ml_collections applies --config.KEY overrides as soon as the flag is defined (at import), so an
  unknown key fails there with a bare AttributeError.
  """
  message = missing_config_file(name, sys.argv)
  if message:
    _exit(None, message, 2)
  try:
    config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:
    _exit(e, unknown_config_key(name, default, sys.argv) or f"{type(e).__name__}: {e}", 2)


def run(main) -> None:
  """app.run(main), ending on a user's error with one line (exit 1) and on Ctrl-C with exit 130."""
  try:
    app.run(main)
  except KeyboardInterrupt:
    _exit(None, "aborted by Ctrl-C: steps since the newest complete checkpoint are lost", 130)
  except Exception as e:
    if isinstance(e, (AttributeError, KeyError)):
      message = unknown_config_key("config", None, sys.argv)
      if message:
        _exit(e, message, 2)
    if not isinstance(e, _USER_ERRORS) and not type(e).__module__.startswith("mixer."):
      raise
    _exit(e, f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e), 1)


def missing_config_file(name: str, argv: list[str]) -> str | None:
  """'--config=PATH: no such file' when argv names a config file that is not there.

  ml_collections would report it only when the config is first read, or mid-traceback.
  """
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{name}=") or arg == f"--{name}":
      path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
      file = path.split(":", 1)[0]  # "file.py:arg" passes arg to get_config.
      if not os.path.isfile(file):
        return f"--{name}={path}: no such file {os.path.abspath(file)}"
  return None


def unknown_config_key(name: str, default: str | None, argv: list[str]) -> str | None:
  """'unknown config key foo; did you mean ...' for the first --NAME.KEY in argv that the config lacks."""
  path = default
  overrides = []
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{name}=") or arg == f"--{name}":
      path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    elif arg.startswith((f"--{name}.", f"--no{name}.")):
      overrides.append(arg.split("=", 1)[0].split(".", 1)[1])
  if not overrides or not path:
    return None
  try:
    config = config_flags.config_flags.ConfigFileFlagParser(name).parse(path)
    config.keys()
  except Exception:  # the config file itself does not load: that error is reported where it is read.
    return None
  for key in overrides:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      children = list(node.keys()) if hasattr(node, "keys") else []
      if part not in children:
        parent = ".".join(parts[:depth])
        close = difflib.get_close_matches(part, children, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(f'--{name}.' + '.'.join([*parts[:depth], c]) for c in close)}?" \
            if close else f"; {name}{'.' + parent if parent else ''} has no key like it"
        return f"unknown config key {key} (--{name}.{key}){hint}"
      node = node[part]
  return None


def _exit(error: BaseException | None, message: str, code: int) -> None:
  prog = os.path.basename(sys.argv[0])
  verbose = "--verbose" in sys.argv
  if error is not None:
    details = "".join(traceback.format_exception(error))
    logging.debug("%s", details)
    if verbose:
      sys.stderr.write(details)
  sys.stderr.write(f"{prog}: error: {message}" + ("" if verbose or error is None else
                                                  "  (--verbose shows the traceback)") + "\n")
  sys.stderr.flush()
  sys.stdout.flush()
  # A failed async save can leave orbax threads waiting for signals that never come; they must not keep a
  # cluster job alive. A save still being written gets a few seconds to complete.
  others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
  for thread in others:
    try:
      thread.join(timeout=_EXIT_WAIT_S / max(1, len(others)))
    except Exception:  # orbax's threads raise what they raised, or TimeoutError.
      pass
  if any(t.is_alive() for t in others):
    os._exit(code)
  sys.exit(code)
