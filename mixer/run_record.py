"""A workdir's record of what its run trained on, written when the run starts and never rewritten.

  config.json           the config as the run started
  dataset.json          the dataset's class names and fingerprint (split sizes; a folder's file-list digest)
  config_changes.json   append-only: each change a resume was explicitly allowed to make (step, key, old, new)

A resume compares the config and the dataset with the record: a difference that can change the result is
refused, listing it, unless config.allow_changes names its key; then it is appended to config_changes.json.
config.json records the number of input shards the run reads (config.input_shards, 0 resolved to the process
count at the start), so that a resume on another number of processes reads the same examples in the same order.
Predict, evaluate and fine-tuning read the class names from here, not from the dataset as it is later.
"""

import json
from typing import Any

import jax
from absl import logging
from etils import epath

from mixer import trees

CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
CHANGES_FILE = "config_changes.json"

# Keys that cannot change what the run computes: how often it logs, syncs, checkpoints or evaluates, how many
# checkpoints it keeps, eval batch sizes, where the data lives (its content is checked by the fingerprint), where
# compiled steps are cached, which steps it profiles.
FREE_KEYS = ("log_every_steps", "sync_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "eval_batch_size", "prefetch_to_device", "data_dir", "allow_changes", "compile_cache_dir",
             "profile_start_step", "profile_num_steps")
FREE_SUFFIXES = (".every_steps", ".batch_size")  # of config.evals.NAME
DATASET_KEY = "dataset"  # config.allow_changes=dataset also allows a changed fingerprint of the same name.
INPUT_SHARDS_KEY = "input_shards"


class RunChangedError(ValueError):
  """A resume would change what the run trains on or how, without config.allow_changes naming it."""


def flatten(config) -> dict[str, Any]:
  """{"model.variant": "Ti/4", ...}: a config (ConfigDict or dict) as JSON values under dotted keys."""
  as_dict = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
  return trees.flatten(as_dict, ".", is_leaf=trees.is_not_dict)


def is_free(key: str) -> bool:
  return key in FREE_KEYS or (key.startswith("evals.") and key.endswith(FREE_SUFFIXES))


def allowed_keys(config) -> list[str]:
  """config.allow_changes ("lr,batch_size"; a sub-config's name allows its keys) as a list."""
  return [k.strip() for k in str(config.get("allow_changes", "") or "").split(",") if k.strip()]


def _allows(allowed: list[str], key: str) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allowed)


def _read_json(path: epath.Path, default=None):
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return default
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it is part of the run's record: restore it, or start "
                     f"a new --workdir") from None


def changes(workdir: str) -> list[dict]:
  """The changes allowed on resume so far, oldest first."""
  return _read_json(epath.Path(workdir) / CHANGES_FILE, [])


def saved_config(workdir: str) -> dict | None:
  """The flattened config of the run's steps so far: config.json with every allowed change applied."""
  saved = _read_json(epath.Path(workdir) / CONFIG_FILE)
  if saved is None:
    return None
  flat = flatten(saved)
  for change in changes(workdir):
    if "key" in change and not change["key"].startswith(DATASET_FILE):
      flat[change["key"]] = change["new"]
  return flat


def saved_dataset(workdir: str) -> dict | None:
  """dataset.json with every allowed change applied; None for a run that started before the record existed."""
  record = _read_json(epath.Path(workdir) / DATASET_FILE)
  if record is None:
    return None
  for change in changes(workdir):
    if change.get("key", "").startswith(DATASET_FILE + "."):
      record[change["key"][len(DATASET_FILE) + 1:]] = change["new"]
  return record


def class_names(workdir: str) -> list[str] | None:
  """The class names the run trained with (after config.label_subset); None when its workdir has no record."""
  record = saved_dataset(workdir)
  return None if record is None else list(record["class_names"])


