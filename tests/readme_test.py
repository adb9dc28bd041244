"""The documentation's commands for a user's first hour, run as written from a repository root with relative paths.

Every `python ...` line of a `bash` block in README.md and docs/*.md is either run here (COMMANDS, with a few
flags added that shorten training, where the length is not the point), in a directory laid out like the
repository root, or listed in NOT_RUN with the reason; tests/docs_test.py fails on a documented command that
is in neither. Commands run in this process (cheaper than a fresh interpreter each) except the first
`python train.py`, whose console output is itself tested.
"""

import contextlib
import glob
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from tests.conftest import DIGIT_NAMES, REPO

pytestmark = [pytest.mark.trains, pytest.mark.subprocess]

SHORT = ("--config.total_steps=6", "--config.warmup_steps=2", "--config.batch_size=32")
# Documented command -> the flags a test here adds.
COMMANDS = {
    "python train.py": SHORT,
    "python evaluate.py --workdir workdir": (),
    "python evaluate.py --workdir workdir --split train": (),
    "python evaluate.py --workdir workdir --fewshot": (),
    "python evaluate.py --workdir workdir --fewshot --notop1 --random_init": (),
    "python -m mixer.visualize --workdir workdir --out fig.png": (),
    "python -m mixer.predict --workdir workdir digit.png": (),
    "python train.py --config.label_subset=0-4 --workdir runs/pre": SHORT,
    "python train.py --config configs/finetune_digits.py --config.init.checkpoint=runs/pre --workdir runs/ft": SHORT,
    "python train.py --config.dataset=folder:my_images --workdir runs/mine": SHORT + ("--config.bad_images=skip",),
    "python train.py --config configs/finetune_digits.py --config.dataset=folder:my_images "
    "--config.init.checkpoint=runs/pre --workdir runs/mine_ft": SHORT + ("--config.bad_images=skip",),
    "python evaluate.py --workdir runs/mine --fewshot --notop1 --fewshot_dataset=folder:my_images": (),
    "python -m mixer.predict --workdir runs/mine my_images/test/seven": (),
    "python -m mixer.predict --workdir runs/mine --json my_images/test/seven/032.png": (),
}
OFFLINE = "needs a released checkpoint or ImageNet-scale data, which this machine cannot download"
# Documented command -> why no test here runs it as written (and what runs the same code instead).
NOT_RUN = {
    "python evaluate.py --checkpoint imagenet21k_Mixer-B_16.npz --config configs/mixer_b16_imagenet21k.py "
    "--fewshot --notop1 --workdir eval_b16": OFFLINE + "; tests/params_io_test.py loads the released layout",
    "python train.py --config configs/finetune_cifar10.py:b16 --config.init.checkpoint=imagenet21k_Mixer-B_16.npz "
    "--workdir W": OFFLINE + "; the fine-tuning demo above runs the same path on the digits",
    "python train.py --config configs/finetune_imagenet2012.py:l16,448 --config.init.checkpoint=PRETRAIN_WORKDIR "
    "--workdir W": OFFLINE + "; tests/finetune_test.py fine-tunes at twice the resolution on the digits",
    "python benchmarks/compile_time.py --topology v3:2x2 --per_device_batch 32 --repeats 2 --ablations "
    "--json benchmarks/results/tpu_v3_compile_time.json":
        "14 B/16 compiles, about 15 minutes; tests/benchmarks_test.py runs compile_time.py on Ti/4 and the digits",
    "python train.py --config configs/mixer_imagenet21k.py:b16 --compile_for=v3:8x16":
        "compiles for 256 TPU cores for minutes; tests/tpu_test.py runs --compile_for on small slices",
    "python train.py --config configs/mixer_imagenet21k.py:h14 --compile_for=v3:2x2 --config.param_sharding=replicated":
        "compiles H/14 for minutes; tests/tpu_test.py checks train.py --compile_for's exit 1 and advice",
    "python train.py --multihost --config configs/mixer_l16_imagenet21k.py "
    "--config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/runs/l16_i21k":
        "needs a TPU pod slice; tests/multihost_test.py trains with two processes",
    "python train.py --multihost --config configs/mixer_b16_imagenet2012.py "
    "--config.data_dir=/shared/tensorflow_datasets --workdir=/shared/runs/b16_in1k":
        "needs a SLURM GPU cluster; tests/multihost_test.py trains with two processes",
    "python train.py --coordinator_address=NODE0:1234 --num_processes=4 --process_id=$RANK --config ... "
    "--workdir ...": "a template for several nodes; tests/multihost_test.py starts two processes this way",
    "python train.py --config configs/default.py --config.lr=3e-3 --config.model.variant=Ti/2 --workdir /tmp/w":
        "an example of overrides (a full default run); the commands above run --config.KEY overrides",
    "python train.py --config configs/mixer_imagenet21k.py:l16 --config.data_dir=DATA_DIR --workdir W": OFFLINE,
    "python -c \"import mixer.datasets, tensorflow_datasets as tfds; tfds.builder('imagenet21k/fall11', "
    "data_dir='DATA_DIR').download_and_prepare()\"": OFFLINE + "; tests/pretraining_test.py builds from class tars",
    "python -m mixer.export --workdir W --out model.pth":
        "tests/export_test.py runs it on a trained workdir and loads the result into timm",
    "python -c \"import timm, torch; m = timm.create_model('mixer_b16_224', num_classes=10); "
    "m.load_state_dict(torch.load('model.pth'))\"": "tests/export_test.py loads exports into timm with strict=True",
    "python benchmarks/throughput.py --variant B/16 --device gpu --batch 256 --json b16_256.json":
        "needs a GPU; tests/benchmarks_test.py runs throughput.py small on the CPU",
    "python benchmarks/throughput.py --variant B/16 --device gpu --sweep 64,128,256,512 --no_timm --plot b16_sweep.png":
        "needs a GPU; tests/benchmarks_test.py runs throughput.py small on the CPU",
    "python benchmarks/throughput.py --variant S/16 --batch 8 --device cpu":
        "about a minute; tests/benchmarks_test.py runs throughput.py small",
    "python train.py --config configs/mixer_b16_imagenet2012.py --config.profile_start_step=100 --workdir W":
        OFFLINE + "; tests/train_lib_test.py traces steps 6..7 of a run on the digits and reads the trace",
    "python tools/step_profile.py --variant B/16 --device gpu --batch 256":
        "needs a GPU; tests/tools_test.py runs step_profile.py small on the CPU",
    "python tools/compiled_cost.py --variant B/16 --batch 256 --target h200 --json cost.json":
        "needs jax's CUDA plugin; tests/tools_test.py runs compiled_cost.py small on the CPU",
    "python tools/compiled_cost.py --variant B/16 --batch 256 --target h200 --scan_blocks":
        "needs jax's CUDA plugin; tests/tools_test.py runs compiled_cost.py small on the CPU",
    "python benchmarks/memory.py --topologies v5p:4x4x8 --param_sharding fsdp --no-remat --grad_accum_steps 1 "
    "--json benchmarks/results/tpu_v5p_fsdp.json": "compiles seven variants for minutes each; tests/benchmarks_test.py "
                                                   "runs memory.py on a small model",
}
PAGES = ("README.md", "docs/*.md")  # where the documented commands are, relative to the repository root


