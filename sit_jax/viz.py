"""Visualisations: GMML reconstruction grids and t-SNE plots of features."""
from __future__ import annotations

import os

from absl import logging
import numpy as np

from sit_jax import metrics

SEPARATOR_PX = 2


def _denormalise(x, mean, std) -> np.ndarray:
  """Normalised float (B,H,W,C) -> uint8.

  mean/std may be given in [0, 1] units (e.g. 0.485) or in pixel units
  (e.g. 123.7); the latter is detected by any mean value > 1.
  """
  x = np.asarray(x, np.float32)
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  scale = 1.0 if np.max(mean) > 1.0 else 255.0
  pixels = (x * std + mean) * scale
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def draw_or_warn(what: str, draw):
  """draw()'s result, or None and one warning naming `what` where drawing fails for any reason
  (matplotlib or scikit-learn that will not import, a plot they cannot lay out, a store that
  refuses the upload): a run's figures and checkpoints matter, its pictures are a view of them."""
  try:
    return draw()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("%s not drawn: %s", what, " ".join(str(e).split()))
    return None


def reconstruction_grid(original, corrupted, reconstructed, mean, std,
                        max_images: int = 8) -> np.ndarray:
  """uint8 (H', W', 3) grid: one row per image, columns original | corrupted | reconstructed.

  Cells are separated by 2 px white lines (none around the border), so
  H' = n*H + (n-1)*2 and W' = 3*W + 2*2 for n = min(B, max_images).
  """
  cols = [np.asarray(a) for a in (original, corrupted, reconstructed)]
  if any(c.shape != cols[0].shape for c in cols) or cols[0].ndim != 4:
    raise ValueError("original/corrupted/reconstructed must share a (B,H,W,C) "
                     f"shape, got {[c.shape for c in cols]}")
  n = min(cols[0].shape[0], max_images)
  if n == 0:
    raise ValueError("reconstruction_grid needs at least one image")
  _, h, w, c = cols[0].shape
  cols = [_denormalise(a[:n], mean, std) for a in cols]
  if c == 1:
    cols = [np.repeat(a, 3, axis=-1) for a in cols]
  elif c != 3:
    raise ValueError(f"expected 1 or 3 channels, got {c}")

  s = SEPARATOR_PX
  grid = np.full((n * h + (n - 1) * s, 3 * w + 2 * s, 3), 255, np.uint8)
  for i in range(n):
    for j, col in enumerate(cols):
      y, x = i * (h + s), j * (w + s)
      grid[y:y + h, x:x + w] = col[i]
  return grid


def tsne_plot(features, labels, path, title: str = "", max_points: int = 2000,
              seed: int = 0, class_names=None) -> str:
  """2-D t-SNE of `features` (N, D) coloured by `labels` (N,), saved as PNG."""
  import matplotlib
  from matplotlib.figure import Figure  # No pyplot: no global backend state.
  from sklearn.manifold import TSNE

  features = np.asarray(features, np.float32).reshape(len(features), -1)
  labels = np.asarray(labels).reshape(-1)
  if len(features) != len(labels):
    raise ValueError(f"{len(features)} features but {len(labels)} labels")
  n = len(features)
  if min(n, max_points) < 3:
    raise ValueError(f"tsne_plot needs at least 3 points, got {n} with max_points={max_points}")
  rng = np.random.default_rng(seed)
  if n > max_points:
    idx = np.sort(rng.choice(n, size=max_points, replace=False))
    features, labels, n = features[idx], labels[idx], max_points
  note = ""
  if not np.ptp(features, axis=0).any():
    # One point n times (a collapsed backbone): sklearn's PCA initialisation divides by its zero
    # spread, and the Barnes-Hut pass then crashes the whole process on the NaNs.
    emb, note = np.zeros((n, 2), np.float32), " (all features equal)"
  else:
    if features.shape[1] > 50 and n > 50:
      from sklearn.decomposition import PCA  # Standard speed-up before t-SNE.
      features = PCA(n_components=50, random_state=seed).fit_transform(features)
    # sklearn requires perplexity < n_samples; ~n/3 keeps small sets stable.
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca",
               learning_rate="auto", random_state=seed).fit_transform(features)

  fig = Figure(figsize=(7, 6), dpi=100)
  ax = fig.add_subplot()
  classes = np.unique(labels)
  if len(classes) <= 20:
    colors = matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"]
    for k, cls in enumerate(classes):
      m = labels == cls
      name = class_names[int(cls)] if class_names is not None else str(cls)
      ax.scatter(emb[m, 0], emb[m, 1], s=6, color=colors(k), label=name)
    ax.legend(loc="best", fontsize=7, markerscale=2, frameon=False,
              ncol=2 if len(classes) > 10 else 1)
  else:
    # Too many classes for a readable legend: colour by label value instead.
    sc = ax.scatter(emb[:, 0], emb[:, 1], s=4, c=labels, cmap="nipy_spectral")
    fig.colorbar(sc, ax=ax, label="label")
  ax.set_title((title or f"t-SNE ({n} points)") + note)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()

  path = os.fspath(path)
  metrics.atomic_write(path, lambda f: fig.savefig(f, format="png"))  # local or gs://
  return path
