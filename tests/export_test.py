"""Export to PyTorch: timm's MlpMixer loads our state dict with strict=True and computes our logits.

torch and timm run in a subprocess: importing them into a process that already holds TensorFlow
crashes (their bundled native libraries clash), and a user's export never needs both either.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from mixer import export, models, params_io
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not (importlib.util.find_spec("torch") and importlib.util.find_spec("timm")),
                                reason="torch and timm are test requirements (requirements-test.txt)")

_TIMM = """
import json, sys
import numpy as np, timm, torch
args = json.loads(sys.argv[1])
if args["name"]:
  model = timm.create_model(args["name"], pretrained=False, num_classes=args["num_classes"])
else:
  model = timm.models.mlp_mixer.MlpMixer(**args["kwargs"])
if args["pth"]:
  state_dict = torch.load(args["pth"])
else:
  with np.load(args["state_dict"]) as data:
    state_dict = {k: torch.from_numpy(data[k]) for k in data.files}
assert set(state_dict) == set(model.state_dict()), set(state_dict) ^ set(model.state_dict())
model.load_state_dict(state_dict, strict=True)
model.eval()
with torch.no_grad():
  x = torch.from_numpy(np.load(args["images"])).permute(0, 3, 1, 2)  # NHWC -> NCHW
  np.save(args["out"], model(x).numpy())
"""


def _ours(variant, num_classes, image_size, gelu_approximate):
  model = models.MlpMixer(num_classes=num_classes, gelu_approximate=gelu_approximate, **models.variant_kwargs(variant))
  x = jax.random.normal(jax.random.key(0), (2, image_size, image_size, 3))
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)
  return model, jax.device_get(params), np.asarray(x)


def _timm_logits(tmp_path, x, params=None, pth=None, name=None, num_classes=10, **kwargs):
  state_dict = str(tmp_path / "state_dict.npz")
  if params is not None:
    np.savez(state_dict, **export.to_timm_state_dict(params))
  np.save(tmp_path / "images.npy", x)
  args = dict(name=name, num_classes=num_classes, kwargs=dict(num_classes=num_classes, **kwargs), pth=pth,
              state_dict=state_dict, images=str(tmp_path / "images.npy"), out=str(tmp_path / "logits.npy"))
  result = subprocess.run([sys.executable, "-c", _TIMM, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(tmp_path / "logits.npy")


@pytest.mark.peer
@pytest.mark.subprocess
def test_timm_mixer_s16_224_loads_strictly_and_matches_with_exact_gelu(tmp_path):
  model, params, x = _ours("S/16", 10, 224, gelu_approximate=False)
  theirs = _timm_logits(tmp_path, x, params=params, name="mixer_s16_224")
  np.testing.assert_allclose(theirs, model.apply({"params": params}, x), rtol=1e-4, atol=1e-4)


_TINY = dict(img_size=16, patch_size=4, num_blocks=4, embed_dim=128)  # Ti/4: token/channel ratios 0.5 and 4.


@pytest.mark.peer
@pytest.mark.subprocess
def test_tanh_gelu_weights_in_timm_differ_only_slightly(tmp_path):
  """The released weights use tanh gelu, timm exact gelu: the logits differ by about 1e-3."""
  model, params, x = _ours("Ti/4", 10, 16, gelu_approximate=True)
  theirs = _timm_logits(tmp_path, x, params=params, **_TINY)
  ours = np.asarray(model.apply({"params": params}, x))
  assert 0 < np.abs(theirs - ours).max() < 5e-3 * np.abs(ours).max() + 1e-3


@pytest.mark.peer
@pytest.mark.subprocess
@pytest.mark.trains
def test_export_command_on_a_trained_workdir_gives_its_logits_in_timm(trained_run, tmp_path):
  workdir, _ = trained_run  # the default config: Ti/4 on 16x16 grey digits, 10 classes, tanh gelu.
  out = tmp_path / "model.pth"
  result = subprocess.run([sys.executable, "-m", "mixer.export", f"--workdir={workdir}", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  exact_gelu = models.MlpMixer(num_classes=10, gelu_approximate=False, **models.variant_kwargs("Ti/4"))
  ours = exact_gelu.apply({"params": params_io.load(workdir)}, x)
  theirs = _timm_logits(tmp_path, x, pth=str(out), in_chans=1, **_TINY)
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
