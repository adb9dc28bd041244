"""Tests for mixer/models.py: Table 1 shapes and counts, released parameter names, options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mixer import models

# Table 1 of the paper: parameters without the head, in millions (rounded as printed).
TABLE_1_MILLIONS = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207, "H/14": 431}


def _param_shapes(variant, num_classes=None, image_size=224, channels=3):
  model = models.MlpMixer(num_classes=num_classes, **models.variant_kwargs(variant))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, channels))))


def _expected_count(variant, image_size=224, channels=3):
  """Counted by hand from the architecture (paper Sec. 2), independently of the flax module."""
  k = models.variant_kwargs(variant)
  p, c, ds, dc = k["patch_size"], k["hidden_dim"], k["tokens_mlp_dim"], k["channels_mlp_dim"]
  s = (image_size // p) ** 2
  stem = p * p * channels * c + c
  block = 2 * (2 * c) + (s * ds + ds + ds * s + s) + (c * dc + dc + dc * c + c)
  return stem + k["num_blocks"] * block + 2 * c


@pytest.mark.parametrize("variant", models.PAPER_VARIANTS)
def test_param_count_matches_table_1(variant):
  count = sum(x.size for x in jax.tree.leaves(_param_shapes(variant)))
  assert count == _expected_count(variant)
  assert round(count / 1e6) == TABLE_1_MILLIONS[variant]


def test_b16_has_59_1m_params_and_head_adds_c_times_classes_plus_bias():
  without = sum(x.size for x in jax.tree.leaves(_param_shapes("B/16")))
  with_head = sum(x.size for x in jax.tree.leaves(_param_shapes("B/16", num_classes=1000)))
  assert round(without / 1e5) == 591
  assert with_head - without == 768 * 1000 + 1000


def test_param_names_equal_the_released_checkpoints():
  params = _param_shapes("S/32", num_classes=10)["params"]
  assert set(params) == {"stem", "pre_head_layer_norm", "head"} | {f"MixerBlock_{i}" for i in range(8)}
  block = params["MixerBlock_3"]
  assert set(block) == {"LayerNorm_0", "token_mixing", "LayerNorm_1", "channel_mixing"}
  for mlp, (width, hidden) in {"token_mixing": (49, 256), "channel_mixing": (512, 2048)}.items():
    assert set(block[mlp]) == {"Dense_0", "Dense_1"}
    assert block[mlp]["Dense_0"]["kernel"].shape == (width, hidden)
    assert block[mlp]["Dense_1"]["kernel"].shape == (hidden, width)
  assert params["stem"]["kernel"].shape == (32, 32, 3, 512)
  assert params["head"]["kernel"].shape == (512, 10)


@pytest.mark.parametrize("bad", ["X/9", "B16", "B/", "b/16"])
def test_unknown_variant_names_the_key(bad):
  with pytest.raises(ValueError, match=r"config\.model\.variant='" + bad):
    models.variant_kwargs(bad)


def _tiny(**kwargs):
  config = default.get_config().model
  config.update(kwargs)
  return models.create_model(config, num_classes=10)


def test_output_shapes_head_zero_init_and_prelogits():
  model = _tiny()
  x = jnp.ones((3, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  logits = model.apply(variables, x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)  # the head is zero-initialised.
  features = model.apply(variables, x, pre_logits=True)
  assert features.shape == (3, 128)
  headless = model.clone(num_classes=None).apply({"params": {k: v for k, v in variables["params"].items()
                                                              if k != "head"}}, x)
  np.testing.assert_array_equal(features, headless)
  random_head = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape), variables["params"]["head"])
  logits = model.apply({"params": {**variables["params"], "head": random_head}}, x)
  np.testing.assert_allclose(logits, features @ random_head["kernel"] + random_head["bias"], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype="bfloat16")
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  a = _tiny().apply(variables, x, pre_logits=True)
  b = model.apply(variables, x, pre_logits=True)
  assert b.dtype == jnp.float32  # outputs are cast back for the loss.
  # Features of size ~1 after 4 blocks in bfloat16 (8 bits of mantissa): within 4 of its ulps at 1 (2^-8).
  assert np.max(np.abs(a)) > 0.5
  np.testing.assert_allclose(a, b, atol=4 * 2**-8, rtol=0)
  assert not np.array_equal(a, b)


def test_stochastic_depth_and_dropout_act_only_in_training():
  model = _tiny(stoch_depth=0.5, dropout_rate=0.2).clone(num_classes=None)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
  params = model.init(jax.random.key(0), x)["params"]
  eval_a, eval_b = model.apply({"params": params}, x), model.apply({"params": params}, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = [model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(i)}) for i in (0, 1)]
  assert not np.allclose(train[0], train[1])
  same = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_array_equal(train[0], same)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stochastic_depth_drops_whole_examples_and_rescales_the_kept(dtype):
  """Each example's branch is zeroed with probability `rate`, else divided by 1 - rate (computed in float32, so
  that bfloat16 branches are rounded once, as x / keep would be)."""

  class Branch(nn.Module):
    @nn.compact
    def __call__(self, x):
      return models.drop_path(self, x, 0.25, train=True)

  x = jax.random.normal(jax.random.key(0), (4000, 3, 2)).astype(dtype)
  y = np.asarray(Branch().apply({}, x, rngs={"dropout": jax.random.key(1)}), np.float32)
  dropped = np.all(y == 0, axis=(1, 2))
  expected = np.asarray((x.astype(jnp.float32) / 0.75).astype(dtype), np.float32)
  np.testing.assert_array_equal(y[~dropped], expected[~dropped])
  assert abs(dropped.mean() - 0.25) < 0.03  # 4000 draws: 4 standard deviations


def test_stochastic_depth_rises_linearly_from_zero():
  model = _tiny(stoch_depth=0.3)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.MixerBlock) and context.method_name == "__call__":
      rates.append(args[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3])
  # A block with rate 0 is the identity mapping of its eval self even in training.
  block = models.MixerBlock(64, 512)
  y = jax.random.normal(jax.random.key(2), (2, 16, 128))
  p = block.init(jax.random.key(0), y, 0.0, False)
  np.testing.assert_array_equal(block.apply(p, y, 0.0, True, rngs={"dropout": jax.random.key(3)}),
                                block.apply(p, y, 0.0, False))


def test_stochastic_depth_in_scanned_blocks():
  """Scanned blocks get traced rates: they drop in training (reproducibly per rng), never at rate 0."""
  model = _tiny(stoch_depth=0.5, scan_blocks=True).clone(num_classes=None)
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
  params = model.init(jax.random.key(0), x)["params"]
  train = lambda m, seed: m.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(model, 0), model.apply({"params": params}, x))
  np.testing.assert_array_equal(train(model, 0), train(model, 0))
  assert not np.allclose(train(model, 0), train(model, 1))
  no_drop = model.clone(stoch_depth=0.0)
  np.testing.assert_allclose(train(no_drop, 0), no_drop.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


def test_token_mixing_is_shared_across_channels():
  """Token mixing applies one MLP to every channel: with channel mixing off, permuting channels permutes the
  block's output."""
  block = models.MixerBlock(tokens_mlp_dim=8, channels_mlp_dim=4)
  y = jax.random.normal(jax.random.key(0), (2, 16, 6))  # [batch, tokens, channels]
  p = block.init(jax.random.key(1), y, 0.0, False)["params"]
  token_mixing = p["token_mixing"]
  assert token_mixing["Dense_0"]["kernel"].shape == (16, 8) and token_mixing["Dense_1"]["kernel"].shape == (8, 16)
  p["channel_mixing"] = jax.tree.map(jnp.zeros_like, p["channel_mixing"])
  perm = np.random.default_rng(0).permutation(6)
  apply = lambda y: block.apply({"params": p}, y, 0.0, False)
  np.testing.assert_allclose(apply(y[..., perm]), apply(y)[..., perm], rtol=1e-6, atol=1e-6)


