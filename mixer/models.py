"""MLP-Mixer in flax.linen (paper Sec. 2, Table 1), with parameter names equal to the released checkpoints'."""

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixer import ops

# Table 1 of the paper: size -> (blocks, hidden C, tokens MLP D_S, channels MLP D_C).
# "Ti" is not in the paper: a tiny size for tests and the embedded default run.
SIZES = {
    "Ti": dict(num_blocks=4, hidden_dim=128, tokens_mlp_dim=64, channels_mlp_dim=512),
    "S": dict(num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(num_blocks=32, hidden_dim=1280, tokens_mlp_dim=640, channels_mlp_dim=5120),
}
PAPER_VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")


def variant_kwargs(variant: str) -> dict[str, int]:
  """'B/16' -> MlpMixer keyword arguments: the size's dimensions and the patch size."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in SIZES:
    raise ValueError(
        f"config.model.variant={variant!r} is not SIZE/PATCH with SIZE one of "
        f"{', '.join(SIZES)} (the paper's variants: {', '.join(PAPER_VARIANTS)})")
  return dict(SIZES[match.group(1)], patch_size=int(match.group(2)))


class MlpBlock(nn.Module):
  """Dense -> gelu -> Dense over the last axis, back to the input width (paper Eq. 1)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    y = ops.gelu(y, self.gelu_approximate)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
  """Token mixing (an MLP across patches, shared by all channels), then channel mixing (paper Fig. 1).

  `drop_rate` is this block's stochastic depth: the probability of dropping each residual branch, per example.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, drop_rate, train: bool):  # x: [batch, tokens, channels]
    mlp = functools.partial(MlpBlock, dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate,
                            dtype=self.dtype)
    y = ops.LayerNorm(dtype=self.dtype)(x)
    y = jnp.swapaxes(mlp(self.tokens_mlp_dim, name="token_mixing")(jnp.swapaxes(y, 1, 2), train=train), 1, 2)
    x = x + drop_path(self, y, drop_rate, train)
    y = ops.LayerNorm(dtype=self.dtype)(x)
    y = mlp(self.channels_mlp_dim, name="channel_mixing")(y, train=train)
    return x + drop_path(self, y, drop_rate, train)


def drop_path(module: nn.Module, x, rate, train: bool):
  """Stochastic depth (Huang et al. 2016): zeroes a residual branch per example with probability `rate`, and
  scales the kept ones by 1/(1 - rate), so that the expectation equals the eval-time branch (mixer/paper.py:
  big_vision does not rescale)."""
  if not train or (isinstance(rate, float) and rate == 0.0):  # a scanned rate is traced: never skipped.
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  # A product with a per-example float32 scale (0 or 1/keep), not jnp.where(mask, x / keep, 0): the same values,
  # but libtpu's backend compiled the select form's B/16 train step about 2.5x as slowly (docs/tpu.md).
  return (x * (mask / keep).astype(jnp.float32)).astype(x.dtype)


class MlpMixer(nn.Module):
  """Per-patch stem -> MixerBlocks -> LayerNorm -> mean over tokens -> zero-initialised head."""
  num_classes: int | None
  num_blocks: int
  patch_size: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  stoch_depth: float = 0.0  # drop rate at the last block; it rises linearly from 0 at the first.
  gelu_approximate: bool = True  # the released weights use tanh gelu; timm uses exact gelu.
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32.
  remat: bool = False  # recompute each block's activations in the backward pass (jax.checkpoint).
  scan_blocks: bool = False  # one nn.scan over the blocks: params stacked under "MixerBlocks".

  @nn.compact
  def __call__(self, images, *, train: bool = False, pre_logits: bool = False, with_extras: bool = False):
    """Logits [B, num_classes]; with pre_logits=True the features the head reads, [B, hidden_dim]; with
    with_extras=True (logits, {"pre_logits": features}), as big_vision's models return."""
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size {p}")
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), dtype=self.dtype, name="stem")(images)
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    x = self._blocks(x, train)
    x = ops.LayerNorm(dtype=self.dtype, name="pre_head_layer_norm")(x)
    features = jnp.mean(x, axis=1)
    if pre_logits or not self.num_classes:
      logits = features
    else:
      logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(features)
    if with_extras:
      return logits.astype(jnp.float32), {"pre_logits": features.astype(jnp.float32)}
    return logits.astype(jnp.float32)

  def _blocks(self, x, train: bool):
    """The MixerBlocks, looped (the released layout MixerBlock_i) or scanned, with or without remat."""
    static = (3,) if self.scan_blocks else (2, 3)  # train; and the rate unless scanned (then it is traced).
    block = nn.remat(MixerBlock, static_argnums=static) if self.remat else MixerBlock
    kwargs = dict(tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim,
                  dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate, dtype=self.dtype)
    rates = [self.stoch_depth * i / max(self.num_blocks - 1, 1) for i in range(self.num_blocks)]
    if not self.scan_blocks:
      for i, rate in enumerate(rates):
        x = block(**kwargs, name=f"MixerBlock_{i}")(x, rate, train)
      return x
    scan = nn.scan(lambda module, x, rate: (module(x, rate, train), None), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, length=self.num_blocks)
    return scan(block(**kwargs, name="MixerBlocks"), x, jnp.asarray(rates))[0]


def create_model(model_config, num_classes: int | None) -> MlpMixer:
  """The MlpMixer that a `config.model` ConfigDict describes (setup.validate_config checks its values)."""
  dims = variant_kwargs(model_config.variant)
  if model_config.get("tokens_mlp_dim"):  # e.g. K^2 D_S after block-diagonal resolution growth.
    dims["tokens_mlp_dim"] = model_config.tokens_mlp_dim
  return MlpMixer(num_classes=num_classes, dropout_rate=model_config.dropout_rate,
                  stoch_depth=model_config.stoch_depth, gelu_approximate=model_config.gelu_approximate,
                  dtype=jnp.dtype(model_config.dtype), remat=model_config.remat,
                  scan_blocks=model_config.scan_blocks, **dims)


def block_names(params: dict) -> list[str]:
  """The released layout's block names among params' keys, in block order: MixerBlock_0, MixerBlock_1, ..."""
  return sorted((k for k in params if k.startswith("MixerBlock_")), key=lambda k: int(k.split("_")[1]))


def stack_blocks(params: dict) -> dict:
  """Released layout (MixerBlock_0..N-1) -> the scan_blocks layout (one "MixerBlocks", stacked)."""
  names = block_names(params)
  rest = {k: v for k, v in params.items() if not k.startswith("MixerBlock_")}
  return {**rest, "MixerBlocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])}


def unstack_blocks(params: dict) -> dict:
  """The scan_blocks layout -> the released layout, e.g. to export or to load into a loop model."""
  rest = {k: v for k, v in params.items() if k != "MixerBlocks"}
  stacked = params["MixerBlocks"]
  num_blocks = jax.tree.leaves(stacked)[0].shape[0]
  return {**rest, **{f"MixerBlock_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_blocks)}}
