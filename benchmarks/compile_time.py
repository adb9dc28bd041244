"""How long the TPU compiler takes over our train step against a big_vision-style one, side by side in one run.

Both steps are compiled (never run) for the same TPU slice with libtpu on this host (mixer/tpu.py), alternately,
`--repeats` times each, so that a change in the host's load falls on both. "ours" is the real train step that
`train.py --compile_for` builds from configs/mixer_imagenet21k.py. "big_vision" is written here as big_vision
writes it: its Mixer module (nn.LayerNorm, nn.gelu, stochastic depth as a product with 1 - bernoulli) in float32
as big_vision's Mixer computes; its train.py update (sigmoid cross-entropy on multi-hot labels that come from the
host, mixup in a shard_map on each device's own examples, the three l2 norms it logs); an optax Adam with
clipping, decoupled decay and the schedule; the same parameter layout (config.param_sharding) over the same mesh.
`--ablations` adds ours with one feature changed, to see where compile time goes.
Needs `pip install "jax[tpu]==0.10.1"`.

  python benchmarks/compile_time.py --topology v3:2x2 --per_device_batch 32 --repeats 2 --ablations \
      --json benchmarks/results/tpu_v3_compile_time.json

Compile seconds are lowering and compiling, in wall time and in the process's CPU seconds (which a busy host
inflates less), with libtpu's own split into HLO passes and backend passes (from its log); step times and peak
memory are the compiler's estimates, not measurements.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's mixer and configs/, as benchmarks/memory.py
from mixer import tpu  # noqa: E402

GIB = 2**30


# libtpu's INFO log (in /tmp/tpu_logs, one file per process) times its compile stages, e.g.
# "BACKEND_PASSES stage duration: 2m40.58s", and counts the program's instruction bundles.
TPU_LOGS = "/tmp/tpu_logs"
STAGE = re.compile(r"\] (HLO_PASSES|BACKEND_PASSES|CODE_GENERATION) stage duration: (?:(\d+)m)?([\d.]+)(m?s)")
BUNDLES = re.compile(r"final program bundle count: ([\d,]+)")


class LibtpuLog:
  """The compile stages that libtpu logged for this process since the previous read."""

  def __init__(self):
    names = glob.glob(os.path.join(TPU_LOGS, f"*.log.INFO.*.{os.getpid()}"))
    self.path, self.offset = (names[0] if names else None), 0

  def read(self) -> dict:
    if self.path is None:
      return {}
    with open(self.path) as f:
      f.seek(self.offset)
      text = f.read()
      self.offset = f.tell()
    stages = {}
    for name, minutes, value, unit in STAGE.findall(text):
      stages[f"{name.lower()}_s"] = round(int(minutes or 0) * 60 + float(value) / (1000 if unit == "ms" else 1), 1)
    bundles = [int(b.replace(",", "")) for b in BUNDLES.findall(text)]
    return {**stages, **({"bundles": max(bundles)} if bundles else {})}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v3:2x2")
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--config", default="mixer_imagenet21k",
                      help="a config of configs/ by name (its recipe for the variant; B/16's for a variant it lacks)")
  parser.add_argument("--per_device_batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2, help="compiles of each step, alternating")
  parser.add_argument("--ablations", action="store_true",
                      help="also ours with stochastic depth as a select (the form before), with autodiff's "
                           "LayerNorm and gelu, without stochastic depth, without mixup, in float32")
  parser.add_argument("--json", default=None)
  return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  tpu.raise_stack_limit()
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import PartitionSpec as P

  from mixer import cli, models, optim, sharding, steps

  devices, _ = tpu.topology(args.topology, "--topology")
  batch = len(devices) * args.per_device_batch

  def config(**changes):
    path = os.path.join(REPO, "configs", f"{args.config}.py")
    try:
      c = cli.load_config_file(f"{path}:{args.variant.replace('/', '').lower()}")
    except ValueError:  # a variant the config has no recipe for (Ti/4, for a quick check), or a config without any.
      try:
        c = cli.load_config_file(f"{path}:b16")
      except ValueError:
        c = cli.load_config_file(path)
      c.model.variant = args.variant
    c.batch_size = c.eval_batch_size = batch
    c.total_steps = 100_000  # sets constants of the schedule only
    for key, value in changes.items():
      c[key] = value
    return c

  def ours(c) -> dict:
    train = tpu.compile_for(c, args.topology, eval_step=False)["train"]
    return {key: train[key] for key in ("compiled", "compile_s", "compile_cpu_s", "estimated_s", "peak_bytes")}

  class BigVisionMlp(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
      return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(x)))

  def keep_mask(x, drop_p, train, make_rng):
    if train and drop_p:
      return 1.0 - jax.random.bernoulli(make_rng("dropout"), drop_p, (x.shape[0],) + (1,) * (x.ndim - 1))
    return 1.0

  class BigVisionBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int
    drop_p: float

    @nn.compact
    def __call__(self, x, *, train=False):
      y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
      y = jnp.swapaxes(BigVisionMlp(self.tokens_mlp_dim, name="token_mixing")(y), 1, 2)
      x = x + y * keep_mask(x, self.drop_p, train, self.make_rng)
      y = BigVisionMlp(self.channels_mlp_dim, name="channel_mixing")(nn.LayerNorm()(x))
      return x + y * keep_mask(x, self.drop_p, train, self.make_rng)

  class BigVisionMixer(nn.Module):
    num_classes: int
    num_blocks: int
    patch_size: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    stoch_depth: float

    @nn.compact
    def __call__(self, x, *, train=False):
      p = self.patch_size
      x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), name="stem")(x)
      x = x.reshape(x.shape[0], -1, x.shape[-1])
      for i in range(self.num_blocks):
        drop_p = i / max(self.num_blocks - 1, 1) * self.stoch_depth
        x = BigVisionBlock(self.tokens_mlp_dim, self.channels_mlp_dim, drop_p)(x, train=train)
      x = jnp.mean(nn.LayerNorm(name="pre_head_layer_norm")(x), axis=1)
      return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x), {}

  def big_vision(c) -> dict:
    from mixer import dataset
    info = dataset.metadata_info(c)
    mesh = sharding.create_mesh(c.mesh, devices)
    model = BigVisionMixer(info.num_classes, stoch_depth=c.model.stoch_depth,
                           **models.variant_kwargs(c.model.variant))
    schedule = optim.create_schedule(c, c.total_steps)
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), optax.scale_by_adam(c.optim.b1, c.optim.b2),
                     optax.add_decayed_weights(c.weight_decay, optim.decay_mask),
                     optax.scale_by_schedule(lambda step: -schedule(step)))

    def init():
      params = model.init(jax.random.key(0), jnp.zeros((1,) + info.image_shape))["params"]
      return {"params": params, "opt": tx.init(params)}

    state, state_sharding = steps._abstract(init, mesh, c.param_sharding)
    replicated, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def update_fn(train_state, rng, batch):
      images, labels = batch["image"], batch["labels"]
      rng = jax.random.fold_in(rng, train_state["opt"][1].count)
      if c.mixup:  # as big_vision: in a shard_map, each device mixing its own examples (no communication)
        rng, rng_mixup = jax.random.split(rng)

        def mixup(key, images, labels):
          a = jax.random.beta(key, c.mixup, c.mixup)
          a = jnp.maximum(a, 1 - a)
          mix = lambda t: a * t + (1 - a) * jnp.roll(t, 1, axis=0)
          return mix(images), mix(labels)

        images, labels = jax.shard_map(mixup, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                       out_specs=P("data"))(rng_mixup, images, labels)
      rng, rng_model = jax.random.split(rng)

      def loss_fn(params):
        logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": rng_model})
        nll = -jnp.sum(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits), axis=-1)
        return jnp.mean(nll)

      params, opt = train_state["params"], train_state["opt"]
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt = tx.update(grads, opt, params)
      params = optax.apply_updates(params, updates)
      measurements = {"training_loss": loss}
      for name, tree in (("l2_grads", grads), ("l2_params", params), ("l2_updates", updates)):
        measurements[name] = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))
      return {"params": params, "opt": opt}, measurements

    step = jax.jit(update_fn, donate_argnums=(0,), in_shardings=(state_sharding, replicated, data),
                   out_shardings=(state_sharding, replicated))
    batch_shapes = {"image": jax.ShapeDtypeStruct((batch,) + info.image_shape, jnp.float32, sharding=data),
                    "labels": jax.ShapeDtypeStruct((batch, info.num_classes), jnp.float32, sharding=data)}
    start, cpu = time.perf_counter(), time.process_time()  # as tpu.compile_for times ours: lowering and compiling
    compiled = step.lower(state, jax.random.key(0), batch_shapes).compile()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    seconds = tpu._cost(compiled)[0]
    return {"compiled": compiled, "compile_s": wall, "compile_cpu_s": cpu, "estimated_s": seconds,
            "peak_bytes": tpu._peak_bytes(compiled.memory_analysis())}

  def select_drop_path(module, x, rate, train):
    """Stochastic depth as models.drop_path computed it before: a select between x / keep and zeros."""
    if not train or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))

  class FlaxOps:
    """flax's LayerNorm and jax's gelu, whose backward passes are autodiff's, for models.ops."""
    LayerNorm = staticmethod(lambda dtype, name=None: nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name))
    gelu = staticmethod(lambda x, approximate=True: jax.nn.gelu(x, approximate=approximate))

  def swapped(attribute, replacement, build):
    """build, with models.<attribute> replaced meanwhile."""
    def run(c):
      original = getattr(models, attribute)
      setattr(models, attribute, replacement)
      try:
        return build(c)
      finally:
        setattr(models, attribute, original)
    return run

  contenders = [("ours", lambda: ours(config())), ("big_vision", lambda: big_vision(config()))]
  if args.ablations:
    no_stoch_depth = config()
    no_stoch_depth.model.stoch_depth = 0.0
    float32 = config()
    float32.model.dtype = "float32"
    contenders += [
        ("ours, stochastic depth as a select (before)", lambda: swapped("drop_path", select_drop_path, ours)(config())),
        ("ours with flax's LayerNorm and gelu", lambda: swapped("ops", FlaxOps, ours)(config())),
        ("ours without stochastic depth", lambda: ours(no_stoch_depth)),
        ("ours without mixup", lambda: ours(config(mixup=0.0))),
        ("ours in float32", lambda: ours(float32)),
    ]
  rows = {name: {"step": name, "compile_s": [], "compile_cpu_s": []} for name, _ in contenders}
  print(f"{args.variant} train step at {args.per_device_batch} images per device, compiled for {args.topology} "
        f"({len(devices)} {devices[0].device_kind} devices), {args.repeats} times each, alternating", flush=True)
  log = LibtpuLog()
  for _ in range(args.repeats):
    for name, build in contenders:
      result = build()
      wall, cpu = result["compile_s"], result["compile_cpu_s"]
      row = rows[name]
      for key, value in log.read().items():
        row.setdefault(key, []).append(value)
      row["compile_s"].append(round(wall, 1))
      row["compile_cpu_s"].append(round(cpu, 1))
      seconds = result["estimated_s"]
      row.update(estimated_ms=seconds * 1e3, estimated_img_s_per_device=args.per_device_batch / seconds,
                 peak_gib=result["peak_bytes"] / GIB,
                 optimized_hlo_lines=result["compiled"].as_text().count("\n"))
      stages = (f" (HLO passes {row['hlo_passes_s'][-1]} s, backend {row['backend_passes_s'][-1]} s)"
                if row.get("backend_passes_s") else "")
      print(f"  {name:48s} compile {wall:6.1f} s ({cpu:6.1f} s CPU){stages}  est. {seconds * 1e3:5.1f} ms/step "
            f"{row['estimated_img_s_per_device']:5.0f} img/s/device  peak {row['peak_gib']:.2f} GiB", flush=True)
  out = []
  for row in rows.values():
    row["median_compile_s"] = statistics.median(row["compile_s"])
    row["median_compile_cpu_s"] = statistics.median(row["compile_cpu_s"])
    for key in ("hlo_passes_s", "backend_passes_s", "code_generation_s"):
      if row.get(key):
        row[f"median_{key}"] = statistics.median(row[key])
    out.append({"variant": args.variant, "topology": args.topology, "per_device_batch": args.per_device_batch,
                **row})
  ours_row, peer = out[0], out[1]
  print(f"ours / big_vision: compile {ours_row['median_compile_s'] / peer['median_compile_s']:.2f}x "
        f"(CPU {ours_row['median_compile_cpu_s'] / peer['median_compile_cpu_s']:.2f}x), estimated img/s "
        f"{ours_row['estimated_img_s_per_device'] / peer['estimated_img_s_per_device']:.2f}x, peak memory "
        f"{ours_row['peak_gib']:.2f} vs {peer['peak_gib']:.2f} GiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"host_cpus": os.cpu_count(), "rows": out}, f, indent=1)
  return out


if __name__ == "__main__":
  main()
