"""Tests for the GMML corruption (sit_jax/gmml.py)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sit_jax import gmml

# Ratios and probabilities traced, as inside a train step.
_corrupt = jax.jit(gmml.corrupt, static_argnames=("fills", "align", "max_block_frac", "max_blocks"))

def _const_images(b, h, w, c=1, dtype=jnp.float32):
  """Image i is constant, equal to 10 + i: every pixel tells which image it came from."""
  values = 10.0 + jnp.arange(b, dtype=jnp.float32)
  return jnp.broadcast_to(values[:, None, None, None], (b, h, w, c)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("size", "n", "align"))
def _masks_and_counts(key, ratio, *, size, n, align=1):
  fn = lambda k: gmml.block_mask_with_count(k, size, size, ratio, align=align)
  return jax.vmap(fn)(jax.random.split(key, n))


def test_same_key_same_output_different_key_different_mask():
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  out1, mask1 = _corrupt(jax.random.PRNGKey(1), images)
  out2, mask2 = _corrupt(jax.random.PRNGKey(1), images)
  chex.assert_trees_all_equal((out1, mask1), (out2, mask2))
  _, mask3 = _corrupt(jax.random.PRNGKey(2), images)
  assert not np.array_equal(mask1, mask3)
  chex.assert_shape(mask1, (4, 32, 32))
  chex.assert_type([out1, mask1], [jnp.float32, jnp.float32])


# ratio, authors' mean coverage, authors' mean blocks per image (224x224, align 1; see SPEC).
@pytest.mark.parametrize("ratio,ref_mean,ref_blocks", [
    (0.3, 0.313, 21), (0.5, 0.511, 40), (0.75, 0.632, 59)])
def test_coverage_matches_rule_and_reference(ratio, ref_mean, ref_blocks):
  size = 112  # Coverage is a fraction and block sides scale with the side: same statistics.
  masks, counts = _masks_and_counts(jax.random.PRNGKey(3), ratio, size=size, n=256)
  cover = np.asarray(masks, np.float64).mean(axis=(1, 2))
  biggest_block = (int(0.3 * size) / size) ** 2
  assert cover.min() >= min(0.5, ratio)
  assert cover.max() <= ratio + biggest_block
  np.testing.assert_allclose(cover.mean(), ref_mean, atol=0.02)
  np.testing.assert_allclose(np.median(cover), ref_mean, atol=0.03)
  np.testing.assert_allclose(np.asarray(counts).mean(), ref_blocks, rtol=0.2)
  assert np.asarray(counts).max() < 256  # The safety cap never bites.


def test_block_mask_is_bool_and_ratio_zero_is_empty():
  mask = gmml.block_mask(jax.random.PRNGKey(0), 16, 24, 0.0)
  chex.assert_shape(mask, (16, 24))
  chex.assert_type(mask, jnp.bool_)
  assert not mask.any()


@pytest.mark.parametrize("size,align", [(64, 8), (224, 16)])
def test_aligned_blocks_follow_the_grid(size, align):
  masks, _ = _masks_and_counts(jax.random.PRNGKey(4), 0.5, size=size, n=32, align=align)
  masks = np.asarray(masks)
  g = size // align
  cells = masks.reshape(-1, g, align, g, align)
  # Constant inside every align x align cell.
  assert (cells.all(axis=(2, 4)) == cells.any(axis=(2, 4))).all()
  assert (masks.mean(axis=(1, 2)) >= 0.5).all()


def test_replace_takes_pixels_from_another_image():
  b = 16
  images = _const_images(b, 32, 32, 3)
  out, mask = _corrupt(jax.random.PRNGKey(5), images, fills=("replace",))
  out, mask, images = np.asarray(out), np.asarray(mask).astype(bool), np.asarray(images)
  cover = mask.mean(axis=(1, 2))
  assert (cover >= 0.3).all() and (cover < 0.3 + 0.1).all()
  np.testing.assert_array_equal(out[~mask], images[~mask])
  donors = []
  for i in range(b):
    values = np.unique(out[i][mask[i]])
    assert len(values) == 1, "one donor per image"
    assert values[0] != images[i, 0, 0, 0], "an image must never be its own donor"
    donors.append(int(values[0] - 10))
  assert sorted(donors) == list(range(b))  # A permutation of the batch.


def test_replace_with_two_images_swaps_them():
  images = _const_images(2, 8, 8)
  out, mask = _corrupt(jax.random.PRNGKey(6), images, fills=("replace",))
  out, mask = np.asarray(out), np.asarray(mask).astype(bool)
  np.testing.assert_array_equal(out[0][mask[0]], 11.0)
  np.testing.assert_array_equal(out[1][mask[1]], 10.0)


def test_noise_fill():
  images = _const_images(8, 32, 32, 3)
  out, mask = _corrupt(jax.random.PRNGKey(7), images, fills=("noise",), ratio=0.5)
  out, mask, images = np.asarray(out), np.asarray(mask).astype(bool), np.asarray(images)
  assert (mask.mean(axis=(1, 2)) >= 0.5).all()
  np.testing.assert_array_equal(out[~mask], images[~mask])
  noise = out[mask]  # (n, C): all channels of a corrupted pixel are corrupted.
  assert (noise != images[mask]).all()
  np.testing.assert_allclose(noise.mean(), 0.0, atol=0.05)
  np.testing.assert_allclose(noise.std(), 1.0, atol=0.05)


def test_zeros_fill():
  images = _const_images(8, 32, 32, 3)
  out, mask = _corrupt(jax.random.PRNGKey(8), images, fills=("zeros",), ratio=0.75)
  out, mask, images = np.asarray(out), np.asarray(mask).astype(bool), np.asarray(images)
  assert (mask.mean(axis=(1, 2)) >= 0.5).all()
  np.testing.assert_array_equal(out[~mask], images[~mask])
  np.testing.assert_array_equal(out[mask], 0.0)


def test_noise_and_zeros_split_per_image():
  images = _const_images(64, 16, 16)
  out, mask = _corrupt(jax.random.PRNGKey(9), images, fills=("noise", "zeros"))
  out, mask = np.asarray(out), np.asarray(mask).astype(bool)
  zeros = np.array([(out[i][mask[i]] == 0).all() for i in range(64)])
  noisy = np.array([(out[i][mask[i]] != 0).all() for i in range(64)])
  assert (zeros ^ noisy).all()  # One fill type per image.
  assert 0.3 < zeros.mean() < 0.7


def test_noise_replace_mix():
  b, size = 256, 112
  images = _const_images(b, size, size)
  out, mask = _corrupt(jax.random.PRNGKey(10), images, fills=("noise", "replace"))
  out, mask = np.asarray(out)[..., 0], np.asarray(mask).astype(bool)
  own = 10.0 + np.arange(b)
  replaced = np.array([np.isin(out[i][mask[i]], own).all() for i in range(b)])
  noised = np.array([not np.isin(out[i][mask[i]], own).any() for i in range(b)])
  assert (replaced ^ noised).all()  # One corruption type per image.
  assert 0.4 < replaced.mean() < 0.6
  cover = mask.mean(axis=(1, 2))
  np.testing.assert_allclose(cover[replaced].mean(), 0.313, atol=0.02)
  np.testing.assert_allclose(cover[noised].mean(), 0.511, atol=0.02)
  assert (cover[replaced] >= 0.3).all() and (cover[noised] >= 0.5).all()


def test_keeps_bfloat16():
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3), jnp.bfloat16)
  out, mask = _corrupt(jax.random.PRNGKey(11), images, fills=("noise", "zeros", "replace"))
  chex.assert_type([out, mask], [jnp.bfloat16, jnp.float32])
  chex.assert_shape([out, mask], [images.shape, images.shape[:3]])


def test_sharded_batch_matches_unsharded():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  images = jax.random.normal(jax.random.PRNGKey(0), (16, 32, 32, 3))
  key = jax.random.PRNGKey(12)
  fn = functools.partial(gmml.corrupt, fills=("noise", "replace"), ratio=0.75)
  expected = fn(key, images)
  sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
  got = jax.jit(fn)(key, sharded)
  chex.assert_trees_all_equal(got, expected)


def test_errors():
  images = jnp.zeros((4, 30, 32, 3))
  with pytest.raises(ValueError, match="not divisible by align"):
    gmml.corrupt(jax.random.PRNGKey(0), images, align=16)
  with pytest.raises(ValueError, match="not divisible by align"):
    gmml.block_mask(jax.random.PRNGKey(0), 32, 30, 0.5, align=4)
  with pytest.raises(ValueError, match="noise.*zeros.*replace"):
    gmml.corrupt(jax.random.PRNGKey(0), images, fills=("noise", "blur"))
  with pytest.raises(ValueError, match="batch"):
    gmml.corrupt(jax.random.PRNGKey(0), images[:1], fills=("replace",))
  with pytest.raises(ValueError, match="batch"):
    gmml.corrupt(jax.random.PRNGKey(0), images[:1], fills=("noise", "replace"))
