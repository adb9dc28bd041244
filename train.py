"""Trains an MLP-Mixer from an ml_collections config; rerunning the same command resumes.

  python train.py                                    # the embedded default, workdir ./workdir
  python train.py --config configs/mixer_b16_imagenet2012.py --workdir gs://... --config.lr=3e-3
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from mixer import cli

flags.DEFINE_string("workdir", "workdir", "Checkpoints, TensorBoard logs and config.json go here.")
config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, "Experiment config file.",
                                lock_config=True)
FLAGS = flags.FLAGS
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a killed process: schedulers treat the job as not done.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.initialize_distributed()
  from mixer import train_lib
  history = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if "preempted_at" in history:
    print(f"Preempted: stopped at step {history['preempted_at']} with a complete checkpoint in "
          f"{FLAGS.workdir}; rerun the same command to resume.")
    sys.exit(PREEMPTED_EXIT_CODE)
  final = history["eval"][-1] if history["eval"] else None
  if final:
    print(f"Final test top-1 ({FLAGS.config.dataset}:{FLAGS.config.eval_split}, step {final['step']}, "
          f"{final['num_examples']} examples): {final['top1']:.4f}")
  else:
    print(f"Nothing to train: the checkpoint in {FLAGS.workdir} is already at step "
          f"{history['final_step']}. Evaluate it with `python evaluate.py --workdir {FLAGS.workdir}`.")


if __name__ == "__main__":
  app.run(main)
