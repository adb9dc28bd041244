"""Your own images as a tfds dataset: `--config.dataset=folder:PATH`.

PATH holds either split folders of class folders (PATH/train/cat/1.jpg, PATH/test/cat/2.png; any split
names), or class folders only (PATH/cat/1.jpg), of which a stratified TEST_FRACTION becomes `test` and the
rest `train`. The images are stored as they are (their own JPEG/PNG/... bytes) in tfds's data_dir, once
per version of the folder: adding, removing or changing a file prepares a new copy. An image that
TensorFlow cannot decode is named at preparation (config.bad_images="fail") or left out with a warning
("skip").
"""

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

PREFIX = "folder:"
TEST_FRACTION = 0.2  # held out as `test` when PATH has no split folders (as the embedded digits).
_SPLIT_SEED = 0
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def is_folder(name: str) -> bool:
  return str(name).startswith(PREFIX)


def list_images(directory: str) -> list[str]:
  """The image files directly in `directory`, by name."""
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def scan(root: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(image path, class name), ...]} of the folder (see the module docstring)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.dataset={PREFIX}{root}: {root} is not a directory")
  top = _subdirs(root)
  # Split folders hold class folders; class folders hold images.
  nested = top and all(_subdirs(os.path.join(root, d)) for d in top)
  if nested:
    splits = {split: [(path, label) for label in _subdirs(os.path.join(root, split))
                      for path in list_images(os.path.join(root, split, label))] for split in top}
  else:
    everything = [(path, label) for label in top for path in list_images(os.path.join(root, label))]
    rng = np.random.default_rng(_SPLIT_SEED)
    labels = np.array([label for _, label in everything])
    test = np.zeros(len(everything), bool)
    for label in sorted(set(labels)):
      members = rng.permutation(np.flatnonzero(labels == label))
      test[members[:round(len(members) * TEST_FRACTION)]] = True
    splits = {"train": [e for e, t in zip(everything, test, strict=True) if not t],
              "test": [e for e, t in zip(everything, test, strict=True) if t]}
  if not any(splits.values()):
    raise ValueError(f"config.dataset={PREFIX}{root}: no images ({', '.join(EXTENSIONS)}) in class folders "
                     f"under {root} (expected {root}/CLASS/IMAGE or {root}/SPLIT/CLASS/IMAGE)")
  return splits


def _fingerprint(root: str, splits: dict) -> str:
  digest = hashlib.sha256(os.path.abspath(root).encode())
  for split, examples in sorted(splits.items()):
    for path, label in examples:
      stat = os.stat(path)
      digest.update(f"{split}\0{label}\0{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


class Folder(tfds.core.GeneratorBasedBuilder):
  """Images in class folders; one builder config per folder version (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Class folders, optionally under split folders."}

  def __init__(self, *, root: str, bad_images: str = "fail", **kwargs):
    self._root = os.path.abspath(root)
    self._splits = scan(self._root)
    self._bad_images = bad_images
    self._classes = sorted({label for examples in self._splits.values() for _, label in examples})
    config = tfds.core.BuilderConfig(name=_fingerprint(self._root, self._splits), description=self._root)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Any channel count: the config's preprocessing (decode(channels=...)) decides.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self._classes),
            "file": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        description=f"Images of {len(self._classes)} classes in {self._root}.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(examples) for split, examples in self._splits.items()}

  def _generate_examples(self, examples):
    import tensorflow as tf
    for path, label in examples:
      data = tf.io.gfile.GFile(path, "rb").read()
      try:  # as the input pipeline decodes it.
        tf.io.decode_image(data, channels=3, expand_animations=False)
      except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        if self._bad_images != "skip":
          raise ValueError(f"{path} is not a readable image ({e.message.splitlines()[0]}); "
                           f"--config.bad_images=skip leaves such images out") from None
        logging.warning("Left out %s: not a readable image", path)
        continue
      yield os.path.relpath(path, self._root), {"image": data, "label": label,
                                                 "file": os.path.relpath(path, self._root)}


def builder(spec: str, data_dir: str | None = None, bad_images: str = "fail") -> tfds.core.DatasetBuilder:
  """The builder of `folder:PATH` (not prepared: the input pipeline prepares it on first use)."""
  root = spec[len(PREFIX):]
  if not root:
    raise ValueError(f"config.dataset={spec!r} names no folder: folder:PATH")
  return Folder(root=root, bad_images=bad_images, data_dir=data_dir)
