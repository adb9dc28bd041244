"""Every way a --config argument can be wrong, in one table: each is refused at once, in one line naming the
argument and what it may be (mixer/errors.py); and how train.py and evaluate.py end on them (exit 2)."""

import glob
import os
import subprocess
import sys

import pytest

from mixer import errors
from tests.conftest import REPO

VARIANTS = "s32, s16, b32, b16, l32, l16, h14"
NO_VARIANT = f"x99 is not a variant of this config ({VARIANTS})"
TAKES_ARG = {"mixer_imagenet2012", "mixer_imagenet21k", "mixer_jft", "finetune_cifar10", "finetune_cifar100",
             "finetune_imagenet2012", "finetune_oxford_flowers102", "finetune_oxford_iiit_pet"}
HELPERS = {"__init__", "finetune"}  # shared code of the configs, no get_config()


def _every_config_file():
  """(argv, the expected error or None) for every config file, with and without an argument."""
  rows = []
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)[:-3]
    file = f"configs/{name}.py"
    if name in HELPERS:
      rows.append(([f"--config={file}"], f"--config={file}: {file} defines no get_config(), so it is not a config "
                                         "file"))
    elif name in TAKES_ARG:
      rows += [([f"--config={file}"], None), ([f"--config={file}:"], None), ([f"--config={file}:l16"], None),
               ([f"--config={file}:x99"], f"--config={file}:x99: {NO_VARIANT}")]
    else:
      rows += [([f"--config={file}"], None),
               ([f"--config={file}:foo"], f"--config={file}:foo: {file} takes no argument (pass --config={file})")]
  return rows


ROWS = _every_config_file() + [
    # The argument's other forms.
    (["--config", "configs/mixer_jft.py:B/16"], None),
    (["--config", "configs/mixer_jft.py:x99"], f"--config=configs/mixer_jft.py:x99: {NO_VARIANT}"),
    (["-config=configs/mixer_jft.py:x99"], f"--config=configs/mixer_jft.py:x99: {NO_VARIANT}"),
    (["--flagfile={tmp}/flags.txt"], f"--config=configs/mixer_jft.py:x99: {NO_VARIANT}"),
    (["--flagfile={tmp}/missing.txt"], "Unable to open flagfile: [Errno 2] No such file or directory: "
     "'{tmp}/missing.txt'"),
    (["--config=configs/finetune_cifar10.py:b16,448"], None),
    (["--config=configs/finetune_cifar10.py:x99,448"], f"--config=configs/finetune_cifar10.py:x99,448: {NO_VARIANT}"),
    (["--config=configs/finetune_cifar10.py:b16,abc"],
     "--config=configs/finetune_cifar10.py:b16,abc: abc after the comma is not a resolution in pixels: the argument "
     "is VARIANT or VARIANT,RESOLUTION (e.g. b16,448)"),
    (["--config=configs/finetune_cifar10.py:b16,"],
     "--config=configs/finetune_cifar10.py:b16,: (nothing) after the comma is not a resolution in pixels: the "
     "argument is VARIANT or VARIANT,RESOLUTION (e.g. b16,448)"),
    (["--config=configs/finetune_pets.py:b16,100"], "--config=configs/finetune_pets.py:b16,100: no such file "
     f"{REPO}/configs/finetune_pets.py"),
    (["--config=configs/finetune_oxford_iiit_pet.py:b16,100"], "--config=configs/finetune_oxford_iiit_pet.py:b16,100: "
     "resolution 100 is not a multiple of B/16's patch size 16"),
    (["--config=no_such_config.py"], f"--config=no_such_config.py: no such file {REPO}/no_such_config.py"),
    (["--config="], "--config names no file: pass --config=FILE.py (or FILE.py:ARG)"),
    (["--config=README.md"], "--config=README.md: not a Python file (a config file is a .py file with get_config())"),
    (["--config={tmp}/broken.py"], "--config={tmp}/broken.py: KeyError: 'X'"),
    (["--config={tmp}/reads.py"], "--config={tmp}/reads.py: FileNotFoundError: [Errno 2] No such file or directory: "
     "'no_such_file.txt'"),
    (["--config={tmp}/none.py"], "--config={tmp}/none.py: get_config() returned None (a missing return?)"),
    # Keys and values (the default config when no --config is given; overrides come after the file).
    (["--config.lr=0.1", "--config.model.remat", "--noconfig.init.new_head", "--config.evals.eval.split=train",
      "--config.num_classes=7", "--config.evals.fewshot.shots=(1,2)"], None),
    (["--config.learning_rate=0.1"], "unknown config key learning_rate (--config.learning_rate); config has no key "
     "like it"),
    (["--config.model.varient=B/16"], "unknown config key model.varient (--config.model.varient); did you mean "
     "--config.model.variant or --config.model.remat?"),
    (["--config=configs/mixer_jft.py:h14", "--config.evals.eval.spilt=test"], "unknown config key evals.eval.spilt "
     "(--config.evals.eval.spilt); did you mean --config.evals.eval.split?"),
    (["--config.batch_size=abc"], "--config.batch_size=abc: config.batch_size takes an integer"),
    (["--config.batch_size", "abc"], "--config.batch_size=abc: config.batch_size takes an integer"),
    (["--config.lr=fast"], "--config.lr=fast: config.lr takes a number"),
    (["--config.model.remat=maybe"], "--config.model.remat=maybe: config.model.remat takes true or false"),
    (["--config.evals.eval.every_steps=1.5"], "--config.evals.eval.every_steps=1.5: config.evals.eval.every_steps "
     "takes an integer"),
    (["--config.num_classes=ten"], "--config.num_classes=ten: config.num_classes takes an integer"),
]


