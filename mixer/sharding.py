"""The device mesh and the shardings of batches and parameters."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")


def create_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'model') mesh; one size may be -1 for "all remaining devices"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [mesh_config[a] for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=False))}: sizes must be positive, at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if devices.size % known:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=False))} does not divide {devices.size} devices")
  sizes = [devices.size // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes, strict=False))} needs {np.prod(sizes)} devices, "
                     f"there are {devices.size}")
  # Auto axes: jit's partitioner propagates shardings from the NamedShardings we give it (pjit style).
  return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices.tolist())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the leading axis across every data-parallel device."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
