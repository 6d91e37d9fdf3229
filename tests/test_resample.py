"""Crop-and-resize on the accelerator (resample.py) against PIL, and the training iterators'
resize_on='device' against resize_on='host': the same crops, pixels within one level."""
import io

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images

from sit_jax import config_check, data, resample, sharding

PHOTO = load_sample_images().images[1][:375, :500]  # a 375 x 500 photograph


def _render_one(image, window, size, interpolation, flip=False, capacity=512):
  buffer = np.zeros((1, capacity, capacity, 3), np.uint8)
  buffer[0, :image.shape[0], :image.shape[1]] = image
  out = resample.crop_resize(jnp.asarray(buffer), jnp.asarray([image.shape[:2]], jnp.int32),
                             jnp.asarray([window], jnp.float32), jnp.asarray([flip]), size,
                             interpolation)
  return np.asarray(out[0]).astype(int)


def _pil(image, window, size, interpolation):
  """PIL itself: Image.resize with a box (antialiased) or the EXTENT transform."""
  top, left, h, w = window
  box = (left, top, left + w, top + h)
  img = Image.fromarray(image)
  if interpolation == "bicubic_antialias":
    return np.asarray(img.resize((size, size), Image.BICUBIC, box=box)).astype(int)
  resample_filter = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
  return np.asarray(img.transform((size, size), Image.Transform.EXTENT, box,
                                  resample_filter)).astype(int)


@pytest.mark.parametrize("interpolation", ["bicubic_antialias", "bicubic", "bilinear"])
def test_crop_resize_equals_pil_within_one_level(interpolation):
  rng = np.random.default_rng(0)
  differing = []
  for t in range(12):
    h, w = rng.uniform(20, 375), rng.uniform(20, 500)
    window = (rng.uniform(0, 375 - h), rng.uniform(0, 500 - w), h, w)
    if t % 2:  # integer windows, as crop_window draws them at full resolution
      window = tuple(float(int(x)) for x in window)
    size = (224, 57)[t % 3 == 0]  # shrinking and enlarging
    diff = np.abs(_render_one(PHOTO, window, size, interpolation) -
                  _pil(PHOTO, window, size, interpolation))
    assert diff.max() <= 1, (window, size)
    differing.append((diff > 0).mean())
  if interpolation == "bicubic_antialias":
    # Same weights and rounding between passes: only PIL's fixed-point weights differ.
    assert np.mean(differing) < 1e-3


@pytest.mark.parametrize("interpolation", ["bicubic_antialias", "bicubic", "bilinear"])
def test_windows_at_the_image_border_equal_pil_within_one_level(interpolation):
  """The whole image and corner crops: PIL's resize drops the taps beyond the image and
  renormalises, its EXTENT transform reads the edge pixel for them: with pixel noise, any
  difference shows in the edge rows and columns."""
  image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), np.uint8)
  for window in ((0.0, 0.0, 60.0, 80.0), (0.0, 0.0, 25.0, 30.0), (35.0, 50.0, 25.0, 30.0)):
    for size in (16, 112):
      diff = np.abs(_render_one(image, window, size, interpolation, capacity=96) -
                    _pil(image, window, size, interpolation))
      assert diff.max() <= 1, (window, size, diff.max())


def test_flip_mirrors_and_scale_one_windows_copy_exactly():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (32, 96, 3), np.uint8)
  window = (3.5, 7.25, 20.0, 30.0)
  np.testing.assert_array_equal(_render_one(image, window, 16, "bicubic_antialias", flip=True),
                                _render_one(image, window, 16, "bicubic_antialias")[:, ::-1])
  # Views resized on the host travel side by side at scale 1 (data.decoded_views): exact.
  for v in range(3):
    for interpolation in resample.KERNELS:
      np.testing.assert_array_equal(
          _render_one(image, (0, 32 * v, 32, 32), 32, interpolation, capacity=96),
          image[:, 32 * v:32 * (v + 1)])


def test_weights_are_pils_window_clipped_to_the_image():
  """Shrinking 12 -> 3 pixels (scale 4): each output pixel averages the input pixels within
  2 * 4 of its centre, weights from the cubic at (i + 0.5 - centre) / 4, clipped to the
  extent (10 here: pixels 10 and 11 are padding) and normalised."""
  w = np.asarray(resample.resize_weights(12, 3, 0.0, 12.0, 10, "bicubic_antialias"))
  chex.assert_shape(w, (3, 12))
  np.testing.assert_allclose(w.sum(-1), 1, atol=1e-6)
  assert (w[:, 10:] == 0).all()

  def cubic(x):
    x = abs(x)
    return (1.5 * x - 2.5) * x * x + 1 if x < 1 else (((x - 5) * x + 8) * x - 4) * -0.5 \
        if x < 2 else 0.0

  for o, centre in enumerate((2.0, 6.0, 10.0)):
    lo, hi = max(int(centre - 8 + 0.5), 0), min(int(centre + 8 + 0.5), 10)
    want = np.zeros(12)
    want[lo:hi] = [cubic((i + 0.5 - centre) / 4) for i in range(lo, hi)]
    np.testing.assert_allclose(w[o], want / want.sum(), atol=1e-6)


