"""Host input pipeline: TFDS datasets, image folders and an embedded offline dataset -> per-host
numpy batches of uint8 crops.

The host only decodes, crops, resizes and flips (tf.data, parallel, prefetched); photometric
augmentation runs on the accelerator (augment.py). The trainer turns these host-local batches
into global jax.Arrays with jax.make_array_from_process_local_data.

Sources (`source` argument):
  "tfds:NAME[/CONFIG][:SPLIT]" or a bare "NAME[/CONFIG]"  a TFDS dataset (`split` like "train",
      "train+unlabelled", "train[:90%]"; `data_dir` as in tfds). Never downloads.
  "folder:/path"  an image folder. Sub-directories of the root are classes (sorted by name ->
      label index, searched recursively); without sub-directories every file has label -1.
      If `<path>/<split>` is a directory it is used instead of the root (ImageNet-style
      train/ and val/ folders); otherwise `split` is ignored.
  "embedded:digits"  scikit-learn's bundled 8x8 digits (1797 images, labels 0-9), upsampled
      bicubically to 32x32 RGB; split "train" (1500) / "test" (297) / "all" after a fixed shuffle.
  Folder and embedded splits take a TFDS-style slice, "train[:1200]", "train[80%:]": the
  examples of that range of a fixed shuffle of the split (seed 0), so a validation split can be
  carved from train ("train[:80%]" to train on, "train[80%:]" to choose a recipe on).
  "embedded:digits_multilabel"  the same images with multi-hot labels (12,): the digit, odd, >= 5.

Determinism and resuming. A training iterator's batches are a pure function of (seed,
process_index, process_count, step), so `start_step=k` yields exactly what a fresh iterator
yields from its k-th batch on. Each host reads an infinite stream of its own examples, one
permutation per epoch, epochs following each other without a gap; crop and flip randomness is
stateless, keyed on the element's place in the stream.
  - Random-access sources (folder, embedded): position t of the stream is example
    index_shuffle(t mod n, seed(epoch)), computed directly, so starting at any step costs nothing.
    Batch k is built from its own candidate list: positions k*b .. k*b+b-1 and, after them,
    spare random examples used only to replace unreadable files. Batch k thus stays the same
    whatever happened to earlier batches, and it is always full. `num_skipped` counts the
    unreadable files met.
  - TFDS: records can only be read in order, so each epoch is the host's split read in a fixed
    order through a shuffle buffer seeded by (seed, host, epoch); resuming skips the first
    records of the current epoch before decoding (cheap: no decode, but the skipped records are
    still read). Shuffling is local to the buffer (`shuffle_buffer` examples); TFDS stores
    examples already shuffled. If the program sets a TF global seed, the order depends on it too.

Multi-host: each process reads only its share: examples p, p+P, p+2P, ... of a folder/embedded
source, tfds.even_splits(split, P)[p] of a TFDS split. Evaluation pads the last batches (mask
False) so that every host yields the same number of batches.
"""
import dataclasses
import difflib
import math
import os
import re
from typing import Callable, Iterator, Optional, Sequence

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _hide_accelerators_from_tf():
  # TF is for the host pipeline only: it must not grab GPU/TPU memory meant for JAX.
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass


_hide_accelerators_from_tf()

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
EVAL_CROP_FRACTION = 0.875  # "center_crop": central 87.5% square of the image, then resize
DIGITS_TRAIN = 1500
_MAX_SPARES = 64  # extra candidates per batch (plus the batch size again) to replace bad files
_AUTOTUNE = tf.data.AUTOTUNE


class DataError(ValueError):
  """A dataset cannot be used as asked (bad name, arguments, empty folder, ...)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """The data is not where it should be (missing folder, TFDS dataset not prepared)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_examples: int  # in the whole split, all hosts together
  num_classes: int  # 0 when the source has no labels
  name: str
  multilabel: bool = False  # labels are multi-hot int32 vectors (num_classes,), not class ids


# ============================================================================================
# Sources
# ============================================================================================
@dataclasses.dataclass
class _HostData:
  """One host's share of a split, ready for a pipeline."""
  info: DatasetInfo
  n_local: int  # examples of this host
  n_max_local: int  # the largest share over all hosts
  # Random-access sources: load(local index) -> (uint8 image (h, w, 3), int32 label).
  load: Optional[Callable] = None
  fallible: bool = False  # loading may fail (files): unreadable ones are skipped
  # TFDS sources.
  builder: Optional[tfds.core.DatasetBuilder] = None
  host_split: object = None


