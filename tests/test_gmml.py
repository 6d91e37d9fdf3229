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
_corrupt = jax.jit(gmml.corrupt, static_argnames=("fills", "align", "max_block_frac", "max_blocks",
                                                  "donor_group"))


def _as_views(images, num_views=2):
  """(V * B, ...) -> (V, B, ...): V views of the same B sources, stacked as pretrain stacks them."""
  return images.reshape(num_views, -1, *images.shape[1:])


def _flat(*arrays):
  """(V, B, ...) -> (V * B, ...) numpy arrays, for reading donors by image index."""
  return [np.asarray(a).reshape(-1, *a.shape[2:]) for a in arrays]

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


def test_typed_keys_draw_as_raw_keys():
  """jax.random.key(s) and PRNGKey(s) hold the same bits: the same corruption, stacked or flat."""
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
  for batch in (images, _as_views(images)):
    chex.assert_trees_all_equal(_corrupt(jax.random.key(1), batch),
                                _corrupt(jax.random.PRNGKey(1), batch))


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


def authors_block_mask(rng, size, ratio, align, max_block_sz=0.3):
  """GMML_drop_rand_patches' mask (Sara-Ahmed/SiT datasets_utils.py), numpy, square image:
  numpy's randint excludes its upper bound, Python's round ties to even."""
  mask = np.zeros((size, size), bool)
  n_drop_pix = rng.uniform(min(0.5, ratio), ratio) * size * size
  mx_blk = int(size * max_block_sz)
  blocks = 0
  while mask.sum() < n_drop_pix:
    rnd_r = (rng.randint(0, size - align) // align) * align
    rnd_c = (rng.randint(0, size - align) // align) * align
    rnd_h = round(min(rng.randint(align, mx_blk), size - rnd_r) / align) * align
    rnd_w = round(min(rng.randint(align, mx_blk), size - rnd_c) / align) * align
    mask[rnd_r:rnd_r + rnd_h, rnd_c:rnd_c + rnd_w] = True
    blocks += 1
  return mask, blocks


def authors_side_probabilities(size, align, max_block_sz=0.3):
  """P(side = s) by enumerating the authors' round(randint(align, int(0.3 size)) / align)."""
  sides = [round(x / align) * align for x in range(align, int(size * max_block_sz))]
  values, counts = np.unique(sides, return_counts=True)
  return dict(zip(values.tolist(), (counts / len(sides)).tolist()))


def _chi2_pvalue(observed, expected):
  from scipy import stats
  return stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), len(observed) - 1)


@functools.partial(jax.jit, static_argnames=("size", "n", "align"))
def _blocks(key, *, size, n, align):
  return jax.vmap(lambda k: jnp.stack(gmml._draw_block(k, size, size, align)))(
      jax.random.split(key, n))


def test_authors_side_probabilities_at_224_align_16():
  probs = authors_side_probabilities(224, 16)
  np.testing.assert_allclose([probs[s] for s in (16, 32, 48, 64)],
                             np.array([8, 17, 15, 11]) / 51)
  assert authors_side_probabilities(224, 1) == {s: 1 / 66 for s in range(1, 67)}


@pytest.mark.parametrize("size,align", [(224, 16), (224, 1), (112, 8), (32, 4)])
def test_block_sides_and_corners_follow_the_authors_rule(size, align):
  n = 200_000
  top, left, h, w = np.asarray(_blocks(jax.random.PRNGKey(13), size=size, n=n, align=align)).T
  want = authors_side_probabilities(size, align)
  cells = np.arange(0, size - align, align)  # corners: every grid cell but the last, uniformly.
  for draws, probs in ((h, want), (w, want), (top, dict.fromkeys(cells.tolist(), 1 / len(cells))),
                       (left, dict.fromkeys(cells.tolist(), 1 / len(cells)))):
    values, counts = np.unique(draws, return_counts=True)
    np.testing.assert_array_equal(values, sorted(probs))
    p = np.array([probs[v] for v in values])
    if len(p) <= 4:  # each probability within 3 sigma
      assert (np.abs(counts / n - p) < 3 * np.sqrt(p * (1 - p) / n)).all(), (counts / n, p)
    assert _chi2_pvalue(counts, n * p) > 1e-3, (values, counts / n, p)


