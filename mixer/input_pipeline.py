"""tfds -> tf.data -> global jax.Arrays sharded over the mesh's data axis.

Training batches are a pure function of (config, step): each epoch is read with its own shuffle seed
and every example draws its augmentation from a seed made of (seed, epoch, process, position). A run
resumed at step k so sees exactly the batches that an uninterrupted run sees from step k on.
"""

import collections
import contextlib
import dataclasses
import io
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from mixer import datasets, preprocess, sharding
from mixer.datasets import folder

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  min_local_train_examples: int  # the fewest train examples any process reads: sets steps per epoch.


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


def is_multilabel(config, builder) -> bool:
  """A Sequence of labels per image (JFT-style): batches carry them padded with -1."""
  return _label_feature(config, builder)[1]


def held_out_split(config) -> tuple[str, str] | None:
  """(its config key, the split) of config.evals' first classification evaluator: the held-out split
  that DatasetInfo counts and eval_iterator reads by default; None without such an evaluator."""
  for name, settings in config.evals.items():
    if settings.get("type") == "classification":
      return f"evals.{name}.split", settings.split
  return None


def get_info(config, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  held_out = held_out_split(config)
  splits = {"train_split": train_split(config)}
  if held_out:
    splits[held_out[0]] = held_out[1]
  for key, split in splits.items():
    try:
      builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(f"config.{key}={config.get(key, split)!r} is not a split of {config.dataset!r} "
                       f"({', '.join(builder.info.splits)}): {e}") from None
  subset = label_subset(config)
  num_classes = _label_feature(config, builder)[0].num_classes
  if subset is not None:
    if is_multilabel(config, builder) or not all(0 <= c < num_classes for c in subset):
      raise ValueError(f"config.label_subset={config.label_subset!r} needs single labels in 0..{num_classes - 1}")
    num_classes = len(subset)
  train_counts = local_counts(config, builder, splits["train_split"])
  return DatasetInfo(num_classes=num_classes, num_train_examples=sum(train_counts),
                     num_eval_examples=sum(local_counts(config, builder, held_out[1])) if held_out else 0,
                     min_local_train_examples=min(train_counts))


def local_counts(config, builder, split: str) -> list[int]:
  """How many examples of `split` each process reads (after config.label_subset)."""
  count = jax.process_count()
  subset = label_subset(config)
  if subset is None:  # tfds's even split: the first n % count processes read one more.
    n = builder.info.splits[split].num_examples
    return [n // count + (i < n % count) for i in range(count)]
  counts = []
  for i in range(count):  # counted by reading the labels: meant for small datasets.
    ds = _filter(config, _read(builder, split, process=(i, count)), subset)
    counts.append(int(ds.reduce(0, lambda n, _: n + 1)))
  return counts


def _filter(config, ds: tf.data.Dataset, subset) -> tf.data.Dataset:
  """Keeps the examples of config.label_subset's classes, relabelled 0..len(subset)-1."""
  if subset is None:
    return ds
  kept = tf.constant(subset, tf.int64)

  def relabel(example):
    return {**example, config.label_key: tf.argmax(tf.cast(tf.equal(kept, example[config.label_key]), tf.int32),
                                                   output_type=tf.int64)}
  return ds.filter(lambda ex: tf.reduce_any(tf.equal(kept, ex[config.label_key]))).map(relabel)


def _labels(config, multilabel: bool):
  """Reads the config's label feature as a fixed-shape int32: a scalar, or max_labels padded with -1."""
  def get(example):
    label = tf.cast(example[config.label_key], tf.int32)
    if not multilabel:
      return label
    label = label[:config.max_labels]
    return tf.pad(label, [[0, config.max_labels - tf.shape(label)[0]]], constant_values=-1)
  return get


def image_shape(config, builder) -> tuple[int, ...]:
  """The shape of one image after the eval preprocessing: the model's input shape (the training
  preprocessing must give the same)."""
  split = (held_out_split(config) or (None, train_split(config)))[1]
  example = next(iter(_read(builder, split, autocache=False).take(1)))
  shape = tuple(preprocess.get_preprocess_fn(config.pp_eval)({"image": example["image"]})["image"].shape)
  # The training pipeline's static output shape, traced (not run: its decode may take JPEG only).
  traced = tf.data.Dataset.from_tensors({"image": example["image"], "rng": tf.constant([0, 0], tf.int64)})
  train = traced.map(preprocess.get_preprocess_fn(config.pp_train)).element_spec["image"].shape
  if not train.is_compatible_with(shape):
    raise ValueError(f"config.pp_train gives images of shape {tuple(train)}, config.pp_eval "
                     f"{shape}: the model takes one shape")
  return shape


def _read(builder, split: str, shuffle_seed=None, autocache: bool = True, process=None) -> tf.data.Dataset:
  """This process's share of `split`, images left encoded so that crops can decode less."""
  index, count = process or (jax.process_index(), jax.process_count())
  local_split = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16,
                                try_autocache=autocache)
  return builder.as_dataset(split=local_split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config, decoders={"image": tfds.decode.SkipDecoding()})


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.private_threadpool_size = 48
  return options


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Full global batches per epoch; every process takes the same count (the tail is dropped)."""
  return info.min_local_train_examples // local_batch_size(config.batch_size)


def local_batch_size(global_batch_size: int) -> int:
  return global_batch_size // jax.process_count()


def _train_epoch(config, builder, epoch: int, skip_batches: int, per_epoch: int) -> tf.data.Dataset:
  """This process's batches of one epoch from batch `skip_batches` on: `per_epoch` in all, on every process
  (processes may hold more examples than the smallest one; their extra batches are dropped)."""
  batch = local_batch_size(config.batch_size)
  seed = [config.seed, epoch]
  epoch_seed = (config.seed * 100_003 + epoch) % 2**31
  ds = _filter(config, _read(builder, train_split(config), shuffle_seed=epoch_seed), label_subset(config))
  ds = ds.shuffle(config.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
  ds = ds.enumerate().skip(skip_batches * batch)
  pp = preprocess.get_preprocess_fn(config.pp_train)
  labels = _labels(config, is_multilabel(config, builder))
  process = jax.process_index()

  def prepare(index, example):
    rng = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), process), index)
    features = pp({"image": example["image"], "rng": rng})
    return {"image": features["image"], "label": labels(example), "position": index}

  ds = _bad_image_policy(config, ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE))
  return ds.batch(batch, drop_remainder=True).take(per_epoch - skip_batches).with_options(_options())


def _bad_image_policy(config, ds: tf.data.Dataset) -> tf.data.Dataset:
  if config.bad_images == "skip":
    return ds.ignore_errors()
  if config.bad_images != "fail":
    raise ValueError(f"config.bad_images={config.bad_images!r} is not one of fail, skip")
  return ds


def _numpy_batches(config, ds: tf.data.Dataset, split: str) -> Iterator[dict]:
  """ds's batches as numpy; an image that does not decode becomes an error naming the dataset."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      yield next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"an image of {config.dataset}:{split} could not be read ({e.message.splitlines()[0]}); "
                       f"--config.bad_images=skip skips such images and counts them in the log") from None


