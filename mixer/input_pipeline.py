"""tf.data iterators over the config's dataset, yielding global jax.Arrays sharded over the mesh's data axis.

Training batches are a pure function of (config, step): the train split is read in config.input_shards
shards (one per process unless set), each epoch with its own shuffle seed, and every example draws its
augmentation from a seed made of (seed, epoch, shard, position). Shard i fills the i-th block of rows of
every global batch, whichever process reads it. A run resumed at step k, on as many processes or on a
number that divides the shards, so sees exactly the batches that an uninterrupted run sees from step k on.
"""

import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mixer import dataset, preprocess, sharding

Batch = dict[str, jax.Array]


def input_shards(config) -> int:
  """How many shards the train split is read in: config.input_shards, or one per process (0)."""
  return config.get("input_shards", 0) or jax.process_count()


def steps_per_epoch(config, info: dataset.DatasetInfo, builder=None) -> int:
  """Full global batches per epoch; every shard gives the same count (the tail is dropped). `builder` counts
  the shards' examples when they are not one per process (info counted those)."""
  shards = input_shards(config)
  if shards == jax.process_count():
    fewest = info.min_local_train_examples
  else:
    fewest = min(dataset.local_counts(info, builder, info.train_split, shards))
  return fewest // (config.batch_size // shards)


def local_batch_size(global_batch_size: int) -> int:
  return global_batch_size // jax.process_count()