def _paper_forward(params, images, patch, xp=np):
  """Eq. (1) of the paper on [batch, tokens, channels] with the released parameter layout, in numpy (xp=np,
  float64) or in jax.numpy (xp=jnp, to differentiate)."""
  def layer_norm(x, p):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

  def mlp(x, p):
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = 0.5 * h * (1 + xp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  if xp is np:
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, c = images.shape
  patches = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, -1, patch * patch * c) @ params["stem"]["kernel"].reshape(-1, params["stem"]["bias"].size)
  x = x + params["stem"]["bias"]
  for i in range(sum(k.startswith("MixerBlock_") for k in params)):
    block = params[f"MixerBlock_{i}"]
    x = x + mlp(layer_norm(x, block["LayerNorm_0"]).transpose(0, 2, 1), block["token_mixing"]).transpose(0, 2, 1)
    x = x + mlp(layer_norm(x, block["LayerNorm_1"]), block["channel_mixing"])
  x = layer_norm(x, params["pre_head_layer_norm"]).mean(1)
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def _tiny_with_random_params():
  """The tiny model with 5 classes, an input, and parameters moved off their init (a non-zero head)."""
  model = _tiny().clone(num_classes=5)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  return model, x, params


def test_model_computes_the_papers_equations():
  """The flax module equals Eq. (1) of the paper written independently in numpy (float64)."""
  model, x, params = _tiny_with_random_params()
  np.testing.assert_allclose(model.apply({"params": params}, x), _paper_forward(params, np.asarray(x, np.float64), 4),
                             rtol=1e-4, atol=1e-4)


