"""Your own images as a tfds dataset: `--config.dataset=folder:PATH`.

Layouts. PATH holds either split folders of class folders (PATH/train/cat/1.jpg, PATH/test/cat/2.png), or
class folders only (PATH/cat/1.jpg), of which a stratified TEST_FRACTION becomes `test` and the rest `train`.
- The split layout is recognised by its names alone: PATH/train/ beside PATH/test/ or PATH/validation/
  (any case; val/ is validation/). Only those split folders are read; any other folder beside them (e.g.
  to_classify/) is named as ignored, never read as a class. So a class-folder layout cannot have classes
  named both `train` and `test` (or `validation`): rename one. A split folder that holds images but no class
  folders is refused (it looks like a class), and so are two folders for one split (val/ and validation/).
- Otherwise every folder in PATH is a class. A folder named train/ (without test/ or validation/) that holds
  no images of its own but has folders of images is refused: a split layout without a held-out split.
- A dataset needs two classes or more. Only the images directly in a class folder are read; images further
  down, images outside class folders, class folders without images and files that are no image (by
  extension, EXTENSIONS) are named as ignored in one warning line each. Hidden files and folders (`.*`,
  macOS's `._*` and __MACOSX) are skipped silently.

Images. Each image is opened at preparation as a user's viewer opens it (Pillow: its first frame, as
stored, without EXIF rotation as tfds and torchvision read it) and stored as bytes that every decode op
reads with 1 or 3 channels: the file's own bytes when it is an 8-bit grayscale or RGB JPEG or PNG, else
its pixels as a lossless PNG, in RGB (CMYK, palette, 16-bit and float converted; alpha dropped, as
TensorFlow's decoders do) or grayscale. An image that cannot be read is named at preparation
(config.bad_images="fail") or left out with a warning ("skip"); nothing fails later. mixer.predict reads
files through the same image_bytes().

The prepared copy lives in tfds's data_dir, once per version of the folder: adding, removing or changing
an image prepares a new copy.
"""

import hashlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

PREFIX = "folder:"
TEST_FRACTION = 0.2  # held out as `test` when PATH has no split folders (as the embedded digits).
_SPLIT_SEED = 0
EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}  # folder: split
_SYSTEM_FILES = ("__MACOSX", "Thumbs.db", "desktop.ini")  # written by file managers: skipped like hidden files.
_EXAMPLES = 3  # paths shown in a warning about ignored files.
_warned = set()  # warnings already given in this process: the builder is made several times per run.
# What a scan ignores, one warning line each.
_BESIDE = "folders beside the split folders (only train/, validation/ or val/, and test/ are read)"
_LOOSE = "images outside class folders (they have no class)"
_NESTED = "images in sub-folders of class folders (only the images directly in a class folder are read)"
_NOT_IMAGES = "files that are not images (by their extension)"
_EMPTY = "class folders without images of their own"


def is_folder(name: str) -> bool:
  return str(name).startswith(PREFIX)


def _hidden(name: str) -> bool:
  return name.startswith(".") or name in _SYSTEM_FILES


def _is_image(name: str) -> bool:
  return name.lower().endswith(EXTENSIONS)


def _entries(directory: str) -> tuple[list[str], list[str]]:
  """(folders, files) directly in `directory`, by name, hidden ones left out."""
  names = sorted(n for n in os.listdir(directory) if not _hidden(n))
  folders = [n for n in names if os.path.isdir(os.path.join(directory, n))]
  return folders, [n for n in names if n not in folders and os.path.isfile(os.path.join(directory, n))]


def list_images(directory: str) -> list[str]:
  """The image files directly in `directory` (by extension, EXTENSIONS), by name; hidden ones left out."""
  return [os.path.join(directory, f) for f in _entries(directory)[1] if _is_image(f)]


def _nested_images(directory: str) -> list[str]:
  """Image files anywhere below `directory`'s sub-folders (not directly in it)."""
  found = []
  for folder in _entries(directory)[0]:
    for parent, folders, files in os.walk(os.path.join(directory, folder)):
      folders[:] = sorted(d for d in folders if not _hidden(d))
      found += [os.path.join(parent, f) for f in sorted(files) if _is_image(f) and not _hidden(f)]
  return found


class _Ignored:
  """What a scan leaves out, reported in one warning line per kind."""

  def __init__(self, root: str):
    self.root = root
    self.kinds: dict[str, list[str]] = {}

  def add(self, kind: str, paths: list[str]) -> None:
    self.kinds.setdefault(kind, []).extend(paths)

  def warn(self) -> None:
    for kind, paths in self.kinds.items():
      if not paths:
        continue
      shown = ", ".join(os.path.relpath(p, self.root) + ("/" if p.endswith("/") else "") for p in paths[:_EXAMPLES])
      more = f" and {len(paths) - _EXAMPLES} more" if len(paths) > _EXAMPLES else ""
      message = f"config.dataset={PREFIX}{self.root}: ignored {len(paths)} {kind}: {shown}{more}"
      _warn_once(message)


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.warning("%s", message)