def train_iterator(config, builder, info: DatasetInfo, mesh, start_step: int = 0) -> Iterator[Batch]:
  """Endless global training batches, from `start_step` on."""
  per_epoch = steps_per_epoch(config, info)
  if per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{info.num_train_examples} examples of {config.dataset}:{config.train_split}")

  batch = local_batch_size(config.batch_size)

  def local_batches():
    epoch, skip = divmod(start_step, per_epoch)
    skipped = 0
    while True:
      ds = _train_epoch(config, builder, epoch, skip, per_epoch).prefetch(tf.data.AUTOTUNE)
      last = skip * batch - 1  # the position before this epoch's first example
      for local in _numpy_batches(config, ds, train_split(config)):
        position = local.pop("position")
        gap = int(position[-1]) - last - len(position)  # examples dropped as unreadable
        if gap:
          skipped += gap
          logging.warning("Skipped %d unreadable images of %s so far", skipped, config.dataset)
        last = int(position[-1])
        yield local
      epoch, skip = epoch + 1, 0

  return _to_device(local_batches(), mesh, config.prefetch_to_device)


def eval_iterator(config, builder, info: DatasetInfo, mesh, split=None) -> Iterator[Batch]:
  """Every example of the split (default: held_out_split's) exactly once; padding examples carry mask 0.

  Processes may hold a different number of examples, so each pads to the same number of batches.
  """
  split = split or held_out_split(config)[1]
  batch = local_batch_size(config.eval_batch_size)
  counts = local_counts(config, builder, split)
  if min(counts) == 0:
    raise ValueError(f"split {split!r} has too few examples ({sum(counts)}) for {len(counts)} processes")
  num_batches = math.ceil(max(counts) / batch)
  pp = preprocess.get_preprocess_fn(config.pp_eval)
  labels = _labels(config, is_multilabel(config, builder))

  def prepare(example):
    return {"image": pp({"image": example["image"]})["image"], "label": labels(example), "mask": tf.constant(1.0)}

  ds = _filter(config, _read(builder, split), label_subset(config)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = _bad_image_policy(config, ds).batch(batch).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def local_batches():
    count, padding = 0, None
    for local in _numpy_batches(config, ds, split):
      padding = jax.tree.map(np.zeros_like, _pad(local, batch))
      yield _pad(local, batch)
      count += 1
    for _ in range(num_batches - count):  # this process had fewer examples than another.
      yield padding

  return _to_device(local_batches(), mesh, config.prefetch_to_device)


def _pad(local: dict, batch: int) -> dict:
  n = len(local["mask"])
  if n == batch:
    return local
  return {k: np.concatenate([v, np.zeros((batch - n,) + v.shape[1:], v.dtype)]) for k, v in local.items()}


def _to_device(local_batches: Iterator[dict], mesh, depth: int) -> Iterator[Batch]:
  """Makes global arrays from each process's batch, keeping `depth` batches in flight to the devices."""
  data_sharding = sharding.batch_sharding(mesh)

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in local.items()}

  queue = collections.deque()
  for local in local_batches:
    queue.append(to_global(local))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def read_labels(builder, split: str, label_key: str = "label") -> np.ndarray:
  """Every label of `split`, in its stored order (images are read, not decoded)."""
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda example: example[label_key], num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
  return np.concatenate(list(ds.as_numpy_iterator()))


