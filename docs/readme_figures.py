"""Re-measures every figure of the README's first-run, evaluation and fine-tuning-demo sections by running
the README's own commands, writes them with the machine they ran on to docs/readme_figures.json, and
puts them into README.md (tests/readme_figures_test.py checks that README and JSON agree).

  python docs/readme_figures.py            # about 10 minutes on 2 busy CPU cores
  python docs/readme_figures.py --check    # only compare README.md with docs/readme_figures.json
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON = os.path.join(REPO, "docs", "readme_figures.json")
RUNS = "runs/readme_figures"  # relative to the repository root, as a user's

# figure -> (the README text around it, with (?P<v>...) where the value goes; how the value is written)
FIGURES = {
    "default_top1": (r"Final test top-1 \(digits:test, step 449, 359 examples\): (?P<v>[0-9.]+)", "{:.4f}"),
    "default_minutes": (r"\(449 steps of batch 128\) in about (?P<v>[0-9.]+) minutes", "{:.1f}"),
    "default_fewshot": (r"\| trained \(the default run: 449 steps, [0-9.]+% test top-1\) (?P<v>(\| [0-9.]+ ){4})\|",
                        "row"),
    "default_top1_percent": (r"\| trained \(the default run: 449 steps, (?P<v>[0-9.]+)% test top-1\)", "{:.2f}"),
    "steps80_fewshot": (r"`--config.total_steps=80`: [0-9.]+% top-1\) (?P<v>(\| [0-9.]+ ){4})\|", "row"),
    "steps80_top1_percent": (r"`--config.total_steps=80`: (?P<v>[0-9.]+)% top-1\)", "{:.2f}"),
    "random_fewshot": (r"\| random initialisation (?P<v>(\| [0-9.]+ ){4})\|", "row"),
    "pre_top1": (r"--workdir runs/pre +# (?P<v>[0-9.]+) on the 0-4 test digits", "{:.4f}"),
    "ft_top1": (r"--workdir runs/ft +# (?P<v>[0-9.]+) on 5-9", "{:.4f}"),
    "demo_minutes": (r"fine-tune on 5-9; ~(?P<v>[0-9.]+) min in all", "{:.1f}"),
    "machine": (r"Figures measured on (?P<v>[^;]+); regenerate", "{}"),
}


def written(key: str, value) -> str:
  fmt = FIGURES[key][1]
  if fmt == "row":
    return "".join(f"| {100 * value[s]:.2f} " for s in ("1", "5", "10", "25"))
  return fmt.format(value)


def _run(*args: str) -> tuple[str, float]:
  start = time.time()
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
  return result.stdout, time.time() - start


def _final(out: str) -> float:
  return float(re.search(r"Final test top-1 \([^)]*\): ([0-9.]+)", out).group(1))


def _fewshot(workdir: str, *extra: str) -> dict:
  _run("evaluate.py", f"--workdir={workdir}", "--fewshot", "--notop1", *extra)
  name = "eval_fewshot" + ("_random_init" if "--random_init" in extra else "")
  return json.load(open(os.path.join(REPO, workdir, f"{name}.json")))["fewshot"]["mean"]["digits"]


def machine() -> str:
  model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
  import jax
  load = os.getloadavg()[0]  # other jobs on the machine slow the timings
  return (f"{os.cpu_count()} cores of {model} (load {load:.1f} at the start), {platform.system()}, "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")


def measure() -> dict:
  shutil.rmtree(os.path.join(REPO, RUNS), ignore_errors=True)
  figures = {"machine": machine()}
  out, seconds = _run("train.py", f"--workdir={RUNS}/default")
  figures.update(default_top1=_final(out), default_minutes=seconds / 60)
  figures["default_top1_percent"] = 100 * figures["default_top1"]
  figures["default_fewshot"] = _fewshot(f"{RUNS}/default")
  out, _ = _run("train.py", "--config.total_steps=80", f"--workdir={RUNS}/steps80")
  figures["steps80_top1_percent"] = 100 * _final(out)
  figures["steps80_fewshot"] = _fewshot(f"{RUNS}/steps80")
  figures["random_fewshot"] = _fewshot(f"{RUNS}/default", "--random_init")
  out, pre_seconds = _run("train.py", "--config.label_subset=0-4", f"--workdir={RUNS}/pre")
  figures["pre_top1"] = _final(out)
  out, ft_seconds = _run("train.py", "--config", "configs/finetune_digits.py", f"--config.init.checkpoint={RUNS}/pre",
                         f"--workdir={RUNS}/ft")
  figures.update(ft_top1=_final(out), demo_minutes=(pre_seconds + ft_seconds) / 60)
  shutil.rmtree(os.path.join(REPO, RUNS), ignore_errors=True)
  return figures


def mismatches(readme: str, figures: dict) -> list[str]:
  problems = []
  for key, (pattern, _) in FIGURES.items():
    match = re.search(pattern, readme)
    if not match:
      problems.append(f"{key}: README has no text matching {pattern!r}")
    elif match.group("v") != written(key, figures[key]):
      problems.append(f"{key}: README says {match.group('v')!r}, measured {written(key, figures[key])!r}")
  return problems


def update(readme: str, figures: dict) -> str:
  for key, (pattern, _) in FIGURES.items():
    match = re.search(pattern, readme)
    if match:
      readme = readme[:match.start("v")] + written(key, figures[key]) + readme[match.end("v"):]
  return readme


def main():
  path = os.path.join(REPO, "README.md")
  if "--readme_only" in sys.argv:  # README from the JSON, without measuring again
    readme = update(open(path).read(), json.load(open(JSON)))
    with open(path, "w") as f:
      f.write(readme)
  elif "--check" not in sys.argv:
    figures = measure()
    with open(JSON, "w") as f:
      json.dump(figures, f, indent=2)
    readme = update(open(path).read(), figures)
    with open(path, "w") as f:
      f.write(readme)
    print(json.dumps(figures, indent=2))
  problems = mismatches(open(path).read(), json.load(open(JSON)))
  print("\n".join(problems) or "README.md matches docs/readme_figures.json")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  main()
