"""Photometric augmentation on the accelerator, inside the jitted step.

The host pipeline (data.py) only crops, resizes and flips; colour jitter, grayscale, Gaussian blur
and solarisation run here, per example with its own PRNG key (split + vmap), so they cost a
negligible fraction of the step and never limit the input rate.

Semantics follow torchvision's tensor ops on images in [0, 1]:
  ColorJitter: brightness / contrast / saturation factors ~ U(max(0, 1 - x), 1 + x), hue shift
    ~ U(-h, h) turns in HSV; the four ops run in a random order per image, each result clipped.
  RandomGrayscale: ITU-R 601 luma copied into the 3 channels.
  GaussianBlur (DINO/SiT): sigma ~ U(0.1, 2.0), separable, reflect padding, kernel side about
    0.1 * image side (23 at 224, as DINO), odd.
  Solarize: x -> 1 - x where x >= 0.5 (PIL threshold 128).
Random choices never branch in Python: every op is computed and selected with jnp.where.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def normalize(images01):
  """(..., H, W, 3) in [0, 1] -> ImageNet mean/std normalised."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (jnp.asarray(images01, jnp.float32) - mean) / std


def denormalize(images):
  """Inverse of `normalize` (for pictures); not clipped."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return jnp.asarray(images, jnp.float32) * std + mean


# --------------------------------------------------------------------------------------------
# Single-image ops: img (H, W, 3) float in [0, 1]; factors may be traced scalars.
# --------------------------------------------------------------------------------------------
def rgb_to_grayscale(img):
  """ITU-R 601 luma, (H, W, 3) -> (H, W, 1)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[..., None]


def grayscale(img):
  return jnp.broadcast_to(rgb_to_grayscale(img), img.shape)


def _blend(img1, img2, ratio):
  return jnp.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def adjust_brightness(img, factor):
  return jnp.clip(img * factor, 0.0, 1.0)


def adjust_contrast(img, factor):
  mean = jnp.mean(rgb_to_grayscale(img))
  return _blend(img, mean, factor)


def adjust_saturation(img, factor):
  return _blend(img, rgb_to_grayscale(img), factor)


def rgb_to_hsv(img):
  """torchvision's _rgb2hsv on the last axis; h in [0, 1)."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  ones = jnp.ones_like(maxc)
  s = cr / jnp.where(eqc, ones, maxc)
  cr_div = jnp.where(eqc, ones, cr)
  rc = (maxc - r) / cr_div
  gc = (maxc - g) / cr_div
  bc = (maxc - b) / cr_div
  is_r = maxc == r
  is_g = (maxc == g) & ~is_r
  is_b = ~is_r & (maxc != g)
  h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv):
  """torchvision's _hsv2rgb on the last axis."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)

  def sector(values):  # values[k] is the channel's value in hue sector k
    out = values[5]
    for k in range(4, -1, -1):
      out = jnp.where(i == k, values[k], out)
    return out

  r = sector([v, q, p, p, t, v])
  g = sector([t, v, v, q, p, p])
  b = sector([p, p, t, v, v, q])
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(img, shift):
  """Rotates the hue by `shift` turns (torchvision allows [-0.5, 0.5]; any value works here)."""
  hsv = rgb_to_hsv(img)
  h = jnp.mod(hsv[..., 0] + shift, 1.0)
  return jnp.clip(hsv_to_rgb(hsv.at[..., 0].set(h)), 0.0, 1.0)


def solarize(img, threshold=0.5):
  return jnp.where(img >= threshold, 1.0 - img, img)