def _jpeg(array, quality=95):
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="JPEG", quality=quality)
  return out.getvalue()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  """Images that take each branch of data.decoded_views at image_size 32 (buffer 96):
  small ones sent whole, a 600 x 427 JPEG decoded at 1/8 scale and then sent, a 300 x 200 PNG
  too large for the buffer (resized on the host, views side by side), a grey one."""
  root = tmp_path_factory.mktemp("mixed")
  photo = load_sample_images().images[0]
  Image.fromarray(photo[:60, :80]).save(root / "small.jpg", quality=95)
  (root / "big.jpg").write_bytes(_jpeg(photo[:, :600]))
  Image.fromarray(photo[100:300, 100:400]).save(root / "wide.png")
  Image.fromarray(photo[:70, :50, 0]).save(root / "grey.png")
  Image.fromarray(PHOTO[:90, :90]).save(root / "square.jpg", quality=95)
  return root


def test_device_views_equal_host_views(mixed_folder):
  """The same crops and flips either way; rendered on an 8-device mesh by batch_placer."""
  mesh = sharding.make_mesh()
  kw = dict(global_batch_size=8, image_size=32, seed=3, process_index=0, process_count=1)
  source = f"folder:{mixed_folder}"
  host = data.pretrain_iterator(source, None, crop_scale=(0.5, 1.0), **kw)
  device = data.pretrain_iterator(source, None, crop_scale=(0.5, 1.0), resize_on="device", **kw)
  config = ml_collections.ConfigDict(dict(resize_on="device", interpolation="bicubic_antialias"))
  place = resample.batch_placer(mesh, config, 32, data.view_keys(2))
  extents, differing = set(), []
  for _ in range(4):
    want, got = next(host), next(device)
    chex.assert_shape(got["decoded"], (8, 96, 96, 3))
    extents.update(tuple(map(int, e)) for e in got["extent"])
    placed = place(got)
    assert placed.keys() == want.keys()
    np.testing.assert_array_equal(placed["label"], want["label"])
    for key in data.view_keys(2):
      assert placed[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
      chex.assert_type(placed[key], jnp.uint8)
      diff = np.abs(np.asarray(placed[key]).astype(int) - want[key])
      # The rounding between the passes can differ by one level, which the second pass can
      # stretch to two (negative bicubic lobes).
      assert diff.max() <= 2
      differing.append((diff > 0).mean())
  assert np.mean(differing) < 1e-2
  # Every branch was taken: whole (80 x 60), DCT-shrunk (600 x 427 -> 75 x 54), host-resized.
  assert {(60, 80), (54, 75), (32, 64)} <= extents, extents


def test_device_views_of_a_train_iterator_are_single_views():
  kw = dict(global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1)
  host = next(data.train_iterator("embedded:digits", "train", **kw))
  device = next(data.train_iterator("embedded:digits", "train", resize_on="device",
                                    decoded_size=32, **kw))
  chex.assert_shape([device["decoded"], device["window"], device["flip"]],
                    [(4, 32, 32, 3), (4, 1, 4), (4, 1)])
  rendered = resample.render_views(device, 16, "bicubic_antialias", ("image",))
  assert np.abs(np.asarray(rendered["image"]).astype(int) - host["image"]).max() <= 1


def test_a_buffer_too_small_for_the_views_is_one_line():
  with pytest.raises(data.DataError, match="decoded_size 24 .* at least 32"):
    data.pretrain_iterator("embedded:digits", "train", global_batch_size=4, image_size=16,
                           seed=0, resize_on="device", decoded_size=24)
  from configs import sit_vits
  config = sit_vits.get_config("runlocal")
  config.data.decoded_size = 24
  with pytest.raises(config_check.ConfigError, match="data.decoded_size 24 cannot hold 2 views"):
    config_check.check(config)


def test_resize_on_auto_is_the_host_on_a_cpu():
  config = lambda **kw: ml_collections.ConfigDict(kw)
  assert resample.resize_on(config(resize_on="auto")) == "host"  # tests run on the CPU backend
  assert resample.resize_on(config(resize_on="device")) == "device"
  assert resample.resize_on(config()) == "host"
  assert data.resize_options(config(resize_on="auto", decoded_size=64)) == dict(
      resize_on="host", decoded_size=64)


def test_transfer_batches_resized_on_the_device_equal_the_host_ones():
  """Fine-tuning's and the augmented probe's input (transfer.common): train_batches and
  train_placer with data.resize_on='device' give the views of 'host'."""
  from configs import finetune
  from sit_jax.transfer import common
  mesh = sharding.make_mesh()
  config = finetune.get_config("runlocal")
  config.data.global_batch_size = 8
  want = next(common.train_batches(config, 0, 16))
  config.data.resize_on, config.data.decoded_size = "device", 32
  host_batch = next(common.train_batches(config, 0, 16))
  assert "decoded" in host_batch
  got = common.train_placer(config, mesh, 16)(host_batch)
  np.testing.assert_array_equal(got["label"], want["label"])
  assert np.abs(np.asarray(got["image"]).astype(int) - want["image"]).max() <= 1
