"""Trees named by the paths of their leaves: "MixerBlock_0/token_mixing/Dense_0/kernel", the released
checkpoints' keys, and "model.variant" for configs; shapes compared leaf by leaf."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def path_string(keys, separator: str = "/") -> str:
  """A tree path (dict keys, attributes, indices) as one string."""
  return separator.join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def has_shape(x: Any) -> bool:
  """Arrays, ShapeDtypeStructs and orbax's array metadata: the leaves of params and train states."""
  return hasattr(x, "shape")


def is_not_dict(x: Any) -> bool:
  """Config values (numbers, strings, tuples, None): the leaves of a config's nested dicts."""
  return not isinstance(x, dict)


def flatten(tree: Any, separator: str = "/", is_leaf: Callable[[Any], bool] = has_shape) -> dict[str, Any]:
  """{path: leaf} for every leaf of a tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_string(path, separator): leaf for path, leaf in leaves}


def unflatten(flat: dict[str, Any], separator: str = "/") -> dict:
  """The nested dicts that `flatten` came from."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(separator)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def check_shapes(got: Any, want: Any, source: str) -> None:
  """Raises one error that lists every missing, unexpected and mis-shaped leaf of `got` against `want`."""
  got, want = ({k: tuple(np.shape(v)) for k, v in flatten(tree).items()} for tree in (got, want))
  problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k} has shape {got[k]}, the model needs {want[k]}" for k in sorted(want.keys() & got.keys())
               if got[k] != want[k]]
  if problems:
    raise ValueError(f"{source} does not fit the model ({len(problems)} problems):\n  " + "\n  ".join(problems))
