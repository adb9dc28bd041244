"""Fine-tuning from pre-trained params: a fresh head, and token mixing carried to another token grid
(the paper's App. C block-diagonal growth, or resampling for any grid)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mixer import models, params_io, trees


def load_for_grid(init_config, grid: tuple[int, int]) -> tuple[dict | None, int | None]:
  """(config.init.checkpoint's params with token mixing for `grid`, the token-mixing width they need when it
  is not the variant's: K^2 D_S after block-diagonal growth by K); (None, None) without a checkpoint."""
  if not init_config.checkpoint:
    return None, None
  try:
    pretrained = params_io.load(init_config.checkpoint)
  except (OSError, ValueError) as e:
    raise type(e)(f"config.init.checkpoint={init_config.checkpoint!r}: {e}") from None
  block = pretrained.get("MixerBlock_0", {}).get("token_mixing", {}).get("Dense_0", {})
  old_tokens = np.shape(block.get("kernel", np.zeros((grid[0] * grid[1], 0))))[0]
  if old_tokens == grid[0] * grid[1]:
    return pretrained, None
  side = math.isqrt(old_tokens)
  if side * side != old_tokens:
    raise ValueError(f"{init_config.checkpoint}: {old_tokens} pre-trained tokens are not a square grid")
  if init_config.token_mixing == "resample":  # any grid; D_S unchanged
    logging.info("Token grid %dx%d -> %dx%d: token mixing resampled", side, side, *grid)
    return resample_token_mixing(pretrained, (side, side), grid), None
  if init_config.token_mixing != "block_diagonal":
    raise ValueError(f"config.init.token_mixing={init_config.token_mixing!r} is not one of block_diagonal, "
                     f"resample")
  pretrained = block_diagonal_token_mixing(pretrained, (side, side), grid)
  width = pretrained["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape[1]
  logging.info("Token grid %dx%d -> %dx%d: block-diagonal token mixing, %d hidden units", side, side, *grid, width)
  return pretrained, width


def init_from_pretrained(pretrained: dict, fresh: dict, model: models.MlpMixer, new_head: bool, source: str):
  """The pre-trained params, with this model's fresh zero-initialised head when new_head; checked."""
  params = {k: v for k, v in pretrained.items() if k != "head" or not new_head}
  if new_head and "head" in fresh:
    params["head"] = jax.device_get(fresh["head"])
  if model.scan_blocks:
    params = models.stack_blocks(params)
  trees.check_shapes(params, fresh, source)
  return params


def _with_token_mixing(params: dict, token_mixing) -> dict:
  """params with each block's token-mixing MLP replaced by token_mixing(its params)."""
  out = dict(params)
  for name in models.block_names(params):
    out[name] = {**params[name], "token_mixing": token_mixing(params[name]["token_mixing"])}
  return out


def block_diagonal_token_mixing(params: dict, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> dict:
  """Initialises token mixing for a K times larger token grid (paper App. C).

  The new grid is split into K x K contiguous parts of the old grid's size; each part's tokens, in
  their own row-major order, get a copy of the pre-trained token MLP, so the new MLP mixes every part
  exactly as the pre-trained one mixed a whole image. Biases are tiled.
  """
  (h, w), (nh, nw) = old_grid, new_grid
  if nh % h or nw % w or nh // h != nw // w:
    raise ValueError(f"token grid {new_grid} is not an integer multiple K of the pre-trained {old_grid} "
                     f"(resolution ratio must be an integer; or use config.init.token_mixing='resample')")
  k = nh // h
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  parts = [((i * h + rows) * nw + (j * w + cols)).ravel() for i in range(k) for j in range(k)]

  def grow(tm):
    k0, b0 = tm["Dense_0"]["kernel"], tm["Dense_0"]["bias"]
    k1, b1 = tm["Dense_1"]["kernel"], tm["Dense_1"]["bias"]
    hidden = k0.shape[1]
    new_k0 = np.zeros((nh * nw, k * k * hidden), k0.dtype)
    new_k1 = np.zeros((k * k * hidden, nh * nw), k1.dtype)
    new_b1 = np.zeros((nh * nw,), b1.dtype)
    for p, tokens in enumerate(parts):
      units = slice(p * hidden, (p + 1) * hidden)
      new_k0[tokens, units] = k0
      new_k1[units, tokens] = k1
      new_b1[tokens] = b1
    return {"Dense_0": {"kernel": new_k0, "bias": np.tile(b0, k * k)}, "Dense_1": {"kernel": new_k1, "bias": new_b1}}

  return _with_token_mixing(params, grow)


def resample_token_mixing(params: dict, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> dict:
  """Token mixing for any new token grid: every token axis of the token MLP is treated as a 2-D patch
  grid and resized bilinearly (e.g. 224px -> 128px fine-tuning with patch 16: 14x14 -> 8x8 tokens).

  The first layer's weights are scaled by old/new token count, so that its pre-activations (a sum
  over tokens) keep their size; the hidden width D_S is unchanged.
  """
  (h, w), (nh, nw) = old_grid, new_grid
  scale = (h * w) / (nh * nw)
  resize = lambda x, shape: np.asarray(jax.image.resize(jnp.asarray(x), shape, method="bilinear", antialias=True))

  def resample(tm):
    k0, k1, b1 = tm["Dense_0"]["kernel"], tm["Dense_1"]["kernel"], tm["Dense_1"]["bias"]
    hidden = k0.shape[1]
    new_k0 = resize(k0.reshape(h, w, hidden), (nh, nw, hidden)).reshape(nh * nw, hidden) * scale
    new_k1 = resize(k1.reshape(hidden, h, w), (hidden, nh, nw)).reshape(hidden, nh * nw)
    new_b1 = resize(b1.reshape(h, w), (nh, nw)).reshape(nh * nw)
    return {"Dense_0": {"kernel": new_k0.astype(k0.dtype), "bias": tm["Dense_0"]["bias"]},
            "Dense_1": {"kernel": new_k1.astype(k1.dtype), "bias": new_b1.astype(b1.dtype)}}

  return _with_token_mixing(params, resample)
