"""Every hyperparameter the paper states, beside our configs' values, with each difference marked.

  python -m mixer.paper
Sources: Sec. 3, App. B and Table 4 (pre-training); Sec. 3 and App. C, which follows the ViT paper's
setup (fine-tuning: steps per dataset, lr grid).
"""

import os
import re
import sys

from mixer import cli

# The repository's configs/, beside the mixer package (also when mixer is installed with pip install -e .).
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Sec. 3 / App. B: shared by all pre-training runs.
_PRETRAINING = dict(optimizer="adam(0.9, 0.999)", batch_size=4096, warmup_steps=10_000, schedule="linear",
                    grad_clip_norm=1.0, resolution=224)
# Table 4: (epochs, lr, weight decay, RandAugment magnitude, mixup, dropout, stochastic depth).
_TABLE_4 = {
    "mixer_b16_imagenet2012": (300, 1e-3, 0.1, 15, 0.5, 0.0, 0.1),
    "mixer_l16_imagenet2012": (300, 1e-3, 0.1, 15, 0.5, 0.0, 0.1),
    "mixer_b16_imagenet21k": (300, 1e-3, 0.1, 10, 0.2, 0.0, 0.1),
    "mixer_l16_imagenet21k": (300, 1e-3, 0.1, 20, 0.5, 0.0, 0.1),
    "mixer_jft:s16": (5, 3e-3, 0.03, 0, 0.0, 0.0, 0.0),
    "mixer_jft:b16": (7, 3e-3, 0.03, 0, 0.0, 0.0, 0.0),
    "mixer_jft:l16": (7, 1e-3, 0.03, 0, 0.0, 0.0, 0.0),  # Table 4: 7 or 14 epochs
    "mixer_jft:h14": (14, 1e-3, 0.03, 0, 0.0, 0.0, 0.0),
}
# Sec. 3 / App. C (the ViT paper's fine-tuning setup): SGD momentum 0.9, batch 512, cosine with linear
# warm-up, clipping at 1, no weight decay, no mixup; lr from a grid; steps per dataset.
_FINETUNING = dict(optimizer="sgd(momentum 0.9)", batch_size=512, schedule="cosine", grad_clip_norm=1.0,
                   weight_decay=0.0, mixup=0.0, resolution=224, lr=(0.003, 0.01, 0.03, 0.06))
_FINETUNE_STEPS = {"finetune_imagenet2012": 20_000, "finetune_cifar10": 10_000, "finetune_cifar100": 10_000,
                   "finetune_oxford_iiit_pet": 500, "finetune_oxford_flowers102": 500}

# Where we differ on purpose: (config or "*", field) -> why. An unlisted difference fails tests/paper_test.py.
KNOWN_DIFFERENCES = {
    ("*", "weight_decay_applies_to"): "we decay kernels only (big_vision's convention); the paper's wording "
                                      "does not say, and Flax's old Adam decayed every parameter",
    ("*", "stoch_depth_scaling"): "in training we scale a kept residual branch by 1/(1 - rate), so that its "
                                  "expectation is the eval-time branch (timm's drop_path; Huang et al. scale by "
                                  "1 - rate at test time instead); big_vision's Mixer rescales at neither",
}


def _pp_int(pattern: str, text: str, default=None):
  match = re.search(pattern, text)
  return int(match.group(1)) if match else default


def ours(config) -> dict:
  """The paper's hyperparameters, read off one of our configs."""
  optimizer = (f"adam({config.optim.b1}, {config.optim.b2})" if config.optim.name == "adam"
               else f"sgd(momentum {config.optim.momentum})")
  return {
      "optimizer": optimizer, "batch_size": config.batch_size, "warmup_steps": config.warmup_steps,
      "schedule": config.schedule, "grad_clip_norm": config.grad_clip_norm, "lr": config.lr,
      "weight_decay": config.weight_decay, "weight_decay_applies_to": "kernels",
      "epochs": config.total_epochs if config.total_steps <= 0 else None,
      "steps": config.total_steps if config.total_steps > 0 else None,
      "resolution": _pp_int(r"inception_crop\((\d+)", config.pp_train),
      "randaugment": _pp_int(r"randaugment\(2, (\d+)\)", config.pp_train, default=0),
      "mixup": config.mixup, "dropout": config.model.dropout_rate, "stoch_depth": config.model.stoch_depth,
      "stoch_depth_scaling": "1/(1 - rate)",
  }


