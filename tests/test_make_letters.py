"""benchmarks/make_letters.py, the held-out check data of benchmarks/learning.md: a folder that
the folder source reads as 26 classes, the same images for the same seed, and each --variation
changing only what it names."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sit_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(out, seed, variation, per_class="2,1"):
  subprocess.run([sys.executable, "benchmarks/make_letters.py", f"--out={out}", f"--seed={seed}",
                  f"--variation={variation}", f"--per_class={per_class}"],
                 cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
  return {os.path.relpath(os.path.join(root, f), out):
          np.asarray(Image.open(os.path.join(root, f)))
          for root, _, files in os.walk(out) for f in files}


def test_letters_are_a_folder_dataset_and_reproducible(tmp_path):
  first = make(tmp_path / "a", 1, "full")
  assert len(first) == 26 * 3
  assert all(x.shape == (32, 32) and x.dtype == np.uint8 for x in first.values())
  again = make(tmp_path / "b", 1, "full")
  assert again.keys() == first.keys()
  assert all(np.array_equal(first[k], again[k]) for k in first)
  other = make(tmp_path / "c", 2, "full")
  assert not any(np.array_equal(first[k], other[k]) for k in first)

  info = data.dataset_info(f"folder:{tmp_path / 'a'}", "train")
  assert (info.num_examples, info.num_classes) == (52, 26)
  assert data.dataset_info(f"folder:{tmp_path / 'a'}", "test").num_examples == 26


def test_variations_change_only_what_they_name(tmp_path):
  images = {v: list(make(tmp_path / v, 3, v, per_class="4,0").values())
            for v in ("none", "intensity", "noise")}
  black = lambda x: (x == 0).mean()
  # White strokes on black: most of the canvas is exactly 0 (measured 0.65-0.92), the strokes
  # reach white.
  assert all(black(x) > 0.6 and x.max() >= 200 for x in images["none"])
  # Pixel noise on the same black: about half of the background is pushed above 0 (0.41-0.52);
  # the strokes still reach white.
  assert all(black(x) < 0.56 and x.max() >= 200 for x in images["noise"])
  # Levels drawn per image: backgrounds spread over U(0, 0.3) x 255 (std 20 measured), strokes
  # below white for most.
  backgrounds = [np.percentile(x, 10) for x in images["intensity"]]
  assert np.std(backgrounds) > 10
  assert np.median([x.max() for x in images["intensity"]]) < 250


def test_a_variation_keeps_the_geometry_of_every_image(tmp_path):
  """The strokes (face, size, shift, rotation) of image i are the same in every variation: with
  fixed levels and no noise ('none') each image is a level map of the same strokes as in
  'intensity', whose levels are affine in the strokes."""
  plain = make(tmp_path / "none", 4, "none", per_class="3,0")
  levels = make(tmp_path / "intensity", 4, "intensity", per_class="3,0")
  for name, x in plain.items():
    y = levels[name].astype(np.float64)
    ink = x > 128
    assert ink.any() and (~ink).any()
    assert y[ink].mean() > y[~ink].mean() + 60  # the same pixels are stroke in both


def test_an_output_folder_in_use_is_refused(tmp_path):
  make(tmp_path / "a", 1, "full")
  proc = subprocess.run([sys.executable, "benchmarks/make_letters.py", f"--out={tmp_path / 'a'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "is not empty" in proc.stderr


def test_per_class_needs_a_train_and_a_test_count(tmp_path):
  """'60' wrote train/ only (learning.py --split=test then found no test/), '60,x' a traceback."""
  for per_class in ("5", "5,x"):
    proc = subprocess.run([sys.executable, "benchmarks/make_letters.py", f"--out={tmp_path / 'a'}",
                           f"--per_class={per_class}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"make_letters: --per_class={per_class}: give the images per class in train and in test, "
        "e.g. --per_class=60,20."]
    assert not (tmp_path / "a").exists()
