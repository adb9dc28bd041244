"""Image ops on tf tensors, composed by configs as a string like "decode|resize(16)|value_range(-1, 1)".
(mixup, the one batch-level augmentation, runs on device inside the train step: mixer/steps.py.)

Each op maps a features dict to a features dict. Random ops are stateless: they draw from the
per-example seed in features["rng"] (set by the input pipeline), so a pipeline is deterministic
given the config seed, whatever tf.data's parallelism.
"""

import ast
from collections.abc import Callable

import tensorflow as tf

from mixer import randaugment as randaugment_lib

Features = dict[str, tf.Tensor]
Op = Callable[[Features], Features]


def _next_seed(features: Features, op: str) -> tf.Tensor:
  """Splits the example's seed: one half for the calling (random) op, the other stays for the ops after it."""
  if "rng" not in features:
    raise ValueError(f"preprocessing op {op} is random, but runs without a seed: evaluation pipelines "
                     f"(config.pp_eval, config.evals.NAME.pp) must be deterministic")
  seeds = tf.random.experimental.stateless_split(features["rng"], num=2)
  features["rng"] = seeds[1]
  return seeds[0]


def decode(channels: int = 3) -> Op:
  def op(features):
    image = tf.io.decode_image(features["image"], channels=channels, expand_animations=False)
    features["image"] = tf.ensure_shape(image, [None, None, channels])
    return features
  return op


def _crop_window(shape: tf.Tensor, seed: tf.Tensor, area_min: float, area_max: float) -> tuple:
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed,
      area_range=(area_min / 100, area_max / 100), min_object_covered=0,
      aspect_ratio_range=(3 / 4, 4 / 3), use_image_if_no_bounding_boxes=True)
  return begin, size


def inception_crop(size: int, area_min: float = 5, area_max: float = 100) -> Op:
  """Random crop of 5%-100% of the area and aspect 3/4-4/3, resized to `size` (Szegedy et al. 2015)."""
  def op(features):
    image = features["image"]
    begin, crop = _crop_window(tf.shape(image), _next_seed(features, "inception_crop"), area_min, area_max)
    image = tf.slice(image, begin, crop)
    features["image"] = _resize(image, size)
    return features
  return op


def decode_jpeg_and_inception_crop(size: int, area_min: float = 5, area_max: float = 100,
                                   channels: int = 3) -> Op:
  """decode + inception_crop fused: decodes only the crop window, much cheaper on large JPEGs. Other formats
  (a folder dataset stores PNG for them) are decoded whole and cropped to the same window."""
  def op(features):
    data = features["image"]
    seed = _next_seed(features, "decode_jpeg_and_inception_crop")

    def jpeg():
      begin, crop = _crop_window(tf.image.extract_jpeg_shape(data), seed, area_min, area_max)
      return tf.image.decode_and_crop_jpeg(data, tf.stack([begin[0], begin[1], crop[0], crop[1]]), channels=channels)

    def other():
      image = tf.io.decode_image(data, channels=channels, expand_animations=False)
      begin, crop = _crop_window(tf.shape(image), seed, area_min, area_max)
      return tf.slice(image, begin, crop)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    features["image"] = _resize(tf.ensure_shape(image, [None, None, channels]), size)
    return features
  return op


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  """Bilinear, antialiased resize to `size` (int for square, or a [height, width] pair or tensor)."""
  size = (size, size) if isinstance(size, int) else size
  dtype = image.dtype
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  if dtype == tf.uint8:
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return image


def resize(size) -> Op:
  """Resizes to `size` (an int for square, or (height, width)), ignoring the aspect ratio."""
  def op(features):
    features["image"] = _resize(features["image"], size)
    return features
  return op


def resize_small(size: int) -> Op:
  """Resizes so that the shorter side is `size`, keeping the aspect ratio (eval: resize 256)."""
  def op(features):
    image = features["image"]
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    features["image"] = _resize(image, new)
    return features
  return op


