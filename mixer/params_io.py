"""Parameters in the released checkpoints' layout: one array per "/"-joined key in an .npz file, or the
params of one of our orbax workdirs."""

import jax
import numpy as np
from etils import epath

from mixer import checkpoints, models, trees


def save_npz(params: dict, path: str) -> None:
  """Writes params in the released layout: one array per "/"-joined key."""
  with epath.Path(path).open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in trees.flatten(params).items()})


def load_npz(path: str) -> dict:
  try:
    with epath.Path(path).open("rb") as f:
      if f.read(2) != b"PK":  # an .npz is a zip archive; numpy would guess a pickle.
        raise ValueError("it is not a zip archive")
      f.seek(0)
      data = np.load(f, allow_pickle=False)
      return trees.unflatten({k: data[k] for k in data.files})
  except FileNotFoundError:
    raise
  except Exception as e:  # numpy raises several types for truncated or foreign files.
    raise ValueError(f"{path} is not a readable .npz of parameters: {type(e).__name__}: {e}") from None


def load(path: str) -> dict:
  """Params in the released layout, as numpy, from a .npz file or an orbax workdir; scanned blocks are unstacked."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"{path} does not exist")
  is_npz = str(path).endswith(".npz") or not epath.Path(path).is_dir()  # a file can only be an .npz.
  params = load_npz(path) if is_npz else jax.device_get(checkpoints.restore_params(path)[1])
  return models.unstack_blocks(params) if "MixerBlocks" in params else params
