"""GMML corruption: random rectangular blocks filled with noise, zeros or another image.

Pure functions of a PRNG key, jittable and shardable over the batch. Each image's mask depends
only on its own key (split from `key` by batch index), not on the rest of the batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

VALID_FILLS = ("noise", "zeros", "replace")


def _check_align(height: int, width: int, align: int):
  if align < 1:
    raise ValueError(f"align must be >= 1, got {align}.")
  if height % align or width % align:
    raise ValueError(
        f"Image size {height}x{width} is not divisible by align={align}: block edges would fall "
        f"off the {align}-pixel grid. Use align=1 or an image size that is a multiple of {align}.")


def _round_half_even(x, align: int):
  """Python's round(x / align) for ints x >= 0, ties to even, in exact integer arithmetic."""
  q, r = x // align, x % align
  return q + ((2 * r > align) | ((2 * r == align) & (q % 2 == 1))).astype(x.dtype)


def _draw_block(key, height: int, width: int, align: int = 1, max_block_frac: float = 0.3):
  """(top, left, h, w) of one block, before clipping at the border, drawn as the authors draw.

  numpy's randint excludes its upper bound: the corner is (randint(0, side - align) // align) *
  align, on any grid cell but the last; the side is round(randint(align, int(max_block_frac *
  side)) / align) * align, ties to even as Python rounds. Their min(side, H - corner) is the
  clipping that the mask's iota comparisons do.
  """
  cells = jnp.array([max(height // align - 1, 1), max(width // align - 1, 1)])
  side_max = jnp.array([max(int(max_block_frac * height), align + 1),
                        max(int(max_block_frac * width), align + 1)])
  k_corner, k_side = jax.random.split(key)
  top, left = jax.random.randint(k_corner, (2,), 0, cells) * align
  h, w = _round_half_even(jax.random.randint(k_side, (2,), align, side_max), align) * align
  return top, left, h, w


def coverage_ceiling(height: int, width: int, align: int = 1,
                     max_block_frac: float = 0.3) -> float:
  """The largest fraction of a height x width image that any number of blocks can cover.

  Corners avoid the last grid cell (the authors' rule, `_draw_block`), so a row or column is
  covered only up to the last corner plus the longest side. Below 1 where the longest side is a
  single cell: 16 px images with align 4 reach at most (12 / 16)^2 = 0.5625.
  """
  _check_align(height, width, align)

  def reach(side):
    last_corner = (max(side // align - 1, 1) - 1) * align
    longest = round((max(int(max_block_frac * side), align + 1) - 1) / align) * align
    return min(side, last_corner + longest) / side

  return reach(height) * reach(width)


def block_mask_with_count(key, height: int, width: int, ratio, *, align: int = 1,
                          max_block_frac: float = 0.3, max_blocks: int = 256):
  """Like `block_mask`, also returns the number of blocks drawn (int32 scalar)."""
  _check_align(height, width, align)
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
    top, left, h, w = _draw_block(jax.random.fold_in(key_blocks, i), height, width, align,
                                  max_block_frac)
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
  drawn. As in the authors' code, a side is a pixel count uniform in [align, int(max_block_frac *
  side)) rounded to the nearest multiple of `align` (at 224 px: 1..66 unaligned; 16/32/48/64
  with probabilities 8/17/15/11 of 51 at align 16), and a corner lies on the `align` grid, on any
  cell but the last. `ratio` may be a traced scalar.
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


def donor_group_size(donor_group: int, per_view: int) -> int:
  """Images per donor group: `donor_group`, or the whole view for 0 or more than the view."""
  return min(donor_group, per_view) if donor_group else per_view


def corrupt(key, images, *, ratio=0.5, replace_ratio=0.3, fills=("noise", "replace"),
            replace_prob=0.5, align=1, max_block_frac=0.3, max_blocks=256, donor_group=0):
  """GMML-corrupts a batch of normalised images.

  Each image gets one corruption type. With "replace" and "noise"/"zeros" both in `fills`, an
  image is, with probability `replace_prob`, corrupted by blocks pasted from another image of its
  view's batch (area `replace_ratio`); otherwise its blocks (area `ratio`) are filled with N(0, 1)
  noise or zeros (50/50 per image when both are given).

  The donor is drawn, as in the authors' code, within the view: `images` may stack V views of the
  same B source images on a leading axis (pretrain.corrupt_views passes both views), and an image
  of view v takes blocks from another image of view v: never from itself, nor from another view
  of its own source image, whose pixels show the same scene. `donor_group` > 0 narrows the donors
  further to groups of that many consecutive images of a view, as the authors' code does per GPU
  (its batch of 64 per view): a donor group that lies within one device's share of the batch is
  copied on that device, where the whole view would be all-gathered to every device.

  Args:
    key: PRNG key.
    images: (B, H, W, C) or (V, B, H, W, C) float images, already normalised.
    ratio: corruption ratio for noise / zeros fills.
    replace_ratio: corruption ratio for the replace fill.
    fills: subset of ("noise", "zeros", "replace").
    replace_prob: probability of the replace fill when it is mixed with noise / zeros.
    align: block grid in pixels (1: pixel level; patch size: patch-aligned blocks).
    max_block_frac: largest block side as a fraction of the image side.
    max_blocks: safety cap on the number of blocks per image.
    donor_group: images per donor group (0 or >= B: each view's whole batch); must divide B.

  Returns:
    (corrupted, mask): corrupted has the shape and dtype of `images`; mask has its shape without
    the channels, float32, 1 where a pixel (all its channels) was corrupted. The random draws
    depend only on the key and the image's index in view-major order (view, then image).
  """
  fills = _check_fills(fills)
  if images.ndim not in (4, 5):
    raise ValueError(f"images must be (B, H, W, C) or (V, B, H, W, C), got shape {images.shape}.")
  views = images.shape[:-3]  # (B,) or (V, B)
  per_view, h, w = views[-1], *images.shape[-3:-1]
  n = math.prod(views)
  _check_align(h, w, align)
  has_replace = "replace" in fills
  group = donor_group_size(donor_group, per_view)
  if has_replace and per_view % group:
    raise ValueError(f"gmml.donor_group {donor_group} does not divide the {per_view} images of "
                     f"each view: choose a divisor of {per_view}, or 0 for the whole view.")
  if has_replace and group < 2:
    raise ValueError(f"The 'replace' fill needs a donor image from the same view's batch, but "
                     f"each donor group has {group} image(s). Use >= 2 images per view and "
                     f"gmml.donor_group (or drop 'replace' from fills).")

  k_type, k_zeros, k_masks, k_donor, k_noise = jax.random.split(key, 5)
  has_base = "noise" in fills or "zeros" in fills
  if has_replace and has_base:
    use_replace = jax.random.bernoulli(k_type, replace_prob, (n,)).reshape(views)
  else:
    use_replace = jnp.full(views, has_replace)
  if "noise" in fills and "zeros" in fills:
    use_zeros = jax.random.bernoulli(k_zeros, 0.5, (n,)).reshape(views)
  else:
    use_zeros = jnp.full(views, "zeros" in fills)

  ratios = jnp.where(use_replace, replace_ratio, ratio)
  draw_mask = _per_image(lambda k, r: block_mask(
      k, h, w, r, align=align, max_block_frac=max_block_frac, max_blocks=max_blocks), len(views))
  masks = draw_mask(jax.random.split(k_masks, views), ratios)

  per_image = lambda x: x[..., None, None, None]
  fill = jnp.zeros_like(images)
  if "noise" in fills:
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    fill = jnp.where(per_image(use_zeros), fill, noise)
  if has_replace:
    donors = _donors_within_groups(k_donor, images, group)
    fill = jnp.where(per_image(use_replace), donors, fill)
  corrupted = jnp.where(masks[..., None], fill, images)
  return corrupted, masks.astype(jnp.float32)


def _donors_within_groups(key, images, group: int) -> jax.Array:
  """Each image's donor: another image of its group of `group` consecutive images of its view (a
  cyclic derangement per group). The copy is indexed within groups, so a group inside one
  device's share of the batch never leaves that device."""
  views = images.shape[:-3]
  groups = math.prod(views) // group
  grouped = images.reshape(*views[:-1], views[-1] // group, group, *images.shape[-3:])
  index = jax.vmap(_cyclic_derangement, in_axes=(0, None))(jax.random.split(key, groups), group)
  index = index.reshape(*grouped.shape[:-4], group)
  take = _per_image(lambda group_images, i: group_images[i], grouped.ndim - 4)
  return take(grouped, index).reshape(images.shape)


def _per_image(fn, batch_dims: int):
  """fn vmapped over `batch_dims` leading axes: (B,) or (V, B) without merging them, which would
  move a sharded batch between devices."""
  for _ in range(batch_dims):
    fn = jax.vmap(fn)
  return fn
