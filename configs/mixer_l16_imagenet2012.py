"""Mixer-L/16 pre-trained on ImageNet-1k: the paper's recipe (Table 4). Paper: 71.76% top-1.

  python train.py --config configs/mixer_l16_imagenet2012.py --config.data_dir=DATA_DIR --workdir W
"""

from configs import mixer_imagenet2012


def get_config():
  return mixer_imagenet2012.get_config("l16")
