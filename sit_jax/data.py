"""Host input pipeline: TFDS datasets, image folders and an embedded offline dataset -> per-host
numpy batches of uint8 crops.

The host only decodes, crops, resizes and flips; photometric augmentation runs on the
accelerator (augment.py). The trainer turns these host-local batches into global jax.Arrays with
jax.make_array_from_process_local_data. With resize_on='device' the training iterators leave
the crop, resize and flip to the accelerator too (resample.py): the host decodes, draws the same
windows and flips, and sends the decoded image.

Sources (`source` argument):
  "tfds:NAME[/CONFIG][:SPLIT]" or a bare "NAME[/CONFIG]"  a TFDS dataset (`split` like "train",
      "train+unlabelled", "train[:90%]"; `data_dir` as in tfds). Never downloads.
  "folder:/path"  an image folder (files ending in IMAGE_EXTENSIONS; the others are named in one
      warning; hidden files and folders and TOOL_FOLDERS are not read). Sub-directories of the
      root are classes (sorted by name -> label index, searched recursively); without
      sub-directories every image has label -1.
      If `<path>/<split>` is a directory (in any case: Train/) it is used instead of the root
      (ImageNet-style train/ and val/ folders). Without one, "train" (or no split) is the
      whole folder and any other split name is an error: a "test" split never silently reads
      the training images; carve held-out splits from "train" with slices instead. The
      val/test splits of a transfer run must have the train split's class folders
      (`DatasetInfo.classes`).
  "embedded:digits"  scikit-learn's bundled 8x8 digits (1797 images, labels 0-9), upsampled
      bicubically to 32x32 RGB; split "train" (1500) / "test" (297) / "all" after a fixed shuffle.
  Folder and embedded splits take a TFDS-style slice, "train[:1200]", "train[80%:]": the
  examples of that range of a fixed shuffle of the split (seed 0), so a validation split can be
  carved from train ("train[:80%]" to train on, "train[80%:]" to choose a recipe on).
  "embedded:digits_multilabel"  the same images with multi-hot labels (12,): the digit, odd, >= 5.

Engines (`engine` argument):
  "grain" (default)  every source. TFDS datasets must be prepared as array_record (README:
      "Input engines"); they are read with tfds.data_source, i.e. random access, no TensorFlow.
      Batches are built by grain (threads, and `workers` processes when > 0).
  "tf"  TFDS datasets prepared as TFRecord (what `tfds build` writes by default), read with
      tf.data (data_tf.py; needs `pip install "sit_jax[tf]"`, imported only then).
Both engines decode with PIL and crop with the same code (below), so their crops have the same
statistics.

Host work per image: the JPEG is decoded once for all its views, at 1/2, 1/4 or 1/8 scale in the
DCT domain (PIL's `draft`) when every crop still has at least the output size at that scale;
each view is then one crop-and-resize from the decoded image (here or, with resize_on='device',
on the accelerator).

Determinism and resuming. A training iterator's batches are a pure function of (seed,
process_index, process_count, step), so `start_step=k` yields exactly what a fresh iterator
yields from its k-th batch on; no iterator state needs saving. Each host reads an infinite stream
of its own examples, one permutation per epoch, epochs following each other without a gap; crop
and flip randomness is keyed on the element's place in the stream.
  - grain: position t of the stream is example permutation(seed, host, t // n)[t mod n], computed
    directly, so starting at any step costs nothing. Batch k is built from its own candidate
    list: positions k*b .. k*b+b-1 and, after them, spare random examples used only to replace
    unreadable files. Batch k thus stays the same whatever happened to earlier batches, and it is
    always full. `num_skipped` counts the unreadable files met.
  - tf: records can only be read in order, so each epoch is the host's split read in a fixed
    order through a shuffle buffer seeded by (seed, host, epoch); resuming skips the first
    records of the current epoch before decoding (no decode, but the skipped records are still
    read). Shuffling is local to the buffer (`shuffle_buffer` examples); TFDS stores examples
    already shuffled. An unreadable record is skipped and counted; the batches after it then
    start one record later than in a run that met none, so exact resume needs readable records.

Multi-host: each process reads only its share: examples p, p+P, p+2P, ... of the split (grain),
tfds.even_splits(split, P)[p] of a TFDS split (tf). Evaluation pads the last batches (mask False)
so that every host yields the same number of batches.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import gzip
import importlib.util
import io
import math
import os
import re
import signal
import unicodedata
from typing import Callable, Iterator, Optional, Sequence

from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import features as pil_features

from sit_jax import resample

ENGINES = ("grain", "tf")
RESIZE_ON = ("host", "device")


def _pillow_reads_avif() -> bool:
  try:
    return pil_features.check_module("avif")
  except ValueError:  # a Pillow before 11.2, which has no AVIF plugin
    return False


# The files a folder: source reads, by the endings that Pillow decodes them by: JPEG (also as
# Windows and browsers save it, .jfif, .jpe), PNG, BMP, GIF, WebP, TIFF, Netpbm (a camera's or a
# converter's .ppm, grey .pgm, black and white .pbm) and, where this Pillow reads it, a phone's
# AVIF.
IMAGE_EXTENSIONS = ((".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif",
                     ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
                    + ((".avif",) if _pillow_reads_avif() else ()))
EVAL_CROP_FRACTION = 0.875  # "center_crop": central 87.5% square of the image, then resize
DIGITS_TRAIN = 1500
_MAX_SPARES = 64  # extra candidates per batch (plus the batch size again) to replace bad files
# What PIL raises on data that is not a readable image (truncated, garbage, a bomb): what a
# reader of image files catches to skip or name that file.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
  """A dataset cannot be used as asked (bad name, arguments, empty folder, ...)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """The data is not where it should be (missing folder, TFDS dataset not prepared)."""


class SplitNotFound(DataError):
  """A folder has no sub-folder for the split asked for, and that split is not 'train'."""

  def __init__(self, message: str, split_folders: Sequence[str] = ()):
    super().__init__(message)
    self.split_folders = tuple(split_folders)  # the split folders the folder does have


class UnreadableImage(ValueError):
  """One image cannot be read or decoded: the pipelines skip it and count it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_examples: int  # in the whole split, all hosts together
  num_classes: int  # 0 when the source has no labels
  name: str
  multilabel: bool = False  # labels are multi-hot int32 vectors (num_classes,), not class ids
  classes: tuple[str, ...] = ()  # label i = classes[i]: a folder's class folders, a TFDS
  # ClassLabel's names (not those it makes up from its number of classes: '0', '1', ...); else ()
  root: str = dataclasses.field(default="", compare=False)  # what a folder split reads
  indices: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)
  # the examples of `root` (a sorted file list), of an embedded or of a TFDS dataset (ids over
  # all its splits) that the split keeps
  labels: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)
  # the split's labels where its listing gives them (a folder, an embedded dataset), so that
  # they are known before any image is read; None for TFDS, whose labels are in its records


# ============================================================================================
# Sources
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class _Strided:
  """Position in the split of host p's i-th example when host p reads examples p, p + P, ..."""
  p: int
  P: int

  def __call__(self, i: int) -> int:
    return self.p + i * self.P


