"""MLP-Mixer in flax.linen (paper Sec. 2, Table 1), with parameter names equal to the released checkpoints'."""

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
  """Dense -> gelu -> Dense over the last axis, back to the input width."""
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


class DenseParams(nn.Module):
  """An nn.Dense's kernel and bias (same names, shapes and initialisers) for products nn.Dense cannot express."""
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    return (self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), jnp.float32),
            self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32))


class TokenMixing(MlpBlock):
  """MlpBlock over the token axis of [batch, tokens, channels], with the released parameters (Dense_0/1).

  Each product is a GEMM batched over examples, with the kernel as the per-example operand, so the
  activations are read in place: no transpose to [batch, channels, tokens] and back, forward or backward.
  """

  @nn.compact
  def __call__(self, x, *, train: bool):
    batch, tokens, _ = x.shape
    kernel_0, bias_0 = DenseParams(self.mlp_dim, name="Dense_0")(tokens)
    kernel_1, bias_1 = DenseParams(tokens, name="Dense_1")(self.mlp_dim)
    x, bias_0, bias_1 = nn.dtypes.promote_dtype(x, bias_0, bias_1, dtype=self.dtype)
    # Broadcast, then cast: the backward pass sums the per-example kernel gradients in float32.
    per_example = lambda kernel: jnp.broadcast_to(kernel, (batch,) + kernel.shape).astype(x.dtype)
    y = jax.lax.dot_general(x, per_example(kernel_0), (((1,), (1,)), ((0,), (0,)))) + bias_0  # [B, C, D_S]
    y = ops.gelu(y, self.gelu_approximate)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = jax.lax.dot_general(per_example(kernel_1), y, (((1,), (2,)), ((0,), (0,))))  # [B, S, C]
    return y + bias_1[:, None]


def stochastic_depth(module: nn.Module, x, rate, train: bool):
  """Drops the whole residual branch per example with probability `rate` (Huang et al. 2016).

  `rate` may be traced (a scanned per-block value), so a zero rate is not special-cased then.
  """
  if not train or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


TOKEN_MIXING_FORMS = ("per_example", "transpose")


class MixerBlock(nn.Module):
  """Token mixing (an MLP across patches, shared over channels), then channel mixing."""
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  stoch_depth: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  # "per_example": TokenMixing (no transposes); "transpose": vit_jax's swapaxes -> MlpBlock -> swapaxes.
  token_mixing_form: str = "per_example"

  @nn.compact
  def __call__(self, x, train: bool = False, stoch_depth=None):
    rate = self.stoch_depth if stoch_depth is None else stoch_depth
    mlp = dict(dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate, dtype=self.dtype)
    y = ops.LayerNorm(dtype=self.dtype)(x)
    if self.token_mixing_form == "transpose":
      y = jnp.swapaxes(MlpBlock(self.tokens_mlp_dim, name="token_mixing", **mlp)(jnp.swapaxes(y, 1, 2), train=train),
                       1, 2)
    else:
      y = TokenMixing(self.tokens_mlp_dim, name="token_mixing", **mlp)(y, train=train)
    x = x + stochastic_depth(self, y, rate, train)
    y = ops.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.channels_mlp_dim, name="channel_mixing", **mlp)(y, train=train)
    return x + stochastic_depth(self, y, rate, train)


def _block_class(remat: bool):
  return nn.remat(MixerBlock, static_argnums=(2,)) if remat else MixerBlock


class _ScannedBlock(nn.Module):
  """A MixerBlock in the (carry, per-block input) -> (carry, output) form that nn.scan needs."""
  block_kwargs: tuple  # MixerBlock's fields as (name, value) pairs.
  remat: bool

  @nn.compact
  def __call__(self, x, rate, train: bool):
    return _block_class(self.remat)(**dict(self.block_kwargs), name="block")(x, train, rate), None


