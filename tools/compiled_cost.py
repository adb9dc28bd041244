"""What the compiled train step does, kernel by kernel, for a GPU we may not have: counts, bytes, matmul FLOPs.

  python tools/compiled_cost.py --variant B/16 --batch 256 --target h200   # no GPU needed (see below)
  python tools/compiled_cost.py --variant S/16 --batch 8 --target cpu

Compiles the same train step as throughput.py ahead of time and reads the optimized HLO: how many
kernels of each kind it launches (matmuls, transposes, fusions), the bytes each non-matmul kernel reads
and writes, the matmul FLOPs (checked against the architecture), and a roofline estimate of the step:
each kernel at the larger of FLOPs / peak and bytes / bandwidth, no launch gaps. The estimate is a
lower bound for comparing two versions of the model, not a measurement (benchmarks/throughput.py
measures). GPU targets compile without a GPU ("deviceless" AOT): install jax's CUDA plugin
(`pip install "jax[cuda13]"` at the pinned jax version) and run on any machine.
"""

import collections
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "benchmarks")]
import hlo  # noqa: E402  (HLO reading, beside this file)
import jax  # noqa: E402  (main's environment variables still apply: jax reads them when it starts a backend)
import jax.numpy as jnp  # noqa: E402
import throughput  # noqa: E402  (benchmarks/throughput.py: the same step and arguments; puts mixer on sys.path)
from jax.experimental import topologies  # noqa: E402

from mixer import sharding, steps  # noqa: E402

# Device descriptions for deviceless compilation (xla GpuTargetConfig text), and the roofline numbers:
# peak = the bf16 matmul rate throughput.py measured on the H200 (781 TFLOP/s; the H100 has the same
# compute die, so the same rate is assumed until measured), bandwidth = the HBM spec.
GPUS = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "memory": 85_520_809_984, "bandwidth_tbs": 3.35, "peak_tflops": 781},
    "h200": {"name": "NVIDIA H200", "memory": 150_121_545_728, "bandwidth_tbs": 4.8, "peak_tflops": 781},
}
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 }}
device_description_str: "{name}"
"""


def target_devices(target: str):
  """Devices to compile for: this machine's CPU, or a GPU described to XLA (no GPU present)."""
  if target == "cpu":
    return jax.devices("cpu")[:1]
  gpu = GPUS[target]
  config = _HOPPER.format(name=gpu["name"], memory=gpu["memory"], bandwidth=int(gpu["bandwidth_tbs"] * 1e12))
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1").devices
  except Exception as e:  # noqa: BLE001  (any plugin failure: say what is missing)
    raise SystemExit(f"--target {target} needs jax's CUDA plugin (pip install \"jax[cuda13]\"): {e}") from e


