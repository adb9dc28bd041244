"""Classifies your own images with a trained run or a released checkpoint: top-k classes with names.

  python -m mixer.predict --workdir workdir digit.png photos/          # a directory: all its images
  python -m mixer.predict --checkpoint imagenet1k_Mixer-B_16.npz --config configs/mixer_b16_imagenet2012.py cat.jpg
  python -m mixer.predict --workdir workdir --json digit.png
Images are read as a folder dataset stores them (any format Pillow opens: mixer/datasets/folder.py), then go
through the run's eval preprocessing (config.pp_eval); class names come from its dataset.
"""

import importlib.util
import json
import os
import re
import sys

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

# TensorFlow, and the modules that import it (dataset, preprocess), are imported inside functions: after the
# flags, paths and the workdir are checked (errors come at once) and after cli.setup_logging filters its noise.
from mixer import cli, errors, models, params_io, run_record
from mixer.datasets import folder

flags.DEFINE_string("workdir", None, "A training workdir: its newest checkpoint and config.json.")
flags.DEFINE_string("checkpoint", None, "A released .npz (or another workdir) instead of the workdir's checkpoint; "
                    "needs --config unless --workdir has config.json.")
errors.define_config_file("config", None, "Config file (model, pp_eval, dataset for class names); "
                          "default: the workdir's config.json.")
flags.DEFINE_integer("top", 5, "Classes shown per image (1 or more).")
flags.DEFINE_bool("json", False, "Print one JSON document instead of a table.")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass (1 or more).")
FLAGS = flags.FLAGS


def image_paths(args: list[str]) -> list[str]:
  """The files given, and every image directly in each directory given, in order."""
  paths = []
  for arg in args:
    if os.path.isdir(arg):
      found = folder.list_images(arg)
      if not found:
        raise ValueError(f"{arg} is a directory without images ({', '.join(folder.EXTENSIONS)})")
      paths += found
    elif os.path.isfile(arg):
      paths.append(arg)
    else:
      raise FileNotFoundError(f"{arg} is not a file or directory")
  return paths


def _lemmas() -> dict[str, str]:
  """ImageNet synset id -> readable name, from timm's table when timm is installed (benchmarks/requirements)."""
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.submodule_search_locations:
    return {}
  path = os.path.join(spec.submodule_search_locations[0], "data", "_info", "imagenet_synset_to_lemma.txt")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)


def class_names(config, num_classes: int, workdir: str | None = None) -> list[str]:
  """The names of the model's classes: those the run in `workdir` recorded when it started (never the dataset
  as it is now), else its dataset's ClassLabel names (after config.label_subset); ImageNet synset ids get
  readable names where timm is installed; "class N" when none are known."""
  names = run_record.class_names(workdir) if workdir and os.path.isdir(workdir) else None
  if names is not None:
    _warn_if_folder_changed(config, names, workdir)
  else:
    try:
      names = _dataset_class_names(config)
    except Exception as e:  # noqa: BLE001 - names are a convenience; the prediction stands without them.
      logging.warning("No class names from config.dataset=%r (%s): showing class indices", config.dataset, e)
      return [f"class {i}" for i in range(num_classes)]
  if len(names) != num_classes:
    logging.warning("config.dataset=%r has %d classes, the model %d: showing class indices", config.dataset,
                    len(names), num_classes)
    return [f"class {i}" for i in range(num_classes)]
  lemmas = _lemmas() if names and names[0].startswith("n") and names[0][1:].isdigit() else {}
  return [f"{lemmas[n]} ({n})" if n in lemmas else n for n in names]


def _dataset_class_names(config) -> list[str]:
  """config.dataset's class names as they are now, after config.label_subset (its facts without reading data)."""
  from mixer import dataset  # see the imports at the top
  return list(dataset.metadata_info(config).class_names)


def _warn_if_folder_changed(config, recorded: list[str], workdir: str) -> None:
  """Says so when the run's image folder no longer has the classes it trained on (renamed, added, removed)."""
  if not folder.is_folder(config.dataset) or not os.path.isdir(config.dataset[len(folder.PREFIX):]):
    return
  try:
    now = _dataset_class_names(config)
  except (OSError, ValueError, IndexError):  # the folder is not a dataset any more: nothing to compare.
    return
  if now != list(recorded):
    logging.warning("%s no longer has the classes that the run in %s trained on (now %s; recorded in its %s: "
                    "%s): showing the recorded names", config.dataset, workdir, now, run_record.DATASET_FILE,
                    list(recorded))


