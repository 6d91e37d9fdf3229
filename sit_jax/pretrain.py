"""SiT pretraining: train state, the jitted step, and the run (trainer.py runs its loop).

One step = on-device photometric augmentation of both views, GMML corruption, student forward on
the corrupted views, teacher forward on the clean views, losses, AdamW update, EMA of the teacher.
Everything runs inside one jax.jit over global arrays sharded on the mesh.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sit_jax import augment, gmml, losses, optim, resample, sharding
from sit_jax.models import sit as sit_model
from sit_jax.models import vit

# ---------------------------------------------------------------------------------------------
# State, model and optimiser.
# ---------------------------------------------------------------------------------------------

TEACHER_MODULES = ("backbone", "projection")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # student: {'backbone', 'recon_head'?, 'projection'?}
  teacher: Any         # EMA of the student's {'backbone', 'projection'}; {} without a contrastive loss.
  opt_state: Any
  rng: jax.Array       # raw uint32 key; per-step keys are fold_in(rng, step).


class Schedules(NamedTuple):
  lr: Callable
  weight_decay: Callable
  momentum: Callable


def uses_teacher(config) -> bool:
  return config.experiment in ("contrastive", "sit")


def uses_corruption(config) -> bool:
  return config.experiment in ("gmml", "sit") or bool(config.gmml.get("enabled", False))


def model_config(config) -> dict:
  """The settings that define the network's parameters (saved beside checkpoints)."""
  model = config.model.to_dict() if isinstance(config.model, ml_collections.ConfigDict) \
      else dict(config.model)
  model["recons_blocks"] = tuple(model.get("recons_blocks") or ())
  model["image_size"] = config.data.image_size
  return model


def build_model(config) -> sit_model.SiT:
  return sit_model.sit_from_config(model_config(config), config.experiment)


def build_schedules(config, total_steps: int, steps_per_epoch: int) -> Schedules:
  o = config.optim
  lr = optim.warmup_cosine(optim.scaled_lr(o.base_lr, config.data.global_batch_size),
                           o.min_lr, total_steps,
                           optim.warmup_steps(config, total_steps, steps_per_epoch))
  wd = optim.warmup_cosine(o.weight_decay, o.weight_decay_end, total_steps)
  momentum = optim.warmup_cosine(config.teacher.momentum, 1.0, total_steps)
  return Schedules(lr, wd, momentum)


def build_optimizer(config, schedules: Schedules) -> optax.GradientTransformation:
  o = config.optim
  return optim.adamw(schedules.lr, schedules.weight_decay, clip_norm=o.clip_norm,
                     b1=o.b1, b2=o.b2, eps=o.eps, mask=optim.pretrain_decay_mask)


def init_state(config, model, tx, rng) -> TrainState:
  """Unsharded init; jit it with out_shardings to create parameters already in place."""
  init_rng, state_rng = jax.random.split(rng)
  size = config.data.image_size
  images = jnp.zeros((2, size, size, 3), jnp.float32)
  params = model.init({"params": init_rng, "dropout": init_rng}, images, train=False)["params"]
  teacher = {k: params[k] for k in TEACHER_MODULES if k in params} if uses_teacher(config) else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, teacher=teacher,
                    opt_state=tx.init(params), rng=state_rng)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


def prepare_views(config, key, batch):
  """uint8 host crops -> augmented, normalised float views stacked as (2, B, H, W, 3), each
  image standardised where the backbone standardises its input."""
  views = normalised_views(config, key, batch)
  # The reconstruction target and the teacher's input live where the backbone computes.
  return vit.standardize_per_image(views) if config.model.get("standardize_input") else views


def normalised_views(config, key, batch):
  """uint8 host crops -> augmented views with ImageNet's normalisation, (2, B, H, W, 3)."""
  views = jnp.stack([batch["view1"], batch["view2"]]).astype(jnp.float32) / 255.0
  settings = [{**augment.view_augment_config(config.augment.preset, view),
               "blur_sigma": tuple(config.augment.blur_sigma)} for view in (1, 2)]
  keys = [jax.random.fold_in(key, i) for i in range(2)]
  return augment.normalize(augment.photometric_views(keys, views, settings))


def views_to_rows(views):
  """(V, B, ...) -> (B * V, ...), the views of each source image in adjacent rows: the batch the
  network sees. A device holding a share of the B images then holds all the rows of those
  images; stacking view 1 over view 2 instead would move every image to another device."""
  return jnp.swapaxes(views, 0, 1).reshape(-1, *views.shape[2:])


