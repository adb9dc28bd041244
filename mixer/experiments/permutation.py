"""The paper's Fig. 4 on the embedded digits: Mixer is invariant to one fixed permutation of the
patches and of the pixels within patches; a CNN is not. Both also lose under global pixel shuffling.

  python -m mixer.experiments.permutation --out perm.png      # ~4 minutes on 2 CPU cores
Trains a small Mixer and a small Flax CNN on the original, patch+pixel shuffled and globally shuffled
images (the same permutation for every image), writes the test top-1 curves as a PNG and the final
numbers as JSON (beside the PNG).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging
from matplotlib.figure import Figure

from mixer import cli, dataset, input_pipeline, models, optim, setup, sharding, steps
from mixer.evaluators import classification

_PP = "decode(channels=1)|resize(16)|{}value_range(-1, 1)"
PERMUTATIONS = {"original": "", "patch + pixel shuffle": "patch_shuffle(4)|", "global shuffle": "pixel_shuffle()|"}


class SmallCNN(nn.Module):
  """Three 3x3 conv layers with ReLU and pooling, global average, linear head (~100k params)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    for features in (32, 64, 128):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2)) if features < 128 else x
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def run(model_name: str, num_steps: int, eval_every: int, data_dir=None) -> dict[str, list[tuple[int, float]]]:
  """{permutation: [(step, test top-1)] along its training run}; the permutation is in the data only, so the
  model's train and eval steps compile once for all of them."""
  config = cli.load_config_file(cli.DEFAULT_CONFIG)
  config.data_dir = data_dir
  config.total_steps, config.warmup_steps = num_steps, max(1, num_steps // 20)
  mesh = sharding.create_mesh(config.mesh)
  builder = dataset.get_builder(config)
  info = dataset.get_info(config, builder)
  model = models.create_model(config.model, info.num_classes) if model_name == "Mixer" else SmallCNN(info.num_classes)
  schedule = optim.create_schedule(config, num_steps)
  tx = optim.create_optimizer(config, schedule)
  _, state_sharding = steps.create_train_state(model, tx, (16, 16, 1), mesh, config.seed)
  train_step = steps.make_train_step(config, model, tx, schedule, info.num_classes, state_sharding, mesh)
  if model_name == "Mixer":
    predict = steps.make_predict_fn(model)
  else:
    predict = lambda params, images: (model.apply({"params": params}, images), {})
  # config.pp_eval is read at each evaluation: the permutation below changes it, the compiled step stays.
  evaluator = classification.Evaluator("eval", config.evals.eval, predict, setup.eval_data(config, builder, info, mesh))
  curves = {}
  for permutation, spec in PERMUTATIONS.items():
    config.pp_train = config.pp_eval = _PP.format(spec)
    state, _ = steps.create_train_state(model, tx, (16, 16, 1), mesh, config.seed)  # the same start for each.
    batches = input_pipeline.train_iterator(config, builder, info, mesh)
    curves[permutation] = []
    for step in range(1, num_steps + 1):
      state, metrics = train_step(state, next(batches), jax.random.key(0))
      if step % eval_every == 0 or step == num_steps:
        top1 = evaluator.run(state.params)["top1"]
        curves[permutation].append((step, top1))
        logging.info("%s, %s, step %d: test top-1 %.4f", model_name, permutation, step, top1)
      elif step % steps.sync_every() == 0:
        jax.block_until_ready(metrics)
  return curves


def plot(curves: dict, out: str) -> None:
  fig = Figure(figsize=(10, 4))  # no pyplot: no global backend to choose, nothing to close.
  axes = fig.subplots(1, 2, sharey=True)
  for ax, model_name in zip(axes, ("Mixer", "CNN"), strict=True):
    for permutation, curve in curves[model_name].items():
      steps_, top1 = zip(*curve, strict=True)
      ax.plot(steps_, top1, marker="o", markersize=3, label=permutation)
    ax.set_title(f"{model_name} on digits (16px, 4x4 patches)", fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("test top-1")
  fig.suptitle("Fixed permutations of the input (paper Fig. 4)", fontsize=11)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv):
  del argv
  f = flags.FLAGS
  curves = {m: run(m, f.steps, f.eval_every, f.data_dir) for m in ("Mixer", "CNN")}
  plot(curves, f.out)
  final = {m: {p: curve[-1][1] for p, curve in by_perm.items()} for m, by_perm in curves.items()}
  path = f.out.rsplit(".", 1)[0] + ".json"
  with open(path, "w") as out:
    json.dump({"final_top1": final, "curves": curves}, out, indent=2)
  print(json.dumps(final, indent=2))
  print(f"Wrote {f.out} and {path}")


if __name__ == "__main__":
  flags.DEFINE_string("out", "perm.png", "The PNG of the curves; the JSON goes beside it.")
  flags.DEFINE_integer("steps", 400, "Training steps per run (6 runs).")
  flags.DEFINE_integer("eval_every", 50, "Steps between evaluations on the test split.")
  flags.DEFINE_string("data_dir", None, "tfds data_dir (default: tfds's).")
  app.run(main)
