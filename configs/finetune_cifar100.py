"""Fine-tunes a pre-trained Mixer on CIFAR-100 (`cifar100` in tfds):
the paper's recipe, 10,000 steps (configs/finetune.py).

  python train.py --config configs/finetune_cifar100.py:b16 --config.init.checkpoint=CKPT --workdir W
  python train.py --config configs/finetune_cifar100.py:b16,448 --config.init.checkpoint=CKPT --workdir W
CKPT: a released .npz (e.g. imagenet21k_Mixer-B_16.npz) or a pre-training workdir of ours.
"""

from configs import finetune


def get_config(arg: str = "b16"):
  return finetune.finetune_config(
      arg, dataset="cifar100", steps=10_000, train_split="train", test_split="test")
