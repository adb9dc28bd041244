"""`pip install -e .` installs the library (mixer and its subpackages, with requirements.txt as its
dependencies), and an installed mixer works from any current directory, without the repository on sys.path:
it finds the repository's configs/ beside the package."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Run by the installed interpreter from an empty directory: the repository is not on its sys.path, so
# `configs` is not importable as a package, and mixer is the editable install of REPO.
_CHECK = """
import importlib.metadata, importlib.util, json, os, sys
assert importlib.util.find_spec("configs") is None, "configs/ is importable: the test proves nothing"
import mixer.train_lib
from mixer import cli, paper
default = cli.load_config_file(cli.DEFAULT_CONFIG)
b16 = paper.load("mixer_b16_imagenet21k")  # a config that imports its siblings (from configs import ...)
print(json.dumps({"mixer": mixer.__file__, "sys_path": sys.path, "dataset": default.dataset,
                  "b16": [b16.model.variant, b16.dataset], "unmarked": paper.unmarked_differences(),
                  "requires": importlib.metadata.requires("mixer")}))
"""


@pytest.mark.subprocess
def test_an_editable_install_works_from_another_directory(tmp_path):
  env_dir, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
  elsewhere.mkdir()
  # The venv sees this interpreter's packages (setuptools, pip and the dependencies: no network needed).
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env_dir)], check=True)
  python = str(env_dir / "bin" / "python")
  install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", REPO],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
  environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([python, "-c", _CHECK], cwd=elsewhere, env=environment, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert os.path.realpath(found["mixer"]) == os.path.realpath(os.path.join(REPO, "mixer", "__init__.py"))
  assert not {REPO, os.path.realpath(REPO)} & {os.path.realpath(p or str(elsewhere)) for p in found["sys_path"]}
  assert found["dataset"] == "digits" and found["b16"] == ["B/16", "imagenet21k/fall11"]
  assert found["unmarked"] == []
  with open(os.path.join(REPO, "requirements.txt")) as f:
    pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert found["requires"] == pins
