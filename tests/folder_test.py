"""Tests for mixer/datasets/folder.py: every image format a user has, through the real pipeline and predict,
and how the folder layouts are read."""

import logging
import os

import numpy as np
import pytest

from mixer import dataset, input_pipeline, predict, sharding
from mixer.datasets import folder
from tests.conftest import model_and_params, small_config

# name: (PIL format, PIL mode, save options); each is one file per class.
FORMATS = {
    "baseline.jpg": ("JPEG", "RGB", {}),
    "gray.jpeg": ("JPEG", "L", {}),
    "cmyk.jpg": ("JPEG", "CMYK", {}),
    "progressive.jpg": ("JPEG", "RGB", {"progressive": True}),
    "rgb.png": ("PNG", "RGB", {}),
    "sixteen_bit.png": ("PNG", "I;16", {}),
    "palette.png": ("PNG", "P", {}),
    "alpha.png": ("PNG", "RGBA", {}),
    "animated.gif": ("GIF", "P", {"save_all": True}),
    "photo.webp": ("WEBP", "RGB", {}),
    "bitmap.bmp": ("BMP", "RGB", {}),
    "scan.tiff": ("TIFF", "RGB", {}),
}


def _image(mode: str, value: int, size=(20, 24)):
  from PIL import Image
  h, w = size
  ramp = np.add.outer(np.arange(h), np.arange(w)) * 4 % 200
  rgb = np.stack([ramp + value, np.full((h, w), value), 255 - ramp - value], -1).clip(0, 255).astype(np.uint8)
  if mode == "I;16":
    return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
  return Image.fromarray(rgb).convert(mode)