def _not_images(directory: str, files: list[str]) -> list[str]:
  return [os.path.join(directory, f) for f in files if not _is_image(f)]


def _read_classes(directory: str, ignored: _Ignored) -> dict[str, list[str]]:
  """{class: its images} of the class folders in `directory`; files beside them and deeper images ignored."""
  folders, files = _entries(directory)
  ignored.add(_LOOSE, [os.path.join(directory, f) for f in files if _is_image(f)])
  ignored.add(_NOT_IMAGES, _not_images(directory, files))
  classes = {}
  for label in folders:
    path = os.path.join(directory, label)
    classes[label] = list_images(path)
    ignored.add(_NESTED, _nested_images(path))
    ignored.add(_NOT_IMAGES, _not_images(path, _entries(path)[1]))
    if not classes[label]:
      ignored.add(_EMPTY, [path + "/"])
  return classes


def scan(root: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(image path, class name), ...]} of the folder (see the module docstring for the layouts)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"config.dataset={PREFIX}{root}: {root} is not a directory")
  name = f"config.dataset={PREFIX}{root}"
  top, _ = _entries(root)
  ignored = _Ignored(root)
  folders = {}  # split: its folders
  for d in top:
    if d.lower() in SPLITS:
      folders.setdefault(SPLITS[d.lower()], []).append(d)
  if "train" in folders and ("test" in folders or "validation" in folders):
    twice = next((f for f in folders.values() if len(f) > 1), None)
    if twice:
      raise ValueError(f"{name}: {' and '.join(d + '/' for d in twice)} are one split; merge them or rename one")
    ignored.add(_BESIDE, [os.path.join(root, d) + "/" for d in top if d.lower() not in SPLITS])
    files = _entries(root)[1]
    ignored.add(_LOOSE, [os.path.join(root, f) for f in files if _is_image(f)])
    ignored.add(_NOT_IMAGES, _not_images(root, files))
    splits = {}
    for split in (s for s in ("train", "validation", "test") if s in folders):
      folder, = folders[split]
      path = os.path.join(root, folder)
      if list_images(path) and not _entries(path)[0]:
        raise ValueError(f"{name}: {path} holds images but no class folders; with train/ beside test/ or "
                         f"validation/ PATH is read as SPLIT/CLASS/IMAGE (if {folder}/ is a class, rename it)")
      classes = _read_classes(path, ignored)
      splits[split] = [(image, label) for label, images in classes.items() for image in images]
    labels = {split: {label for _, label in examples} for split, examples in splits.items()}
    unseen = sorted(set().union(*labels.values()) - labels["train"])
    if unseen:
      _warn_once(f"{name}: classes without train images (the model cannot learn them): {', '.join(unseen)}")
  else:
    train = os.path.join(root, folders["train"][0]) if "train" in folders else None
    if train and not list_images(train) and _nested_images(train):
      raise ValueError(f"{name}: {train} holds class folders, but {root} has no test/ or validation/ beside "
                       f"it: add one ({root}/test/CLASS/IMAGE), or move the class folders up into {root} to hold "
                       f"out {TEST_FRACTION:.0%} of each class as test")
    classes = _read_classes(root, ignored)
    everything = [(image, label) for label, images in classes.items() for image in images]
    rng = np.random.default_rng(_SPLIT_SEED)
    labels = np.array([label for _, label in everything])
    test = np.zeros(len(everything), bool)
    for label in sorted(set(labels)):
      members = rng.permutation(np.flatnonzero(labels == label))
      test[members[:round(len(members) * TEST_FRACTION)]] = True
    splits = {"train": [e for e, t in zip(everything, test, strict=True) if not t],
              "test": [e for e, t in zip(everything, test, strict=True) if t]}
  found = {label for examples in splits.values() for _, label in examples}
  # A class folder empty in one split is no news when the class has images in another.
  ignored.kinds[_EMPTY] = [p for p in ignored.kinds.get(_EMPTY, []) if os.path.basename(p[:-1]) not in found]
  ignored.warn()
  if not found:
    raise ValueError(f"{name}: no images ({', '.join(EXTENSIONS)}) in class folders under {root} "
                     f"(expected {root}/CLASS/IMAGE or {root}/train/CLASS/IMAGE beside {root}/test/CLASS/IMAGE)")
  if len(found) == 1:
    raise ValueError(f"{name}: one class ({found.pop()}); a classifier needs two or more class folders "
                     f"({root}/CLASS/IMAGE)")
  return splits


