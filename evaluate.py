"""Evaluates the newest checkpoint in a workdir: top-1 over a whole split of the config's dataset.

  python evaluate.py --workdir /tmp/w                 # the run's own config (workdir/config.json)
  python evaluate.py --workdir /tmp/w --split train
"""

import json

import jax
import ml_collections
from absl import app, flags
from etils import epath

from mixer import cli

flags.DEFINE_string("workdir", "workdir", "A training workdir: config.json and checkpoints/.")
flags.DEFINE_string("split", None, "tfds split to evaluate; default: the config's eval_split.")
FLAGS = flags.FLAGS


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory that train.py wrote")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.initialize_distributed()
  from mixer import input_pipeline, train_lib
  config = load_config(FLAGS.workdir)
  split = FLAGS.split or config.eval_split
  s = train_lib.setup(config)
  step, params = train_lib.load_params(config, FLAGS.workdir, s)
  eval_step = train_lib.make_eval_step(config, s.model, s.num_classes,
                                       jax.tree.map(lambda x: x.sharding, params), s.mesh)
  results = train_lib.evaluate(eval_step, params,
                               input_pipeline.eval_iterator(config, s.builder, s.info, s.mesh, split))
  results = {"dataset": config.dataset, "split": split, "step": step, **results}
  if jax.process_index() == 0:
    (epath.Path(FLAGS.workdir) / f"eval_{split.replace(':', '_')}.json").write_text(json.dumps(results, indent=2))
  print(f"Test top-1 ({config.dataset}:{split}, step {step}, {results['num_examples']} examples): "
        f"{results['top1']:.4f}")


if __name__ == "__main__":
  app.run(main)
