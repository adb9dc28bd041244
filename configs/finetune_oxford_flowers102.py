"""Fine-tunes a pre-trained Mixer on Oxford Flowers 102 (`oxford_flowers102` in tfds):
the paper's recipe, 500 steps (configs/finetune.py).

  python train.py --config configs/finetune_oxford_flowers102.py:b16 --config.init.checkpoint=CKPT --workdir W
  python train.py --config configs/finetune_oxford_flowers102.py:b16,448 --config.init.checkpoint=CKPT --workdir W
CKPT: a released .npz (e.g. imagenet21k_Mixer-B_16.npz) or a pre-training workdir of ours.
"""

from configs import finetune


def get_config(arg: str = "b16"):
  return finetune.finetune_config(
      arg, dataset="oxford_flowers102", steps=500, train_split="train+validation", test_split="test")
