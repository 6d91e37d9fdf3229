"""The 'tf' input engine: TFDS datasets prepared as TFRecord, read in order with tf.data.

Needs TensorFlow (`pip install "sit_jax[tf]"`); data.py imports this module only when
data.engine is 'tf'. Records are read and shuffled by tf.data; images are decoded, cropped and
resized by data.py's PIL code inside tf.numpy_function (PIL releases the GIL, so tf.data's
parallel map runs them on several cores). The module doc of data.py describes the order and
how resuming works.
"""
import dataclasses
import functools
import operator
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sit_jax import data


def _hide_accelerators_from_tf():
  # TF is for the host pipeline only: it must not grab GPU/TPU memory meant for JAX.
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass


_hide_accelerators_from_tf()
_AUTOTUNE = tf.data.AUTOTUNE


def _read(builder, split, name, with_ids=False):
  """The split's records in a fixed order, images still encoded; `with_ids`: each with its
  'tfds_id' (shard file and place in it). The order interleaves blocks of 16 records of 16
  shards at a time: not the split's order once a shard holds more than 16 records."""
  try:
    return builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(interleave_cycle_length=16, add_tfds_id=with_ids))
  except AssertionError:  # tfds' "could not find data": never generated
    if not builder.is_prepared():
      raise data.tfds_not_prepared(builder, name, engine="tf") from None
    raise
  except (ValueError, KeyError) as e:
    raise data.DataError(f"TFDS dataset {name!r}: bad split {split!r}: {e}") from None


def _size(builder, split, name):
  try:
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError, AssertionError):
    n = 0
  if n <= 0:  # not in the metadata (e.g. tfds.testing.mock_data)
    n = int(_read(builder, split, name).cardinality())
    if n < 0:
      raise data.DataError(f"cannot tell the size of TFDS split {name}:{split}")
  return n