def test_unaligned_extremes_at_224():
  """randint(1, 67) and randint(0, 223): sides 1..66, corners 0..222."""
  top, left, h, w = np.asarray(_blocks(jax.random.PRNGKey(14), size=224, n=100_000, align=1)).T
  assert h.min() == w.min() == 1 and h.max() == w.max() == 66
  assert top.min() == left.min() == 0 and top.max() == left.max() == 222


@pytest.mark.parametrize("align,ref_blocks", [(16, 22.8), (1, 40)])
def test_blocks_per_image_match_the_authors_function(align, ref_blocks):
  """Masks at 224 px, p 0.5, against the authors' function run on the same number of images."""
  n = 256
  rng = np.random.RandomState(0)
  ref = [authors_block_mask(rng, 224, 0.5, align) for _ in range(n)]
  ref_cover = np.mean([m.mean() for m, _ in ref])
  ref_count = np.mean([c for _, c in ref])
  np.testing.assert_allclose(ref_count, ref_blocks, rtol=0.05)  # the SPEC's measured figures.
  masks, counts = _masks_and_counts(jax.random.PRNGKey(15), 0.5, size=224, n=n, align=align)
  counts = np.asarray(counts)
  np.testing.assert_allclose(counts.mean(), ref_count, rtol=0.05)
  np.testing.assert_allclose(np.asarray(masks, np.float64).mean(), ref_cover, atol=0.005)


@pytest.mark.parametrize("size,align,ceiling", [
    (16, 4, (12 / 16) ** 2),   # 1-cell blocks, corners 0..8: rows 0..11.
    (20, 4, (16 / 20) ** 2),   # longest side 5 px rounds to 4.
    (24, 8, (16 / 24) ** 2),
    (16, 2, 1.0), (32, 4, 1.0)])
def test_coverage_ceiling_is_what_any_number_of_blocks_reaches(size, align, ceiling):
  assert gmml.coverage_ceiling(size, size, align) == pytest.approx(ceiling)
  if ceiling == 1:
    return
  # Blocks asked to cover everything: targets U(0.5, 1) above the ceiling draw all 256 blocks,
  # whose union saturates at the ceiling, never beyond.
  masks, counts = _masks_and_counts(jax.random.PRNGKey(16), 1.0, size=size, n=32, align=align)
  cover = np.asarray(masks, np.float64).mean(axis=(1, 2))
  capped = np.asarray(counts) == 256
  assert capped.any() and cover.max() == pytest.approx(ceiling)
  np.testing.assert_allclose(cover[capped], ceiling)


def test_a_ratio_out_of_reach_is_named():
  import ml_collections
  from sit_jax import pretrain
  config = ml_collections.ConfigDict({
      "experiment": "sit", "data": {"image_size": 16},
      "gmml": {"ratio": 0.75, "replace_ratio": 0.3, "fills": ("noise", "replace"), "align": 4}})
  message = pretrain.warn_if_ratio_out_of_reach(config)
  assert "gmml.ratio=0.75: GMML blocks cover at most 0.5625 of a 16 px image" in message
  assert "replace_ratio" not in message
  config.gmml.fills = ("replace",)
  assert pretrain.warn_if_ratio_out_of_reach(config) is None
  config.gmml.replace_ratio = 0.6
  assert "gmml.replace_ratio=0.6:" in pretrain.warn_if_ratio_out_of_reach(config)
  config.gmml.align = 1
  assert pretrain.warn_if_ratio_out_of_reach(config) is None


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


def _donors(out, mask):
  """Donor index of each image, read from its replaced pixels (image i is constant 10 + i)."""
  donors = []
  for i in range(len(out)):
    values = np.unique(out[i][mask[i]])
    assert len(values) == 1, "one donor per image"
    donors.append(int(values[0] - 10))
  return np.array(donors)


