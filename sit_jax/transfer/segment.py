"""Semantic segmentation on a frozen backbone.

Patch tokens of one or several blocks (seg.blocks, 1-based; each through the final LayerNorm,
concatenated; with seg.cls the CLS token appended to each, as DINOv2's linear depth probe) of
the frozen backbone (stop_gradient; the train state holds the head only) go through a head on
the token grid: 'linear' (a 1x1 convolution, the linear probe of dense features) or 'mlp' (a
3x3 convolution of seg.hidden channels, GELU, then the 1x1). Its logits are upsampled
bilinearly to the image and trained with per-pixel cross-entropy, pixels labelled IGNORE left
out. Images and label maps are cropped and flipped together on device. seg.features='raw_pixels'
trains the same head on each patch's normalised pixels (with seg.cls, the whole image appended
in place of the CLS token) on the backbone's token grid: the raw-pixel baseline.

seg.lr_scales trains one head per learning rate (the factors times the optimiser's schedule), side
by side on the same frozen tokens and from the same initial head, as DINO's linear evaluation
does: each head's gradients and AdamW state are its own, so a head trained beside others is the
head trained alone. The head with the best validation mIoU is the one the test split scores, so
that backbones are compared at the rate that suits each.

Scores come from a confusion matrix accumulated over the split: pixel accuracy, per-class IoU
and mIoU (the mean over classes present in the labels or the predictions), at the evaluation
resolution (data.image_size). `eval_every` scores the validation split; the test split is
scored once, at the end. Pictures: DIR/images/segmentation_*.png, image | prediction | truth.
"""
from __future__ import annotations

import copy
import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sit_jax import data, optim, sharding, viz
from sit_jax.transfer import common, segment_data, supervised


class SegmentationHead(nn.Module):
  """(B, h, w, D) tokens -> (B, h, w, num_classes) logits."""
  num_classes: int
  hidden: int = 0  # 0: linear; > 0: a 3x3 convolution of `hidden` channels and GELU first.

  @nn.compact
  def __call__(self, tokens):
    x = tokens
    if self.hidden:
      x = nn.gelu(nn.Conv(self.hidden, (3, 3), padding="SAME", name="conv")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="classifier")(x)


def upsample(logits, size: int):
  return jax.image.resize(logits, (logits.shape[0], size, size, logits.shape[-1]), "bilinear")


