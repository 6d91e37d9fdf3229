"""Photometric augmentation: each op against an independent numpy/stdlib formula, the random
pipeline's determinism and range, and sharded execution over the 8 simulated devices."""
import colorsys
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from sit_jax import augment

OFF = augment.view_augment_config("none", 1)
SIT1 = augment.view_augment_config("sit", 1)
SIT2 = augment.view_augment_config("sit", 2)


@functools.lru_cache(maxsize=None)
def _jitted(cfg_items):
  cfg = dict(cfg_items)
  return jax.jit(lambda k, im: augment.photometric(k, im, **cfg))


def _run(key, images, cfg):
  """Jitted photometric, compiled once per config and shape for the whole module."""
  return np.asarray(_jitted(tuple(sorted(cfg.items())))(key, images))


def _images(n=4, size=16, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _luma(x):
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def test_normalize_roundtrip():
  x = _images(2)
  y = augment.normalize(x)
  np.testing.assert_allclose(
      np.asarray(y[..., 1]), (x[..., 1] - 0.456) / 0.224, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(augment.denormalize(y)), x, atol=1e-6)


def test_brightness_contrast_saturation_match_numpy():
  x = _images(1)[0]
  np.testing.assert_allclose(augment.adjust_brightness(x, 1.3), np.clip(x * 1.3, 0, 1), atol=1e-6)
  m = _luma(x).mean()
  np.testing.assert_allclose(augment.adjust_contrast(x, 0.6),
                             np.clip(0.6 * x + 0.4 * m, 0, 1), atol=1e-6)
  g = _luma(x)[..., None]
  np.testing.assert_allclose(augment.adjust_saturation(x, 1.5),
                             np.clip(1.5 * x - 0.5 * g, 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(x, 1.0), x, atol=1e-6)


def test_hue_matches_colorsys_and_full_turn_is_identity():
  x = _images(1, size=6)[0]
  np.testing.assert_allclose(augment.adjust_hue(x, 0.0), x, atol=1e-5)
  np.testing.assert_allclose(augment.adjust_hue(x, 1.0), x, atol=1e-5)
  shift = 0.23
  expect = np.empty_like(x)
  for i in range(6):
    for j in range(6):
      h, s, v = colorsys.rgb_to_hsv(*x[i, j])
      expect[i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  np.testing.assert_allclose(augment.adjust_hue(x, shift), expect, atol=1e-5)


def test_grayscale_and_solarize():
  x = _images(1)[0]
  g = np.asarray(augment.grayscale(x))
  np.testing.assert_allclose(g, np.repeat(_luma(x)[..., None], 3, -1), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(augment.solarize(x)), np.where(x >= 0.5, 1 - x, x))


def test_gaussian_blur_matches_scipy_and_keeps_constants():
  assert augment.blur_kernel_size(224) == 23
  x = _images(1, size=40)[0]
  k = augment.blur_kernel_size(40)
  got = np.asarray(augment.gaussian_blur(x, 1.3))
  # torch's "reflect" padding is scipy's "mirror"; same truncated, renormalised kernel.
  want = scipy.ndimage.gaussian_filter(x, sigma=(1.3, 1.3, 0), mode="mirror",
                                       radius=(k // 2, k // 2, 0))
  np.testing.assert_allclose(got, want, atol=1e-5)
  const = np.full((20, 20, 3), 0.37, np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(const, 1.9), const, atol=1e-6)
  # Per-example sigma works under vmap.
  out = jax.vmap(augment.gaussian_blur)(jnp.stack([x, x]), jnp.array([0.1, 2.0]))
  assert np.abs(np.asarray(out[0]) - x).max() < 1e-3
  assert np.asarray(out[1]).std() < x.std() / 2


def test_all_off_is_identity_and_range():
  x = _images(8)
  key = jax.random.key(0)
  np.testing.assert_array_equal(_run(key, x, OFF), x)
  # Probability 0 with non-zero magnitudes is also the identity.
  cfg = dict(SIT2, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
  np.testing.assert_array_equal(_run(key, x, cfg), x)
  y = _run(key, x * 1.5 - 0.25, SIT2)
  assert y.min() >= 0.0 and y.max() <= 1.0


def test_same_key_same_output_different_key_differs():
  x = _images(8)
  a = _run(jax.random.key(1), x, SIT1)
  b = _run(jax.random.key(1), x, SIT1)
  c = _run(jax.random.key(2), x, SIT1)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  # Per-example keys: identical inputs get different augmentations.
  d = _run(jax.random.key(3), np.repeat(x[:1], 8, 0), SIT1)
  assert np.abs(d[0] - d[1]).max() > 1e-3


def test_grayscale_always_gives_equal_channels():
  y = _run(jax.random.key(0), _images(8), dict(OFF, grayscale_prob=1.0))
  np.testing.assert_allclose(y[..., 0], y[..., 1], atol=1e-6)
  np.testing.assert_allclose(y[..., 0], y[..., 2], atol=1e-6)


def test_solarize_always_matches_numpy():
  x = _images(8)
  y = _run(jax.random.key(0), x, dict(OFF, solarize_prob=1.0))
  np.testing.assert_array_equal(y, np.where(x >= 0.5, 1 - x, x))


def test_jitter_brightness_only_is_a_per_image_scale():
  x = _images(8) * 0.5  # no clipping for factors <= 1.5
  y = _run(jax.random.key(5), x, dict(OFF, jitter_prob=1.0, brightness=0.5))
  f = (y / x).reshape(8, -1)
  np.testing.assert_allclose(f, f[:, :1] * np.ones_like(f), rtol=1e-5)
  assert np.all((f[:, 0] >= 0.5) & (f[:, 0] <= 1.5))
  assert len(np.unique(np.round(f[:, 0], 5))) == 8


def test_each_op_is_applied_with_its_own_independent_probability():
  """Grayscale and solarize, each with probability 0.2, from their own draws: an image ends up
  unchanged, grey, solarised or both (grey, then solarised) at 0.64 / 0.16 / 0.16 / 0.04."""
  x = _images(2048, size=4)
  y = _run(jax.random.key(3), x, dict(OFF, grayscale_prob=0.2, solarize_prob=0.2))
  gray = np.repeat(_luma(x)[..., None], 3, -1)
  solarize = lambda v: np.where(v >= 0.5, 1 - v, v)
  outcomes = [x, gray, solarize(x), solarize(gray)]
  found = np.array([[np.allclose(y[i], o[i], atol=1e-5) for o in outcomes]
                    for i in range(len(x))])
  assert (found.sum(1) == 1).all()  # each image is exactly one of the four
  # Binomial standard deviations at n = 2048: 0.011, 0.008, 0.008, 0.004.
  np.testing.assert_allclose(found.mean(0), [0.64, 0.16, 0.16, 0.04], atol=0.035)


def test_jitter_matches_the_ops_applied_in_the_drawn_order():
  """The fused jitter equals torchvision's plain loop over the four ops in a random order."""
  x = _images(8)
  cfg = dict(OFF, jitter_prob=1.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
  key = jax.random.key(11)
  y = _run(key, x, cfg)
  fns = [jax.jit(f) for f in (augment.adjust_brightness, augment.adjust_contrast,
                              augment.adjust_saturation, augment.adjust_hue)]

  hue_places = set()
  for i, k in enumerate(jax.random.split(key, len(x))):
    # The factors and the order, from the uniforms each image draws (augment.py's layout:
    # brightness, contrast, saturation and hue from the first four, the order from the ranks
    # of the next four).
    u = np.asarray(jax.random.uniform(k, (augment.NUM_DRAWS,), jnp.float32))
    factors = [0.6 + 0.8 * u[0], 0.6 + 0.8 * u[1], 0.8 + 0.4 * u[2], -0.1 + 0.2 * u[3]]
    order = list(np.argsort(u[4:8]))
    hue_places.add(order.index(3))
    want = x[i]
    for j in order:
      want = fns[j](want, factors[j])
    np.testing.assert_allclose(y[i], np.asarray(want), atol=1e-5)
  assert len(hue_places) > 1


def test_views_augmented_together_draw_what_each_draws_alone():
  """The step augments both views in one trace, with per-view probabilities: the 'sit' preset's
  view 1 always blurs and never solarises, its view 2 blurs 1 in 10 and solarises 1 in 5."""
  views = np.stack([_images(8, seed=1), _images(8, seed=2)])
  keys = (jax.random.key(4), jax.random.key(9))
  together = np.asarray(jax.jit(lambda k1, k2, v: augment.photometric_views(
      [k1, k2], v, [SIT1, SIT2]))(*keys, views))
  for view, settings in enumerate((SIT1, SIT2)):
    np.testing.assert_allclose(together[view], _run(keys[view], views[view], settings),
                               atol=1e-6)
  # The check can tell the views' settings apart: view 2 under view 1's settings draws otherwise.
  assert np.abs(together[1] - _run(keys[1], views[1], SIT1)).max() > 0.1
  with pytest.raises(ValueError, match=r"probabilities only; they also differ in \['hue'\]"):
    augment.photometric_views(keys, views, [SIT1, dict(SIT2, hue=0.2)])


def test_presets():
  sit1, sit2 = augment.view_augment_config("sit", 1), augment.view_augment_config("sit", 2)
  assert (sit1["blur_prob"], sit1["solarize_prob"]) == (1.0, 0.0)
  assert (sit2["blur_prob"], sit2["solarize_prob"]) == (0.1, 0.2)
  assert (sit1["brightness"], sit1["hue"], sit1["jitter_prob"], sit1["grayscale_prob"]) == (
      0.4, 0.1, 0.8, 0.2)
  gmml = augment.view_augment_config("gmml", 2)
  assert (gmml["jitter_prob"], gmml["hue"], gmml["blur_prob"], gmml["grayscale_prob"]) == (
      0.3, 0.01, 0.1, 0.0)
  with pytest.raises(ValueError):
    augment.view_augment_config("bogus", 1)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_over_8_devices_matches_unsharded(axis_type):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = _images(8)
  f = jax.jit(lambda k, im: augment.photometric(k, im, **SIT2), out_shardings=sharding)
  with jax.set_mesh(mesh):  # explicit axes are traced against the mesh in context (jax 0.11)
    y = f(jax.random.key(7), jax.device_put(x, sharding))
  chex.assert_shape(y, x.shape)
  assert y.sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_allclose(np.asarray(y), _run(jax.random.key(7), x, SIT2), atol=1e-6)
