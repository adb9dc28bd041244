"""Per-device memory of the compiled train step, for each variant, global batch and mesh.

Compiles (never runs) the real train step on a simulated CPU mesh and reads XLA's
`compiled.memory_analysis()`: parameters + optimizer state + batch (arguments), outputs not aliased
to inputs, and temporaries (activations kept for the backward pass). Prints a table and JSON.

  python benchmarks/memory.py --devices 256 --batch 4096                 # all seven paper variants
  python benchmarks/memory.py --devices 8 --batch 1024 --variants H/14 --param_sharding fsdp --remat

XLA:CPU's buffer assignment is not TPU's or GPU's (it fuses less, and may keep bf16 dots in f32),
so read the numbers as an estimate of the accelerator's; the parameter/optimizer part is exact.
"""

import argparse
import json
import os
import sys
import time

GIB = 2**30


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default="S/32,S/16,B/32,B/16,L/32,L/16,H/14")
  parser.add_argument("--batch", type=int, default=4096, help="global batch size")
  parser.add_argument("--devices", type=int, default=256, help="simulated devices in the mesh")
  parser.add_argument("--model_axis", type=int, default=1, help="size of the mesh's 'model' axis")
  parser.add_argument("--param_sharding", default=None,
                      help="replicated, fsdp, tensor, fsdp_tensor or rules; default: the config's")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                      help="default: the config's")
  parser.add_argument("--grad_accum_steps", type=int, default=None, help="default: the config's")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--config", default="mixer_imagenet21k", help="a configs/ module taking a variant arg")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  return parser.parse_args(argv)


def measure(args, variant: str) -> dict:
  import importlib

  import jax
  import jax.numpy as jnp

  from mixer import models, optim, steps, train_lib
  from mixer import sharding as sharding_lib

  config = importlib.import_module(f"configs.{args.config}").get_config(variant.replace("/", "").lower())
  config.batch_size = args.batch
  if args.grad_accum_steps is not None:
    config.grad_accum_steps = args.grad_accum_steps
  config.model.dtype = args.dtype
  config.mesh = {"data": -1, "model": args.model_axis}
  if args.param_sharding is not None:
    config.param_sharding = args.param_sharding
  if args.remat is not None:
    config.model.remat = args.remat
  train_lib.validate_config(config, args.devices, 1)
  num_classes = 21843 if "21k" in args.config else 1000
  mesh = sharding_lib.create_mesh(config.mesh)
  model = models.create_model(config.model, num_classes)
  schedule = optim.create_schedule(config, 100_000)
  tx = optim.create_optimizer(config, schedule)
  image_shape = (args.resolution, args.resolution, 3)
  state_sharding = steps.state_sharding_for(model, tx, image_shape, mesh, config.param_sharding)
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                jax.eval_shape(steps.init_fn(model, tx, image_shape, 0)), state_sharding)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((args.batch,) + image_shape, jnp.float32, sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=batch_sharding)}
  step = steps.make_train_step(config, model, tx, schedule, num_classes, state_sharding, mesh)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return {"variant": variant, "params_m": round(params / 1e6, 1), "batch": args.batch, "devices": args.devices,
          "mesh": dict(mesh.shape), "param_sharding": config.param_sharding, "remat": bool(config.model.remat),
          "grad_accum_steps": config.grad_accum_steps,
          "dtype": args.dtype, "arguments_gib": mem.argument_size_in_bytes / GIB,
          "temp_gib": mem.temp_size_in_bytes / GIB, "peak_gib": peak / GIB,
          "fits_16gib": peak < 16 * GIB, "fits_80gib": peak < 80 * GIB, "compile_s": round(compile_s, 1)}


def main(argv=None):
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  rows = [measure(args, v.strip()) for v in args.variants.split(",")]
  header = f"{'variant':8} {'params':>8} {'sharding':>12} {'remat':>5} {'accum':>5} {'args GiB':>9} " \
           f"{'temp GiB':>9} {'peak GiB':>9} {'16GB':>5} {'80GB':>5} {'compile s':>9}"
  print(f"global batch {args.batch} on {args.devices} devices, {args.resolution}px, {args.dtype}")
  print(header)
  for r in rows:
    print(f"{r['variant']:8} {r['params_m']:>7}M {r['param_sharding']:>12} {str(r['remat']):>5} "
          f"{r['grad_accum_steps']:>5} "
          f"{r['arguments_gib']:9.2f} {r['temp_gib']:9.2f} {r['peak_gib']:9.2f} "
          f"{'yes' if r['fits_16gib'] else 'NO':>5} {'yes' if r['fits_80gib'] else 'NO':>5} {r['compile_s']:9.1f}")
  print(json.dumps(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
