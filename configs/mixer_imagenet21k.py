"""Mixer pre-trained on ImageNet-21k at 224px, the paper's recipe (Sec. 3, App. B, Table 4).

  python train.py --config configs/mixer_imagenet21k.py:l16 --config.data_dir=DATA_DIR --workdir W
ImageNet-21k is not in the tfds catalog: mixer ships its builder. Prepare it once as the docstring of
mixer/datasets/imagenet21k.py says (extract the image-net.org archive into
DATA_DIR/downloads/manual/imagenet21k, then download_and_prepare). The paper used the fall11 release
(21,841 classes); --config.dataset=imagenet21k/winter21 reads the current one.
Paper (Table 3, fine-tuned at 224): B/16 80.64%, L/16 82.89% ImageNet top-1.
"""

import ml_collections

from configs import mixer_imagenet2012

# Table 4: RandAugment magnitude and mixup per size on ImageNet-21k (S and H are not in the paper:
# they take the nearest size's values).
_AUGMENT = {"S": (10, 0.2), "B": (10, 0.2), "L": (20, 0.5), "H": (20, 0.5)}


def get_config(arg: str = "b16") -> ml_collections.ConfigDict:
  config = mixer_imagenet2012.pretraining_config(arg)
  config.dataset = "imagenet21k/fall11"
  config.train_split = "train"
  config.evals.eval.split = "validation"  # 5 held-out images per class (the builder's).
  # Large label space: independent sigmoids (App. B of the ViT paper, which the Mixer setup follows).
  config.loss = "sigmoid_xent"
  magnitude, mixup = _AUGMENT[config.model.variant[0]]
  config.pp_train = f"decode_jpeg_and_inception_crop(224)|flip_lr|randaugment(2, {magnitude})|value_range(-1, 1)"
  config.mixup = mixup
  config.model.stoch_depth = 0.1
  config.lr = 1e-3
  config.weight_decay = 0.1
  config.total_epochs = 300.0
  return config
