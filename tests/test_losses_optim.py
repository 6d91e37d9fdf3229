"""Losses and optimisation against numpy re-implementations of the formulas."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sit_jax import losses, optim


def test_masked_l1_equals_numpy_over_corrupted_pixels_of_the_batch():
  rng = np.random.default_rng(0)
  recon = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  target = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  mask = (rng.uniform(size=(3, 8, 8)) < 0.4).astype(np.float32)
  mask[2] = 0  # an uncorrupted image contributes nothing (batch mean, not per-image mean).
  expected = np.abs(recon - target)[mask.astype(bool)].mean()
  np.testing.assert_allclose(losses.masked_l1(recon, target, mask), expected, rtol=1e-6)
  np.testing.assert_allclose(losses.masked_l1(recon, target, mask, all_pixels=True),
                             np.abs(recon - target).mean(), rtol=1e-6)


@pytest.mark.parametrize("spec,trains", [
    ("configs/sit_vits.py", True), ("configs/gmml_vits.py", True),
    ("configs/contrastive_vits.py", True), ("configs/finetune.py", True),
    ("configs/multilabel.py:frozen=False", True), ("configs/multilabel.py:frozen=True", False),
    ("configs/knn.py", False), ("configs/linear.py", False)])
def test_float16_is_refused_where_the_backbone_trains(spec, trains):
  # float16's smallest step is 2**-24 and this codebase has no loss scaling. masked_l1 hands each
  # reconstructed value the gradient 1 / (masked pixels x channels): at ImageNet scale (two views
  # of 256 images at 224 px; SiT masks 42% of the pixels on average, GMML 48%) that is 3.1e-8 and
  # 2.7e-8, which float16 makes 2**-24 (1.9 times the gradient) and 0.
  values = 2 * 256 * 224 * 224 * 3
  assert np.float16(1 / (0.42 * values)) == 2.0**-24 and np.float16(1 / (0.48 * values)) == 0
  from sit_jax import config_check
  config = config_check.load(spec)
  config.model.dtype = "float16"
  if trains:
    with pytest.raises(config_check.ConfigError, match=r"model.dtype='float16' cannot train"):
      config_check.check(config)
  else:
    config_check.check(config)


def numpy_contrastive(q, k, tau):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = q @ k.T / tau
  logits = logits - logits.max(1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -np.mean(np.diag(log_prob)) * 2 * tau


def test_contrastive_equals_numpy():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 16, 32)).astype(np.float64)
  got = losses.contrastive(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.2)
  np.testing.assert_allclose(got, numpy_contrastive(q, k, 0.2), rtol=1e-5)


def test_symmetric_contrastive_pairs_views_crosswise():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 20, 8)).astype(np.float32)
  expected = numpy_contrastive(s[:10], t[10:], 0.2) + numpy_contrastive(s[10:], t[:10], 0.2)
  got = losses.symmetric_contrastive(s.reshape(2, 10, 8), t.reshape(2, 10, 8), 0.2)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_contrastive_on_sharded_global_batch_matches_unsharded():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(2, 32, 16)).astype(np.float32)
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k)]
  got = jax.jit(lambda a, b: losses.contrastive(a, b, 0.2))(*sharded)
  np.testing.assert_allclose(got, numpy_contrastive(q.astype(np.float64), k, 0.2), rtol=1e-5)


def test_classification_loss_with_label_smoothing():
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  smooth = np.array([[0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]])
  log_p = logits - np.log(np.exp(logits).sum())
  np.testing.assert_allclose(losses.classification(logits, jnp.array([1]), label_smoothing=0.1),
                             -(smooth * log_p).sum(), rtol=1e-6)


def dino_cosine(base, final, epochs, niter, warmup_epochs=0):
  """DINO's utils.cosine_scheduler (the authors' copy), written out with numpy as the reference."""
  warmup_iters = warmup_epochs * niter
  warm = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


@pytest.mark.parametrize("step", [0, 37, 98, 99, 100, 101, 250, 499])
def test_lr_schedule_matches_warmup_cosine_formula(step):
  base = optim.scaled_lr(5e-4, 512)
  assert base == pytest.approx(1e-3)
  schedule = optim.warmup_cosine(base, 1e-6, total_steps=500, warmup_steps=100)
  if step < 100:  # np.linspace(0, base, 100): base * s / 99, base at step 99.
    expected = base * step / 99
  else:
    expected = 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * (step - 100) / 400))
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(schedule(step), dino_cosine(base, 1e-6, 5, 100, 1)[step], rtol=1e-5,
                             atol=1e-10)


@pytest.mark.parametrize("epochs,niter,warmup_epochs", [(5, 100, 1), (10, 7, 2), (3, 1, 1),
                                                        (4, 25, 0), (2, 3, 2)])
def test_whole_schedule_equals_the_authors_cosine_scheduler(epochs, niter, warmup_epochs):
  base, final = 2e-3, 1e-6
  schedule = optim.warmup_cosine(base, final, epochs * niter, warmup_epochs * niter)
  got = np.asarray(jax.vmap(schedule)(jnp.arange(epochs * niter)))
  want = dino_cosine(base, final, epochs, niter, warmup_epochs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
  if warmup_epochs * niter > 1:
    assert got[warmup_epochs * niter - 1] == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("spec", ["configs/sit_vits.py", "configs/finetune.py"])
def test_a_warmup_longer_than_the_run_is_named(spec, caplog):
  """A short --config.total_steps at full size (fine-tuning ImageNet: 5 warmup epochs of 1,238
  steps) trains on a rising lr only: pretraining said so, fine-tuning did not."""
  import logging
  from sit_jax import config_check, pretrain
  from sit_jax.transfer import supervised
  config = config_check.load(spec)
  total, per_epoch = 5000, 1238
  with caplog.at_level(logging.WARNING):
    lr = (pretrain.build_schedules(config, total, per_epoch).lr
          if config.experiment == "sit" else supervised.lr_schedule(config, total, per_epoch))
  warmup = int(config.optim.warmup_epochs * per_epoch)
  reached = (total - 1) / (warmup - 1)  # np.linspace(0, peak, warmup) at the last step
  assert f"is {warmup} steps, more than the run's {total}: the lr ends at {reached:.3g} of its " \
         "peak" in caplog.text
  peak = optim.scaled_lr(config.optim.base_lr, config.data.global_batch_size)
  np.testing.assert_allclose(lr(total - 1), peak * reached, rtol=1e-5)


@pytest.mark.parametrize("step", [0, 250, 500, 999])
def test_weight_decay_and_momentum_schedules(step):
  wd = optim.warmup_cosine(0.04, 0.4, total_steps=1000)
  np.testing.assert_allclose(wd(step), 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * step / 1000)),
                             rtol=1e-5)
  momentum = optim.warmup_cosine(0.996, 1.0, total_steps=1000)
  expected = 1 - (1 - 0.996) * (math.cos(math.pi * step / 1000) + 1) / 2
  np.testing.assert_allclose(momentum(step), expected, rtol=1e-6)
  np.testing.assert_allclose(momentum(step), dino_cosine(0.996, 1, 10, 100)[step], rtol=1e-6)


def test_ema_formula():
  teacher = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
  student = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(-1.0)}
  out = optim.ema(teacher, student, 0.9)
  np.testing.assert_allclose(out["w"], [0.9, 2.2], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 2.6, rtol=1e-6)


def test_per_tensor_clipping_is_not_global_norm():
  grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}  # norms 5 and 0.5
  clipped, _ = optim.clip_by_norm_per_tensor(1.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-5)
  np.testing.assert_allclose(clipped["b"], [0.3, 0.4], rtol=1e-6)


def test_decay_mask_excludes_biases_norms_tokens_and_position_embedding():
  params = {"vit": {"cls_token": jnp.zeros((1, 1, 4)), "pos_embed": jnp.zeros((1, 5, 4)),
                    "patch_embed": {"kernel": jnp.zeros((2, 2, 3, 4)), "bias": jnp.zeros(4)},
                    "norm": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
                    "blocks_0": {"mlp": {"fc1": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}}}}
  mask = optim.decay_mask(params)["vit"]
  assert mask["patch_embed"]["kernel"] and mask["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert not any([mask["cls_token"], mask["pos_embed"], mask["patch_embed"]["bias"],
                  mask["norm"]["scale"], mask["norm"]["bias"], mask["blocks_0"]["mlp"]["fc1"]["bias"]])


def _sit_params(scan_layers=False):
  from sit_jax.models import sit
  model = sit.sit_from_config(dict(variant="Mu/4", image_size=16, scan_layers=scan_layers,
                                   proj_hidden=32, proj_dim=8), "sit")
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                                           train=False))["params"]


def _torch_name(path):
  return ".".join(str(getattr(p, "key", p)) for p in path)


def test_pretrain_decay_mask_is_the_authors_parameter_groups():
  """The authors' get_params_groups: not regularised iff name.endswith('.bias') or 1-D."""
  from sit_jax.models import vit
  for scan in (False, True):
    params = _sit_params(scan)
    got = optim.pretrain_decay_mask(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), decay in zip(leaves, jax.tree.leaves(got)):
      name = _torch_name(path)
      ndim = leaf.ndim - 1 if vit.is_scanned_layer(name.replace(".", "/")) else leaf.ndim
      assert decay == (not (name.endswith(".bias") or ndim == 1)), name
    backbone = got["backbone"]
    assert backbone["pos_embed"] is True and backbone["cls_token"] is True
    # Fine-tuning keeps the DeiT/BEiT convention: no decay on pos_embed and cls_token.
    finetune = optim.decay_mask(params)["backbone"]
    assert finetune["pos_embed"] is False and finetune["cls_token"] is False
    differ = [_torch_name(p) for (p, _), a, b in zip(
        leaves, jax.tree.leaves(got), jax.tree.leaves(optim.decay_mask(params))) if a != b]
    assert sorted(differ) == ["backbone.cls_token", "backbone.pos_embed"]


