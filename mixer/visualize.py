"""Pictures of a run: the token-mixing weights as patch-grid images (paper Fig. 5) and the few-shot and
top-1 curves over training steps from the run's TensorBoard logs.

  python -m mixer.visualize --workdir W --out fig.png
"""

import glob
import math
import os

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

from mixer import cli, models, params_io


def weight_mosaic(kernel: np.ndarray, grid: tuple[int, int], units: int) -> np.ndarray:
  """The first `units` hidden units of a token-mixing Dense_0 kernel [tokens, hidden], each shown as its
  weights over the token grid, tiled into one image (NaN between tiles)."""
  units = min(units, kernel.shape[1])
  h, w = grid
  cols = math.ceil(math.sqrt(units))
  rows = math.ceil(units / cols)
  mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
  for u in range(units):
    r, c = divmod(u, cols)
    mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = kernel[:, u].reshape(h, w)
  return mosaic


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar the run's metric writers logged: {tag: [(step, value), ...]} sorted by step."""
  # Here, not at the top: TensorFlow takes seconds to import and writes start-up lines to stderr, which main()
  # has filtered by now (cli.setup_logging imports it inside the filter).
  import tensorflow as tf
  series: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.HasField("tensor"):
          array = tf.make_ndarray(value.tensor)
          if array.size != 1 or array.dtype.kind not in "fiu":  # text, hparams: not scalars.
            continue
          number = float(array.reshape(()))
        else:
          number = value.simple_value
        series.setdefault(value.tag, {})[event.step] = number
  return {tag: sorted(points.items()) for tag, points in series.items()}


def plot(params: dict, scalars: dict, out: str, blocks: int = 3, units: int = 64) -> list[str]:
  """Writes the figure; returns what the run has no curves of (also written into the figure)."""
  names = models.block_names(params)[:blocks]
  curves = {t: v for t, v in scalars.items() if t.startswith("fewshot/") or t == "eval/top1"}
  fig = Figure(figsize=(4.2 * (len(names) + 1), 4.4))  # no pyplot: no global backend to choose, nothing to close.
  axes = fig.subplots(1, len(names) + 1, squeeze=False)
  for ax, name in zip(axes[0], names, strict=False):
    kernel = np.asarray(params[name]["token_mixing"]["Dense_0"]["kernel"])
    side = math.isqrt(kernel.shape[0])
    mosaic = weight_mosaic(kernel, (side, kernel.shape[0] // side), units)
    limit = np.nanmax(np.abs(mosaic))
    ax.imshow(mosaic, cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(f"{name}: token-mixing units\n(first {min(units, kernel.shape[1])} of {kernel.shape[1]})",
                 fontsize=9)
    ax.axis("off")
  ax = axes[0][-1]
  missing = [what for what, prefix in (("few-shot curves: train with --config.evals.fewshot.every_steps=N", "fewshot/"),
                                       ("a top-1 curve: no eval was logged", "eval/top1"))
             if not any(t.startswith(prefix) for t in curves)]
  if missing:
    ax.text(0.02, 0.02, "No " + "\nNo ".join(missing), transform=ax.transAxes, fontsize=7, va="bottom")
  if curves:
    shots = lambda tag: int("".join(ch for ch in tag.rsplit("_", 1)[-1] if ch.isdigit()) or 0)
    for tag, points in sorted(curves.items(), key=lambda item: (item[0].startswith("fewshot"), shots(item[0]))):
      steps, values = zip(*points, strict=True)
      ax.plot(steps, values, marker="o", markersize=3, label=tag.replace("fewshot/", "").replace("eval/", "test "))
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    shown = [w for w, p in (("few-shot linear regression", "fewshot/"), ("test top-1", "eval/top1"))
             if any(t.startswith(p) for t in curves)]
    ax.set_title(" and ".join(shown), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  return missing


def main(argv):
  del argv
  cli.setup_logging()
  flags_ = flags.FLAGS
  params = params_io.load(flags_.workdir)
  missing = plot(params, read_scalars(flags_.workdir), flags_.out, flags_.blocks, flags_.units)
  print(f"Wrote {flags_.out}" + "".join(f"\n  no {what}" for what in missing))


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training workdir (its newest checkpoint and TensorBoard logs).",
                      required=True)
  flags.DEFINE_string("out", "mixer.png", "The PNG to write.")
  flags.DEFINE_integer("blocks", 3, "How many blocks' token-mixing weights to show (from the first).")
  flags.DEFINE_integer("units", 64, "Hidden units per block.")
  app.run(main)
