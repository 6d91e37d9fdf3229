"""model.standardize_input: each image standardised inside the backbone, saved with the
parameters and applied by every user of the backbone (pretraining, monitor, transfer)."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import knn as knn_config
from configs import sit_vits
from sit_jax import checkpoint, pretrain
from sit_jax.models import vit
from sit_jax.transfer import common


def exposures(seed=0, batch=3, size=16):
  """Images in [0, 1], and the same scenes with each image's channels rescaled and shifted."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.2, 0.8, (batch, size, size, 3)).astype(np.float32)
  gain = rng.uniform(0.5, 1.5, (batch, 1, 1, 3)).astype(np.float32)
  offset = rng.uniform(-0.2, 0.2, (batch, 1, 1, 3)).astype(np.float32)
  return images, images * gain + offset


def test_standardize_per_image_matches_numpy_and_ignores_exposure():
  images, exposed = exposures()
  out = np.asarray(vit.standardize_per_image(images))
  mean = images.mean(axis=(1, 2), keepdims=True)
  std = images.std(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, (images - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-4)
  np.testing.assert_allclose(vit.standardize_per_image(exposed), out, atol=1e-4)
  flat = np.asarray(vit.standardize_per_image(np.full((1, 4, 4, 3), 0.7, np.float32)))
  np.testing.assert_allclose(flat, 0.0, atol=1e-4)  # no division by zero


def test_backbone_that_standardises_sees_through_exposure_with_the_same_parameters():
  images, exposed = exposures()
  plain = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  standard = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16,
                                       "standardize_input": True})
  params = plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  chex.assert_trees_all_equal_shapes(
      params, standard.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
  cls = lambda module, x: module.apply({"params": params}, x)["cls"]
  np.testing.assert_allclose(cls(standard, exposed), cls(standard, images), atol=1e-4)
  assert np.abs(cls(plain, exposed) - cls(plain, images)).max() > 1e-2
  # The same as standardising outside a plain backbone.
  np.testing.assert_allclose(cls(standard, images),
                             cls(plain, vit.standardize_per_image(images)), atol=1e-5)


@pytest.mark.parametrize("standardize", [False, True])
def test_transfer_takes_standardisation_from_the_checkpoint(tmp_path, standardize):
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  params = module.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)))["params"]
  path = checkpoint.export_backbone(
      tmp_path / "backbone", {"backbone": jax.tree.map(np.asarray, params)},
      {"variant": "Mu/4", "image_size": 16, "standardize_input": standardize})
  config = knn_config.get_config("runlocal")
  config.init = str(path)
  config.model.standardize_input = not standardize  # ignored: the checkpoint decides.
  backbone = common.load_backbone(config, image_size=16)
  assert backbone.module.standardize_input is standardize
  assert backbone.model_config["standardize_input"] is standardize
  # Random init follows the config.
  config.init = ""
  assert common.load_backbone(config, image_size=16).module.standardize_input is not standardize


def test_pretraining_views_and_reconstruction_target_are_standardised():
  config = sit_vits.get_config("runlocal")
  config.model.standardize_input = True
  rng = np.random.default_rng(0)
  batch = {name: rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
           for name in ("view1", "view2")}
  views = np.asarray(pretrain.prepare_views(config, jax.random.PRNGKey(0), batch))
  chex.assert_shape(views, (2, 4, 16, 16, 3))
  np.testing.assert_allclose(views.mean(axis=(2, 3)), 0.0, atol=1e-4)
  np.testing.assert_allclose(views.std(axis=(2, 3)), 1.0, atol=1e-3)
  assert pretrain.model_config(config)["standardize_input"] is True  # saved with checkpoints
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.standardize_input = False
  plain = np.asarray(pretrain.prepare_views(config, jax.random.PRNGKey(0), batch))
  np.testing.assert_allclose(np.asarray(vit.standardize_per_image(plain)), views, atol=1e-4)


def test_pictures_show_each_image_in_its_own_colours():
  """With standardize_input the network's views are each image standardised; the pictures'
  columns are mapped back, so the clean one is the ImageNet-normalised view (what the grid
  un-normalises), not a standardised image read as if it were ImageNet-normalised."""
  config = sit_vits.get_config("runlocal")
  config.model.update(standardize_input=True, proj_hidden=32, proj_dim=16)
  model = pretrain.build_model(config)
  tx = pretrain.build_optimizer(config, pretrain.build_schedules(config, 10, 10))
  state = pretrain.init_state(config, model, tx, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # A dim grey image with a colour cast: its standardised form has neither.
  batch = {name: (rng.integers(40, 90, (4, 16, 16, 1)) * np.array([1.0, 0.8, 0.6])).astype(np.uint8)
           for name in ("view1", "view2")}
  clean, corrupted, recon = map(np.asarray,
                                jax.jit(pretrain.make_reconstruct(config, model))(state, batch))
  aug_key = pretrain.step_keys(state.rng, state.step - 1)[0]  # the step before the state
  want = np.asarray(pretrain.normalised_views(config, aug_key, batch))[0]
  np.testing.assert_allclose(clean, want, atol=1e-4)
  chex.assert_equal_shape([clean, corrupted, recon])
  # Uncorrupted pixels of the corrupted view are the clean view's, in the same colours.
  same = np.isclose(corrupted, clean, atol=1e-4)
  assert same.mean() > 0.5