def _parse_source(source: str, split: Optional[str]):
  if not isinstance(source, str) or not source:
    raise DataError(f"source must be a non-empty string, got {source!r}")
  kind, sep, rest = source.partition(":")
  if sep and kind in ("folder", "embedded"):
    return kind, rest, split
  rest = rest if (sep and kind == "tfds") else source
  name, _, split_in_source = rest.partition(":")
  if split_in_source and split and split_in_source != split:
    raise DataError(f"source {source!r} names split {split_in_source!r} but split={split!r}")
  split = split_in_source or split
  if not name or not split:
    raise DataError(f"TFDS source {source!r} needs a dataset name and a split")
  return "tfds", name, split


def _check_layout(global_batch_size, image_size, process_index, process_count):
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"bad process_index={process_index} / process_count={process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                    f"the number of processes ({process_count})")
  if image_size <= 0:
    raise DataError(f"image_size must be positive, got {image_size}")
  return global_batch_size // process_count, process_index, process_count


def _strided_share(n, process_index, process_count):
  return len(range(process_index, n, process_count)), -(-n // process_count)


# ----- slices of random-access splits -------------------------------------------------------
_SLICE = re.compile(r"^(?P<base>[^\[\]]*)\[(?P<part>[^\[\]]*)\]$")


def _split_slice(split):
  """'train[:80%]' -> ('train', ':80%'); 'train' -> ('train', None)."""
  match = _SLICE.match(split or "")
  if not match:
    return split, None
  return match["base"], match["part"]


def _slice_bound(text, n, split):
  text = text.strip()
  if not text:
    return None
  try:
    if text.endswith("%"):
      return int(round(float(text[:-1]) * n / 100))
    return int(text)
  except ValueError:
    raise DataError(f"bad slice {split!r}: use integers or percentages, e.g. 'train[:1200]' or "
                    "'train[80%:]'") from None


def _slice_indices(n, part, split):
  """Indices of the examples a slice keeps: that range of a fixed (seed 0) shuffle of 0..n-1,
  in increasing order; every index when the split is not sliced."""
  if part is None:
    return np.arange(n)
  lo, colon, hi = part.partition(":")
  if not colon:
    raise DataError(f"bad slice {split!r}: expected [start:stop], e.g. 'train[:80%]'")
  chosen = np.random.default_rng(0).permutation(n)[
      slice(_slice_bound(lo, n, split), _slice_bound(hi, n, split))]
  if not len(chosen):
    raise DataError(f"split {split!r} selects no examples (the split has {n})")
  return np.sort(chosen)


# ----- embedded -----------------------------------------------------------------------------
_DIGITS_CACHE = {}


def _digits():
  """(images uint8 (1797, 32, 32, 3), labels int32) in a fixed shuffled order."""
  if "all" not in _DIGITS_CACHE:
    from PIL import Image
    from sklearn.datasets import load_digits  # ships its data: no download
    digits = load_digits()
    small = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC))
                    for x in small])
    order = np.random.default_rng(0).permutation(len(big))
    _DIGITS_CACHE["all"] = (np.repeat(big[order, :, :, None], 3, axis=-1),
                            digits.target[order].astype(np.int32))
  return _DIGITS_CACHE["all"]


def _digits_multilabel(labels):
  """Multi-hot (n, 12): the digit (10 classes), 'odd', '>= 5'; for offline multi-label tests."""
  return np.concatenate([np.eye(10, dtype=np.int32)[labels], (labels % 2)[:, None],
                         (labels >= 5)[:, None].astype(np.int32)], axis=1)


def _embedded(name, split, p, P):
  if name not in ("digits", "digits_multilabel"):
    raise DataError(f"unknown embedded dataset {name!r}; available: 'digits', "
                    "'digits_multilabel'")
  images, labels = _digits()
  if name == "digits_multilabel":
    labels = _digits_multilabel(labels)
  ranges = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None),
            "all": slice(None)}
  base, part = _split_slice(split)
  if base not in ranges:
    raise DataError(f"embedded:{name} has splits {sorted(ranges)} (optionally sliced, e.g. "
                    f"'train[:80%]'), got {split!r}")
  images, labels = images[ranges[base]], labels[ranges[base]]
  keep = _slice_indices(len(labels), part, split)
  images, labels = images[keep], labels[keep]
  n = len(labels)
  host_images = tf.constant(images[p::P])
  host_labels = tf.constant(labels[p::P])

  def load(i):
    return tf.gather(host_images, i), tf.gather(host_labels, i)

  n_local, n_max = _strided_share(n, p, P)
  info = DatasetInfo(n, labels.shape[-1] if labels.ndim > 1 else 10,
                     f"embedded:{name}/{split}", multilabel=labels.ndim > 1)
  return _HostData(info, n_local, n_max, load=load)


