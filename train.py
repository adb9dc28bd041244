"""Trains an MLP-Mixer from an ml_collections config; rerunning the same command resumes.

  python train.py                                    # the embedded default, workdir ./workdir
  python train.py --config configs/mixer_b16_imagenet2012.py --workdir gs://... --config.lr=3e-3
  python train.py --config configs/mixer_jft.py:h14 --compile_for=v3:8x16   # fits a TPU slice? no TPU needed
"""

import os
import signal
import sys

from absl import app, flags, logging

from mixer import cli, console, errors

flags.DEFINE_string("workdir", "workdir", "Checkpoints, TensorBoard logs and config.json go here.")
flags.DEFINE_string("compile_for", None, "Instead of training, compile the config's train and eval steps for this "
                    "TPU slice (e.g. v3:8x16, v4:4x4x8, v5p:4x4x8, v5e:16x16) on this host, with no TPU and no "
                    "data, and print the memory per device and the compiler's step-time estimate. Exit status "
                    "1 if it does not fit. Needs libtpu: pip install \"jax[tpu]==0.10.1\".")
errors.define_config_file("config", cli.DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
FLAGS = flags.FLAGS
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a killed process: schedulers treat the job as not done.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.compile_for:
    sys.exit(compile_for(FLAGS.config, FLAGS.compile_for))
  cli.setup_logging()
  cli.initialize_distributed()
  from mixer import train_lib  # here: TensorFlow (imported by it) starts after setup_logging's noise filter.
  history = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if history.get("signal") == signal.SIGINT:
    print(f"Interrupted (Ctrl-C): stopped at step {history['preempted_at']} with a complete checkpoint in "
          f"{FLAGS.workdir}; rerun the same command to resume.")
    sys.exit(INTERRUPTED_EXIT_CODE)
  if "preempted_at" in history:
    print(f"Preempted: stopped at step {history['preempted_at']} with a complete checkpoint in "
          f"{FLAGS.workdir}; rerun the same command to resume.")
    sys.exit(PREEMPTED_EXIT_CODE)
  print(console.final_message(history, FLAGS.config.dataset, FLAGS.workdir))


def compile_for(config, topology: str) -> int:
  """train.py --compile_for: 0 if the steps fit the slice's memory, 1 (with what to change) if not, 2 on bad input."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax starts: the TPU is only a compile target.
  from mixer import tpu
  tpu.raise_stack_limit()
  cli.setup_logging()
  logging.set_verbosity(logging.WARNING)  # the report below is the output.
  try:
    report = tpu.compile_for(config, topology)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(tpu.format_report(report))
  if report["fits"]:
    print(f"FITS: the train and eval steps fit {topology}.")
    return 0
  print(f"DOES NOT FIT {topology}. Change one or more of:")
  for line in tpu.suggestions(config, report):
    print(f"  {line}")
  return 1


if __name__ == "__main__":
  errors.run(main)
