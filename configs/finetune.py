"""The paper's fine-tuning recipe (Sec. 3 and App. C, following ViT): SGD with momentum 0.9, batch 512,
cosine decay after a linear warm-up, gradient clipping at norm 1, no weight decay, no mixup; a new
zero-initialised head. The per-dataset configs (finetune_*.py) set the dataset and the step count.

Resolution: 224 by default; the paper's Table 2 fine-tunes at 448 ("b16,448"): 448 from a 224
checkpoint doubles the token grid, and token mixing is initialised block-diagonally (App. C).
"""

import ml_collections

from configs import default, mixer_imagenet2012


def parse(arg: str) -> tuple[str, int]:
  """'b16' or 'b16,448' -> ('B/16', 448); a ValueError naming the valid forms for anything else."""
  name, comma, resolution = (arg or "b16").partition(",")
  variant = mixer_imagenet2012.variant(name)
  if comma and not (resolution.isdigit() and int(resolution) > 0):
    raise ValueError(f"{resolution or '(nothing)'} after the comma is not a resolution in pixels: the argument is "
                     f"VARIANT or VARIANT,RESOLUTION (e.g. b16,448)")
  resolution = int(resolution or 224)
  patch = int(variant.split("/")[1])
  if resolution % patch:
    raise ValueError(f"resolution {resolution} is not a multiple of {variant}'s patch size {patch}")
  return variant, resolution


def finetune_config(arg: str, dataset: str, steps: int, train_split: str = "train",
                    test_split: str = "test") -> ml_collections.ConfigDict:
  """The recipe for a per-dataset config's argument (see parse)."""
  return recipe(*parse(arg), dataset=dataset, steps=steps, train_split=train_split, test_split=test_split)


def recipe(variant: str, resolution: int, dataset: str, steps: int, train_split: str = "train",
           test_split: str = "test") -> ml_collections.ConfigDict:
  """The recipe for `variant` (e.g. 'B/16') at `resolution` pixels on a tfds dataset, `steps` long."""
  config = default.get_config()
  config.dataset, config.train_split, config.evals.eval.split = dataset, train_split, test_split
  config.model.variant = variant
  config.model.dtype = "bfloat16"
  config.init.checkpoint = None  # set it: --config.init.checkpoint=imagenet21k_Mixer-B_16.npz or a workdir.
  config.init.new_head = True
  config.init.token_mixing = "block_diagonal"
  # Train: inception crop + flip; eval: App. C's "resize-crop", resize to 256/224 of the size, central crop.
  config.pp_train = f"decode(channels=3)|inception_crop({resolution})|flip_lr|value_range(-1, 1)"
  eval_resize = resolution * 256 // 224
  config.pp_eval = f"decode(channels=3)|resize({eval_resize})|central_crop({resolution})|value_range(-1, 1)"
  # evaluate.py --fewshot on a fine-tuned model: the paper's small few-shot datasets, at its resolution.
  config.evals.fewshot.datasets = {
      "cifar10": ("cifar10", "train", "test"), "cifar100": ("cifar100", "train", "test"),
      "oxford_iiit_pet": ("oxford_iiit_pet", "train", "test"),
      "oxford_flowers102": ("oxford_flowers102", "train", "test")}
  config.evals.fewshot.pp = f"decode(channels=3)|resize({resolution})|value_range(-1, 1)"
  config.shuffle_buffer = 50_000
  config.batch_size = 512  # Sec. 3.
  config.eval_batch_size = 512
  config.optim.name = "sgd"  # Sec. 3: momentum SGD.
  config.optim.momentum = 0.9
  config.lr = 0.03  # the paper sweeps {0.003, 0.01, 0.03, 0.06} (App. C).
  config.weight_decay = 0.0  # Sec. 3: no weight decay.
  config.schedule = "cosine"  # Sec. 3: cosine decay with linear warm-up.
  config.warmup_steps = min(500, steps // 10)
  config.grad_clip_norm = 1.0  # Sec. 3.
  config.mixup = 0.0
  config.total_steps = steps
  config.log_every_steps = 50
  config.evals.eval.every_steps = max(steps // 10, 100)
  config.checkpoint_every_steps = max(steps // 10, 100)
  return config