def selection_iterator(builder, split: str, indices: np.ndarray | None, pp_spec: str, global_batch_size: int,
                       mesh, label_key: str = "label") -> Iterator[Batch]:
  """The examples of `split` at `indices` (positions in the stored order; None: all), each exactly once.

  Every process reads the split and keeps every process_count-th selected example; batches carry the
  example's "index" and a "mask" (0 on padding), so features can be matched to their examples.
  """
  count, me = jax.process_count(), jax.process_index()
  total = builder.info.splits[split].num_examples
  selected = np.arange(total) if indices is None else np.unique(indices)
  batch = local_batch_size(global_batch_size)
  num_batches = max(1, math.ceil(math.ceil(len(selected) / count) / batch))
  pp = preprocess.get_preprocess_fn(pp_spec)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.enumerate()
  if indices is not None:
    wanted = np.zeros(total, bool)
    wanted[selected] = True
    wanted = tf.constant(wanted)
    ds = ds.filter(lambda i, _: tf.gather(wanted, i))
  ds = ds.shard(count, me)

  def prepare(index, example):
    return {"image": pp({"image": example["image"]})["image"], "label": tf.cast(example[label_key], tf.int32),
            "index": tf.cast(index, tf.int32), "mask": tf.constant(1.0)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)

  def local_batches():
    produced, padding = 0, None
    for local in ds.with_options(_options()).as_numpy_iterator():
      padding = jax.tree.map(np.zeros_like, _pad(local, batch))
      yield _pad(local, batch)
      produced += 1
    for _ in range(num_batches - produced):
      yield padding
  return _to_device(local_batches(), mesh, depth=2)