# ----- image folder -------------------------------------------------------------------------
def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(directory):
  found = []
  for root, dirs, files in os.walk(directory, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(root, f) for f in files if _is_image(f) and not f.startswith(".")]
  return sorted(found)


def _list_folder(root):
  """(paths, labels, class names); classes are the root's sub-directories sorted by name."""
  if not os.path.isdir(root):
    raise DataNotFoundError(f"image folder {root!r} does not exist")
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
  if classes:
    paths, labels = [], []
    for label, name in enumerate(classes):
      files = _list_images(os.path.join(root, name))
      paths += files
      labels += [label] * len(files)
  else:
    paths = [os.path.join(root, e) for e in entries if _is_image(e)]
    labels = [-1] * len(paths)
  if not paths:
    raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {root!r}")
  return paths, np.asarray(labels, np.int32), classes


def _decode(encoded):
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _folder(path, split, p, P):
  root = os.path.expanduser(path)
  base, part = _split_slice(split)
  if base and os.path.isdir(os.path.join(root, base)):
    root = os.path.join(root, base)
  paths, labels, classes = _list_folder(root)
  keep = _slice_indices(len(paths), part, split)
  paths, labels = [paths[i] for i in keep], labels[keep]
  host_paths = tf.constant(paths[p::P])
  host_labels = tf.constant(labels[p::P])

  def load(i):
    return _decode(tf.io.read_file(tf.gather(host_paths, i))), tf.gather(host_labels, i)

  n_local, n_max = _strided_share(len(paths), p, P)
  info = DatasetInfo(len(paths), len(classes),
                     f"folder:{root}" + (f"[{part}]" if part is not None else ""))
  return _HostData(info, n_local, n_max, load=load, fallible=True)


# ----- TFDS ---------------------------------------------------------------------------------
def _tfds_builder(name, data_dir):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split("/")[0].lower(), known, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise DataError(f"unknown TFDS dataset {name!r}.{hint} See tfds.list_builders().") from None
  except ValueError as e:  # e.g. an unknown config
    raise DataError(f"cannot open TFDS dataset {name!r}: {e}") from None


def _not_prepared(builder, name):
  root = builder.data_dir_root
  if builder.name == "imagenet2012":
    return DataNotFoundError(
        f"TFDS dataset imagenet2012 is not prepared in {root}. It needs a manual download: "
        f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
        f"{os.path.join(root, 'downloads', 'manual')}/ then run: "
        f"tfds build imagenet2012 --data_dir {root}")
  manual = ""
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    manual = (f" It needs a manual download into {os.path.join(root, 'downloads', 'manual')}/"
              f" first: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
  return DataNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {root}.{manual} Prepare it once (this "
      f"downloads) with: tfds build {name} --data_dir {root}")


def _tfds_read(builder, split, name):
  """The split's records in a fixed order, images still encoded."""
  if "image" not in builder.info.features:
    raise DataError(f"TFDS dataset {name!r} has no 'image' feature")
  try:
    return builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=16))
  except AssertionError:  # tfds' "could not find data": never generated
    if not builder.is_prepared():
      raise _not_prepared(builder, name) from None
    raise
  except (ValueError, KeyError) as e:
    raise DataError(f"TFDS dataset {name!r}: bad split {split!r}: {e}") from None


def _tfds_size(builder, split, name):
  try:
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError, AssertionError):
    n = 0
  if n <= 0:  # not in the metadata (e.g. a sub-split object, or tfds.testing.mock_data)
    n = int(_tfds_read(builder, split, name).cardinality())
    if n < 0:
      raise DataError(f"cannot tell the size of TFDS split {name}:{split}")
  return n


