"""Mixer-B/16 pre-trained on ImageNet-21k: the paper's recipe (Table 4). Paper: 80.64% top-1 (Table 3).

  python train.py --config configs/mixer_b16_imagenet21k.py --config.data_dir=DATA_DIR --workdir W
"""

from configs import mixer_imagenet21k


def get_config():
  return mixer_imagenet21k.get_config("b16")
