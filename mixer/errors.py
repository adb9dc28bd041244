"""How train.py and evaluate.py end on an error a user can fix: one line naming the flag, key or file; exit
status 2 for a bad flag or --config argument (checked before any work), 1 for other bad input.

The full traceback is printed with --verbose (and logged at debug level).
"""

import difflib
import os
import re
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from mixer import cli

flags.DEFINE_bool("verbose", False, "On an error, print its full traceback, not only its one-line message.")

# Errors of bad input: flags, config values, files, the workdir. Our own exception types count too.
_USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError, app.UsageError)
_EXIT_WAIT_S = 5  # for background threads (an async checkpoint save) to finish before exiting.


class FlagError(ValueError):
  """A bad flag or config argument: the program ends with its one line and exit status 2."""


def define_config_file(name: str, default: str | None, help_string: str, **kwargs) -> None:
  """config_flags.DEFINE_config_file, with every error of --NAME and --NAME.KEY reported in one line, exit 2.

  ml_collections reads the config file lazily (at import for the default, while parsing flags for --NAME=FILE,
  at first use for an unreadable file) and reports errors there with its own tracebacks; the whole command
  line is checked here first, at import (check_config_args), so that each ends the program at once.
  """
  try:
    check_config_args(name, default, sys.argv)
  except (FlagError, FileNotFoundError) as e:
    # A missing file needs no traceback; the others may come from the config file's own code.
    _exit(None if isinstance(e, FileNotFoundError) else e, str(e), 2)
  try:
    config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:  # what check_config_args did not foresee, still in one line.
    _exit(e, f"--{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 2)


def check_config_args(name: str, default: str | None, argv: list[str]) -> None:
  """Raises FlagError (FileNotFoundError for a missing file) in one line naming the argument, for what would
  make --NAME=FILE[:ARG] --NAME.KEY=VALUE ... fail: a missing file, one without get_config(), a bad or
  unexpected ARG, an error of the file's own code, an unknown KEY (with the nearest keys), or a VALUE that
  does not parse as the key's type."""
  try:
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile, as ml_collections reads it
  except flags.Error as e:
    raise FlagError(_flag_error(e)) from e
  spec, overrides, rest = _config_args(name, argv)
  if spec == "":
    raise FlagError(f"--{name} names no file: pass --{name}=FILE.py (or FILE.py:ARG)")
  spec = spec if spec is not None else default
  if spec is None:
    if overrides:
      raise FlagError(f"--{name}.{overrides[0]} needs --{name}=FILE: there is no config file to override")
    return
  try:
    config = cli.load_config_file(spec, f"--{name}")
  except Exception as e:
    if str(e).startswith(f"--{name}={spec}: "):  # the loader's own one-line errors
      raise (e if isinstance(e, FileNotFoundError) else FlagError(str(e))) from e
    # The config file's own code failed (a syntax error, a missing import, a file it reads, ...).
    raise FlagError(f"--{name}={spec}: {type(e).__name__}: {e}") from e
  if config is None:
    raise FlagError(f"--{name}={spec}: get_config() returned None (a missing return?)")
  message = _unknown_key(name, config, overrides)
  if message:
    raise FlagError(message)
  # The values, parsed by ml_collections' own flags for the config's keys: the same types and the same errors.
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict(name, config, flag_values=values, sys_argv=rest)
    values(rest, known_only=True)
  except flags.Error as e:
    raise FlagError(_flag_error(e, values)) from e


def _config_args(name: str, argv: list[str]) -> tuple[str | None, list[str], list[str]]:
  """(the --NAME value or None, the KEYs of --NAME.KEY / --noNAME.KEY, argv without --NAME and its value)."""
  spec, overrides, rest = None, [], list(argv[:1])
  skip = False
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith((f"-{name}", f"-no{name}.")):  # absl and ml_collections take one dash too.
      arg = "-" + arg
    if skip:
      skip = False
    elif arg.startswith(f"--{name}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{name}":
      spec, skip = (argv[i + 1] if i + 1 < len(argv) else ""), True
    else:
      if arg.startswith((f"--{name}.", f"--no{name}.")):
        overrides.append(arg.split("=", 1)[0].split(".", 1)[1])
      rest.append(arg)
  return spec, overrides, rest


def _unknown_key(name: str, config, overrides: list[str]) -> str | None:
  """'unknown config key foo; did you mean ...' for the first KEY of --NAME.KEY that the config lacks."""
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


def _flag_error(error: Exception, values: flags.FlagValues | None = None) -> str:
  """absl's 'flag --x=v: reason' as '--x=v: reason', naming the type a config key takes."""
  message = str(error).splitlines()[0] if str(error) else type(error).__name__
  message = message.removeprefix("ERROR:: ")  # absl's prefix of a missing --flagfile
  match = re.match(r"flag (--([\w.]+)=.*?): (.*)", message)
  if not match:
    return message
  argument, flag, reason = match.groups()
  kind = values[flag].parser.flag_type() if values is not None and flag in values else None
  if kind not in _KINDS:
    return f"{argument}: {reason}"
  return f"{argument}: {flag if '.' in flag else '--' + flag} takes {_KINDS[kind]}"  # config.KEY or --FLAG


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}


def run(main) -> None:
  """app.run(main), ending on a bad flag with one line (exit 2), on a user's error with one line (exit 1) and
  on Ctrl-C with exit 130."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    _exit(None, "aborted by Ctrl-C: steps since the newest complete checkpoint are lost", 130)
  except Exception as e:
    if isinstance(e, FlagError):
      _exit(e, str(e), 2)
    if not isinstance(e, _USER_ERRORS) and not type(e).__module__.startswith("mixer."):
      raise
    _exit(e, f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e), 1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, ending on a bad flag (an unknown one, a value of the wrong type) in one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(e, _flag_error(e, flags.FLAGS), 2)


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
