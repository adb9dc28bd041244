"""The device mesh, and how batches, parameters and optimizer state are laid out on it (and moved onto it).

Parameters get logical axis names from their path (the released names, so the table below reads like
the model); config.param_sharding maps logical names to mesh axes. Presets: "replicated" (pure data
parallel), "fsdp" (every parameter and its optimizer state split over "data"), "tensor" (the MLPs'
hidden units split over "model"), "fsdp_tensor" (both); or explicit rules "embed=data,mlp=model".
"""

import collections
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer import trees

AXES = ("data", "model")

# (path regex, logical axes). Optimizer-state leaves mirror the param paths, so they match too.
LOGICAL_AXES = (
    (r"stem/kernel$", (None, None, None, "embed")),
    (r"token_mixing/Dense_0/kernel$", ("tokens", "tokens_mlp")),
    (r"token_mixing/Dense_0/bias$", ("tokens_mlp",)),
    (r"token_mixing/Dense_1/kernel$", ("tokens_mlp", "tokens")),
    (r"token_mixing/Dense_1/bias$", ("tokens",)),
    (r"channel_mixing/Dense_0/kernel$", ("embed", "mlp")),
    (r"channel_mixing/Dense_0/bias$", ("mlp",)),
    (r"channel_mixing/Dense_1/kernel$", ("mlp", "embed")),
    (r"head/kernel$", ("embed", "classes")),
    (r"head/bias$", ("classes",)),
    (r"(LayerNorm_\d|pre_head_layer_norm)/(scale|bias)$|stem/bias$|channel_mixing/Dense_1/bias$", ("embed",)),
)

PRESETS = {
    "replicated": "",
    "fsdp": "embed=data,tokens_mlp=data",
    "tensor": "mlp=model,tokens_mlp=model",
    "fsdp_tensor": "embed=data,mlp=model,tokens_mlp=model",
}


def mesh_sizes(mesh_config, num_devices: int) -> dict[str, int]:
  """{'data': D, 'model': M} of config.mesh on num_devices, with a -1 ("all remaining devices") resolved."""
  sizes = [mesh_config[a] for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))}: sizes must be positive, at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))} needs a multiple of {known} devices, "
                     f"there are {num_devices}")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=True))} needs {np.prod(sizes)} devices, "
                     f"there are {num_devices}")
  return dict(zip(AXES, sizes, strict=True))


def create_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'model') mesh; one size may be -1 for "all remaining devices"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_config, devices.size)
  # Auto axes: jit's partitioner propagates shardings from the NamedShardings we give it (pjit style).
  mesh = jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices.tolist())
  check_data_shards_per_process(mesh.devices, sizes)
  return mesh


def check_data_shards_per_process(devices: np.ndarray, sizes: dict) -> None:
  """Each process reads its own examples, so the devices of one data shard (a row along 'model') must all
  belong to one process; otherwise "replicated" copies would hold different examples."""
  rows = np.moveaxis(devices, AXES.index("data"), 0).reshape(devices.shape[AXES.index("data")], -1)
  for row in rows:
    processes = sorted({d.process_index for d in row})
    if len(processes) > 1:
      raise ValueError(f"config.mesh={sizes}: one data shard spans the devices of processes {processes}; "
                       f"make the 'model' axis fit in one process's {len(row) // len(processes)} devices")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the leading axis across the data-parallel devices."""
  return NamedSharding(mesh, P("data"))


def global_batches(local_batches: Iterator[dict], mesh: Mesh, depth: int) -> Iterator[dict[str, jax.Array]]:
  """Global arrays, split over the data axis, from each process's batches; `depth` batches stay in flight to
  the devices while the host prepares the next."""
  data = batch_sharding(mesh)
  queue = collections.deque()
  for local in local_batches:
    with jax.transfer_guard_host_to_device("allow"):  # the one transfer the training loop means to make.
      queue.append({k: jax.make_array_from_process_local_data(data, v) for k, v in local.items()})
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def roll_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
  """jnp.roll(x, 1, axis=0) for a batch split over the mesh's "data" axis in contiguous blocks: each block moves
  down one row and takes its first row from the block before it, so one row per device crosses devices (the
  partitioner's jnp.roll moved whole blocks, and the TPU compiler took seconds over it). The same values."""
  n = mesh.shape["data"]
  if n == 1:
    return jnp.roll(x, 1, axis=0)

  def shift(block):
    carried = jax.lax.ppermute(block[-1:], "data", [(i, (i + 1) % n) for i in range(n)])
    return jnp.concatenate([carried, block[:-1]], axis=0)

  return jax.shard_map(shift, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def parse_rules(param_sharding: str) -> dict[str, str]:
  """config.param_sharding (a preset or "logical=mesh_axis,...") -> {logical: mesh axis}."""
  spec = PRESETS.get(param_sharding, param_sharding)
  rules = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    logical, _, axis = item.partition("=")
    if axis not in AXES or not logical:
      raise ValueError(f"config.param_sharding={param_sharding!r}: {item!r} is not LOGICAL=MESH_AXIS with "
                       f"MESH_AXIS one of {AXES}; presets: {', '.join(PRESETS)}")
    rules[logical] = axis
  return rules


def logical_axes(path: str, ndim: int) -> tuple:
  """The logical axis names of the leaf at `path`; a scanned (stacked) leaf has a leading None."""
  for pattern, axes in LOGICAL_AXES:
    if re.search(pattern, path):
      return (None,) * (ndim - len(axes)) + axes if ndim >= len(axes) else (None,) * ndim
  return (None,) * ndim


def tree_shardings(tree: Any, mesh: Mesh, rules: dict[str, str]) -> Any:
  """NamedShardings for every leaf of a params/train-state tree of arrays or ShapeDtypeStructs.

  A dimension that its mesh axis does not divide stays replicated (logged), so one rule serves
  every variant.
  """
  def spec(keys, leaf):
    path = trees.path_string(keys)
    axes = logical_axes(path, leaf.ndim)
    dims = []
    for size, name in zip(leaf.shape, axes, strict=True):
      axis = rules.get(name)
      if axis is not None and (size % mesh.shape[axis] or axis in dims):
        logging.info("Not sharding %s dim %s (%d) over %s (%d devices)", path, name, size, axis, mesh.shape[axis])
        axis = None
      dims.append(axis)
    return NamedSharding(mesh, P(*dims))
  return jax.tree_util.tree_map_with_path(spec, tree)
