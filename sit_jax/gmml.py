"""GMML corruption: random rectangular blocks filled with noise, zeros or another image.

Pure functions of a PRNG key, jittable and shardable over the batch. Each image's mask depends
only on its own key (split from `key` by batch index), not on the rest of the batch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

VALID_FILLS = ("noise", "zeros", "replace")


def _max_block_side(side: int, align: int, max_block_frac: float) -> int:
  return max(align, int(max_block_frac * side) // align * align)


def _check_align(height: int, width: int, align: int):
  if align < 1:
    raise ValueError(f"align must be >= 1, got {align}.")
  if height % align or width % align:
    raise ValueError(
        f"Image size {height}x{width} is not divisible by align={align}: block edges would fall "
        f"off the {align}-pixel grid. Use align=1 or an image size that is a multiple of {align}.")


def block_mask_with_count(key, height: int, width: int, ratio, *, align: int = 1,
                          max_block_frac: float = 0.3, max_blocks: int = 256):
  """Like `block_mask`, also returns the number of blocks drawn (int32 scalar)."""
  _check_align(height, width, align)
  max_h = _max_block_side(height, align, max_block_frac)
  max_w = _max_block_side(width, align, max_block_frac)
  # Everything is drawn in units of `align`; corners can sit on any grid cell, and blocks are
  # clipped at the border by the iota comparisons.
  draw_max = jnp.array([height // align, width // align, max_h // align, max_w // align])
  draw_min = jnp.array([0, 0, 1, 1])

  key_area, key_blocks = jax.random.split(key)
  ratio = jnp.asarray(ratio, jnp.float32)
  target = jax.random.uniform(key_area, (), jnp.float32, jnp.minimum(0.5, ratio), ratio)
  target = target * (height * width)

  rows = jax.lax.broadcasted_iota(jnp.int32, (height, 1), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)

  def cond(state):
    i, covered, _ = state
    return (covered < target) & (i < max_blocks)

  def body(state):
    i, _, mask = state
    top, left, h, w = jax.random.randint(
        jax.random.fold_in(key_blocks, i), (4,), draw_min, draw_max + draw_min) * align
    rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    mask = mask | rect
    return i + 1, jnp.sum(mask, dtype=jnp.int32), mask

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((height, width), jnp.bool_))
  count, _, mask = jax.lax.while_loop(cond, body, init)
  return mask, count


def block_mask(key, height: int, width: int, ratio, *, align: int = 1,
               max_block_frac: float = 0.3, max_blocks: int = 256) -> jax.Array:
  """(height, width) bool mask of random rectangles covering >= U(min(.5, ratio), ratio) of it.

  Blocks are added (possibly overlapping) until the target area is reached, or `max_blocks` were
  drawn. Block sides are multiples of `align` in [align, max_block_frac * side]; corners lie on
  the `align` grid. `ratio` may be a traced scalar.
  """
  return block_mask_with_count(key, height, width, ratio, align=align,
                               max_block_frac=max_block_frac, max_blocks=max_blocks)[0]


def _check_fills(fills: Sequence[str]) -> tuple[str, ...]:
  if isinstance(fills, str):
    fills = (fills,)
  fills = tuple(fills)
  unknown = [f for f in fills if f not in VALID_FILLS]
  if unknown or not fills:
    raise ValueError(f"Unknown GMML fills {unknown or fills!r}: fills must be a non-empty subset "
                     f"of {VALID_FILLS}.")
  return fills


def _cyclic_derangement(key, n: int) -> jax.Array:
  """donor[i] != i for all i: image perm[k] takes from perm[k + 1 mod n]."""
  perm = jax.random.permutation(key, n)
  return jnp.zeros((n,), perm.dtype).at[perm].set(jnp.roll(perm, -1))


def corrupt(key, images, *, ratio=0.5, replace_ratio=0.3, fills=("noise", "replace"),
            replace_prob=0.5, align=1, max_block_frac=0.3, max_blocks=256):
  """GMML-corrupts a batch of normalised images.

  Each image gets one corruption type. With "replace" and "noise"/"zeros" both in `fills`, an
  image is, with probability `replace_prob`, corrupted by blocks pasted from another image of the
  batch (area `replace_ratio`); otherwise its blocks (area `ratio`) are filled with N(0, 1) noise
  or zeros (50/50 per image when both are given). The donor is never the image itself.

  Args:
    key: PRNG key.
    images: (B, H, W, C) float images, already normalised.
    ratio: corruption ratio for noise / zeros fills.
    replace_ratio: corruption ratio for the replace fill.
    fills: subset of ("noise", "zeros", "replace").
    replace_prob: probability of the replace fill when it is mixed with noise / zeros.
    align: block grid in pixels (1: pixel level; patch size: patch-aligned blocks).
    max_block_frac: largest block side as a fraction of the image side.
    max_blocks: safety cap on the number of blocks per image.

  Returns:
    (corrupted, mask): corrupted has the shape and dtype of `images`; mask is (B, H, W) float32,
    1 where a pixel (all its channels) was corrupted.
  """
  fills = _check_fills(fills)
  b, h, w, _ = images.shape
  _check_align(h, w, align)
  has_replace = "replace" in fills
  if has_replace and b < 2:
    raise ValueError(f"The 'replace' fill needs a donor image from the same batch, but the batch "
                     f"has {b} image(s). Use a batch of >= 2 or drop 'replace' from fills.")

  k_type, k_zeros, k_masks, k_donor, k_noise = jax.random.split(key, 5)
  has_base = "noise" in fills or "zeros" in fills
  if has_replace and has_base:
    use_replace = jax.random.bernoulli(k_type, replace_prob, (b,))
  else:
    use_replace = jnp.full((b,), has_replace)
  if "noise" in fills and "zeros" in fills:
    use_zeros = jax.random.bernoulli(k_zeros, 0.5, (b,))
  else:
    use_zeros = jnp.full((b,), "zeros" in fills)

  ratios = jnp.where(use_replace, replace_ratio, ratio)
  masks = jax.vmap(lambda k, r: block_mask(
      k, h, w, r, align=align, max_block_frac=max_block_frac, max_blocks=max_blocks))(
          jax.random.split(k_masks, b), ratios)

  fill = jnp.zeros_like(images)
  if "noise" in fills:
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    fill = jnp.where(use_zeros[:, None, None, None], fill, noise)
  if has_replace:
    donors = images[_cyclic_derangement(k_donor, b)]
    fill = jnp.where(use_replace[:, None, None, None], donors, fill)
  corrupted = jnp.where(masks[..., None], fill, images)
  return corrupted, masks.astype(jnp.float32)