def documented_commands() -> dict[str, str]:
  """{command: the page that shows it first} for every `python ...` line (continuations joined, comments and
  shell launchers such as `srun ...` or `&&` stripped) of a `bash` block in README.md and docs/*.md."""
  pages = [os.path.relpath(path, REPO) for pattern in PAGES for path in sorted(glob.glob(os.path.join(REPO, pattern)))]
  commands = {}
  for page in pages:
    for block in re.findall(r"```bash\n(.*?)```", open(os.path.join(REPO, page)).read(), re.S):
      for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("#")[0].split("&&"):
          match = re.search(r"(?:^|\s)(python .*)", re.sub(r"\s+", " ", part).strip())
          if match and "pytest" not in match.group(1):
            command = match.group(1)
            if command.count("'") % 2:  # the end of a quoted remote command: gcloud ... --command='...'
              command = command.rstrip("'")
            commands.setdefault(command, page)
  return commands


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_dir, digits_folder):
  """A directory laid out like the repository root, with the user's images in my_images/."""
  root = tmp_path_factory.mktemp("repo")
  for name in ("train.py", "evaluate.py", "configs", "mixer"):
    os.symlink(os.path.join(REPO, name), root / name)
  os.symlink(digits_folder, root / "my_images")
  os.symlink(os.path.join(digits_folder, "test", "seven", "032.png"), root / "digit.png")
  return root


@pytest.fixture(autouse=True)
def _default_data_dir(data_dir, monkeypatch):
  """The tfds default data_dir (what the README's commands use) is the tests' prepared one."""
  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", data_dir)
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)