def rows_to_views(rows, num_views: int = 2):
  """Inverse of views_to_rows: (B * V, ...) -> (V, B, ...)."""
  return jnp.swapaxes(rows.reshape(-1, num_views, *rows.shape[1:]), 0, 1)


def step_keys(rng, step):
  """(augmentation, mask, dropout) keys of the step taken at state.step == `step`: the step
  draws its views and GMML mask with them, and the pictures of that step draw the same again."""
  return jax.random.split(jax.random.fold_in(rng, step), 3)


def corrupt_views(config, key, clean):
  if not uses_corruption(config):
    return clean, jnp.zeros(clean.shape[:-1], jnp.float32)
  g = config.gmml
  return gmml.corrupt(key, clean, ratio=g.ratio, replace_ratio=g.replace_ratio,
                      fills=tuple(g.fills), replace_prob=g.replace_prob, align=g.align,
                      donor_group=g.get("donor_group", 0))


def make_train_step(config, model, tx, schedules: Schedules):
  """Returns train_step(state, batch) -> (state, metrics), to be jitted."""
  alpha = config.loss.alpha
  temperature = config.loss.temperature
  with_teacher = uses_teacher(config)
  with_recon = config.experiment in ("gmml", "sit")

  def train_step(state: TrainState, batch):
    aug_key, mask_key, drop_key = step_keys(state.rng, state.step)
    clean = prepare_views(config, aug_key, batch)
    corrupted, mask = corrupt_views(config, mask_key, clean)

    teacher_proj = None
    if with_teacher:
      teacher_out, _ = model.apply({"params": state.teacher}, views_to_rows(clean), train=False,
                                   recon=False, mutable=["batch_stats"])
      teacher_proj = jax.lax.stop_gradient(rows_to_views(teacher_out["proj"]))

    def loss_fn(params):
      out, _ = model.apply({"params": params}, views_to_rows(corrupted), train=True,
                           rngs={"dropout": drop_key}, mutable=["batch_stats"])
      terms = {}
      total = 0.0
      if with_recon:
        terms["recon"] = losses.masked_l1(rows_to_views(out["recon"]), clean, mask,
                                          all_pixels=config.loss.recon_all_pixels)
        total += alpha * terms["recon"]
      if with_teacher:
        terms["contrastive"] = losses.symmetric_contrastive(rows_to_views(out["proj"]),
                                                            teacher_proj, temperature)
        total += terms["contrastive"]
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    teacher = state.teacher
    momentum = schedules.momentum(state.step)
    if with_teacher:
      teacher = optim.ema(state.teacher, {k: params[k] for k in state.teacher}, momentum)

    metrics = {"loss": loss, **terms, "lr": schedules.lr(state.step),
               "weight_decay": schedules.weight_decay(state.step),
               "grad_norm": optax.global_norm(grads)}
    if uses_corruption(config):
      metrics["mask_fraction"] = mask.mean()
    if with_teacher:
      metrics["momentum"] = momentum
    new_state = state.replace(step=state.step + 1, params=params, teacher=teacher,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings, mesh,
                   logical_axis_rules=sharding.LOGICAL_AXIS_RULES, compiler_options=None):
  """The step with the state donated, activations split by `logical_axis_rules`
  (config.logical_axis_rules), compiled with the XLA options `compiler_options` (a dict:
  sharding.compiler_options of config.compiler_options); metrics come back replicated."""
  return sharding.jit(train_step, mesh, logical_axis_rules,
                      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)),
                      donate_argnums=(0,),
                      compiler_options=compiler_options or None)


def make_reconstruct(config, model, num_images: int = 8):
  """(state, batch) -> (clean, corrupted, reconstruction) of view 1 of the batch's first
  `num_images` images with ImageNet's normalisation, for pictures: `state` is the one after the
  step that read `batch`, and the views and mask are the ones that step's loss read. Only those
  are gathered onto every device: the whole batch's three pictures are 36 bytes a pixel on each
  (7 GiB at 224 px and batch 4,096), enough to end a large run at its first picture."""

  def reconstruct(state, batch):
    aug_key, mask_key, _ = step_keys(state.rng, state.step - 1)
    clean = prepare_views(config, aug_key, batch)
    corrupted, _ = corrupt_views(config, mask_key, clean)
    corrupted = corrupted[0]
    out, _ = model.apply({"params": state.params}, corrupted, train=False, proj=False,
                         mutable=["batch_stats"])
    pictures = clean[0], corrupted, out.get("recon", corrupted)
    if config.model.get("standardize_input"):
      # Each image back in its own colours: the network's are each image standardised.
      mean, std = vit.per_image_moments(normalised_views(config, aug_key, batch)[0])
      pictures = tuple(x * std + mean for x in pictures)
    return tuple(x[:num_images] for x in pictures)

  return reconstruct