@dataclasses.dataclass
class _HostData:
  """One host's share of a split, ready for a pipeline."""
  info: DatasetInfo
  n_local: int  # examples of this host
  n_max_local: int  # the largest share over all hosts
  # grain: load(local index) -> (encoded image bytes or uint8 (h, w, 3), int32 label).
  load: Optional[Callable] = None
  # tf engine: the builder, this host's split and its labels (_tfds_labels).
  builder: object = None
  host_split: object = None
  labels: tuple = ()
  # local index (tf engine: the record's tfds_id, place read) -> the example's position in the
  # split, so that what the hosts evaluate can be put back in the split's order whatever the
  # number of processes.
  position: Callable = _Strided(0, 1)


def _parse_source(source: str, split: Optional[str]):
  if not isinstance(source, str) or not source:
    raise DataError(f"source must be a non-empty string, got {source!r}")
  kind, sep, rest = source.partition(":")
  if sep and kind in ("folder", "embedded"):
    return kind, rest, split
  rest = rest if (sep and kind == "tfds") else source
  if rest.startswith(("/", "~", "./", "../")):  # tfds would fail to parse it as a builder name
    raise DataError(f"source {source!r} is a path, not a TFDS name: an image folder is "
                    f"'folder:{rest}'")
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


def engine_options(data_config) -> dict:
  """The engine keywords of the iterators from a config's `data` block (defaults where absent):
  data.engine and data.workers."""
  return dict(engine=data_config.get("engine", "grain"), workers=data_config.get("workers", 0))


def resize_options(data_config) -> dict:
  """The resize keywords of the training iterators from a config's `data` block: data.resize_on
  (resample.resize_on) and data.decoded_size."""
  return dict(resize_on=resample.resize_on(data_config),
              decoded_size=data_config.get("decoded_size", 0))


def _check_engine(engine):
  if engine not in ENGINES:
    raise DataError(f"Unknown data.engine {engine!r}: choose one of {ENGINES}.")