def central_crop(size: int) -> Op:
  """The central size x size window (eval: central crop 224 after resize_small(256))."""
  def op(features):
    image = features["image"]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    check = tf.debugging.assert_greater_equal(tf.minimum(h, w), size, message=(
        f"central_crop({size}) got an image smaller than {size}x{size}: resize it first"))
    with tf.control_dependencies([check] if check is not None else []):  # (None when eager: it has run)
      image = tf.identity(image)
    top, left = (h - size) // 2, (w - size) // 2
    features["image"] = tf.ensure_shape(image[top:top + size, left:left + size], [size, size, None])
    return features
  return op


def flip_lr() -> Op:
  """Mirrors the image left-right with probability 1/2."""
  def op(features):
    features["image"] = tf.image.stateless_random_flip_left_right(features["image"], _next_seed(features, "flip_lr"))
    return features
  return op


def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255) -> Op:
  """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax], as float32."""
  def op(features):
    image = tf.cast(features["image"], tf.float32)
    features["image"] = vmin + (image - in_min) * (vmax - vmin) / (in_max - in_min)
    return features
  return op


def randaugment(num_layers: int = 2, magnitude: float = 15) -> Op:
  """RandAugment on uint8 images: `num_layers` random ops of strength `magnitude` (paper: 2 layers, 10-20)."""
  def op(features):
    seed = _next_seed(features, "randaugment")
    features["image"] = randaugment_lib.randaugment(features["image"], num_layers, magnitude, seed)
    return features
  return op


def patch_shuffle(patch_size: int, seed: int = 0) -> Op:
  """One fixed permutation of the patch_size x patch_size patches, and one of the pixels inside every
  patch, the same for all images (paper Fig. 4, "patch + pixel shuffling"). Image sides must be
  multiples of patch_size."""
  def op(features):
    image = features["image"]
    h, w, c = tf.shape(image)[0], tf.shape(image)[1], tf.shape(image)[2]
    nh, nw, p = h // patch_size, w // patch_size, patch_size
    patches = tf.reshape(tf.transpose(tf.reshape(image, [nh, p, nw, p, c]), [0, 2, 1, 3, 4]), [nh * nw, p * p, c])
    patches = tf.gather(patches, tf.random.experimental.stateless_shuffle(tf.range(nh * nw), [seed, 1]), axis=0)
    patches = tf.gather(patches, tf.random.experimental.stateless_shuffle(tf.range(p * p), [seed, 2]), axis=1)
    features["image"] = tf.reshape(tf.transpose(tf.reshape(patches, [nh, nw, p, p, c]), [0, 2, 1, 3, 4]), [h, w, c])
    return features
  return op


def pixel_shuffle(seed: int = 0) -> Op:
  """One fixed permutation of all pixels, the same for all images (paper Fig. 4, "global shuffling")."""
  def op(features):
    image = features["image"]
    shape = tf.shape(image)
    pixels = tf.reshape(image, [shape[0] * shape[1], shape[2]])
    pixels = tf.gather(pixels, tf.random.experimental.stateless_shuffle(tf.range(shape[0] * shape[1]), [seed, 3]))
    features["image"] = tf.reshape(pixels, shape)
    return features
  return op


OPS = {fn.__name__: fn for fn in (decode, inception_crop, decode_jpeg_and_inception_crop, resize,
                                  resize_small, central_crop, flip_lr, randaugment, value_range, patch_shuffle,
                                  pixel_shuffle)}


def _parse_op(spec: str) -> Op:
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"preprocessing op {spec!r} is not NAME or NAME(ARGS)") from e
  call = node if isinstance(node, ast.Call) else ast.Call(func=node, args=[], keywords=[])
  if not isinstance(call.func, ast.Name) or call.func.id not in OPS:
    raise ValueError(f"preprocessing op {spec!r} is not one of {', '.join(OPS)}")
  try:
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError as e:
    raise ValueError(f"preprocessing op {spec!r}: arguments must be literals") from e
  return OPS[call.func.id](*args, **kwargs)


def get_preprocess_fn(spec: str) -> Op:
  """Parses "op1|op2(args)|..." into one function on a features dict."""
  ops = [_parse_op(s) for s in spec.split("|") if s.strip()]
  def fn(features):
    features = dict(features)
    for op in ops:
      features = op(features)
    return features
  return fn

