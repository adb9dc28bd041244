"""Evaluates a checkpoint with the config's evaluators (config.evals): top-1 over a whole split of the
config's dataset, and/or few-shot accuracy, and any other evaluator the config lists.

  python evaluate.py --workdir /tmp/w                      # the run's own config (workdir/config.json)
  python evaluate.py --workdir /tmp/w --fewshot            # + the few-shot evaluators
  python evaluate.py --workdir /tmp/w --split train --notop1 --fewshot
  python evaluate.py --workdir /shared/run --output_dir results   # a workdir this user cannot write
  python evaluate.py --checkpoint imagenet21k_Mixer-B_16.npz --config configs/mixer_b16_imagenet21k.py \
      --fewshot --notop1 --workdir /tmp/eval                # a released .npz: --config gives model and data
Results are printed and written as JSON into the workdir (or --output_dir), each evaluator's under its name.
"""

import json

import jax
from absl import app, flags
from etils import epath

from mixer import cli, errors

flags.DEFINE_string("workdir", "workdir", "A training workdir (config.json and checkpoints/); results go here "
                    "unless --output_dir says otherwise.")
flags.DEFINE_string("output_dir", None, "Where to write the results (eval_*.json); default: --workdir. For a "
                    "workdir that cannot be written (read-only, shared).")
flags.DEFINE_string("checkpoint", None, "A released .npz (or another workdir) to evaluate instead of the "
                    "workdir's newest checkpoint; needs --config unless the workdir has config.json.")
errors.define_config_file("config", None, "Config file; default: the workdir's config.json.")
flags.DEFINE_list("evals", None, "Names in config.evals to run; default: the classification ones (unless "
                  "--notop1), the few-shot ones with --fewshot, and those of any other type.")
flags.DEFINE_string("split", None, "tfds split for top-1 (the classification evaluators); default: each one's "
                    "config.evals.NAME.split.")
flags.DEFINE_bool("top1", True, "Top-1 over a whole split (the classification evaluators).")
flags.DEFINE_bool("fewshot", False, "Few-shot linear regression (the few-shot evaluators, on their datasets).")
flags.DEFINE_string("fewshot_dataset", None, "Few-shot on this dataset's train and held-out splits (e.g. the "
                    "run's own, folder:PATH) instead of the few-shot evaluators' datasets.")
flags.DEFINE_bool("random_init", False, "Evaluate the config's model at initialisation (a baseline), not a checkpoint.")
FLAGS = flags.FLAGS


def load_checkpoint(path: str) -> dict:
  from mixer import params_io  # as in main
  try:
    return params_io.load(path)
  except (OSError, ValueError) as e:
    raise type(e)(f"--checkpoint={path}: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config or cli.load_config(FLAGS.workdir)
  # Where the results go is checked before the minutes of evaluation (and TensorFlow's and JAX's start), not after.
  output_dir = FLAGS.output_dir or FLAGS.workdir
  if FLAGS.output_dir:
    cli.check_writable(output_dir, "--output_dir")
  else:
    cli.check_writable(output_dir, "--workdir", hint="; --output_dir=DIR writes the results elsewhere")
  cli.setup_logging()
  cli.initialize_distributed()
  # Imported here, after setup_logging: TensorFlow's start-up noise is filtered, and flag errors come at once.
  from mixer import checkpoints, evaluators, setup, steps, transfer
  names = selected_evals(config)
  mesh, builder, info = setup.setup(config)
  model = setup.create_model(config, info)
  source = None if FLAGS.random_init else FLAGS.checkpoint or FLAGS.workdir
  if source and FLAGS.top1 and any(config.evals[name].type == "classification" for name in names):
    # Top-1 compares the head's outputs with this dataset's labels: they must be the classes it trained on.
    setup.check_same_classes(source, info.class_names, "--checkpoint" if FLAGS.checkpoint else "--workdir",
                             "Evaluate it on the dataset it trained on (its config.json), or only few-shot "
                             "(--notop1 --fewshot).")
  if source:
    setup.warn_if_data_changed(source, info)
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
  evals = evaluators.from_config(config.evals, steps.make_predict_fn(model),
                                 setup.eval_data(config, builder, info, mesh, progress=True), names)
  results = {"dataset": config.dataset, "step": step}
  for name, evaluator in evals.items():
    results[name] = evaluator.run(params)
    print(evaluator.summary(results[name], step))
  if jax.process_index() == 0:
    tags = dict.fromkeys(evaluator.file_tag() for evaluator in evals.values())  # e.g. eval_test_fewshot.json
    name = "_".join(["eval", *tags]) + ("_random_init" if FLAGS.random_init else "")
    path = epath.Path(output_dir) / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"Results written to {path}")


def selected_evals(config) -> list[str]:
  """The names in config.evals that the flags select; --split and --fewshot_dataset applied to them."""
  from mixer import dataset, evaluators  # as in main
  evaluators.validate(config)
  if FLAGS.evals:
    unknown = [name for name in FLAGS.evals if name not in config.evals]
    if unknown:
      raise errors.FlagError(f"--evals={','.join(FLAGS.evals)}: {unknown[0]!r} is not in config.evals "
                             f"({', '.join(config.evals)})")
  wanted = {"classification": FLAGS.top1, "fewshot": FLAGS.fewshot}
  names = FLAGS.evals or [name for name, e in config.evals.items() if wanted.get(e.type, True)]
  if not names:
    raise ValueError("nothing to evaluate: no evaluator of config.evals is selected (--notop1 without --fewshot?)")
  for name in names:
    settings = config.evals[name]
    if settings.type == "classification" and FLAGS.split:
      settings.split = FLAGS.split
    if settings.type == "fewshot" and FLAGS.fewshot_dataset:
      test_split = (dataset.held_out_split(config) or (None, "test"))[1]
      settings.datasets = {FLAGS.fewshot_dataset: (FLAGS.fewshot_dataset, config.train_split, test_split)}
  return names


if __name__ == "__main__":
  errors.run(main)