def run(root, command: str, extra=None) -> str:
  """Runs a README command in this process, as `python ...` would from `root` (with COMMANDS' flags, or
  `extra`); returns what it printed and logged."""
  import logging

  from absl import flags
  extra = COMMANDS[command] if extra is None else extra
  args = shlex.split(command)[1:] + list(extra)
  if args[0] == "-m":
    module, args = args[1], args[2:]
    script = os.path.join(REPO, *module.split(".")) + ".py"
  else:
    script, args = os.path.join(REPO, args[0]), args[1:]
  import mixer.cli  # noqa: F401 - its flags stay defined; each script's own are removed after it.
  # Flags that other modules imported in this process defined (e.g. mixer.predict's --workdir, by its own
  # tests) are set aside while the script defines its own, as in a fresh interpreter, and restored after.
  shared = {f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
            if module.startswith("absl") or module in ("mixer.cli", "mixer.errors") for f in defined}
  shared.discard("config")  # each script defines its own --config (through mixer.errors.define_config_file).
  stashed = {name: flags.FLAGS[name] for name in list(flags.FLAGS)
             if name not in shared and flags.FLAGS[name].name == name}
  for name in stashed:
    delattr(flags.FLAGS, name)
  before = set(flags.FLAGS)
  out = io.StringIO()
  cwd, argv = os.getcwd(), sys.argv
  log = logging.StreamHandler(out)
  log.addFilter(mixer.cli._QuietLibraries())  # what the console shows
  root_logger = logging.getLogger()
  root_logger.addHandler(log)
  # INFO, as in a fresh interpreter, whatever an earlier test in this process left the levels at.
  from absl import logging as absl_logging
  levels = (root_logger.level, absl_logging.get_verbosity())
  root_logger.setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    os.chdir(root)
    sys.argv = [script, *args]
    with contextlib.redirect_stdout(out):
      runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    assert e.code in (0, None), f"{command} exited with {e.code}:\n{out.getvalue()[-3000:]}"
  finally:
    root_logger.removeHandler(log)
    root_logger.setLevel(levels[0])
    absl_logging.set_verbosity(levels[1])
    os.chdir(cwd)
    sys.argv = argv
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    for name, flag in stashed.items():
      flags.FLAGS[name] = flag
    flags.FLAGS.unparse_flags()
  return out.getvalue()


