"""Host helpers shared by the benchmarks: cores, CPU time, a folder of photo-like JPEGs."""
import os

import numpy as np


def usable_cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_seconds():
  """User + system CPU seconds of this process and its live children (grain workers)."""
  import psutil
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def write_jpegs(folder, n, size=(500, 375), quality=90, seed=0):
  """n JPEGs of `size` in folder/photos/: random crops (60-100% of the side), flips and resizes
  of scikit-learn's two sample photos, so that they compress and decode like photographs."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = [Image.fromarray(x) for x in load_sample_images().images]
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "photos"), exist_ok=True)
  for i in range(n):
    src = photos[i % len(photos)]
    s = rng.uniform(0.6, 1.0)
    w, h = int(src.width * s), int(src.height * s)
    x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
    img = src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(os.path.join(folder, "photos", f"{i:05d}.jpg"), quality=quality)
  return folder