def _strided_share(n, process_index, process_count):
  """(examples of this host, of the largest share, their positions in the split)."""
  return (len(range(process_index, n, process_count)), -(-n // process_count),
          _Strided(process_index, process_count))


# ----- slices of folder and embedded splits -------------------------------------------------
_SLICE = re.compile(r"^(?P<base>[^\[\]]*)\[(?P<part>[^\[\]]*)\]$")


def split_slice(split):
  """'train[:80%]' -> ('train', ':80%'); 'train' -> ('train', None)."""
  match = _SLICE.match(split or "")
  if not match:
    return split, None
  return match["base"], match["part"]


def _slice_bound(text, n, split):
  """A bound as TFDS reads it: percentages rounded to the closest example, and beyond the
  split (more than 100% or n examples, either sign) an error, not the whole split."""
  text = text.strip()
  if not text:
    return None
  try:
    percent = text.endswith("%")
    bound = float(text[:-1]) if percent else int(text)
  except ValueError:
    raise DataError(f"bad slice {split!r}: use integers or percentages, e.g. 'train[:1200]' or "
                    "'train[80%:]'") from None
  if abs(bound) > (100 if percent else n):
    raise DataError(f"bad slice {split!r}: {text} is beyond the split's "
                    f"{'100%' if percent else f'{n} examples'}")
  return int(round(bound * n / 100)) if percent else bound


def slice_indices(n, part, split):
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
    raise DataError(f"split {split!r} selects no examples of the split's {n}: widen the slice.")
  return np.sort(chosen)


# ----- embedded -----------------------------------------------------------------------------
_DIGITS_CACHE = {}


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 handwritten digits, as load_digits gives them: (images float64
  (1797, 8, 8), ink 0..16; labels int). Read from the CSV that scikit-learn ships (no download)
  without importing scikit-learn, whose import costs every run that reads the digits 1-2 CPU s;
  through load_digits where that file is not where scikit-learn 1.x keeps it."""
  spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # 64 pixels, then the label, per row
      return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
  from sklearn.datasets import load_digits
  digits = load_digits()
  return digits.images, digits.target


def embedded_digits():
  """embedded:digits, all of it: (images uint8 (1797, 32, 32, 3), labels int32) in the fixed
  shuffled order whose slices are its splits."""
  if "all" not in _DIGITS_CACHE:
    images, labels = sklearn_digits()
    small = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BICUBIC))
                    for x in small])
    order = np.random.default_rng(0).permutation(len(big))
    _DIGITS_CACHE["all"] = (np.repeat(big[order, :, :, None], 3, axis=-1),
                            labels[order].astype(np.int32))
  return _DIGITS_CACHE["all"]


def _digits_multilabel(labels):
  """Multi-hot (n, 12): the digit (10 classes), 'odd', '>= 5'; for offline multi-label tests."""
  return np.concatenate([np.eye(10, dtype=np.int32)[labels], (labels % 2)[:, None],
                         (labels >= 5)[:, None].astype(np.int32)], axis=1)


class _ArrayLoader:
  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __call__(self, i):
    return self.images[i], self.labels[i]

  def name(self, i):
    return f"example {i}"


def _embedded(name, split, p, P):
  if name not in ("digits", "digits_multilabel"):
    raise DataError(f"unknown embedded dataset {name!r}; available: 'digits', "
                    "'digits_multilabel'")
  images, labels = embedded_digits()
  if name == "digits_multilabel":
    labels = _digits_multilabel(labels)
  ranges = {"train": slice(0, DIGITS_TRAIN), "test": slice(DIGITS_TRAIN, None),
            "all": slice(None)}
  base, part = split_slice(split)
  if base not in ranges:
    raise DataError(f"embedded:{name} has splits {sorted(ranges)} (optionally sliced, e.g. "
                    f"'train[:80%]'), got {split!r}")
  indices = np.arange(len(labels))[ranges[base]]  # into the whole dataset
  images, labels = images[ranges[base]], labels[ranges[base]]
  keep = slice_indices(len(labels), part, split)
  images, labels = images[keep], labels[keep]
  n = len(labels)
  n_local, n_max, position = _strided_share(n, p, P)
  info = DatasetInfo(n, labels.shape[-1] if labels.ndim > 1 else 10,
                     f"embedded:{name}/{split}", multilabel=labels.ndim > 1,
                     root=f"embedded:{name}", indices=indices[keep], labels=labels)
  return _HostData(info, n_local, n_max, load=_ArrayLoader(images[p::P], labels[p::P]),
                   position=position)


# ----- image folder -------------------------------------------------------------------------
def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _extension(name):
  return os.path.splitext(name)[1].lower() or name


# Folders that tools write beside the images, holding the tool's files, never the user's: a
# Synology NAS's thumbnails (@eaDir/<photo>.jpg/SYNOFILE_THUMB_*.jpg, several per photo: read,
# they would outnumber the photos) and a macOS zip's AppleDouble files (__MACOSX/). Like hidden
# folders, they are neither classes nor read.
TOOL_FOLDERS = ("@eaDir", "__MACOSX")


def _is_listed(name):
  """Whether a folder's entry is read at all: hidden entries and TOOL_FOLDERS are not."""
  return not name.startswith(".") and name not in TOOL_FOLDERS


def _inode(path):
  stat = os.stat(path)
  return stat.st_dev, stat.st_ino


def _list_images(directory, left_out: collections.Counter, seen: set):
  """Image paths under `directory`, sorted; the other files (not hidden) counted by extension
  into `left_out`. Symbolic links are followed, each directory read once (`seen`: inodes of the
  directories read so far; a link to a parent would list the same files again and again)."""
  found = []
  for root, dirs, files in os.walk(directory, followlinks=True):
    if _inode(root) in seen:
      dirs[:] = []
      continue
    seen.add(_inode(root))
    dirs[:] = [d for d in dirs if _is_listed(d)]
    for f in files:
      if f.startswith("."):
        continue
      if _is_image(f):
        found.append(os.path.join(root, f))
      else:
        left_out[_extension(f)] += 1
  return sorted(found, key=name_order)


@functools.lru_cache(maxsize=16)
def _warn_left_out(root, left_out: tuple):
  """Once per folder: the files that are not read, so that none go missing unnoticed."""
  avif_unread = (".avif" not in IMAGE_EXTENSIONS
                 and any(ext.startswith(".avif") for ext, _ in left_out))
  logging.warning("folder:%s: %d file(s) not read (%s); read are the files ending in %s, in "
                  "the class folders when there are any.%s", root, sum(n for _, n in left_out),
                  ", ".join(f"{ext} {n}" for ext, n in left_out), " ".join(IMAGE_EXTENSIONS),
                  " This Pillow cannot decode AVIF: `pip install -U 'pillow>=11.2'` reads "
                  ".avif too." if avif_unread else "")


@functools.lru_cache(maxsize=16)
def _warn_empty_classes(root, empty: tuple, num_classes: int):
  """Once per folder: class folders without an image keep their labels' places, but a split
  trained on never sees those classes."""
  logging.warning("folder:%s: %d of its %d class folders hold no image (%s%s): their labels "
                  "have no example in this split (trained on, it never learns them; held out, "
                  "no image is scored on them).", root, len(empty), num_classes,
                  ", ".join(empty[:5]), ", ..." if len(empty) > 5 else "")


def _composed(name: str) -> str:
  return unicodedata.normalize("NFC", name)


def name_order(name: str):
  """Sort key of file names in one Unicode form (a Mac writes them decomposed, most systems
  composed): a copied folder lists its files in the same order, so its slices ('train[:90%]')
  and epochs hold the same images."""
  return _composed(name), name


def list_folder(root):
  """The images a folder: source reads, as (paths, labels, class names); classes are the root's
  sub-directories sorted by name (in Unicode NFC form)."""
  if not os.path.isdir(root):
    raise DataNotFoundError(f"image folder {root!r} does not exist")
  entries = sorted(filter(_is_listed, os.listdir(root)), key=name_order)
  # Class names in one Unicode form (a Mac writes them decomposed, most systems composed), so
  # that the same classes get the same labels whatever made each folder.
  folders = sorted((e for e in entries if os.path.isdir(os.path.join(root, e))), key=_composed)
  classes = [_composed(e) for e in folders]
  left_out = collections.Counter()
  if classes:
    paths, labels = [], []
    empty = []
    for label, folder in enumerate(folders):
      files = _list_images(os.path.join(root, folder), left_out, seen={_inode(root)})
      paths += files
      labels += [label] * len(files)
      if not files:
        empty.append(classes[label])
    if empty and paths:
      _warn_empty_classes(root, tuple(empty), len(classes))
    # Files beside the class folders belong to no class.
    left_out.update(f"{_extension(e)} (beside the class folders)" for e in entries
                    if e not in folders)
  else:
    paths = [os.path.join(root, e) for e in entries if _is_image(e)]
    left_out.update(_extension(e) for e in entries if not _is_image(e))
    labels = [-1] * len(paths)
  if left_out:
    _warn_left_out(root, tuple(sorted(left_out.items())))
  beside = sum(_is_image(e) for e in entries if e not in folders) if classes else 0
  if beside > len(paths):  # e.g. a flat folder with a thumbs/ sub-folder
    raise DataError(f"folder:{root}: its sub-folders ({', '.join(classes[:5])}) are read as "
                    f"classes and hold {len(paths) or 'no'} image{'' if len(paths) == 1 else 's'}; "
                    f"the {beside} images beside them belong to no class. Move the images into "
                    "class folders, or the sub-folders out.")
  if not paths:
    raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {root!r}")
  return paths, np.asarray(labels, np.int32), classes


class _FileLoader:
  def __init__(self, paths, labels):
    self.paths, self.labels = paths, labels

  def __call__(self, i):
    try:
      with open(self.paths[i], "rb") as f:
        return f.read(), self.labels[i]
    except OSError as e:
      raise UnreadableImage(e.strerror or str(e)) from e

  def name(self, i):
    return self.paths[i]


SPLIT_FOLDERS = ("train", "val", "validation", "test")
SPLIT_ALIASES = {"validation": ("val",), "val": ("validation",)}


def folder_split(path: str, split: Optional[str]) -> tuple[str, Optional[str]]:
  """(the directory a split of the image folder `path` reads, the split's slice or None).

  `<path>/<split>` when it is a folder (in any case: Train/ and Val/ are splits too, not two
  classes; 'validation' reads val/ where there is no validation/, and 'val' validation/).
  Otherwise 'train' (or no split) is the whole folder, unless the folder has split folders,
  and any other split is an error: read as the whole folder, a 'test' split would score the
  training images. A split folder that holds images but no class folders, beside
  folders that are not split names, is a class that shares a split's name (classes bicycle,
  bus, car, train): an error too."""
  root = os.path.expanduser(path)
  base, part = split_slice(split)
  subdirs = sorted(e for e in os.listdir(root)
                   if _is_listed(e) and os.path.isdir(os.path.join(root, e))) \
      if os.path.isdir(root) else []
  split_dirs = [d for d in subdirs if d in SPLIT_FOLDERS]
  if base and base not in subdirs:
    # In any case, and 'validation' (TFDS's name, the configs' default) as val/ (ImageNet's
    # folders) or the other way round.
    names = {base.lower(), *SPLIT_ALIASES.get(base.lower(), ())}
    base = next((d for d in subdirs if d.lower() == base.lower()),
                next((d for d in subdirs if d.lower() in names), base))
  if base and base in subdirs:
    chosen = os.path.join(root, base)
    others = [d for d in subdirs if d.lower() not in SPLIT_FOLDERS]
    if others and not any(os.path.isdir(os.path.join(chosen, e)) for e in os.listdir(chosen)):
      raise DataError(f"folder:{root}: is {base}/ the {base!r} split or a class beside "
                      f"{', '.join(others[:5])}? It holds images but no class folders. Rename "
                      f"the class folder, or put the splits in folders of their own.")
    return chosen, part
  if base in (None, "", "train") and not split_dirs:
    return root, part
  if split_dirs:
    raise SplitNotFound(f"folder:{root} has no {base}/ folder for split {split!r}; its split "
                        f"folders are {', '.join(split_dirs)}.", split_dirs)
  raise SplitNotFound(
      f"folder:{root} has no {base}/ folder, and split {split!r} read as the whole folder would "
      f"hold the training images: carve it from the folder with slices of 'train' (e.g. "
      f"'train[:90%]' to train on, 'train[90%:]' held out) or add a {base}/ folder.")


def _folder(path, split, p, P):
  root, part = folder_split(path, split)
  paths, labels, classes = list_folder(root)
  keep = slice_indices(len(paths), part, split)
  paths, labels = [paths[i] for i in keep], labels[keep]
  n_local, n_max, position = _strided_share(len(paths), p, P)
  info = DatasetInfo(len(paths), len(classes),
                     f"folder:{root}" + (f"[{part}]" if part is not None else ""),
                     # The folder's real path: 'folder:/x/' and a link to /x read the same images.
                     classes=tuple(classes), root=os.path.realpath(root), indices=keep,
                     labels=labels)
  return _HostData(info, n_local, n_max, load=_FileLoader(paths[p::P], labels[p::P]),
                   position=position)


# ----- TFDS ---------------------------------------------------------------------------------
def _tfds_builder(name, data_dir):
  import tensorflow_datasets as tfds  # imports TensorFlow only if it is installed
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split("/")[0].lower(), known, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise DataError(f"unknown TFDS dataset {name!r}.{hint} See tfds.list_builders().") from None
  except ValueError as e:  # e.g. an unknown config
    raise DataError(f"cannot open TFDS dataset {name!r}: {e}") from None


def tfds_not_prepared(builder, name, engine="grain") -> DataNotFoundError:
  """The error of a TFDS dataset not prepared in the builder's data_dir, with the command that
  prepares it in `engine`'s file format."""
  root = builder.data_dir_root
  # The `tfds build` command needs apache-beam in tfds 4.9.10; the Python call does not.
  file_format = ", file_format='array_record'" if engine == "grain" else ""
  build = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
           f"data_dir='{root}'{file_format}).download_and_prepare()\" (writing needs "
           f"TensorFlow: pip install 'sit_jax[tf]')")
  if builder.name == "imagenet2012":
    return DataNotFoundError(
        f"TFDS dataset imagenet2012 is not prepared in {root}. It needs a manual download: "
        f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
        f"{os.path.join(root, 'downloads', 'manual')}/ then run: {build}")
  manual = ""
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    manual = (f" It needs a manual download into {os.path.join(root, 'downloads', 'manual')}/"
              f" first: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
  return DataNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {root}.{manual} Prepare it once (this "
      f"downloads) with: {build}")


def _tfds_labels(builder):
  """(value -> int32 label, num_classes, multilabel, path): `path` leads from an example to its
  labels (() for none) and the function turns the value there into the label. A 'label'
  ClassLabel gives class ids; without one, a 'labels' Sequence(ClassLabel) (e.g. voc/2007) or
  the 'label' of an 'objects' sequence (coco/2017: each annotated object's class) gives
  multi-hot vectors of the classes present."""
  import tensorflow_datasets as tfds
  features = builder.info.features
  if "label" in features:
    return (lambda value: np.int32(np.asarray(value)),
            getattr(features["label"], "num_classes", 0) or 0, False, ("label",))
  for path in (("labels",), ("objects", "label")):
    feature = _tfds_feature(builder, path)
    if isinstance(feature, tfds.features.ClassLabel):
      c = feature.num_classes

      def multi_hot(value, c=c):
        hot = np.zeros(c, np.int32)
        hot[np.asarray(value, np.int64)] = 1
        return hot
      return multi_hot, c, True, path
  return lambda value: np.int32(-1), 0, False, ()


def _tfds_feature(builder, path):
  """The feature at `path` (a Sequence's: its element's), or None."""
  feature = builder.info.features
  for key in path:
    if key not in getattr(feature, "keys", tuple)():
      return None
    feature = getattr(feature[key], "feature", feature[key])
  return feature


def _tfds_class_names(builder, path) -> tuple[str, ...]:
  """The names of the ClassLabel at `path` (of _tfds_labels); () for none, and for the names a
  ClassLabel of a number of classes makes up ('0', '1', ...: they name nothing)."""
  names = tuple(getattr(_tfds_feature(builder, path), "names", None) or ())
  return () if names == tuple(map(str, range(len(names)))) else names


def labels_at(example, path):
  """The value at `path` (of _tfds_labels) in an example: a dict, or a tf.data element."""
  for key in path:
    example = example[key]
  return example


def tfds_examples(builder, split) -> Optional[np.ndarray]:
  """The examples of a TFDS split (slices and '+' parts) as ids over all of the dataset's
  splits, so that shared_examples sees overlapping slices ('train[:98%]', 'train[90%:]'); None
  where the metadata has no sizes (tfds.testing.mock_data)."""
  import tensorflow_datasets as tfds
  splits = builder.info.splits
  try:
    sizes = {name: splits[name].num_examples for name in splits.keys()}
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])))
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
  except (KeyError, ValueError, TypeError, AssertionError):
    return None
  return np.unique(np.concatenate(
      [offsets[a.splitname] + np.arange(a.from_ or 0, sizes[a.splitname] if a.to is None else a.to)
       for a in parts]))