# ---------------------------------------------------------------------------------------------
# The run: experiment set-up, input, state and step, hooks; trainer.py runs the loop.
# ---------------------------------------------------------------------------------------------


def checkpoint_metadata(config) -> dict:
  """What a resumed run must match (trainer.train adds the settings an exact resume needs)."""
  return {"model": vit.architecture(model_config(config)), "experiment": config.experiment}


def state_layout(config, model, tx, mesh, rng):
  """(abstract, shardings, init) of the train state on `mesh`: its ShapeDtypeStructs carrying
  their shardings (config.sharding_rules), to restore onto; the shardings, for the step; and
  init(), which creates the parameters directly in place, never whole on one device."""
  init = functools.partial(init_state, config, model, tx)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  return (sharding.abstract_with_shardings(abstract, shardings), shardings,
          lambda: jax.jit(init, out_shardings=shardings)(rng))


def validate(config):
  """Fails fast, before any data is read, on settings that cannot work."""
  arch = vit.parse_variant(config.model.variant)
  vit.check_image_size(config.data.image_size, arch["patch_size"])
  if config.gmml.align > 1 and config.data.image_size % config.gmml.align:
    raise ValueError(f"gmml.align={config.gmml.align} does not divide the image size "
                     f"{config.data.image_size}.")
  sit_model.sit_from_config(model_config(config), config.experiment)


def warn_if_ratio_out_of_reach(config) -> str | None:
  """The warning logged (and returned) when GMML blocks cannot cover the asked area: each such
  image draws `max_blocks` blocks and stops at the ceiling (`gmml.coverage_ceiling`)."""
  if not uses_corruption(config):
    return None
  g, size = config.gmml, config.data.image_size
  ceiling = gmml.coverage_ceiling(size, size, g.align)
  fills_of = {"ratio": {"noise", "zeros"}, "replace_ratio": {"replace"}}
  asked = {key: g[key] for key, fills in fills_of.items()
           if fills & set(g.fills) and g[key] > ceiling}
  if not asked:
    return None
  message = (f"{', '.join(f'gmml.{k}={v}' for k, v in asked.items())}: GMML blocks cover at most "
             f"{ceiling:.4f} of a {size} px image with gmml.align={g.align} (corners avoid the "
             f"last {g.align} px row and column, as in the authors' code), so images asking for "
             f"more draw the block cap and stop there. A smaller gmml.align or larger images reach "
             f"it.")
  logging.warning(message)
  return message


def warn_if_donors_cross_devices(config, mesh) -> str | None:
  """The warning logged (and returned) when GMML's donor groups span devices: correct, but each
  step then copies images between devices."""
  if not uses_corruption(config) or "replace" not in config.gmml.fills:
    return None
  per_view = config.data.global_batch_size
  per_device = per_view // sharding.data_parallel_size(mesh)
  group = gmml.donor_group_size(config.gmml.get("donor_group", 0), per_view)
  if per_device % group == 0:
    return None
  message = (f"gmml.donor_group: donor groups of {group} images span devices holding "
             f"{per_device} images of each view, so 'replace' copies images between devices "
             f"every step; a divisor of {per_device} keeps them on their device.")
  logging.warning(message)
  return message


