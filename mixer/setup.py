"""From a config to a run: validation, the workdir's checks, data facts, device mesh, model, pre-trained
initialisation, and the run's record (mixer/run_record.py). train_lib, evaluate.py and the TPU check start here."""

import math

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from mixer import compilation, dataset, evaluators, input_pipeline, models, run_record, sharding, steps, transfer

# Values that train without an error but cannot be right: a negative learning rate is gradient ascent.
# A clip norm of 0 zeroes every update (optax.clip_by_global_norm); the loop always clips.
_POSITIVE = ("lr", "grad_clip_norm")
_NON_NEGATIVE = ("weight_decay", "warmup_steps", "mixup")


def validate_config(config, num_devices: int, num_processes: int) -> None:
  """Fails at start, naming the key, on values that would otherwise fail deep inside a run, or train
  without an error and give a wrong result."""
  for key in ("batch_size", "eval_batch_size"):
    if config[key] <= 0 or config[key] % num_devices or config[key] % num_processes:
      raise ValueError(f"config.{key}={config[key]} is not a positive multiple of the "
                       f"{num_devices} devices (and {num_processes} processes)")
  if config.input_shards < 0 or (config.input_shards and config.batch_size % config.input_shards):
    raise ValueError(f"config.input_shards={config.input_shards} is not 0 (one per process) or a positive divisor of "
                     f"config.batch_size={config.batch_size}")
  for key in _POSITIVE:
    if not 0 < config[key] < math.inf:  # also NaN.
      raise ValueError(f"config.{key}={config[key]} must be positive and finite")
  for key in _NON_NEGATIVE:
    if not 0 <= config[key] < math.inf:
      raise ValueError(f"config.{key}={config[key]} must be 0 or more and finite")
  for key in ("b1", "b2", "momentum"):  # decay rates: 1 or more never forgets, and diverges.
    if not 0 <= config.optim[key] < 1:
      raise ValueError(f"config.optim.{key}={config.optim[key]} is not in [0, 1)")
  for key in ("shuffle_buffer", "max_labels"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if config.prefetch_to_device < 0:
    raise ValueError(f"config.prefetch_to_device={config.prefetch_to_device} must be 0 or more")
  if config.total_steps <= 0 and not 0 < config.total_epochs < math.inf:
    raise ValueError(f"config.total_epochs={config.total_epochs} must be positive and finite (or set "
                     f"config.total_steps)")
  data_size = sharding.mesh_sizes(config.mesh, num_devices)["data"]  # each data shard's rows are split.
  if config.grad_accum_steps <= 0 or (config.batch_size // data_size) % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} does not divide the batch of each of "
                     f"the {data_size} data shards, {config.batch_size // data_size} "
                     f"(config.batch_size={config.batch_size})")
  sharding.parse_rules(config.param_sharding)
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.nan_policy={config.nan_policy!r} is not one of stop, skip")
  if config.loss not in steps.LOSSES:
    raise ValueError(f"config.loss={config.loss!r} is not one of {', '.join(steps.LOSSES)}")
  if config.model.dtype not in ("float32", "bfloat16"):  # float16 would need loss scaling: not offered.
    raise ValueError(f"config.model.dtype={config.model.dtype!r} is not one of float32, bfloat16 "
                     f"(float16 gradients underflow without loss scaling; use bfloat16)")
  for key in ("dropout_rate", "stoch_depth"):
    if not 0.0 <= config.model[key] < 1.0:
      raise ValueError(f"config.model.{key}={config.model[key]} is not in [0, 1)")
  if models.variant_kwargs(config.model.variant)["patch_size"] <= 0:
    raise ValueError(f"config.model.variant={config.model.variant!r}: the patch size must be positive")
  if dataset.label_subset(config) == []:
    raise ValueError(f"config.label_subset={config.label_subset!r} selects no class (FIRST-LAST needs FIRST <= LAST)")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if config.profile_start_step < 0:
    raise ValueError(f"config.profile_start_step={config.profile_start_step} must be a step (the first is 1) or 0 "
                     f"(no trace)")
  if config.profile_num_steps < 1:
    raise ValueError(f"config.profile_num_steps={config.profile_num_steps} must be 1 or more")
  for key in ("max_nonfinite_steps", "max_nonfinite_total"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be 0 or more")
  compilation.validate(config.compile_cache_dir)
  evaluators.validate(config)


def total_steps(config, info: dataset.DatasetInfo) -> int:
  if config.total_steps > 0:
    return config.total_steps
  if config.total_epochs <= 0:
    raise ValueError("set config.total_steps or config.total_epochs to a positive value")
  return max(1, round(config.total_epochs * info.num_train_examples / config.batch_size))


def setup(config) -> tuple[jax.sharding.Mesh, tfds.core.DatasetBuilder, dataset.DatasetInfo]:
  """Checks the config; (the device mesh, config.dataset's prepared builder, its facts): where training and
  evaluation start."""
  validate_config(config, jax.device_count(), jax.process_count())
  mesh = sharding.create_mesh(config.mesh)
  builder = dataset.get_builder(config)
  return mesh, builder, dataset.get_info(config, builder)


def eval_data(config, builder, info: dataset.DatasetInfo, mesh, progress: bool = False) -> evaluators.Data:
  """What the evaluators read of the run's data: its facts, and each split batched by config.pp_eval."""
  return evaluators.Data(info=info, builder=builder, loss=config.loss, data_dir=config.data_dir, mesh=mesh,
                         batches=lambda split: input_pipeline.eval_iterator(config, builder, info, mesh, split),
                         progress=progress)


def create_model(config, info: dataset.DatasetInfo) -> models.MlpMixer:
  """config.model with a head for config.num_classes classes, or for the dataset's."""
  return models.create_model(config.model, config.num_classes or info.num_classes)


def load_pretrained(config, info: dataset.DatasetInfo) -> tuple[ml_collections.ConfigDict, dict | None]:
  """(the run's config, config.init.checkpoint's params with token mixing for the run's token grid).

  A K times larger grid widens token mixing to K^2 D_S hidden units (paper App. C): the run's config is
  then a copy whose model.tokens_mlp_dim says so, and so is its config.json. The caller's config is unchanged.
  A workdir's head kept for this dataset (config.init.new_head=False) must have been trained on its classes.
  """
  if config.init.checkpoint and not config.init.new_head:
    check_same_classes(config.init.checkpoint, info.class_names, "config.init.checkpoint",
                       "Use a new head (config.init.new_head=True) or the run's own dataset.")
  patch = models.variant_kwargs(config.model.variant)["patch_size"]
  pretrained, width = transfer.load_for_grid(config.init, (info.image_shape[0] // patch, info.image_shape[1] // patch))
  if width is not None:
    config = config.copy_and_resolve_references()
    config.model.tokens_mlp_dim = width
  return config, pretrained


def check_same_classes(workdir: str, class_names, what: str, remedy: str) -> None:
  """Fails when the run recorded in `workdir` trained on other classes (or another order) than `class_names`:
  its head's outputs would be read as the wrong classes. Nothing to check for a .npz or an unrecorded run."""
  recorded = run_record.class_names(workdir) if epath.Path(workdir).is_dir() else None
  if recorded is not None and list(recorded) != list(class_names):
    differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(recorded, class_names, strict=False)) if a != b]
    raise ValueError(
        f"{what}={workdir} was trained on {len(recorded)} classes that differ from this dataset's "
        f"{len(class_names)} ({'; '.join(differ[:5]) or 'a different count'}; recorded in its "
        f"{run_record.DATASET_FILE}): its head would name the wrong classes. {remedy}")


def warn_if_data_changed(workdir: str, info: dataset.DatasetInfo) -> bool:
  """Says so (and returns True) when the data differs from what the run recorded in `workdir` trained on, beyond
  the class names (check_same_classes): split sizes, a folder's files. Nothing to compare for a .npz."""
  recorded = run_record.saved_dataset(workdir) if epath.Path(workdir).is_dir() else None
  if recorded is None:
    return False
  differences = {k: v for k, v in run_record.dataset_differences(recorded, info.fingerprint).items()
                 if k != "class_names"}
  if differences:
    logging.warning("%s is not the data that the run in %s trained on (%s; recorded in its %s): using it as it "
                    "is now", info.name, workdir, run_record.describe(differences), run_record.DATASET_FILE)
  return bool(differences)


def check_workdir(workdir: str) -> None:
  """Fails at start, not at the first checkpoint, when the workdir cannot be written."""
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)  # local paths and gs:// alike.
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable: {e}") from None


def config_differences(config, workdir: str) -> str:
  """Names each config key whose value differs from the workdir's recorded config; "" without a record."""
  try:
    saved = run_record.saved_config(workdir)
  except ValueError:
    saved = None
  if saved is None:
    return ""
  path = epath.Path(workdir) / run_record.CONFIG_FILE
  differences = run_record.config_differences(config, saved)
  if not config.get("input_shards"):  # 0: as the run recorded it.
    differences.pop("input_shards", None)
  if not differences:
    return f"{path} has the same config; "
  return (f"this run's config differs from {path} (the config of its checkpoints) in: " + ", ".join(
      f"{k}={new!r} (saved: {old!r})" for k, (old, new) in differences.items()) + ".\n")

