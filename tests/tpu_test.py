"""Compiling for TPU slices from this CPU host with libtpu (mixer/tpu.py, train.py --compile_for)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_python

pytest.importorskip("libtpu", reason="libtpu compiles for TPUs; it is in requirements-test.txt")

# One interpreter for the library checks: libtpu starts once, each Ti compile takes a few seconds.
_LIBRARY_CHECKS = r"""
import json
from mixer import tpu
tpu.raise_stack_limit()
from configs import default
from tests.conftest import override

def config(**overrides):
  return override(default.get_config(), **{"batch_size": 64, "eval_batch_size": 64, **overrides})

def collectives(report):
  text = report["train"]["compiled"].as_text()
  return {op: text.count(op) for op in ("all-reduce", "reduce-scatter", "all-gather")}

out = {}
for name, layout in (("replicated", {}), ("fsdp", {"param_sharding": "fsdp"})):
  r = tpu.compile_for(config(**layout), "v5e:2x2")
  out[name] = {k: r[k] for k in ("devices", "hosts", "state_bytes", "param_bytes", "fits", "hbm_bytes")}
  out[name].update(collectives=collectives(r), peak=r["train"]["peak_bytes"], seconds=r["train"]["estimated_s"],
                   eval_peak=r["eval"]["peak_bytes"])
# Two hosts (v4, 8 chips, 4 per host): the per-process data rules hold on the slice's process indices.
r = tpu.compile_for(config(), "v4:2x2x2", eval_step=False)
out["v4"] = {"devices": r["devices"], "hosts": r["hosts"], "fits": r["fits"], "kind": r["device_kind"]}
errors = {}
for key, call in (("topology", lambda: tpu.topology("v9:2x2")), ("shape", lambda: tpu.topology("v3:3x3")),
                  ("batch", lambda: tpu.compile_for(config(batch_size=66), "v5e:2x2")),
                  ("mesh", lambda: tpu.compile_for(config(mesh={"data": 3, "model": -1}), "v5e:2x2"))):
  try:
    call()
    errors[key] = None
  except ValueError as e:
    errors[key] = str(e)
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checks():
  return json.loads(run_python(_LIBRARY_CHECKS, timeout=300).strip().splitlines()[-1])


@pytest.mark.tpu_compile
@pytest.mark.subprocess
def test_fsdp_splits_the_state_over_the_data_axis_and_fits(checks):
  replicated, fsdp = checks["replicated"], checks["fsdp"]
  assert replicated["devices"] == 4 and replicated["fits"] and fsdp["fits"]
  # Ti/4's kernels all divide by 4: FSDP holds a quarter of the params and Adam moments per device (the
  # scalars, LayerNorms and biases split too where 4 divides them).
  assert fsdp["param_bytes"] == pytest.approx(replicated["param_bytes"] / 4, rel=0.02)
  assert fsdp["state_bytes"] == pytest.approx(replicated["state_bytes"] / 4, rel=0.02)
  assert 0 < replicated["peak"] < replicated["hbm_bytes"] and replicated["seconds"] > 0


@pytest.mark.tpu_compile
@pytest.mark.subprocess
def test_compiled_steps_have_the_expected_collectives(checks):
  replicated, fsdp = checks["replicated"]["collectives"], checks["fsdp"]["collectives"]
  assert replicated["all-reduce"] > 0 and replicated["all-gather"] == 0  # gradients summed, params whole.
  assert fsdp["all-gather"] > 0 and fsdp["reduce-scatter"] > 0  # params gathered, gradients scattered.


@pytest.mark.tpu_compile
@pytest.mark.subprocess
def test_multi_host_slices_compile(checks):
  assert checks["v4"] == {"devices": 8, "hosts": 2, "fits": True, "kind": "TPU v4"}


@pytest.mark.tpu_compile
@pytest.mark.subprocess
def test_bad_slices_batches_and_meshes_are_named(checks):
  errors = checks["errors"]
  assert "--compile_for='v9:2x2'" in errors["topology"] and "v3:8x16" in errors["topology"]
  assert "--compile_for='v3:3x3'" in errors["shape"]
  assert "config.batch_size=66" in errors["batch"]
  assert "config.mesh" in errors["mesh"]


@pytest.mark.tpu_compile
@pytest.mark.subprocess
def test_train_py_compile_for_exits_1_naming_what_to_change():
  # A 12M-class head: 17 GiB of parameters and Adam moments per device, over a v5e device's 16 GiB.
  out = subprocess.run([sys.executable, "train.py", "--compile_for=v5e:2x2", "--config.num_classes=12000000"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  for noise in ("E0000", "TPU_WORKER_HOSTNAMES", "TPU accelerator type", "Source Location Trace"):
    assert noise not in out.stderr  # libtpu's start-up complaints on a host that is no TPU VM.
  assert "DOES NOT FIT v5e:2x2" in out.stdout and "does not fit: the compiler needs" in out.stdout
  for change in ("--config.param_sharding=fsdp", "--config.model.remat=True", "--config.grad_accum_steps=2"):
    assert change in out.stdout


@pytest.mark.subprocess
def test_without_libtpu_the_error_says_how_to_install_it():
  code = "import sys; sys.modules['libtpu'] = None\nfrom mixer import tpu\ntry:\n  tpu.topology('v5e:2x2')\n" \
         "except ValueError as e:\n  print(e)"
  out = run_python(code, timeout=120)
  assert "--compile_for needs libtpu" in out and 'pip install "jax[tpu]==' in out


def test_folder_datasets_give_their_classes_and_image_shape(tmp_path):
  """--compile_for on folder:PATH: the classes from a scan, the image shape from pp_eval on one image."""
  import numpy as np
  from PIL import Image

  from configs import default
  from mixer import dataset
  from tests.conftest import override
  for label in ("cat", "dog", "owl"):
    (tmp_path / "images" / label).mkdir(parents=True)
    for i in range(2):
      image = Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).convert("P")
      image.save(tmp_path / "images" / label / f"{i}.gif")
  config = override(default.get_config(), dataset=f"folder:{tmp_path / 'images'}", data_dir=str(tmp_path / "tfds"))
  info = dataset.metadata_info(config)
  assert (info.num_classes, info.image_shape, info.multilabel) == (3, (16, 16, 1), False)
  assert dataset.metadata_info(override(config, label_subset="0,2")).num_classes == 2
  assert dataset.metadata_info(override(config, pp_eval="decode|value_range(-1, 1)")).image_shape == (20, 30, 3)
  assert not (tmp_path / "tfds").exists()  # nothing prepared
