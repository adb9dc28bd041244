"""Orbax checkpoints of the train state under <workdir>/checkpoints: periodic, async, keep last K.

Also what keeps a workdir safe: failed saves surface at once, damaged steps are moved aside, and a
lock lets one trainer at a time use the workdir.
"""

import contextlib
import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mixer import sharding

DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/, so that orbax never lists or deletes what is in it.
LOCK_FILE = "train.lock"


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint holds arrays of another model or optimizer than the one being restored."""


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock."""


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  # The training loop decides when to save (config.checkpoint_every_steps, the last step, SIGTERM).
  # Saves go to a temporary directory that is renamed when complete: a save killed half-way leaves
  # the previous checkpoints intact, and the leftover is removed when the next run starts.
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_directory(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler())


def _directory(workdir: str) -> epath.Path:
  return absolute(workdir) / "checkpoints"


def absolute(path: str) -> epath.Path:
  """A user's path, made absolute as orbax requires (gs:// and the like already are)."""
  return epath.Path(path) if "://" in str(path) else epath.Path(path).absolute()


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of a tree of arrays: what restore lays the arrays out as."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> bool:
  """Starts an async save of `state` as `step`; orbax renames it into place once it is complete.

  The previous save must have succeeded (CheckpointSaveError otherwise): a save started after a failed
  one waits forever for it in orbax's background threads.
  """
  wait_until_saved(manager)
  try:
    return manager.save(step, args=ocp.args.StandardSave(state), force=True)
  except OSError as e:
    raise _save_error(manager, step, e) from e


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Blocks until the pending async save is complete; CheckpointSaveError if it failed."""
  step = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:  # orbax re-raises whatever its background thread raised.
    raise _save_error(manager, step, e) from e


def raise_if_save_failed(manager: ocp.CheckpointManager) -> None:
  """CheckpointSaveError if the last async save has failed; returns at once while one is being written."""
  if not manager.is_saving_in_progress():
    wait_until_saved(manager)


def _save_error(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> CheckpointSaveError:
  complete = [s for s in manager.all_steps() if s != step]
  newest = f"is from step {max(complete)}" if complete else "is none"
  return CheckpointSaveError(
      f"saving checkpoint {manager.directory / str(step)} failed: {type(error).__name__}: {error}. Training "
      f"stopped so that no more steps go unsaved; the newest complete checkpoint {newest}. Free space or fix "
      f"the permissions of {manager.directory}, then rerun the same command to resume.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

  A damaged newer checkpoint (empty, missing files, unreadable arrays) is moved aside into
  <workdir>/checkpoints_damaged with a warning, never deleted. A checkpoint of another model or optimizer
  is a CheckpointMismatchError that lists every differing array.
  """
  restore = lambda step: manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return _newest_that_restores(manager, restore, abstract_state, move_aside=True)


def _newest_that_restores(manager: ocp.CheckpointManager, restore, abstract: Any, move_aside: bool,
                          part=lambda saved: saved) -> tuple[int | None, Any]:
  """Tries the steps newest first; `part` selects what of a saved tree `abstract` describes."""
  directory = epath.Path(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    problem = damage(directory / str(step))
    if problem is None:
      try:
        metadata = manager.item_metadata(step)
        saved = getattr(metadata, "tree", metadata)
        if saved is None:
          raise ValueError("its metadata could not be read")
      except Exception as e:  # a garbled _METADATA: orbax raises json, tensorstore or type errors.
        problem = ("unreadable", f"its metadata cannot be read ({type(e).__name__}: {_first_line(e)})")
    if problem is None:
      try:
        check_shapes(path_shapes(part(saved)), path_shapes(abstract), f"checkpoint {directory / str(step)}")
      except (ValueError, KeyError, TypeError) as e:  # an intact checkpoint of another model: the user's to fix.
        raise CheckpointMismatchError(str(e).strip("'\"")) from None
      try:
        return step, restore(step)
      except Exception as e:  # truncated or garbled array files: tensorstore raises several types.
        problem = ("unreadable", f"its arrays cannot be read ({type(e).__name__}: {_first_line(e)})")
    _report_damaged(manager, step, *problem, move_aside)
  return None, None


def damage(step_dir: epath.Path) -> tuple[str, str] | None:
  """(short reason, description) when an orbax step folder lacks what every complete one has."""
  if not any(step_dir.iterdir()):
    return "empty", "it is empty"
  item = step_dir / "default"
  if not (item / "_METADATA").exists():
    return "no_METADATA", f"{item / '_METADATA'} is missing"
  if any(p.name.startswith("ocdbt.process_") for p in item.iterdir()) and not (item / "manifest.ocdbt").exists():
    return "no_manifest", f"{item / 'manifest.ocdbt'} is missing"
  return None


def _report_damaged(manager: ocp.CheckpointManager, step: int, reason: str, description: str,
                    move_aside: bool) -> None:
  step_dir = epath.Path(manager.directory) / str(step)
  if not move_aside:
    logging.warning("Checkpoint %s is damaged: %s. Skipping it for an older one.", step_dir, description)
    return
  target = step_dir.parent.parent / DAMAGED_DIR / f"{step}-{reason}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target = target.parent / f"{target.name}-{int(time.time())}"
    step_dir.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside damaged checkpoint {step}")
  manager.reload()
  logging.warning("Checkpoint %s is damaged: %s. Moved it to %s (not deleted); trying the next newest.",
                  step_dir, description, target)


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:300] if lines else ""


