"""Optimisation as in SiT/DINO: AdamW with scheduled lr and weight decay, per-tensor clipping, EMA teacher."""
from __future__ import annotations

import re

from absl import logging
import jax
import jax.numpy as jnp
import optax

from sit_jax import sharding
from sit_jax.models import vit


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0):
  """DINO's cosine_scheduler as a function of the step: linear warmup, then cosine to `final`.

  The warmup is np.linspace(warmup_start, base, warmup_steps), so its last step already has
  `base`; the cosine then starts at `base` again at step warmup_steps, as in the authors' table.
  """
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
  """Linear scaling rule: lr = base_lr * global_batch / 256."""
  return base_lr * global_batch_size / 256


def clip_by_norm_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """Scales each gradient tensor whose own l2 norm exceeds max_norm (not a global-norm clip).

  Parameters stacked over layers by `model.scan_layers` are clipped layer by layer, exactly as
  the per-block tensors they stand for."""

  def update_fn(updates, state, params=None):
    del params

    def clip(path, g):
      per_layer = vit.is_scanned_layer(sharding.path_name(path))
      axes = tuple(range(1 if per_layer else 0, g.ndim))
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


NO_DECAY_NAMES = ("pos_embed", "cls_token")


def _decay_mask(params, exempt_names=()):

  def keep(path, leaf):
    name = sharding.path_name(path)
    ndim = leaf.ndim - 1 if vit.is_scanned_layer(name) else leaf.ndim
    is_bias = name.rsplit("/", 1)[-1] == "bias"
    return ndim > 1 and not is_bias and not any(n in name for n in exempt_names)

  return jax.tree_util.tree_map_with_path(keep, params)


def decay_mask(params):
  """True where weight decay applies in fine-tuning (DeiT/BEiT, timm's no_weight_decay): matrices
  and kernels, not biases, norms, the position embedding or the CLS token."""
  return _decay_mask(params, NO_DECAY_NAMES)


def pretrain_decay_mask(params):
  """True where weight decay applies in SiT pretraining: the authors' get_params_groups exempt
  only biases and 1-D tensors, so the position embedding and CLS token (3-D) are decayed."""
  return _decay_mask(params)


def adamw(lr_schedule, wd_schedule, *, clip_norm: float | None = 3.0, b1=0.9, b2=0.999,
          eps=1e-8, mask=decay_mask, extra=()):
  """AdamW whose lr and weight decay follow schedules; per-tensor clipping before it."""
  chain = []
  if clip_norm:
    chain.append(clip_by_norm_per_tensor(clip_norm))
  chain.extend(extra)
  chain.append(optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd_schedule,
                           mask=mask))
  return optax.chain(*chain)


def ema(teacher, student, momentum):
  """teacher <- m * teacher + (1 - m) * student, over the teacher's leaves."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s.astype(t.dtype),
                      teacher, student)


def layerwise_lr_scale(path_name: str, depth: int, decay: float) -> float:
  """BEiT/DeiT-style layer-wise lr decay factor for a parameter of the backbone.

  Layer id 0: patch/position embeddings and CLS token; blocks_i: i + 1; everything else (final norm,
  heads): depth + 1. The factor is decay ** (depth + 1 - layer_id).
  """
  match = re.search(r"blocks_(\d+)", path_name)
  if match:
    layer = int(match.group(1)) + 1
  elif any(n in path_name for n in ("patch_embed", "pos_embed", "cls_token")):
    layer = 0
  else:
    layer = depth + 1
  return decay ** (depth + 1 - layer)


def warmup_steps(config, total_steps: int, steps_per_epoch: int) -> int:
  """config.optim.warmup_epochs in steps; a warning where the warmup outlasts the run (a short
  --config.total_steps at full size), whose lr then never reaches its peak or decays."""
  o = config.optim
  steps = int(o.warmup_epochs * steps_per_epoch)
  if steps > total_steps:
    logging.warning("optim.warmup_epochs=%s is %d steps, more than the run's %d: the lr ends at "
                    "%.3g of its peak and never decays.", o.warmup_epochs, steps, total_steps,
                    (total_steps - 1) / max(steps - 1, 1))
  return steps


def schedule_lengths(config, num_examples: int) -> tuple[int, int]:
  """(total_steps, steps_per_epoch) from the config and the dataset size."""
  steps_per_epoch = max(num_examples // config.data.global_batch_size, 1)
  total = config.total_steps or int(config.total_epochs * steps_per_epoch)
  if total <= 0:
    raise ValueError("Set config.total_steps or config.total_epochs to a positive number.")
  return total, steps_per_epoch