@pytest.mark.parametrize("argv,expected", ROWS, ids=[" ".join(argv) for argv, _ in ROWS])
def test_config_errors(argv, expected, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the paths are relative, as users type them.
  (tmp_path / "broken.py").write_text("def get_config():\n  return {'a': 1}['X']\n")
  (tmp_path / "none.py").write_text("def get_config():\n  pass\n")
  (tmp_path / "flags.txt").write_text("--config=configs/mixer_jft.py:x99\n")
  (tmp_path / "reads.py").write_text("def get_config():\n  return open('no_such_file.txt').read()\n")
  argv = ["train.py", "--workdir", "/tmp/w", *(arg.format(tmp=tmp_path) for arg in argv), "--verbose"]
  expected = expected and expected.format(tmp=tmp_path)
  if expected is None:
    errors.check_config_args("config", os.path.join(REPO, "configs", "default.py"), argv)
    return
  with pytest.raises((errors.FlagError, FileNotFoundError)) as error:
    errors.check_config_args("config", os.path.join(REPO, "configs", "default.py"), argv)
  assert str(error.value) == expected


def test_overrides_without_a_config_file_are_refused():
  # evaluate.py and mixer.predict read the config from the workdir unless --config is given.
  with pytest.raises(errors.FlagError, match=r"^--config.lr needs --config=FILE: there is no config file to override$"):
    errors.check_config_args("config", None, ["evaluate.py", "--workdir=w", "--config.lr=0.1"])
  errors.check_config_args("config", None, ["evaluate.py", "--workdir=w"])


@pytest.mark.subprocess
def test_train_and_evaluate_end_on_a_bad_config_in_one_line_with_exit_2():
  # Where ml_collections would fail: parsing --config=FILE:ARG, an override of the default config at import, a
  # wrong value of another flag, and evaluate.py's own flags.
  for script, args, message in (
      ("train.py", ["--config=configs/mixer_jft.py:x99"], f"--config=configs/mixer_jft.py:x99: {NO_VARIANT}"),
      ("train.py", ["--config.batch_size=abc"], "--config.batch_size=abc: config.batch_size takes an integer"),
      ("train.py", ["--compile_for"], "Missing value for flag --compile_for"),
      ("evaluate.py", ["--config=configs/default.py:foo"],
       "--config=configs/default.py:foo: configs/default.py takes no argument (pass --config=configs/default.py)"),
      ("evaluate.py", ["--top1=maybe"], "--top1=maybe: --top1 takes true or false")):
    result = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"{script}: error: {message}  (--verbose shows the traceback)"], (
        result.stderr[-3000:])
