"""Images/s per CPU core of the training preprocessing, on JPEGs made here at ImageNet sizes.

  python benchmarks/input_pipeline.py                          # both pipelines, 1 core and all cores
  python benchmarks/input_pipeline.py --train_images_per_s 4495   # + cores needed to feed that rate

Pipelines: the JFT-style "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)" and the
ImageNet one with "randaugment(2, 15)" added. mixup runs on the accelerator inside the train step
(mixer/steps.py), so it costs the host nothing. Prints a table and JSON.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's mixer, also where it is not installed (pip install -e .).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: its start-up lines say nothing here.
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mixer import preprocess  # noqa: E402

PIPELINES = {
    "inception_crop+flip": "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)",
    "inception_crop+flip+randaugment": "decode_jpeg_and_inception_crop(224)|flip_lr|randaugment(2, 15)|"
                                       "value_range(-1, 1)",
}


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """Smooth random images of ImageNet's typical sizes (about 400-500 x 350-500), JPEG quality 90."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    h, w = int(rng.integers(350, 500)), int(rng.integers(400, 500))
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (h, w), method="bicubic") + rng.normal(0, 12, (h, w, 3))
    images.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90).numpy())
  return images


def measure(spec: str, jpegs: list[bytes], threads: int, seconds: float) -> float:
  """Images/s of `spec` on `threads` tf.data threads, over at least `seconds` after a warm-up."""
  pp = preprocess.get_preprocess_fn(spec)
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(lambda i, image: pp({"image": image, "rng": tf.stack([i, i + 1])})["image"],
              num_parallel_calls=threads)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.batch(64).with_options(options)
  it = iter(ds)
  for _ in range(3):
    next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += int(next(it).shape[0])
  return count / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=256, help="distinct JPEGs made for the benchmark")
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
  parser.add_argument("--train_images_per_s", type=float, default=None,
                      help="a measured train-step rate (benchmarks/throughput.py) to size the host for")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  cores = os.cpu_count()
  jpegs = make_jpegs(args.images)
  rows = []
  for name, spec in PIPELINES.items():
    one = measure(spec, jpegs, 1, args.seconds)
    all_cores = measure(spec, jpegs, cores, args.seconds)
    row = {"pipeline": name, "spec": spec, "images_per_s_1_core": one, "images_per_s_all_cores": all_cores,
           "cores": cores}
    if args.train_images_per_s:
      row["cores_to_feed"] = args.train_images_per_s / one
    rows.append(row)
  print(f"{'pipeline':34} {'1 core img/s':>13} {f'{cores} cores img/s':>15} {'cores to feed':>14}")
  for r in rows:
    feed = f"{r['cores_to_feed']:.0f}" if "cores_to_feed" in r else "-"
    print(f"{r['pipeline']:34} {r['images_per_s_1_core']:13.1f} {r['images_per_s_all_cores']:15.1f} {feed:>14}")
  print(json.dumps(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