class _TfdsLoader:
  """Host-local random access to a TFDS array_record split; images stay encoded."""

  def __init__(self, source, labels, p, P):
    self.source, self.p, self.P = source, p, P
    self.label_of, _, _, self.path = labels  # _tfds_labels(builder)

  def __call__(self, i):
    ex = self.source[self.p + i * self.P]
    return ex["image"], self.label_of(labels_at(ex, self.path))

  def name(self, i):
    return f"example {self.p + i * self.P}"


def _tfds(name, split, data_dir, p, P, engine):
  builder = _tfds_builder(name, data_dir)
  if "image" not in builder.info.features:
    raise DataError(f"TFDS dataset {name!r} has no 'image' feature")
  labels = _tfds_labels(builder)
  _, num_classes, multilabel, path = labels
  classes = _tfds_class_names(builder, path)
  if engine == "tf":
    from sit_jax import data_tf
    n, n_local, n_max, host_split, position = data_tf.host_share(builder, name, split, p, P)
    reader = dict(builder=builder, host_split=host_split, labels=labels)
  else:
    source = _tfds_source(builder, name, split, data_dir)
    n = len(source)
    n_local, n_max, position = _strided_share(n, p, P)
    reader = dict(load=_TfdsLoader(source, labels, p, P))
  if not n:
    raise DataError(f"TFDS split {name}:{split} is empty")
  info = DatasetInfo(n, num_classes, f"tfds:{name}/{split}", multilabel=multilabel,
                     classes=classes, root=f"tfds:{name}", indices=tfds_examples(builder, split))
  return _HostData(info, n_local, n_max, position=position, **reader)


