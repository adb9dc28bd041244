"""Mixer pre-trained JFT-style: any large multi-label tfds dataset, inception crop + flip only,
sigmoid cross-entropy (Sec. 3, App. B, Table 4).

  python train.py --config configs/mixer_jft.py:h14 --config.dataset=MY_DATASET --config.data_dir=DIR \
      --config.label_key=labels --workdir W
The dataset needs an "image" feature and a label feature (label_key) that is a ClassLabel or a
Sequence of ClassLabels. JFT-300M itself is not public; any tfds dataset of that shape works.
Paper (Table 3, fine-tuned at 224): B/16 80.00%, L/16 84.05% (7 ep) / 84.82% (14 ep), H/14 86.32%.
"""

import ml_collections

from configs import mixer_imagenet2012

# Table 4, JFT-300M rows: size -> (epochs, lr); weight decay 0.03 for all.
_SCHEDULE = {"S": (5, 3e-3), "B": (7, 3e-3), "L": (7, 1e-3), "H": (14, 1e-3)}


def get_config(arg: str = "b16") -> ml_collections.ConfigDict:
  config = mixer_imagenet2012.pretraining_config(arg)
  config.dataset = "jft300m"
  config.label_key = "labels"
  config.max_labels = 16
  config.train_split = "train"
  config.evals.eval.split = "validation"
  config.loss = "sigmoid_xent"
  config.pp_train = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"  # no RandAugment, mixup.
  config.mixup = 0.0
  config.model.stoch_depth = 0.0
  config.model.dropout_rate = 0.0
  epochs, lr = _SCHEDULE[config.model.variant[0]]
  config.total_epochs = float(epochs)  # L/16 also ran 14 epochs: --config.total_epochs=14.
  config.lr = lr
  config.weight_decay = 0.03
  return config