def blur_kernel_size(side: int) -> int:
  """Odd kernel side, ~10% of the image side (23 at 224, as DINO), at least 3."""
  return max(3, int(0.1 * side) // 2 * 2 + 1)


def _gaussian_taps(sigma, size):
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def _reflect_blur_matrix(taps, n):
  """(n, n) matrix M with M @ x = x blurred by `taps` with reflect padding (torchvision's)."""
  size = taps.shape[0]
  source = np.arange(n)[:, None] + np.arange(size)[None, :] - size // 2
  source = np.abs(source)  # reflect at the start (index -1 -> 1) ...
  source = np.where(source > n - 1, 2 * (n - 1) - source, source)  # ... and at the end.
  # A static one-hot (n, size, n) contracted with the traced taps: no gather, no scatter.
  one_hot = np.eye(n, dtype=np.float32)[source]
  return jnp.einsum("k,ikj->ij", taps, one_hot, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(img, sigma, kernel_size=None):
  """Separable Gaussian blur of one (H, W, C) image, torchvision-style (reflect padding,
  truncated kernel renormalised). `sigma` may be traced; the kernel size is static.

  Each pass is a product with a banded (side x side) matrix: the taps differ per example, and
  a vmapped per-example convolution ran ~15x slower on XLA:CPU than these matmuls."""
  h, w = img.shape[-3], img.shape[-2]
  if kernel_size is None:
    kernel_size = blur_kernel_size(min(h, w))
  # Reflect padding needs the radius to be smaller than the side.
  kernel_size = min(kernel_size, 2 * (min(h, w) - 1) + 1)
  if kernel_size < 3:
    return img
  taps = _gaussian_taps(jnp.asarray(sigma, jnp.float32), kernel_size)
  highest = jax.lax.Precision.HIGHEST
  out = jnp.einsum("ih,...hwc->...iwc", _reflect_blur_matrix(taps, h), img, precision=highest)
  return jnp.einsum("jw,...hwc->...hjc", _reflect_blur_matrix(taps, w), out, precision=highest)


# --------------------------------------------------------------------------------------------
# The random pipeline.
# --------------------------------------------------------------------------------------------
# The uniform numbers in [0, 1) each image draws, in one call of the PRNG per image: each call is
# a loop in XLA:CPU's program, and the eleven calls per image before were half the pipeline's
# compile time (1.25 s -> 0.62 s for two views on 8 CPU devices).
_JITTER_FACTORS = slice(0, 4)  # brightness, contrast, saturation, hue: ColorJitter's factors
_JITTER_ORDER = slice(4, 8)    # the op order: the ranks of these (a uniform random permutation)
_APPLY_JITTER, _APPLY_GRAYSCALE, _BLUR_SIGMA, _APPLY_BLUR, _APPLY_SOLARIZE = range(8, 13)
NUM_DRAWS = 13


def _scale(u, lo, hi):
  """A uniform draw u in [0, 1) -> U(lo, hi)."""
  return lo + (hi - lo) * u


_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def _blend_op(img, op, factor):
  """Brightness, contrast or saturation (selected by the traced `op`): all three blend the
  image with something darker or greyer: zeros, the mean luma, or the luma image."""
  gray = rgb_to_grayscale(img)
  other = jnp.where(op == _BRIGHTNESS, 0.0, jnp.where(op == _CONTRAST, jnp.mean(gray), gray))
  return _blend(img, other, factor)


def _jitter_draws(draws, brightness, contrast, saturation, hue):
  """ColorJitter's ([enabled op], [its factor], order) from an image's `draws`: the factor of
  op j (brightness, contrast, saturation, hue) is drawn from draws[j], and the ops are applied
  in the order of the ranks of draws[4:8] (`order[place]` indexes the enabled ops)."""
  ops, factors = [], []  # the enabled ops; a magnitude of 0 disables one, as in torchvision
  u = draws[_JITTER_FACTORS]
  for op, mag in ((_BRIGHTNESS, brightness), (_CONTRAST, contrast), (_SATURATION, saturation)):
    if mag > 0:
      ops.append(op)
      factors.append(_scale(u[op], max(0.0, 1.0 - mag), 1.0 + mag))
  if hue > 0:
    ops.append(_HUE)
    factors.append(_scale(u[_HUE], -hue, hue))
  order = jnp.argsort(draws[_JITTER_ORDER][:len(ops)])
  return ops, factors, order


def _color_jitter(draws, img, brightness, contrast, saturation, hue):
  """torchvision ColorJitter: factors drawn once, the enabled ops applied in a random order.

  Under vmap every branch is computed, so rather than evaluating all ops at each of the four
  places, the three blends run as one selected blend per place and the (costly) HSV hue shift
  runs once, between the blends drawn before it and those drawn after it.
  """
  ops, factors, order = _jitter_draws(draws, brightness, contrast, saturation, hue)
  if not ops:
    return img

  def pick(values, i):  # values[i] for a traced i, without a gather (explicit sharding)
    out = values[0]
    for j in range(1, len(values)):
      out = jnp.where(i == j, values[j], out)
    return out

  drawn_ops = [pick(ops, order[place]) for place in range(len(ops))]
  drawn_factors = [pick(factors, order[place]) for place in range(len(ops))]
  # ops are listed with the hue last, so its place is where `order` holds the last index.
  hue_place = len(ops)
  if hue > 0:
    hue_place = sum(jnp.where(order[place] == len(ops) - 1, place, 0)
                    for place in range(len(ops)))
  for place in range(len(ops)):
    img = jnp.where(place < hue_place, _blend_op(img, drawn_ops[place], drawn_factors[place]), img)
  if hue > 0:
    img = adjust_hue(img, factors[-1])
    for place in range(len(ops)):
      img = jnp.where(place > hue_place,
                      _blend_op(img, drawn_ops[place], drawn_factors[place]), img)
  return img


def _may_apply(prob) -> bool:
  """Whether an op with this probability is traced: a per-view array may apply it somewhere."""
  return not isinstance(prob, (int, float)) or prob > 0


def _photometric_one(key, img, *, jitter_prob, brightness, contrast, saturation, hue,
                     grayscale_prob, blur_prob, blur_sigma, solarize_prob):
  """One image. A probability is a Python number, or a traced scalar where views differ."""
  draws = jax.random.uniform(key, (NUM_DRAWS,), jnp.float32)

  def maybe(slot, prob, new, old):
    if isinstance(prob, (int, float)) and prob >= 1:
      return new
    return jnp.where(draws[slot] < prob, new, old)

  if _may_apply(jitter_prob):
    img = maybe(_APPLY_JITTER, jitter_prob,
                _color_jitter(draws, img, brightness, contrast, saturation, hue), img)
  if _may_apply(grayscale_prob):
    img = maybe(_APPLY_GRAYSCALE, grayscale_prob, grayscale(img), img)
  if _may_apply(blur_prob):
    sigma = _scale(draws[_BLUR_SIGMA], blur_sigma[0], blur_sigma[1])
    img = maybe(_APPLY_BLUR, blur_prob, gaussian_blur(img, sigma), img)
  if _may_apply(solarize_prob):
    img = maybe(_APPLY_SOLARIZE, solarize_prob, solarize(img), img)
  return jnp.clip(img, 0.0, 1.0)


def _like_batch_axes(keys, images):
  # Under explicit-axis sharding vmap needs the per-example keys sharded like the images.
  sharding = jax.typeof(images).sharding
  spec = tuple(sharding.spec)[:keys.ndim]
  if any(axis is not None for axis in spec):
    keys = jax.sharding.reshard(keys, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*spec)))
  return keys