def shards_of_this_process(config, mesh) -> list[int]:
  """The input shards this process reads, in row order: those whose block of rows of the global batch its
  devices hold (shard i holds rows [i b, (i + 1) b) of every batch, b = batch_size / input_shards)."""
  shards, batch = input_shards(config), config.batch_size
  rows_per_shard = batch // shards
  indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch,)).values()
  rows = {row for index in indices for row in range(*index[0].indices(batch))}
  mine = sorted({row // rows_per_shard for row in rows})
  if len(mine) * rows_per_shard == len(rows):
    return mine
  if shards == jax.process_count():  # this process's rows interleave with another's: it reads its own shard.
    return [jax.process_index()]
  raise ValueError(f"config.input_shards={shards}: the mesh gives process {jax.process_index()} rows of the "
                   f"global batch that are not whole blocks of {rows_per_shard} (config.batch_size={batch})")


def _labels(info: dataset.DatasetInfo):
  """Reads the label feature as a fixed-shape int32: a scalar, or max_labels padded with -1."""
  def get(example):
    label = tf.cast(example[info.label_key], tf.int32)
    if not info.multilabel:
      return label
    label = label[:info.max_labels]
    return tf.pad(label, [[0, info.max_labels - tf.shape(label)[0]]], constant_values=-1)
  return get


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.threading.private_threadpool_size = 48
  return options


def _bad_image_policy(config, ds: tf.data.Dataset) -> tf.data.Dataset:
  if config.bad_images == "skip":
    return ds.ignore_errors()
  if config.bad_images != "fail":
    raise ValueError(f"config.bad_images={config.bad_images!r} is not one of fail, skip")
  return ds


def _numpy_batches(name: str, ds: tf.data.Dataset, split: str) -> Iterator[dict]:
  """ds's batches as numpy; an image that does not decode becomes an error naming the dataset."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      yield next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"an image of {name}:{split} could not be read ({e.message.splitlines()[0]}); "
                       f"--config.bad_images=skip skips such images and counts them in the log") from None


def _train_epoch(config, builder, info: dataset.DatasetInfo, epoch: int, skip_batches: int,
                 per_epoch: int, shard: int | None = None) -> tf.data.Dataset:
  """One input shard's batches of one epoch (default: this process's, one shard per process) from batch
  `skip_batches` on: `per_epoch` in all, for every shard (shards may hold more examples than the smallest one;
  their extra batches are dropped)."""
  shards = input_shards(config)
  shard = jax.process_index() if shard is None else shard
  batch = config.batch_size // shards
  seed = [config.seed, epoch]
  epoch_seed = (config.seed * 100_003 + epoch) % 2**31
  ds = dataset.read(builder, info.train_split, shuffle_seed=epoch_seed, process=(shard, shards))
  ds = dataset.keep_label_subset(info, ds)
  ds = ds.shuffle(config.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
  ds = ds.enumerate().skip(skip_batches * batch)
  pp = preprocess.get_preprocess_fn(config.pp_train)
  labels = _labels(info)

  def prepare(index, example):
    rng = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), shard), index)
    features = pp({"image": example["image"], "rng": rng})
    return {"image": features["image"], "label": labels(example), "position": index}

  ds = _bad_image_policy(config, ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE))
  return ds.batch(batch, drop_remainder=True).take(per_epoch - skip_batches).with_options(_options())


def train_iterator(config, builder, info: dataset.DatasetInfo, mesh, start_step: int = 0) -> Iterator[Batch]:
  """Endless global training batches, from `start_step` on. A process that reads several input shards (a run
  resumed on fewer processes than it started with) puts their batches one after another, in shard order."""
  per_epoch = steps_per_epoch(config, info, builder)
  if per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{info.num_train_examples} examples of {info.name}:{info.train_split}"
                     + (f" in {input_shards(config)} input shards" if input_shards(config) > 1 else ""))
  shards = shards_of_this_process(config, mesh)
  batch = config.batch_size // input_shards(config)

  def epoch_batches(epoch: int, skip: int) -> tf.data.Dataset:
    """Each step's batches of this process's shards: image and label concatenated, positions [shard, row]."""
    parts = tuple(_train_epoch(config, builder, info, epoch, skip, per_epoch, shard) for shard in shards)
    if len(parts) == 1:
      return parts[0]
    join = lambda *parts: {"image": tf.concat([p["image"] for p in parts], 0),
                           "label": tf.concat([p["label"] for p in parts], 0),
                           "position": tf.stack([p["position"] for p in parts])}
    return tf.data.Dataset.zip(parts).map(join)

  def local_batches():
    epoch, skip = divmod(start_step, per_epoch)
    skipped = 0
    while True:
      ds = epoch_batches(epoch, skip).prefetch(tf.data.AUTOTUNE)
      last = np.full(len(shards), skip * batch - 1)  # each shard's position before this epoch's first example
      for local in _numpy_batches(info.name, ds, info.train_split):
        position = local.pop("position").reshape(len(shards), batch)
        gap = int(np.sum(position[:, -1] - last - batch))  # examples dropped as unreadable
        if gap:
          skipped += gap
          logging.warning("Skipped %d unreadable images of %s so far", skipped, info.name)
        last = position[:, -1]
        yield local
      epoch, skip = epoch + 1, 0

  return sharding.global_batches(local_batches(), mesh, config.prefetch_to_device)


def eval_iterator(config, builder, info: dataset.DatasetInfo, mesh, split=None) -> Iterator[Batch]:
  """Every example of the split (default: the held-out split) exactly once; padding examples carry mask 0.

  Processes may hold a different number of examples, so each pads to the same number of batches.
  """
  split = split or info.held_out[1]
  batch = local_batch_size(config.eval_batch_size)
  counts = dataset.local_counts(info, builder, split)
  if min(counts) == 0:
    raise ValueError(f"split {split!r} has too few examples ({sum(counts)}) for {len(counts)} processes")
  pp = preprocess.get_preprocess_fn(config.pp_eval)
  labels = _labels(info)

  def prepare(example):
    return {"image": pp({"image": example["image"]})["image"], "label": labels(example), "mask": tf.constant(1.0)}

  ds = dataset.keep_label_subset(info, dataset.read(builder, split))
  ds = _bad_image_policy(config, ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE))
  ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(_options())
  local = _padded(_numpy_batches(info.name, ds, split), batch, math.ceil(max(counts) / batch))
  return sharding.global_batches(local, mesh, config.prefetch_to_device)


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
  num_batches = max(1, math.ceil(math.ceil(len(selected) / count) / batch))
  return sharding.global_batches(_padded(ds.with_options(_options()).as_numpy_iterator(), batch, num_batches), mesh,
                                 depth=2)


def _padded(local_batches: Iterator[dict], batch: int, num_batches: int) -> Iterator[dict]:
  """Exactly `num_batches` batches of `batch` examples: the last one filled up, then whole batches added, with
  zeros (mask 0), so that every process steps as often as the one with the most examples."""
  produced, padding = 0, None
  for local in local_batches:
    n = len(local["mask"])
    if n < batch:
      local = {k: np.concatenate([v, np.zeros((batch - n,) + v.shape[1:], v.dtype)]) for k, v in local.items()}
    padding = jax.tree.map(np.zeros_like, local)
    yield local
    produced += 1
  for _ in range(num_batches - produced):
    yield padding
