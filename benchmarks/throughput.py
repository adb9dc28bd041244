"""Training and inference throughput of our jitted Mixer step, beside timm's matching PyTorch model.

  python benchmarks/throughput.py --variant S/16 --batch 8 --device cpu
  python benchmarks/throughput.py --variant B/16 --batch 256 --device gpu --sweep 64,128,256,512 --plot b16.png

Ours: the real train step (mixer.steps.make_train_step: forward, backward, clipping, Adam update, state
donated) and the jitted forward, timed after warm-up in repeats of several steps. timm: the same shapes
with torch.compile and bf16 autocast on GPU, eager float32 on CPU, AdamW, clipping; it runs in a child
process (PyTorch and TensorFlow-linked libraries do not share a process well). Prints one JSON object:
images/s, step time median and spread, FLOPs per image (architecture and XLA's cost analysis), MFU
against a matmul peak measured on the same device, compile time, peak memory, and ours/timm ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's mixer, also where it is not installed (pip install -e .).
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mixer import compilation, flops, models, optim, sharding, steps  # noqa: E402


def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
  """The step's shape and timing flags (tools/step_profile.py adds its own to these)."""
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", default=None, help="compute dtype; default bfloat16 on gpu, float32 on cpu")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--scan_blocks", action="store_true", help="our model with config.model.scan_blocks")
  parser.add_argument("--remat", action="store_true", help="our model with config.model.remat")
  parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default 10 gpu, 3 cpu)")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 gpu, 3 cpu)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no_timm", action="store_true", help="skip the timm comparison")
  parser.add_argument("--sweep", default=None, help="comma-separated batch sizes: one result per batch")
  parser.add_argument("--plot", default=None, help="with --sweep: write images/s against batch size here")
  parser.add_argument("--json", default=None, help="also write the JSON here")
  parser.add_argument("--framework", choices=("jax", "timm"), default="jax", help=argparse.SUPPRESS)
  return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
  return fill_defaults((parser or make_parser()).parse_args(argv))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
  """The defaults that depend on --device: bf16 and more steps on GPU, float32 and fewer on CPU."""
  gpu = args.device == "gpu"
  args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
  args.steps = args.steps or (10 if gpu else 3)
  args.repeats = args.repeats or (5 if gpu else 3)
  return args


def mixer_flops_per_image(variant: str, resolution: int, num_classes: int) -> float:
  """Forward FLOPs (2 per multiply-add) of the matrix products, from the architecture (Table 1)."""
  model = models.MlpMixer(num_classes=num_classes, **models.variant_kwargs(variant))
  return flops.forward_flops_per_image(model, (resolution, resolution, 3))


def _summary(times: list[float], batch: int) -> dict:
  median = statistics.median(times)
  return {"images_per_s": batch / median, "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * min(times),
          "step_ms_max": 1e3 * max(times), "step_ms_stdev": 1e3 * statistics.pstdev(times)}


def _repeat(run_steps, args) -> list[float]:
  """Seconds per step of each repeat of args.steps steps (run_steps blocks until they are done)."""
  run_steps(args.warmup)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run_steps(args.steps)
    times.append((time.perf_counter() - start) / args.steps)
  return times


def step_config(args):
  """The train-step config that every benchmark times: Adam, clipping, softmax cross-entropy, no mixup."""
  return ml_collections.ConfigDict({
      "loss": "softmax_xent", "mixup": 0.0, "grad_accum_steps": 1, "nan_policy": "stop",
      "lr": 1e-3, "weight_decay": 0.1,
      "schedule": "linear", "warmup_steps": 10, "grad_clip_norm": 1.0,
      "optim": {"name": "adam", "b1": 0.9, "b2": 0.999, "momentum": 0.9},
      "model": {"variant": args.variant, "dropout_rate": 0.0, "stoch_depth": 0.0, "gelu_approximate": True,
                "dtype": args.dtype, "remat": args.remat, "scan_blocks": args.scan_blocks, "tokens_mlp_dim": None}})


def step_parts(args, devices=None) -> dict:
  """The config, a 1-axis data mesh over `devices` (default: all), model, schedule and optimizer of the step."""
  config = step_config(args)
  schedule = optim.create_schedule(config, 1_000_000)
  return {"config": config, "mesh": sharding.create_mesh({"data": -1, "model": 1}, devices=devices),
          "model": models.create_model(config.model, args.num_classes), "schedule": schedule,
          "tx": optim.create_optimizer(config, schedule), "shape": (args.resolution, args.resolution, 3)}


