"""Fine-tuning the whole network (DeiT recipe), for single-label classification or, with a
sigmoid head and mAP, multi-label classification.

One step = RandAugment -> normalise -> random erasing -> Mixup/CutMix on label-smoothed one-hot
(multi-label: multi-hot) targets (all on device), forward with drop path, cross-entropy, AdamW
whose update is scaled per layer (layer-wise lr decay). Each step is one jit over the mesh, its
activations placed by config.logical_axis_rules (sharding.jit).
"""
from __future__ import annotations

import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sit_jax import augment, optim, sharding
from sit_jax.models import heads
from sit_jax.transfer import common, deit_augment, supervised


class Classifier(nn.Module):
  """ViT backbone + linear head on CLS or concat(CLS, mean patch token); params
  {'backbone': ..., 'head': {'fc': ...}}."""
  backbone: nn.Module
  num_classes: int
  features: str = "cls"

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    out = self.backbone(images, train=train)
    return heads.ClassifierHead(self.num_classes, self.features, name="head")(out)


def init_state(model, tx, image_size: int, rng, backbone_params=None) -> supervised.TrainState:
  """Fresh head (zeros) and optimizer; the backbone is `backbone_params` when given."""
  init_rng, state_rng = jax.random.split(rng)
  params = model.init({"params": init_rng}, jnp.zeros((1, image_size, image_size, 3)),
                      train=False)["params"]
  if backbone_params is not None:
    params = {**params, "backbone": backbone_params}
  return supervised.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params), rng=state_rng)


def state_layout(model, tx, image_size: int, mesh, rules, rng, backbone_params=None):
  """(abstract, shardings, create): the state's ShapeDtypeStructs carrying their shardings
  (by `rules`), and create() -> the state built already sharded, with the loaded backbone
  (host numpy) in place of the random one. A resumed run restores onto `abstract` and never
  calls create(): a fresh state beside the restored one would double the device memory."""
  init = functools.partial(init_state, model, tx, image_size)
  abstract = jax.eval_shape(init, rng, backbone_params)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  create = lambda: jax.jit(init, out_shardings=shardings)(rng, backbone_params)
  return sharding.abstract_with_shardings(abstract, shardings), shardings, create


def create_state(model, tx, image_size: int, mesh, rules, rng, backbone_params=None):
  """(state, shardings): `state_layout`'s state, created."""
  _, shardings, create = state_layout(model, tx, image_size, mesh, rules, rng, backbone_params)
  return create(), shardings


def prepare_images(config, key, images_uint8):
  """uint8 crops -> RandAugment (config switch) -> normalise -> random erasing."""
  a = config.augment
  k_ra, k_erase = jax.random.split(key)
  images = images_uint8.astype(jnp.float32) / 255.0
  if a.randaugment:
    images = deit_augment.rand_augment(k_ra, images, num_ops=a.ra_num_ops,
                                       magnitude=a.ra_magnitude,
                                       magnitude_std=a.ra_magnitude_std)
  images = augment.normalize(images)
  if a.erase_prob > 0:
    images = deit_augment.random_erasing(k_erase, images, a.erase_prob)
  return images


def make_finetune_step(config, model, tx, num_classes: int, *, multilabel: bool = False,
                       lr=None):
  """Returns step(state, batch) -> (state, metrics); batch = dict(image uint8, label)."""
  a = config.augment

  def step(state: supervised.TrainState, batch):
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_mix, k_drop = jax.random.split(key, 3)
    images = prepare_images(config, k_aug, batch["image"])
    targets = supervised.soft_targets(batch["label"], num_classes, a.label_smoothing,
                                      multilabel=multilabel)
    images, targets, _ = deit_augment.mixup_cutmix(
        k_mix, images, targets, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
        prob=a.mix_prob, switch_prob=a.switch_prob)

    def loss(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": k_drop})
      return supervised.loss_fn(logits, targets, multilabel)

    value, grads = jax.value_and_grad(loss)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "grad_norm": optax.global_norm(grads)}
    if lr is not None:
      metrics["lr"] = lr(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def run(config, workdir: str, *, multilabel: bool = False) -> dict:
  from sit_jax import experiment, trainer

  compiler_options = sharding.step_compiler_options(config.compiler_options)
  with experiment.Experiment(config, workdir) as exp:
    # Input. -----------------------------------------------------------------------------------
    mesh = exp.mesh
    train_info, test_info = common.dataset_infos(config)
    common.check_multilabel(train_info, multilabel)
    supervised.warn_if_batch_exceeds_split(config, train_info)
    num_classes = train_info.num_classes
    total_steps, steps_per_epoch = optim.schedule_lengths(config, train_info.num_examples)
    size = config.data.image_size
    batches, missing_classes = supervised.checked_train_batches(config, train_info, size)

    # Model, optimiser, state (backbone from config.init) and step. ----------------------------
    backbone = common.load_backbone(config, image_size=size)
    model = Classifier(backbone.module, num_classes, config.head.features)
    lr = supervised.lr_schedule(config, total_steps, steps_per_epoch)
    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])
    tx = supervised.make_optimizer(config, lr, abstract_params, backbone.module.depth)
    abstract, shardings, create = state_layout(model, tx, size, mesh, config.sharding_rules,
                                               jax.random.PRNGKey(config.seed), backbone.params)
    logging.info("%s: %d classes, %d train examples, %d steps (%d per epoch); backbone %s",
                 train_info.name, num_classes, train_info.num_examples, total_steps,
                 steps_per_epoch, backbone.name)
    step_fn = sharding.jit(make_finetune_step(config, model, tx, num_classes,
                                              multilabel=multilabel, lr=lr),
                           mesh, config.logical_axis_rules,
                           in_shardings=(shardings, sharding.batch_sharding(mesh)),
                           out_shardings=(shardings, sharding.replicated(mesh)),
                           donate_argnums=(0,), compiler_options=compiler_options or None)

    # Evaluation: validation every eval_every steps, test at the end. --------------------------
    logits_fn = lambda params, images: model.apply({"params": params}, common.to_input(images))
    num_evaluated = [0]

    def evaluate(state, split):
      batches = common.eval_batches(config, split, size)
      logits, labels = common.extract_features(logits_fn, state.params, batches, mesh)
      if split == config.data.test_split:
        num_evaluated[0] = len(labels)
      return common.score(logits, labels, multilabel, config.get("voc07", False))

    # Train. -----------------------------------------------------------------------------------
    exp.writer(total_steps, config.data.global_batch_size)
    outcome = trainer.train(
        exp, init=create, abstract=abstract, step_fn=step_fn,
        batches=batches,
        place=common.train_placer(config, mesh, size), total_steps=total_steps,
        metadata=common.checkpoint_metadata(config, backbone, num_classes),
        hooks=[supervised.evaluation_hook(config, evaluate, total_steps)])
    run_results = outcome.results()
    results = common.results_dict(
        config, backbone, train_info, test_info, num_evaluated[0],
        supervised.test_scores(outcome.evaluated), frozen=False, steps=outcome.step,
        total_steps=total_steps, final_train_metrics=outcome.metrics,
        seconds_this_run=outcome.seconds, complete=outcome.complete,
        features=config.head.features, val_split=config.data.get("val_split", ""),
        **missing_classes(),
        **{k: run_results[k] for k in ("checkpoint", "preempted", "steps_this_run", "error")
           if k in run_results})
    results = common.results_table(
        results, f"fine-tuned, {outcome.step}/{total_steps} steps",
        {k: v for k, v in outcome.evaluated.items() if k.startswith(("val/", "test/"))})
    exp.finish(results)
  return results
