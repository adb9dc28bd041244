"""The dataset a config names: its tfds builder, prepared, the examples each process reads of it, and the
facts a run needs (classes, example counts, image shape, label subset, the train split's first N%)."""

import contextlib
import dataclasses
import io

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from mixer import datasets, preprocess
from mixer.datasets import folder


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A run's data facts, resolved once from the config and the dataset (get_info): what the input pipeline,
  the evaluators, predict and the TPU check read instead of re-deriving them from the config."""
  name: str  # config.dataset
  train_split: str  # config.train_split, cut to config.train_percent.
  held_out: tuple[str, str] | None  # (config key, split) of the first classification evaluator.
  label_key: str
  label_subset: tuple[int, ...] | None  # kept class ids, in new-label order; None keeps all.
  multilabel: bool  # a Sequence of labels per image (JFT-style): batches carry them padded with -1.
  max_labels: int  # multi-label only: labels kept per image.
  class_names: tuple[str, ...]  # after label_subset, in label order.
  num_train_examples: int
  num_eval_examples: int
  min_local_train_examples: int  # the fewest train examples any process reads: steps per epoch, one shard each.
  image_shape: tuple[int, ...]  # after the preprocessing: the model's input shape.
  fingerprint: dict = dataclasses.field(default_factory=dict)  # what identifies the data: see fingerprint().

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def check_split(self, builder, key: str, split: str) -> None:
    check_split(self.name, builder, key, split)


def label_subset(config) -> list[int] | None:
  """config.label_subset ("5-9" or "0,2,4"; "" for all) as the kept class ids, in new-label order."""
  spec = config.label_subset.strip()
  if not spec:
    return None
  try:
    if "-" in spec:
      first, last = (int(x) for x in spec.split("-"))
      return list(range(first, last + 1))
    return [int(x) for x in spec.split(",")]
  except ValueError:
    raise ValueError(f"config.label_subset={config.label_subset!r} is not FIRST-LAST or a,b,c") from None


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The tfds builder of config.dataset, prepared: embedded datasets are built on first use."""
  def make():
    if folder.is_folder(config.dataset):
      return folder.builder(config.dataset, config.data_dir, config.get("bad_images", "fail"))
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  try:
    builder = make()
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.dataset={config.dataset!r} is not a tfds dataset: {e}") from None
  if config.dataset in datasets.EMBEDDED or folder.is_folder(config.dataset):
    # Every process takes the same path (one sync), whichever of them already sees the data.
    if jax.process_index() == 0 and not builder.is_prepared():
      logging.info("Preparing %s in %s (once)", config.dataset, builder.data_dir)
      quiet = logging.get_verbosity() < logging.DEBUG  # tfds prints "Downloading..." for data it does not download.
      with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        builder.download_and_prepare()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"prepare {config.dataset}")
    builder = make()
    if not builder.is_prepared():  # process 0 prepared it in a data_dir that this process does not see.
      raise FileNotFoundError(
          f"config.dataset={config.dataset!r}: process 0 prepared it in data_dir={builder.data_dir!r}, which "
          f"process {jax.process_index()} does not see; set --config.data_dir to a directory all hosts share")
  elif not builder.is_prepared():
    raise FileNotFoundError(
        f"config.dataset={config.dataset!r} is not prepared in data_dir={builder.data_dir!r}. "
        f"Prepare it once with `tfds build {config.dataset} --data_dir=DIR` (ImageNet needs its "
        f"archives in DIR/downloads/manual first) and pass --config.data_dir=DIR.")
  return builder


def train_split(config) -> str:
  """config.train_split, cut to its first config.train_percent % (the paper's 3/10/30/100% subsets)."""
  percent = config.train_percent
  if not 0 < percent <= 100 or int(percent) != percent:
    raise ValueError(f"config.train_percent={percent} is not a whole number in 1..100")
  return config.train_split if percent == 100 else f"{config.train_split}[:{int(percent)}%]"


def _label_feature(config, builder):
  features = builder.info.features
  if config.label_key not in features:
    raise ValueError(f"config.label_key={config.label_key!r} is not a feature of {config.dataset!r} "
                     f"({', '.join(features)})")
  feature = features[config.label_key]
  multi = isinstance(feature, tfds.features.Sequence)
  return (feature.feature if multi else feature), multi


