"""Image / label-map pairs for semantic segmentation, and their joint augmentation on device.

Sources (random access, so a batch is a pure function of (seed, process, step)):
  tfds:oxford_iiit_pet   trimaps: 0 pet, 1 background, 2 border (TFDS values 1, 2, 3).
  tfds:scene_parse150    ADE20K as TFDS holds it: the Places 2017 instance-task masks, whose red
                         channel is one of 100 object categories (1..100 -> 0..99, the lines
                         of the task's instanceInfo100_train.txt); stuff (wall, sky, ...) and
                         unlabelled pixels are 0, ignored. Not the 150-class scene-parsing
                         benchmark: for that, ADEChallengeData2016 as a folder source
                         (SPLIT/images, SPLIT/masks holding each annotation minus 1, 0 -> 255;
                         data.num_classes=150). TFDS's 'test' split is ADE's validation.
  folder:/path           /path[/SPLIT]/images/NAME.{jpg,png,...} with /path[/SPLIT]/masks/NAME.png
                         (class index per pixel, IGNORE = 255 not scored, the image's size;
                         not JPEG or AVIF); data.num_classes. Images without a mask are left out.
                         Without a SPLIT folder 'train' is the whole folder, and other
                         splits are slices of it (data.folder_split).
  embedded:digit_canvas  offline: 1-2 handwritten digits (scikit-learn's) pasted on a 32 px
                         canvas; label 1 + digit on the (thickened) digit, 0 background, IGNORE on
                         its faint edge. embedded:digit_masks: each digit alone at 16 px.
TFDS sources are read with `tfds.data_source`, which needs the array_record format:
`tfds build oxford_iiit_pet --file_format=array_record`. Splits take TFDS slices
('train[:98%]'); folder and embedded splits take the same slices of a fixed shuffle.

The host only decodes and resizes each pair to image_size x image_size (the image with
antialiasing, the labels nearest); random resized crops and flips of image and labels together
happen on device (`augment_pair`). Each process reads its own share of every global batch.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sit_jax import data
from sit_jax.data import IMAGE_EXTENSIONS, rgb_or_grey

IGNORE = 255
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".avif")  # JPEG and AVIF: refused as masks
CANVAS = 32  # embedded:digit_canvas side in pixels
_CANVAS_SPLITS = {"train": 1500, "test": 500}  # canvases per split


class SegmentationDataError(ValueError):
  pass


@dataclasses.dataclass
class SegmentationData:
  name: str
  num_classes: int
  num_examples: int
  load: Callable[[int], tuple[np.ndarray, np.ndarray]]  # i -> (uint8 (H, W, 3), uint8 (H, W))
  class_names: tuple[str, ...] = ()
  # As data.DatasetInfo's: what the split reads and which of its examples, so that
  # data.check_disjoint sees slices that overlap.
  root: str = ""
  indices: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Splits and sources.
# ---------------------------------------------------------------------------------------------


def _slice(split: str, n: int) -> tuple[str, np.ndarray]:
  """('train[:98%]', n) -> ('train', sorted indices of that range of a fixed shuffle of n):
  data.py's slices, so a slice keeps the same examples in both pipelines."""
  base, part = data.split_slice(split)
  return base, data.slice_indices(n, part, split)


def _digit_pool(split: str):
  """(8x8 ink in 0..255, labels, indices of the split): train is the first 1,500 of a fixed
  shuffle of scikit-learn's 1,797 digits, test the other 297 (as embedded:digits), so no digit
  is in both."""
  images, labels = data.sklearn_digits()
  order = np.random.default_rng(0).permutation(len(labels))
  return images * (255.0 / 16.0), labels, (order[:1500] if split == "train" else order[1500:])


