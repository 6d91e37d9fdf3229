"""Losses. Inputs are global (sharded) arrays inside jit, so every mean below is a global-batch mean."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_l1(reconstruction, target, mask, *, all_pixels: bool = False):
  """Mean |x - x_hat| over the corrupted pixels of the whole batch (or over all pixels).

  reconstruction, target: (..., H, W, C); mask: (..., H, W), 1 where the pixel was corrupted. The mask
  covers every channel, so the count of averaged elements is sum(mask) * C (not a per-image mean).
  """
  error = jnp.abs(reconstruction.astype(jnp.float32) - target.astype(jnp.float32))
  if all_pixels:
    return error.mean()
  mask = mask.astype(jnp.float32)[..., None]
  count = mask.sum() * error.shape[-1]
  return (error * mask).sum() / jnp.maximum(count, 1.0)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive(queries, keys, temperature: float):
  """MoCo-v3 InfoNCE without predictor: the i-th key is the positive of the i-th query.

  Keys span the global batch (under jit the batch is global, so no explicit all-gather is needed).
  The loss is scaled by 2 * temperature as in the reference implementation.
  """
  q, k = l2_normalize(queries), l2_normalize(jax.lax.stop_gradient(keys))
  logits = q @ k.T / temperature
  labels = jnp.arange(q.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() * 2 * temperature


def symmetric_contrastive(student, teacher, temperature: float):
  """student/teacher: (2, B, D), the two views stacked; student(v1)~teacher(v2) + student(v2)~teacher(v1)."""
  (s1, s2), (t1, t2) = student, teacher
  return contrastive(s1, t2, temperature) + contrastive(s2, t1, temperature)


def classification(logits, labels, *, label_smoothing: float = 0.0):
  """Softmax cross-entropy for integer labels (B,) or soft labels (B, K) (mixup)."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  return optax.softmax_cross_entropy(logits, labels).mean()


def multilabel(logits, targets):
  """Sigmoid binary cross-entropy averaged over classes and examples; targets in {0, 1}."""
  return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                            targets.astype(jnp.float32)).mean()
