"""Re-measures the README's first-run figures (the default run, the fine-tuning demo) and the few-shot table of
docs/evaluation.md by running the README's own commands, writes them with the machine they ran on (and
the date, in the JSON only) to docs/readme_figures.json, and puts them into those pages
(tests/readme_figures_test.py checks that the pages and the JSON agree).

  python docs/readme_figures.py                # about 10 minutes on 2 busy CPU cores
  python docs/readme_figures.py --check        # only compare the pages with docs/readme_figures.json
  python docs/readme_figures.py --readme_only  # write the JSON's figures into the pages, measuring nothing
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
PAGES = ("README.md", "docs/evaluation.md")  # the pages that show these figures, relative to REPO
RECORDED_ONLY = ("date",)  # in the JSON, not in the pages: a page names the machine and command instead

# figure -> (the page text around it, with (?P<v>...) where the value goes; how the value is written). Each
# must occur in at least one of PAGES; every occurrence is checked and written.
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
    "machine": (r"measured by\s+`python docs/readme_figures\.py`[^\n]*? on (?P<v>[^\n]+?, jax [0-9.]*[0-9])", "{}"),
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
  return f"{os.cpu_count()} cores of {model} (load {load:.1f} at the start), {platform.system()}, jax {jax.__version__}"


def measure() -> dict:
  shutil.rmtree(os.path.join(REPO, RUNS), ignore_errors=True)
  figures = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
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


def read_pages() -> dict[str, str]:
  return {page: open(os.path.join(REPO, page)).read() for page in PAGES}


def mismatches(pages: dict[str, str], figures: dict) -> list[str]:
  """What differs between `pages` ({name: text}) and `figures`; a figure no page shows is a problem too."""
  problems = []
  for key, (pattern, _) in FIGURES.items():
    found = False
    for page, text in pages.items():
      for match in re.finditer(pattern, text):
        found = True
        if match.group("v") != written(key, figures[key]):
          problems.append(f"{key}: {page} says {match.group('v')!r}, measured {written(key, figures[key])!r}")
    if not found:
      problems.append(f"{key}: no page of {', '.join(pages)} has text matching {pattern!r}")
  return problems


def update(text: str, figures: dict) -> str:
  """`text` with every occurrence of every figure replaced by its value in `figures`."""
  for key, (pattern, _) in FIGURES.items():
    # From the last occurrence backwards, so that earlier matches' offsets stay valid.
    for match in reversed(list(re.finditer(pattern, text))):
      text = text[:match.start("v")] + written(key, figures[key]) + text[match.end("v"):]
  return text


def write_pages(figures: dict):
  for page, text in read_pages().items():
    with open(os.path.join(REPO, page), "w") as f:
      f.write(update(text, figures))


def main():
  if "--readme_only" in sys.argv:  # the pages from the JSON, without measuring again
    write_pages(json.load(open(JSON)))
  elif "--check" not in sys.argv:
    figures = measure()
    with open(JSON, "w") as f:
      json.dump(figures, f, indent=2)
    write_pages(figures)
    print(json.dumps(figures, indent=2))
  problems = mismatches(read_pages(), json.load(open(JSON)))
  print("\n".join(problems) or f"{', '.join(PAGES)} match docs/readme_figures.json")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  main()