def _paste(images, labels, i, ink, digit, side, y, x):
  """Pastes an 8x8 digit at side x side px into canvas i; its label is the digit's shape
  thickened by a pixel (3 x 3 dilation), as a trimap labels a whole animal (strokes 2 px wide
  are finer than a 4 px patch resolves), its faint edge IGNORE."""
  import scipy.ndimage
  glyph = np.asarray(Image.fromarray(ink.astype(np.float32)).resize((side, side),
                                                                    Image.BILINEAR))
  window = (i, slice(y, y + side), slice(x, x + side))
  images[window] = np.maximum(images[window], np.clip(np.round(glyph), 0, 255).astype(np.uint8))
  shape = scipy.ndimage.maximum_filter(glyph, size=3)
  region = labels[window]  # a view: written in place
  region[shape >= 64] = 1 + digit  # a later digit covers an earlier one
  region[(shape >= 24) & (shape < 64) & (region == 0)] = IGNORE


def canvas_layout(split: str) -> list[list[tuple[int, int, int, int]]]:
  """For each canvas of the whole 'train' or 'test' split of embedded:digit_canvas, its digits:
  (index into scikit-learn's digits, side, top, left) each. The canvases of train[:80%] and
  train[80%:] (runlocal's train and validation splits) draw from the digits of the same slices
  of embedded:digits' train, so no digit is in both (nor in test's canvases)."""
  if split not in _CANVAS_SPLITS:
    raise SegmentationDataError(f"embedded:digit_canvas has splits {sorted(_CANVAS_SPLITS)} "
                                f"(optionally sliced, e.g. 'train[:80%]'), got {split!r}.")
  _, _, pool = _digit_pool(split)
  n = _CANVAS_SPLITS[split]
  part_of, parts = np.zeros(n, int), [pool]
  if split == "train":
    part_of[_slice("train[80%:]", n)[1]] = 1
    parts = [pool[_slice(f"train[{s}]", len(pool))[1]] for s in (":80%", "80%:")]
  layout = []
  for i in range(n):
    rng = np.random.default_rng([list(_CANVAS_SPLITS).index(split), i])
    digits, pasted = parts[part_of[i]], []
    for _ in range(rng.integers(1, 3)):
      d = int(digits[rng.integers(len(digits))])
      side = int(rng.integers(12, 21))
      y, x = rng.integers(0, CANVAS - side + 1, size=2)
      pasted.append((d, side, int(y), int(x)))
    layout.append(pasted)
  return layout


@functools.lru_cache(maxsize=4)
def digit_canvases(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (n, 32, 32, 3), labels uint8 (n, 32, 32)) of the whole 'train' or 'test'
  split: 1-2 digits of 12-20 px at random places on a 32 px canvas (`canvas_layout`)."""
  layout = canvas_layout(split)
  ink, targets, _ = _digit_pool(split)
  images = np.zeros((len(layout), CANVAS, CANVAS), np.uint8)
  labels = np.zeros((len(layout), CANVAS, CANVAS), np.uint8)
  for i, pasted in enumerate(layout):
    for d, side, y, x in pasted:
      _paste(images, labels, i, ink[d], targets[d], side, y, x)
  return np.repeat(images[..., None], 3, axis=-1), labels


@functools.lru_cache(maxsize=4)
def digit_masks(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits of embedded:digits ('train' 1,500, 'test' 297) at 16 px, each labelled with its
  own shape: the geometry the runlocal backbones are pretrained at."""
  if split not in _CANVAS_SPLITS:
    raise SegmentationDataError(f"embedded:digit_masks has splits {sorted(_CANVAS_SPLITS)}, "
                                f"got {split!r}.")
  ink, targets, pool = _digit_pool(split)
  images = np.zeros((len(pool), 16, 16), np.uint8)
  labels = np.zeros((len(pool), 16, 16), np.uint8)
  for i, d in enumerate(pool):
    _paste(images, labels, i, ink[d], targets[d], 16, 0, 0)
  return np.repeat(images[..., None], 3, axis=-1), labels


def _embedded(name, split):
  datasets = {"digit_canvas": digit_canvases, "digit_masks": digit_masks}
  if name not in datasets:
    raise SegmentationDataError(f"Unknown embedded segmentation dataset {name!r}; available: "
                                f"{sorted(datasets)}.")
  base = split.partition("[")[0]
  images, labels = datasets[name](base)
  _, keep = _slice(split, len(labels))
  return SegmentationData(f"embedded:{name}/{split}", 11, len(keep),
                          lambda i: (images[keep[i]], labels[keep[i]]),
                          ("background",) + tuple(str(d) for d in range(10)),
                          root=f"embedded:{name}/{base}", indices=keep)


