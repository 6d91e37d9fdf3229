"""Supervised training shared by fine-tuning and the linear probe: train state, losses,
optimiser (with layer-wise lr decay) and the evaluation hook of the loop (trainer.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax

from sit_jax import optim, sharding
from sit_jax.transfer import common

if TYPE_CHECKING:
  from sit_jax import trainer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # the trainable parameters only
  opt_state: Any
  rng: jax.Array       # per-step keys are fold_in(rng, step)


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def soft_targets(labels, num_classes: int, label_smoothing: float = 0.0, *,
                 multilabel: bool = False):
  """Integer labels -> one-hot (multi-hot labels as they are) with timm's smoothing: off =
  s / C, on = 1 - s + s / C (timm's BinaryCrossEntropy smooths one-hot targets so; multi-hot
  ones get the same values here)."""
  hot = labels.astype(jnp.float32) if multilabel else jax.nn.one_hot(labels, num_classes)
  return optax.smooth_labels(hot, label_smoothing)


def loss_fn(logits, targets, multilabel: bool):
  """Softmax cross-entropy on (soft) targets, or sigmoid cross-entropy on multi-hot targets."""
  logits = logits.astype(jnp.float32)
  if multilabel:
    return optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32)).mean()
  return optax.softmax_cross_entropy(logits, targets).mean()


# ---------------------------------------------------------------------------------------------
# Optimiser.
# ---------------------------------------------------------------------------------------------


def lr_decay_tree(params, depth: int, decay: float):
  """Per-leaf lr factor decay ** (depth + 1 - layer) (optim.layerwise_lr_scale): 1 for the head
  and the final norm, decay ** depth for blocks_0, decay ** (depth + 1) for the embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: optim.layerwise_lr_scale(sharding.path_name(path), depth, decay), params)


def scale_by_tree(factors) -> optax.GradientTransformation:
  """Multiplies each update by its factor (after AdamW: lr and weight decay both scale)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def lr_schedule(config, total_steps: int, steps_per_epoch: int):
  o = config.optim
  return optim.warmup_cosine(optim.scaled_lr(o.base_lr, config.data.global_batch_size),
                             o.min_lr, total_steps,
                             optim.warmup_steps(config, total_steps, steps_per_epoch))


def make_optimizer(config, lr, params=None, depth: int = 0) -> optax.GradientTransformation:
  """config.optim.name 'adamw' or 'sgd' (momentum), decoupled weight decay on matrices only,
  optional per-tensor clipping; layer-wise lr decay when optim.layer_decay < 1 (needs `params`,
  real or abstract, and the backbone depth)."""
  o = config.optim
  if o.name == "adamw":
    tx = optim.adamw(lr, o.weight_decay, clip_norm=o.clip_norm or None, b1=o.b1, b2=o.b2,
                     eps=o.eps)
  elif o.name == "sgd":
    chain = [optim.clip_by_norm_per_tensor(o.clip_norm)] if o.clip_norm else []
    if o.weight_decay:
      chain.append(optax.add_decayed_weights(o.weight_decay, mask=optim.decay_mask))
    chain.append(optax.sgd(lr, momentum=o.momentum or None))
    tx = optax.chain(*chain)
  else:
    raise ValueError(f"config.optim.name must be 'adamw' or 'sgd', not {o.name!r}.")
  if o.get("layer_decay", 1.0) < 1.0:
    if params is None:
      raise ValueError("Layer-wise lr decay needs the parameter tree.")
    tx = optax.chain(tx, scale_by_tree(lr_decay_tree(params, depth, o.layer_decay)))
  return tx


def warn_if_batch_exceeds_split(config, info):
  """A train split smaller than one global batch still trains (each batch draws its images more
  than once), but the schedule's epochs are then steps of several passes: the log says so."""
  n, batch = info.num_examples, config.data.global_batch_size
  if n < batch:
    logging.warning("%s has %d images, fewer than data.global_batch_size %d: every batch holds "
                    "images more than once, and an epoch of the schedule (total_epochs, "
                    "optim.warmup_epochs) is one step, %.1f passes over them. Set "
                    "--config.data.global_batch_size to at most %d (a multiple of the "
                    "data-parallel devices) for epochs of one pass.", info.name, n, batch,
                    batch / n, n)


def checked_train_batches(config, info, image_size: int):
  """(batches, missing_classes): trainer.train's `batches` (common.train_batches), and
  missing_classes() -> common.classes_missing_from_train of the train split (`info`) for
  results.json. The labels a split lists (a folder's, an embedded dataset's) are checked here,
  before any work; a TFDS split's, which only its records hold, as the training's first epoch
  read them, by missing_classes() after trainer.train on every process (a collective). A run
  resumed past its first epoch, or stopped before its end, has none to check."""
  listed = common.classes_missing_from_train(config, info)
  streams = []

  def batches(start_step):
    streams.append(common.train_batches(config, start_step, image_size))
    return streams[-1]

  def missing_classes() -> dict:
    if info.labels is not None:
      return listed
    counts = common.first_epoch_class_counts(info, streams[-1] if streams else None)
    return common.classes_missing_from_train(config, info, counts=counts)

  return batches, missing_classes


def frozen_checkpoint_metadata(config, backbone: common.Backbone, num_classes: int) -> dict:
  """What a resumed run on a frozen backbone (linear probe, segmentation) must match. Its
  checkpoints hold the head only: each start reads the backbone from config.init again, and
  the head resumes only on the same parameters (checkpoint.BACKBONE), wherever they are read
  from now: a pretraining that has saved a step since is refused rather than swapped in under
  the head, a moved or copied one resumes."""
  from sit_jax import checkpoint
  return {**common.checkpoint_metadata(config, backbone, num_classes),
          checkpoint.BACKBONE: {"params_hash": backbone.checkpoint_hash,
                                "path": backbone.location or ""}}


def abstract_of(tree):
  """ShapeDtypeStructs carrying the shardings of a placed tree (to restore onto)."""
  return sharding.abstract_with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))


def evaluation_hook(config, evaluate: Callable, total_steps: int) -> "trainer.Hook":
  """trainer hook: evaluate(state, split) -> scores. The validation split (data.val_split) is
  logged as val/<score> every config.eval_every steps (0: none) and at the end; the test split
  as test/<score> once, at the end (also when a finished run is started again): recipes are
  chosen on validation, never on test."""
  from sit_jax import trainer

  def fn(step, state, batch):
    del batch
    scores = {}
    if config.data.get("val_split"):
      scores.update({f"val/{k}": v for k, v in evaluate(state, config.data.val_split).items()})
    if step >= total_steps:
      scores.update({f"test/{k}": v
                     for k, v in evaluate(state, config.data.test_split).items()})
    return scores

  return trainer.Hook(config.eval_every, fn, final=True)


def test_scores(evaluated: dict) -> dict:
  """The scores of evaluation_hook without their test/ prefix."""
  return {k.removeprefix("test/"): v for k, v in evaluated.items() if k.startswith("test/")}
