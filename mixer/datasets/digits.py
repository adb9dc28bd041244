"""The embedded default dataset: the UCI handwritten digits that scikit-learn ships (no download)."""

import numpy as np
import tensorflow_datasets as tfds

_TEST_FRACTION = 0.2  # a fixed, stratified 80/20 split: scikit-learn ships no split of its own.
_SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
  """1797 grayscale 8x8 images of the digits 0-9 (Alpaydin & Kaynak 1998), pixels scaled to 0-255."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split of sklearn.datasets.load_digits."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    # Only to prepare the data, once: scikit-learn takes a second to import, and mixer.datasets is imported
    # by every run.
    from sklearn import datasets
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    test = np.zeros(len(labels), bool)
    for c in range(10):
      members = rng.permutation(np.flatnonzero(labels == c))
      test[members[:round(len(members) * _TEST_FRACTION)]] = True
    return {
        "train": self._generate_examples(images[~test], labels[~test]),
        "test": self._generate_examples(images[test], labels[test]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels, strict=False)):
      yield i, {"image": image, "label": label}