def build_jax(args) -> dict:
  """Our model, train state, jitted train step and a random batch of args' shape, on a 1-axis data mesh."""
  if "JAX_PLATFORMS" not in os.environ:  # jax read the variable at import; before its first use the flag decides.
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
  parts = step_parts(args)
  config, mesh, model, schedule, tx, shape = (parts[k] for k in ("config", "mesh", "model", "schedule", "tx", "shape"))
  state, state_sharding = steps.create_train_state(model, tx, shape, mesh, seed=0)
  train_step = steps.make_train_step(config, model, tx, schedule, args.num_classes, state_sharding, mesh)
  data = sharding.batch_sharding(mesh)
  keys = jax.random.split(jax.random.key(0), 2)
  batch = {"image": jax.device_put(jax.random.uniform(keys[0], (args.batch,) + shape, jnp.float32, -1, 1), data),
           "label": jax.device_put(jax.random.randint(keys[1], (args.batch,), 0, args.num_classes), data)}
  return {"model": model, "state": state, "state_sharding": state_sharding, "train_step": train_step,
          "batch": batch, "data_sharding": data, "rng": jax.random.key(1)}


def measure_jax(args) -> dict:
  built = build_jax(args)
  model, state, state_sharding, train_step, batch, data, rng = (
      built[k] for k in ("model", "state", "state_sharding", "train_step", "batch", "data_sharding", "rng"))

  start = time.perf_counter()
  compiled_train = train_step.lower(state, batch, rng).compile()
  train_compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run_train(n):
    for _ in range(n):
      holder["state"], metrics = compiled_train(holder["state"], batch, rng)
    jax.block_until_ready(metrics["loss"])

  train_times = _repeat(run_train, args)

  infer = jax.jit(lambda params, images: model.apply({"params": params}, images),
                  in_shardings=(state_sharding.params, data))
  start = time.perf_counter()
  compiled_infer = infer.lower(holder["state"].params, batch["image"]).compile()
  infer_compile_s = time.perf_counter() - start

  def run_infer(n):
    for _ in range(n):
      logits = compiled_infer(holder["state"].params, batch["image"])
    jax.block_until_ready(logits)

  infer_times = _repeat(run_infer, args)
  cost = compilation.cost_analysis(compiled_infer)
  xla_flops = float(cost.get("flops", 0.0)) / args.batch if cost else None
  peak_tflops = measure_peak_jax(args.dtype)
  flops = mixer_flops_per_image(args.variant, args.resolution, args.num_classes)
  train = _summary(train_times, args.batch)
  infer_summary = _summary(infer_times, args.batch)
  stats = jax.local_devices()[0].memory_stats() or {}
  memory = compiled_train.memory_analysis()
  return {
      "framework": "jax", "jax": jax.__version__, "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "variant": args.variant, "resolution": args.resolution, "batch": args.batch,
      "dtype": args.dtype, "scan_blocks": args.scan_blocks, "remat": args.remat,
      "train": train, "inference": infer_summary,
      "flops_per_image_forward": flops, "xla_flops_per_image_forward": xla_flops, "peak_tflops_measured": peak_tflops,
      "mfu_train": 3 * flops * train["images_per_s"] / (peak_tflops * 1e12),
      "mfu_inference": flops * infer_summary["images_per_s"] / (peak_tflops * 1e12),
      "compile_s": {"train": train_compile_s, "inference": infer_compile_s},
      "peak_memory_gib": (stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else
                          (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30),
  }


def measure_peak_jax(dtype: str) -> float:
  """TFLOP/s of a large square matmul in `dtype` on the first device: the MFU denominator."""
  on_gpu = jax.devices()[0].platform == "gpu"
  n = 8192 if on_gpu else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  reps = 20 if on_gpu else 3
  start = time.perf_counter()
  for _ in range(reps):
    out = matmul(a, b)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def measure_timm(args) -> dict:
  # PyTorch and timm only here, in the child process of run_timm: large optional dependencies
  # (benchmarks/requirements.txt) that the JAX side never loads.
  import timm
  import torch
  gpu = args.device == "gpu"
  device = torch.device("cuda" if gpu else "cpu")
  size, patch = args.variant.split("/")
  name = f"mixer_{size.lower()}{patch}_224"
  if name in timm.list_models("mixer_*"):
    model = timm.create_model(name, pretrained=False, num_classes=args.num_classes, img_size=args.resolution)
  else:  # e.g. the tiny size: the same architecture through timm's class.
    k = models.variant_kwargs(args.variant)
    model = timm.models.mlp_mixer.MlpMixer(num_classes=args.num_classes, img_size=args.resolution,
                                           patch_size=k["patch_size"], num_blocks=k["num_blocks"],
                                           embed_dim=k["hidden_dim"])
    name = f"MlpMixer(patch_size={k['patch_size']}, num_blocks={k['num_blocks']}, embed_dim={k['hidden_dim']})"
  model = model.to(device)
  images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
  labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=gpu)
  loss_fn = torch.nn.CrossEntropyLoss()
  forward = torch.compile(model) if gpu else model
  autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu and args.dtype == "bfloat16")
  sync = torch.cuda.synchronize if gpu else (lambda: None)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = loss_fn(forward(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  def run_train(n):
    for _ in range(n):
      train_step()
    sync()

  start = time.perf_counter()
  run_train(1)  # torch.compile compiles here
  train_compile_s = time.perf_counter() - start
  train_times = _repeat(run_train, args)

  def run_infer(n):
    with torch.inference_mode(), autocast:
      for _ in range(n):
        forward(images)
    sync()

  model.eval()
  start = time.perf_counter()
  run_infer(1)
  infer_compile_s = time.perf_counter() - start
  infer_times = _repeat(run_infer, args)
  return {"framework": "timm", "torch": torch.__version__, "timm": timm.__version__, "model": name,
          "compiled": gpu, "dtype": args.dtype if gpu else "float32", "batch": args.batch,
          "train": _summary(train_times, args.batch), "inference": _summary(infer_times, args.batch),
          "compile_s": {"train": train_compile_s, "inference": infer_compile_s},
          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}


def run_timm(args) -> dict | None:
  command = [sys.executable, os.path.abspath(__file__), "--framework", "timm", "--variant", args.variant,
             "--resolution", str(args.resolution), "--batch", str(args.batch), "--device", args.device,
             "--dtype", args.dtype, "--num_classes", str(args.num_classes), "--steps", str(args.steps),
             "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
  if result.returncode != 0:
    return {"error": result.stderr[-2000:]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def one(args) -> dict:
  ours = measure_jax(args)
  result = {"ours": ours}
  if not args.no_timm:
    timm_result = run_timm(args)
    result["timm"] = timm_result
    if "train" in timm_result:
      result["ratio_ours_over_timm"] = {
          "train": ours["train"]["images_per_s"] / timm_result["train"]["images_per_s"],
          "inference": ours["inference"]["images_per_s"] / timm_result["inference"]["images_per_s"]}
  return result


def plot(results: list[dict], out: str) -> None:
  fig = Figure(figsize=(6, 4))  # no pyplot: no global backend to choose.
  ax = fig.subplots()
  batches = [r["ours"]["batch"] for r in results]
  ax.plot(batches, [r["ours"]["train"]["images_per_s"] for r in results], "o-", label="ours (jax), train")
  ax.plot(batches, [r["ours"]["inference"]["images_per_s"] for r in results], "o--", label="ours (jax), inference")
  if all("train" in r.get("timm", {}) for r in results):
    ax.plot(batches, [r["timm"]["train"]["images_per_s"] for r in results], "s-", label="timm, train")
    ax.plot(batches, [r["timm"]["inference"]["images_per_s"] for r in results], "s--", label="timm, inference")
  first = results[0]["ours"]
  ax.set_xscale("log", base=2)
  ax.set_xlabel("batch size")
  ax.set_ylabel("images / s")
  ax.set_title(f"Mixer-{first['variant']} {first['resolution']}px, {first['dtype']}, {first['device']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def report(result, path: str | None, echo: bool = True) -> None:
  """Prints the result as JSON and, with a path, writes it there too."""
  if echo:
    print(json.dumps(result, indent=2))
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=2)


def main(argv=None):
  args = parse_args(argv)
  if args.framework == "timm":
    print(json.dumps(measure_timm(args)))
    return
  if args.sweep:
    results = []
    for batch in (int(b) for b in args.sweep.split(",")):
      args.batch = batch
      results.append(one(args))
      print(json.dumps(results[-1]), flush=True)
    if args.plot:
      plot(results, args.plot)
    report(results, args.json, echo=False)
  else:
    report(one(args), args.json)


if __name__ == "__main__":
  main()
