"""Evaluates a checkpoint: top-1 over a whole split of the config's dataset, and/or few-shot accuracy.

  python evaluate.py --workdir /tmp/w                      # the run's own config (workdir/config.json)
  python evaluate.py --workdir /tmp/w --fewshot            # + few-shot on config.fewshot.datasets
  python evaluate.py --workdir /tmp/w --split train --notop1 --fewshot
  python evaluate.py --checkpoint imagenet21k_Mixer-B_16.npz --config configs/mixer_b16_imagenet21k.py \
      --fewshot --notop1 --workdir /tmp/eval                # a released .npz: --config gives model and data
Results are printed and written as JSON into the workdir.
"""

import json

import jax
from absl import app, flags
from etils import epath

from mixer import cli, errors

flags.DEFINE_string("workdir", "workdir", "A training workdir (config.json and checkpoints/); results go here.")
flags.DEFINE_string("checkpoint", None, "A released .npz (or another workdir) to evaluate instead of the "
                    "workdir's newest checkpoint; needs --config unless the workdir has config.json.")
errors.define_config_file("config", None, "Config file; default: the workdir's config.json.")
flags.DEFINE_string("split", None, "tfds split for top-1; default: the config's eval_split.")
flags.DEFINE_bool("top1", True, "Top-1 over the whole split.")
flags.DEFINE_bool("fewshot", False, "Few-shot linear regression on config.fewshot.datasets.")
flags.DEFINE_string("fewshot_dataset", None, "Few-shot on this dataset's train and eval splits (e.g. the run's "
                    "own, folder:PATH) instead of config.fewshot.datasets.")
flags.DEFINE_bool("random_init", False, "Evaluate the config's model at initialisation (a baseline), not a checkpoint.")
FLAGS = flags.FLAGS


def load_checkpoint(path: str) -> dict:
  from mixer import params_io
  try:
    return params_io.load(path)
  except (OSError, ValueError) as e:
    raise type(e)(f"--checkpoint={path}: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.initialize_distributed()
  from mixer import checkpoints, fewshot, input_pipeline, steps, train_lib, transfer
  config = FLAGS.config or cli.load_config(FLAGS.workdir)
  mesh, builder, info = train_lib.setup(config)
  model = train_lib.create_model(config, info)
  init = lambda seed: steps.init_params(model, info.image_shape, seed)
  # Params laid out on the whole mesh by config.param_sharding, as a checkpoint's restore.
  abstract_params = steps.abstract_params(model, info.image_shape, mesh, config.param_sharding)
  on_mesh = lambda params: jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract_params))
  if FLAGS.random_init:
    params, step = on_mesh(init(config.seed)), "init"
  elif FLAGS.checkpoint:
    params = transfer.init_from_pretrained(load_checkpoint(FLAGS.checkpoint), init(0), model,
                                           new_head=not FLAGS.top1, source=FLAGS.checkpoint)
    params, step = on_mesh(params), FLAGS.checkpoint
  else:
    # Only the params are read (not the optimizer state): a third of a full restore's memory with Adam.
    step, params = checkpoints.restore_params(FLAGS.workdir, abstract_params)
  params_sharding = jax.tree.map(lambda x: x.sharding, params)
  results = {"dataset": config.dataset, "step": step}
  if FLAGS.top1:
    split = FLAGS.split or config.eval_split
    eval_step = steps.make_eval_step(config, model, model.num_classes, params_sharding, mesh)
    results.update(split=split, **steps.evaluate(
        eval_step, params, input_pipeline.eval_iterator(config, builder, info, mesh, split),
        sync_every=config.sync_every_steps))
    print(f"Top-1 ({config.dataset}:{split}, step {step}, {results['num_examples']} examples): "
          f"{results['top1']:.4f}")
  if FLAGS.fewshot:
    if FLAGS.fewshot_dataset:
      config.fewshot.datasets = {FLAGS.fewshot_dataset: (FLAGS.fewshot_dataset, config.train_split, config.eval_split)}
    few = fewshot.run(config.fewshot, model, params, params_sharding, mesh, config.data_dir, progress=True)
    results["fewshot"] = few
    print(f"Few-shot linear regression top-1 (%), mean of {config.fewshot.seeds} seeds, step {step}:")
    print(fewshot.table(few))
  if jax.process_index() == 0:
    name = "eval" + (f"_{results['split'].replace(':', '_')}" if FLAGS.top1 else "")
    name += ("_fewshot" if FLAGS.fewshot else "") + ("_random_init" if FLAGS.random_init else "")
    epath.Path(FLAGS.workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(FLAGS.workdir) / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
  errors.run(main)
