"""Orbax checkpoints of the train state under <workdir>/checkpoints: periodic, async, keep last K."""

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mixer import sharding


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
  """Starts an async save of `state` as `step`; orbax renames it into place once it is complete."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint, or (None, None) when there is none.

  A checkpoint of another model or optimizer is an error that lists every differing array.
  """
  step = manager.latest_step()
  if step is None:
    return None, None
  metadata = manager.item_metadata(step)
  check_shapes(path_shapes(getattr(metadata, "tree", metadata)), path_shapes(abstract_state),
               f"checkpoint {manager.directory / str(step)}")
  return step, manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


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
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers=ocp.PyTreeCheckpointHandler())
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no orbax checkpoint in {directory}")
  metadata = manager.item_metadata(step)
  saved = getattr(metadata, "tree", metadata)["params"]
  if abstract_params is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # whatever mesh it was saved from.
    abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved,
                                   is_leaf=lambda m: hasattr(m, "shape"))
  check_shapes(path_shapes(saved), path_shapes(abstract_params), f"checkpoint {directory / str(step)}")
  item = {"params": abstract_params}
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  manager.close()
  return step, restored["params"]


def load_orbax_params(path: str) -> tuple[int, dict]:
  """(step, params) of the newest checkpoint of a workdir (or of its checkpoints/ folder), as numpy."""
  step, params = restore_params(path)
  return step, jax.device_get(params)


def load_pretrained(path: str) -> dict:
  """Params in the released layout from a .npz file or an orbax workdir; scanned blocks are unstacked."""
  from mixer import models
  params = load_npz(path) if str(path).endswith(".npz") else load_orbax_params(path)[1]
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