def load(config, checkpoint: str):
  """(model, params) of a workdir or .npz, in the released layout, for config.model."""
  params = params_io.load(checkpoint)
  if "head" not in params:
    raise ValueError(f"{checkpoint} has no classification head (a pre-logits release?): nothing to predict")
  num_classes = np.shape(params["head"]["kernel"])[-1]
  model = models.create_model(config.model, num_classes)
  if model.scan_blocks:
    params = models.stack_blocks(params)
  return model, params


def check_counts(top: int, batch_size: int, prefix: str = "") -> None:
  """Refuses a `top` or `batch_size` below 1 (named as `prefix`top, e.g. --top), before any work."""
  for name, value in (("top", top), ("batch_size", batch_size)):
    if value < 1:
      raise ValueError(f"{prefix}{name}={value} must be 1 or more")


def predict(config, model, params, paths: list[str], top: int, batch_size: int = 32, progress: bool = False,
            workdir: str | None = None):
  """[{"file", "top": [{"class", "index", "probability"}...]} or {"file", "error"}] for each path."""
  check_counts(top, batch_size)
  import tensorflow as tf  # see the imports at the top

  from mixer import preprocess
  pp = preprocess.get_preprocess_fn(config.pp_eval)
  names = class_names(config, np.shape(params["head"]["kernel"])[-1], workdir)
  activation = jax.nn.sigmoid if config.loss == "sigmoid_xent" else jax.nn.softmax
  apply = jax.jit(lambda p, x: activation(model.apply({"params": p}, x, train=False).astype("float32")))
  results, batch, where = [None] * len(paths), [], []

  def flush():
    if not batch:
      return
    probabilities = np.asarray(apply(params, np.stack(batch)))
    for i, p in zip(where, probabilities, strict=True):
      order = np.argsort(-p)[:top]
      results[i] = {"file": paths[i], "top": [{"class": names[c], "index": int(c), "probability": float(p[c])}
                                              for c in order]}
    batch.clear()
    where.clear()

  if progress:
    indices = tqdm(range(len(paths)), desc="images", unit="img", file=sys.stderr)
  else:
    indices = range(len(paths))
  for i in indices:
    try:  # read as a folder dataset stores it, so that any image a training run could read predicts.
      image = pp({"image": tf.constant(folder.image_bytes(paths[i]))})["image"].numpy()
    except ValueError as e:
      results[i] = {"file": paths[i], "error": str(e)}
      continue
    except tf.errors.OpError as e:  # the preprocessing's own error (e.g. a crop larger than the image).
      reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*", "", e.message.splitlines()[0])
      results[i] = {"file": paths[i], "error": f"the preprocessing failed ({reason})"}
      continue
    batch.append(image)
    where.append(i)
    if len(batch) == batch_size:
      flush()
  flush()
  return results


def format_table(results: list[dict]) -> str:
  lines = []
  for r in results:
    if "error" in r:
      lines.append(f"{r['file']}: {r['error']}")
      continue
    lines.append(r["file"])
    width = max(len(t["class"]) for t in r["top"])
    lines += [f"  {100 * t['probability']:6.2f}%  {t['class']:{width}}" for t in r["top"]]
  return "\n".join(lines)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("name the images (files or directories) to classify")
  if not FLAGS.workdir and not (FLAGS.checkpoint and FLAGS.config):
    raise app.UsageError("pass --workdir, or --checkpoint with --config")
  # Everything a user can get wrong is checked before the slow start (TensorFlow, JAX, the checkpoint).
  check_counts(FLAGS.top, FLAGS.batch_size, prefix="--")
  paths = image_paths(argv[1:])
  config = FLAGS.config or cli.load_config(FLAGS.workdir)
  cli.setup_logging()
  cli.start_backends()
  checkpoint = FLAGS.checkpoint or FLAGS.workdir
  model, params = load(config, checkpoint)
  many = any(os.path.isdir(a) for a in argv[1:]) and not FLAGS.json
  # Class names from the run that trained the params (a workdir's record), not from its dataset as it is now.
  results = predict(config, model, params, paths, FLAGS.top, FLAGS.batch_size, progress=many,
                    workdir=checkpoint if os.path.isdir(checkpoint) else None)
  print(json.dumps(results, indent=2) if FLAGS.json else format_table(results))
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  errors.run(main)