def config_differences(config, saved: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, this config's value)} for each key that differs."""
  here = flatten(config)
  absent = "(absent)"
  return {k: (saved.get(k, absent), here.get(k, absent)) for k in sorted(here.keys() | saved.keys())
          if here.get(k, absent) != saved.get(k, absent)}


def dataset_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (recorded, current)} for each fingerprint field of dataset.json that differs."""
  return {k: (saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys())
          if saved.get(k) != current.get(k)}


def describe(differences: dict[str, tuple[Any, Any]], limit: int = 200) -> str:
  """"lr: 0.003 -> 0.01; batch_size: 128 -> 64", long values cut."""
  cut = lambda v: (s if len(s := json.dumps(v, default=str)) <= limit else s[:limit] + "...")
  return "; ".join(f"{k}: {cut(old)} -> {cut(new)}" for k, (old, new) in differences.items())


def start(config, workdir: str, dataset_record: dict, step: int | None):
  """Records a new run (step None: nothing restored), or checks a resume at `step` against the record; returns
  the run's config with config.input_shards resolved (with_input_shards).

  Raises RunChangedError, before anything is written, when the config or the dataset differs from the
  record in a way that can change the result and config.allow_changes does not name it. An allowed change is
  appended to config_changes.json with its step; config.json and dataset.json are never rewritten.
  """
  path = epath.Path(workdir)
  saved = saved_config(workdir) if step is not None else None
  if saved is not None and not saved.get(INPUT_SHARDS_KEY):  # a record from before the key: one per process.
    saved[INPUT_SHARDS_KEY] = jax.process_count()
  config = with_input_shards(config, saved, workdir, step)
  if saved is None:  # a new run (or one that never reached a checkpoint, whose steps are all redone).
    if step is not None:
      logging.warning("%s has checkpoints but no %s (a run from before the record existed): recording this "
                      "run's config and dataset now, at step %d", workdir, CONFIG_FILE, step)
    _write(path / CONFIG_FILE, config.to_json_best_effort(indent=2))
    _write(path / DATASET_FILE, json.dumps(dataset_record, indent=2))
    return config
  allowed = allowed_keys(config)
  config_changed = {k: v for k, v in config_differences(config, saved).items() if not is_free(k)}
  recorded = saved_dataset(workdir)
  if recorded is None:  # a run from before dataset.json existed: record the dataset as it is now.
    logging.warning("%s has no %s (a run from before the record existed): recording the dataset as it is "
                    "now, at step %d", workdir, DATASET_FILE, step)
    _write(path / DATASET_FILE, json.dumps(dataset_record, indent=2))
    recorded = dataset_record
  data_changed = {f"{DATASET_FILE}.{k}": v for k, v in dataset_differences(recorded, dataset_record).items()}
  refused = [k for k in config_changed if not _allows(allowed, k)]
  if data_changed and not _allows(allowed, DATASET_KEY):
    refused.append(DATASET_KEY)
  if refused:
    lines = [f"resuming {workdir} at step {step} would change what its steps 1..{step} trained with:"]
    if config_changed:
      lines.append(f"config: {describe(config_changed)}")
    if data_changed:
      lines.append(f"dataset {config.dataset!r} differs from the one recorded in {path / DATASET_FILE}: "
                   f"{describe(data_changed)}")
    lines.append(f"To go on with the change, add --config.allow_changes={','.join(refused)} (it is recorded in "
                 f"{path / CHANGES_FILE}); to start afresh, use another --workdir.")
    raise RunChangedError("\n".join(lines))
  new = [{"step": step, "key": k, "old": old, "new": value}
         for k, (old, value) in {**config_changed, **data_changed}.items()]
  if new:
    for change in new:
      logging.warning("Resuming at step %d with %s changed: %s -> %s (allowed by config.allow_changes; recorded "
                      "in %s)", step, change["key"], change["old"], change["new"], path / CHANGES_FILE)
    _write(path / CHANGES_FILE, json.dumps(changes(workdir) + new, indent=2))
  return config


def with_input_shards(config, saved: dict | None, workdir: str, step: int | None):
  """A copy of config with input_shards resolved: as set, else as the run recorded it in `saved` (resuming), else
  one per process. Each process must read a whole number of shards: a resume whose process count does not divide
  the recorded shards is refused in one line, unless config.allow_changes names input_shards (then one shard per
  process, in another order of examples)."""
  processes = jax.process_count()
  shards = config.get(INPUT_SHARDS_KEY, 0)
  if not shards:
    shards = saved[INPUT_SHARDS_KEY] if saved is not None else processes
    if shards % processes and _allows(allowed_keys(config), INPUT_SHARDS_KEY):
      shards = processes
    elif shards % processes:
      raise RunChangedError(
          f"resuming {workdir} at step {step} on {processes} processes cannot keep the order of its training "
          f"examples: it reads them in {shards} input shard{'s' if shards > 1 else ''} (config.input_shards in its "
          f"{CONFIG_FILE}) and each process must read a whole number of them; resume on a number of processes "
          f"that divides {shards}, or "
          f"add --config.allow_changes={INPUT_SHARDS_KEY} to read {processes} shards, one per process, from step "
          f"{step} on (another order of examples, recorded in {CHANGES_FILE})")
  elif shards % processes:
    raise ValueError(f"config.input_shards={shards} is not a multiple of the {processes} processes: each process "
                     f"reads a whole number of shards")
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of the run's {shards} input shards "
                     f"(config.input_shards): each fills an equal block of every batch")
  config = config.copy_and_resolve_references()
  config[INPUT_SHARDS_KEY] = shards
  return config


def _write(path: epath.Path, text: str) -> None:
  """Writes atomically (a temporary file renamed into place), on process 0 only."""
  if jax.process_index() != 0:
    return
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_text(text)
  temporary.replace(path)
