"""Host input pipeline: shapes, determinism, exact resume, per-host slicing, eval padding,
corrupt files and error messages. Nothing here downloads: embedded digits, images written to
tmp_path, and tfds.testing.mock_data."""
import collections
import io
import itertools
import os
import re
import subprocess
import sys
import unicodedata

import chex
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from sit_jax import data

DIGITS = "embedded:digits"


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a test tried to download a dataset")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


# ----- embedded digits ----------------------------------------------------------------------
def test_sklearn_digits_read_without_sklearn_equal_load_digits(monkeypatch):
  from sklearn.datasets import load_digits
  expected = load_digits()
  images, labels = data.sklearn_digits()  # from the CSV scikit-learn ships
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.target)
  chex.assert_type([images, labels], [np.float64, int])
  # Where that file is not found, load_digits reads it.
  monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
  images, labels = data.sklearn_digits()
  np.testing.assert_array_equal(images, expected.images)
  np.testing.assert_array_equal(labels, expected.target)


def test_reading_the_digits_leaves_sklearn_unimported():
  code = ("import sys; from sit_jax import data; data.sklearn_digits(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=True).stdout
  assert out.strip() == "[]"


def test_embedded_pretrain_shapes_determinism_and_resume():
  kw = dict(global_batch_size=8, image_size=24, seed=3, process_index=0, process_count=1)
  it = data.pretrain_iterator(DIGITS, "train", **kw)
  batches = _take(it, 6)
  b = batches[0]
  chex.assert_shape([b["view1"], b["view2"]], (8, 24, 24, 3))
  chex.assert_type([b["view1"], b["view2"], b["label"]], [np.uint8, np.uint8, np.int32])
  assert all(0 <= x["label"].min() and x["label"].max() <= 9 for x in batches)
  assert not np.array_equal(b["view1"], b["view2"])
  assert it.num_skipped == 0

  _assert_same_batches(batches, _take(data.pretrain_iterator(DIGITS, "train", **kw), 6))
  _assert_same_batches(batches[4:], _take(data.pretrain_iterator(
      DIGITS, "train", start_step=4, **kw), 2))
  other = next(data.pretrain_iterator(DIGITS, "train", **dict(kw, seed=4)))
  assert not np.array_equal(other["view1"], b["view1"])


def test_embedded_resume_across_an_epoch_boundary():
  # The 297 test digits with 64 per batch: batch 4 straddles epochs 0 and 1.
  kw = dict(global_batch_size=64, image_size=8, seed=0, process_index=0, process_count=1)
  fresh = _take(data.pretrain_iterator(DIGITS, "test", **kw), 6)
  _assert_same_batches(fresh[4:], _take(data.pretrain_iterator(
      DIGITS, "test", start_step=4, **kw), 2))


def test_train_iterator():
  it = data.train_iterator(DIGITS, "train", global_batch_size=4, image_size=16, seed=0,
                           process_index=0, process_count=1)
  b = next(it)
  assert set(b) == {"image", "label"}
  chex.assert_shape(b["image"], (4, 16, 16, 3))
  chex.assert_type([b["image"], b["label"]], [np.uint8, np.int32])


def _canonical(images):
  # Whole-image crops at the native size are exact; a flip is undone by taking the smaller.
  return [min(x.tobytes(), x[:, ::-1].tobytes()) for x in images]


def test_pretrain_hosts_partition_one_epoch():
  all_images = data.embedded_digits()[0][data.DIGITS_TRAIN:]
  want = collections.Counter(_canonical(all_images))
  got = collections.Counter()
  for p in range(2):
    kw = dict(global_batch_size=32, image_size=32, crop_scale=(1.0, 1.0), seed=1,
              process_index=p, process_count=2)
    n_local = len(range(p, len(all_images), 2))
    it = data.pretrain_iterator(DIGITS, "test", **kw)
    views = np.concatenate([next(it)["view1"] for _ in range(-(-n_local // 16))])[:n_local]
    got.update(_canonical(views))
  assert got == want


def test_eval_pads_and_covers_each_example_once():
  images, labels = data.embedded_digits()
  images, labels = images[data.DIGITS_TRAIN:], labels[data.DIGITS_TRAIN:]
  seen_images, seen_labels, counts = [], [], []
  for p in range(2):
    it = data.eval_iterator(DIGITS, "test", global_batch_size=64, image_size=32,
                            process_index=p, process_count=2, resize_mode="resize")
    batches = list(it)
    counts.append(len(batches))
    assert len(batches) == len(it) == 5  # ceil(149 / 32)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == len(range(p, len(labels), 2))
    assert masks[:masks.sum()].all() and not masks[masks.sum():].any()
    assert not batches[-1]["mask"][-1]
    for b in batches:
      seen_images.append(b["image"][b["mask"]])
      seen_labels.append(b["label"][b["mask"]])
      assert (b["label"][~b["mask"]] == -1).all() and (b["index"][~b["mask"]] == -1).all()
    np.testing.assert_array_equal(np.concatenate([b["index"][b["mask"]] for b in batches]),
                                  np.arange(p, len(labels), 2))  # positions in the split
  seen_images, seen_labels = np.concatenate(seen_images), np.concatenate(seen_labels)
  # Host 0 holds examples 0, 2, 4, ...; host 1 holds 1, 3, 5, ...
  order = np.concatenate([np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)])
  np.testing.assert_array_equal(seen_images, images[order])
  np.testing.assert_array_equal(seen_labels, labels[order])
  single = data.eval_iterator(DIGITS, "test", global_batch_size=64, image_size=32,
                              process_index=0, process_count=1)
  assert sum(int(b["mask"].sum()) for b in single) == len(labels)


def test_dataset_info():
  assert data.dataset_info(DIGITS, "train") == data.DatasetInfo(1500, 10, "embedded:digits/train")
  assert data.dataset_info(DIGITS, "test").num_examples == 297


def test_engine_options_from_a_config():
  import ml_collections
  assert data.engine_options(ml_collections.ConfigDict()) == dict(engine="grain", workers=0)
  options = data.engine_options(ml_collections.ConfigDict(dict(engine="grain", workers=2)))
  assert options == dict(engine="grain", workers=2)
  assert data.dataset_info(DIGITS, "test", **options).num_examples == 297
  # Transfer runs read TFDS TFRecord and use worker processes too (--config.data.engine=tf was
  # 'Unknown config key'); segmentation reads on its own threads and has neither key.
  from configs import fewshot, finetune, knn, linear, multilabel, segment
  for config in (fewshot, finetune, knn, linear, multilabel):
    assert {"engine", "workers"} <= set(config.get_config("runlocal").data), config.__name__
  assert not {"engine", "workers"} & set(segment.get_config("runlocal").data)


# ----- TFDS (mocked) ------------------------------------------------------------------------
def _png(value, size=(12, 10)):
  import io
  out = io.BytesIO()
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(out, format="PNG")
  return out.getvalue()


@pytest.fixture
def mock_cifar10():
  """tfds.data_source('cifar10', ...) -> 10 PNGs, example i of value 20*i and label i % 10;
  works without TensorFlow (tfds' own random mock encodes images with TF)."""
  examples = [dict(image=_png(20 * i), label=i % 10) for i in range(10)]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    yield


def test_tfds_objects_labels_are_multi_hot():
  """coco/2017 keeps each annotated object's class in objects/label (80 classes): an image's
  multi-hot target holds the classes present, repeats once, none for an image without objects."""
  objects = ([3, 3, 79], [], [0])
  examples = [dict(image=_png(20 * i), objects=dict(label=np.array(o, np.int64),
                                                    area=np.ones(len(o), np.int64)))
              for i, o in enumerate(objects)]
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    info = data.dataset_info("tfds:coco/2017", "validation")
    assert (info.num_classes, info.multilabel) == (80, True)
    batch = next(data.eval_iterator("tfds:coco/2017", "validation", global_batch_size=4,
                                    image_size=8, process_index=0, process_count=1))
  want = np.zeros((3, 80), np.int32)
  want[0, [3, 79]] = want[2, 0] = 1
  np.testing.assert_array_equal(batch["label"][:3], want)


def test_tfds_class_names_are_the_infos_classes():
  """A TFDS split's DatasetInfo names its classes by its ClassLabel's names (tfds' metadata), a
  multi-label Sequence(ClassLabel)'s too, as a folder's by its class folders."""
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: [{}] * 4):
    assert data.dataset_info("tfds:cats_vs_dogs", "train[50%:]").classes == ("cat", "dog")
    voc = data.dataset_info("tfds:voc/2007", "test")
  assert (voc.multilabel, len(voc.classes)) == (True, 20)
  assert (voc.classes[0], voc.classes[14], voc.classes[-1]) == ("aeroplane", "person",
                                                                 "tvmonitor")


def test_tfds_mock_pretrain_resume_and_eval(mock_cifar10):
  assert data.dataset_info("tfds:cifar10", "train") == data.DatasetInfo(
      10, 10, "tfds:cifar10/train")
  kw = dict(global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1)
  fresh = _take(data.pretrain_iterator("tfds:cifar10:train", None, **kw), 5)
  chex.assert_shape(fresh[0]["view1"], (4, 16, 16, 3))
  chex.assert_type([fresh[0]["view2"], fresh[0]["label"]], [np.uint8, np.int32])
  ids = [i for b in fresh for i in b["view1"][:, 0, 0, 0] // 20]  # constant images
  for b in fresh:
    np.testing.assert_array_equal(b["view1"][:, 0, 0, 0] // 20 % 10, b["label"])
  assert sorted(ids[:10]) == sorted(ids[10:20]) == list(range(10))  # epochs 0 and 1
  assert ids[:10] != ids[10:20]  # in other orders
  _assert_same_batches(fresh[3:], _take(data.pretrain_iterator(
      "cifar10", "train", start_step=3, **kw), 2))
  ev = list(data.eval_iterator("cifar10", "test", global_batch_size=4, image_size=16,
                               process_index=0, process_count=1))
  assert [b["mask"].sum() for b in ev] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in ev])[:10], np.arange(10))


# ----- image folders ------------------------------------------------------------------------
def _write(path, color, size, fmt):
  img = np.zeros(size + (3,), np.uint8)
  img[...] = color
  img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
  Image.fromarray(img).save(path, format=fmt)


@pytest.fixture
def class_folder(tmp_path):
  root = tmp_path / "images"
  for name, color in (("cat", (220, 20, 20)), ("dog", (20, 20, 220))):
    os.makedirs(root / name)
    _write(root / name / "a.png", color, (40, 30), "PNG")
    _write(root / name / "b.JPG", color, (50, 50), "JPEG")
    _write(root / name / "c.jpeg", color, (33, 61), "JPEG")
  (root / "cat" / "broken.jpg").write_bytes(b"this is not an image" * 10)
  (root / "dog" / "notes.txt").write_text("ignored")
  return root


def test_folder_pretrain_skips_corrupt_and_resumes(class_folder, monkeypatch):
  kw = dict(global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1)
  source = f"folder:{class_folder}"
  assert data.dataset_info(source, "train") == data.DatasetInfo(
      7, 2, f"folder:{class_folder}", classes=("cat", "dog"))
  warnings = []
  monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  it = data.pretrain_iterator(source, "train", **kw)
  batches = _take(it, 5)  # 20 positions: the broken file comes up at least twice
  assert it.num_skipped >= 2
  # Said once, not at every batch that skips it: the file, then that the epochs count it.
  assert len(warnings) == 2 and f"cannot read {class_folder / 'cat' / 'broken.jpg'}" in warnings[0]
  assert warnings[1] == (f"{source}: training skips its unreadable images (skipped_images on the "
                         "progress line counts the skips); the 7 examples that set an epoch's "
                         "length include them.")
  for b in batches:
    chex.assert_shape(b["view1"], (4, 16, 16, 3))
    red = b["view1"][..., 0].mean(axis=(1, 2)) > b["view1"][..., 2].mean(axis=(1, 2))
    np.testing.assert_array_equal(red, b["label"] == 0)  # cat is red, dog is blue
  _assert_same_batches(batches[2:], _take(data.pretrain_iterator(
      source, "train", start_step=2, **kw), 3))


def test_folder_eval_masks_corrupt_and_names_it(class_folder, monkeypatch):
  warnings = []
  monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  it = data.eval_iterator(f"folder:{class_folder}", None, global_batch_size=4, image_size=8,
                          process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 2 and it.num_skipped == 1
  # The file and PIL's reason, once: a count alone does not say which file to fix.
  broken = class_folder / "cat" / "broken.jpg"
  assert [w for w in warnings if str(broken) in w] == [
      f"folder:{class_folder}: cannot read {broken}: cannot identify image file (not an image "
      "PIL can read). Skipped wherever it comes up: fix or remove the file."]
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  # Sorted: cat/a.png cat/b.JPG cat/broken.jpg cat/c.jpeg dog/...
  np.testing.assert_array_equal(mask, [1, 1, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(labels[mask], [0, 0, 0, 1, 1, 1])
  assert warnings[-1] == (f"folder:{class_folder}: 1 unreadable image(s) left out of the "
                          "figures, 6 read.")
  # A monitor reads the split again at each evaluation: nothing more is said.
  count = len(warnings)
  list(data.eval_iterator(f"folder:{class_folder}", None, global_batch_size=4, image_size=8,
                          process_index=0, process_count=1))
  assert len(warnings) == count


def test_folder_without_classes_and_split_subdir(tmp_path, monkeypatch):
  flat = tmp_path / "flat"
  os.makedirs(flat)
  for i in range(3):
    _write(flat / f"{i}.png", (100, 100, 100), (20, 20), "PNG")
  assert data.dataset_info(f"folder:{flat}", None).num_classes == 0
  warnings = []
  monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  kw = dict(image_size=8, seed=0, process_index=0, process_count=1)
  b = next(data.pretrain_iterator(f"folder:{flat}", None, global_batch_size=2, **kw))
  np.testing.assert_array_equal(b["label"], [-1, -1])
  assert not warnings
  # A batch larger than the folder repeats images, and InfoNCE takes the copies for negatives.
  data.pretrain_iterator(f"folder:{flat}", None, global_batch_size=4, **kw)
  assert warnings == [
      f"folder:{flat} has 3 images, fewer than data.global_batch_size 4: every batch holds "
      "images more than once, and the contrastive loss pushes the copies of an image apart as "
      "negatives. Set --config.data.global_batch_size to at most 3 (a multiple of the "
      "data-parallel devices)."]
  os.makedirs(tmp_path / "split" / "train" / "x")
  _write(tmp_path / "split" / "train" / "x" / "0.png", (0, 0, 0), (20, 20), "PNG")
  assert data.dataset_info(f"folder:{tmp_path / 'split'}", "train") == data.DatasetInfo(
      1, 1, f"folder:{tmp_path / 'split' / 'train'}", classes=("x",))


def _class_folders(root, classes, images_each=2):
  for name in classes:
    os.makedirs(root / name)
    for i in range(images_each):
      _write(root / name / f"{i}.png", (10, 10, 10), (12, 12), "PNG")
  return root


def test_a_folder_split_is_its_folder_or_a_slice_of_train(tmp_path):
  """'train' (or no split) is the whole folder when it has no split folders; any other split
  name must be a folder, so that a 'test' split never silently reads the training images."""
  flat = f"folder:{_class_folders(tmp_path / 'flat', ('a', 'b'))}"
  assert data.dataset_info(flat, "train").num_examples == 4
  assert data.dataset_info(flat, None).num_examples == 4
  assert data.dataset_info(flat, "train[:50%]").num_examples == 2
  for split in ("test", "validation", "train+validation", "val[:50%]"):
    with pytest.raises(data.SplitNotFound, match="slices of 'train'"):
      data.dataset_info(flat, split)

  split_root = tmp_path / "inet"
  _class_folders(split_root / "train", ("a", "b"))
  _class_folders(split_root / "val", ("a", "b"), images_each=1)
  layout = f"folder:{split_root}"
  assert data.dataset_info(layout, "train").num_examples == 4
  assert data.dataset_info(layout, "val").name == f"folder:{split_root / 'val'}"
  assert data.dataset_info(layout, "val").classes == ("a", "b")
  for split in ("test", "train[:1]+val"):
    with pytest.raises(data.SplitNotFound, match="its split folders are train, val"):
      data.dataset_info(layout, split)
  # TFDS's 'validation' (the configs' held-out split, the k-NN monitor's default) is val/; it
  # held out train[90%:] from the bank instead.
  assert data.dataset_info(layout, "validation").name == f"folder:{split_root / 'val'}"
  assert data.dataset_info(layout, "validation[:1]").num_examples == 1

  # Split folders in another case are the splits, not two classes 'Train' and 'Val' that
  # would put the validation images into pretraining.
  cased = tmp_path / "cased"
  _class_folders(cased / "Train", ("a", "b"))
  _class_folders(cased / "Val", ("a", "b"), images_each=1)
  assert data.dataset_info(f"folder:{cased}", "train") == data.DatasetInfo(
      4, 2, f"folder:{cased / 'Train'}", classes=("a", "b"))
  assert data.dataset_info(f"folder:{cased}", "val[:50%]").num_examples == 1

  # A class that shares a split's name is not taken for the split.
  vehicles = f"folder:{_class_folders(tmp_path / 'vehicles', ('bicycle', 'bus', 'train'))}"
  with pytest.raises(data.DataError, match="train/ the 'train' split or a class beside bicycle"):
    data.dataset_info(vehicles, "train")
  vehicles = f"folder:{_class_folders(tmp_path / 'Vehicles', ('Bicycle', 'Bus', 'Train'))}"
  with pytest.raises(data.DataError, match="Train/ the 'Train' split or a class beside Bicycle"):
    data.dataset_info(vehicles, "train")
  # A macOS zip's __MACOSX/ beside flat split folders is no class, nor is train/ taken for one.
  unzipped = tmp_path / "unzipped"
  for split in ("train", "val", "__MACOSX/train"):
    os.makedirs(unzipped / split)
  _write(unzipped / "train" / "0.png", (0, 0, 0), (8, 8), "PNG")
  (unzipped / "__MACOSX" / "train" / "._0.png").write_bytes(b"resource fork")
  assert data.dataset_info(f"folder:{unzipped}", "train").num_examples == 1


def test_held_out_splits_share_no_image_and_the_classes(tmp_path):
  info = lambda split, source=DIGITS: data.dataset_info(source, split)
  data.check_held_out(info("train[:80%]"), info("train[80%:]"), "train", "val")
  data.check_held_out(info("train"), info("test"), "train", "test")
  with pytest.raises(data.DataError, match=r"val \(embedded:digits/train\[70%:\]\) holds 150 of "
                     r"the 1200 images of train"):
    data.check_held_out(info("train[:80%]"), info("train[70%:]"), "train", "val")
  with pytest.raises(data.DataError, match="holds 297 of"):
    data.check_held_out(info("test"), info("all"), "train", "test")
  root = tmp_path / "split"
  _class_folders(root / "train", ("ant", "bee", "cow"))
  _class_folders(root / "test", ("ant", "cow", "dog"))
  source = f"folder:{root}"
  with pytest.raises(data.DataError, match=r"other class folders than .*missing: bee; not in "
                     r"data.train_split: dog\. Label i is the i-th class folder"):
    data.check_held_out(info("train", source), info("test", source), "data.train_split",
                        "data.test_split")
  # Different folders never share an image; the same folder's disjoint slices do not either.
  data.check_held_out(info("train[:50%]", source), info("train[50%:]", source), "a", "b")
  # The same folder spelt otherwise (a trailing '/', a link to it) reads the same images.
  os.symlink(root, tmp_path / "link")
  for other in (f"{source}/", f"folder:{tmp_path / 'link'}"):
    with pytest.raises(data.DataError, match="holds 1 of the 3 images"):
      data.check_held_out(info("train[:50%]", source), info("train[25%:]", other), "a", "b")
  # Class names copied from a Mac come decomposed (NFD: 'e' + combining accent), the same
  # names typed elsewhere composed (NFC): the same classes, in the same (NFC) order.
  composed, decomposed = "\u00e9clair", "e\u0301clair"
  _class_folders(tmp_path / "mac" / "train", (decomposed, "fig"))
  _class_folders(tmp_path / "mac" / "test", (composed, "fig"))
  mac = f"folder:{tmp_path / 'mac'}"
  data.check_held_out(info("train", mac), info("test", mac), "train", "test")
  assert info("train", mac).classes == info("test", mac).classes == ("fig", composed)
  paths, labels, _ = data.list_folder(str(tmp_path / "mac" / "train"))
  assert [label for path, label in zip(paths, labels) if decomposed in path] == [1, 1]
  # File names too: a copy lists its images in the same order, so a slice ('train[:90%]') and
  # an epoch hold the same images as the original's.
  for form in ("NFC", "NFD"):
    os.makedirs(tmp_path / form)
    for name in ("e", "f", "\u00e9t\u00e9"):
      _write(tmp_path / form / f"{unicodedata.normalize(form, name)}.png", (0, 0, 0), (8, 8), "PNG")
  listing = lambda form: [unicodedata.normalize("NFC", os.path.basename(path))
                          for path in data.list_folder(str(tmp_path / form))[0]]
  assert listing("NFD") == listing("NFC") == ["e.png", "f.png", "\u00e9t\u00e9.png"]
  from sit_jax.transfer import segment_data  # its folders of image and mask pairs too
  for form in ("NFC", "NFD"):
    for sub in ("images", "masks"):
      os.makedirs(tmp_path / "seg" / form / sub)
    for i, name in enumerate(("e", "f", "\u00e9t\u00e9")):
      name = unicodedata.normalize(form, name)
      _write(tmp_path / "seg" / form / "images" / f"{name}.png", (0, 0, 0), (8, 8), "PNG")
      Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "seg" / form / "masks" /
                                                         f"{name}.png")
  mask_order = lambda form: [int(pairs.load(i)[1][0, 0]) for pairs in [segment_data.open_split(
      f"folder:{tmp_path / 'seg' / form}", "train", num_classes=3)] for i in range(3)]
  assert mask_order("NFD") == mask_order("NFC") == [0, 1, 2]
  # A val/ of images without class folders: every label would be -1, every score 0.
  os.makedirs(root / "val")
  _write(root / "val" / "0.png", (10, 10, 10), (12, 12), "PNG")
  with pytest.raises(data.DataError, match=r"split/val \(data.val_split\) has no class folders, "
                     r".* has 3: put its images in the same class folders \(ant, bee, cow"):
    data.check_held_out(info("train", source), info("val", source), "data.train_split",
                        "data.val_split")
  # The class folders one level down (an archive's own folder): one class, every score 1.0.
  wrapped = f"folder:{_class_folders(tmp_path / 'wrapped' / 'animals', ('cat', 'dog')).parent}"
  with pytest.raises(data.DataError, match=r"wrapped\[:50%\] \(data.train_split\) has one class, "
                     r"so every data.test_split image would be scored right\. If animals/ holds "
                     r"the class folders, move them up a level"):
    data.check_held_out(info("train[:50%]", wrapped), info("train[50%:]", wrapped),
                        "data.train_split", "data.test_split")


def test_folder_listing_reads_each_directory_once_and_names_what_it_leaves(tmp_path, caplog):
  root = _class_folders(tmp_path / "loop", ("a", "b"))
  os.symlink(root, root / "a" / "back_to_root")  # a loop through the root
  os.symlink(root / "b", root / "a" / "b_too")   # a link to another class: read in both
  _write(root / "stray.png", (0, 0, 0), (12, 12), "PNG")
  data._warn_left_out.cache_clear()
  with caplog.at_level("WARNING"):
    info = data.dataset_info(f"folder:{root}", "train")
  assert info.num_examples == 6 and info.classes == ("a", "b")
  assert ".png (beside the class folders) 1" in caplog.text
  # An empty class folder keeps its label's place, and is named: its class has no example.
  os.makedirs(tmp_path / "loop" / "c")
  with caplog.at_level("WARNING"):
    assert data.dataset_info(f"folder:{root}", "train").classes == ("a", "b", "c")
  assert "1 of its 3 class folders hold no image (c)" in caplog.text
  # A Synology NAS's thumbnails, several per photo, in the classes and beside them: never read.
  for place in (root, root / "a"):
    os.makedirs(place / "@eaDir" / "0.png")
    for size in ("S", "M", "XL"):
      _write(place / "@eaDir" / "0.png" / f"SYNOFILE_THUMB_{size}.jpg", (0, 0, 0), (4, 4), "JPEG")
  info = data.dataset_info(f"folder:{root}", "train")
  assert (info.num_examples, info.classes) == (6, ("a", "b", "c"))


GREY_RAMP = np.arange(256, dtype=np.int64).reshape(16, 16)  # every 8-bit value once


@pytest.mark.parametrize("pixels", [GREY_RAMP.astype(np.uint16) * 257,    # 'I;16': 16-bit PNG
                                    GREY_RAMP.astype(np.int32) * 257,     # 'I': older PILs'
                                    GREY_RAMP.astype(np.int32),           # 'I' holding 8 bits
                                    GREY_RAMP.astype(np.float32) / 255])  # 'F' in [0, 1]
def test_high_bit_depth_grey_images_are_scaled_not_clipped(pixels):
  """PIL's convert('RGB') clips these at 255 (a 16-bit ramp came out 99.6% white); each must
  read as the 8-bit ramp it encodes, on every channel."""
  view = data.eval_view(pixels, 16, "resize", "bicubic_antialias")
  chex.assert_shape(view, (16, 16, 3))
  for channel in range(3):
    np.testing.assert_array_equal(view[..., channel], GREY_RAMP)


@pytest.mark.parametrize("pixels, span", [
    (GREY_RAMP.astype(np.float32) * 12, "0..3060"),  # 'F': an elevation map in metres
    (GREY_RAMP.astype(np.int32) * 16 - 1024, "-1024..3056"),  # 'I': a CT scan's Hounsfield units
    (np.where(GREY_RAMP < 9, np.nan, GREY_RAMP / 255).astype(np.float32), "nan..nan")])
def test_grey_images_beyond_the_read_ranges_are_unreadable_not_clipped(pixels, span):
  """Clipped at 255 (or 0), 91% of the elevation map came out white: such an image is skipped
  and named (the line says to rescale it), never read as another image."""
  with pytest.raises(data.UnreadableImage, match=f"pixel values span {span}, beyond .*rescale"):
    data.eval_view(pixels, 16, "resize", "bicubic_antialias")


def test_folder_reads_tiff_and_names_the_files_it_leaves_out(tmp_path, monkeypatch):
  root = tmp_path / "images"
  os.makedirs(root / "a")
  os.makedirs(root / "b")
  _write(root / "a" / "0.tif", (200, 0, 0), (20, 20), "TIFF")
  _write(root / "b" / "0.png", (0, 0, 200), (20, 20), "PNG")
  (root / "a" / "notes.txt").write_text("not an image")
  (root / "b" / "scan.raw").write_bytes(b"\0" * 8)
  (root / "b" / ".hidden.txt").write_text("hidden: neither read nor counted")
  warnings = []
  monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  assert data.dataset_info(f"folder:{root}", None).num_examples == 2
  data.dataset_info(f"folder:{root}", None)  # listed again: not warned again
  assert warnings == [f"folder:{root}: 2 file(s) not read (.raw 1, .txt 1); read are the files "
                      f"ending in {' '.join(data.IMAGE_EXTENSIONS)}, in the class folders when "
                      "there are any."]
  flat = tmp_path / "flat"  # no class sub-folders: the root's own files
  os.makedirs(flat)
  _write(flat / "0.tiff", (0, 200, 0), (20, 20), "TIFF")
  (flat / "labels.json").write_text("{}")
  assert data.dataset_info(f"folder:{flat}", None).num_examples == 1
  assert warnings[1:] == [f"folder:{flat}: 1 file(s) not read (.json 1); read are the files "
                          f"ending in {' '.join(data.IMAGE_EXTENSIONS)}, in the class folders "
                          "when there are any."]


def test_folder_reads_every_format_pillow_decodes_as_rgb(tmp_path, monkeypatch):
  """Windows' and browsers' JPEG endings, Netpbm (grey and black-and-white too) and a phone's
  AVIF are read, as the RGB pixels written: exactly where the format is lossless."""
  rows, cols = np.indices((16, 16))  # R ramps across, G down, B back: a swapped channel is far
  ramps = np.stack([cols * 12, rows * 16, 255 - (rows + cols) * 8], axis=-1).astype(np.uint8)
  dots = np.eye(16, dtype=bool) | np.eye(16, dtype=bool)[::-1]
  # Lossy ones within 16 levels: their chroma is stored at half resolution, blurring B here.
  written = {"a.jfif": (ramps, 16), "b.jpe": (ramps, 16), "c.ppm": (ramps, 0),
             "d.pnm": (ramps, 0), "e.pgm": (ramps[..., 0], 0), "f.pbm": (dots, 0)}
  if ".avif" in data.IMAGE_EXTENSIONS:
    written["g.avif"] = (ramps, 16)
  for name, (pixels, _) in written.items():
    Image.fromarray(pixels).save(tmp_path / name, quality=95)
  paths, _, _ = data.list_folder(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == sorted(written)
  for path, (pixels, tolerance) in zip(paths, written.values()):
    with open(path, "rb") as f:
      view = data.eval_view(f.read(), 16, "resize", "bicubic_antialias")
    expected = np.broadcast_to((pixels * 255 if pixels.dtype == bool else pixels)
                               .reshape(16, 16, -1), (16, 16, 3))
    assert view.dtype == np.uint8
    np.testing.assert_allclose(view, expected, rtol=0, atol=tolerance, err_msg=path)
  # Where this Pillow cannot decode AVIF, the .avif files left out are named with the fix.
  monkeypatch.setattr(data, "IMAGE_EXTENSIONS", tuple(e for e in data.IMAGE_EXTENSIONS
                                                      if e != ".avif"))
  (tmp_path / "h.avif").write_bytes(b"")
  warnings = []
  monkeypatch.setattr(data.logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
  data.list_folder(str(tmp_path))
  assert len(warnings) == 1 and warnings[0].endswith(
      "This Pillow cannot decode AVIF: `pip install -U 'pillow>=11.2'` reads .avif too.")


def test_segmentation_masks_in_any_lossy_format_are_refused(tmp_path):
  """JPEG by any of its endings, or AVIF, moves class indices along every edge."""
  from sit_jax.transfer import segment_data
  os.makedirs(tmp_path / "images")
  os.makedirs(tmp_path / "masks")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "0.png")
  for ending in (".jfif", ".JPE", ".avif"):
    (tmp_path / "masks" / f"0{ending}").write_bytes(b"")  # refused by its ending, before reading
    with pytest.raises(segment_data.SegmentationDataError,
                       match=rf"1 of its masks are JPEG or AVIF \(0\{ending}, .*save them as PNG"):
      segment_data.open_split(f"folder:{tmp_path}", "train", num_classes=2)
    os.remove(tmp_path / "masks" / f"0{ending}")


def test_folder_of_only_corrupt_files_raises(tmp_path):
  os.makedirs(tmp_path / "bad")
  for i in range(3):
    (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"garbage")
  it = data.pretrain_iterator(f"folder:{tmp_path / 'bad'}", None, global_batch_size=2,
                              image_size=8, seed=0, process_index=0, process_count=1)
  with pytest.raises(data.DataError, match=r"too few readable.*, e\.g\. .*/bad/\d\.jpg: cannot "
                                           "identify image file"):
    next(it)
  # A held-out split or k-NN bank of them is one line, not a crash on no features at all.
  it = data.eval_iterator(f"folder:{tmp_path / 'bad'}", None, global_batch_size=2, image_size=8,
                          process_index=0, process_count=1)
  with pytest.raises(data.DataError, match=r"bad: none of its 3 images could be read, e\.g\. "
                                           r".*/bad/0\.jpg: cannot identify image file"):
    list(it)


def test_fixing_an_unreadable_file_makes_a_new_feature_cache_entry(tmp_path):
  """Its warning asks to fix the file: the next k-NN or few-shot run must read it, not the
  features cached while it was skipped."""
  from sit_jax.transfer import feature_cache
  root = _class_folders(tmp_path / "images", ("a", "b"))
  (root / "a" / "broken.png").write_bytes(b"")
  os.symlink(root / "missing.png", root / "b" / "dangling.png")
  listing = lambda: feature_cache.folder_listing(f"folder:{root}", "train")
  before = listing()
  assert listing() == before
  _write(root / "a" / "broken.png", (0, 0, 0), (12, 12), "PNG")
  assert listing() != before


# ----- errors -------------------------------------------------------------------------------
def test_unknown_tfds_name():
  with pytest.raises(data.DataError, match="unknown TFDS dataset 'cifar_10_bogus'.*cifar10"):
    data.dataset_info("tfds:cifar_10_bogus", "train")


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(data.DataNotFoundError, match=re.escape(
      f"tfds.builder('cifar10', data_dir='{tmp_path}', file_format='array_record')"
      ".download_and_prepare()")):
    data.pretrain_iterator("cifar10", "train", global_batch_size=2, image_size=8, seed=0,
                           process_index=0, process_count=1, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar.*downloads/manual"):
    data.dataset_info("tfds:imagenet2012", "train", data_dir=str(tmp_path))


def test_argument_and_folder_errors(tmp_path):
  kw = dict(seed=0, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.dataset_info(f"folder:{tmp_path / 'missing'}", None)
  with pytest.raises(data.DataError, match=f"is a path, not a TFDS name: an image folder is "
                                           f"'folder:{tmp_path}'"):
    data.dataset_info(str(tmp_path), "train")  # 'folder:' left out
  os.makedirs(tmp_path / "empty" / "cls")
  with pytest.raises(data.DataError, match="no images"):
    data.dataset_info(f"folder:{tmp_path / 'empty'}", None)
  # A flat folder beside an unzipped archive's __MACOSX/ (AppleDouble files): a flat folder.
  os.makedirs(tmp_path / "unzipped" / "__MACOSX")
  (tmp_path / "unzipped" / "__MACOSX" / "._0.png").write_bytes(b"resource fork")
  for i in range(2):
    _write(tmp_path / "unzipped" / f"{i}.png", (0, 0, 0), (8, 8), "PNG")
  assert data.dataset_info(f"folder:{tmp_path / 'unzipped'}", None) == data.DatasetInfo(
      2, 0, f"folder:{tmp_path / 'unzipped'}")
  # Beside a sub-folder of fewer images (thumbnails), which would be the whole dataset: an error.
  os.makedirs(tmp_path / "unzipped" / "thumbs")
  _write(tmp_path / "unzipped" / "thumbs" / "0.png", (0, 0, 0), (4, 4), "PNG")
  with pytest.raises(data.DataError, match=r"sub-folders \(thumbs\) are read as classes and hold "
                     r"1 image; the 2 images beside them belong to no class"):
    data.dataset_info(f"folder:{tmp_path / 'unzipped'}", None)
  with pytest.raises(data.DataError, match="divisible"):
    data.pretrain_iterator(DIGITS, "train", global_batch_size=6, image_size=8, seed=0,
                           process_index=0, process_count=4)
  with pytest.raises(data.DataError, match="image_size"):
    data.pretrain_iterator(DIGITS, "train", global_batch_size=8, image_size=0, **kw)
  with pytest.raises(data.DataError, match="embedded"):
    data.dataset_info("embedded:mnist", "train")
  with pytest.raises(data.DataError, match="resize_mode"):
    data.eval_iterator(DIGITS, "test", global_batch_size=8, image_size=8, resize_mode="x",
                       process_index=0, process_count=1)
  with pytest.raises(data.DataError, match="bicubic_antialias"):
    data.pretrain_iterator(DIGITS, "train", global_batch_size=8, image_size=8,
                           interpolation="lanczos", **kw)


def test_interpolations_shrink_like_pil_or_without_antialiasing(tmp_path):
  # One 64 x 64 image of fine stripes (period 3 px), shrunk 4x by the eval path ('resize').
  os.makedirs(tmp_path / "images")
  x = np.arange(64)
  stripes = np.where((x[None, :] + 0 * x[:, None]) % 3 == 0, 255, 0).astype(np.uint8)
  rgb = np.repeat(stripes[..., None], 3, -1)
  Image.fromarray(rgb).save(tmp_path / "images" / "a.png")

  def shrink(interpolation):
    it = data.eval_iterator(f"folder:{tmp_path / 'images'}", None, global_batch_size=1,
                            image_size=16, resize_mode="resize", interpolation=interpolation,
                            process_index=0, process_count=1)
    return next(it)["image"][0].astype(np.float32)

  pil = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BICUBIC), np.float32)
  antialiased = shrink("bicubic_antialias")
  assert np.abs(antialiased - pil).mean() < 1.0  # PIL averages the stripes too.
  # Without antialiasing each output pixel interpolates a few input pixels, so the stripes alias
  # into values far from the 85 grey that averaging gives.
  for interpolation in ("bicubic", "bilinear"):
    fast = shrink(interpolation)
    assert np.abs(fast - pil).mean() > 20.0, interpolation
  assert np.abs(shrink("bicubic") - shrink("bilinear")).max() > 0


# ----- a real (tiny, locally generated) TFDS dataset: the reader paths without mocks ---------
_PREPARE = tfds.core.DatasetBuilder.download_and_prepare


class SitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Example i is a constant 8x8 image of value 10*i, so crops still tell which it is."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(21)),
            "test": self._generate_examples(range(21, 25))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8), "label": i % 3}


FORMATS = {"grain": "array_record", "tf": "tfrecord"}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def tiny_tfds(request, tmp_path_factory):
  """(engine, data_dir) of the tiny dataset in the engine's format. Writing TFDS images needs
  TensorFlow, as does the 'tf' engine: skipped without it."""
  pytest.importorskip("tensorflow")
  engine = request.param
  data_dir = str(tmp_path_factory.mktemp(f"tfds_{engine}"))
  # A local generator only: nothing is downloaded.
  _PREPARE(tfds.builder("sit_jax_tiny_images", data_dir=data_dir,
                        file_format=FORMATS[engine]))
  return engine, data_dir


def _ids(images):
  return list(images[:, 0, 0, 0] // 10)


def test_real_tfds_resize_on_device_gives_the_host_views(tiny_tfds):
  """Both engines send decoded images for resize_on='device' (data_tf pads them to the buffer)."""
  from sit_jax import resample
  engine, data_dir = tiny_tfds
  kw = dict(global_batch_size=4, image_size=4, seed=5, process_index=0, process_count=1,
            data_dir=data_dir, engine=engine)
  host = _take(data.pretrain_iterator("sit_jax_tiny_images", "train", **kw), 3)
  device = _take(data.pretrain_iterator("sit_jax_tiny_images", "train", resize_on="device",
                                        decoded_size=16, **kw), 3)
  for want, got in zip(host, device):
    chex.assert_shape(got["decoded"], (4, 16, 16, 3))
    np.testing.assert_array_equal(got["extent"], np.full((4, 2), 8))
    _assert_same_batches([want], [jax.device_get(
        resample.render_views(got, 4, "bicubic_antialias", data.view_keys(2)))])


def test_real_tfds_hosts_resume_and_eval(tiny_tfds):
  engine, data_dir = tiny_tfds
  source = "tfds:sit_jax_tiny_images"
  assert data.dataset_info(source, "train", data_dir=data_dir, engine=engine) == (
      data.DatasetInfo(21, 3, f"{source}/train"))
  per_host = []
  for p in range(2):
    kw = dict(global_batch_size=4, image_size=4, seed=5, process_index=p, process_count=2,
              data_dir=data_dir, engine=engine)
    stream = data.pretrain_iterator(source, "train", **kw)
    assert stream.first_epoch_class_counts is None
    fresh = _take(stream, 12)
    for b in fresh:  # constant images: the label follows the image
      np.testing.assert_array_equal(_ids(b["view1"]), _ids(b["view2"]))
      np.testing.assert_array_equal(np.array(_ids(b["view1"])) % 3, b["label"])
    # Epochs of 11 and 10 examples: step 7 starts inside epoch 1 (host 0) or 2 (host 1).
    resumed = data.pretrain_iterator(source, "train", start_step=7, **kw)
    _assert_same_batches(fresh[7:], _take(resumed, 5))
    assert resumed.first_epoch_class_counts is None  # its first epoch was another run's
    ids = [i for b in fresh for i in _ids(b["view1"])]
    n_local = 11 - p
    # The first epoch's batches, 6 (host 0) or 5 (host 1) of 2: every example, label id % 3.
    epoch_ids = np.array(ids[:-(-n_local // 2) * 2])
    np.testing.assert_array_equal(stream.first_epoch_class_counts,
                                  np.bincount(epoch_ids % 3, minlength=3))
    per_host.append(ids[:n_local])
    assert sorted(ids[n_local:2 * n_local]) == sorted(ids[:n_local])  # epoch 2: same examples
    assert ids[n_local:2 * n_local] != ids[:n_local]  # in another order
    ev = data.eval_iterator(source, "train", process_index=p, process_count=2,
                            global_batch_size=4, image_size=8, data_dir=data_dir,
                            engine=engine)
    batches = list(ev)
    assert len(batches) == 6 and ev.num_skipped == 0  # ceil(11 / 2) on both hosts
    got = [i for b in batches for i in _ids(b["image"][b["mask"]])]
    assert sorted(got) == sorted(per_host[-1])
  assert sorted(per_host[0] + per_host[1]) == list(range(21))


def test_real_tfds_joined_split_gives_every_host_the_same_eval_batches(tiny_tfds, caplog):
  """Each part of 'train[:3]+test[:3]' gives its remainder to host 0 (2 + 2 of 6 examples on 2
  hosts; on 5 hosts, hosts 3 and 4 have none): every host must still yield that many batches,
  or the collective evaluation step hangs, and every example comes once."""
  engine, data_dir = tiny_tfds
  read = lambda p, count: data.eval_iterator(
      "tfds:sit_jax_tiny_images", "train[:3]+test[:3]", process_index=p, process_count=count,
      global_batch_size=2 * count, image_size=8, data_dir=data_dir, engine=engine)
  ids = lambda batches: [i for b in batches for i in _ids(b["image"][b["mask"]])]
  whole = ids(read(0, 1))
  assert len(whole) == 6
  for count, host0_batches in ((2, 2), (5, 1)):  # host 0 holds 4 (2 hosts) or 2 (5) of 6
    seen, lengths, positions = [], set(), []
    for p in range(count):
      ev = read(p, count)
      batches = list(ev)
      lengths.add((len(ev), len(batches)))
      seen += ids(batches)
      positions += [i for b in batches for i in b["index"][b["mask"]]]
    assert lengths == {(host0_batches, host0_batches)}
    assert sorted(seen) == sorted(whole)
    # Each example's position in the split: put in that order, the hosts' examples are one
    # process's (features extracted on any number of processes come out in the same order).
    assert [seen[i] for i in np.argsort(positions)] == whole
    assert sorted(positions) == list(range(6))
  assert "AutoGraph could not transform" not in caplog.text  # tf: one per read


class SitJaxShardedImages(tfds.core.GeneratorBasedBuilder):
  """40 + 4 examples in shards of 20 and 2: more records in a shard than the 16 of a block
  of tf.data's interleave. Example i is a constant image of value 5*i."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(4, 4, 3)),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(40)),
            "test": self._generate_examples(range(40, 44))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": np.full((4, 4, 3), 5 * i, np.uint8), "label": i % 2}


def test_tf_engine_eval_index_is_the_split_order_whatever_the_shards_and_hosts(tmp_path):
  """tf.data reads 16 records of each of 16 shards in turn: `index` must still be the place in
  the split (what grain numbers; features are sorted by it, few-shot draws pick by it), the
  same on 1 and 3 hosts, not the order of reading."""
  pytest.importorskip("tensorflow")
  builder = tfds.builder("sit_jax_sharded_images", data_dir=str(tmp_path))
  _PREPARE(builder, download_config=tfds.download.DownloadConfig(num_shards=2))
  split = "train[5%:]+test"
  in_order = builder.as_dataset(split=split, shuffle_files=False,
                                read_config=tfds.ReadConfig(interleave_cycle_length=1))
  want = [int(ex["image"][0, 0, 0]) // 5 for ex in in_order.as_numpy_iterator()]
  assert len(want) == 42 and want != sorted(want)  # the writer shuffles
  for count in (1, 3):
    got = {}
    for p in range(count):
      for b in data.eval_iterator("tfds:sit_jax_sharded_images", split, process_index=p,
                                  process_count=count, global_batch_size=8 * count, image_size=4,
                                  data_dir=str(tmp_path), engine="tf"):
        got.update(zip(b["index"][b["mask"]], np.array(b["image"][b["mask"], 0, 0, 0]) // 5))
    assert [got[i] for i in range(42)] == want, count
  with tfds.testing.mock_data(num_examples=10):  # no shards in its metadata: the reading order
    batches = data.eval_iterator("tfds:mnist", "train", global_batch_size=4, image_size=4,
                                 process_index=0, process_count=1, engine="tf")
    assert [i for b in batches for i in b["index"][b["mask"]]] == list(range(10))


def test_engine_and_format_mismatch_says_what_to_do(tiny_tfds):
  engine, data_dir = tiny_tfds
  if engine == "tf":
    with pytest.raises(data.DataError, match="prepared as tfrecord.*data.engine='tf'"):
      data.dataset_info("tfds:sit_jax_tiny_images", "train", data_dir=data_dir)
  with pytest.raises(data.DataError, match="TFDS datasets only"):
    data.dataset_info(DIGITS, "train", engine="tf")
  with pytest.raises(data.DataError, match="data.engine"):
    data.dataset_info(DIGITS, "train", engine="torch")


def test_sliced_splits_partition_train_without_overlap():
  """'train[:1200]' and 'train[1200:]' split one fixed shuffle of train: disjoint, complete,
  the same on every call; percentages address the same ranges."""
  def images_of(split):
    it = data.eval_iterator("embedded:digits", split, global_batch_size=64, image_size=8,
                            resize_mode="resize", process_index=0, process_count=1)
    return np.concatenate([b["image"][b["mask"]].reshape(int(b["mask"].sum()), -1) for b in it])

  head, tail, whole = images_of("train[:1200]"), images_of("train[1200:]"), images_of("train")
  assert (len(head), len(tail)) == (1200, 300)
  key = lambda rows: sorted(map(bytes, rows))
  assert key(np.concatenate([head, tail])) == key(whole)
  np.testing.assert_array_equal(images_of("train[80%:]"), tail)
  np.testing.assert_array_equal(images_of("train[1200:]"), tail)


def test_bad_slices_name_the_split():
  with pytest.raises(data.DataError, match=r"train\[a:b\]"):
    data.dataset_info("embedded:digits", "train[a:b]")
  with pytest.raises(data.DataError, match="selects no examples"):
    data.dataset_info("embedded:digits", "train[5:5]")
  # Beyond the split is an error, as in TFDS, not silently the whole split.
  for split, beyond in (("train[:2000]", "2000 is beyond the split's 1500 examples"),
                        ("train[-1501:]", "-1501 is beyond"), ("train[:150%]", "150% is beyond")):
    with pytest.raises(data.DataError, match=re.escape(f"bad slice {split!r}: {beyond}")):
      data.dataset_info("embedded:digits", split)
  assert data.dataset_info("embedded:digits", "train[-10%:]").num_examples == 150
  with pytest.raises(data.DataError, match="valid|splits"):
    data.dataset_info("embedded:digits", "val[:10]")


def test_folder_slice(tmp_path):
  for c in range(2):
    os.makedirs(tmp_path / f"c{c}")
    for i in range(5):
      _write(tmp_path / f"c{c}" / f"{i}.png", (40 * i, 0, 0), (12, 12), "PNG")
  a = data.dataset_info(f"folder:{tmp_path}", "train[:60%]")
  b = data.dataset_info(f"folder:{tmp_path}", "train[60%:]")
  assert (a.num_examples, b.num_examples, a.num_classes) == (6, 4, 2)


def test_flip_off_keeps_handedness():
  """Whole-image crops: with flip=False every view is the image itself; with flips about half
  are its mirror image."""
  def views(flip):
    it = data.pretrain_iterator("embedded:digits", "train[:64]", global_batch_size=64,
                                image_size=32, crop_scale=(1.0, 1.0), seed=0, flip=flip,
                                process_index=0, process_count=1, interpolation="bicubic")
    batch = next(it)
    return batch["view1"].astype(int)

  reference = data.eval_iterator("embedded:digits", "train[:64]", global_batch_size=64,
                                 image_size=32, resize_mode="resize", process_index=0,
                                 process_count=1, interpolation="bicubic")
  images = next(iter(reference))["image"].astype(int)
  distance = lambda a, b: np.abs(a - b).reshape(len(a), -1).max(axis=1)
  plain = views(False)
  # Same images as a set (the order of a training batch is shuffled).
  assert all(distance(images, v[None]).min() <= 1 for v in plain)
  assert not any(distance(images[:, :, ::-1], v[None]).min() <= 1 and
                 distance(images, v[None]).min() > 1 for v in plain)
  flipped = views(True)
  mirrored = sum(distance(images, v[None]).min() > 1 for v in flipped)
  assert 16 <= mirrored <= 48


def test_jpeg_decoded_at_a_dct_scale_matches_a_full_decode(tmp_path):
  """A crop at least 8x the output side is decoded at 1/8 scale (PIL draft): the same picture
  as a full decode resized by PIL, within a few grey levels on average."""
  x, y = np.meshgrid(np.linspace(0, 6, 640), np.linspace(0, 4, 480))
  photo = np.stack([128 + 100 * np.sin(x * y), 128 + 100 * np.cos(x + 2 * y),
                    (x * 40) % 256], -1).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(photo).save(out, format="JPEG", quality=95)
  encoded = out.getvalue()
  window = (40, 60, 400, 520)  # top, left, h, w
  got = data._render(data._open(encoded), [window], 48, "bicubic_antialias")[0].astype(int)
  full = Image.open(io.BytesIO(encoded))
  want = np.asarray(full.resize((48, 48), Image.BICUBIC, box=(60, 40, 580, 440))).astype(int)
  assert 0 < np.abs(got - want).mean() < 3


def test_unreadable_files_are_skipped_in_worker_processes_too(class_folder):
  """Worker processes build the same batches, skips included."""
  kw = dict(global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1)
  source = f"folder:{class_folder}"
  in_process = data.pretrain_iterator(source, "train", **kw)
  workers = data.pretrain_iterator(source, "train", workers=2, **kw)
  _assert_same_batches(_take(in_process, 4), _take(workers, 4))
  assert workers.num_skipped == in_process.num_skipped >= 1


@pytest.mark.filterwarnings("ignore:'sit_jax.data_tf' found in sys.modules:RuntimeWarning")
def test_tfrecord_converted_to_array_record_holds_the_same_examples(tmp_path, monkeypatch):
  """data_tf.convert_to_array_record: what the 'tf' engine reads of a TFRecord dataset, the
  'grain' engine reads of its copy. The dataset's folder instead of its version folder, or a
  typo, is one line (`python -m sit_jax.data_tf`), and leaves no DST to block the corrected
  command (it wrote an empty copy, or created DST before failing)."""
  pytest.importorskip("tensorflow")
  import runpy
  import sys
  from sit_jax import data_tf
  _PREPARE(tfds.builder("sit_jax_tiny_images", data_dir=str(tmp_path / "tfrecord")))
  version_dir = tmp_path / "tfrecord" / "sit_jax_tiny_images" / "1.0.0"
  wrong_dst = tmp_path / "ar_wrong"
  for wrong in (version_dir.parent, tmp_path / "no_such_dir"):
    with pytest.raises(data.DataError, match="not a TFDS dataset version directory"):
      data_tf.convert_to_array_record(str(wrong), str(wrong_dst))
    assert not wrong_dst.exists()
  monkeypatch.setattr(sys, "argv", ["data_tf", str(version_dir.parent), str(wrong_dst)])
  with pytest.raises(SystemExit, match="^sit_jax.data_tf: error: .* is not a TFDS dataset"):
    runpy.run_module("sit_jax.data_tf", run_name="__main__")
  data_tf.convert_to_array_record(str(version_dir),
                                  str(tmp_path / "ar" / "sit_jax_tiny_images" / "1.0.0"))

  def read(engine, root):
    it = data.eval_iterator("tfds:sit_jax_tiny_images", "train", global_batch_size=8,
                            image_size=8, process_index=0, process_count=1, engine=engine,
                            data_dir=str(tmp_path / root))
    return [(i, l) for b in it for i, l in zip(_ids(b["image"][b["mask"]]), b["label"][b["mask"]])]

  tf_examples, grain_examples = read("tf", "tfrecord"), read("grain", "ar")
  assert sorted(tf_examples) == sorted(grain_examples) == [(i, i % 3) for i in range(21)]


def test_real_tfds_held_out_slices_share_no_example(tiny_tfds):
  """A validation slice that overlaps the training slice (train[:90%] is examples 0-18,
  train[85%:] 18-20) is caught for TFDS as for folders; other splits never overlap."""
  engine, data_dir = tiny_tfds
  info = lambda split: data.dataset_info("tfds:sit_jax_tiny_images", split, data_dir=data_dir,
                                         engine=engine)
  with pytest.raises(data.DataError, match=r"val \(tfds:sit_jax_tiny_images/train\[85%:\]\+test"
                     r"\) holds 1 of the 19 images of train"):
    data.check_held_out(info("train[:90%]"), info("train[85%:]+test"), "train", "val")
  data.check_held_out(info("train[:90%]"), info("train[90%:]+test[:1]"), "train", "val")
  data.check_held_out(info("train"), info("test"), "train", "test")
  with pytest.raises(data.DataError, match="holds 4 of the 25"):
    data.check_held_out(info("train+test"), info("test"), "train", "test")


def test_segmentation_held_out_splits_share_no_example(tmp_path):
  """A segmentation run's validation and test splits are held out from its train split as a
  classification run's are: overlapping slices are refused before any work, the runlocal
  splits pass."""
  from configs import segment as segment_config
  from sit_jax.transfer import segment, segment_data
  config = segment_config.get_config("runlocal")
  config.init, config.total_steps = "", 1
  config.data.val_split = "train[70%:]"  # 150 of train[:80%]'s 1200 canvases
  with pytest.raises(data.DataError, match=r"data.val_split \(embedded:digit_canvas/train"
                     r"\[70%:\]\) holds 150 of the 1200 images of data.train_split"):
    segment.run(config, str(tmp_path))
  splits = [segment_data.open_split("embedded:digit_canvas", s)
            for s in ("train[:80%]", "train[80%:]", "test")]
  for a, b in itertools.combinations(splits, 2):
    data.check_disjoint(a, b, a.name, b.name)
