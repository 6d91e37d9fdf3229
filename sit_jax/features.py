"""Features of a pretrained backbone for your own images, computed as the frozen-feature
evaluations (k-NN, few-shot, the cached linear probe) compute them:

    from sit_jax import features
    extract = features.load("/tmp/sit_local", image_size=16, resize_mode="resize")
    feats = extract(images)  # uint8 (N, H, W, 3), or a list of uint8 (H, W, 3) -> float32 (N, D)

A list may also hold image files' bytes (open(path, "rb").read()), decoded as a k-NN run on a
folder of those files decodes them (a JPEG several times larger than the view at a reduced DCT
scale: the same file as an array gives slightly other features).

Each image goes through the evaluation view (data.eval_view: PIL, at `image_size`), ImageNet's
mean and std, the backbone (its model.standardize_input, saved with the parameters, included)
and the pooling of head.features, in one jitted function over this process's devices: the rows
that a k-NN run with the same settings computes (its feature cache): bit for bit where the
batches are the same size (batch_size = its eval_batch_size, with at least that many images),
to float rounding otherwise. k-NN and few-shot l2-normalise them (transfer.knn.l2_normalize)
before comparing them.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sit_jax import data, sharding
from sit_jax.transfer import common

RESIZE_MODES = ("center_crop", "resize")


class Extractor:
  """extract(images) -> float32 (N, D) features; see `load`."""

  def __init__(self, fn, params, mesh, *, model_config: dict, resize_mode: str,
               interpolation: str, batch_size: int):
    self._fn, self._params, self._mesh = fn, params, mesh
    self.model_config = model_config  # what built the backbone (its variant, image_size, dtype)
    self.image_size = model_config["image_size"]
    self.resize_mode, self.interpolation = resize_mode, interpolation
    self._batch_size = -(-batch_size // mesh.size) * mesh.size  # a share for every device
    size = self.image_size
    self.dim = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((1, size, size, 3),
                                                               jnp.uint8)).shape[-1]

  def __call__(self, images) -> np.ndarray:
    images = _checked_images(images)
    if not images:
      return np.zeros((0, self.dim), np.float32)
    rows = self._rows(len(images))
    batches = (self._batch(images, lo, rows) for lo in range(0, len(images), rows))
    feats, _ = common.extract_features(self._fn, self._params, batches, self._mesh)
    return feats

  def _rows(self, n: int) -> int:
    """Rows of each batch: batch_size, or for fewer images the smallest power of two of rows
    per device that holds them (a few shapes to compile, not one per call's size)."""
    per_device = -(-n // self._mesh.size)
    return min(self._batch_size, self._mesh.size * 2 ** (per_device - 1).bit_length())

  def _batch(self, images: Sequence, lo: int, b: int) -> dict:
    """Batch `images[lo:lo + b]`, padded to b rows."""
    size, chunk = self.image_size, images[lo:lo + b]
    batch = dict(image=np.zeros((b, size, size, 3), np.uint8), label=np.zeros((b,), np.int32),
                 mask=np.arange(b) < len(chunk))
    for slot, image in enumerate(chunk):
      try:
        batch["image"][slot] = data.eval_view(image, size, self.resize_mode, self.interpolation)
      except data.UnreadableImage as e:
        raise data.UnreadableImage(f"features: image {lo + slot} of the list: {e}") from None
    return batch


def load(init, *, image_size: int, weights: str = "student", resize_mode: str = "center_crop",
         interpolation: str = "bicubic_antialias", features: str = "cls", last_blocks: int = 1,
         dtype: str = "float32", batch_size: int = 256) -> Extractor:
  """The feature extractor of the backbone `init`: a pretraining workdir (its latest
  checkpoint), a checkpoint step directory or a backbone export (`python -m sit_jax.convert
  to-jax` writes one).

  Each keyword stands for the transfer config key beside it; to get a run's features, set them
  as that run's config.json does:
    weights        init_weights: 'student', or 'teacher' of a SiT or contrastive checkpoint
    image_size     data.image_size (the position embedding is resized to it)
    resize_mode    data.resize_mode: 'center_crop' (the central 87.5% square; object-centric
                   photos, ImageNet) or 'resize' (the whole image; the small-image datasets)
    interpolation  data.interpolation
    features       head.features: 'cls', 'mean' or 'cls+mean'
    last_blocks    head.last_blocks
    dtype          model.dtype: float32 here; the transfer configs compute in bfloat16 but
                   for :runlocal
    batch_size     eval_batch_size (rounded up to a multiple of the devices)
  """
  init = os.fspath(init)
  if not init:
    raise ValueError("features.load: init='' names no backbone: pass a pretraining workdir, a "
                     "checkpoint step directory or a backbone export.")
  if os.path.isfile(init):
    raise ValueError(f"features.load: {init} is a file; PyTorch and safetensors weights are "
                     f"converted first: python -m sit_jax.convert to-jax --input {init} --output "
                     "DIR, then features.load(DIR, ...).")
  if resize_mode not in RESIZE_MODES:
    raise ValueError(f"features.load: resize_mode={resize_mode!r}: one of {RESIZE_MODES}.")
  data.check_interpolation(interpolation)
  config = ml_collections.ConfigDict({"init": init, "init_weights": weights,
                                      "model": {"dtype": dtype}})
  backbone = common.load_backbone(config, image_size=image_size, drop_path_rate=0.0)
  mesh = sharding.make_mesh(devices=jax.local_devices())  # each process its own images
  params = common.place_backbone(backbone, mesh, rules=())
  fn = common.uint8_features(common.make_feature_fn(backbone.module, features, last_blocks))
  return Extractor(fn, params, mesh, model_config=backbone.model_config,
                   resize_mode=resize_mode, interpolation=interpolation, batch_size=batch_size)


def _checked_images(images) -> list[np.ndarray]:
  """`images` as a list of uint8 (H, W, 3) arrays and image files' bytes, or a one-line error
  saying what to pass."""
  if not isinstance(images, (list, tuple)):
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
      hint = ""
      if array.ndim == 3:
        hint = (" (one image? pass images[None])" if array.shape[-1] == 3 else
                " (grey images? np.repeat(images[..., None], 3, axis=-1))")
      elif array.ndim == 4 and array.shape[1] == 3:
        hint = " (channels first? images.transpose(0, 2, 3, 1))"
      raise ValueError(f"features: images of shape {array.shape}: pass uint8 (N, H, W, 3) RGB "
                       f"images, or a list of (H, W, 3) ones{hint}.")
    _check_dtype("images", array.dtype)
    return list(array)
  images = [image if isinstance(image, bytes) else np.asarray(image) for image in images]
  for i, image in enumerate(images):
    if isinstance(image, bytes):
      continue
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"features: image {i} of the list has shape {image.shape}: pass (H, W, 3) "
                       "RGB images (a grey one: np.repeat(image[..., None], 3, axis=-1)) or "
                       "image files' bytes.")
    _check_dtype(f"image {i} of the list", image.dtype)
  return images


def _check_dtype(what: str, dtype):
  if dtype != np.uint8:
    raise ValueError(f"features: {what} of dtype {dtype}: pass uint8 pixels (0..255), as the "
                     "evaluations read image files (from floats in [0, 1]: "
                     "(images * 255).round().astype(np.uint8)).")