def _tfds_source(builder, name, split, data_dir):
  """grain's random access to a TFDS split prepared as array_record; images stay encoded."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError, KeyError, AssertionError) as e:
    if not builder.is_prepared():
      raise tfds_not_prepared(builder, name) from None
    if isinstance(e, NotImplementedError):  # no random access to this file format
      raise DataError(
          f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
          f"{builder.info.file_format.value}; the default engine 'grain' reads array_record. "
          f"Convert it (README: 'Input engines') or read it with TensorFlow: "
          f"pip install 'sit_jax[tf]' and set data.engine='tf'.") from None
    raise DataError(f"TFDS dataset {name!r}: bad split {split!r}: {e}") from None


def _host_data(source, split, data_dir, p, P, engine="grain"):
  _check_engine(engine)
  kind, name, split = _parse_source(source, split)
  if kind != "tfds" and engine != "grain":
    raise DataError(f"data.engine {engine!r} reads TFDS datasets only; {kind} sources use the "
                    f"default engine 'grain'.")
  if kind == "embedded":
    data = _embedded(name, split, p, P)
  elif kind == "folder":
    data = _folder(name, split, p, P)
  else:
    data = _tfds(name, split, data_dir, p, P, engine)
  from sit_jax import distributed
  if distributed.joined():  # each host reads its own copy (a folder on its disk, say)
    distributed.check_same_data(data.info.name, data.info.num_examples,
                                data.info.classes or data.info.num_classes)
  return data


def shared_examples(a, b) -> int:
  """How many examples two splits of one dataset have in common (0 where a TFDS dataset's
  metadata has no split sizes). a, b: DatasetInfo, or anything with its `root` and `indices`
  (segment_data.SegmentationData)."""
  if not a.root or a.root != b.root or a.indices is None or b.indices is None:
    return 0
  return len(np.intersect1d(a.indices, b.indices))


def check_disjoint(train, held_out, train_key: str, held_out_key: str):
  """A held-out split must share no example with the training split (`shared_examples`)."""
  shared = shared_examples(train, held_out)
  if shared:
    raise DataError(f"{held_out_key} ({held_out.name}) holds {shared} of the {train.num_examples} "
                    f"images of {train_key} ({train.name}): make them disjoint slices, e.g. "
                    f"'train[:90%]' and 'train[90%:]'.")


def check_held_out(train: DatasetInfo, held_out: DatasetInfo, train_key: str, held_out_key: str):
  """A held-out split must share no example with the training split, and a folder split must
  have the training split's class folders, so that label i names the same class in both; the
  training split needs two classes or more, with one every held-out image is scored right."""
  check_disjoint(train, held_out, train_key, held_out_key)
  if train.num_classes == 1 and not train.multilabel:
    inside = (f" If {train.classes[0]}/ holds the class folders, move them up a level: a "
              "folder's classes are its sub-folders." if train.name.startswith("folder:")
              and train.classes else "")
    raise DataError(f"{train.name} ({train_key}) has one class, so every {held_out_key} image "
                    f"would be scored right.{inside}")
  if train.classes and not held_out.classes:  # its images would all have label -1
    raise DataError(f"{held_out.name} ({held_out_key}) has no class folders, {train.name} "
                    f"({train_key}) has {len(train.classes)}: put its images in the same "
                    f"class folders ({', '.join(train.classes[:5])}"
                    f"{', ...' if len(train.classes) > 5 else ''}).")
  if train.classes and held_out.classes != train.classes:
    missing = sorted(set(train.classes) - set(held_out.classes))
    extra = sorted(set(held_out.classes) - set(train.classes))
    raise DataError(
        f"{held_out.name} ({held_out_key}) has other class folders than {train.name} "
        f"({train_key})" + (f"; missing: {', '.join(missing[:10])}" if missing else "")
        + (f"; not in {train_key}: {', '.join(extra[:10])}" if extra else "")
        + ". Label i is the i-th class folder by name, so give both the same folders (an empty "
        "folder keeps a class's place).")


def dataset_info(source: str, split: Optional[str], data_dir: Optional[str] = None,
                 engine: str = "grain", workers: int = 0) -> DatasetInfo:
  """Size (whole split), number of classes and name of a source. `workers` is unused: it lets
  every call take `**engine_options(config.data)`."""
  del workers
  return _host_data(source, split, data_dir, 0, 1, engine).info


# ============================================================================================
# Image ops (PIL, on the host)
# ============================================================================================
# data.interpolation -> (PIL filter, antialias when shrinking). The default is what PIL and
# torchvision do (the authors' pipeline). Without antialiasing each output pixel samples a few
# input pixels, as tf.image.resize(antialias=False) did for faster TF hosts; in PIL that path
# (an EXTENT transform) is not faster: 'bilinear' costs about the default's CPU time, 'bicubic'
# about twice (500x375 JPEGs, two 224 crops).
INTERPOLATIONS = {"bicubic_antialias": (Image.BICUBIC, True), "bicubic": (Image.BICUBIC, False),
                  "bilinear": (Image.BILINEAR, False)}


def check_interpolation(interpolation):
  if interpolation not in INTERPOLATIONS:
    raise DataError(f"Unknown data.interpolation {interpolation!r}: choose one of "
                    f"{sorted(INTERPOLATIONS)}.")


def crop_window(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w).

  Each try takes an area fraction uniform in `scale` and an aspect ratio (w / h) log-uniform in
  `ratio`, rounded half to even as Python's round; the first try that fits wins, at a uniform
  position. If none of the `attempts` fits: the centre crop of the whole image clipped to the
  ratio range.
  """
  u = rng.random((4, attempts))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_lo + (log_hi - log_lo) * u[1])
  ws = np.round(np.sqrt(area * aspect)).astype(np.int64)
  hs = np.round(np.sqrt(area / aspect)).astype(np.int64)
  fits = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
  if len(fits):
    j = fits[0]
    h, w = int(hs[j]), int(ws[j])
    return int(u[2, j] * (height - h + 1)), int(u[3, j] * (width - w + 1)), h, w
  in_ratio = width / height
  h, w = height, width
  if in_ratio < ratio[0]:
    h = int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w = int(round(height * ratio[1]))
  return (height - h) // 2, (width - w) // 2, h, w


def _open(image) -> Image.Image:
  """A PIL image of encoded bytes (only the header is read) or of a uint8 array."""
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  try:
    return Image.open(io.BytesIO(image))
  except Image.UnidentifiedImageError as e:  # its text names the BytesIO object only
    raise UnreadableImage("cannot identify image file (not an image PIL can read)") from e
  except PIL_ERRORS as e:
    raise UnreadableImage(str(e)) from e