def test_adamw_step_matches_hand_computation():
  """One AdamW step with wd and lr from schedules equals the torch.optim.AdamW update."""
  lr, wd = 0.1, 0.5
  tx = optim.adamw(lambda s: lr, lambda s: wd, clip_norm=None)
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
  grads = {"w": jnp.array([[0.2, 0.4]]), "b": jnp.array([1.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # bias-corrected Adam's first step is sign(g) (up to eps); decay only on the matrix.
  np.testing.assert_allclose(new["w"], np.array([[1.0, -2.0]]) - lr * (1 + wd * np.array([[1.0, -2.0]])),
                             rtol=1e-5)
  np.testing.assert_allclose(new["b"], [0.5 - lr], rtol=1e-5)


def test_layerwise_lr_decay_factors():
  depth, decay = 12, 0.75
  assert optim.layerwise_lr_scale("vit/patch_embed/kernel", depth, decay) == pytest.approx(decay ** 13)
  assert optim.layerwise_lr_scale("vit/blocks_0/attn/qkv/kernel", depth, decay) == pytest.approx(decay ** 12)
  assert optim.layerwise_lr_scale("vit/blocks_11/mlp/fc2/bias", depth, decay) == pytest.approx(decay)
  assert optim.layerwise_lr_scale("head/fc/kernel", depth, decay) == 1.0


def test_scanned_layers_are_clipped_and_decayed_layer_by_layer():
  from sit_jax.models import vit
  rng = np.random.default_rng(0)
  blocks = {f"blocks_{i}": {"mlp": {"fc1": {"kernel": rng.normal(size=(3, 4)) * (i + 1),
                                            "bias": rng.normal(size=(4,)) * 5}}}
            for i in range(3)}
  unrolled = jax.tree.map(lambda a: a.astype(np.float32),
                          {"backbone": {**blocks, "norm": {"scale": np.ones(3)}}})
  stacked = {"backbone": vit.stack_blocks(unrolled["backbone"])}
  clip = optim.clip_by_norm_per_tensor(2.0)
  want, _ = clip.update(unrolled, optax.EmptyState())
  got, _ = clip.update(stacked, optax.EmptyState())
  chex.assert_trees_all_close(vit.unstack_blocks(got["backbone"]), want["backbone"], rtol=1e-6)
  mask = optim.decay_mask(stacked)["backbone"]
  assert mask["blocks"]["block"]["mlp"]["fc1"]["kernel"] is True
  assert mask["blocks"]["block"]["mlp"]["fc1"]["bias"] is False  # (3, 4): stacked vectors.
  assert mask["norm"]["scale"] is False