def measure_bandwidth_cpu() -> float:
  """TB/s of a large elementwise add on this machine's CPU (reads two arrays, writes one)."""
  a, b = jnp.ones((32, 2**20)), jnp.ones((32, 2**20))
  add = jax.jit(lambda x, y: x + y)
  add(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    out = add(a, b)
  out.block_until_ready()
  return 5 * 3 * a.nbytes / (time.perf_counter() - start) / 1e12


def compile_train_step(args, devices):
  """The jitted train step of throughput.py, lowered for `devices` from abstract inputs, then compiled."""
  parts = throughput.step_parts(args, devices)
  config, mesh, model, schedule, tx, shape = (parts[k] for k in ("config", "mesh", "model", "schedule", "tx", "shape"))
  state, state_sharding = steps.abstract_train_state(model, tx, shape, mesh, "replicated")
  data = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((args.batch,) + shape, jnp.float32, sharding=data),
           "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=data)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  train_step = steps.make_train_step(config, model, tx, schedule, args.num_classes, state_sharding, mesh)
  return train_step.lower(state, batch, rng).compile()


_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def kernel_costs(text: str) -> list[dict]:
  """One row per op launched by the entry computation (category, bytes read + written, matmul FLOPs,
  launches); a while loop's ops are rows of their own, launched its known trip count times."""
  instructions, entry = hlo.parse(text)
  computations = hlo.bodies(instructions)

  def rows(computation: str, launches: int) -> list[dict]:
    out = []
    for record in computations[computation]:
      if record["opcode"] in _NOT_KERNELS:
        continue
      if record["opcode"] == "while":
        trips = hlo.trip_count(record)
        out += [row for called in record["calls"] for row in rows(called, launches * trips)]
        continue
      moved = hlo.kernel_bytes(record, instructions, computations)
      out.append({"op": record["name"], "category": hlo.category(record, computations), "launches": launches,
                  "bytes": launches * moved, "transposes": "transpose" in hlo.opcodes_within(record, computations),
                  "flops": launches * hlo.matmul_flops(record, instructions, computations),
                  "op_name": record["op_name"]})
    return out

  return rows(entry, 1)


def summarize(rows: list[dict], peak_tflops: float, bandwidth_tbs: float, architecture_flops: float) -> dict:
  seconds = lambda r: max(r["flops"] / (peak_tflops * 1e12), r["bytes"] / (bandwidth_tbs * 1e12))
  by_category = collections.defaultdict(lambda: {"kernels": 0, "gbytes": 0.0, "tflop": 0.0, "estimate_ms": 0.0})
  for r in rows:
    entry = by_category[r["category"]]
    entry["kernels"] += r["launches"]
    entry["gbytes"] += r["bytes"] / 1e9
    entry["tflop"] += r["flops"] / 1e12
    entry["estimate_ms"] += 1e3 * seconds(r)
  step_ms = sum(1e3 * seconds(r) for r in rows)
  matmul_flops = sum(r["flops"] for r in rows)
  return {
      "kernels": sum(r["launches"] for r in rows),
      "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1]["estimate_ms"])),
      "matmul_tflop_per_step": matmul_flops / 1e12, "architecture_tflop_per_step": architecture_flops / 1e12,
      "non_matmul_gbytes_per_step": sum(r["bytes"] for r in rows if not r["flops"]) / 1e9,
      "kernels_with_a_transpose": sum(r["launches"] for r in rows if r["transposes"]),
      "roofline": {"peak_tflops": peak_tflops, "bandwidth_tbs": bandwidth_tbs, "step_ms": step_ms,
                   "mfu_bound": architecture_flops / (step_ms / 1e3) / (peak_tflops * 1e12)},
  }


def main(argv=None):
  parser = throughput.make_parser(__doc__)
  parser.add_argument("--target", choices=("cpu", *GPUS), default="cpu")
  parser.add_argument("--peak_tflops", type=float, default=None, help="roofline matmul rate (default: the target's)")
  parser.add_argument("--bandwidth_tbs", type=float, default=None, help="roofline memory bandwidth in TB/s")
  parser.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
  args = parser.parse_args(argv)
  gpu = args.target != "cpu"
  if gpu:  # compile for the described GPU; no GPU is used, so skip the plugin's driver checks.
    args.device = "gpu"
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):  # kernels, not CUDA-graph calls.
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  args = throughput.fill_defaults(args)
  devices = target_devices(args.target)
  start = time.perf_counter()
  text = compile_train_step(args, devices).as_text()
  compile_s = time.perf_counter() - start
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(text)
  peak = args.peak_tflops or (GPUS[args.target]["peak_tflops"] if gpu else throughput.measure_peak_jax(args.dtype))
  bandwidth = args.bandwidth_tbs or (GPUS[args.target]["bandwidth_tbs"] if gpu else measure_bandwidth_cpu())
  flops = 3 * args.batch * throughput.mixer_flops_per_image(args.variant, args.resolution, args.num_classes)
  result = {"target": args.target, "variant": args.variant, "resolution": args.resolution, "batch": args.batch,
            "dtype": args.dtype, "scan_blocks": args.scan_blocks, "remat": args.remat, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "compile_s": round(compile_s, 1),
            **summarize(kernel_costs(text), peak, bandwidth, flops)}
  throughput.report(result, args.json)


if __name__ == "__main__":
  main()