def picture_hook(config, model, mesh, writer):
  """trainer hook: a grid of clean, corrupted and reconstructed views of the current batch."""
  from sit_jax import viz
  reconstruct = jax.jit(make_reconstruct(config, model), out_shardings=sharding.replicated(mesh))

  def pictures(step, state, batch):
    clean, corrupted, recon = jax.device_get(reconstruct(state, batch))
    grid = viz.reconstruction_grid(clean, corrupted, recon, augment.IMAGENET_MEAN,
                                   augment.IMAGENET_STD)
    zoom = max(1, 96 // config.data.image_size)  # small images get big enough to see.
    grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    writer.write_images(step, "reconstruction", grid)

  return lambda step, state, batch: viz.draw_or_warn(
      "Reconstruction picture", lambda: pictures(step, state, batch))


def knn_hook(knn_monitor):
  """trainer hook: the k-NN top-1 of the student's and the teacher's backbones."""
  def evaluate(step, state, batch):
    del step, batch
    return knn_monitor({"student": state.params["backbone"],
                        **({"teacher": state.teacher["backbone"]} if state.teacher else {})})
  return evaluate


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains (or resumes pretraining) in `workdir`; returns the figures written to results.json."""
  # Imported here: TF (for TFDS and TensorBoard) stays out of pure-library users' processes.
  from sit_jax import checkpoint, data, experiment, monitor, trainer

  validate(config)
  compiler_options = sharding.step_compiler_options(config.compiler_options)
  batch_sizes = {"data.global_batch_size": config.data.global_batch_size,
                 # The k-NN monitor's batches, checked with the training batch before any work.
                 **({"eval.batch_size": config.eval.batch_size} if config.eval_every > 0 else {})}
  with experiment.Experiment(config, workdir, batch_sizes=batch_sizes) as exp:
    # Input. -----------------------------------------------------------------------------------
    mesh = exp.mesh
    data_dir = config.data.data_dir or None
    info = data.dataset_info(config.data.source, config.data.split, data_dir=data_dir,
                             **data.engine_options(config.data))
    data.check_interpolation(config.data.interpolation)
    if not config.num_train_examples:
      # Recorded in config.json, so that a resume on a folder that has grown or shrunk since
      # names the change: the epochs, and with them the schedules, have another length.
      config.num_train_examples = info.num_examples
    total_steps, steps_per_epoch = optim.schedule_lengths(config, config.num_train_examples)
    logging.info("%s: %d examples, %d steps per epoch, %d steps; mesh %s", info.name,
                 info.num_examples, steps_per_epoch, total_steps, dict(mesh.shape))
    warn_if_donors_cross_devices(config, mesh)
    warn_if_ratio_out_of_reach(config)
    # Its splits are checked before the writer opens (and, with no checkpoint, empties)
    # metrics.jsonl.
    knn_monitor = monitor.KnnMonitor.from_config(config, mesh, model_config(config))

    def batches(start_step):
      return data.pretrain_iterator(
          config.data.source, config.data.split,
          global_batch_size=config.data.global_batch_size, image_size=config.data.image_size,
          crop_scale=tuple(config.data.crop_scale), seed=config.seed, start_step=start_step,
          data_dir=data_dir, interpolation=config.data.interpolation, flip=config.data.flip,
          **data.engine_options(config.data), **data.resize_options(config.data))

    # Model, optimiser, state and step. --------------------------------------------------------
    model = build_model(config)
    schedules = build_schedules(config, total_steps, steps_per_epoch)
    tx = build_optimizer(config, schedules)
    abstract, state_shardings, init = state_layout(config, model, tx, mesh,
                                                   jax.random.PRNGKey(config.seed))
    train_step = jit_train_step(make_train_step(config, model, tx, schedules), state_shardings,
                                mesh, config.logical_axis_rules, compiler_options)

    # Hooks: pictures and the k-NN monitor. ----------------------------------------------------
    writer = exp.writer(total_steps, config.data.global_batch_size)
    hooks = []
    if "recon_head" in abstract.params:
      hooks.append(trainer.Hook(config.image_every, picture_hook(config, model, mesh, writer)))
    if knn_monitor:
      # final: a finished run started again reports the monitor's figures again.
      hooks.append(trainer.Hook(config.eval_every, knn_hook(knn_monitor), final=True))

    # Train. -----------------------------------------------------------------------------------
    outcome = trainer.train(
        exp, init=init, abstract=abstract, step_fn=train_step, batches=batches,
        total_steps=total_steps, metadata=checkpoint_metadata(config), hooks=hooks,
        place=resample.batch_placer(mesh, config.data, config.data.image_size,
                                    data.view_keys(2)))

    results = {"experiment": config.experiment, "dataset": info.name, **outcome.results(),
               **({"knn_monitor": {**outcome.evaluated, "bank": [  # the splits it read
                   knn_monitor.source, knn_monitor.bank_split, knn_monitor.test_split]}}
                  if outcome.evaluated else {})}
    if outcome.complete and config.export_backbone:
      # Exports always use the per-block layout (blocks_i) that transfer and convert read.
      backbone = outcome.state.params["backbone"]
      if vit.SCANNED_BLOCKS in backbone:
        backbone = jax.jit(vit.unstack_blocks)(backbone)
      results["backbone"] = checkpoint.export_backbone(
          os.path.join(exp.workdir, "backbone"), {"backbone": backbone},
          {**model_config(config), "scan_layers": False}, overwrite=True,
          origin={"step": outcome.step, "experiment": config.experiment, "weights": "student",
                  "workdir": exp.workdir})
    exp.finish(results)
  return results