def _tfds_host_split(split, p, P):
  parts = [tfds.even_splits(part, P)[p] for part in split.split("+")]
  host = parts[0]
  for part in parts[1:]:
    host = host + part
  return host


def _tfds_labels(builder):
  """(ex -> int32 label tensor, num_classes, multilabel). A 'label' ClassLabel gives class ids;
  without one, a 'labels' Sequence(ClassLabel) (e.g. voc/2007) gives multi-hot vectors."""
  features = builder.info.features
  if "label" in features:
    return (lambda ex: tf.cast(ex["label"], tf.int32),
            getattr(features["label"], "num_classes", 0) or 0, False)
  inner = getattr(features["labels"], "feature", None) if "labels" in features else None
  if isinstance(inner, tfds.features.ClassLabel):
    c = inner.num_classes
    # Sum, not max, of the one-hots: an image without labels gives zeros.
    return (lambda ex: tf.minimum(tf.reduce_sum(tf.one_hot(ex["labels"], c, dtype=tf.int32),
                                                axis=0), 1), c, True)
  return lambda ex: tf.constant(-1, tf.int32), 0, False


def _tfds(name, split, data_dir, p, P):
  builder = _tfds_builder(name, data_dir)
  n = _tfds_size(builder, split, name)
  host_split = _tfds_host_split(split, p, P) if P > 1 else split
  n_local = _tfds_size(builder, host_split, name) if P > 1 else n
  _, num_classes, multilabel = _tfds_labels(builder)
  info = DatasetInfo(n, num_classes, f"tfds:{name}/{split}", multilabel=multilabel)
  return _HostData(info, n_local, max(n_local, -(-n // P)), builder=builder,
                   host_split=host_split)


def _host_data(source, split, data_dir, p, P):
  kind, name, split = _parse_source(source, split)
  if kind == "embedded":
    return _embedded(name, split, p, P)
  if kind == "folder":
    return _folder(name, split, p, P)
  return _tfds(name, split, data_dir, p, P)


def dataset_info(source: str, split: Optional[str], data_dir: Optional[str] = None) -> DatasetInfo:
  """Size (whole split), number of classes and name of a source."""
  return _host_data(source, split, data_dir, 0, 1).info


# ============================================================================================
# Image ops (tf, on the host)
# ============================================================================================
# data.interpolation -> (tf.image.resize method, antialias when shrinking). The default is what
# PIL/torchvision do (the authors' pipeline); the others trade that for host speed: on
# ImageNet-size JPEGs cropped to 224, 'bicubic' gives 1.8x and 'bilinear' 2.7x the images/s
# (benchmarks/README.md).
INTERPOLATIONS = {"bicubic_antialias": ("bicubic", True), "bicubic": ("bicubic", False),
                  "bilinear": ("bilinear", False)}


def check_interpolation(interpolation):
  if interpolation not in INTERPOLATIONS:
    raise DataError(f"Unknown data.interpolation {interpolation!r}: choose one of "
                    f"{sorted(INTERPOLATIONS)}.")


def _resize(image, size, interpolation):
  """Resize to (size, size) uint8. Antialiasing only matters when shrinking, and its kernel is
  2-3x slower on the CPU, so it runs only for downscaling."""
  method, antialias = INTERPOLATIONS[interpolation]
  resize = lambda aa: tf.image.resize(image, [size, size], method=method, antialias=aa)
  if antialias:
    shape = tf.shape(image)
    shrink = tf.logical_or(shape[0] > size, shape[1] > size)
    x = tf.cond(shrink, lambda: resize(True), lambda: resize(False))
  else:
    x = resize(False)
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _crop_window(shape, seed, scale, ratio=(3 / 4, 4 / 3), attempts=10):
  """torchvision's RandomResizedCrop.get_params as a pure function of `seed`: (begin, size) of
  the crop for tf.slice.

  Each try takes an area fraction uniform in `scale` and an aspect ratio (w / h) log-uniform in
  `ratio`, rounded half to even as Python's round; the first try that fits wins, at a uniform
  position. If none of the `attempts` fits: the centre crop of the whole image clipped to the
  ratio range. All tries come from one draw: a few dozen scalar ops, little beside the decode.
  """
  u = tf.random.stateless_uniform([3, attempts], seed, dtype=tf.float64)
  height, width = shape[0], shape[1]
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  ws = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(fits)

  in_ratio = w_f / h_f
  centre_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  centre_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  size = tf.where(found, tf.stack([hs[first], ws[first]]), tf.stack([centre_h, centre_w]))
  room = tf.stack([height, width]) - size
  uniform = tf.cast(tf.floor(u[2, :2] * tf.cast(room + 1, tf.float64)), tf.int32)
  begin = tf.where(found, tf.minimum(uniform, room), room // 2)
  return tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0)


def _random_view(image, seed, size, scale, interpolation, flip=True):
  """torchvision's RandomResizedCrop (area fraction in `scale`, ratio log-uniform in 3/4..4/3,
  10 tries, else a centre crop) + resize + horizontal flip with probability 1/2 (if `flip`)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  begin, crop_size = _crop_window(tf.shape(image), crop_seed, scale)
  view = _resize(tf.slice(image, begin, crop_size), size, interpolation)
  return tf.image.stateless_random_flip_left_right(view, flip_seed) if flip else view


def _eval_view(image, size, resize_mode, interpolation):
  if resize_mode == "center_crop":
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.maximum(1, tf.cast(
        tf.round(tf.cast(tf.minimum(h, w), tf.float32) * EVAL_CROP_FRACTION), tf.int32))
    image = tf.slice(image, [(h - side) // 2, (w - side) // 2, 0], [side, side, 3])
  return _resize(image, size, interpolation)


def _fold(seed, *data):
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def _options(ds):
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


# ============================================================================================
# Iterators
# ============================================================================================
class HostIterator:
  """Iterator of host-local numpy batches. `num_skipped` counts unreadable images met so far."""

  def __init__(self, batches: Iterator[dict], batch_size: int, info: DatasetInfo,
               start_step: int = 0):
    self._batches = batches
    self.batch_size = batch_size
    self.info = info
    self.step = start_step  # index of the next batch
    self.num_skipped = 0

  def __iter__(self):
    return self

  def _note_skipped(self, count):
    if count:
      self.num_skipped += count
      logging.warning("%s: skipped %d unreadable image(s) (total %d)", self.info.name, count,
                      self.num_skipped)

  def __next__(self) -> dict:
    batch = next(self._batches)
    self.step += 1
    return batch


class _TrainIterator(HostIterator):

  def __next__(self):
    batch = next(self._batches)
    group, slot = batch.pop("_group", None), batch.pop("_slot", None)
    if group is not None:
      if np.any(slot < 0):
        raise DataError(f"{self.info.name}: batch {self.step} has too few readable images "
                        f"(more than {_MAX_SPARES + self.batch_size} unreadable candidates)")
      assert np.all(group == self.step), (group, self.step)
      self._note_skipped(int(slot.max()) + 1 - self.batch_size)
    self.step += 1
    return batch


class EvalIterator(HostIterator):
  """One pass; `len()` batches on every host; `mask` False marks padding and unreadable files."""

  def __init__(self, batches, batch_size, info, n_local, num_batches, image_size):
    super().__init__(batches, batch_size, info)
    self._n_local = n_local
    self._num_batches = num_batches
    self._size = image_size
    self._pending = None

  def __len__(self):
    return self._num_batches

  def _fill(self, upto):
    """Reads tf batches until the pending elements reach stream position `upto`."""
    while self._pending is None or (self._pending["_pos"].size == 0 or
                                    self._pending["_pos"][-1] < upto):
      try:
        nxt = next(self._batches)
      except StopIteration:
        return
      if self._pending is None:
        self._pending = nxt
      else:
        self._pending = {k: np.concatenate([self._pending[k], nxt[k]]) for k in nxt}

  def __next__(self):
    if self.step >= self._num_batches:
      raise StopIteration
    b, lo = self.batch_size, self.step * self.batch_size
    self._fill(lo + b)
    out = dict(image=np.zeros((b, self._size, self._size, 3), np.uint8),
               label=np.full((b, self.info.num_classes) if self.info.multilabel else (b,), -1,
                             np.int32),
               mask=np.zeros((b,), bool))
    if self._pending is not None:
      take = int(np.searchsorted(self._pending["_pos"], lo + b))
      slots = self._pending["_pos"][:take] - lo
      out["image"][slots] = self._pending["image"][:take]
      out["label"][slots] = self._pending["label"][:take]
      out["mask"][slots] = True
      self._pending = {k: v[take:] for k, v in self._pending.items()}
    expected = max(0, min(lo + b, self._n_local) - lo)
    self._note_skipped(expected - int(out["mask"].sum()))
    self.step += 1
    return out


def _train_elements(data: _HostData, *, b, start_step, seed, process_index, shuffle_buffer):
  """Unbatched stream of dict(image uint8, label int32, seed int64[2]) from batch `start_step`
  on; for random-access sources also the element's batch ("_group") and candidate ("_slot")."""
  base = tf.constant([seed & (2**63 - 1), process_index], tf.int64)
  aug_base, order_base, spare_base = _fold(base, 1), _fold(base, 2), _fold(base, 3)
  n = data.n_local
  if n <= 0:
    raise DataError(f"{data.info.name}: process {process_index} has no examples")

  if data.load is not None:
    def group(k):
      def candidate(slot):
        t = k * b + slot
        epoch_order = _fold(order_base, t // n)
        primary = tf.random.experimental.index_shuffle(t % n, epoch_order, n - 1)
        spare = tf.random.stateless_uniform(
            [], _fold(spare_base, k, slot), minval=0, maxval=n, dtype=tf.int64)
        image, label = data.load(tf.where(slot < b, primary, spare))
        return dict(image=image, label=label, seed=_fold(aug_base, k, slot), _group=k,
                    _slot=slot)

      ds = tf.data.Dataset.range(b + b + _MAX_SPARES).map(candidate)
      if data.fallible:
        ds = ds.ignore_errors()
        # Placeholders keep batch k aligned if nearly every candidate is unreadable; the
        # iterator raises on them.
        filler = dict(image=tf.zeros([1, 1, 3], tf.uint8), label=tf.constant(-1, tf.int32),
                      seed=tf.zeros([2], tf.int64), _group=k, _slot=tf.constant(-1, tf.int64))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(b))
      return ds.take(b)

    cycle = max(2, min(16, os.cpu_count() or 2))
    return tf.data.Dataset.range(start_step, 2**62).interleave(
        group, cycle_length=cycle, block_length=b, num_parallel_calls=_AUTOTUNE,
        deterministic=True)

  # TFDS: one deterministic shuffled pass per epoch, resumed by skipping records.
  records = _tfds_read(data.builder, data.host_split, data.info.name)
  first = start_step * b
  first_epoch, first_offset = first // n, first % n
  buffer = max(1, min(shuffle_buffer, n))
  label_of, _, _ = _tfds_labels(data.builder)

  def epoch(e):
    shuffle_seed = tf.random.stateless_uniform(
        [], _fold(order_base, e), minval=0, maxval=2**31 - 1, dtype=tf.int64)
    ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(tf.where(e == first_epoch, tf.constant(first_offset, tf.int64),
                                      tf.constant(0, tf.int64)))
    return ds.map(lambda offset, ex: dict(
        encoded=ex["image"],
        label=label_of(ex), seed=_fold(aug_base, e * n + offset)))

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)

  def decode(ex):
    encoded = ex.pop("encoded")
    return dict(ex, image=_decode(encoded))

  return ds.map(decode, num_parallel_calls=_AUTOTUNE, deterministic=True)


def _train_iterator(source, split, *, global_batch_size, image_size, crop_scale, seed,
                    start_step, process_index, process_count, data_dir, shuffle_buffer,
                    interpolation, flip, make_batch_element):
  b, p, P = _check_layout(global_batch_size, image_size, process_index, process_count)
  check_interpolation(interpolation)
  lo, hi = crop_scale
  if not 0 < lo <= hi <= 1:
    raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
  if start_step < 0:
    raise DataError(f"start_step must be >= 0, got {start_step}")
  data = _host_data(source, split, data_dir, p, P)
  ds = _train_elements(data, b=b, start_step=start_step, seed=int(seed), process_index=p,
                       shuffle_buffer=shuffle_buffer)
  ds = ds.map(lambda ex: make_batch_element(ex, image_size, (lo, hi), interpolation, flip),
              num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = _options(ds.batch(b, drop_remainder=True).prefetch(_AUTOTUNE))
  return _TrainIterator(ds.as_numpy_iterator(), b, data.info, start_step)


def _private(ex):
  return {k: v for k, v in ex.items() if k.startswith("_")}


def _two_views(ex, size, scale, interpolation, flip):
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(ex["seed"], 2))
  view = lambda seed: _random_view(ex["image"], seed, size, scale, interpolation, flip)
  return dict(view1=view(s1), view2=view(s2), label=ex["label"], **_private(ex))


def _one_view(ex, size, scale, interpolation, flip):
  return dict(image=_random_view(ex["image"], ex["seed"], size, scale, interpolation, flip),
              label=ex["label"], **_private(ex))


def pretrain_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                      image_size: int, crop_scale: Sequence[float] = (0.2, 1.0), seed: int,
                      start_step: int = 0, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, data_dir: Optional[str] = None,
                      shuffle_buffer: int = 50_000,
                      interpolation: str = "bicubic_antialias", flip: bool = True) -> HostIterator:
  """Infinite iterator of host-local batches dict(view1=uint8 (b, S, S, 3), view2=uint8
  (b, S, S, 3), label=int32 (b,)), b = global_batch_size // process_count. Each view is an
  independent random-resized crop (area `crop_scale`, ratio 3/4..4/3, resized to S with
  `interpolation`, see INTERPOLATIONS) and, with `flip`, a horizontal flip with probability 1/2.
  Batch k is a pure function of (seed, process_index, process_count, k): `start_step=k`
  resumes exactly. `shuffle_buffer` only matters for TFDS sources (see the module doc)."""
  return _train_iterator(
      source, split, global_batch_size=global_batch_size, image_size=image_size,
      crop_scale=crop_scale, seed=seed, start_step=start_step, process_index=process_index,
      process_count=process_count, data_dir=data_dir, shuffle_buffer=shuffle_buffer,
      interpolation=interpolation, flip=flip, make_batch_element=_two_views)


