"""Compiles a config's train and eval steps for a TPU slice from any host, with no TPU and no data.

libtpu's compiler runs here on the slice's devices as `jax.experimental.topologies` describes them; the
compiled steps give the memory each core needs and the compiler's own estimate of the step time. The
steps are the ones a real run builds (model, optimizer, shardings and mesh from the config).

  python train.py --config configs/mixer_imagenet21k.py:b16 --compile_for=v3:8x16
"""

import dataclasses
import math
import os
import re
import resource
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from mixer import cli, compilation, flops, models, optim, sharding, steps

GIB = 2**30
_STACK_ENV = "MIXER_TPU_STACK_RAISED"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One device as jax sees it on a slice: a TensorCore (v2, v3) or a whole chip (megacore v4/v5p, v5e, v6e). Its
  peak FLOP/s is flops.peak_flops of its device_kind."""
  hbm_bytes: int
  chip_config: str = "default"  # libtpu's name; "megacore" fuses a chip's two TensorCores into one device.


# Google Cloud's published figures, per device.
CHIPS = {
    "v2": Chip(8 * GIB),
    "v3": Chip(16 * GIB),
    "v4": Chip(32 * GIB, "megacore"),
    "v5e": Chip(16 * GIB),
    "v5p": Chip(95 * GIB, "megacore"),
    "v6e": Chip(32 * GIB),
}
EXAMPLES = "v3:8x16 (v3-256: 256 cores), v4:4x4x8 (v4-256), v5p:4x4x8 (v5p-256), v5e:16x16 (v5e-256)"


def raise_stack_limit() -> None:
  """Re-executes this process with an unlimited stack unless it already has one.

  libtpu's compiler recurses deeply on a Mixer's graph and overflows the default 8 MiB thread stacks
  (a segfault). Its threads take their stack size from the limit the process started with, so the limit
  is raised and the same command run again; call this before anything loads libtpu.
  """
  soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
  if soft == resource.RLIM_INFINITY or os.environ.get(_STACK_ENV):
    return
  try:
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
  except (ValueError, OSError):
    return
  os.environ[_STACK_ENV] = "1"
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def topology(name: str, flag: str = "--compile_for"):
  """(the slice's devices, its Chip) for a topology name such as "v3:8x16"; errors name `flag`."""
  generation = name.split(":")[0].strip().lower()
  if generation not in CHIPS:
    raise ValueError(f"{flag}={name!r} is not GENERATION:SHAPE with GENERATION one of {', '.join(CHIPS)}; "
                     f"e.g. {EXAMPLES}")
  try:
    import libtpu  # noqa: F401 (only its presence: jax loads it as a plugin)
  except ImportError:
    raise ValueError(f"{flag} needs libtpu, which compiles for TPUs on any host: "
                     f"pip install \"jax[tpu]=={jax.__version__}\"") from None
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile beside another process using libtpu.
  try:
    # libtpu starts here, complaining on stderr that this host is no TPU VM: filtered as other start-up noise.
    with cli._native_stderr_filtered():
      devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             chip_config_name=CHIPS[generation].chip_config).devices
  except RuntimeError as e:  # JaxRuntimeError
    raise ValueError(f"{flag}={name!r} is not a TPU slice libtpu knows ({str(e).splitlines()[0]}); "
                     f"e.g. {EXAMPLES}") from None
  return devices, CHIPS[generation]


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += jnp.dtype(leaf.dtype).itemsize * math.prod(shape)
  return total


def _cost(compiled) -> tuple[float | None, float]:
  """(the compiler's step-time estimate in seconds, or None where it gives none; FLOPs per device)."""
  cost = compilation.cost_analysis(compiled)
  seconds = cost.get("optimal_seconds")
  return (seconds if seconds and seconds > 0 else None), float(cost.get("flops", 0.0))


def _oom(error: Exception) -> str:
  """The compiler's out-of-memory message, in one line; any other compile error is raised."""
  message = str(error)
  if "RESOURCE_EXHAUSTED" not in message:
    raise error
  used = re.search(r"Used (\S+) of (\S+) hbm", message)  # e.g. "Used 23.80G of 15.75G hbm."
  if used:
    return f"the compiler needs {used.group(1)} of the {used.group(2)} of HBM it can use"
  sizes = re.search(r"Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)", message)
  if sizes:
    return (f"the compiler cannot fit a {int(sizes.group(1)) / GIB:.2f} GiB buffer into the "
            f"{int(sizes.group(2)) / GIB:.2f} GiB it has")
  return message.splitlines()[0][:300]


