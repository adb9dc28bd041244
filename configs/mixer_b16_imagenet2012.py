"""Mixer-B/16 pre-trained on ImageNet-1k at 224px: the paper's recipe (Sec. 3, App. B, Table 4).

Needs ImageNet prepared once with tfds (archives in DATA_DIR/downloads/manual):
  tfds build imagenet2012 --data_dir=DATA_DIR
  python train.py --config configs/mixer_b16_imagenet2012.py --config.data_dir=DATA_DIR --workdir W
Paper (Table 2/4): Mixer-B/16 trained from scratch on ImageNet-1k reaches 76.44% top-1.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.train_split = "train"
  config.eval_split = "validation"
  config.pp_train = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"
  config.pp_eval = "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"  # App. B.
  config.shuffle_buffer = 250_000
  config.batch_size = 4096  # Sec. 3.
  config.eval_batch_size = 4096

  config.model.variant = "B/16"
  config.model.stoch_depth = 0.1  # Table 4.
  config.model.dtype = "bfloat16"

  config.optim.name = "adam"  # Sec. 3: Adam, beta1 0.9, beta2 0.999.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.lr = 1e-3  # Table 4.
  config.weight_decay = 0.1  # Table 4.
  config.schedule = "linear"  # Sec. 3: linear warm-up of 10k steps, then linear decay.
  config.warmup_steps = 10_000
  config.grad_clip_norm = 1.0  # Sec. 3: global norm 1.
  config.total_epochs = 300.0  # Table 4.

  config.log_every_steps = 50
  config.sync_every_steps = 50
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  return config
