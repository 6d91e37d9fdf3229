"""Frozen features of a split, extracted once and kept in the workdir for later runs.

A cache entry is keyed on everything that decides the features: the checkpoint's identity (a
hash of the backbone's parameter values, so a resumed pretraining run that moved on is a new
checkpoint whatever its path; for a random init, the seed) with the backbone's model config (the
architecture and how it computes: dtype, attention), the source, split and data_dir (for a
folder, the files it holds and their classes), the feature function's name, the image size,
resize mode and interpolation. Entries are DIR/<hash>.npz holding the features, labels and the
key itself. DIR may be remote (gs://, as a TPU run's
workdir): entries are read and written through etils.epath there.

Extracting features is a collective over every process of a multi-host job, so a cache hit only
counts where every process finds the entry (a cache on each host's local disk, written by process
0 alone, is a miss for the others): otherwise all of them extract.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from sit_jax import metrics
from sit_jax.transfer import common


def checkpoint_identity(backbone: common.Backbone, seed: int) -> str:
  """The backbone as it computes features: its parameters as read (their hash, taken once by
  common.load_backbone; or, at random init, the seed) and its model config, which holds the
  image size the position embedding is resized to and the compute settings a run may change
  (`model.dtype`, `model.attention`): features in bfloat16 are not the float32 ones."""
  settings = json.dumps(backbone.model_config, sort_keys=True)
  if backbone.params is None:
    return f"random init {settings} seed {seed}"
  return f"params {backbone.checkpoint_hash} {settings}"


def cache_dir(config, workdir: str) -> str | None:
  """config.feature_cache: '' = WORKDIR/feature_cache, a path to share one between workdirs,
  'off' = none."""
  where = config.get("feature_cache", "")
  if where == "off":
    return None
  return where or os.path.join(workdir, "feature_cache")


def folder_listing(source: str, split: str) -> str | None:
  """For a folder source, a hash of the split folder's files, their sizes and their classes, so
  that images added, removed, moved to another class or replaced by a file of another size (an
  unreadable one fixed, as its warning asks) make another entry (one replaced by a file of the
  same size does not); None for another source."""
  kind, _, path = source.partition(":")
  if kind != "folder":
    return None
  from sit_jax import data
  root, _ = data.folder_split(path, split)
  paths, labels, _ = data.list_folder(root)
  sizes = [os.path.getsize(p) if os.path.exists(p) else -1 for p in paths]  # -1: a broken link
  listing = json.dumps([[os.path.relpath(p, root) for p in paths], labels.tolist(), sizes])
  return hashlib.blake2b(listing.encode(), digest_size=16).hexdigest()


def _read(path: str, key: dict):
  """(features, labels) of the entry at `path` when it exists and holds `key`, else None."""
  entry = epath.Path(path)
  if not entry.exists():
    return None
  with np.load(io.BytesIO(entry.read_bytes()) if metrics.is_remote(path) else path) as f:
    if json.loads(str(f["key"])) != key:
      return None
    return f["features"], f["labels"]


def _on_every_process(hit: bool) -> bool:
  if jax.process_count() == 1:
    return hit
  return bool(np.all(multihost_utils.process_allgather(np.asarray(hit))))


def split_features(config, workdir: str, identity: str, fn, params, mesh, split: str,
                   features: str, image_size: int):
  """(features, labels) of `split` through fn(params, uint8 images) (named `features`), from
  the cache when an earlier run stored them (and every process finds them), else extracted (and
  stored by process 0)."""
  directory = cache_dir(config, workdir)
  key = {"checkpoint": identity, "source": config.data.source, "split": split,
         "data_dir": config.data.data_dir, "features": features, "image_size": image_size,
         "resize_mode": config.data.resize_mode, "interpolation": config.data.interpolation,
         # Older caches hold another order: of several processes, or of the tf engine (2c5d15f).
         "rows": "split order, also with data.engine=tf"}
  files = folder_listing(config.data.source, split)
  if files:  # only there: the entries of other sources keep their names
    key["files"] = files
  name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
  path = os.path.join(directory, f"{name}.npz") if directory else None
  cached = _read(path, key) if path else None
  if _on_every_process(cached is not None):
    logging.info("Features of %s from the cache %s", split, path)
    return cached
  feats, labels = common.extract_features(
      fn, params, common.eval_batches(config, split, image_size), mesh,
      common.log_progress(f"{split} features"))
  if path and jax.process_index() == 0:
    metrics.atomic_write(path, lambda f: np.savez(
        f, features=feats, labels=labels, key=json.dumps(key, sort_keys=True)))
  return feats, labels
