"""Fine-tunes a pre-trained Mixer on Oxford-IIIT Pets (`oxford_iiit_pet` in tfds):
the paper's recipe, 500 steps (configs/finetune.py).

  python train.py --config configs/finetune_oxford_iiit_pet.py:b16 --config.init.checkpoint=CKPT --workdir W
  python train.py --config configs/finetune_oxford_iiit_pet.py:b16,448 --config.init.checkpoint=CKPT --workdir W
CKPT: a released .npz (e.g. imagenet21k_Mixer-B_16.npz) or a pre-training workdir of ours.
"""

from configs import finetune


def get_config(arg: str = "b16"):
  return finetune.finetune_config(
      arg, dataset="oxford_iiit_pet", steps=500, train_split="train", test_split="test")
