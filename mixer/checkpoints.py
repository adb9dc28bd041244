"""Orbax checkpoints of the train state under <workdir>/checkpoints: periodic, async, keep last K."""

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  # The training loop decides when to save (config.checkpoint_every_steps and the last step).
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=True, create=True)
  directory = epath.Path(workdir) / "checkpoints"
  if "://" not in str(workdir):  # gs:// and the like are absolute already.
    directory = directory.absolute()
  return ocp.CheckpointManager(directory, options=options)


def abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of a tree of arrays: what restore lays the arrays out as."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> bool:
  """Starts an async save of `state` as `step`; orbax renames it into place once it is complete."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
  """(step, state) of the newest checkpoint, or (None, None) when there is none."""
  step = manager.latest_step()
  if step is None:
    return None, None
  return step, manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
