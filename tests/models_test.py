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
  f32 = _tiny().clone(num_classes=None)
  bf16 = model.clone(num_classes=None)
  params = {k: v for k, v in variables["params"].items() if k != "head"}
  a, b = f32.apply({"params": params}, x), bf16.apply({"params": params}, x)
  assert b.dtype == jnp.float32  # outputs are cast back for the loss.
  np.testing.assert_allclose(a, b, atol=0.1)
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


def test_stochastic_depth_rises_linearly_from_zero():
  model = _tiny(stoch_depth=0.3)
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.MixerBlock) and context.method_name == "__call__":
      rates.append(context.module.stoch_depth)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.init(jax.random.key(0), jnp.ones((1, 16, 16, 1)))
  np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3])
  # A block with rate 0 is the identity mapping of its eval self even in training.
  block = models.MixerBlock(64, 512, stoch_depth=0.0)
  y = jax.random.normal(jax.random.key(2), (2, 16, 128))
  p = block.init(jax.random.key(0), y, train=False)
  np.testing.assert_array_equal(block.apply(p, y, train=True, rngs={"dropout": jax.random.key(3)}),
                                block.apply(p, y, train=False))


def test_token_mixing_is_shared_across_channels():
  """Token mixing applies one MLP to every channel: permuting channels permutes its output."""
  block = models.TokenMixing(mlp_dim=8)
  y = jax.random.normal(jax.random.key(0), (2, 16, 6))  # [batch, tokens, channels] as in MixerBlock.
  p = block.init(jax.random.key(1), y, train=False)
  assert p["params"]["Dense_0"]["kernel"].shape == (16, 8) and p["params"]["Dense_1"]["kernel"].shape == (8, 16)
  perm = np.random.default_rng(0).permutation(6)
  np.testing.assert_allclose(block.apply(p, y[..., perm], train=False), block.apply(p, y, train=False)[..., perm],
                             rtol=1e-6)


def test_token_mixing_bf16_kernel_gradients_are_as_accurate_as_one_matmul():
  """Per-example kernel gradients are summed over the batch in float32, not bf16: over 4096 examples the
  bf16 gradient is as close to float32's as that of the transpose + Dense formulation (one GEMM)."""
  x = jax.random.normal(jax.random.key(0), (4096, 16, 8)).astype(jnp.bfloat16)  # [batch, tokens, channels]
  dy = jax.random.normal(jax.random.key(1), x.shape).astype(jnp.bfloat16)

  def kernel_grads(block, x, dy, dtype):
    p = block.init(jax.random.key(2), x, train=False)
    _, vjp = jax.vjp(lambda p: block.apply(p, x.astype(dtype), train=False), p)
    return [vjp(dy.astype(dtype))[0]["params"][d]["kernel"] for d in ("Dense_0", "Dense_1")]

  def errors(block, x, dy):
    ours, reference = (kernel_grads(block.clone(dtype=t), x, dy, t) for t in (jnp.bfloat16, jnp.float32))
    return [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(ours, reference, strict=True)]

  token_mixing = errors(models.TokenMixing(mlp_dim=32), x, dy)
  one_matmul = errors(models.MlpBlock(mlp_dim=32), jnp.swapaxes(x, 1, 2), jnp.swapaxes(dy, 1, 2))
  assert all(ours <= 1.15 * theirs for ours, theirs in zip(token_mixing, one_matmul, strict=True)), (
      token_mixing, one_matmul)


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


def _tiny_with_random_params(token_mixing_form="per_example"):
  """The tiny model with 5 classes, an input, and parameters moved off their init (a non-zero head)."""
  model = _tiny(token_mixing_form=token_mixing_form).clone(num_classes=5)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  return model, x, params


@pytest.mark.parametrize("form", models.TOKEN_MIXING_FORMS)
def test_model_computes_the_papers_equations(form):
  """The flax module equals Eq. (1) of the paper written independently in numpy (float64), in either form."""
  model, x, params = _tiny_with_random_params(form)
  np.testing.assert_allclose(model.apply({"params": params}, x), _paper_forward(params, np.asarray(x, np.float64), 4),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", models.TOKEN_MIXING_FORMS)
def test_gradients_equal_autodiff_of_the_papers_equations(form):
  """Either token-mixing form and the hand-written LayerNorm/gelu backward give autodiff's gradients."""
  model, x, params = _tiny_with_random_params(form)
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


def test_bad_model_config_values_name_the_key():
  with pytest.raises(ValueError, match=r"config\.model\.dtype='float8'"):
    _tiny(dtype="float8")
  with pytest.raises(ValueError, match=r"config\.model\.dtype='float16'.*loss scaling"):
    _tiny(dtype="float16")
  with pytest.raises(ValueError, match=r"config\.model\.stoch_depth=1.5"):
    _tiny(stoch_depth=1.5)
  with pytest.raises(ValueError, match=r"config\.model\.token_mixing_form='einsum' is not one of per_example"):
    _tiny(token_mixing_form="einsum")


def test_scanned_blocks_equal_the_loop_with_stacked_params():
  loop, scanned = _tiny(stoch_depth=0.2), _tiny(stoch_depth=0.2, scan_blocks=True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = loop.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)
  stacked = models.stack_blocks(params)
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned.init(jax.random.key(1), x)["params"])
  assert stacked["MixerBlocks"]["block"]["token_mixing"]["Dense_0"]["kernel"].shape == (4, 16, 64)
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
