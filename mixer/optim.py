"""optax chains and learning-rate schedules built from the config."""

import jax
import optax


def create_schedule(config, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to config.lr, then linear or cosine decay to 0 at total_steps."""
  if config.warmup_steps >= total_steps:
    raise ValueError(f"config.warmup_steps={config.warmup_steps} is not below the "
                     f"{total_steps} training steps")
  warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
  decay_steps = total_steps - config.warmup_steps
  if config.schedule == "linear":
    decay = optax.linear_schedule(config.lr, 0.0, decay_steps)
  elif config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(config.lr, decay_steps)
  else:
    raise ValueError(f"config.schedule={config.schedule!r} is not one of linear, cosine")
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def decay_mask(params):
  """Weight decay applies to kernels, not to biases and LayerNorm scales: by name, because the stacked
  params of model.scan_blocks give every block's bias and scale a leading (block) axis too."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Clip by global norm, then Adam with decoupled weight decay or SGD with momentum."""
  name = config.optim.name
  if name == "adam":
    # optax.adamw decays by lr * weight_decay * param, as the paper's (legacy flax.optim) Adam did.
    opt = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                      weight_decay=config.weight_decay, mask=decay_mask)
  elif name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=config.optim.momentum))
  else:
    raise ValueError(f"config.optim.name={name!r} is not one of adam, sgd")
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
