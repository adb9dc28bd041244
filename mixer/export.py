"""Exports a run's newest checkpoint as a PyTorch state dict that timm's MlpMixer loads with strict=True.

  python -m mixer.export --workdir W --out model.pth
  model = timm.create_model("mixer_b16_224", num_classes=N); model.load_state_dict(torch.load("model.pth"))
timm uses exact gelu; the released weights (and our default) use tanh gelu: logits agree to ~1e-3.
"""

from absl import app, flags

flags.DEFINE_string("workdir", None, "A training workdir (its newest checkpoint), or a .npz file.", required=True)
flags.DEFINE_string("out", None, "Where to write the state dict (.pth).", required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    import torch
  except ImportError:
    raise SystemExit("exporting needs PyTorch: pip install -r benchmarks/requirements.txt") from None
  from mixer import checkpoints
  state_dict = checkpoints.to_timm_state_dict(checkpoints.load_pretrained(FLAGS.workdir))
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, FLAGS.out)
  print(f"Wrote {len(state_dict)} tensors to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