def _decode(img: Image.Image, windows, size):
  """Decodes the opened `img` for (top, left, h, w) windows given in full-resolution pixels:
  (the RGB or L image, its scale), the scale > 1 when the JPEG was decoded at the smallest DCT
  scale (1/2, 1/4, 1/8) at which every window still has at least `size` pixels on each side: a
  box-filtered shrink, which the resize then finishes."""
  width, height = img.size
  smallest = min(min(h, w) for _, _, h, w in windows)
  factor = next((f for f in (8, 4, 2) if smallest >= f * size), 1)
  scale = 1
  try:
    # draft() is a no-op (None) unless JPEG; else its box is the image's extent after scaling.
    drafted = img.draft("RGB", (width // factor, height // factor)) if factor > 1 else None
    if drafted:
      scale = width / drafted[1][2]
    img.load()
  except PIL_ERRORS as e:
    raise UnreadableImage(str(e)) from e
  return rgb_or_grey(img), scale


def rgb_or_grey(img: Image.Image) -> Image.Image:
  """A decoded image as 8-bit 'RGB' or 'L'. 16-bit, 32-bit integer and float grey images are
  scaled, where PIL's convert clips at 255 (a 16-bit PNG would come out white, a float image in
  [0, 1] black): 'I;16*' is 16-bit; 'I' (an older PIL's 16-bit PNG) is read as 16-bit unless
  every value fits 8 bits; 'F' as [0, 1] unless a value exceeds 1, then as [0, 255]. Values
  beyond these ranges (a CT scan in Hounsfield units, an elevation map in metres) would be
  clipped: UnreadableImage."""
  if img.mode in ("RGB", "L"):
    return img
  if not img.mode.startswith(("I", "F")):
    return img.convert("RGB")
  pixels = np.asarray(img, np.float64)
  lo, hi = pixels.min(), pixels.max()
  if not 0 <= lo <= hi <= (255 if img.mode == "F" else 65535):  # NaN fails too
    raise UnreadableImage(
        f"its pixel values span {lo:g}..{hi:g}, beyond the ranges read as grey levels "
        f"({'[0, 1] or [0, 255] for float' if img.mode == 'F' else '[0, 65535] for integer'} "
        "images): rescale them into one")
  if img.mode.startswith("I;16") or (img.mode == "I" and hi > 255):
    pixels = pixels / 257.0
  elif img.mode == "F" and hi <= 1.0:
    pixels = pixels * 255.0
  return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _resize_views(img: Image.Image, windows, scale, size, interpolation):
  """Each window of the decoded `img` (in full-resolution pixels, `scale` x img's) resized to
  (size, size) uint8 RGB."""
  resample, antialias = INTERPOLATIONS[interpolation]
  views = []
  for top, left, h, w in windows:
    box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
    if antialias:
      view = img.resize((size, size), resample, box=box)
    else:
      view = img.transform((size, size), Image.Transform.EXTENT, box, resample)
    views.append(np.asarray(view.convert("RGB") if view.mode != "RGB" else view))
  return views


def _render(img: Image.Image, windows, size, interpolation):
  """Decodes the opened `img` once; each window resized to (size, size) uint8 RGB."""
  img, scale = _decode(img, windows, size)
  return _resize_views(img, windows, scale, size, interpolation)


def _random_windows(image, rng: np.random.Generator, n_views: int, scale):
  """The opened image and, drawn from `rng` in a fixed order, `n_views` crop windows and flips."""
  img = _open(image)  # reads the header only
  width, height = img.size
  windows = [crop_window(rng, height, width, scale) for _ in range(n_views)]
  return img, windows, rng.random(n_views) < 0.5


def random_views(image, rng: np.random.Generator, n_views: int, size: int,
                 scale: Sequence[float], interpolation: str, flip: bool = True):
  """`n_views` independent torchvision RandomResizedCrops (area fraction in `scale`, ratio
  log-uniform in 3/4..4/3) of one image, each resized to `size` and, with `flip`, mirrored with
  probability 1/2. The image is decoded once."""
  img, windows, flips = _random_windows(image, rng, n_views, scale)
  views = _render(img, windows, size, interpolation)
  return [v[:, ::-1] if flip and f else v for v, f in zip(views, flips)]


def decoded_views(image, rng: np.random.Generator, n_views: int, size: int,
                  scale: Sequence[float], interpolation: str, flip: bool, capacity: int):
  """The host's half of `random_views` when the accelerator resizes (resample.py): the same
  crops, as (pixels uint8 (h, w, 3) with h, w <= capacity, windows float32 (n_views, 4) as
  (top, left, height, width) in those pixels, flips bool (n_views,)).

  An image larger than capacity x capacity even after the DCT-domain shrink is resized here
  and its views sent side by side at scale 1, where the accelerator's resize is exact."""
  img, windows, flips = _random_windows(image, rng, n_views, scale)
  img, factor = _decode(img, windows, size)
  if max(img.size) <= capacity:
    pixels = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    boxes = np.asarray(windows, np.float32) / np.float32(factor)
  else:
    pixels = np.concatenate(_resize_views(img, windows, factor, size, interpolation), axis=1)
    boxes = np.asarray([(0, v * size, size, size) for v in range(n_views)], np.float32)
  return pixels, boxes, flips & flip


def eval_view(image, size: int, resize_mode: str, interpolation: str):
  """'center_crop': the central 87.5% square resized to `size`; 'resize': the whole image."""
  img = _open(image)
  width, height = img.size
  if resize_mode == "center_crop":
    side = max(1, int(round(min(height, width) * EVAL_CROP_FRACTION)))
    window = ((height - side) // 2, (width - side) // 2, side, side)
  else:
    window = (0, 0, height, width)
  return _render(img, [window], size, interpolation)[0]


# ============================================================================================
# Batches: pure functions of (seed, host, step)
# ============================================================================================
def _element_rng(seed, process_index, *place):
  return np.random.default_rng((seed & (2**63 - 1), process_index, *place))


@functools.lru_cache(maxsize=4)
def _epoch_order(n, seed, process_index, epoch):
  return _element_rng(seed, process_index, 0, epoch).permutation(n)


def view_keys(n_views):
  return ("image",) if n_views == 1 else tuple(f"view{v + 1}" for v in range(n_views))


def default_capacity(image_size: int, n_views: int = 2) -> int:
  """data.decoded_size 0: room for a 500 x 375 JPEG (ImageNet's usual size) at image_size 224,
  i.e. 16/7 of the view's side rounded up to 32, and for the views side by side."""
  return max(n_views * image_size, -(-image_size * 16 // (7 * 32)) * 32)


@dataclasses.dataclass(frozen=True)
class _Views:
  """How a training example becomes its views: resized here (capacity 0), or decoded into a
  (capacity, capacity, 3) buffer to be resized on the accelerator (resample.render_views)."""
  n_views: int
  size: int
  scale: tuple
  interpolation: str
  flip: bool
  capacity: int = 0

  @property
  def keys(self):
    return resample.DECODED_KEYS if self.capacity else view_keys(self.n_views)

  @property
  def specs(self):
    """(shape, dtype) of one example's array under each key."""
    if not self.capacity:
      return [((self.size, self.size, 3), np.uint8)] * self.n_views
    c, v = self.capacity, self.n_views
    return [((c, c, 3), np.uint8), ((2,), np.int32), ((v, 4), np.float32), ((v,), np.bool_)]

  def __call__(self, image, rng):
    """One example's arrays; a decoded image is not yet padded to the capacity (`stack`)."""
    if not self.capacity:
      return random_views(image, rng, self.n_views, self.size, self.scale, self.interpolation,
                          self.flip)
    pixels, windows, flips = decoded_views(image, rng, self.n_views, self.size, self.scale,
                                           self.interpolation, self.flip, self.capacity)
    return pixels, np.asarray(pixels.shape[:2], np.int32), windows, flips

  def stack(self, examples) -> dict:
    """The batch of `examples` (from __call__), each array zero-padded to its spec's shape."""
    batch = {}
    for i, (key, (shape, dtype)) in enumerate(zip(self.keys, self.specs)):
      batch[key] = np.zeros((len(examples), *shape), dtype)
      for j, example in enumerate(examples):
        batch[key][(j, *map(slice, example[i].shape))] = example[i]
    return batch


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Batch k of a host's training stream (see the module doc): a picklable callable, so that
  grain can run it in worker processes."""
  data: _HostData
  b: int
  seed: int
  process_index: int
  views: _Views

  def _example(self, k, slot):
    n = self.data.n_local
    if slot < self.b:
      t = k * self.b + slot
      return int(_epoch_order(n, self.seed, self.process_index, t // n)[t % n])
    return int(_element_rng(self.seed, self.process_index, 2, k, slot).integers(n))

  def __call__(self, k):
    examples, labels, unreadable = [], [], []
    slot = 0
    while len(labels) < self.b and slot < 2 * self.b + _MAX_SPARES:
      rng = _element_rng(self.seed, self.process_index, 1, k, slot)
      i = self._example(k, slot)
      try:
        image, label = self.data.load(i)
        examples.append(self.views(image, rng))
        labels.append(label)
      except UnreadableImage as e:
        unreadable.append(f"{self.data.load.name(i)}: {e}")
      slot += 1
    if len(labels) < self.b:
      return dict(_skipped=len(unreadable), _unreadable=unreadable, _short=True)
    return dict(self.views.stack(examples), label=np.asarray(labels, np.int32),
                _skipped=len(unreadable), _unreadable=unreadable)


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  data: _HostData
  b: int
  size: int
  resize_mode: str
  interpolation: str

  def __call__(self, k):
    info, b = self.data.info, self.b
    out = dict(image=np.zeros((b, self.size, self.size, 3), np.uint8),
               label=np.full((b, info.num_classes) if info.multilabel else (b,), -1, np.int32),
               mask=np.zeros((b,), bool), index=np.full((b,), -1, np.int32))
    unreadable = []
    for slot, i in enumerate(range(k * b, min((k + 1) * b, self.data.n_local))):
      try:
        image, label = self.data.load(i)
        out["image"][slot] = eval_view(image, self.size, self.resize_mode, self.interpolation)
      except UnreadableImage as e:
        unreadable.append(f"{self.data.load.name(i)}: {e}")
        continue
      out["label"][slot] = label
      out["mask"][slot] = True
      out["index"][slot] = self.data.position(i)
    return dict(out, _skipped=len(unreadable), _unreadable=unreadable)


def default_threads(workers: int = 0):
  """Threads that build batches in each grain process, one batch each: PIL decodes and resizes
  without the GIL. With `workers` processes the cores are shared out among them: each also
  holds a batch per thread, so 16 threads in each of 16 workers would hold 288 batches (58 GB
  of 512 x 512 decoded images at batch 256) for no more speed."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if workers:
    return max(1, (cores or 1) // workers)
  return max(2, min(16, cores or 1))


WORKER_BUFFER = 2  # batches each grain worker process holds ready for the training process


def prefetch_depth(workers: int, threads: int = 0) -> int:
  """How many batches a training pipeline holds ahead of the step once it is full: what a
  throughput measurement must draw before it times the steady rate."""
  threads = threads or default_threads(workers)
  return workers * (threads + WORKER_BUFFER) if workers else threads


def _leave_interrupts_to_the_trainer(worker_index, worker_count):
  """In each grain worker process: Ctrl-C reaches the whole process group, and the training
  process saves and stops (trainer.py); a worker would only print a KeyboardInterrupt
  traceback before it is shut down."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _grain_batches(make_batch, start, stop, workers, threads):
  import grain
  threads = threads or default_threads(workers)
  # A buffer of one batch per thread: more would only hold memory (per 256 images: 77 MB of two
  # 224 views, 201 MB of 512 x 512 decoded images with resize_on='device').
  ds = grain.MapDataset.range(start, stop).map(make_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library user has none
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=WORKER_BUFFER),
                        worker_init_fn=_leave_interrupts_to_the_trainer)
  return iter(ds)


# ============================================================================================
# Iterators
# ============================================================================================
def class_counts(info: DatasetInfo, labels) -> np.ndarray:
  """Per class of `info`, the examples of `labels` (class ids, -1 for none, or multi-hot rows)
  that hold it."""
  labels = np.asarray(labels)
  if info.multilabel:
    return labels.sum(0)
  return np.bincount(labels[labels >= 0], minlength=info.num_classes)


class HostIterator:
  """Iterator of host-local numpy batches. `num_skipped` counts unreadable images met so far."""

  def __init__(self, batches: Iterator[dict], batch_size: int, info: DatasetInfo,
               start_step: int = 0, epoch_batches: int = 0):
    self._batches = batches
    self.batch_size = batch_size
    self.info = info
    self.step = start_step  # index of the next batch
    self.num_skipped = 0
    self.first_unreadable = ""  # "file: reason" of the first unreadable image named
    # A training stream's first `epoch_batches` batches hold every readable example of this
    # host's share (its first epoch): their labels tell which classes the split holds where
    # only its records do (TFDS), without reading them again.
    self._epoch_batches = epoch_batches if start_step == 0 else 0
    self._epoch_class_counts = np.zeros(info.num_classes, np.int64)

  @property
  def first_epoch_class_counts(self) -> Optional[np.ndarray]:
    """`class_counts` of this host's share, read by its first epoch; None until a stream that
    started at step 0 has read it (a resumed stream never has)."""
    return self._epoch_class_counts if 0 < self._epoch_batches <= self.step else None

  def __iter__(self):
    return self

  def _note_skipped(self, count, unreadable):
    # Each file is named once; a line per batch that skips one would flood the log of a long
    # run, whose progress line has the running count (skipped_images).
    for file_and_error in unreadable:
      _warn_unreadable(self.info.name, file_and_error)
    self.first_unreadable = self.first_unreadable or next(iter(unreadable), "")
    if count and not self.num_skipped:
      self._warn_first_skip()
    self.num_skipped += count

  def _warn_first_skip(self):
    # Unreadable files show only when decoded: listing a folder cannot leave them out.
    logging.warning("%s: training skips its unreadable images (skipped_images on the progress "
                    "line counts the skips); the %d examples that set an epoch's length "
                    "include them.", self.info.name, self.info.num_examples)

  def __next__(self) -> dict:
    batch = dict(next(self._batches))
    unreadable = list(batch.pop("_unreadable", ()))
    self._note_skipped(int(batch.pop("_skipped", 0)), unreadable)
    if batch.pop("_short", False):
      raise DataError(f"{self.info.name}: batch {self.step} has too few readable images "
                      f"(more than {_MAX_SPARES + self.batch_size} unreadable candidates), "
                      f"e.g. {unreadable[0]}")
    if self.step < self._epoch_batches:
      self._epoch_class_counts += class_counts(self.info, batch["label"])
    self.step += 1
    return batch


@functools.lru_cache(maxsize=None)
def _warn_unreadable(source, file_and_error):
  """Once per file: the count alone would not tell which file to fix or remove."""
  logging.warning("%s: cannot read %s. Skipped wherever it comes up: fix or remove the file.",
                  source, file_and_error.rstrip("."))


@functools.lru_cache(maxsize=None)
def _warn_left_out_of_pass(source, num_skipped, num_read):
  """Once per split and count: a monitor reads its splits again at every evaluation."""
  logging.warning("%s: %d unreadable image(s) left out of the figures, %d read.", source,
                  num_skipped, num_read)


class EvalIterator(HostIterator):
  """One pass; `len()` batches on every host; `mask` False marks padding and unreadable files."""

  def __init__(self, batches, batch_size, info, num_batches):
    super().__init__(batches, batch_size, info)
    self._num_batches = num_batches
    self._num_read = 0

  def __len__(self):
    return self._num_batches

  def _warn_first_skip(self):  # said once, at the end of the pass, with the count
    pass

  def __next__(self):
    if self.step >= self._num_batches:
      if self.num_skipped and not self._num_read:  # nothing to score or to bank
        example = f", e.g. {self.first_unreadable}" if self.first_unreadable else ""
        raise DataError(f"{self.info.name}: none of its {self.num_skipped} images could be "
                        f"read{example}. Fix or replace them.")
      if self.num_skipped:
        _warn_left_out_of_pass(self.info.name, self.num_skipped, self._num_read)
      raise StopIteration
    batch = super().__next__()
    self._num_read += int(batch["mask"].sum())
    return batch


def _train_iterator(source, split, *, global_batch_size, image_size, crop_scale, seed,
                    start_step, process_index, process_count, data_dir, shuffle_buffer,
                    interpolation, flip, n_views, engine, workers, threads, resize_on,
                    decoded_size):
  b, p, P = _check_layout(global_batch_size, image_size, process_index, process_count)
  check_interpolation(interpolation)
  lo, hi = crop_scale
  if not 0 < lo <= hi <= 1:
    raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
  if start_step < 0:
    raise DataError(f"start_step must be >= 0, got {start_step}")
  data = _host_data(source, split, data_dir, p, P, engine)
  if data.n_local <= 0:
    raise DataError(f"{data.info.name}: process {p} has no examples")
  if resize_on not in RESIZE_ON:
    raise DataError(f"resize_on must be one of {RESIZE_ON}, got {resize_on!r}")
  capacity = 0
  if resize_on == "device":
    capacity = decoded_size or default_capacity(image_size, n_views)
    if capacity < n_views * image_size:
      raise DataError(f"data.decoded_size {capacity} is smaller than {n_views} views of "
                      f"{image_size} side by side: use at least {n_views * image_size}.")
  views = _Views(n_views, image_size, (lo, hi), interpolation, flip, capacity)
  if engine == "tf":
    from sit_jax import data_tf
    batches = data_tf.train_batches(data, b=b, start_step=start_step, seed=int(seed),
                                    process_index=p, shuffle_buffer=shuffle_buffer, views=views)
  else:
    make_batch = _TrainBatch(data, b, int(seed), p, views)
    batches = _grain_batches(make_batch, start_step, 2**62, workers, threads)
  return HostIterator(batches, b, data.info, start_step, epoch_batches=-(-data.n_local // b))


def pretrain_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                      image_size: int, crop_scale: Sequence[float] = (0.2, 1.0), seed: int,
                      start_step: int = 0, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, data_dir: Optional[str] = None,
                      shuffle_buffer: int = 50_000,
                      interpolation: str = "bicubic_antialias", flip: bool = True,
                      engine: str = "grain", workers: int = 0, threads: int = 0,
                      resize_on: str = "host", decoded_size: int = 0) -> HostIterator:
  """Infinite iterator of host-local batches dict(view1=uint8 (b, S, S, 3), view2=uint8
  (b, S, S, 3), label=int32 (b,)), b = global_batch_size // process_count. Each view is an
  independent random-resized crop (area `crop_scale`, ratio 3/4..4/3, resized to S with
  `interpolation`, see INTERPOLATIONS) and, with `flip`, a horizontal flip with probability 1/2.
  Batch k is a pure function of (seed, process_index, process_count, k): `start_step=k`
  resumes exactly. `shuffle_buffer` only matters for engine 'tf' (see the module doc).
  grain builds batches in `threads` threads (0: default_threads(workers), the cores shared out
  among the workers) of this process or, with `workers` > 0, of each of that many processes.

  resize_on='device': the host decodes only, and batches are dict(decoded=uint8 (b, C, C, 3),
  extent=int32 (b, 2), window=float32 (b, 2, 4), flip=bool (b, 2), label) with C =
  `decoded_size` (0: default_capacity); resample.render_views turns them on the accelerator into
  the views above (the same crops, pixels within one level)."""
  batches = _train_iterator(
      source, split, global_batch_size=global_batch_size, image_size=image_size,
      crop_scale=crop_scale, seed=seed, start_step=start_step, process_index=process_index,
      process_count=process_count, data_dir=data_dir, shuffle_buffer=shuffle_buffer,
      interpolation=interpolation, flip=flip, n_views=2, engine=engine, workers=workers,
      threads=threads, resize_on=resize_on, decoded_size=decoded_size)
  n = batches.info.num_examples
  if n < global_batch_size:
    # InfoNCE's negatives are the batch's other images: copies of an image are among them.
    logging.warning("%s has %d images, fewer than data.global_batch_size %d: every batch holds "
                    "images more than once, and the contrastive loss pushes the copies of an "
                    "image apart as negatives. Set --config.data.global_batch_size to at most "
                    "%d (a multiple of the data-parallel devices).", batches.info.name, n,
                    global_batch_size, n)
  return batches


def train_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                   image_size: int, crop_scale: Sequence[float] = (0.08, 1.0), seed: int,
                   start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, data_dir: Optional[str] = None,
                   shuffle_buffer: int = 50_000,
                   interpolation: str = "bicubic_antialias", flip: bool = True,
                   engine: str = "grain", workers: int = 0, threads: int = 0,
                   resize_on: str = "host", decoded_size: int = 0) -> HostIterator:
  """Infinite labelled iterator for supervised transfer: dict(image=uint8 (b, S, S, 3),
  label=int32 (b,)), one random-resized crop + flip per example. Resumable, and resized on the
  device with resize_on='device', like `pretrain_iterator`."""
  return _train_iterator(
      source, split, global_batch_size=global_batch_size, image_size=image_size,
      crop_scale=crop_scale, seed=seed, start_step=start_step, process_index=process_index,
      process_count=process_count, data_dir=data_dir, shuffle_buffer=shuffle_buffer,
      interpolation=interpolation, flip=flip, n_views=1, engine=engine, workers=workers,
      threads=threads, resize_on=resize_on, decoded_size=decoded_size)


def eval_iterator(source: str, split: Optional[str], *, global_batch_size: int,
                  image_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, data_dir: Optional[str] = None,
                  resize_mode: str = "center_crop",
                  interpolation: str = "bicubic_antialias", engine: str = "grain",
                  workers: int = 0, threads: int = 0) -> EvalIterator:
  """One pass over this host's share, in order: dict(image=uint8 (b, S, S, 3), label=int32 (b,),
  mask=bool (b,), index=int32 (b,): the position in the split). Every host yields
  ceil(largest share / b) batches; padding and unreadable files have mask False (and label and
  index -1). resize_mode: "center_crop" (central 87.5% square,
  resized to S) or "resize" (the whole image squashed to S x S)."""
  b, p, P = _check_layout(global_batch_size, image_size, process_index, process_count)
  if resize_mode not in ("center_crop", "resize"):
    raise DataError(f"resize_mode must be 'center_crop' or 'resize', got {resize_mode!r}")
  check_interpolation(interpolation)
  data = _host_data(source, split, data_dir, p, P, engine)
  num_batches = math.ceil(data.n_max_local / b)
  view = functools.partial(eval_view, size=image_size, resize_mode=resize_mode,
                           interpolation=interpolation)
  if engine == "tf":
    from sit_jax import data_tf
    batches = data_tf.eval_batches(data, b=b, size=image_size, view=view)
  else:
    batches = _grain_batches(_EvalBatch(data, b, image_size, resize_mode, interpolation), 0,
                             num_batches, workers, threads)
  return EvalIterator(batches, b, data.info, num_batches)
