"""The host crop against torchvision's RandomResizedCrop.get_params, re-implemented in numpy."""
import math

import numpy as np
import pytest
from scipy import stats

from sit_jax import data

RATIO = (3 / 4, 4 / 3)


def torchvision_get_params(rng, height, width, scale, ratio=RATIO):
  """RandomResizedCrop.get_params (torchvision 0.15+) with numpy drawing what torch draws:
  (top, left, h, w, fell_back)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = rng.integers(0, height - h + 1)
      j = rng.integers(0, width - w + 1)
      return i, j, h, w, False
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  return (height - h) // 2, (width - w) // 2, h, w, True


def torchvision_windows(height, width, scale, n, seed=0):
  rng = np.random.default_rng(seed)
  return np.array([torchvision_get_params(rng, height, width, scale) for _ in range(n)])


def our_windows(height, width, scale, n):
  """(top, left, h, w) of data.crop_window for n element seeds, drawn as the pipeline draws."""
  return np.array([data.crop_window(data._element_rng(7, 0, 1, i, 0), height, width, scale)
                   for i in range(n)])


@pytest.mark.parametrize("height,width,scale", [
    (300, 400, (0.2, 1.0)), (224, 224, (0.08, 1.0)), (120, 400, (0.05, 1.0)),
    (500, 200, (0.2, 1.0))])
def test_crop_distribution_matches_torchvision(height, width, scale):
  n = 4000
  ours = our_windows(height, width, scale, n)
  ref = torchvision_windows(height, width, scale, 20000)
  top, left, h, w = ours.T
  assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()

  def features(top, left, h, w):
    ratio = np.log(w / h)
    area = h * w / (height * width)
    # position inside the room left by the crop (0.5 for a centre crop)
    pos = (top + 0.5) / (height - h + 1)
    return ratio, area, pos

  got, want = features(top, left, h, w), features(*ref[:, :4].T)
  for name, a, b in zip(("log ratio", "area", "top"), got, want):
    assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    np.testing.assert_allclose(a.mean(), b.mean(), atol=4 * b.std() / math.sqrt(n) + 1e-3,
                               err_msg=name)
  ratio, area, _ = got
  centre = (top == (height - h) // 2) & (left == (width - w) // 2) & ((h == height) | (w == width))
  tried = ~centre  # a fitted try (the few that look like a centre crop are left out too)
  assert (area[tried] >= scale[0] - 0.02).all() and (area[tried] <= scale[1]).all()
  assert (np.abs(ratio[tried]) <= math.log(4 / 3) + 0.03).all()
  if height == width:  # log-uniform ratio: symmetric about 0
    assert abs(ratio.mean()) < 4 * ratio.std() / math.sqrt(n)


@pytest.mark.parametrize("height,width", [(100, 300), (300, 100), (300, 360), (224, 224)])
def test_fallback_is_the_centre_crop_clipped_to_the_ratio_range(height, width):
  """An area that can never fit: every try fails, torchvision's fallback."""
  want = torchvision_get_params(np.random.default_rng(0), height, width, (2.0, 3.0))
  assert want[4]
  got = our_windows(height, width, (2.0, 3.0), 5)
  np.testing.assert_array_equal(got, np.tile(want[:4], (5, 1)))


def test_random_view_is_a_pure_function_of_the_seed():
  image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
  view = lambda s: data.random_views(image, np.random.default_rng(s), 1, 32, (0.2, 1.0),
                                     "bicubic")[0]
  a, b, c = view([1, 2]), view([1, 2]), view([1, 3])
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
