"""The DeiT fine-tuning augmentations, on the accelerator inside the jitted step.

  - RandAugment (timm 'rand-m9-mstd0.5-inc1'): per image, `num_ops` ops drawn uniformly with
    replacement, each applied with probability 0.5 at magnitude ~ N(m, mstd) clipped to [0, 10].
    Ops: AutoContrast, Invert, Rotate (30 deg), Posterize (increasing: 4..0 bits kept),
    Solarize (increasing: threshold 1 - m/10), SolarizeAdd (+110/255 * m/10 below 0.5),
    Color, Contrast, Brightness, Sharpness (factor 1 +- 0.9 m/10), ShearX/Y (0.3 m/10),
    TranslateX/Y (0.45 m/10 of the side). timm's Equalize (per-image histogram equalisation) is
    left out. Geometric ops fill with the ImageNet mean and sample bilinearly.
  - Random erasing (timm, mode 'pixel'): with probability p one rectangle of area
    U(0.02, 1/3) of the image and log-uniform aspect ratio in (0.3, 1/0.3) (10 tries to fit) is
    replaced by N(0, 1) noise in the normalised image.
  - Mixup / CutMix (timm, batch mode): per batch, with probability `prob`, CutMix (with
    probability `switch_prob` when both are on) or Mixup with the batch reversed;
    lam ~ Beta(alpha, alpha), corrected to the box area for CutMix; targets mixed with lam.

Every random choice is a jnp.where over computed alternatives (no Python branching on values).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sit_jax import augment

RAND_AUGMENT_OPS = ("auto_contrast", "invert", "rotate", "posterize", "solarize", "solarize_add",
                    "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                    "translate_x", "translate_y")
_OP = {name: i for i, name in enumerate(RAND_AUGMENT_OPS)}


def _blend(img, other, factor):
  return jnp.clip(other + factor * (img - other), 0.0, 1.0)


def _sharpness_degenerate(img):
  """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13) inside; the border is kept."""
  h, w = img.shape[0], img.shape[1]
  padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  total = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  smooth = (total + 4.0 * img) / 13.0
  rows = jnp.arange(h)[:, None, None]
  cols = jnp.arange(w)[None, :, None]
  inside = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return jnp.where(inside, smooth, img)


def _pixel_op(img, op, level, sign):
  """The colour op `op` (traced index) at `level` in [0, 1]; geometric ops return img."""
  u8 = jnp.floor(img * 255.0 + 0.5)
  gray = augment.rgb_to_grayscale(img)
  factor = 1.0 + sign * 0.9 * level
  lo = img.min(axis=(0, 1), keepdims=True)
  hi = img.max(axis=(0, 1), keepdims=True)
  auto = jnp.where(hi > lo, (img - lo) / jnp.where(hi > lo, hi - lo, 1.0), img)
  keep_bits = 4 - jnp.floor(level * 4.0)
  step = 2.0 ** (8.0 - keep_bits)
  candidates = {
      "auto_contrast": auto,
      "invert": 1.0 - img,
      "posterize": jnp.floor(u8 / step) * step / 255.0,
      "solarize": jnp.where(img >= 1.0 - level, 1.0 - img, img),
      "solarize_add": jnp.where(u8 < 128, jnp.clip(img + jnp.floor(110 * level) / 255.0, 0, 1),
                                img),
      "color": _blend(img, gray, factor),
      "contrast": _blend(img, jnp.mean(gray), factor),
      "brightness": _blend(img, 0.0, factor),
      "sharpness": _blend(img, _sharpness_degenerate(img), factor),
  }
  out = img
  for name, value in candidates.items():
    out = jnp.where(op == _OP[name], value, out)
  return out


def _bilinear(img, sy, sx):
  """img sampled at the points (sy, sx) (each (H', W')), edges extended."""
  h, w = img.shape[0], img.shape[1]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  at = lambda y, x: img[jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)]
  top = (1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1)
  bottom = (1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)
  return (1 - wy) * top + wy * bottom


def _affine(img, op, level, sign):
  """Rotate / shear / translate (identity for the other ops), as a map from output pixel
  (y, x) to the input point sampled bilinearly; outside points take the ImageNet mean."""
  h, w = img.shape[0], img.shape[1]
  angle = sign * level * 30.0 * math.pi / 180.0
  shear = sign * level * 0.3
  shift = sign * level * 0.45
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  dy, dx = ys - cy, xs - cx
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src = {
      "rotate": (cy + cos * dy - sin * dx, cx + sin * dy + cos * dx),
      "shear_x": (ys, xs + shear * ys),
      "shear_y": (ys + shear * xs, xs),
      "translate_x": (ys, xs + shift * w),
      "translate_y": (ys + shift * h, xs),
  }
  sy, sx = ys, xs
  for name, (y, x) in src.items():
    sy = jnp.where(op == _OP[name], y, sy)
    sx = jnp.where(op == _OP[name], x, sx)
  warped = _bilinear(img, sy, sx)
  inside = ((sy > -0.5) & (sy < h - 0.5) & (sx > -0.5) & (sx < w - 0.5))[..., None]
  return jnp.where(inside, warped, jnp.asarray(augment.IMAGENET_MEAN, jnp.float32))


def _rand_augment_one(key, img, num_ops, magnitude, magnitude_std):
  for k in jax.random.split(key, num_ops):
    k_op, k_apply, k_mag, k_sign = jax.random.split(k, 4)
    op = jax.random.randint(k_op, (), 0, len(RAND_AUGMENT_OPS))
    m = magnitude + magnitude_std * jax.random.normal(k_mag) if magnitude_std > 0 else magnitude
    level = jnp.clip(m, 0.0, 10.0) / 10.0
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    new = _pixel_op(_affine(img, op, level, sign), op, level, sign)
    img = jnp.where(jax.random.bernoulli(k_apply, 0.5), new, img)
  return img


def rand_augment(key, images01, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5):
  """RandAugment of a batch (B, H, W, 3) in [0, 1] (see the module doc for the ops)."""
  keys = jax.random.split(key, images01.shape[0])
  return jax.vmap(lambda k, x: _rand_augment_one(k, x, num_ops, magnitude, magnitude_std))(
      keys, images01)


def _erase_one(key, img, prob, area, log_ratio, attempts):
  h, w = img.shape[0], img.shape[1]
  k_do, k_area, k_ratio, k_top, k_left, k_noise = jax.random.split(key, 6)
  target = jax.random.uniform(k_area, (attempts,), minval=area[0], maxval=area[1]) * h * w
  ratio = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=log_ratio[0],
                                     maxval=log_ratio[1]))
  eh = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits)  # the first attempt that fits, as timm's loop
  eh, ew = eh[first], ew[first]
  top = jnp.floor(jax.random.uniform(k_top) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
  erase = jax.random.bernoulli(k_do, prob) & fits.any() & box
  return jnp.where(erase[..., None], jax.random.normal(k_noise, img.shape, img.dtype), img)


def random_erasing(key, images, prob: float = 0.25, *, area=(0.02, 1 / 3),
                   ratio=(0.3, 1 / 0.3), attempts: int = 10):
  """timm RandomErasing (mode 'pixel', one box) on normalised images (B, H, W, C)."""
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _erase_one(k, x, prob, area, log_ratio, attempts))(keys, images)


def mixup_cutmix(key, images, targets, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5):
  """Mixes the batch with itself reversed; returns (images, targets, lam).

  images: (B, H, W, C); targets: (B, K) (one-hot, possibly label-smoothed)."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets, jnp.ones(())
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
  b, h, w = images.shape[:3]
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  if cutmix_alpha > 0 and mixup_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)

  # timm's rand_bbox: a box of sides sqrt(1 - lam) * (H, W) around a uniform centre, clipped.
  cut = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
  cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

  other = images[::-1]
  mixed = jnp.where(use_cutmix, jnp.where(box, other, images),
                    lam_mix * images + (1.0 - lam_mix) * other)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  images = jnp.where(apply, mixed, images)
  return images, lam * targets + (1.0 - lam) * targets[::-1], lam