def train_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                   image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), seed: int,
                   start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, data_dir: Optional[str] = None,
                   shuffle_buffer: int = 50_000,
                   interpolation: str = "bicubic_antialias", flip: bool = True) -> HostIterator:
  """Infinite labelled iterator for supervised transfer: dict(image=uint8 (b, S, S, 3),
  label=int32 (b,)), one random-resized crop + flip per example. Resumable like
  `pretrain_iterator`."""
  return _train_iterator(
      source, split, global_batch_size=global_batch_size, image_size=image_size,
      crop_scale=crop_scale, seed=seed, start_step=start_step, process_index=process_index,
      process_count=process_count, data_dir=data_dir, shuffle_buffer=shuffle_buffer,
      interpolation=interpolation, flip=flip, make_batch_element=_one_view)


def eval_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                  image_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, data_dir: Optional[str] = None,
                  resize_mode: str = "center_crop",
                  interpolation: str = "bicubic_antialias") -> EvalIterator:
  """One pass over this host's share, in order: dict(image=uint8 (b, S, S, 3), label=int32 (b,),
  mask=bool (b,)). Every host yields ceil(largest share / b) batches; padding and unreadable
  files have mask False (and label -1). resize_mode: "center_crop" (central 87.5% square,
  resized to S) or "resize" (the whole image squashed to S x S)."""
  b, p, P = _check_layout(global_batch_size, image_size, process_index, process_count)
  if resize_mode not in ("center_crop", "resize"):
    raise DataError(f"resize_mode must be 'center_crop' or 'resize', got {resize_mode!r}")
  check_interpolation(interpolation)
  data = _host_data(source, split, data_dir, p, P)

  if data.load is not None:
    def element(i):
      image, label = data.load(i)
      return dict(image=_eval_view(image, image_size, resize_mode, interpolation), label=label,
                  _pos=i)

    ds = tf.data.Dataset.range(data.n_local).map(
        element, num_parallel_calls=_AUTOTUNE, deterministic=True)
    if data.fallible:
      ds = ds.ignore_errors()
  else:
    label_of, _, _ = _tfds_labels(data.builder)

    def element(i, ex):
      label = label_of(ex)
      image = _eval_view(_decode(ex["image"]), image_size, resize_mode, interpolation)
      return dict(image=image, label=label, _pos=i)

    ds = _tfds_read(data.builder, data.host_split, data.info.name).enumerate().map(
        element, num_parallel_calls=_AUTOTUNE, deterministic=True).ignore_errors()
  ds = _options(ds.batch(b).prefetch(_AUTOTUNE))
  num_batches = math.ceil(data.n_max_local / b)
  return EvalIterator(ds.as_numpy_iterator(), b, data.info, data.n_local, num_batches,
                      image_size)