@pytest.fixture(scope="module")
def formats_folder(tmp_path_factory) -> str:
  """cat/ and dog/ with one image of each of FORMATS, cat/broken.jpg (corrupt), and what file managers
  leave beside them: macOS's ._ files and .DS_Store, a text file."""
  root = tmp_path_factory.mktemp("formats")
  for value, label in ((30, "cat"), (120, "dog")):
    (root / label).mkdir()
    for name, (fmt, mode, options) in FORMATS.items():
      image = _image(mode, value)
      if options.get("save_all"):
        options = {**options, "append_images": [_image(mode, 255 - value)]}
      image.save(root / label / name, fmt, **options)
      (root / label / f"._{name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")
  (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  (root / "dog" / "notes.txt").write_text("taken in 2019")
  return str(root)


def test_every_image_format_trains_evaluates_and_predicts(formats_folder, tmp_path, caplog):
  broken = os.path.join(formats_folder, "cat", "broken.jpg")
  config = small_config(str(tmp_path), dataset=f"folder:{formats_folder}", batch_size=8, eval_batch_size=8)
  with pytest.raises(ValueError, match=f"^{broken} is not a readable image .*bad_images=skip leaves"):
    dataset.get_builder(config)  # named at preparation, in one line.
  config.bad_images = "skip"
  builder = dataset.get_builder(config)
  info = dataset.get_info(config, builder)
  assert builder.info.features["label"].names == ["cat", "dog"]
  assert info.num_train_examples + info.num_eval_examples == 2 * len(FORMATS)  # all but broken.jpg
  mesh = sharding.create_mesh({"data": -1, "model": 1})
  # The default config decodes one channel (the digits); an ImageNet config decodes JPEG crops of 3.
  rgb = small_config(str(tmp_path), dataset=config.dataset, batch_size=8, eval_batch_size=8, bad_images="skip",
                     pp_train="decode_jpeg_and_inception_crop(16)|flip_lr|value_range(-1, 1)",
                     pp_eval="decode|resize(16)|value_range(-1, 1)")
  caplog.set_level(logging.WARNING)
  for c, channels, epochs in ((config, 1, 2), (rgb, 3, 1)):
    it = input_pipeline.train_iterator(c, builder, info, mesh)
    for _ in range(epochs * input_pipeline.steps_per_epoch(c, info)):  # nothing is skipped in any epoch.
      assert next(it)["image"].shape == (8, 16, 16, channels)
    masks = [np.asarray(b["mask"]).sum() for b in input_pipeline.eval_iterator(c, builder, info, mesh)]
    assert sum(masks) == info.num_eval_examples
  assert not [r for r in caplog.records if "Skipped" in r.getMessage()]
  model, params, _ = model_and_params(num_classes=2)
  paths = [os.path.join(formats_folder, label, name) for label in ("cat", "dog") for name in FORMATS] + [broken]
  results = predict.predict(rgb, model, params, paths, top=2)
  assert [len(r.get("top", ())) for r in results] == [2] * (len(paths) - 1) + [0]
  assert {t["class"] for r in results[:-1] for t in r["top"]} == {"cat", "dog"}
  assert results[-1]["error"].startswith("not a readable image (")


def test_stored_pixels_are_the_images_pixels(tmp_path):
  """Re-encoded images keep their pixels: 16-bit scaled to 8, CMYK and palette as Pillow shows them in RGB."""
  import tensorflow as tf
  from PIL import Image
  for name in ("sixteen_bit.png", "palette.png", "cmyk.jpg", "animated.gif", "scan.tiff", "alpha.png"):
    fmt, mode, options = FORMATS[name]
    first = _image(mode, 30)
    options = {**options, "append_images": [_image(mode, 200)]} if options.get("save_all") else options
    first.save(tmp_path / name, fmt, **options)
    stored = tf.io.decode_image(folder.image_bytes(str(tmp_path / name)), channels=3).numpy()
    with Image.open(tmp_path / name) as opened:  # the first frame, as Pillow reads the file.
      expected = np.asarray(opened.convert("RGB")) if mode != "I;16" else \
          np.repeat(np.round(np.asarray(opened, float) / 257)[..., None], 3, -1)
    np.testing.assert_allclose(stored, expected, atol=1, err_msg=name)
  assert folder.image_bytes(str(tmp_path / "cmyk.jpg")).startswith(b"\x89PNG")  # re-encoded losslessly
  _image("RGB", 30).save(tmp_path / "plain.jpg")
  assert folder.image_bytes(str(tmp_path / "plain.jpg")) == (tmp_path / "plain.jpg").read_bytes()  # kept


def _files(root, *paths):
  for path in paths:
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    open(os.path.join(root, path), "wb").close()
  return str(root)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_split_layout_is_told_by_its_split_folders_and_ignores_others(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  root = _files(tmp_path, "train/cat/1.jpg", "train/dog/2.jpg", "test/cat/3.jpg", "test/dog/4.jpg",
                "to_classify/5.jpg", "to_classify/6.jpg", "extra/cat/7.jpg")
  splits = folder.scan(root)
  assert {s: [os.path.relpath(p, root) for p, _ in e] for s, e in splits.items()} == {
      "train": ["train/cat/1.jpg", "train/dog/2.jpg"], "test": ["test/cat/3.jpg", "test/dog/4.jpg"]}
  assert folder.class_names(splits) == ["cat", "dog"]
  beside = [w for w in _warnings(caplog) if "folders beside the split folders" in w]
  assert len(beside) == 1 and "ignored 2 folders" in beside[0] and "extra/, to_classify/" in beside[0]
  root = _files(tmp_path / "v", "train/cat/1.jpg", "train/dog/2.jpg", "validation/cat/3.jpg", "validation/dog/4.jpg")
  assert set(folder.scan(root)) == {"train", "validation"}
  root = _files(tmp_path / "case", "Train/cat/1.jpg", "Train/dog/2.jpg", "val/cat/3.jpg", "val/dog/4.jpg")
  assert {s: len(e) for s, e in folder.scan(root).items()} == {"train": 2, "validation": 2}


def test_nested_hidden_and_unsupported_files_are_named_not_read(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  root = _files(tmp_path, *[f"cat/{i}.jpg" for i in range(5)], *[f"dog/{i}.png" for i in range(5)],
                "cat/more/a.jpg", "cat/more/b.jpg", "dog/old/deeper/c.gif", "cat/._0.jpg", "dog/.hidden.png",
                ".DS_Store", "__MACOSX/cat/._1.jpg", "cat/notes.txt", "dog/raw.cr2", "loose.jpg", "empty/x.txt")
  splits = folder.scan(root)
  read = sorted(os.path.relpath(p, root) for e in splits.values() for p, _ in e)
  assert read == [f"cat/{i}.jpg" for i in range(5)] + [f"dog/{i}.png" for i in range(5)]
  warnings = _warnings(caplog)
  assert len(warnings) == 4, warnings
  nested, = [w for w in warnings if "sub-folders of class folders" in w]
  assert "ignored 3 images" in nested and "cat/more/a.jpg" in nested
  other, = [w for w in warnings if "not images" in w]
  assert "ignored 3 files" in other and "dog/raw.cr2" in other and "cat/notes.txt" in other
  assert any("outside class folders" in w and "loose.jpg" in w for w in warnings)
  assert any("without images" in w and "empty/" in w for w in warnings)
  assert not any("._" in w or "MACOSX" in w or "DS_Store" in w or ".hidden" in w for w in warnings)
  folder.scan(root)  # warned once per process, not at every scan of a run.
  assert len(_warnings(caplog)) == 4


def test_one_class_and_ambiguous_layouts_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"folder:.*one: one class \(cat\); a classifier needs two or more"):
    folder.scan(_files(tmp_path / "one", "cat/1.jpg", "cat/2.jpg", "notes/x.txt"))
  with pytest.raises(ValueError, match=r"split/train holds images but no class folders"):
    folder.scan(_files(tmp_path / "split", "train/1.jpg", "test/2.jpg"))
  with pytest.raises(ValueError, match=r"val/ and validation/ are one split; merge them or rename one"):
    folder.scan(_files(tmp_path / "twice", "train/cat/1.jpg", "val/cat/2.jpg", "validation/dog/3.jpg"))
  with pytest.raises(ValueError, match=r"train holds class folders, but .* has no test/ or validation/"):
    folder.scan(_files(tmp_path / "train_only", "train/cat/1.jpg", "train/dog/2.jpg"))
  # A class named train, without test/ beside it, is a class.
  splits = folder.scan(_files(tmp_path / "trains", *[f"{c}/{i}.jpg" for c in ("train", "bus") for i in range(5)]))
  assert folder.class_names(splits) == ["bus", "train"] and len(splits["test"]) == 2


def test_a_changed_folder_is_prepared_anew(tmp_path):
  root = _files(tmp_path, "cat/1.jpg", "dog/2.jpg")
  before = folder._fingerprint(root, folder.scan(root))
  _files(tmp_path, "notes.txt", "cat/.hidden.jpg")
  assert folder._fingerprint(root, folder.scan(root)) == before  # nothing read changed
  _files(tmp_path, "cat/3.jpg")
  assert folder._fingerprint(root, folder.scan(root)) != before