def paper(name: str) -> dict:
  if name in _TABLE_4:
    epochs, lr, wd, ra, mixup, dropout, sd = _TABLE_4[name]
    return {**_PRETRAINING, "epochs": epochs, "lr": lr, "weight_decay": wd, "randaugment": ra, "mixup": mixup,
            "dropout": dropout, "stoch_depth": sd, "weight_decay_applies_to": "not stated",
            "stoch_depth_scaling": "not stated"}
  return {**_FINETUNING, "steps": _FINETUNE_STEPS[name], "dropout": 0.0, "stoch_depth": 0.0,
          "warmup_steps": "not stated"}


def load(name: str):
  """One of our configs by name ("mixer_jft:s16" is configs/mixer_jft.py with get_config("s16")), or a config
  file by path ("path/to/file.py", "path/to/file.py:arg")."""
  path, colon, arg = name.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(CONFIGS, f"{path}.py")
    if not os.path.isfile(path):
      known = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py") and not f.startswith("_"))
      raise ValueError(f"config {name!r} is not in {CONFIGS} (one of {', '.join(known)}) nor a .py file")
  return cli.load_config_file(path + colon + arg, flag="config")


def compare(name: str, config=None) -> list[tuple[str, object, object, str]]:
  """(field, paper, ours, mark) rows; mark: "" (same), "grid" (ours is one of the paper's grid),
  "not stated" (the paper gives no value), or "DIFFERENT: why" for a known difference, "UNMARKED" else."""
  ours_values, paper_values = ours(config or load(name)), paper(name)
  rows = []
  for field, expected in paper_values.items():
    got = ours_values.get(field)
    if isinstance(expected, tuple):
      mark = "grid" if got in expected else "UNMARKED"
    elif expected == "not stated":
      mark = "not stated"
    elif got == expected or (isinstance(got, float) and isinstance(expected, (int, float)) and got == float(expected)):
      mark = ""
    else:
      mark = "UNMARKED"
    why = KNOWN_DIFFERENCES.get((name, field), KNOWN_DIFFERENCES.get(("*", field)))
    if why:
      mark = f"DIFFERENT: {why}"
    rows.append((field, expected, got, mark))
  return rows


NAMES = list(_TABLE_4) + list(_FINETUNE_STEPS)


def unmarked_differences() -> list[str]:
  return [f"{name}.{field}: paper {p!r}, ours {o!r}" for name in NAMES for field, p, o, mark in compare(name)
          if mark == "UNMARKED"]


COLUMNS = ("epochs", "steps", "lr", "weight_decay", "warmup_steps", "schedule", "grad_clip_norm", "batch_size",
           "randaugment", "mixup", "dropout", "stoch_depth", "resolution", "optimizer")


def table() -> str:
  """One row per config: our value in each column; where the paper differs or is silent, a note."""
  notes, lines = [], ["| config | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for name in NAMES:
    rows = {field: (p, o, mark) for field, p, o, mark in compare(name)}
    cells = []
    for column in COLUMNS:
      if column not in rows:
        cells.append("")
        continue
      p, o, mark = rows[column]
      if mark == "grid":
        cells.append(f"{o} (grid {{{', '.join(map(str, p))}}})")
      elif mark == "not stated":
        cells.append(f"{o} (paper: not stated)")
      elif mark:
        cells.append(f"**{o}** (paper {p})")
      else:
        cells.append(str(o))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes += [f"- {name}: {field}: {mark}" for field, _, _, mark in compare(name)
              if mark.startswith(("DIFFERENT", "UNMARKED")) and field not in COLUMNS]
  lines.append("")
  lines += sorted(set(n.split(": ", 1)[1] for n in notes))
  lines.append("")
  lines.append("Weight decay: the paper's values are Flax Adam's `weight_decay`, applied as p -= lr * wd * p "
               "(decoupled, scaled by the scheduled lr). optax.adamw's weight_decay is the same quantity, so the "
               "numbers carry over unchanged (0.1 on ImageNet, 0.03 on JFT); it is not an L2 term in the loss.")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
  missing = unmarked_differences()
  if missing:
    print("\nUNMARKED DIFFERENCES:\n" + "\n".join(missing))
    sys.exit(1)