@pytest.fixture(scope="module")
def first_run(root, data_dir):
  """`python train.py` as a new user runs it: a fresh interpreter, so its whole console is seen."""
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="", PYTHONPATH="")
  result = subprocess.run([sys.executable, "train.py", *COMMANDS["python train.py"]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return result.stdout, result.stderr


FINAL = r"Final test top-1 \(digits:test, step 6, 359 examples\): ([0-9.]+)"


def test_first_run_then_evaluate_visualize_and_predict(root, first_run):
  stdout, stderr = first_run
  final = re.findall(FINAL, stdout + stderr)
  assert len(final) == 1, stdout + stderr  # the result once
  lines = stderr.splitlines()
  progress = [i for i, line in enumerate(lines) if re.fullmatch(
      r"step \d+/6  loss [0-9.]+  train acc [0-9.]+(  [0-9,]+ img/s  [0-9.e+-]+ TFLOP/s per device( \(\d+% MFU\))?"
      r"  ETA \S+)?", line)]
  assert progress and progress[0] <= 10, stderr  # a short header, then training (a quiet console)
  assert re.search(r"\nFirst step after [0-9.]+ s \(compile [0-9.]+ s, [^)]+\)\nstep \d+/6", stderr), stderr
  assert len(lines) <= 15 and len(stderr) < 2000, stderr
  assert re.search(r"Model Ti/4: 0.54M parameters on a 1 data x 1 model mesh\nData digits: 1438 train / 359 eval "
                   r"images, 10 classes, 16x16x1 input\nTraining 6 steps of batch 32", stderr), stderr
  assert (root / "workdir" / "checkpoints" / "6").is_dir() and (root / "workdir" / "config.json").exists()
  longer = SHORT[1:] + ("--config.total_steps=8",)
  with pytest.raises(AssertionError, match=r"exited with 1"):  # a change to a run is refused ...
    run(root, "python train.py", extra=longer)
  assert not (root / "workdir" / "config_changes.json").exists()
  longer += ("--config.allow_changes=total_steps",)  # ... unless named, and then recorded.
  out = run(root, "python train.py", extra=longer)  # the same workdir resumes, to a longer end
  assert json.loads((root / "workdir" / "config_changes.json").read_text()) == [
      {"step": 6, "key": "total_steps", "old": 6, "new": 8}]
  assert "Restored checkpoint from step 6" in out, out
  final = re.findall(r"Final test top-1 \(digits:test, step 8, 359 examples\): ([0-9.]+)", out)
  assert len(final) == 1, out
  out = run(root, "python train.py", extra=longer)  # a finished run: nothing to do
  assert "Nothing to train: the checkpoint in workdir is already at step 8" in out, out
  assert len(list((root / "workdir").glob("events.out.tfevents.*"))) == 2  # the first run's and the resumed one's

  out = run(root, "python evaluate.py --workdir workdir")
  assert re.search(r"Top-1 \(digits:test, step 8, 359 examples\): " + final[0], out), out
  # The same checkpoint through --checkpoint on a 2-device mesh (a fresh process: the device count is fixed
  # at start): the params are laid out on the mesh.
  result = subprocess.run([sys.executable, "evaluate.py", "--workdir=workdir", "--checkpoint=workdir"], cwd=root,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                          capture_output=True, text=True, timeout=600)
  assert re.search(r"Top-1 \(digits:test, step workdir, 359 examples\): " + final[0], result.stdout), result
  out = run(root, "python evaluate.py --workdir workdir --split train")
  assert re.search(r"Top-1 \(digits:train, step 8, 1438 examples\): [0-9.]+", out), out
  out = run(root, "python evaluate.py --workdir workdir --fewshot")
  assert re.search(r"digits +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+", out), out
  out = run(root, "python evaluate.py --workdir workdir --fewshot --notop1 --random_init")
  assert json.loads((root / "workdir" / "eval_fewshot_random_init.json").read_text())["step"] == "init"

  out = run(root, "python -m mixer.visualize --workdir workdir --out fig.png")
  assert (root / "fig.png").stat().st_size > 10_000
  assert "no few-shot curves: train with --config.evals.fewshot.every_steps=N" in out, out  # this run logged none

  out = run(root, "python -m mixer.predict --workdir workdir digit.png")
  lines = out.splitlines()
  assert lines[0] == "digit.png" and len(lines) == 6, out  # the file, then its top-5 classes
  shown = [float(line.split("%")[0]) for line in lines[1:]]
  assert shown == sorted(shown, reverse=True) and all(line.split()[-1] in "0123456789" for line in lines[1:])


def test_finetuning_demo_and_your_own_images(root, first_run):
  out = run(root, "python train.py --config.label_subset=0-4 --workdir runs/pre")
  assert re.search(r"Final test top-1 \(digits:test, step 6, 180 examples\)", out), out  # the digits 0-4
  out = run(root, "python train.py --config configs/finetune_digits.py --config.init.checkpoint=runs/pre "
                  "--workdir runs/ft")
  assert re.search(r"Final test top-1 \(digits:test, step 6, 179 examples\)", out), out  # 5-9

  out = run(root, "python train.py --config.dataset=folder:my_images --workdir runs/mine")
  assert "Final test top-1 (folder:my_images:test, step 6, 80 examples)" in out, out
  out = run(root, "python train.py --config configs/finetune_digits.py --config.dataset=folder:my_images "
                  "--config.init.checkpoint=runs/pre --workdir runs/mine_ft")
  assert "Final test top-1 (folder:my_images:test, step 6, 40 examples)" in out, out  # label_subset 5-9

  out = run(root, "python evaluate.py --workdir runs/mine --fewshot --notop1 --fewshot_dataset=folder:my_images")
  assert re.search(r"folder:my_images +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+", out), out

  out = run(root, "python -m mixer.predict --workdir runs/mine my_images/test/seven")
  files = [line for line in out.splitlines() if not line.startswith(" ")]
  assert files == [f"my_images/test/seven/{i:03d}.png" for i in range(32, 40)], out
  assert all(line.split()[-1] in DIGIT_NAMES for line in out.splitlines() if line.startswith(" "))
  table = out.splitlines()
  first = table[table.index("my_images/test/seven/032.png") + 1].split()  # its most probable class: "12.34%  six"
  out = run(root, "python -m mixer.predict --workdir runs/mine --json my_images/test/seven/032.png")
  result = json.loads(out)
  assert result[0]["file"] == "my_images/test/seven/032.png" and len(result[0]["top"]) == 5
  probabilities = [t["probability"] for t in result[0]["top"]]
  assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
  # The same image gives the same answer as one of a directory's (another batch): class and probability.
  assert [f"{100 * probabilities[0]:.2f}%", result[0]["top"][0]["class"]] == first, (first, result)