def class_names(splits: dict[str, list[tuple[str, str]]]) -> list[str]:
  """The classes of a scan, sorted: label i is the i-th."""
  return sorted({label for examples in splits.values() for _, label in examples})


def files_digest(root: str, splits: dict) -> str:
  """sha256 of a scan's file list (each file's split, class, path under root and size), not of its location or
  times: the same for a copied folder, another for a renamed class or an added file. The run's record keeps it."""
  digest = hashlib.sha256()
  for split, examples in sorted(splits.items()):
    for path, label in examples:
      digest.update(f"{split}\0{label}\0{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
  return digest.hexdigest()


def _fingerprint(root: str, splits: dict) -> str:
  digest = hashlib.sha256(os.path.abspath(root).encode())
  for split, examples in sorted(splits.items()):
    for path, label in examples:
      stat = os.stat(path)
      digest.update(f"{split}\0{label}\0{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:16]


def _pixels(image):
  """An opened PIL image as 8-bit grayscale ("L") or RGB."""
  if image.mode in ("L", "RGB"):
    return image
  if image.mode.startswith(("I", "F")):  # 16- or 32-bit integers, or floats: one channel.
    values = np.asarray(image, np.float64)
    if image.mode.startswith("I;16"):
      top = 65535
    elif image.mode == "F":
      top = 1.0 if values.max(initial=0) <= 1 else 255
    else:
      top = next((t for t in (255, 65535) if values.max(initial=0) <= t), values.max())
    return Image.fromarray(np.clip(np.round(values * 255 / top), 0, 255).astype(np.uint8), "L")
  return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")  # CMYK, palette, alpha, YCbCr, ...


def _decodes(data: bytes) -> bool:
  # Here, not at the top: mixer.predict imports this module to list a user's images before TensorFlow's slow,
  # noisy start (cli.setup_logging); tensorflow_datasets above imports TensorFlow lazily.
  import tensorflow as tf
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
    return True
  except tf.errors.OpError:
    return False


def image_bytes(path: str) -> bytes:
  """The bytes stored for the image file `path` (see the module docstring): an 8-bit grayscale or RGB JPEG
  or PNG. Raises ValueError("not a readable image (why)") for a file that Pillow cannot read."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # the first frame, fully: a truncated file fails here.
      # MPO: a camera's JPEG with extra frames after the first, which is all that decoders read.
      eight_bit = image.format in ("JPEG", "MPO") or (image.format == "PNG" and data[24:25] == b"\x08")  # IHDR
      if image.format in ("JPEG", "MPO", "PNG") and image.mode in ("L", "RGB") and eight_bit and _decodes(data):
        return data
      pixels = _pixels(image)
      out = io.BytesIO()
      pixels.save(out, "PNG")
      return out.getvalue()
  except Image.UnidentifiedImageError:
    raise ValueError("not a readable image (no image format that Pillow knows, or damaged)") from None
  except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError, ...).
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"not a readable image ({reason})") from None


class Folder(tfds.core.GeneratorBasedBuilder):
  """Images in class folders; one builder config per folder version (see the module docstring)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Class folders, optionally under split folders.",
                   "2.0.0": "Images stored as 8-bit grayscale/RGB JPEG or PNG, readable by every decode op; "
                            "split layouts read train/, validation/, test/ only."}

  def __init__(self, *, root: str, bad_images: str = "fail", **kwargs):
    if bad_images not in ("fail", "skip"):
      raise ValueError(f"config.bad_images={bad_images!r} is not one of fail, skip")
    self._root = os.path.abspath(root)
    self._splits = scan(self._root)
    self._bad_images = bad_images
    self._classes = class_names(self._splits)
    config = tfds.core.BuilderConfig(name=_fingerprint(self._root, self._splits), description=self._root)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Grayscale or RGB: the config's preprocessing (decode(channels=...)) decides.
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

  @property
  def files_digest(self) -> str:
    """files_digest of the folder as this builder scanned it."""
    return files_digest(self._root, self._splits)

  def _generate_examples(self, examples):
    for path, label in examples:
      try:
        data = image_bytes(path)
      except ValueError as e:
        if self._bad_images != "skip":
          raise ValueError(f"{path} is {e}; --config.bad_images=skip leaves such images out") from None
        logging.warning("Left out %s: %s", path, e)
        continue
      yield os.path.relpath(path, self._root), {"image": data, "label": label,
                                                 "file": os.path.relpath(path, self._root)}


def builder(spec: str, data_dir: str | None = None, bad_images: str = "fail") -> tfds.core.DatasetBuilder:
  """The builder of `folder:PATH` (not prepared: the input pipeline prepares it on first use)."""
  root = spec[len(PREFIX):]
  if not root:
    raise ValueError(f"config.dataset={spec!r} names no folder: folder:PATH")
  return Folder(root=root, bad_images=bad_images, data_dir=data_dir)