def _peak_bytes(memory) -> int:
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def compile_for(config, name: str, eval_step: bool = True) -> dict:
  """Compiles the config's train (and eval) step for the TPU slice `name`; returns what each device needs."""
  devices, chip = topology(name)
  num_processes = len({d.process_index for d in devices})
  # Here, not at the top: these import TensorFlow, whose start-up noise train.py --compile_for filters first.
  from mixer import dataset, setup
  from mixer.evaluators import classification
  setup.validate_config(config, len(devices), num_processes)
  mesh = sharding.create_mesh(config.mesh, devices)
  info = dataset.metadata_info(config)
  num_classes, image_shape, multilabel = info.num_classes, info.image_shape, info.multilabel
  model = models.create_model(config.model, num_classes)
  # The run length only sets constants in the step; without data the epoch count cannot give it.
  schedule = optim.create_schedule(config, max(config.total_steps, config.warmup_steps + 1))
  tx = optim.create_optimizer(config, schedule)
  state, state_sharding = steps.abstract_train_state(model, tx, image_shape, mesh, config.param_sharding)
  data = sharding.batch_sharding(mesh)

  def batch(size: int, with_mask: bool) -> dict:
    labels = (size, info.max_labels) if multilabel else (size,)
    b = {"image": jax.ShapeDtypeStruct((size,) + image_shape, jnp.float32, sharding=data),
         "label": jax.ShapeDtypeStruct(labels, jnp.int32, sharding=data)}
    if with_mask:
      b["mask"] = jax.ShapeDtypeStruct((size,), jnp.float32, sharding=data)
    return b

  train_batch, eval_batch = batch(config.batch_size, False), batch(config.eval_batch_size, True)
  train_step = steps.make_train_step(config, model, tx, schedule, num_classes, state_sharding, mesh)
  compiles = [("train", train_step, (state, train_batch, jax.random.key(0)))]
  if eval_step:
    evaluate = classification.make_eval_step(steps.make_predict_fn(model), config.loss, num_classes, mesh,
                                             state_sharding.params)
    compiles.append(("eval", evaluate, (state.params, eval_batch)))
  report = {"topology": name, "devices": len(devices), "device_kind": devices[0].device_kind,
            "hosts": num_processes, "mesh": dict(mesh.shape), "variant": config.model.variant,
            "num_classes": num_classes, "image_shape": list(image_shape), "batch": config.batch_size,
            "param_sharding": config.param_sharding, "remat": bool(config.model.remat),
            "grad_accum_steps": config.grad_accum_steps, "dtype": config.model.dtype,
            "hbm_bytes": chip.hbm_bytes, "peak_flops": flops.peak_flops(devices[0].device_kind),
            "state_bytes": _shard_bytes(state), "param_bytes": _shard_bytes(state.params),
            "batch_bytes": _shard_bytes(train_batch), "eval_batch": config.eval_batch_size}
  for key, step, args in compiles:
    if key == "eval" and report["train"]["peak_bytes"] is None:
      break  # the train step decides; its verdict stands.
    start, cpu = time.perf_counter(), time.process_time()  # CPU seconds: what a busy host inflates less
    try:
      compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit.
      report[key] = {"compile_s": round(time.perf_counter() - start, 1), "out_of_memory": _oom(e),
                     "temp_bytes": None, "peak_bytes": None, "estimated_s": None, "flops": 0.0}
      continue
    memory, (seconds, step_flops) = compiled.memory_analysis(), _cost(compiled)
    report[key] = {"compile_s": round(time.perf_counter() - start, 1),
                   "compile_cpu_s": round(time.process_time() - cpu, 1), "temp_bytes": memory.temp_size_in_bytes,
                   "peak_bytes": _peak_bytes(memory), "estimated_s": seconds, "flops": step_flops, "compiled": compiled}
  report["fits"] = all(report[key]["peak_bytes"] is not None and report[key]["peak_bytes"] <= chip.hbm_bytes
                       for key, _, _ in compiles if key in report)
  return report


