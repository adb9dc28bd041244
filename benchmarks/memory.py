"""Memory per TPU device and the compiler's step-time estimate for each paper variant, on TPU slices.

Compiles (never runs) the real train step of each variant's config for a TPU slice with libtpu, on any
host (mixer/tpu.py), and prints a table and JSON. Needs `pip install "jax[tpu]==0.10.1"`.

  python benchmarks/memory.py --topologies v3:8x16,v4:4x4x8,v5p:4x4x8,v5e:8x16   # the configs' layouts
  python benchmarks/memory.py --topologies v3:8x16 --search     # every layout; the fastest that fits
  python benchmarks/memory.py --inference --topologies v3:2x2 --per_device_batch 16,128  # vs paper Table 3

Times are the TPU compiler's own estimate (cost_analysis "optimal_seconds"), not measurements.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's mixer (also where it is not installed) and configs/ (whose files import each other as the
# package `configs`).
sys.path.insert(0, REPO)
import jax  # noqa: E402

from mixer import cli, tpu  # noqa: E402

GIB = 2**30
PAPER_VARIANTS = "S/32,S/16,B/32,B/16,L/32,L/16,H/14"
# Paper Table 3, "throughput img/s/core" (TPU v3, inference at 224px).
PAPER_THROUGHPUT = {"S/32": 11489, "B/32": 4208, "S/16": 3994, "B/16": 1384, "L/32": 1314, "L/16": 419, "H/14": 194}
# --search: the layouts tried, cheapest first (parameter sharding, remat, micro-batches).
LAYOUTS = [("replicated", False, 1), ("fsdp", False, 1), ("fsdp", True, 1), ("fsdp", False, 2), ("fsdp", True, 2),
           ("fsdp", True, 4)]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default=PAPER_VARIANTS)
  parser.add_argument("--topologies", default="v3:8x16", help="comma-separated TPU slices, e.g. v3:8x16,v5e:16x16")
  parser.add_argument("--batch", type=int, default=4096, help="global batch size (train)")
  parser.add_argument("--config", default="mixer_imagenet21k",
                      help="a config of configs/ by name, or a config file's path; given each variant as its "
                           "argument (b16), or, if it takes none (default), with config.model.variant set")
  parser.add_argument("--param_sharding", default=None, help="default: the config's")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None, help="default: the config's")
  parser.add_argument("--grad_accum_steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--search", action="store_true",
                      help=f"compile each variant in each layout of {LAYOUTS} until two fit; report the fastest")
  parser.add_argument("--inference", action="store_true", help="the forward pass only, as the paper's Table 3")
  parser.add_argument("--per_device_batch", default="16,128", help="--inference: batch per device, comma-separated")
  parser.add_argument("--json", default=None, help="also write the rows to this file (rewritten after each row)")
  return parser.parse_args(argv)


def variant_config(args, variant: str):
  path = args.config if args.config.endswith(".py") else os.path.join(REPO, "configs", f"{args.config}.py")
  try:
    config = cli.load_config_file(f"{path}:{variant.replace('/', '').lower()}")
  except ValueError as e:
    if "takes no argument" not in str(e):  # cli's one line for an argument to a config that takes none.
      raise
    config = cli.load_config_file(path)  # a config without a variant argument (configs/default.py): set the variant.
    config.model.variant = variant
  config.batch_size = args.batch
  config.eval_batch_size = args.batch
  for key, value in (("param_sharding", args.param_sharding), ("grad_accum_steps", args.grad_accum_steps)):
    if value is not None:
      config[key] = value
  if args.remat is not None:
    config.model.remat = args.remat
  return config


def _gib(size: int | None) -> float | None:
  return None if size is None else size / GIB


def train_row(config, topology: str) -> dict:
  r = tpu.compile_for(config, topology, eval_step=False)
  seconds = r["train"]["estimated_s"]
  return {"variant": r["variant"], "topology": topology,
          "devices": r["devices"], "device_kind": r["device_kind"],
          "batch": r["batch"], "param_sharding": r["param_sharding"], "remat": r["remat"],
          "grad_accum_steps": r["grad_accum_steps"], "state_gib": r["state_bytes"] / GIB,
          "temp_gib": _gib(r["train"]["temp_bytes"]), "peak_gib": _gib(r["train"]["peak_bytes"]),
          "out_of_memory": r["train"].get("out_of_memory"),
          "hbm_gib": r["hbm_bytes"] / GIB, "fits": r["fits"], "estimated_step_ms": seconds and seconds * 1e3,
          "estimated_img_s_per_device": seconds and r["batch"] / r["devices"] / seconds,
          "estimated_mfu": seconds and r["train"]["flops"] / seconds / r["peak_flops"],
          "compile_s": r["train"]["compile_s"]}


def search(config, topology: str, emit) -> None:
  """Each layout in turn until two fit (a later one only adds memory savings, at a cost in speed)."""
  fitting = 0
  for param_sharding, remat, accum in LAYOUTS:
    config.param_sharding, config.model.remat, config.grad_accum_steps = param_sharding, remat, accum
    row = train_row(config, topology)
    emit(row)
    fitting += row["fits"]
    if fitting == 2:
      return


def main(argv=None):
  args = parse_args(argv)
  if "JAX_PLATFORMS" not in os.environ:  # compile only, on any host: jax read the variable at import, the flag decides.
    jax.config.update("jax_platforms", "cpu")
  tpu.raise_stack_limit()
  rows = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)

  for topology in args.topologies.split(","):
    for variant in args.variants.split(","):
      config = variant_config(args, variant.strip())
      if args.inference:
        for per_device in map(int, args.per_device_batch.split(",")):
          row = tpu.compile_inference(config, topology, per_device)
          row["paper_img_s_per_core"] = PAPER_THROUGHPUT.get(row["variant"])
          emit(row)
      elif args.search:
        search(config, topology, emit)
      else:
        emit(train_row(config, topology))
  print_table(rows, args.inference)
  return rows


def _cell(gib: float | None) -> str:
  return f"{gib:8.2f}" if gib is not None else f"{'OOM':>8}"


def print_table(rows, inference: bool) -> None:
  if inference:
    print(f"{'variant':8} {'slice':10} {'batch/dev':>9} {'est. ms':>8} {'est. img/s/dev':>14} {'paper':>7} "
          f"{'est. MFU':>8}")
    for r in rows:
      print(f"{r['variant']:8} {r['topology']:10} {r['per_device_batch']:>9} {r['estimated_ms']:8.2f} "
            f"{r['estimated_img_s_per_device']:14,.0f} {r['paper_img_s_per_core'] or '':>7} {r['estimated_mfu']:8.0%}")
    return
  print(f"{'variant':8} {'slice':10} {'sharding':>10} {'remat':>5} {'accum':>5} {'state GiB':>9} {'temp GiB':>8} "
        f"{'peak GiB':>8} {'HBM':>4} {'fits':>4} {'est. ms':>8} {'img/s/dev':>9} {'MFU':>4} {'compile s':>9}")
  for r in rows:
    ms = r["estimated_step_ms"]
    print(f"{r['variant']:8} {r['topology']:10} {r['param_sharding']:>10} {str(r['remat']):>5} "
          f"{r['grad_accum_steps']:>5} {r['state_gib']:9.2f} {_cell(r['temp_gib'])} {_cell(r['peak_gib'])} "
          f"{r['hbm_gib']:4.0f} {'yes' if r['fits'] else 'NO':>4} {ms or float('nan'):8.1f} "
          f"{r['estimated_img_s_per_device'] or float('nan'):9,.0f} {r['estimated_mfu'] or float('nan'):4.0%} "
          f"{r['compile_s']:9.1f}")


if __name__ == "__main__":
  main()