def held_out_split(config) -> tuple[str, str] | None:
  """(its config key, the split) of config.evals' first classification evaluator: the held-out split
  that DatasetInfo counts and eval_iterator reads by default; None without such an evaluator."""
  for name, settings in config.evals.items():
    if settings.get("type") == "classification":
      return f"evals.{name}.split", settings.split
  return None


def check_split(name: str, builder, key: str, split: str) -> None:
  """Fails, naming config.KEY, when `split` (tfds split syntax, e.g. "train[:10%]") is not one of dataset `name`'s."""
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise ValueError(f"config.{key}={split!r} is not a split of {name!r} "
                     f"({', '.join(builder.info.splits)}): {e}") from None


def get_info(config, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """The run's data facts: config.dataset's splits checked, classes named, examples counted, image shape."""
  held_out = held_out_split(config)
  train = train_split(config)
  for key, split in (("train_split", train), *([held_out] if held_out else [])):
    check_split(config.dataset, builder, key, split)
  feature, multilabel = _label_feature(config, builder)
  names = list(feature.names)
  subset = label_subset(config)
  if subset is not None:
    if multilabel or not all(0 <= c < len(names) for c in subset):
      raise ValueError(f"config.label_subset={config.label_subset!r} needs single labels in 0..{len(names) - 1}")
    names = [names[c] for c in subset]
  facts = DatasetInfo(name=config.dataset, train_split=train, held_out=held_out, label_key=config.label_key,
                      label_subset=None if subset is None else tuple(subset), multilabel=multilabel,
                      max_labels=config.max_labels, class_names=tuple(names), num_train_examples=0,
                      num_eval_examples=0, min_local_train_examples=0, image_shape=())
  train_counts = local_counts(facts, builder, train)
  return dataclasses.replace(
      facts, num_train_examples=sum(train_counts), min_local_train_examples=min(train_counts),
      num_eval_examples=sum(local_counts(facts, builder, held_out[1])) if held_out else 0,
      image_shape=image_shape(config, builder, (held_out or (None, train))[1]),
      fingerprint=fingerprint(config, builder, names))


def fingerprint(config, builder, class_names: list[str]) -> dict:
  """What identifies the data a run reads, for its record: the tfds dataset and version, the class names
  (after config.label_subset), each split's size and, for a folder, a digest of its file list (each file's
  split, class, path under the folder and size; not its location or times, so a copied folder matches)."""
  record = {"class_names": list(class_names), "label_subset": config.label_subset,
            "splits": {name: split.num_examples for name, split in sorted(builder.info.splits.items())}}
  if folder.is_folder(config.dataset):
    record["tfds_name"] = builder.name  # not its version: the file list says what the data is.
    record["files_sha256"] = builder.files_digest  # of the scan the builder made: the folder is not read again.
  else:
    record["tfds_name"] = builder.info.full_name
  return record


def local_counts(info: DatasetInfo, builder, split: str, count: int | None = None) -> list[int]:
  """How many examples of `split` each process reads (after the label subset); or each of `count` shards."""
  count = count or jax.process_count()
  if info.label_subset is None:  # tfds's even split: the first n % count shards read one more.
    n = builder.info.splits[split].num_examples
    return [n // count + (i < n % count) for i in range(count)]
  counts = []
  for i in range(count):  # counted by reading the labels: meant for small datasets.
    ds = keep_label_subset(info, read(builder, split, process=(i, count)))
    counts.append(int(ds.reduce(0, lambda n, _: n + 1)))
  return counts


def image_shape(config, builder, split: str) -> tuple[int, ...]:
  """The shape of one image of `split` after the eval preprocessing: the model's input shape (the training
  preprocessing must give the same)."""
  example = next(iter(read(builder, split, autocache=False).take(1)))
  shape = tuple(preprocess.get_preprocess_fn(config.pp_eval)({"image": example["image"]})["image"].shape)
  # The training pipeline's static output shape, traced (not run: its decode may take JPEG only).
  traced = tf.data.Dataset.from_tensors({"image": example["image"], "rng": tf.constant([0, 0], tf.int64)})
  train = traced.map(preprocess.get_preprocess_fn(config.pp_train)).element_spec["image"].shape
  if not train.is_compatible_with(shape):
    raise ValueError(f"config.pp_train gives images of shape {tuple(train)}, config.pp_eval "
                     f"{shape}: the model takes one shape")
  return shape


def read(builder, split: str, shuffle_seed=None, autocache: bool = True, process=None) -> tf.data.Dataset:
  """This process's share of `split` (or process (index, count)'s), images left encoded so that crops can
  decode less."""
  index, count = process or (jax.process_index(), jax.process_count())
  local_split = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                try_autocache=autocache)
  return builder.as_dataset(split=local_split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config, decoders={"image": tfds.decode.SkipDecoding()})


def keep_label_subset(info: DatasetInfo, ds: tf.data.Dataset) -> tf.data.Dataset:
  """Keeps the examples of the label subset's classes, relabelled 0..len(subset)-1."""
  if info.label_subset is None:
    return ds
  kept, key = tf.constant(info.label_subset, tf.int64), info.label_key

  def relabel(example):
    return {**example, key: tf.argmax(tf.cast(tf.equal(kept, example[key]), tf.int32), output_type=tf.int64)}
  return ds.filter(lambda ex: tf.reduce_any(tf.equal(kept, ex[key]))).map(relabel)


def metadata_info(config) -> DatasetInfo:
  """The facts a compile needs (classes, image shape, multi-label) without the data on disk: from the config,
  the tfds builder's metadata (known without downloading for catalogue datasets and ours), or a folder's scan
  (nothing is prepared). Example counts are 0 and the fingerprint empty: only get_info reads the data."""
  subset = label_subset(config)
  multilabel, names, shape = False, None, None
  if folder.is_folder(config.dataset):
    splits = folder.scan(config.dataset[len(folder.PREFIX):])
    names = folder.class_names(splits)
    shape = _first_readable_shape(config, (path for examples in splits.values() for path, _ in examples))
  else:
    try:
      builder = tfds.builder(config.dataset, data_dir=config.data_dir)
      feature, multilabel = _label_feature(config, builder)
      names = list(feature.names)
    except Exception:  # not a tfds dataset here (e.g. JFT): the config must say.  # noqa: BLE001
      builder, multilabel = None, config.loss == "sigmoid_xent"
    shape = _static_shape(config, builder)
  if config.num_classes:
    names = [str(i) for i in range(config.num_classes)]
  elif subset is not None:
    names = [names[i] for i in subset] if names else [str(i) for i in subset]
  elif names is None:
    raise ValueError(f"config.dataset={config.dataset!r} is not a tfds dataset with a {config.label_key!r} "
                     f"feature here: set --config.num_classes")
  held_out = held_out_split(config)
  return DatasetInfo(name=config.dataset, train_split=train_split(config), held_out=held_out,
                     label_key=config.label_key, label_subset=None if subset is None else tuple(subset),
                     multilabel=multilabel, max_labels=config.max_labels, class_names=tuple(names),
                     num_train_examples=0, num_eval_examples=0, min_local_train_examples=0, image_shape=shape)


def _static_shape(config, builder) -> tuple[int, ...]:
  """config.pp_eval's output shape when it ends in a fixed size; else read from one prepared image."""
  traced = tf.data.Dataset.from_tensors({"image": tf.constant(b""), "rng": tf.constant([0, 0], tf.int64)})
  shape = traced.map(preprocess.get_preprocess_fn(config.pp_eval)).element_spec["image"].shape
  if shape.is_fully_defined():
    return tuple(shape)
  if builder is None or not builder.is_prepared():
    raise ValueError(f"config.pp_eval={config.pp_eval!r} gives images of shape {shape}: end it with a fixed "
                     f"size (e.g. resize(224) or central_crop(224)) or prepare the dataset")
  return image_shape(config, builder, (held_out_split(config) or (None, train_split(config)))[1])


def _first_readable_shape(config, paths) -> tuple[int, ...]:
  """config.pp_eval's output shape on the first of `paths` that is a readable image."""
  pp = preprocess.get_preprocess_fn(config.pp_eval)
  for path in paths:
    try:
      image = tf.constant(folder.image_bytes(path))
    except ValueError:  # the run names it at preparation (or skips it); one readable image gives the shape.
      continue
    return tuple(pp({"image": image})["image"].shape)
  raise ValueError(f"config.dataset={config.dataset}: no readable image")
