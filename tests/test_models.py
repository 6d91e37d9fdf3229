"""ViT backbone and heads: architecture, parameter counts, position-embedding resize, errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sit_jax.models import heads, sit, vit


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]


def test_vit_s16_has_reference_parameter_count():
  # timm vit_small_patch16_224(num_classes=0): 21,665,664 parameters.
  model = vit.backbone_from_config(dict(variant="S/16", image_size=224))
  assert count(abstract_params(model, jnp.zeros((1, 224, 224, 3)))) == 21_665_664


@pytest.mark.parametrize("variant,expected", [("Ti/16", 5_524_416), ("B/16", 85_798_656)])
def test_other_variants_parameter_counts(variant, expected):
  model = vit.backbone_from_config(dict(variant=variant, image_size=224))
  assert count(abstract_params(model, jnp.zeros((1, 224, 224, 3)))) == expected


def test_analytic_parameter_count_any_patch_and_size():
  width, depth, patch, size = 96, 4, 8, 48
  model = vit.backbone_from_config(dict(variant="Mu/8", image_size=size))
  block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) \
      + 2 * (4 * width * width) + 4 * width + width
  expected = (patch * patch * 3 * width + width) + width + ((size // patch) ** 2 + 1) * width \
      + depth * block + 2 * width
  assert count(abstract_params(model, jnp.zeros((1, size, size, 3)))) == expected


def test_outputs_shapes_and_dtypes():
  model = vit.backbone_from_config(dict(variant="Mu/4", image_size=32, dtype="bfloat16",
                                        recons_blocks=(2, 4)))
  x = jnp.ones((3, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda p: p.astype(jnp.float32), params))
  out = model.apply(params, x)
  chex.assert_shape(out["cls"], (3, 96))
  chex.assert_shape(out["patches"], (3, 64, 96))
  chex.assert_shape(out["recon_tokens"], (3, 64, 96))
  assert out["cls"].dtype == jnp.bfloat16


def test_recons_blocks_average_differs_from_last_block():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  plain = vit.backbone_from_config(dict(variant="Mu/4", image_size=16))
  params = plain.init(jax.random.PRNGKey(0), x)
  out_plain = plain.apply(params, x)
  last_only = vit.backbone_from_config(dict(variant="Mu/4", image_size=16, recons_blocks=(4,)))
  np.testing.assert_allclose(last_only.apply(params, x)["recon_tokens"], out_plain["patches"],
                             rtol=1e-6, atol=1e-6)
  averaged = vit.backbone_from_config(dict(variant="Mu/4", image_size=16, recons_blocks=(2, 4)))
  assert not np.allclose(averaged.apply(params, x)["recon_tokens"], out_plain["patches"])


def test_drop_path_rises_linearly_and_only_in_training():
  model = vit.backbone_from_config(dict(variant="Mu/4", image_size=16, drop_path_rate=0.3))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  # Eval is deterministic; training differs between dropout keys.
  np.testing.assert_array_equal(model.apply(params, x)["cls"], model.apply(params, x)["cls"])
  a = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})["cls"]
  b = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})["cls"]
  assert not np.allclose(a, b)
  np.testing.assert_allclose(vit.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3])
  np.testing.assert_allclose(vit.drop_path_rates(0.1, 12)[6], 0.1 * 6 / 11)


def test_image_size_not_divisible_by_patch_is_a_clear_error():
  with pytest.raises(ValueError, match="not divisible by the patch size 16"):
    vit.backbone_from_config(dict(variant="S/16", image_size=100))
  model = vit.backbone_from_config(dict(variant="Mu/4", image_size=16))
  with pytest.raises(ValueError, match="not divisible by the patch size 4"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 18, 18, 3)))


def test_unknown_variant_error():
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit.parse_variant("XL/16")
  for zero_patch in ("S/0", "S/00"):  # not a ZeroDivisionError further on.
    with pytest.raises(ValueError, match="Unknown ViT variant"):
      vit.backbone_from_config(dict(variant=zero_patch, image_size=224))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="float16 runs elsewhere")
def test_float16_on_cpu_is_one_clear_error():
  # XLA:CPU cannot compile attention's float16 x float16 -> float32 dot.
  q = jnp.ones((1, 4, 2, 8), jnp.float16)
  with pytest.raises(ValueError, match="F16_F16_F32"):
    jax.jit(jax.nn.dot_product_attention)(q, q, q)
  with pytest.raises(ValueError, match="model.dtype='float16' does not run on cpu"):
    vit.backbone_from_config(dict(variant="Mu/4", image_size=16, dtype="float16"))


def test_pos_embed_resize_preserves_original_size_and_interpolates():
  pos = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 14 * 14, 8))
  np.testing.assert_array_equal(vit.resize_pos_embed(pos, (14, 14)), pos)
  bigger = vit.resize_pos_embed(pos, (28, 28))
  chex.assert_shape(bigger, (1, 1 + 28 * 28, 8))
  np.testing.assert_array_equal(bigger[:, 0], pos[:, 0])  # CLS position untouched.
  # A constant grid stays constant under bicubic resampling.
  const = jnp.concatenate([pos[:, :1], jnp.full((1, 196, 8), 0.5)], axis=1)
  np.testing.assert_allclose(vit.resize_pos_embed(const, (20, 20))[:, 1:], 0.5, atol=1e-5)
  # Down then up approximately recovers a smooth grid.
  yy, xx = np.meshgrid(np.linspace(0, 1, 14), np.linspace(0, 1, 14), indexing="ij")
  smooth = np.stack([np.sin(yy * 2) + xx] * 8, -1).reshape(1, 196, 8)
  smooth = jnp.concatenate([pos[:, :1], jnp.asarray(smooth, jnp.float32)], axis=1)
  there = vit.resize_pos_embed(smooth, (28, 28))
  back = vit.resize_pos_embed(there, (14, 14))
  np.testing.assert_allclose(back, smooth, atol=0.02)


def test_forward_at_new_resolution_uses_resized_embedding():
  model = vit.backbone_from_config(dict(variant="Mu/4", image_size=16))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  out = model.apply(params, jnp.ones((2, 32, 32, 3)))
  chex.assert_shape(out["patches"], (2, 64, 96))


def test_reconstruction_head_returns_image():
  head = heads.ReconstructionHead(patch_size=4, depth=3)
  tokens = jnp.ones((2, 16, 32))
  params = head.init(jax.random.PRNGKey(0), tokens, (4, 4))
  out = head.apply(params, tokens, (4, 4))
  chex.assert_shape(out, (2, 16, 16, 3))
  # kernel = stride = patch: each patch of output depends only on its token.
  tokens2 = tokens.at[:, 5].set(3.0)
  diff = np.abs(np.asarray(head.apply(params, tokens2, (4, 4)) - out)).sum(-1)
  changed = np.argwhere(diff[0] > 0)
  assert changed[:, 0].min() == 4 and changed[:, 0].max() == 7  # token 5 = row 1, col 1.
  assert changed[:, 1].min() == 4 and changed[:, 1].max() == 7


@pytest.mark.parametrize("patch,channels", [(4, 3), (3, 2)])
def test_patch_to_pixels_equals_conv_transpose(patch, channels):
  # The einsum replaces nn.ConvTranspose(kernel = stride = patch): same parameters, same output.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5, 7))
  conv = nn.ConvTranspose(channels, (patch, patch), strides=(patch, patch), padding="VALID")
  ours = heads.PatchToPixels(patch, channels)
  params = conv.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal(params, ours.init(jax.random.PRNGKey(0), x))
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  want = conv.apply(params, x)
  chex.assert_shape(want, (2, 3 * patch, 5 * patch, channels))
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_projection_head_batchnorm_uses_batch_statistics():
  head = heads.ProjectionHead(hidden=64, out_dim=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 24))
  variables = head.init(jax.random.PRNGKey(1), x)
  out, _ = head.apply(variables, x, mutable=["batch_stats"])
  chex.assert_shape(out, (32, 16))
  # Final BN without affine: zero mean, unit variance over the batch.
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(0), 1.0, atol=1e-2)
  assert "bn_2" not in variables["params"]  # no affine parameters in the last BN.
  hidden = 24 * 64 + 64 * 64 + 64 * 16 + 2 * (2 * 64)  # no biases before BN.
  assert count(variables["params"]) == hidden


def _numpy_projection_head(params, x, eps=1e-5):
  """The head in float64, BatchNorm variance as torch takes it: mean of (x - mean)^2."""
  from scipy.special import erf
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def bn(h, name=None):
    h = (h - h.mean(0)) / np.sqrt(((h - h.mean(0)) ** 2).mean(0) + eps)
    return h * p[name]["scale"] + p[name]["bias"] if name else h

  h = np.maximum(bn(x @ p["fc_0"]["kernel"], "bn_0"), 0)
  h = bn(h @ p["fc_1"]["kernel"], "bn_1")
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return bn(h @ p["fc_2"]["kernel"])


def test_projection_head_batchnorm_variance_is_stable_for_a_large_mean():
  """Features with mean 1e3 and spread 0.1 (CLS features at init look like this): the head
  matches a float64 reference to fp32 rounding of the mean, where E[x^2] - mean^2 is off by ~100."""
  rng = np.random.default_rng(0)
  x = (1e3 + 0.1 * rng.normal(size=(256, 16))).astype(np.float32)
  head = heads.ProjectionHead(hidden=16, out_dim=8)
  params = head.init(jax.random.PRNGKey(1), x)["params"]
  # fc_0 = identity: bn_0 sees x itself.
  params = {**params, "fc_0": {"kernel": jnp.eye(16)}}
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                        params)
  want = _numpy_projection_head(params, x.astype(np.float64))
  got, _ = head.apply({"params": params}, x, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, atol=2e-2)
  for fast, ok in ((True, False), (False, True)):  # the input tells the two variances apart.
    bn = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False,
                      use_fast_variance=fast)
    y, _ = bn.apply({}, x, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert (np.abs(np.asarray(y) - ref).max() < 1e-2) == ok


def test_projection_head_batchnorm_statistics_span_the_global_batch():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(3)
  # Each device's shard has its own offset: per-shard statistics would remove it.
  x = (rng.normal(size=(32, 12)) + np.repeat(np.arange(8.0), 4)[:, None]).astype(np.float32)
  head = heads.ProjectionHead(hidden=32, out_dim=8)
  params = head.init(jax.random.PRNGKey(4), x)["params"]
  fn = jax.jit(lambda p, a: head.apply({"params": p}, a, mutable=["batch_stats"])[0])
  got = fn(params, jax.device_put(x, NamedSharding(mesh, P("data"))))
  want = _numpy_projection_head(params, x.astype(np.float64))
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_classifier_head_features():
  out = {"cls": jnp.ones((2, 8)), "patches": jnp.full((2, 4, 8), 2.0)}
  feats = heads.pool_features(out, "cls+mean")
  np.testing.assert_array_equal(feats[:, :8], 1.0)
  np.testing.assert_array_equal(feats[:, 8:], 2.0)
  clf = heads.ClassifierHead(num_classes=5, features="cls+mean")
  params = clf.init(jax.random.PRNGKey(0), out)
  chex.assert_shape(params["params"]["fc"]["kernel"], (16, 5))


def test_sit_model_experiments_select_heads():
  x = jnp.zeros((4, 16, 16, 3))
  cfg = dict(variant="Mu/4", image_size=16, proj_hidden=32, proj_dim=8)
  for experiment, expected in [("gmml", {"backbone", "recon_head"}),
                               ("contrastive", {"backbone", "projection"}),
                               ("sit", {"backbone", "recon_head", "projection"})]:
    model = sit.sit_from_config(cfg, experiment)
    assert set(abstract_params(model, x, train=False)) == expected
  with pytest.raises(ValueError, match="Unknown experiment"):
    sit.sit_from_config(cfg, "simclr")


def test_scanned_blocks_compute_what_the_unrolled_blocks_compute():
  cfg = dict(variant="Mu/4", image_size=16, drop_path_rate=0.1, recons_blocks=(2, 4))
  unrolled = vit.backbone_from_config(cfg)
  scanned = vit.backbone_from_config({**cfg, "scan_layers": True})
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = unrolled.init(jax.random.PRNGKey(0), x)["params"]
  stacked = vit.stack_blocks(params)
  # Same tree as the scanned module creates, with a leading layer axis on every block leaf.
  chex.assert_trees_all_equal_shapes(stacked, abstract_params(scanned, x))
  chex.assert_shape(stacked["blocks"]["block"]["attn"]["qkv"]["kernel"], (4, 96, 288))
  assert count(stacked) == count(params)
  chex.assert_trees_all_equal(vit.unstack_blocks(stacked), params)
  want = unrolled.apply({"params": params}, x)
  got = scanned.apply({"params": stacked}, x)
  for key in ("cls", "patches", "recon_tokens"):
    np.testing.assert_allclose(got[key], want[key], atol=2e-5, err_msg=key)
  # Training mode: with drop path the rates are traced per layer; without, nothing is dropped.
  train = lambda m, p, rate: m.clone(drop_path_rate=rate).apply(
      {"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})["cls"]
  np.testing.assert_allclose(train(scanned, stacked, 0.0), want["cls"], atol=2e-5)
  assert not np.allclose(train(scanned, stacked, 0.5), want["cls"], atol=1e-3)
  # bf16 compute keeps the scan carry in bf16 (a traced drop-path rate must not promote it).
  out = train(scanned.clone(dtype=jnp.bfloat16), stacked, 0.5)
  assert out.dtype == jnp.bfloat16
  # Without drop path, training needs no dropout key, as unrolled.
  for model, p in ((unrolled, params), (scanned, stacked)):
    got = model.clone(drop_path_rate=0.0).apply({"params": p}, x, train=True)["cls"]
    np.testing.assert_allclose(got, want["cls"], atol=2e-5)


def test_is_scanned_layer_names():
  assert vit.is_scanned_layer("backbone/blocks/block/attn/qkv/kernel")
  assert vit.is_scanned_layer("blocks/block/norm1/scale")
  assert not vit.is_scanned_layer("backbone/blocks_3/attn/qkv/kernel")
  assert not vit.is_scanned_layer("backbone/norm/scale")


def test_recompute_gelu_keeps_its_input_only_and_computes_the_same():
  # Differentiated with respect to parameters and input, the MLP keeps fc1's output (GELU's
  # input) and GELU's output (fc2's input) for the backward pass; through GELU's own derivative,
  # two more tensors of that size.
  inputs = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  params = vit.Mlp(hidden=32).init(jax.random.PRNGKey(1), inputs)
  hidden_sized = {}
  for recompute in (False, True):
    _, backward = jax.vjp(vit.Mlp(32, recompute_gelu=recompute).apply, params, inputs)
    hidden_sized[recompute] = [r.shape for r in jax.tree.leaves(backward)].count((2, 5, 32))
  assert hidden_sized == {False: 4, True: 2}
  # The whole backbone, from the config key: the same loss and gradients.
  cfg = {"variant": "Mu/4", "image_size": 16}
  plain = vit.backbone_from_config(cfg)
  recomputing = vit.backbone_from_config({**cfg, "recompute_gelu": True})
  assert recomputing.recompute_gelu and not plain.recompute_gelu
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
  backbone_params = plain.init(jax.random.PRNGKey(3), x)
  loss = lambda model: jax.value_and_grad(
      lambda p: jnp.sum(jnp.square(model.apply(p, x, train=True)["cls"])))(backbone_params)
  chex.assert_trees_all_close(loss(recomputing), loss(plain), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("qkv_per_head", [False, True])
def test_reshard_after_forward_reads_each_kernel_again_and_computes_the_same(qkv_per_head):
  # Every kernel product of the network (4 blocks x qkv, proj, fc1, fc2; the reconstruction
  # head's 3 layers and its pixel projection; the projection head's 3) reads its kernel through
  # an optimisation barrier in the backward pass, which no other op of the model uses.
  cfg = dict(variant="Mu/4", image_size=16, proj_hidden=32, proj_dim=8, qkv_per_head=qkv_per_head)
  plain = sit.sit_from_config(cfg, "sit")
  resharding = sit.sit_from_config({**cfg, "reshard_after_forward": True}, "sit")
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  variables = plain.init(jax.random.PRNGKey(1), x, train=True)

  def loss_and_grads(model):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(jnp.square(out["recon"])) + jnp.sum(jnp.square(out["proj"]))
    return jax.value_and_grad(loss), variables["params"]

  barriers = lambda model: str(jax.make_jaxpr(lambda f, p: f(p), static_argnums=0)(
      *loss_and_grads(model))).count("optimization_barrier")
  assert (barriers(plain), barriers(resharding)) == (0, 4 * 4 + 4 + 3)
  # The same products, so the same numbers to the bit: only where XLA reads the kernels moves.
  grad_fn, params = loss_and_grads(resharding)
  want_fn, _ = loss_and_grads(plain)
  chex.assert_trees_all_equal(jax.jit(grad_fn)(params), jax.jit(want_fn)(params))
