"""The training loop: setup from a config, pre-trained initialisation, periodic eval, checkpoints."""

import json
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from mixer import (
  checkpoints,
  console,
  dataset,
  evaluators,
  input_pipeline,
  models,
  optim,
  sharding,
  steps,
  transfer,
  trees,
  workdir_lock,
)


def validate_config(config, num_devices: int, num_processes: int) -> None:
  """Fails at start, naming the key, on values that would otherwise fail deep inside a run."""
  for key in ("batch_size", "eval_batch_size"):
    if config[key] <= 0 or config[key] % num_devices or config[key] % num_processes:
      raise ValueError(f"config.{key}={config[key]} is not a positive multiple of the "
                       f"{num_devices} devices (and {num_processes} processes)")
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
  for key in ("log_every_steps", "sync_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  for key in ("max_nonfinite_steps", "max_nonfinite_total"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be 0 or more")
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


def create_model(config, info: dataset.DatasetInfo) -> models.MlpMixer:
  """config.model with a head for config.num_classes classes, or for the dataset's."""
  return models.create_model(config.model, config.num_classes or info.num_classes)


def load_pretrained(config, info: dataset.DatasetInfo) -> tuple[ml_collections.ConfigDict, dict | None]:
  """(the run's config, config.init.checkpoint's params with token mixing for the run's token grid).

  A K times larger grid widens token mixing to K^2 D_S hidden units (paper App. C): the run's config is
  then a copy whose model.tokens_mlp_dim says so, and so is its config.json. The caller's config is unchanged.
  """
  patch = models.variant_kwargs(config.model.variant)["patch_size"]
  pretrained, width = transfer.load_for_grid(config.init, (info.image_shape[0] // patch, info.image_shape[1] // patch))
  if width is not None:
    config = config.copy_and_resolve_references()
    config.model.tokens_mlp_dim = width
  return config, pretrained


def save_config(config, workdir: str) -> None:
  """Keeps the run's config beside its checkpoints, so that evaluate.py needs only the workdir."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients stopped being finite (config.nan_policy="stop")."""


def _check_workdir(workdir: str) -> None:
  """Fails at start, not at the first checkpoint, when the workdir cannot be written."""
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)  # local paths and gs:// alike.
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable: {e}") from None


class _Preemption:
  """Turns SIGTERM (how clusters preempt) and a first Ctrl-C (SIGINT) into a flag that the loop checks
  between steps; a second Ctrl-C aborts at once (KeyboardInterrupt), without a checkpoint."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal is not None:
      raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
    self.signal = signum
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: finishing this step, then checkpointing and exiting (Ctrl-C again aborts "
                      "without a checkpoint)")
    else:
      logging.warning("Received signal %d: finishing this step, then checkpointing", signum)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def requested(self, step: int, sync_point: bool) -> bool:
    """Whether to stop after `step`; with several processes, all agree at the sync points only."""
    if jax.process_count() == 1:
      return self.signal is not None
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return bool(np.max(flags))


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest checkpoint in workdir), evaluates; returns the run's history: the
  logged training metrics under "train", and each config.evals evaluator's results under its name.

  On SIGTERM or a first Ctrl-C it checkpoints the step it is in and returns early (history["preempted_at"],
  history["signal"]); on a non-finite loss (config.nan_policy="stop", or more skipped steps than
  config.max_nonfinite_steps allows) it raises NonFiniteLossError and keeps only checkpoints from before
  that step; a save that fails raises checkpoints.CheckpointSaveError. The workdir is locked meanwhile
  (workdir_lock.WorkdirLockedError when another trainer holds it), and its config.json is written only
  once the checkpoint, if any, has restored.
  """
  mesh, builder, info = setup(config)
  config, pretrained = load_pretrained(config, info)
  model = create_model(config, info)
  _check_workdir(workdir)
  with workdir_lock.held(workdir):
    return _train_and_evaluate(config, workdir, mesh, builder, info, model, pretrained)


def _train_and_evaluate(config, workdir: str, mesh, builder, info: dataset.DatasetInfo, model: models.MlpMixer,
                        pretrained: dict | None) -> dict[str, Any]:
  num_steps = total_steps(config, info)
  schedule = optim.create_schedule(config, num_steps)
  tx = optim.create_optimizer(config, schedule)
  state, state_sharding = steps.create_train_state(model, tx, info.image_shape, mesh, config.seed,
                                                   config.param_sharding)

  manager = checkpoints.create_manager(workdir, config)
  try:
    restored_step, restored = checkpoints.restore_latest(manager, checkpoints.abstract(state))
  except checkpoints.CheckpointMismatchError as e:
    manager.close()
    raise checkpoints.CheckpointMismatchError(f"{config_differences(config, workdir)}{e}") from None
  save_config(config, workdir)  # only now: a rerun that cannot use the workdir leaves its config.json alone.
  if restored is not None:
    state = restored
    logging.info("Restored checkpoint from step %d in %s", restored_step, manager.directory)
  elif pretrained is not None:
    params = transfer.init_from_pretrained(pretrained, state.params, model, config.init.new_head,
                                           config.init.checkpoint)
    state = state.replace(params=jax.device_put(params, state_sharding.params))
    logging.info("Initialised from %s (new head: %s)", config.init.checkpoint, config.init.new_head)
  start_step = int(state.step)
  logging.info("%s", console.header(
      config.model.variant, sum(x.size for x in jax.tree.leaves(state.params)), dict(mesh.shape), config.dataset,
      info.num_train_examples, info.num_eval_examples, model.num_classes, info.image_shape, num_steps,
      config.batch_size, start_step))
  if start_step >= num_steps:  # a finished run: no input pipeline, no second TensorBoard events file.
    manager.close()
    return {"train": [], **{name: [] for name in config.evals}, "final_step": start_step}

  progress = console.Progress(num_steps, config.batch_size)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  train_step = steps.make_train_step(config, model, tx, schedule, model.num_classes, state_sharding, mesh)
  evals = evaluators.from_config(config, model, mesh, state_sharding.params, builder)
  batches = input_pipeline.train_iterator(config, builder, info, mesh, start_step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  rng = jax.random.key(config.seed + 1)

  history = {"train": [], **{name: [] for name in evals}}
  pending = []  # (step, metrics) not yet fetched from the devices.
  skipped = NonFiniteCount(config, manager)

  def flush_metrics() -> None:
    """Fetches pending metrics (a host sync), logs their mean, and applies the non-finite guard."""
    nonlocal pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, fetched, strict=True):
      if m["nonfinite"] and config.nan_policy == "stop":
        checkpoints.wait_until_saved(manager)  # checkpoints of earlier steps complete; none is written after.
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
            f"the newest checkpoint in {manager.directory} is from step {manager.latest_step()}. "
            f"config.nan_policy='skip' skips such updates instead.")
      skipped.update(step, m)
    last = pending[-1][0]
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    summary["nonfinite"] = float(np.sum([m["nonfinite"] for m in fetched]))
    writer.write_scalars(last, {f"train/{k}": v for k, v in summary.items()})
    history["train"].append({"step": last, **summary})
    progress.report(last, summary)
    pending = []

  with _Preemption() as preemption:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next(batches), rng)
      pending.append((step, metrics))
      checkpoints.raise_if_save_failed(manager)
      for hook in hooks:
        hook(step)
      sync_point = step % config.sync_every_steps == 0
      if step % config.log_every_steps == 0 or step == num_steps:
        flush_metrics()
      elif sync_point:
        jax.block_until_ready(metrics)
      for name, evaluator in evals.items():
        if evaluators.due(evaluator, step, num_steps):
          results = evaluator.run(state.params)
          scalars = evaluator.scalars(results)
          writer.write_scalars(step, {f"{name}/{k}": v for k, v in scalars.items()})
          logging.info("Step %d: %s %s", step, name, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
          history[name].append({"step": step, **results})
      preempted = preemption.requested(step, sync_point or step % config.log_every_steps == 0)
      if step % config.checkpoint_every_steps == 0 or step == num_steps or preempted:
        flush_metrics()  # never checkpoint a state that came from a non-finite step.
        checkpoints.save(manager, step, state)
      if preempted:
        checkpoints.wait_until_saved(manager)
        logging.warning("%s at step %d: checkpoint %s is complete; rerun the same command to resume.",
                        "Interrupted (Ctrl-C)" if preemption.signal == signal.SIGINT else "Preempted", step,
                        manager.directory / str(step))
        history["preempted_at"] = step
        history["signal"] = preemption.signal
        break

  checkpoints.wait_until_saved(manager)
  manager.close()
  writer.flush()
  writer.close()
  history["final_step"] = int(state.step)
  return history


class NonFiniteCount:
  """config.nan_policy="skip": warns at each skipped step, and stops like "stop" past
  config.max_nonfinite_steps in a row or config.max_nonfinite_total in this run."""

  def __init__(self, config, manager):
    self.config, self.manager = config, manager
    self.in_a_row = self.total = 0

  def update(self, step: int, metrics: dict) -> None:
    if not metrics["nonfinite"]:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("Step %d: non-finite loss or gradients (loss=%s, grad_norm=%s); update skipped (%d in a row, "
                    "%d in this run)", step, metrics["loss"], metrics["grad_norm"], self.in_a_row, self.total)
    for key, count, what in (("max_nonfinite_steps", self.in_a_row, "in a row"),
                             ("max_nonfinite_total", self.total, "in this run")):
      if count > self.config[key]:
        checkpoints.wait_until_saved(self.manager)
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {step}: {count} steps {what} skipped, more than "
            f"config.{key}={self.config[key]}; the newest checkpoint in {self.manager.directory} is from step "
            f"{self.manager.latest_step()}. Lower config.lr or raise config.{key}.")


def config_differences(config, workdir: str) -> str:
  """Names each config key whose value differs from the workdir's config.json; "" without a config.json."""
  path = epath.Path(workdir) / "config.json"
  try:
    saved = _flatten(json.loads(path.read_text()))
  except (OSError, ValueError):
    return ""
  here = _flatten(json.loads(config.to_json_best_effort()))
  keys = sorted(k for k in here.keys() | saved.keys() if here.get(k, "(absent)") != saved.get(k, "(absent)"))
  if not keys:
    return f"{path} has the same config; "
  return (f"this run's config differs from {path} (the config of its checkpoints) in: " + ", ".join(
      f"{k}={here.get(k, '(absent)')!r} (saved: {saved.get(k, '(absent)')!r})" for k in keys) + ".\n")


def _flatten(config: dict) -> dict:
  return trees.flatten(config, ".", is_leaf=trees.is_not_dict)
