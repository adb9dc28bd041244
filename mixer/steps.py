"""The train state, the jitted train step over a device mesh with mixup (on device), and the predict function.

Nothing here reads data or imports TensorFlow: benchmarks and accelerator hosts use it alone.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mixer import sharding


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, p: float,
          mesh=None) -> tuple[jax.Array, jax.Array]:
  """(mixed images, mixed targets): each example mixed with its neighbour in the batch (Zhang et al. 2018), as
  big_vision does; its targets from to_targets(labels).

  One weight a ~ Beta(p, p), folded to a >= 1/2, for the whole batch; targets mix with the same
  weight, so rows that summed to 1 still do. The neighbour's targets are made from its labels, rolled, not by
  rolling the [batch, classes] targets: the same values, but only the labels cross devices (21k classes of
  float32 targets would be 87 KB an example). Over a `mesh`, the batch rolls as sharding.roll_batch does: the
  neighbour is the same example whatever the number of devices.
  """
  a = jax.random.beta(rng, p, p)
  a = jnp.maximum(a, 1.0 - a)
  mix = lambda x, neighbour: a.astype(x.dtype) * x + (1.0 - a).astype(x.dtype) * neighbour
  neighbour = lambda x: jnp.roll(x, 1, axis=0) if mesh is None else sharding.roll_batch(x, mesh)
  return (mix(images, neighbour(images)),
          mix(to_targets(labels, num_classes), to_targets(neighbour(labels), num_classes)))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Independent binary cross-entropies summed over classes (multi-label; paper Sec. 3)."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def init_params(model, image_shape: tuple[int, ...], seed: int) -> Any:
  """The model's freshly initialised params for images of `image_shape`."""
  return model.init(jax.random.key(seed), jnp.zeros((1,) + image_shape, jnp.float32))["params"]


def init_fn(model, tx, image_shape: tuple[int, ...], seed: int) -> Callable[[], TrainState]:
  def init():
    params = init_params(model, image_shape, seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def _abstract(init: Callable[[], Any], mesh, param_sharding: str) -> tuple[Any, Any]:
  """(ShapeDtypeStructs of what init() returns, carrying the shardings of config.param_sharding; the shardings)."""
  shapes = jax.eval_shape(init)
  shardings = sharding.tree_shardings(shapes, mesh, sharding.parse_rules(param_sharding))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings


def abstract_params(model, image_shape: tuple[int, ...], mesh, param_sharding: str) -> Any:
  """The params' shapes, dtypes and shardings, allocating nothing: what a checkpoint's params restore to."""
  return _abstract(lambda: init_params(model, image_shape, 0), mesh, param_sharding)[0]


def abstract_train_state(model, tx, image_shape: tuple[int, ...], mesh, param_sharding: str) -> tuple[Any, Any]:
  """(the train state's shapes, dtypes and shardings, the shardings): params and optimizer state alike follow
  config.param_sharding. For restoring, and for compiling without allocating (memory, TPU slices from a CPU host)."""
  return _abstract(init_fn(model, tx, image_shape, 0), mesh, param_sharding)


def create_train_state(model, tx, image_shape: tuple[int, ...], mesh, seed: int, param_sharding: str = "replicated"):
  """Initialises params and optimizer state directly in their sharding (never whole on one device)."""
  _, state_sharding = abstract_train_state(model, tx, image_shape, mesh, param_sharding)
  return jax.jit(init_fn(model, tx, image_shape, seed), out_shardings=state_sharding)(), state_sharding


def to_targets(labels: jax.Array, num_classes: int) -> jax.Array:
  """Class indices [B] -> one-hot, or padded label lists [B, K] (-1 = none) -> multi-hot."""
  if labels.ndim == 1:
    return jax.nn.one_hot(labels, num_classes)
  return jnp.minimum(jnp.sum(jax.nn.one_hot(labels, num_classes), axis=1), 1.0)


def correct_at_1(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """1 where the top-scoring class is a true label (top-1, or precision@1 for multi-label)."""
  return jnp.take_along_axis(targets, jnp.argmax(logits, -1)[:, None], axis=1)[:, 0] > 0


def train_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1 where the top-scoring class is one of the example's own labels (class indices [B], or padded label lists
  [B, K], -1 = none): of a mixup-mixed example, the labels of weight a >= 1/2. From the labels rather than the
  [B, classes] targets: an argmax and a compare, no gather over 21k classes (which cost the TPU compiler time)."""
  top = jnp.argmax(logits, -1)
  if labels.ndim == 1:
    return top == labels
  return jnp.any(labels == top[:, None], axis=-1)


def make_train_step(config, model, tx, schedule, num_classes: int, state_sharding, mesh):
  """(state, batch, rng) -> (state, metrics), jitted over the mesh with the state donated.

  With config.grad_accum_steps = k, the batch is processed as k sequential micro-batches whose
  gradients are averaged: the same update as one batch, with 1/k of the activation memory.
  """
  loss_fn, accum = LOSSES[config.loss], config.grad_accum_steps

  def micro_step(params, images, targets, labels, rng):
    def loss_and_logits(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
      return jnp.mean(loss_fn(logits, targets)), logits
    (loss, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(params)
    return grads, loss, jnp.mean(train_correct(logits, labels))

  def train_step(state, batch, rng):
    mixup_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    if config.mixup > 0:
      images, targets = mixup(mixup_rng, batch["image"], batch["label"], num_classes, config.mixup, mesh)
    else:
      images, targets = batch["image"], to_targets(batch["label"], num_classes)
    if accum == 1:
      grads, loss, accuracy = micro_step(state.params, images, targets, batch["label"], dropout_rng)
    else:
      # [B, ...] -> [B/k, k, ...]: each device keeps its own rows, so micro-batches need no communication.
      split = lambda x: jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)

      def body(carry, micro):
        grads, loss, accuracy = micro_step(state.params, *micro[:3], jax.random.fold_in(dropout_rng, micro[3]))
        return jax.tree.map(jnp.add, carry, (grads, loss, accuracy)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params), 0.0, 0.0)
      sums, _ = jax.lax.scan(body, zeros, (split(images), split(targets), split(batch["label"]), jnp.arange(accum)))
      grads, loss, accuracy = jax.tree.map(lambda x: x / accum, sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if config.nan_policy == "skip":
      # Keep the old params and optimizer state for this batch, except the learning-rate schedule's step
      # count: it advances, so that the schedule stays a function of the train step (Adam's own count,
      # which its bias correction reads, stays with its moments).
      keep = lambda new, old: jnp.where(finite, new, old)
      is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(lambda new, old: new if is_schedule(new) else jax.tree.map(keep, new, old),
                               opt_state, state.opt_state, is_leaf=is_schedule)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), "nonfinite": 1 - finite.astype(jnp.int32)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  data, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, data, repl),
                 out_shardings=(state_sharding, repl), donate_argnums=0)


def make_predict_fn(model) -> Callable:
  """predict(params, images) -> (logits, {"pre_logits": features}): all that evaluators see of the model, as
  big_vision's evaluators see it. Not jitted: each evaluator jits what it computes from it."""
  return lambda params, images: model.apply({"params": params}, images, train=False, with_extras=True)


def sync_every() -> int:
  """How many steps (or eval batches) the host may dispatch before waiting for a result. XLA:CPU with several
  devices in one process aborts past about 32 in flight (a collective's rendezvous times out); accelerators
  have no such limit, and waiting less often keeps their queue full. Several processes also agree on a stop
  request only at these points."""
  return 16 if jax.default_backend() == "cpu" and jax.device_count() > 1 else 32