_PROBABILITIES = ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob")


def photometric_views(view_keys: Sequence[jax.Array], views01, view_settings: Sequence[dict]):
  """Augments V views of a batch, (V, B, H, W, 3) in [0, 1] -> same, float32; view v with key
  `view_keys[v]` and the keyword arguments of `photometric` in `view_settings[v]`.

  Each view draws what `photometric(view_keys[v], views01[v], **view_settings[v])` draws, but
  the views share one trace of the pipeline: a preset's views differ in their probabilities
  only, which become per-view arrays (an op is then computed for every view and applied where
  its draw falls under the view's probability, which is what a probability of 0 or 1 did too).
  One copy of the pipeline instead of one per view takes a third off its compile time.
  """
  views01 = jnp.asarray(views01, jnp.float32)
  num_views, batch = views01.shape[:2]
  if not len(view_keys) == len(view_settings) == num_views:
    raise ValueError(f"{num_views} views need as many keys and settings; got "
                     f"{len(view_keys)} and {len(view_settings)}")
  settings = [{**kw, "blur_sigma": tuple(kw["blur_sigma"])} for kw in view_settings]
  shared = {k: v for k, v in settings[0].items() if k not in _PROBABILITIES}
  for view, kw in enumerate(settings[1:], 1):
    differ = sorted(k for k in shared if kw[k] != shared[k])
    if differ:
      raise ValueError(f"views 0 and {view} may differ in their probabilities only; they also "
                       f"differ in {differ}")
  per_view = {}
  for name in _PROBABILITIES:
    values = [kw[name] for kw in settings]
    if len(set(values)) == 1:
      shared[name] = values[0]  # a Python number: an op that is off is not traced
    else:
      per_view[name] = jnp.asarray(values, jnp.float32)
  keys = jnp.stack([jax.random.split(k, batch) for k in view_keys])
  keys = _like_batch_axes(keys, views01)
  one = lambda key, img, probabilities: _photometric_one(key, img, **shared, **probabilities)
  return jax.vmap(jax.vmap(one, in_axes=(0, 0, None)))(keys, views01, per_view)


def photometric(key, images01, *, jitter_prob: float, brightness: float, contrast: float,
                saturation: float, hue: float, grayscale_prob: float, blur_prob: float,
                blur_sigma: Sequence[float] = (0.1, 2.0), solarize_prob: float):
  """SiT/DINO photometric augmentation of a batch (B, H, W, 3) in [0, 1] -> same, float32.

  Order as in the authors' transforms: ColorJitter (random op order per image) with
  `jitter_prob`, grayscale, Gaussian blur, solarize; each with its own probability per example.
  The probabilities and magnitudes are static Python numbers (ops that are off are not traced).
  """
  settings = dict(jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
                  saturation=saturation, hue=hue, grayscale_prob=grayscale_prob,
                  blur_prob=blur_prob, blur_sigma=blur_sigma, solarize_prob=solarize_prob)
  return photometric_views([key], jnp.asarray(images01)[None], [settings])[0]


_OFF = dict(jitter_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
            grayscale_prob=0.0, blur_prob=0.0, blur_sigma=(0.1, 2.0), solarize_prob=0.0)


def view_augment_config(preset: str, view: int) -> dict:
  """Keyword arguments of `photometric` for view 1 or 2 of a preset: "sit", "gmml" or "none"."""
  if view not in (1, 2):
    raise ValueError(f"view must be 1 or 2, got {view}")
  cfg = dict(_OFF)
  if preset == "sit":
    cfg.update(jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
               grayscale_prob=0.2)
    if view == 1:
      cfg.update(blur_prob=1.0, solarize_prob=0.0)
    else:
      cfg.update(blur_prob=0.1, solarize_prob=0.2)
  elif preset == "gmml":
    cfg.update(jitter_prob=0.3, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.01,
               blur_prob=0.1)
  elif preset != "none":
    raise ValueError(f"unknown augmentation preset {preset!r}; use 'sit', 'gmml' or 'none'")
  return cfg