def _read(path, read):
  """read(the image file at path, opened), or one line naming the file that cannot be read."""
  try:
    with Image.open(path) as im:
      return read(im)
  except data.PIL_ERRORS as e:
    raise SegmentationDataError(f"{path} cannot be read ({e}): replace it, or remove its "
                                "image and mask.") from e


def _folder(path, split, num_classes):
  if not 0 < num_classes <= IGNORE:
    raise SegmentationDataError(f"folder:{path}: data.num_classes={num_classes}: set it to the "
                                f"masks' number of classes, 1..{IGNORE} (their values are "
                                f"0..num_classes-1 in one byte, {IGNORE} = not scored).")
  root, _ = data.folder_split(path, split)
  image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
  if not os.path.isdir(image_dir) or not os.path.isdir(mask_dir):
    raise SegmentationDataError(f"{root} needs images/ and masks/ sub-folders (NAME.jpg with "
                                "NAME.png).")
  masks = {os.path.splitext(f)[0]: f for f in os.listdir(mask_dir)}
  images = [f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
  pairs = sorted(((os.path.join(image_dir, f), os.path.join(mask_dir, masks[stem]))
                  for f in images
                  for stem in [os.path.splitext(f)[0]] if stem in masks),
                 key=lambda pair: data.name_order(pair[0]))  # as data.py lists a folder
  if not pairs:
    raise SegmentationDataError(f"No image with a mask of the same name under {root}.")
  lossy = [m for _, m in pairs if m.lower().endswith(LOSSY_EXTENSIONS)]
  if lossy:  # lossy compression moves class indices at every edge, mostly to other valid classes
    raise SegmentationDataError(
        f"{root}: {len(lossy)} of its masks are JPEG or AVIF ({os.path.basename(lossy[0])}, "
        "...), whose lossy compression changes the class indices along every edge: save them "
        "as PNG.")
  if len(pairs) < len(images):
    unmasked = sorted(set(images) - {os.path.basename(i) for i, _ in pairs})
    logging.warning("%s: %d of its %d images have no mask of the same name in masks/ (%s): "
                    "left out.", root, len(unmasked), len(images), ", ".join(unmasked[:3]))
  _, keep = _slice(split, len(pairs))

  def labels_of(i):
    """Example i's label map, checked against data.num_classes and its image's size."""
    image_path, mask_path = pairs[keep[i]]
    (w, h), labels = _read(image_path, lambda im: im.size), _read(mask_path, np.asarray)
    if labels.ndim != 2:
      raise SegmentationDataError(f"{mask_path} has {labels.shape[-1]} channels: save each mask "
                                  "as one channel of class indices (a grey or palette PNG).")
    # Both are squashed to image_size: a pixel's difference shifts a label by less than one of
    # the image's pixels; a mask of another shape (turned, cropped) would label other pixels.
    if np.any(np.abs(np.subtract(labels.shape, (h, w))) > 1):
      mh, mw = labels.shape
      raise SegmentationDataError(
          f"{mask_path} is {mw}x{mh} px, its image {image_path} {w}x{h}: a mask labels the "
          "pixels of its image, so it must have the image's size (an image that its EXIF "
          "orientation turns: save it turned, as its mask was drawn).")
    wrong = labels[(labels >= num_classes) & (labels != IGNORE)]
    if wrong.size:
      raise SegmentationDataError(
          f"{mask_path} holds the value {int(wrong.max())}, not a class of data.num_classes="
          f"{num_classes} (0..{num_classes - 1}) nor {IGNORE} (not scored): raise "
          f"data.num_classes, or map the value to {IGNORE}.")
    return labels

  def load(i):
    return (_read(pairs[keep[i]][0], lambda im: np.asarray(rgb_or_grey(im).convert("RGB"))),
            labels_of(i))

  # Every mask is checked before any work: where first read, a bad one would stop training
  # midway, or the test split's after training.
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    for _ in pool.map(lambda i: labels_of(i).shape, range(len(keep))):  # holding no map
      pass
  logging.info("folder:%s/%s: %d masks checked in %.1f s", path, split, len(keep),
               time.perf_counter() - start)

  return SegmentationData(f"folder:{path}/{split}", num_classes, len(keep), load,
                          root=os.path.realpath(root), indices=keep)


# TFDS datasets: number of classes, class names, and the label map of an example.
_TFDS = {
    "oxford_iiit_pet": (3, ("pet", "background", "border"),
                        lambda ex: ex["segmentation_mask"][..., 0].astype(np.int32) - 1),
    # The instance masks' categories, not the 150 scene-parsing classes (module docstring).
    "scene_parse150": (100, (),
                       lambda ex: ex["annotation"][..., 0].astype(np.int32) - 1),
}


def _tfds(name, split, data_dir):
  if name not in _TFDS:
    raise SegmentationDataError(f"No segmentation reader for tfds:{name}; known: "
                                f"{sorted(_TFDS)} (or use folder:/path).")
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # no such split, not prepared, or prepared as tfrecord
    if "Unknown split" in str(e):
      raise SegmentationDataError(f"tfds:{name} has no split {split!r}: {e}") from e
    raise SegmentationDataError(
        f"tfds:{name} split {split!r} cannot be read by random access ({e}); prepare it with "
        f"`tfds build {name} --file_format=array_record --data_dir=...`.") from e
  num_classes, names, label_of = _TFDS[name]

  def load(i):
    ex = source[i]
    labels = label_of(ex)
    return (np.asarray(ex["image"], np.uint8),
            np.where((labels < 0) | (labels >= num_classes), IGNORE, labels).astype(np.uint8))

  return SegmentationData(f"tfds:{name}/{split}", num_classes, len(source), load, names,
                          root=f"tfds:{name}", indices=data.tfds_examples(
                              tfds.builder(name, data_dir=data_dir), split))


def open_split(source: str, split: str, data_dir: str | None = None,
               num_classes: int = 0) -> SegmentationData:
  """The pairs of one split of `source` (see the module docstring)."""
  kind, _, rest = source.partition(":")
  if kind == "embedded":
    return _embedded(rest, split)
  if kind == "folder":
    return _folder(os.path.expanduser(rest), split, num_classes)
  if kind == "tfds":
    return _tfds(rest, split, data_dir)
  raise SegmentationDataError(f"Unknown source {source!r}: use tfds:NAME, folder:/path or "
                              "embedded:digit_canvas.")


# ---------------------------------------------------------------------------------------------
# Host batches.
# ---------------------------------------------------------------------------------------------


def resize_pair(image, labels, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The whole image squashed to size x size (antialiased bilinear) and its labels (nearest)."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image[..., :3]).resize((size, size), Image.BILINEAR))
  labels = np.asarray(labels, np.uint8)
  if labels.shape != (size, size):
    labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
  return image, labels


def _local_layout(global_batch_size: int):
  p, count = jax.process_index(), jax.process_count()
  if global_batch_size % count:
    raise SegmentationDataError(f"Batch {global_batch_size} is not divisible by the {count} "
                                "processes.")
  return p, count, global_batch_size // count


class _Loader:
  """Decodes and resizes batches of examples on a thread pool, one batch ahead."""

  def __init__(self, data: SegmentationData, size: int, threads: int = 8):
    self.data, self.size = data, size
    self.pool = concurrent.futures.ThreadPoolExecutor(threads)

  def _one(self, i):
    return resize_pair(*self.data.load(int(i)), self.size)

  def submit(self, indices):
    return [self.pool.submit(self._one, i) for i in indices]

  @staticmethod
  def collect(futures):
    pairs = [f.result() for f in futures]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def train_indices(num_examples: int, global_batch_size: int, seed: int, step: int,
                  process_index: int, process_count: int) -> np.ndarray:
  """This process's examples of global batch `step`: positions step * B ... of the stream of
  epochs, each epoch its own permutation from (seed, epoch)."""
  local = global_batch_size // process_count
  positions = step * global_batch_size + process_index * local + np.arange(local)
  epochs = positions // num_examples
  out = np.empty(local, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(num_examples)
    out[epochs == e] = perm[positions[epochs == e] % num_examples]
  return out


def train_batches(data: SegmentationData, *, global_batch_size: int, image_size: int,
                  seed: int, start_step: int = 0) -> Iterator[dict]:
  """Infinite iterator of this process's share of each global batch, from `start_step`:
  dict(image=uint8 (b, S, S, 3), label=uint8 (b, S, S))."""
  p, count, _ = _local_layout(global_batch_size)
  if data.num_examples < global_batch_size:
    raise SegmentationDataError(f"{data.name}: {data.num_examples} examples is fewer than one "
                                f"batch of {global_batch_size}.")
  loader = _Loader(data, image_size)
  indices = lambda step: train_indices(data.num_examples, global_batch_size, seed, step, p,
                                       count)
  step, pending = start_step, loader.submit(indices(start_step))
  while True:
    following = loader.submit(indices(step + 1))
    image, label = loader.collect(pending)
    yield {"image": image, "label": label}
    step, pending = step + 1, following


class EvalBatches:
  """One pass over the split: this process takes examples p, p + P, ...; every process yields
  the same number of batches, padding has mask False. dict(image, label, mask)."""

  def __init__(self, data: SegmentationData, *, global_batch_size: int, image_size: int):
    self.p, self.count, self.local = _local_layout(global_batch_size)
    self.data, self.size = data, image_size
    self.indices = np.arange(self.p, data.num_examples, self.count)
    self.num_batches = math.ceil(math.ceil(data.num_examples / self.count) / self.local)

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    loader = _Loader(self.data, self.size)
    chunks = [self.indices[i * self.local:(i + 1) * self.local]
              for i in range(self.num_batches)]
    pending = loader.submit(chunks[0]) if chunks else []
    for b, chunk in enumerate(chunks):
      following = loader.submit(chunks[b + 1]) if b + 1 < len(chunks) else []
      n = len(chunk)
      image = np.zeros((self.local, self.size, self.size, 3), np.uint8)
      label = np.full((self.local, self.size, self.size), IGNORE, np.uint8)
      if n:
        image[:n], label[:n] = loader.collect(pending)
      yield {"image": image, "label": label, "mask": np.arange(self.local) < n}
      pending = following
    loader.pool.shutdown(wait=False)


# ---------------------------------------------------------------------------------------------
# Joint augmentation on device.
# ---------------------------------------------------------------------------------------------


def _crop_box(key, scale: Sequence[float], ratio=(3 / 4, 4 / 3)):
  """(top, left, height, width) in [0, 1] units: an area fraction uniform in `scale` and a
  log-uniform aspect ratio, clipped into the image (one try: no rejection loop on device)."""
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  h = jnp.minimum(jnp.sqrt(area / jnp.exp(log_r)), 1.0)
  w = jnp.minimum(jnp.sqrt(area * jnp.exp(log_r)), 1.0)
  return jax.random.uniform(k_y) * (1 - h), jax.random.uniform(k_x) * (1 - w), h, w


def _augment_one(key, image, labels, scale, flip):
  size = image.shape[0]
  k_crop, k_flip = jax.random.split(key)
  top, left, h, w = _crop_box(k_crop, scale)
  centres = (jnp.arange(size) + 0.5) / size
  xs = left + centres * w
  if flip:
    xs = jnp.where(jax.random.bernoulli(k_flip), xs[::-1], xs)
  ys, xs = jnp.meshgrid((top + centres * h) * size - 0.5, xs * size - 0.5, indexing="ij")
  sample = functools.partial(jax.scipy.ndimage.map_coordinates, coordinates=[ys, xs],
                             mode="nearest")
  image = jnp.stack([sample(image[..., c].astype(jnp.float32), order=1)
                     for c in range(image.shape[-1])], axis=-1)
  # Labels are picked, never blended: order 0 takes the nearest pixel.
  return image, sample(labels, order=0)


def augment_pair(key, images, labels, crop_scale=(0.5, 1.0), flip: bool = True):
  """Random resized crops (area fraction in crop_scale) and horizontal flips, the same for each
  image (bilinear, float) and its label map (nearest), back to the input size."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x, y: _augment_one(k, x, y, tuple(crop_scale), flip))(
      keys, images, labels)
