"""Exports a run's newest checkpoint as a PyTorch state dict that timm's MlpMixer loads with strict=True.

  python -m mixer.export --workdir W --out model.pth
  model = timm.create_model("mixer_b16_224", num_classes=N); model.load_state_dict(torch.load("model.pth"))
timm uses exact gelu; the released weights (and our default) use tanh gelu: logits agree to ~1e-3.
"""

import numpy as np
from absl import app, flags

from mixer import models, params_io, trees


def to_timm_state_dict(params: dict) -> dict[str, np.ndarray]:
  """Our (released-layout) params as the state dict of timm's MlpMixer (mixer_*_224), as numpy arrays.

  Dense kernels are [in, out] here and [out, in] in torch; the stem conv is HWIO here, OIHW there.
  """
  params = models.unstack_blocks(params) if "MixerBlocks" in params else params
  p = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  out = {"stem.proj.weight": p["stem/kernel"].transpose(3, 2, 0, 1), "stem.proj.bias": p["stem/bias"],
         "norm.weight": p["pre_head_layer_norm/scale"], "norm.bias": p["pre_head_layer_norm/bias"]}
  if "head/kernel" in p:
    out.update({"head.weight": p["head/kernel"].T, "head.bias": p["head/bias"]})
  names = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2", "token_mixing": "mlp_tokens",
           "channel_mixing": "mlp_channels"}
  for i, block in enumerate(models.block_names(params)):
    for ours, theirs in names.items():
      if ours.startswith("LayerNorm"):
        out[f"blocks.{i}.{theirs}.weight"] = p[f"{block}/{ours}/scale"]
        out[f"blocks.{i}.{theirs}.bias"] = p[f"{block}/{ours}/bias"]
        continue
      for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[f"blocks.{i}.{theirs}.{fc}.weight"] = p[f"{block}/{ours}/{dense}/kernel"].T
        out[f"blocks.{i}.{theirs}.{fc}.bias"] = p[f"{block}/{ours}/{dense}/bias"]
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def main(argv):
  del argv
  try:  # PyTorch only here: a large optional dependency (benchmarks/requirements.txt) that nothing else needs.
    import torch
  except ImportError:
    raise SystemExit("exporting needs PyTorch: pip install -r benchmarks/requirements.txt") from None
  flags_ = flags.FLAGS
  state_dict = to_timm_state_dict(params_io.load(flags_.workdir))
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, flags_.out)
  print(f"Wrote {len(state_dict)} tensors to {flags_.out}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A training workdir (its newest checkpoint), or a .npz file.", required=True)
  flags.DEFINE_string("out", None, "Where to write the state dict (.pth).", required=True)
  app.run(main)
