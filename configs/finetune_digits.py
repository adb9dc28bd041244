"""Offline fine-tuning demo on the embedded digits: pre-train on the digits 0-4, fine-tune on 5-9 with
the paper's fine-tuning recipe (SGD momentum 0.9, cosine, clip 1, no weight decay, new zero head).

  python train.py --config.label_subset=0-4 --workdir /tmp/pre
  python train.py --config configs/finetune_digits.py --config.init.checkpoint=/tmp/pre --workdir /tmp/ft
"""

from configs import finetune


def get_config():
  config = finetune.recipe("Ti/4", 16, dataset="digits", steps=60)
  config.label_subset = "5-9"
  config.model.dtype = "float32"
  config.pp_train = config.pp_eval = config.evals.fewshot.pp = "decode(channels=1)|resize(16)|value_range(-1, 1)"
  config.evals.fewshot.datasets = {"digits": ("digits", "train", "test")}
  config.shuffle_buffer = 2_000
  config.batch_size, config.eval_batch_size = 128, 256  # 719 training images.
  config.warmup_steps = 5
  config.log_every_steps = 10
  config.evals.eval.every_steps = config.checkpoint_every_steps = 30
  return config
