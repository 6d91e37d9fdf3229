"""Crop-and-resize on the accelerator: the random-resized-crop views of training batches.

With `data.resize_on = "device"` the host only decodes: each image goes to the accelerator once,
top-left in a (C, C, 3) uint8 buffer, with the window of every view in its pixels (data.py). Here
each view is cut out and resized to S x S by two matrix products, columns then rows, whose
weights are PIL's: its separable resampling (Image.resize with a box) computes each output pixel
as a normalised sum of kernel weights over the input pixels within the kernel's support around
the pixel's centre, the support widened by the shrink factor (antialiasing) and clipped to the
image. With the same weights and the same rounding between the passes, the views are PIL's within
one level (PIL's weights are fixed-point): 1e-4 of the pixels differ on 500x375 photos (tests).
The non-antialiased interpolations equal PIL's EXTENT transform (the host's path) within a level.

Work per view: 2 S C (C + S) 3 FLOPs, 0.5 GFLOP at S=224, C=512.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# What data.py's batches hold when the accelerator resizes.
DECODED_KEYS = ("decoded", "extent", "window", "flip")

# data.interpolation -> (kernel, support in input pixels at scale 1, antialias when shrinking):
# PIL's. Its resize uses Keys' cubic with a = -0.5 (as torchvision); its EXTENT transform (the
# host's non-antialiased 'bicubic', data.INTERPOLATIONS) the cubic with a = -1.
def _cubic(a):
  def kernel(x):
    x = jnp.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))
  return kernel


def _triangle(x):
  return jnp.maximum(1 - jnp.abs(x), 0.0)


KERNELS = {"bicubic_antialias": (_cubic(-0.5), 2.0, True), "bicubic": (_cubic(-1.0), 2.0, False),
           "bilinear": (_triangle, 1.0, False)}


def resize_weights(in_size: int, out_size: int, start, length, extent, interpolation: str):
  """(..., out_size, in_size) float32 weights mapping input pixels [start, start + length) to
  out_size output pixels, as PIL's precompute_coeffs (resize) or its EXTENT transform. start,
  length (float) and extent (the image's size along this axis; pixels from extent on are
  padding) broadcast together."""
  kernel, support, antialias = KERNELS[interpolation]
  start, length, extent = (jnp.asarray(a, jnp.float32)[..., None, None]
                           for a in (start, length, extent))
  scale = length / out_size
  filter_scale = jnp.maximum(scale, 1.0) if antialias else jnp.ones_like(scale)
  radius = support * filter_scale
  center = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
  lo, hi = jnp.floor(center - radius + 0.5), jnp.floor(center + radius + 0.5)
  pixel = jnp.arange(in_size, dtype=jnp.float32)
  tap = lambda p: kernel((p - center + 0.5) / filter_scale)
  # PIL's window: int(center -/+ radius + 0.5), clipped to [0, extent).
  inside = (pixel >= lo) & (pixel < hi) & (pixel < extent)
  weights = jnp.where(inside, tap(pixel), 0.0)
  if not antialias:
    # The EXTENT transform reads a tap beyond the image at the edge pixel (PIL's XCLIP), where
    # resize drops it and renormalises: the same for the triangle, not for the cubic's lobes.
    offsets = jnp.arange(1, int(support) + 1, dtype=jnp.float32)  # taps reach `support` out
    before = jnp.sum(jnp.where(-offsets >= lo, tap(-offsets), 0.0), -1, keepdims=True)
    beyond = extent - 1 + offsets
    after = jnp.sum(jnp.where(beyond < hi, tap(beyond), 0.0), -1, keepdims=True)
    weights += jnp.where(pixel == 0, before, 0.0) + jnp.where(pixel == extent - 1, after, 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total == 0, 1.0, total)


def crop_resize(decoded, extent, window, flip, size: int, interpolation: str):
  """uint8 (B, C, C, 3) images whose pixels are [0, extent) -> uint8 (B, size, size, 3) views.

  extent: (B, 2) image height, width; window: (B, 4) top, left, height, width (float, in the
  buffer's pixels); flip: (B,) bool, mirror the view horizontally.
  """
  capacity = decoded.shape[1]
  top, left, height, width = (window[:, i] for i in range(4))
  rows = resize_weights(capacity, size, top, height, extent[:, 0], interpolation)
  cols = resize_weights(capacity, size, left, width, extent[:, 1], interpolation)
  cols = jnp.where(flip[:, None, None], cols[:, ::-1], cols)  # a mirrored view: columns reversed
  # HIGH: float32-accurate on TPU (3 bf16 passes), TF32 on GPU (the uint8 values are exact).
  # Columns first and, for PIL's resize (antialias), rounded to 0..255 in between as PIL does:
  # bicubic overshoots at sharp edges, and PIL clips the overshoot before the second pass.
  image = decoded.astype(jnp.float32)
  out = jnp.einsum("btw,bhwc->bhtc", cols, image, precision=jax.lax.Precision.HIGH)
  if KERNELS[interpolation][2]:
    out = _to_pixels(out)
  out = jnp.einsum("bsh,bhtc->bstc", rows, out, precision=jax.lax.Precision.HIGH)
  return _to_pixels(out).astype(jnp.uint8)


def _to_pixels(x):
  return jnp.clip(jnp.round(x), 0, 255)


def render_views(batch: dict, size: int, interpolation: str, view_keys) -> dict:
  """A decoded batch (data.py, resize_on='device') -> the batch resize_on='host' gives:
  uint8 (B, size, size, 3) under each of `view_keys`, the other keys unchanged."""
  out = {k: v for k, v in batch.items() if k not in DECODED_KEYS}
  for v, key in enumerate(view_keys):
    out[key] = crop_resize(batch["decoded"], batch["extent"], batch["window"][:, v],
                           batch["flip"][:, v], size, interpolation)
  return out


def resize_on(data_config) -> str:
  """data.resize_on resolved to 'host' or 'device' ('host' where the key is absent). 'auto' is
  'device' on GPUs and TPUs and 'host' on CPUs, where dense matrix products cost far more than
  PIL's resize."""
  where = data_config.get("resize_on", "host")
  if where == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return where


def batch_placer(mesh, data_config, size: int, view_keys):
  """host batch -> the step's global batch on `mesh` (sharding.global_batch) with, when
  data.resize_on is 'device', its views rendered by one jitted call sharded like the batch."""
  from sit_jax import sharding
  if resize_on(data_config) == "host":
    return lambda host_batch: sharding.global_batch(host_batch, mesh)
  render = jax.jit(functools.partial(render_views, size=size,
                                     interpolation=data_config.interpolation,
                                     view_keys=tuple(view_keys)),
                   out_shardings=sharding.batch_sharding(mesh))
  return lambda host_batch: render(sharding.global_batch(host_batch, mesh))