@pytest.mark.parametrize("num_views", [1, 2])
def test_replace_takes_pixels_from_another_image(num_views):
  b = 16
  images = _const_images(b, 32, 32, 3)
  stacked = images if num_views == 1 else _as_views(images, num_views)
  out, mask = _corrupt(jax.random.PRNGKey(5), stacked, fills=("replace",))
  out, mask = _flat(out, mask) if num_views > 1 else (np.asarray(out), np.asarray(mask))
  mask, images = mask.astype(bool), np.asarray(images)
  cover = mask.mean(axis=(1, 2))
  assert (cover >= 0.3).all() and (cover < 0.3 + 0.1).all()
  np.testing.assert_array_equal(out[~mask], images[~mask])
  donors = _donors(out, mask)
  assert (donors != np.arange(b)).all(), "an image must never be its own donor"
  n = b // num_views
  for v in range(num_views):  # A permutation of each view's batch.
    assert sorted(donors[v * n:(v + 1) * n]) == list(range(v * n, (v + 1) * n))


def test_donor_groups_keep_each_donor_within_its_group():
  """donor_group=4: a derangement of every 4 consecutive images of each view (the authors'
  per-GPU batch); a donor_group of the view's batch or more is 0, the whole view."""
  b, group = 16, 4
  images = _as_views(_const_images(2 * b, 16, 16))
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    out, mask = _flat(*_corrupt(key, images, fills=("replace",), donor_group=group))
    donors = _donors(out, mask.astype(bool))
    own = np.arange(2 * b)
    assert (donors != own).all()
    for start in range(0, 2 * b, group):
      assert sorted(donors[start:start + group]) == list(range(start, start + group))
    whole_view = _corrupt(key, images, fills=("replace",), donor_group=0)
    chex.assert_trees_all_equal(_corrupt(key, images, fills=("replace",), donor_group=b),
                                whole_view)
    chex.assert_trees_all_equal(_corrupt(key, images, fills=("replace",), donor_group=64),
                                whole_view)
  with pytest.raises(ValueError, match="gmml.donor_group 5 does not divide the 16 images"):
    _corrupt(key, images, fills=("replace",), donor_group=5)


@pytest.mark.parametrize("b", [2, 3, 8])
def test_replace_donors_come_from_the_same_view_and_another_source_image(b):
  """Views stacked as pretrain stacks them: view 1 (images 0..b-1) and view 2 of the same
  sources. A donor is in its image's view, and is neither the image nor its other view."""
  images = _as_views(_const_images(2 * b, 16, 16))
  own = np.arange(2 * b)
  for seed in range(20):
    out, mask = _corrupt(jax.random.PRNGKey(seed), images, fills=("replace",))
    donors = _donors(*_flat(out, mask.astype(bool)))
    assert (donors // b == own // b).all(), "donor from the other view"
    assert (donors % b != own % b).all(), "donor is the same source image"
  again, mask_again = _corrupt(jax.random.PRNGKey(19), images, fills=("replace",))
  chex.assert_trees_all_equal((out, mask), (again, mask_again))


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
  views = _as_views(jnp.concatenate([images, images[::-1]]))
  expected = fn(key, views)
  got = jax.jit(fn)(key, jax.device_put(views, NamedSharding(mesh, P(None, "data"))))
  chex.assert_trees_all_equal(got, expected)


def test_draws_depend_on_the_view_major_index_only():
  """Stacked views (V, B) draw each image's mask and noise as the flat batch (V * B) does at the
  same view-major index: the layout of the batch does not change the corruption."""
  images = jax.random.normal(jax.random.PRNGKey(3), (16, 16, 16, 3))
  key = jax.random.PRNGKey(4)
  flat = _corrupt(key, images, fills=("noise", "zeros"), align=4)
  stacked = _flat(*_corrupt(key, _as_views(images), fills=("noise", "zeros"), align=4))
  chex.assert_trees_all_equal(stacked, [np.asarray(x) for x in flat])


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
  with pytest.raises(ValueError, match="1 image"):
    gmml.corrupt(jax.random.PRNGKey(0), _as_views(images[:2]), fills=("noise", "replace"))
  with pytest.raises(ValueError, match=r"\(B, H, W, C\) or \(V, B, H, W, C\), got shape \(30, 32, 3\)"):
    gmml.corrupt(jax.random.PRNGKey(0), images[0], fills=("noise",))
