"""ImageNet-21k as a tfds dataset, built from the image-net.org release that the user downloads.

ImageNet-21k has no official validation split: the first 5 images (by file name) of every class are
held out as "validation", the rest is "train".

Prepare (once; the archive is ~1.1 TB):
  mkdir -p DATA_DIR/downloads/manual/imagenet21k
  tar xf winter21_whole.tar.gz -C DATA_DIR/downloads/manual/imagenet21k --strip-components=1
  python -c "import mixer.datasets, tensorflow_datasets as tfds; \\
             tfds.builder('imagenet21k/winter21', data_dir='DATA_DIR').download_and_prepare()"
(fall11_whole.tar, the release the paper used, works the same with imagenet21k/fall11.) The folder
then holds one nXXXXXXXX.tar per class (or one folder of JPEGs per class).
"""

import io
import os
import tarfile

import tensorflow_datasets as tfds
from absl import logging

HELD_OUT_PER_CLASS = 5


class Imagenet21kConfig(tfds.core.BuilderConfig):
  def __init__(self, *, num_classes: int, **kwargs):
    super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
    self.num_classes = num_classes


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21k (Deng et al. 2009): ~13M images of the WordNet synsets, one label each."""

  BUILDER_CONFIGS = [
      Imagenet21kConfig(name="fall11", num_classes=21841, description="fall11_whole.tar (the paper's)"),
      Imagenet21kConfig(name="winter21", num_classes=19167, description="winter21_whole.tar.gz (current)"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.image-net.org/",
    )

  def _split_generators(self, dl_manager):
    root = os.path.join(dl_manager.manual_dir, "imagenet21k")
    synsets = list_synsets(root)
    if len(synsets) != self.builder_config.num_classes:
      raise ValueError(f"{root} holds {len(synsets)} classes, imagenet21k/{self.builder_config.name} has "
                       f"{self.builder_config.num_classes}: is the archive completely extracted?")
    self.info.features["label"].names = synsets
    return {"train": self._generate_examples(root, synsets, held_out=False),
            "validation": self._generate_examples(root, synsets, held_out=True)}

  def _generate_examples(self, root, synsets, held_out):
    for label, synset in enumerate(synsets):
      for i, (name, data) in enumerate(read_class(root, synset)):
        if (i < HELD_OUT_PER_CLASS) == held_out:
          yield name, {"image": io.BytesIO(as_jpeg(data)), "label": label, "file_name": name}


def as_jpeg(data: bytes) -> bytes:
  """The image as JPEG bytes: tfds stores the file's bytes as they are, and the training pipeline's
  decode_jpeg_and_inception_crop reads JPEG only, so another format (a PNG named .JPEG, as ImageNet-1k
  has) is re-encoded, as tfds's imagenet2012 builder does."""
  if data[:3] == b"\xff\xd8\xff":
    return data
  # Here, not at the top: mixer.predict imports mixer.datasets (for datasets/folder.py) to check a user's paths
  # before TensorFlow's slow, noisy start (cli.setup_logging).
  import tensorflow as tf
  try:
    return tf.io.encode_jpeg(tf.io.decode_image(data, channels=3, expand_animations=False), quality=100).numpy()
  except tf.errors.InvalidArgumentError:  # unreadable: stored as it is, for bad_images to handle in training.
    logging.warning("ImageNet-21k: a file (%d bytes) is neither JPEG nor a readable image; stored as it is",
                    len(data))
    return data


def list_synsets(root: str) -> list[str]:
  """The class folders or per-class tars under root, sorted: their order defines the labels."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root} does not exist; see the instructions in mixer/datasets/imagenet21k.py")
  names = {entry[:-4] if entry.endswith(".tar") else entry for entry in os.listdir(root)
           if entry.startswith("n") and (entry.endswith(".tar") or os.path.isdir(os.path.join(root, entry)))}
  return sorted(names)


def read_class(root: str, synset: str):
  """(file name, JPEG bytes) of one class, sorted by file name, from its tar or its folder."""
  folder = os.path.join(root, synset)
  if os.path.isdir(folder):
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), "rb") as f:
        yield name, f.read()
    return
  with tarfile.open(folder + ".tar") as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
    for member in members:
      yield os.path.basename(member.name), tar.extractfile(member).read()