def path_shapes(tree: Any) -> dict[str, tuple]:
  """{"params/MixerBlock_0/token_mixing/Dense_0/kernel": shape, ...} for any tree of arrays or metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {sharding.path_string(path): tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
          for path, leaf in leaves}


# Pre-trained parameters: our orbax checkpoints and the released .npz files (flat keys joined by "/").

def flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in params.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_npz(params: dict, path: str) -> None:
  """Writes params in the released layout: one array per "/"-joined key."""
  with epath.Path(path).open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flatten(params).items()})


def load_npz(path: str) -> dict:
  try:
    with epath.Path(path).open("rb") as f:
      if f.read(2) != b"PK":  # an .npz is a zip archive; numpy would guess a pickle.
        raise ValueError("it is not a zip archive")
      f.seek(0)
      data = np.load(f, allow_pickle=False)
      return unflatten({k: data[k] for k in data.files})
  except FileNotFoundError:
    raise
  except Exception as e:  # numpy raises several types for truncated or foreign files.
    raise ValueError(f"{path} is not a readable .npz of parameters: {type(e).__name__}: {e}") from None


def restore_params(path: str, abstract_params: Any = None) -> tuple[int, Any]:
  """(step, params) of the newest checkpoint of a workdir (or of its checkpoints/ folder).

  Only the params are read, not the optimizer state (twice their size for Adam), so a run of any
  optimizer loads. `abstract_params` gives the shapes, dtypes and shardings to restore to (a mismatch
  is an error that lists every differing array); without it the params come back on one device, as saved.
  """
  path = absolute(path)
  directory = path / "checkpoints" if (path / "checkpoints").exists() else path
  if not directory.is_dir():
    raise FileNotFoundError(f"{path} is not a directory of orbax checkpoints (nor a .npz file)")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  if abstract_params is None:
    # Whatever mesh it was saved from, onto one device: the shapes come from the newest intact step.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        metadata = manager.item_metadata(step) if damage(directory / str(step)) is None else None
        saved = getattr(metadata, "tree", metadata)["params"] if metadata is not None else None
      except Exception:  # a damaged step; _newest_that_restores below names it.
        saved = None
      if saved is not None:
        abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved,
                                       is_leaf=lambda m: hasattr(m, "shape"))
        break
  item = {"params": abstract_params}
  restore = lambda step: manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  newest = max(manager.all_steps(), default=None)
  step, restored = (None, None) if abstract_params is None else _newest_that_restores(
      manager, restore, item, move_aside=False, part=lambda saved: {"params": saved["params"]})
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no orbax checkpoint in {directory}" if newest is None else
                            f"no checkpoint in {directory} restores (each is damaged; see the warnings)")
  if step != newest:
    logging.warning("Using checkpoint step %d, the newest that restores in %s", step, directory)
  return step, restored["params"]


def load_orbax_params(path: str) -> tuple[int, dict]:
  """(step, params) of the newest checkpoint of a workdir (or of its checkpoints/ folder), as numpy."""
  step, params = restore_params(path)
  return step, jax.device_get(params)


def load_pretrained(path: str) -> dict:
  """Params in the released layout from a .npz file or an orbax workdir; scanned blocks are unstacked."""
  from mixer import models
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"{path} does not exist")
  is_npz = str(path).endswith(".npz") or not epath.Path(path).is_dir()  # a file can only be an .npz.
  params = load_npz(path) if is_npz else load_orbax_params(path)[1]
  return models.unstack_blocks(params) if "MixerBlocks" in params else params


def check_params(params: dict, expected: dict, source: str) -> None:
  """Raises one error that lists every missing, unexpected and mis-shaped parameter."""
  check_shapes(path_shapes(params), path_shapes(expected), source)


def check_shapes(got: dict[str, tuple], want: dict[str, tuple], source: str) -> None:
  problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k} has shape {got[k]}, the model needs {want[k]}" for k in sorted(want.keys() & got.keys())
               if got[k] != want[k]]
  if problems:
    raise ValueError(f"{source} does not fit the model ({len(problems)} problems):\n  " + "\n  ".join(problems))


def block_diagonal_token_mixing(params: dict, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> dict:
  """Initialises token mixing for a K times larger token grid (paper App. C).

  The new grid is split into K x K contiguous parts of the old grid's size; each part's tokens, in
  their own row-major order, get a copy of the pre-trained token MLP, so the new MLP mixes every part
  exactly as the pre-trained one mixed a whole image. Biases are tiled.
  """
  (h, w), (nh, nw) = old_grid, new_grid
  if nh % h or nw % w or nh // h != nw // w:
    raise ValueError(f"token grid {new_grid} is not an integer multiple K of the pre-trained {old_grid} "
                     f"(resolution ratio must be an integer; or use config.init.token_mixing='resample')")
  k = nh // h
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  parts = [((i * h + rows) * nw + (j * w + cols)).ravel() for i in range(k) for j in range(k)]
  out = {key: value for key, value in params.items() if not key.startswith("MixerBlock_")}
  for name, block in params.items():
    if not name.startswith("MixerBlock_"):
      continue
    tm = block["token_mixing"]
    k0, b0 = tm["Dense_0"]["kernel"], tm["Dense_0"]["bias"]
    k1, b1 = tm["Dense_1"]["kernel"], tm["Dense_1"]["bias"]
    hidden = k0.shape[1]
    new_k0 = np.zeros((nh * nw, k * k * hidden), k0.dtype)
    new_k1 = np.zeros((k * k * hidden, nh * nw), k1.dtype)
    new_b1 = np.zeros((nh * nw,), b1.dtype)
    for p, tokens in enumerate(parts):
      units = slice(p * hidden, (p + 1) * hidden)
      new_k0[tokens, units] = k0
      new_k1[units, tokens] = k1
      new_b1[tokens] = b1
    out[name] = {**block, "token_mixing": {"Dense_0": {"kernel": new_k0, "bias": np.tile(b0, k * k)},
                                           "Dense_1": {"kernel": new_k1, "bias": new_b1}}}
  return out


def to_timm_state_dict(params: dict) -> dict[str, np.ndarray]:
  """Our (released-layout) params as the state dict of timm's MlpMixer (mixer_*_224), as numpy arrays.

  Dense kernels are [in, out] here and [out, in] in torch; the stem conv is HWIO here, OIHW there.
  """
  from mixer import models
  params = models.unstack_blocks(params) if "MixerBlocks" in params else params
  p = {k: np.asarray(v) for k, v in flatten(params).items()}
  out = {"stem.proj.weight": p["stem/kernel"].transpose(3, 2, 0, 1), "stem.proj.bias": p["stem/bias"],
         "norm.weight": p["pre_head_layer_norm/scale"], "norm.bias": p["pre_head_layer_norm/bias"]}
  if "head/kernel" in p:
    out.update({"head.weight": p["head/kernel"].T, "head.bias": p["head/bias"]})
  names = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2", "token_mixing": "mlp_tokens",
           "channel_mixing": "mlp_channels"}
  blocks = sorted({k.split("/")[0] for k in p if k.startswith("MixerBlock_")}, key=lambda k: int(k.split("_")[1]))
  for i, block in enumerate(blocks):
    for ours, theirs in names.items():
      if ours.startswith("LayerNorm"):
        out[f"blocks.{i}.{theirs}.weight"] = p[f"{block}/{ours}/scale"]
        out[f"blocks.{i}.{theirs}.bias"] = p[f"{block}/{ours}/bias"]
        continue
      for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[f"blocks.{i}.{theirs}.{fc}.weight"] = p[f"{block}/{ours}/{dense}/kernel"].T
        out[f"blocks.{i}.{theirs}.{fc}.bias"] = p[f"{block}/{ours}/{dense}/bias"]
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def resample_token_mixing(params: dict, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> dict:
  """Token mixing for any new token grid: every token axis of the token MLP is treated as a 2-D patch
  grid and resized bilinearly (e.g. 224px -> 128px fine-tuning with patch 16: 14x14 -> 8x8 tokens).

  The first layer's weights are scaled by old/new token count, so that its pre-activations (a sum
  over tokens) keep their size; the hidden width D_S is unchanged.
  """
  import jax.numpy as jnp
  (h, w), (nh, nw) = old_grid, new_grid
  scale = (h * w) / (nh * nw)
  resize = lambda x, shape: np.asarray(jax.image.resize(jnp.asarray(x), shape, method="bilinear", antialias=True))
  out = {}
  for name, block in params.items():
    if not name.startswith("MixerBlock_"):
      out[name] = block
      continue
    tm = block["token_mixing"]
    k0, k1, b1 = tm["Dense_0"]["kernel"], tm["Dense_1"]["kernel"], tm["Dense_1"]["bias"]
    hidden = k0.shape[1]
    new_k0 = resize(k0.reshape(h, w, hidden), (nh, nw, hidden)).reshape(nh * nw, hidden) * scale
    new_k1 = resize(k1.reshape(hidden, h, w), (hidden, nh, nw)).reshape(hidden, nh * nw)
    new_b1 = resize(b1.reshape(h, w), (nh, nw)).reshape(nh * nw)
    dense_0 = {"kernel": new_k0.astype(k0.dtype), "bias": tm["Dense_0"]["bias"]}
    dense_1 = {"kernel": new_k1.astype(k1.dtype), "bias": new_b1.astype(b1.dtype)}
    out[name] = {**block, "token_mixing": {"Dense_0": dense_0, "Dense_1": dense_1}}
  return out


# One trainer per workdir: two would delete each other's checkpoints (keep last K) and race at every save.

@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds <workdir>/train.lock (host, pid, start time) while the block runs; process 0 takes it.

  A lock whose process is gone (same host, pid not running) is stale: it is replaced, with a warning.
  On local and network file systems the lock is created atomically (O_EXCL). On object stores (gs://)
  there is no atomic create: the lock is written and read back, so two trainers started within the
  same second may both pass, and a lock left by a killed run on another host must be removed by hand.
  """
  path = epath.Path(workdir) / LOCK_FILE
  error = None
  if jax.process_index() == 0:
    try:
      _acquire(path)
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:  # every process fails when process 0 could not take the lock.
    locked = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(locked) and error is None:
      error = WorkdirLockedError(f"--workdir={workdir} is in use by another trainer (see process 0's error)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if jax.process_index() == 0:
      _release(path)


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _acquire(path: epath.Path) -> None:
  me = _holder()
  for _ in range(2):  # a second try after removing a stale lock.
    if _create_exclusive(path, json.dumps(me)):
      return
    try:
      holder = json.loads(path.read_text())
    except (OSError, ValueError):  # removed meanwhile, or half-written by a trainer starting now.
      time.sleep(1)
      holder = json.loads(path.read_text()) if path.exists() else {}
    if holder and not _is_stale(holder):
      raise WorkdirLockedError(
          f"--workdir={path.parent} is in use by another trainer: host {holder.get('host')}, pid "
          f"{holder.get('pid')}, since {holder.get('started')} ({path}). Two trainers on one workdir delete "
          f"each other's checkpoints: stop that one first, or, if it is no longer running, delete {path}.")
    if holder:
      logging.warning("Removing the stale lock %s of host %s, pid %s: that process is not running.",
                      path, holder.get("host"), holder.get("pid"))
      path.unlink(missing_ok=True)
  raise WorkdirLockedError(f"could not take the lock {path}: another trainer keeps creating it")


def _create_exclusive(path: epath.Path, text: str) -> bool:
  if "://" in str(path):  # object stores: no O_EXCL; write, then check that ours is what is there.
    if path.exists():
      return False
    path.write_text(text)
    return path.read_text() == text
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def _is_stale(holder: dict) -> bool:
  """Whether the holder is a process of this host that is no longer running (another host's is never)."""
  if holder.get("host") != socket.gethostname():
    return False
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's.
    return False
  try:  # a zombie (exited, not yet reaped by its parent) is not running either.
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return False


def _release(path: epath.Path) -> None:
  try:
    holder = json.loads(path.read_text())
    if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
      path.unlink()
  except (OSError, ValueError):  # already gone; nothing to release.
    pass