def compile_inference(config, name: str, per_device_batch: int) -> dict:
  """The forward pass (params replicated, batch split over every device) compiled for the slice `name`:
  the compiler's estimate of its time, as the paper's Table 3 measures inference throughput per core."""
  devices, _ = topology(name)
  mesh = sharding.create_mesh({"data": -1, "model": 1}, devices)
  from mixer import dataset  # as in compile_for
  info = dataset.metadata_info(config)
  num_classes, image_shape = info.num_classes, info.image_shape
  model = models.create_model(config.model, num_classes)
  params = steps.abstract_params(model, image_shape, mesh, "replicated")
  images = jax.ShapeDtypeStruct((len(devices) * per_device_batch,) + image_shape, jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)).lower(params, images).compile()
  seconds, step_flops = _cost(compiled)
  return {"variant": config.model.variant, "topology": name, "device_kind": devices[0].device_kind,
          "per_device_batch": per_device_batch, "dtype": config.model.dtype,
          "estimated_ms": seconds and seconds * 1e3,
          "estimated_img_s_per_device": seconds and per_device_batch / seconds,
          "estimated_mfu": seconds and step_flops / seconds / flops.peak_flops(devices[0].device_kind),
          "peak_gib": _peak_bytes(compiled.memory_analysis()) / GIB, "compile_s": round(time.perf_counter() - start, 1)}


def suggestions(config, report: dict) -> list[str]:
  """What to change in the config when the step does not fit, each with what it saves."""
  data = report["mesh"]["data"]
  rules = sharding.parse_rules(config.param_sharding)
  state = report["state_bytes"] / GIB
  out = []
  if data > 1 and "data" not in rules.values():
    out.append(f"--config.param_sharding=fsdp: parameters + optimizer state {state:.2f} GiB per core -> about "
               f"{state / data:.2f} GiB (split over the {data} data shards)")
  if not config.model.remat:
    out.append("--config.model.remat=True: recompute each block's activations in the backward pass "
               "(smaller temporaries, about a third more FLOPs)")
  per_shard = config.batch_size // data
  accum = config.grad_accum_steps
  if per_shard % (2 * accum) == 0:
    out.append(f"--config.grad_accum_steps={2 * accum}: {per_shard // (2 * accum)} examples per micro-batch "
               f"on each data shard instead of {per_shard // accum} (activations halve, same update)")
  out.append(f"a smaller --config.batch_size (now {config.batch_size}), or a slice with more cores")
  return out


def format_report(report: dict) -> str:
  """The human-readable figures that train.py --compile_for prints."""
  devices, batch, hbm = report["devices"], report["batch"], report["hbm_bytes"]
  steps_compiled = [k for k in ("train", "eval") if k in report]
  rows = [("parameters + optimizer state", report["state_bytes"]), ("train batch", report["batch_bytes"])]
  for key in steps_compiled:
    size = f"{key} step" + (f", batch {report['eval_batch']}" if key == "eval" else "")
    if report[key]["peak_bytes"] is None:
      rows.append((f"peak ({size})", f"does not fit: {report[key]['out_of_memory']}"))
    else:
      rows += [(f"temporaries ({size})", report[key]["temp_bytes"]), (f"peak ({size})", report[key]["peak_bytes"])]
  rows.append((f"HBM of a {report['device_kind']} device", hbm))
  peaks = [report[k]["peak_bytes"] for k in steps_compiled]
  if None not in peaks:
    rows.append(("headroom", hbm - max(peaks)))
  width = max(len(label) for label, _ in rows)
  lines = [
      f"Mixer-{report['variant']} ({report['num_classes']} classes, {'x'.join(map(str, report['image_shape']))}, "
      f"{report['dtype']}) compiled for {report['topology']}: {devices} {report['device_kind']} devices, "
      f"{report['hosts']} host(s), mesh {report['mesh']}",
      f"  param_sharding={report['param_sharding']}, model.remat={report['remat']}, "
      f"grad_accum_steps={report['grad_accum_steps']}, batch {batch} ({batch // devices} per device)",
      "Memory per device:"]
  lines += [f"  {label:{width}}  " + (f"{value / GIB:7.2f} GiB" if isinstance(value, int) else value)
            for label, value in rows]
  seconds = report["train"]["estimated_s"]
  if seconds:
    mfu = report["train"]["flops"] / seconds / report["peak_flops"]
    lines.append(f"Estimated by the compiler, not measured: train step {seconds * 1e3:.1f} ms, about "
                 f"{batch / devices / seconds:,.0f} img/s per device, {batch / seconds:,.0f} img/s for the "
                 f"slice ({mfu:.0%} of the bf16 peak)")
  elif report["train"]["peak_bytes"] is not None:
    lines.append("The compiler gave no step-time estimate for this step on this slice.")
  lines.append("Compile time: " + ", ".join(f"{k} step {report[k]['compile_s']} s" for k in steps_compiled))
  return "\n".join(lines)