def host_share(builder, name, split, p, P):
  """(examples of the split, of host p, of the largest host, host p's split, data._HostData's
  position). Host p's share: tfds.even_splits of each '+' part of the split, which gives each
  part's remainder to the first hosts, so host 0's share is the largest (more than ceil(n / P)
  when several parts have a remainder) and a host's share can be empty (a part smaller than P)."""
  parts = split.split("+")
  sizes = tuple(_size(builder, part, name) for part in parts)
  share = lambda host: sum(m // P + (host < m % P) for m in sizes)
  host_split = split
  if P > 1:
    host_split = functools.reduce(operator.add, [tfds.even_splits(part, P)[p] for part in parts])
  return sum(sizes), share(p), share(0), host_split, _RecordPositions(builder, split)


@dataclasses.dataclass(frozen=True)
class _RecordPositions:
  """A record's tfds_id -> its position in the split: its parts in turn, each in shard order,
  as the grain engine's data source numbers them, whatever order tf.data reads them in."""
  builder: object
  split: str

  @functools.cached_property
  def _shards(self) -> Optional[dict]:
    """Shard file name -> [(first record read, records read, position of the first)]; None
    where the metadata has no split sizes (tfds.testing.mock_data)."""
    try:
      instructions = self.builder.info.splits[self.split].file_instructions
    except (KeyError, ValueError, TypeError, AssertionError):
      return None
    shards, offset = {}, 0
    for f in instructions:
      shards.setdefault(os.path.basename(f.filename), []).append((f.skip, f.take, offset))
      offset += f.take
    return shards

  def __call__(self, tfds_id: bytes, read: int) -> int:
    """`read`: the record's place in this host's reading order, the position where the
    metadata cannot tell it (exact on one process)."""
    if self._shards is None:
      return read
    shard, _, record = tfds_id.decode().rpartition("__")
    for skip, take, offset in self._shards[shard]:
      if skip <= int(record) < skip + take:
        return offset + int(record) - skip
    raise KeyError(tfds_id)


def _numpy_elements(ds, labels, fn, specs):
  """Maps (position, example) to fn(encoded, position) -> arrays of `specs` ((shape, numpy
  dtype) each) in parallel with PIL, drops the elements fn could not decode, keeps the
  position. `labels`: the split's (data._HostData.labels)."""
  label_of, num_classes, multilabel, path = labels
  label_shape = (num_classes,) if multilabel else ()
  outs = [tf.bool] + [tf.as_dtype(dtype) for _, dtype in specs] + [tf.int32]

  def run(encoded, label, pos):
    label = label_of(label)
    try:
      arrays = fn(encoded, pos)
    except data.UnreadableImage:
      return (False, *[np.zeros(shape, dtype) for shape, dtype in specs],
              np.zeros(label_shape, np.int32))
    return (True, *arrays, np.asarray(label, np.int32).reshape(label_shape))

  def element(pos, ex):
    label = data.labels_at(ex, path) if path else tf.constant(-1)
    ok, *arrays, label = tf.numpy_function(run, [ex["image"], label, pos], outs, stateful=False)
    for a, (shape, _) in zip(arrays, specs):
      a.set_shape(shape)
    label.set_shape(label_shape)
    return dict(ok=ok, arrays=tuple(arrays), label=label, _pos=pos,
                **({"_id": ex["tfds_id"]} if "tfds_id" in ex else {}))

  return ds.map(element, num_parallel_calls=_AUTOTUNE, deterministic=True).filter(
      lambda ex: ex["ok"])


def _options(ds):
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def train_batches(d, *, b, start_step, seed, process_index, shuffle_buffer, views):
  """Batches (see data.HostIterator) of one deterministic shuffled pass per epoch, resumed by
  skipping records; the stream position of an element keys its crops."""
  n = d.n_local
  records = _read(d.builder, d.host_split, d.info.name)
  first = start_step * b
  first_epoch, first_offset = first // n, first % n
  buffer = max(1, min(shuffle_buffer, n))

  def epoch(e):
    shuffle_seed = tf.numpy_function(
        lambda e: np.int64(data._element_rng(seed, process_index, 0, int(e)).integers(2**31)),
        [e], tf.int64, stateful=False)
    ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(tf.where(e == first_epoch, tf.constant(first_offset, tf.int64),
                                      tf.constant(0, tf.int64)))
    return ds.map(lambda offset, ex: (e * n + offset, ex))

  def crops(encoded, pos):
    rng = data._element_rng(seed, process_index, 1, int(pos))
    padded = views.stack([views(encoded, rng)])
    return [padded[k][0] for k in views.keys]

  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = _numpy_elements(ds, d.labels, crops, views.specs)
  ds = _options(ds.batch(b, drop_remainder=True).prefetch(_AUTOTUNE))
  keys = views.keys
  expected = first  # stream position of the next element if none were unreadable

  for batch in ds.as_numpy_iterator():
    pos = batch["_pos"]
    skipped, expected = int(pos[-1]) + 1 - expected - b, int(pos[-1]) + 1
    yield dict(zip(keys, batch["arrays"]), label=batch["label"], _skipped=skipped)


def eval_batches(d, *, b, size, view):
  """Padded batches in record order; unreadable records and padding have mask False."""
  label_shape = (d.info.num_classes,) if d.info.multilabel else ()
  pending = iter(())  # a host whose share is empty (tfds cannot read it) yields padding only
  if d.n_local:
    ds = _read(d.builder, d.host_split, d.info.name, with_ids=True).enumerate()
    ds = _numpy_elements(ds, d.labels, lambda encoded, pos: (view(encoded),),
                         [((size, size, 3), np.uint8)])
    pending = iter(_options(ds.prefetch(_AUTOTUNE)).as_numpy_iterator())
  nxt = next(pending, None)
  for k in range(-(-d.n_max_local // b)):
    out = dict(image=np.zeros((b, size, size, 3), np.uint8),
               label=np.full((b, *label_shape), -1, np.int32), mask=np.zeros((b,), bool),
               index=np.full((b,), -1, np.int32))
    while nxt is not None and nxt["_pos"] < (k + 1) * b:
      slot = nxt["_pos"] - k * b
      out["image"][slot], out["label"][slot] = nxt["arrays"][0], nxt["label"]
      out["mask"][slot], out["index"][slot] = True, d.position(nxt["_id"], int(nxt["_pos"]))
      nxt = next(pending, None)
    expected = max(0, min((k + 1) * b, d.n_local) - k * b)
    yield dict(out, _skipped=expected - int(out["mask"].sum()))


def convert_to_array_record(src: str, dst: str):
  """Copies a TFDS dataset version directory prepared as TFRecord (e.g.
  ~/tensorflow_datasets/imagenet2012/5.1.0) to `dst` (e.g. /data/tfds_ar/imagenet2012/5.1.0)
  in array_record, the format of the 'grain' engine: the same records, one shard for one
  shard, written as tfds writes array_record (group_size 1: random access per record)."""
  import json
  import os
  import shutil
  from array_record.python import array_record_module
  names = os.listdir(src) if os.path.isdir(src) else []
  if "dataset_info.json" not in names or not any(".tfrecord-" in n for n in names):
    raise data.DataError(
        f"{src} is not a TFDS dataset version directory prepared as TFRecord (dataset_info.json "
        "and *.tfrecord-* files): give the version folder, e.g. "
        "~/tensorflow_datasets/imagenet2012/5.1.0")
  if os.path.exists(dst):
    raise data.DataError(f"{dst} exists: choose a new directory")
  os.makedirs(dst)
  for name in sorted(names):
    path = os.path.join(src, name)
    if ".tfrecord-" in name:
      out = os.path.join(dst, name.replace(".tfrecord-", ".array_record-"))
      writer = array_record_module.ArrayRecordWriter(out, "group_size:1")
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        writer.write(record)
      writer.close()
    elif name == "dataset_info.json":
      with open(path) as f:
        info = json.load(f)
      info["fileFormat"] = "array_record"
      with open(os.path.join(dst, name), "w") as f:
        json.dump(info, f, indent=2)
    elif os.path.isfile(path):
      shutil.copy(path, dst)


if __name__ == "__main__":
  import sys
  if len(sys.argv) != 3:
    sys.exit("usage: python -m sit_jax.data_tf SRC_VERSION_DIR DST_VERSION_DIR  (TFRecord -> "
             "array_record)")
  try:
    convert_to_array_record(sys.argv[1], sys.argv[2])
  except data.DataError as e:
    sys.exit(f"sit_jax.data_tf: error: {e}")