def pixel_cross_entropy(logits, labels, ignore: int = segment_data.IGNORE):
  """Mean softmax cross-entropy over the pixels whose label is not `ignore`."""
  labels = labels.astype(jnp.int32)
  valid = labels != ignore
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.sum(per_pixel * valid) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(predictions, labels, num_classes: int, valid=None,
                     ignore: int = segment_data.IGNORE):
  """(C, C) int32 counts of (true class, predicted class) over the pixels whose label is a class
  (not `ignore`) and, with `valid` (per example or per pixel), that are valid."""
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep &= jnp.reshape(valid, valid.shape + (1,) * (labels.ndim - valid.ndim))
  index = jnp.where(keep, labels * num_classes + predictions.astype(jnp.int32),
                    num_classes * num_classes)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index.ravel()].add(1, mode="drop")
  return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion) -> dict:
  """Pixel accuracy, mIoU and per-class IoU of a (true, predicted) confusion matrix. A class
  absent from both labels and predictions has no IoU and is left out of the mean (mmseg).
  'unlabelled': the classes no pixel is labelled with."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - hits
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, hits / union, np.nan)
  total = confusion.sum()
  return {"mIoU": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
          "pixel_accuracy": float(hits.sum() / total) if total else float("nan"),
          "iou": [None if np.isnan(v) else float(v) for v in iou],
          "unlabelled": np.flatnonzero(confusion.sum(1) == 0).tolist()}


def make_train_step(patch_fn, head, tx, config, image_size: int, lr=None):
  """step(state, backbone_params, batch) -> (state, metrics): augment image and labels
  together, frozen tokens, every head (params stacked on a leading axis, one per
  seg.lr_scales), upsampled logits, per-pixel cross-entropy. `loss` is the mean over the heads."""
  crop_scale, flip = tuple(config.data.crop_scale), bool(config.data.flip)
  scales = jnp.asarray(config.seg.lr_scales, jnp.float32)

  def step(state, backbone_params, batch):
    key = jax.random.fold_in(state.rng, state.step)
    images, labels = segment_data.augment_pair(key, batch["image"], batch["label"], crop_scale,
                                               flip)
    frozen = jax.lax.stop_gradient(backbone_params)
    tokens = jax.lax.stop_gradient(patch_fn(frozen, common.to_input(images)))

    def loss(params):
      logits = upsample(head.apply({"params": params}, tokens), image_size)
      return pixel_cross_entropy(logits, labels)

    def update(params, opt_state, scale):
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
      return value, optax.apply_updates(params, updates), opt_state

    values, params, opt_state = jax.vmap(update)(state.params, state.opt_state, scales)
    metrics = {"loss": jnp.mean(values)}
    if lr is not None:
      metrics["lr"] = lr(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_predict(patch_fn, head, image_size: int):
  """predict(backbone_params, head_params, uint8 images) -> (heads, B, S, S) int32 classes, one
  map per head of the stacked head_params (the backbone runs once)."""

  def predict(backbone_params, head_params, images):
    tokens = patch_fn(backbone_params, common.to_input(images))
    logits = jax.vmap(lambda p: upsample(head.apply({"params": p}, tokens), image_size))(
        head_params)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return predict


def evaluate_split(predict, backbone_params, head_params, batches, mesh, num_classes: int,
                   pictures: int = 0):
  """([scores of each head], (images, predictions of each head, labels) of the first `pictures`
  examples or None) over an EvalBatches pass; confusion matrices are summed on device per batch,
  then on the host."""
  confusion_of = _jitted_confusion(predict, mesh, num_classes)
  total, shown = None, None
  for batch in batches:
    placed = sharding.global_batch(batch, mesh)
    counts = np.asarray(jax.device_get(confusion_of(backbone_params, head_params, placed)),
                        np.int64)
    total = counts if total is None else total + counts
    if shown is None and pictures:
      # Process 0's examples lead the global batch: what it shows is its own.
      n = min(pictures, int(batch["mask"].sum()))
      pred = jax.jit(predict, out_shardings=sharding.replicated(mesh))(
          backbone_params, head_params, placed["image"])
      shown = (batch["image"][:n], np.asarray(jax.device_get(pred))[:, :n], batch["label"][:n])
  return [segmentation_scores(c) for c in total], shown


@functools.lru_cache(maxsize=8)
def _jitted_confusion(predict, mesh, num_classes):
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def run(backbone_params, head_params, batch):
    predictions = predict(backbone_params, head_params, batch["image"])
    return jax.vmap(lambda p: confusion_matrix(p, batch["label"], num_classes, batch["mask"]))(
        predictions)
  return run


def best_head(val_mious) -> int:
  """The head with the highest validation mIoU; on a tie the first listed."""
  return int(np.argmax(np.nan_to_num(np.asarray(val_mious, np.float64), nan=-1.0)))


def palette(num_classes: int) -> np.ndarray:
  """(num_classes + 1, 3) uint8 colours: class 0 black; classes 1-20 matplotlib's tab20, its ten
  strong colours first, then their light pairs (a picture shows few classes, and PASCAL VOC's map
  gives neighbouring ids close colours: its 2 and 10 are both green, its 8 near black); the rest
  VOC's colour map (the bits of the class id dealt to red, green, blue, lowest first, each
  channel's from its top bit down), then IGNORE's white, which no class gets."""
  from matplotlib import colormaps
  tab20 = np.round(np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
  ids = np.arange(num_classes)
  colours = np.zeros((num_classes, 3), np.uint8)
  for bit in range(8):
    for channel in range(3):
      colours[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
  strong_first = np.concatenate([tab20[0::2], tab20[1::2]])
  colours[1:21] = strong_first[:max(num_classes - 1, 0)]
  return np.concatenate([colours, np.full((1, 3), 255, np.uint8)])


LEGEND_ROW = 14  # px per legend entry


def picture_grid(images, predictions, labels, num_classes: int, class_names=(),
                 min_side: int = 96):
  """uint8 rows of image | prediction | ground truth (IGNORE white), 2 px white separators, and
  a legend on the right: the colour and name of each class the rows show."""
  colours = palette(num_classes)
  paint = lambda m: colours[np.where(np.asarray(m) == segment_data.IGNORE, num_classes,
                                     np.clip(np.asarray(m), 0, num_classes - 1))]
  size = images.shape[1]
  zoom = max(1, -(-min_side // size))
  cells = [[np.asarray(images[i]), paint(predictions[i]), paint(labels[i])]
           for i in range(len(images))]
  side, s = size * zoom, 2
  grid = np.full((len(cells) * (side + s) - s, 3 * (side + s) - s, 3), 255, np.uint8)
  for r, row in enumerate(cells):
    for c, cell in enumerate(row):
      big = np.repeat(np.repeat(cell, zoom, axis=0), zoom, axis=1)
      grid[r * (side + s):r * (side + s) + side, c * (side + s):c * (side + s) + side] = big
  shown = np.unique(np.concatenate([np.ravel(predictions), np.ravel(labels)]))
  names = list(class_names) or [str(c) for c in range(num_classes)]
  entries = [(colours[c], names[c]) for c in shown if c < num_classes]
  if np.any(shown == segment_data.IGNORE):
    entries.append((colours[num_classes], "not scored"))
  return np.concatenate([grid, legend(entries, grid.shape[0])], axis=1)


def legend(entries, height: int, width: int = 120) -> np.ndarray:
  """A white (height, width, 3) uint8 panel: a framed colour swatch and a name per entry, as many
  as fit, the last row saying how many more there are."""
  from PIL import Image, ImageDraw, ImageFont
  panel = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(panel)
  try:  # Pillow's own scalable font (FreeType); its bitmap font drops the spaces of a name.
    font = ImageFont.load_default(size=11)
  except (TypeError, ImportError, OSError):
    font = ImageFont.load_default()
  rows = max(1, height // LEGEND_ROW)
  if len(entries) > rows:
    entries = entries[:rows - 1] + [(None, f"+{len(entries) - rows + 1} more")]
  for i, (colour, name) in enumerate(entries):
    top = i * LEGEND_ROW + 2
    if colour is not None:
      draw.rectangle([4, top, 13, top + 9], fill=tuple(int(v) for v in colour), outline="gray")
    draw.text((18, top - 1), name, fill="black", font=font)
  return np.asarray(panel)


def with_head_rate(config):
  """The config with optim.base_lr set to seg.head's own rate (seg.base_lr) where it is unset,
  so that DIR/config.json records the rate the run used."""
  if config.optim.base_lr is not None:
    return config
  config = copy.deepcopy(config)
  config.optim.base_lr = float(config.seg.base_lr[config.seg.head])
  return config


def run(config, workdir: str) -> dict:
  from sit_jax import experiment, trainer

  d, seg, size = config.data, config.seg, config.data.image_size
  if seg.head not in ("linear", "mlp"):
    raise ValueError(f"seg.head must be 'linear' or 'mlp', not {seg.head!r}.")
  if seg.features not in ("backbone", "raw_pixels"):
    raise ValueError(f"seg.features must be 'backbone' or 'raw_pixels', not {seg.features!r}.")
  config = with_head_rate(config)
  compiler_options = sharding.step_compiler_options(config.compiler_options)
  with experiment.Experiment(config, workdir,
                             batch_sizes={"data.global_batch_size": d.global_batch_size,
                                          "eval_batch_size": config.eval_batch_size}) as exp:
    mesh = exp.mesh
    open_split = functools.partial(segment_data.open_split, d.source,
                                   data_dir=d.data_dir or None, num_classes=d.num_classes)
    train, val, test = (open_split(s) for s in (d.train_split, d.val_split, d.test_split))
    data.check_disjoint(train, val, "data.train_split", "data.val_split")
    data.check_disjoint(train, test, "data.train_split", "data.test_split")
    data.check_disjoint(val, test, "data.val_split", "data.test_split")
    num_classes = train.num_classes

    backbone = common.load_backbone(config, image_size=size, drop_path_rate=0.0)
    params = common.place_backbone(backbone, mesh, config.sharding_rules, config.seed)
    blocks = tuple(seg.blocks) or (backbone.module.depth,)
    if seg.features == "raw_pixels":  # the baseline row: the same head on each patch's pixels
      patch_fn = common.make_pixel_patch_fn(backbone.module.patch_size, seg.cls)
      inputs, features = "raw pixels", "pixels of each patch" + (
          " + the whole image" if seg.cls else "")
    else:
      patch_fn = common.make_patch_fn(backbone.module, blocks, seg.cls)
      inputs, features = "frozen backbone", f"patch tokens of blocks {list(blocks)}" + (
          " + CLS" if seg.cls else "")
    head = SegmentationHead(num_classes, seg.hidden if seg.head == "mlp" else 0)

    total_steps, steps_per_epoch = optim.schedule_lengths(config, train.num_examples)
    lr = supervised.lr_schedule(config, total_steps, steps_per_epoch)
    tx = supervised.make_optimizer(config, lr)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros(jax.eval_shape(patch_fn, params, image).shape)

    scales = tuple(float(s) for s in seg.lr_scales)

    def init(rng):  # every head starts from the same parameters: they differ by their rate
      init_rng, state_rng = jax.random.split(rng)
      one = head.init(init_rng, tokens)["params"]
      head_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(scales),) + x.shape), one)
      return supervised.TrainState(step=jnp.zeros((), jnp.int32), params=head_params,
                                   opt_state=jax.vmap(tx.init)(head_params), rng=state_rng)

    replicated = sharding.replicated(mesh)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(init, rng))
    step_fn = jax.jit(make_train_step(patch_fn, head, tx, config, size, lr),
                      out_shardings=replicated, donate_argnums=(0,),
                      compiler_options=compiler_options or None)
    predict = make_predict(patch_fn, head, size)
    logging.info("segment %s: %d classes, %d train / %d validation / %d test images at %d px, "
                 "%s, %s head, %d steps, lr x %s; backbone %s", train.name, num_classes,
                 train.num_examples, val.num_examples, test.num_examples, size, features,
                 seg.head, total_steps, scales, backbone.name)

    def evaluate(data, head_params, pictures=0):
      batches = segment_data.EvalBatches(data, global_batch_size=config.eval_batch_size,
                                         image_size=size)
      return evaluate_split(predict, params, head_params, batches, mesh, num_classes, pictures)

    def per_head(name):
      return [f"{name}_at_x{s:g}" for s in scales] if len(scales) > 1 else [name]

    def validate(step, state, batch):  # val/mIoU, val/pixel_accuracy: the best head's
      del step, batch
      heads = evaluate(val, state.params)[0]
      best = heads[best_head([h["mIoU"] for h in heads])]
      return {"val/mIoU": best["mIoU"], "val/pixel_accuracy": best["pixel_accuracy"],
              **dict(zip(per_head("val/mIoU"), (h["mIoU"] for h in heads)))}

    def batches(start_step):
      return segment_data.train_batches(train, global_batch_size=d.global_batch_size,
                                        image_size=size, seed=config.seed, start_step=start_step)

    writer = exp.writer(total_steps, d.global_batch_size)
    metadata = {**supervised.frozen_checkpoint_metadata(config, backbone, num_classes),
                "blocks": list(blocks), "cls": bool(seg.cls), "head": seg.head,
                "features": seg.features, "lr_scales": list(scales)}
    outcome = trainer.train(
        exp, init=lambda: jax.jit(init, out_shardings=replicated)(rng), abstract=abstract,
        step_fn=lambda state, batch: step_fn(state, params, batch), batches=batches,
        total_steps=total_steps, metadata=metadata,
        hooks=[trainer.Hook(config.eval_every, validate, final=True)])
    results = {**common.results_dict(config, backbone, train, test, 0, {}, frozen=True,
                                     features=features,
                                     head=seg.head), **outcome.results()}
    if outcome.complete:  # the test split, once, at the end, for the head validation chose
      chosen = best_head([outcome.evaluated[k] for k in per_head("val/mIoU")])
      head_params = jax.tree.map(lambda x: x[chosen:chosen + 1], outcome.state.params)
      (scores,), shown = evaluate(test, head_params, seg.pictures)
      test_scalars = {"test/mIoU": scores["mIoU"], "test/pixel_accuracy": scores["pixel_accuracy"]}
      if not trainer.logged(exp, outcome.step, test_scalars):  # a finished run started again.
        writer.write_scalars(outcome.step, test_scalars, timed=False)
      if shown is not None:
        images, predictions, labels = shown
        viz.draw_or_warn("Segmentation picture", lambda: writer.write_images(
            outcome.step, "segmentation",
            picture_grid(images, predictions[0], labels, num_classes, train.class_names)))
      names = train.class_names or tuple(map(str, range(num_classes)))
      if scores["unlabelled"]:  # masks of 0 and 255 score the background alone: mIoU 1.0
        logging.warning(
            "No pixel of %s is labelled %s (of classes 0..%d): the mIoU leaves such a class "
            "out unless it is predicted. Masks that mark their objects %d leave them unscored: "
            "save class indices.", test.name, ", ".join(names[c] for c in scores["unlabelled"]),
            num_classes - 1, segment_data.IGNORE)
      results.update(num_examples=test.num_examples, mIoU=scores["mIoU"],
                     pixel_accuracy=scores["pixel_accuracy"], iou=dict(zip(names, scores["iou"])),
                     lr_scale=scales[chosen], lr_scales=list(scales),
                     validation={"split": d.val_split, **outcome.evaluated})
      rate = (f", lr x {scales[chosen]:g} chosen on validation from {list(scales)}"
              if len(scales) > 1 else "")
      results = common.results_table(
          results, f"{inputs}, {seg.head} head, {outcome.step} steps{rate}",
          {"val mIoU": outcome.evaluated.get("val/mIoU"), "test mIoU": scores["mIoU"],
           "test pixel accuracy": scores["pixel_accuracy"]})
    exp.finish(results)
  return results