def test_gradients_equal_autodiff_of_the_papers_equations():
  """The model, with its hand-written LayerNorm/gelu backward passes, gives autodiff's gradients of Eq. (1)."""
  model, x, params = _tiny_with_random_params()
  targets = jax.nn.one_hot(jnp.arange(3), 5)
  loss = lambda logits: -jnp.sum(targets * jax.nn.log_softmax(logits))
  ours = jax.grad(lambda p: loss(model.apply({"params": p}, x)))(params)
  reference = jax.grad(lambda p: loss(_paper_forward(p, x, 4, xp=jnp)))(params)
  assert jax.tree.structure(ours) == jax.tree.structure(reference)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_image_size_not_multiple_of_patch_is_an_error():
  with pytest.raises(ValueError, match="patch size 4"):
    _tiny().init(jax.random.key(0), jnp.zeros((1, 18, 16, 1)))


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "float8", r"config\.model\.dtype='float8'"),
    ("dtype", "float16", r"config\.model\.dtype='float16'.*loss scaling"),
    ("stoch_depth", 1.5, r"config\.model\.stoch_depth=1.5"),
    ("dropout_rate", -0.1, r"config\.model\.dropout_rate=-0.1"),
    ("variant", "B16", r"config\.model\.variant='B16' is not SIZE/PATCH")])
def test_bad_model_config_values_name_the_key(key, value, message):
  from mixer import setup
  config = default.get_config()
  config.model[key] = value
  with pytest.raises(ValueError, match=message):
    setup.validate_config(config, 1, 1)


def test_scanned_blocks_equal_the_loop_with_stacked_params():
  loop, scanned = _tiny(stoch_depth=0.2), _tiny(stoch_depth=0.2, scan_blocks=True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = loop.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)
  stacked = models.stack_blocks(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned.init(jax.random.key(1), x)["params"])
  assert stacked["MixerBlocks"]["token_mixing"]["Dense_0"]["kernel"].shape == (4, 16, 64)
  np.testing.assert_allclose(scanned.apply({"params": stacked}, x), loop.apply({"params": params}, x), atol=1e-5)
  unstacked = models.unstack_blocks(stacked)
  assert jax.tree.all(jax.tree.map(np.array_equal, unstacked, params))


def test_remat_gives_the_same_gradients():
  plain, remat = _tiny(dropout_rate=0.1), _tiny(dropout_rate=0.1, remat=True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = plain.init(jax.random.key(1), x)["params"]
  params["head"]["kernel"] = jax.random.normal(jax.random.key(3), params["head"]["kernel"].shape)

  def grads(model):
    loss = lambda p: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(4)}).sum()
    return jax.grad(loss)(params)

  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
