"""Where the train step's time goes: a device trace of our jitted step, summed per XLA op and per model part.

  python tools/step_profile.py --variant S/16 --batch 8 --device cpu
  python tools/step_profile.py --variant B/16 --batch 256 --device gpu --json b16_profile.json

Builds the same train step as throughput.py, traces --steps steps with jax.profiler (the raw trace stays
in --trace_dir for Perfetto or TensorBoard), and matches each traced op to the compiled HLO. Prints one
JSON object: step time, time per category (matmul, convolution, transpose/copy, elementwise or
reduction fusion, collective, other), per model part and pass ("token_mixing backward", "optimizer"),
the top ops, and the TFLOP/s reached inside the matmuls (the architecture's FLOPs over matmul time),
which says whether the step is bound by its matmuls or by the work between them. On GPU it turns XLA's
command buffers (CUDA graphs) off unless XLA_FLAGS sets them, so that each kernel keeps its HLO name.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "benchmarks")]
import hlo  # noqa: E402  (HLO reading, beside this file)
import jax  # noqa: E402  (main's XLA_FLAGS still apply: XLA reads them when jax starts a backend)
import throughput  # noqa: E402  (benchmarks/throughput.py: the same step and arguments)

_MODEL_PARTS = ("token_mixing", "channel_mixing", "LayerNorm", "pre_head_layer_norm", "stem", "head")


def model_part(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(MlpMixer))/MixerBlock_3/token_mixing/...' -> 'token_mixing backward'."""
  if "MlpMixer" not in op_name:
    return "optimizer and loss" if op_name else "unattributed"
  passed = "backward" if "transpose(" in op_name else "forward"
  parts = [p for p in _MODEL_PARTS if re.search(rf"/{p}(_\d+)?(/|$)", op_name)]
  return f"{parts[0] if parts else 'other'} {passed}"


def device_op_events(trace_dir: str, instructions: dict) -> tuple[list[tuple[str, float, float]], dict]:
  """(HLO instruction, start us, duration us) of every traced op of the compiled step, and
  {name: total us} of the GPU's events that name no op of it (cuBLAS or memcpy kernels that the trace
  does not tie to an HLO op would show up there).

  On a GPU only the device's own timeline counts (kernels, named by HLO op); on CPU the ops run on
  host threads, so every thread counts, and host events that are not ops are left out.
  """
  paths = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no Perfetto trace (*.json.gz) under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpus = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
  ops, unmatched = [], collections.Counter()
  for event in events:
    if event.get("ph") != "X" or (gpus and event.get("pid") not in gpus):
      continue
    name = (event.get("args") or {}).get("hlo_op") or event.get("name", "")
    if name in instructions:
      ops.append((name, float(event["ts"]), float(event["dur"])))
    elif gpus:
      unmatched[name] += float(event["dur"])
  return ops, dict(unmatched)


def busy_time(ops: list[tuple[str, float, float]]) -> float:
  """Microseconds in which at least one op ran (CPU runs independent ops on several threads at once)."""
  total, end = 0.0, float("-inf")
  for _, start, duration in sorted(ops, key=lambda op: op[1]):
    total += max(0.0, start + duration - max(start, end))
    end = max(end, start + duration)
  return total


def summarize(ops, instructions: dict, steps: int, step_ms: float, train_flops: float, top: int,
              unmatched: dict | None = None) -> dict:
  per_op = collections.Counter()
  for name, _, duration in ops:
    per_op[name] += duration / 1e3 / steps
  computations = hlo.bodies(instructions)
  kind = {name: hlo.category(instructions[name], computations) for name in per_op}
  op_total = sum(per_op.values())
  by_category, by_part = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    by_category[kind[name]] += ms
    by_part[model_part(instructions[name]["op_name"])] += ms

  def table(counter):
    return {k: {"ms_per_step": v, "share": v / op_total} for k, v in counter.most_common()}

  matmul_ms = by_category.get("matmul", 0.0) + by_category.get("convolution", 0.0)
  return {
      "step_ms": step_ms, "op_ms_per_step": op_total, "busy_ms_per_step": busy_time(ops) / 1e3 / steps,
      "matmul_tflops": train_flops / (matmul_ms / 1e3) / 1e12 if matmul_ms else None,
      "by_category": table(by_category), "by_model_part": table(by_part),
      "top_ops": [{"op": name, "ms_per_step": ms, "category": kind[name],
                   "model_part": model_part(instructions[name]["op_name"]),
                   "op_name": instructions[name]["op_name"]} for name, ms in per_op.most_common(top)],
      "unmatched_ms_per_step": sum((unmatched or {}).values()) / 1e3 / steps,
      "top_unmatched": [{"event": name, "ms_per_step": us / 1e3 / steps}
                        for name, us in collections.Counter(unmatched or {}).most_common(top)],
  }


def main(argv=None):
  parser = throughput.make_parser(__doc__)
  parser.add_argument("--top", type=int, default=25, help="how many of the slowest ops to list")
  parser.add_argument("--trace_dir", default=None, help="keep the raw trace here (default: a new temp dir)")
  args = throughput.parse_args(argv, parser)
  if args.device == "gpu" and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    # Kernels replayed from a CUDA graph lose their HLO names in the trace; profile them launched one by one.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  built = throughput.build_jax(args)
  compiled = built["train_step"].lower(built["state"], built["batch"], built["rng"]).compile()
  instructions, _ = hlo.parse(compiled.as_text())
  state = built["state"]

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = compiled(state, built["batch"], built["rng"])
    jax.block_until_ready(metrics["loss"])

  run(args.warmup)
  start = time.perf_counter()
  run(args.steps)
  step_ms = 1e3 * (time.perf_counter() - start) / args.steps
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="mixer_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run(args.steps)
  ops, unmatched = device_op_events(trace_dir, instructions)
  if not ops:
    names = sorted(unmatched, key=unmatched.get, reverse=True)[:10]
    raise RuntimeError(f"the trace in {trace_dir} holds no op of the compiled step (jax {jax.__version__}); "
                       f"its longest device events: {names}")
  train_flops = 3 * args.batch * throughput.mixer_flops_per_image(args.variant, args.resolution, args.num_classes)
  result = {"variant": args.variant, "resolution": args.resolution, "batch": args.batch, "dtype": args.dtype,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "trace_dir": trace_dir,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            **summarize(ops, instructions, args.steps, step_ms, train_flops, args.top, unmatched)}
  throughput.report(result, args.json)


if __name__ == "__main__":
  main()
