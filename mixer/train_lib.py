"""The training loop: resume, train steps, periodic evaluators and checkpoints, stop requests."""

import itertools
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from mixer import (
  checkpoints,
  compilation,
  console,
  dataset,
  evaluators,
  flops,
  guards,
  input_pipeline,
  models,
  optim,
  profiling,
  run_record,
  setup,
  sharding,
  steps,
  transfer,
  trees,
  workdir_lock,
)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the newest checkpoint in workdir), evaluates; returns the run's history: the
  logged training metrics under "train", and each config.evals evaluator's results under its name.

  On SIGTERM or a first Ctrl-C it checkpoints the step it is in and returns early (history["preempted_at"],
  history["signal"]); on a non-finite loss (config.nan_policy="stop", or more skipped steps than
  config.max_nonfinite_steps allows) it raises NonFiniteLossError and keeps only checkpoints from before
  that step; a save that fails raises checkpoints.CheckpointSaveError. The workdir is locked meanwhile
  (workdir_lock.WorkdirLockedError when another trainer holds it). The run's record (config.json,
  dataset.json) is written, or a resume checked against it (run_record.RunChangedError), only once the
  checkpoint, if any, has restored. history["headline"] names the evaluator and metric of the run's result.
  history["startup"] says how the run started: seconds to its first step, the train step's compile seconds, whether
  it came from the persistent compilation cache (config.compile_cache_dir), and XLA's FLOPs per device of a step.
  """
  started = time.monotonic()
  # The cheap checks first: a workdir that cannot be used fails before the data is read.
  setup.validate_config(config, jax.device_count(), jax.process_count())
  setup.check_workdir(workdir)
  with workdir_lock.held(workdir), compilation.persistent_cache(config.compile_cache_dir, workdir) as cache:
    mesh, builder, info = setup.setup(config)
    config, pretrained = setup.load_pretrained(config, info)
    model = setup.create_model(config, info)
    return _train_and_evaluate(config, workdir, mesh, builder, info, model, pretrained, started, cache)


def _train_and_evaluate(config, workdir: str, mesh, builder, info: dataset.DatasetInfo, model: models.MlpMixer,
                        pretrained: dict | None, started: float, cache: str | None) -> dict[str, Any]:
  num_steps = setup.total_steps(config, info)
  schedule = optim.create_schedule(config, num_steps)
  tx = optim.create_optimizer(config, schedule)
  with compilation.quiet_cache_loads():
    state, state_sharding = steps.create_train_state(model, tx, info.image_shape, mesh, config.seed,
                                                     config.param_sharding)

  manager = checkpoints.create_manager(workdir, config)
  try:
    restored_step, restored = checkpoints.restore_latest(manager, checkpoints.abstract(state))
  except checkpoints.CheckpointMismatchError as e:
    manager.close()
    raise checkpoints.CheckpointMismatchError(f"{setup.config_differences(config, workdir)}{e}") from None
  try:  # only now: a rerun that cannot use the workdir leaves its record alone.
    config = run_record.start(config, workdir, info.fingerprint, restored_step)  # config.input_shards resolved.
  except Exception:
    manager.close()
    raise
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
    return {"train": [], **{name: [] for name in config.evals}, "start_step": start_step, "final_step": start_step,
            "headline": None}

  flops_per_image = flops.train_flops_per_image(model, info.image_shape) / jax.device_count()  # per device
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  progress = console.Progress(num_steps, config.batch_size, flops_per_image=flops_per_image, peak=peak)
  utilization = flops.Utilization(flops_per_image * config.batch_size, peak)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  train_step = steps.make_train_step(config, model, tx, schedule, model.num_classes, state_sharding, mesh)
  data = setup.eval_data(config, builder, info, mesh)
  evals = evaluators.from_config(config.evals, steps.make_predict_fn(model), data)
  headline = evaluators.headline(evals)
  batches = input_pipeline.train_iterator(config, builder, info, mesh, start_step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  # Made where the compiled step takes it (replicated over the mesh), also across processes: no transfer in the loop.
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=sharding.replicated(mesh))()

  history = {"train": [], **{name: [] for name in evals}, "start_step": start_step, "headline": headline}
  sync_every = steps.sync_every()
  pending = []  # (step, metrics) not yet fetched from the devices.
  skipped = guards.NonFiniteCount(config, manager)

  def flush_metrics() -> None:
    """Fetches pending metrics (a host sync), logs their mean, and applies the non-finite guard."""
    nonlocal pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, fetched, strict=True):
      if m["nonfinite"] and config.nan_policy == "stop":
        checkpoints.wait_until_saved(manager)  # checkpoints of earlier steps complete; none is written after.
        raise guards.NonFiniteLossError(
            f"non-finite loss or gradients at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
            f"the newest checkpoint in {manager.directory} is from step {manager.latest_step()}. "
            f"config.nan_policy='skip' skips such updates instead.")
      skipped.update(step, m)
    last = pending[-1][0]
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    summary["nonfinite"] = float(np.sum([m["nonfinite"] for m in fetched]))
    summary.update(utilization.update(last))  # tflops_per_device, mfu: since the previous fetch
    writer.write_scalars(last, {f"train/{k}": v for k, v in summary.items()})
    history["train"].append({"step": last, **summary})
    progress.report(last, summary)
    pending = []

  # No implicit host-device transfer in the loop (as big_vision): one would slow every step unseen. Batches and
  # metrics cross explicitly (jax.make_array_from_process_local_data, jax.device_get).
  profile = profiling.StepTrace(config, workdir, start_step, num_steps)  # config.profile_start_step: 0 is off.
  with guards.Preemption() as preemption, jax.transfer_guard("disallow"), profile:
    # An evaluation asks before each batch whether to stop; several processes agree every sync_every batches.
    stop_evaluation = lambda batch: preemption.requested(batch, batch % sync_every == 0)
    # The train step compiles before the first step (or loads from the cache), with the first batch's shapes; the
    # evaluators' steps compile at their first evaluation, so the first step waits for none of them.
    first = next(batches)
    compiled = compilation.compile_ahead(train_step, state, first, rng)
    batches = itertools.chain([first], batches)
    for step in range(start_step + 1, num_steps + 1):
      profile.begin(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled.step(state, next(batches), rng)
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        history["startup"] = {"first_step_seconds": time.monotonic() - started, "compile_seconds": compiled.seconds,
                              "from_cache": compiled.from_cache, "cache_dir": cache,
                              "xla_flops_per_device": compiled.cost.get("flops")}
        logging.info("%s", compilation.first_step_line(history["startup"]["first_step_seconds"], compiled, cache))
      pending.append((step, metrics))
      checkpoints.raise_if_save_failed(manager)
      for hook in hooks:
        hook(step)
      sync_point = step % sync_every == 0
      if step % config.log_every_steps == 0 or step == num_steps:
        flush_metrics()
      elif sync_point:
        jax.block_until_ready(metrics)
      for name, evaluator in evals.items():
        if evaluators.due(evaluator, step, num_steps):
          logging.debug("Step %d: evaluating %s", step, name)
          try:
            with compilation.quiet_cache_loads():  # its steps may load from the cache (at its first run)
              results = evaluator.run(state.params, stop=stop_evaluation)
          except guards.StopRequested:
            logging.warning("Step %d: abandoned evaluator %s to stop", step, name)
            break
          utilization.restart(step)  # an evaluation's time is not the train steps'
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
      profile.end(step, state)

  checkpoints.wait_until_saved(manager)
  manager.close()
  writer.flush()
  writer.close()
  history["final_step"] = int(state.step)
  return history


def _flatten(config: dict) -> dict:
  return trees.flatten(config, ".", is_leaf=trees.is_not_dict)