class MlpMixer(nn.Module):
  """Patch stem -> MixerBlocks -> LayerNorm -> mean over tokens -> zero-initialised head."""
  num_classes: int | None
  num_blocks: int
  patch_size: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dropout_rate: float = 0.0
  stoch_depth: float = 0.0  # rate at the last block; it rises linearly from 0 at the first.
  gelu_approximate: bool = True  # the released weights use tanh gelu; timm uses exact gelu.
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32.
  remat: bool = False  # recompute each block's activations in the backward pass (jax.checkpoint).
  scan_blocks: bool = False  # one nn.scan over the blocks: params stacked under "MixerBlocks".
  token_mixing_form: str = "per_example"  # one of TOKEN_MIXING_FORMS: the same function and parameters.

  @nn.compact
  def __call__(self, images, *, train: bool = False, pre_logits: bool = False):
    """Logits [B, num_classes]; with pre_logits=True the features the head reads, [B, hidden_dim]."""
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size {p}")
    x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), dtype=self.dtype, name="stem")(images)
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    rates = [self.stoch_depth * i / max(self.num_blocks - 1, 1) for i in range(self.num_blocks)]
    block = dict(tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim,
                 dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                 token_mixing_form=self.token_mixing_form)
    if self.scan_blocks:
      scan = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(0, nn.broadcast), length=self.num_blocks)
      x, _ = scan(tuple(block.items()), self.remat, name="MixerBlocks")(x, jnp.asarray(rates), train)
    else:
      for i in range(self.num_blocks):
        x = _block_class(self.remat)(**block, stoch_depth=rates[i], name=f"MixerBlock_{i}")(x, train)
    x = ops.LayerNorm(dtype=self.dtype, name="pre_head_layer_norm")(x)
    x = jnp.mean(x, axis=1)  # the pre-logits that few-shot evaluation reads.
    if self.num_classes and not pre_logits:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


def create_model(model_config, num_classes: int | None) -> MlpMixer:
  """Builds the MlpMixer that a `config.model` ConfigDict describes."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # float16 would need loss scaling: not offered.
  if model_config.dtype not in dtypes:
    raise ValueError(f"config.model.dtype={model_config.dtype!r} is not one of {', '.join(dtypes)} "
                     f"(float16 gradients underflow without loss scaling; use bfloat16)")
  for key in ("dropout_rate", "stoch_depth"):
    if not 0.0 <= model_config[key] < 1.0:
      raise ValueError(f"config.model.{key}={model_config[key]} is not in [0, 1)")
  form = model_config.get("token_mixing_form", "per_example")
  if form not in TOKEN_MIXING_FORMS:
    raise ValueError(f"config.model.token_mixing_form={form!r} is not one of {', '.join(TOKEN_MIXING_FORMS)}")
  dims = variant_kwargs(model_config.variant)
  if model_config.get("tokens_mlp_dim"):  # e.g. K^2 D_S after block-diagonal resolution growth.
    dims["tokens_mlp_dim"] = model_config.tokens_mlp_dim
  return MlpMixer(num_classes=num_classes, dropout_rate=model_config.dropout_rate,
                  stoch_depth=model_config.stoch_depth, gelu_approximate=model_config.gelu_approximate,
                  dtype=dtypes[model_config.dtype], remat=model_config.remat,
                  scan_blocks=model_config.scan_blocks, token_mixing_form=form, **dims)


def block_names(params: dict) -> list[str]:
  """The released layout's block names among params' keys, in block order: MixerBlock_0, MixerBlock_1, ..."""
  return sorted((k for k in params if k.startswith("MixerBlock_")), key=lambda k: int(k.split("_")[1]))


def stack_blocks(params: dict) -> dict:
  """Released layout (MixerBlock_0..N-1) -> the scan_blocks layout (one "MixerBlocks", stacked)."""
  names = block_names(params)
  rest = {k: v for k, v in params.items() if not k.startswith("MixerBlock_")}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
  return {**rest, "MixerBlocks": {"block": stacked}}


def unstack_blocks(params: dict) -> dict:
  """The scan_blocks layout -> the released layout, e.g. to export or to load into a loop model."""
  rest = {k: v for k, v in params.items() if k != "MixerBlocks"}
  stacked = params["MixerBlocks"]["block"]
  num_blocks = jax.tree.leaves(stacked)[0].shape[0]
  return {**rest, **{f"MixerBlock_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_blocks)}}
