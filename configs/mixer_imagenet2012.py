"""Mixer pre-trained on ImageNet-1k at 224px, the paper's recipe (Sec. 3, App. B, Table 4).

  python train.py --config configs/mixer_imagenet2012.py:b16 --config.data_dir=DATA_DIR --workdir W
The argument picks the variant: s32, s16, b32, b16, l32, l16, h14 (Table 4 gives B and L; the others
reuse that recipe). ImageNet must be prepared once: `tfds build imagenet2012 --data_dir=DATA_DIR`
with the archives in DATA_DIR/downloads/manual.
"""

import ml_collections

from configs import default

# What the argument may name: the paper's variants (Table 1). None or "" means b16.
VARIANTS = ("s32", "s16", "b32", "b16", "l32", "l16", "h14")


def variant(arg: str) -> str:
  """'b16' (or 'B16', 'B/16') -> 'B/16'; a ValueError naming the valid ones for anything else."""
  name = (arg or "b16").replace("/", "").lower()
  if name not in VARIANTS:
    raise ValueError(f"{arg} is not a variant of this config ({', '.join(VARIANTS)})")
  return f"{name[0].upper()}/{name[1:]}"


def pretraining_config(arg: str) -> ml_collections.ConfigDict:
  """What every paper pre-training run shares (Sec. 3 and App. B)."""
  config = default.get_config()
  config.model.variant = variant(arg)
  config.model.dtype = "bfloat16"
  config.batch_size = 4096  # Sec. 3.
  config.eval_batch_size = 4096
  config.shuffle_buffer = 250_000
  config.optim.name = "adam"  # Sec. 3: Adam with beta1 0.9, beta2 0.999.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.schedule = "linear"  # Sec. 3: linear warm-up of 10k steps, then linear decay.
  config.warmup_steps = 10_000
  config.grad_clip_norm = 1.0  # Sec. 3: global norm 1.
  config.pp_eval = "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"
  # The paper's few-shot datasets (its Avg5 tasks), at the pre-training resolution; during pre-training
  # only ImageNet 5-shot, the paper's curve (Fig. 3 right, Fig. 4).
  config.evals.fewshot.datasets = {
      "imagenet2012": ("imagenet2012", "train", "validation"),
      "cifar10": ("cifar10", "train", "test"), "cifar100": ("cifar100", "train", "test"),
      "oxford_iiit_pet": ("oxford_iiit_pet", "train", "test"),
      "oxford_flowers102": ("oxford_flowers102", "train", "test")}
  config.evals.fewshot.pp = "decode(channels=3)|resize(224)|value_range(-1, 1)"
  config.evals.fewshot.batch_size = 1024
  config.evals.fewshot.every_steps = 0
  config.log_every_steps = 50
  config.evals.eval.every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  # Layout, from the TPU compiler at batch 4096 on a v3-256 slice (benchmarks/memory.py --topologies v3:8x16
  # --search; README, Memory per device): every variant fits a v3 core's 16 GB replicated or FSDP, with no
  # remat and one micro-batch, and FSDP is the faster in the compiler's estimate for all seven (each core runs
  # Adam on 1/256 of the parameters instead of all of them; B/16 25.1 vs 28.3 ms, H/14 215 vs 233 ms).
  config.param_sharding = "fsdp"
  config.model.remat = False
  config.grad_accum_steps = 1
  return config


def get_config(arg: str = "b16") -> ml_collections.ConfigDict:
  config = pretraining_config(arg)
  config.dataset = "imagenet2012"
  config.train_split = "train"
  config.evals.eval.split = "validation"
  # Table 4 (B and L on ImageNet): RandAugment 15, mixup 0.5, stochastic depth 0.1, 300 epochs.
  config.pp_train = ("decode_jpeg_and_inception_crop(224)|flip_lr|randaugment(2, 15)|value_range(-1, 1)")
  config.mixup = 0.5
  config.model.stoch_depth = 0.1
  config.lr = 1e-3
  config.weight_decay = 0.1
  config.total_epochs = 300.0
  return config
