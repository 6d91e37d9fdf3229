"""What every transfer experiment shares: the backbone named by `config.init`, frozen features,
scores (top-k accuracy, mAP) and the results file."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Iterable

from absl import logging
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sit_jax import augment, sharding
from sit_jax.models import heads, vit



# ---------------------------------------------------------------------------------------------
# The backbone: architecture and weights from the checkpoint, or random from config.model.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backbone:
  module: vit.VisionTransformer
  params: Any | None    # host numpy tree (position embedding already resized); None: random init
  model_config: dict    # what built `module`
  init: str             # config.init ('' for random init)
  pretrained_image_size: int | None = None
  weights: str = "student"  # config.init_weights: the checkpoint's student or teacher
  checkpoint_hash: str | None = None  # parameters_hash of the parameters as read; None: random
  location: str | None = None  # the directory read (a step directory or an export); None: random
  step: int | None = None      # the step read (an export's from its export.json); else None

  @property
  def name(self) -> str:
    """How logs and pictures name it: 'random init', the path, or the path and '(teacher)'."""
    return backbone_name(self.init, self.weights)


def backbone_name(init: str, weights: str = "student") -> str:
  """'random init', config.init, or config.init and '(teacher)'."""
  if not init or init == "random":  # results.json's init of a random backbone
    return "random init"
  return init + (" (teacher)" if weights == "teacher" else "")


def _to_dict(c) -> dict:
  return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)


def load_backbone(config, *, image_size: int, drop_path_rate: float | None = None) -> Backbone:
  """The ViT of `config.init` (a pretraining workdir, a checkpoint step dir or a backbone export)
  at `image_size`, or a random one from `config.model` when `config.init` is ''.

  With a checkpoint, the variant (width, depth, heads, patch) comes from its model config and
  the position embedding is resized bicubically when the patch grid differs.
  """
  model = _to_dict(config.model)
  # How the backbone computes comes from this config, whatever the checkpoint says.
  runtime = {k: model[k] for k in vit.RUNTIME_KEYS if k in model}
  if drop_path_rate is not None:
    runtime["drop_path_rate"] = drop_path_rate
  if not config.init:
    model_config = {**vit.parameter_settings(model), "image_size": image_size, **runtime}
    return Backbone(vit.backbone_from_config(model_config), None, model_config, "")

  from sit_jax import checkpoint  # orbax: only when a checkpoint is read.
  weights = config.get("init_weights", "student")
  # A workdir names its latest step, which a pretraining that goes on moves: results name it.
  loaded, ckpt_config, location = checkpoint.read_backbone(config.init, weights)
  if "backbone" not in loaded:
    raise checkpoint.CheckpointError(f"{config.init} holds no 'backbone' parameters "
                                     f"(found {sorted(loaded)}).")
  # What the parameters mean is saved with them (standardize_input: False before it existed).
  saved = vit.parameter_settings(ckpt_config)
  for key, value in {"standardize_input": False, **saved}.items():
    if model.get(key, "") not in ("", value):
      logging.warning("config.model.%s=%s ignored: the backbone of %s has %s, saved with its "
                      "parameters.", key, model[key], config.init, value)
  model_config = {**saved, "image_size": image_size, **runtime}
  check_image_size_fits(config.init, image_size, ckpt_config)
  module = vit.backbone_from_config(model_config)
  params = jax.tree.map(np.asarray, loaded["backbone"])
  checkpoint_hash = parameters_hash(params)  # before the resize, whose floats the device sets
  grid = image_size // module.patch_size
  params["pos_embed"] = np.asarray(vit.resize_pos_embed(params["pos_embed"], (grid, grid)))
  check_params(module, params, config.init)
  return Backbone(module, params, model_config, str(config.init),
                  pretrained_image_size=ckpt_config.get("image_size"), weights=weights,
                  checkpoint_hash=checkpoint_hash, location=location,
                  step=checkpoint.backbone_step(location))


def check_image_size_fits(init: str, image_size: int, ckpt_config: dict):
  """config_check cannot see a checkpoint's patch: the line names the key here (transfer.run
  checks it before the workdir is written, load_backbone again for its other callers)."""
  if "variant" not in ckpt_config:
    return
  try:
    vit.check_image_size(image_size, vit.parse_variant(ckpt_config["variant"])["patch_size"])
  except ValueError as e:
    raise ValueError(f"data.image_size={image_size} does not fit the {ckpt_config['variant']} "
                     f"backbone of {init}: {e}") from None


def parameters_hash(params) -> str:
  """A hash of a host parameter tree's leaf names, dtypes, shapes and values: which parameters
  they are, wherever they were read from (a step directory, its export, a copy elsewhere)."""
  digest = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{sharding.path_name(path)} {leaf.dtype} {leaf.shape}".encode())
    digest.update(leaf.reshape(-1).view(np.uint8))  # the values' bytes, not a copy of them
  return digest.hexdigest()


def check_params(module, params, where: str):
  """Raises if `params` does not have exactly the leaves and shapes `module` creates."""
  size = module.image_size
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])
  leaves = jax.tree_util.tree_leaves_with_path
  want = {sharding.path_name(p): tuple(x.shape) for p, x in leaves(abstract)}
  have = {sharding.path_name(p): np.shape(x) for p, x in leaves(params)}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:6]
    raise ValueError(f"The backbone in {where} does not match a {module.width}-wide, "
                     f"{module.depth}-deep ViT: differing (leaf, shape) pairs {diff}.")


def place_backbone(backbone: Backbone, mesh, rules, seed: int = 0):
  """The backbone parameters on the mesh (sharded by `rules`): loaded, or freshly initialised."""
  module, size = backbone.module, backbone.module.image_size
  init = lambda rng: module.init(rng, jnp.zeros((1, size, size, 3)))["params"]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(seed))
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  if backbone.params is None:
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return jax.device_put(backbone.params, shardings)


# ---------------------------------------------------------------------------------------------
# Features of the frozen backbone.
# ---------------------------------------------------------------------------------------------


def to_input(images_uint8):
  """Host uint8 crops -> the normalised float images the backbone sees."""
  return augment.normalize(images_uint8.astype(jnp.float32) / 255.0)


def _is_block(module, method_name):
  return method_name == "__call__" and (module.name or "").startswith("blocks_")


def block_outputs(module: vit.VisionTransformer, params, images, blocks, *, train=False,
                  rngs=None):
  """(the backbone's output dict, [tokens (B, 1 + h*w, D) of each block in `blocks` (1-based),
  each through the final LayerNorm as DINO reads several blocks]); one forward pass."""
  for b in blocks:
    if not 1 <= b <= module.depth:
      raise ValueError(f"Block {b} is outside 1..{module.depth}.")
  out, state = module.apply({"params": params}, images, train=train, rngs=rngs or {},
                            capture_intermediates=_is_block, mutable=["intermediates"])
  norm = nn.LayerNorm(epsilon=1e-6, dtype=module.dtype)
  captured = state["intermediates"]
  return out, [norm.apply({"params": params["norm"]}, captured[f"blocks_{b - 1}"]["__call__"][0])
               for b in blocks]


def make_feature_fn(module: vit.VisionTransformer, features: str = "cls", last_blocks: int = 1):
  """fn(params, images) -> (B, D) float32 features of normalised images.

  features: 'cls', 'mean' (mean patch token) or 'cls+mean'. With last_blocks = k > 1 the CLS part
  is the concatenation of the CLS tokens of the last k blocks, each through the final LayerNorm
  (DINO's linear evaluation); the mean patch token is always the last block's.
  """
  if last_blocks < 1 or last_blocks > module.depth:
    raise ValueError(f"head.last_blocks={last_blocks} must be within 1..{module.depth}, the "
                     "blocks of this backbone.")
  if last_blocks > 1 and features == "mean":
    raise ValueError(f"head.features='mean' with head.last_blocks={last_blocks}: several blocks "
                     "concatenate their CLS tokens; set --config.head.features=cls (or cls+mean) "
                     "or --config.head.last_blocks=1.")

  def fn(params, images, *, train=False, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    if last_blocks == 1:
      out = module.apply({"params": params}, images, train=train, rngs=rngs)
      return heads.pool_features(out, features).astype(jnp.float32)
    blocks = range(module.depth - last_blocks + 1, module.depth + 1)
    out, tokens = block_outputs(module, params, images, blocks, train=train, rngs=rngs)
    cls = [t[:, 0] for t in tokens]
    if features == "cls+mean":
      cls.append(out["patches"].mean(axis=1))
    return jnp.concatenate(cls, axis=-1).astype(jnp.float32)

  return fn


def make_patch_fn(module: vit.VisionTransformer, blocks=(), cls: bool = False):
  """fn(params, images) -> (B, h, w, D') float32 patch tokens on the patch grid: the given
  blocks' (1-based; () = the last block's) concatenated, for dense heads; with `cls` the last
  block's CLS token is appended to every patch (DINOv2's linear depth probe)."""
  if any(not 1 <= b <= module.depth for b in blocks):
    raise ValueError(f"seg.blocks={tuple(blocks)} names blocks outside 1..{module.depth}, the "
                     "blocks of this backbone: set --config.seg.blocks within them.")

  def fn(params, images):
    out, per_block = block_outputs(module, params, images, tuple(blocks) or (module.depth,))
    tokens = [t[:, 1:] for t in per_block]
    if cls:
      tokens.append(jnp.broadcast_to(out["cls"][:, None], tokens[0].shape[:2] +
                                     out["cls"].shape[-1:]))
    tokens = jnp.concatenate(tokens, axis=-1)
    return tokens.reshape(tokens.shape[0], *out["grid"], tokens.shape[-1]).astype(jnp.float32)

  return fn


def make_pixel_patch_fn(patch_size: int, whole_image: bool = False):
  """fn(params, images) -> (B, h, w, p * p * C) float32: each patch's normalised pixels on the
  backbone's token grid, the raw-pixel baseline of dense heads; with `whole_image` the flattened
  image is appended to every patch, as `make_patch_fn` appends the CLS token."""

  def fn(params, images):
    del params
    tokens = einops.rearrange(images, "b (h p) (w q) c -> b h w (p q c)", p=patch_size,
                              q=patch_size)
    if whole_image:
      image = einops.rearrange(images, "b y x c -> b 1 1 (y x c)")
      tokens = jnp.concatenate(
          [tokens, jnp.broadcast_to(image, tokens.shape[:3] + image.shape[-1:])], axis=-1)
    return tokens.astype(jnp.float32)

  return fn


def features_name(config) -> str:
  """The frozen features of config.head as results name them: 'cls of the last 4 block(s)'."""
  return f"{config.head.features} of the last {config.head.last_blocks} block(s)"


def feature_dim(module: vit.VisionTransformer, features: str, last_blocks: int = 1) -> int:
  return module.width * (last_blocks + (features == "cls+mean")) if features != "mean" \
      else module.width


@functools.lru_cache(maxsize=16)
def _jitted_extractor(fn, mesh):
  # Cached so that repeated evaluations with the same fn compile once.
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def run(params, batch):
    return fn(params, batch["image"]), batch["label"], batch["mask"], batch.get("index")
  return run


def extract_features(fn: Callable, params, batches: Iterable[dict], mesh,
                     progress: Callable[[int, int], None] | None = None):
  """Runs the jitted fn(params, uint8 images) over an eval iterator; returns (outputs, labels)
  as host numpy arrays of the valid (mask True) examples, all hosts' examples on every host, in
  the split's order where the batches say it (`index`): the same rows whatever the number of
  processes, for what picks rows by position (few-shot draws, the probe's held-out rows)."""
  run = _jitted_extractor(fn, mesh)
  outputs, labels, positions = [], [], []
  total = len(batches) if hasattr(batches, "__len__") else 0
  for i, batch in enumerate(batches):
    out, label, mask, index = jax.device_get(run(params, sharding.global_batch(batch, mesh)))
    outputs.append(out[mask])
    labels.append(label[mask])
    if index is not None:
      positions.append(index[mask])
    if progress is not None:
      progress(i + 1, total)
  if not outputs:
    raise ValueError("The evaluation split is empty.")
  outputs, labels = np.concatenate(outputs), np.concatenate(labels)
  if positions:
    order = np.argsort(np.concatenate(positions), kind="stable")
    outputs, labels = outputs[order], labels[order]
  return outputs, labels


# ---------------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------------


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict:
  """{'top1': ..., 'top5': ...}: fraction of examples whose label is among the k best scores.

  Classes tied with the label's score share the places left (the expected hit of a random
  order among them), so a tie, such as the classes no k-NN neighbour voted for, does not favour
  the classes of low index. A k of at least the number of classes, which every example passes
  (top5 of 5 classes or fewer), is left out."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  label_score = np.take_along_axis(scores, labels[:, None], axis=1)
  above = (scores > label_score).sum(axis=1)
  tied = (scores == label_score).sum(axis=1)  # the label's own class among them; 0: NaN, a miss
  share = lambda k: np.where(tied > 0, np.clip((k - above) / np.maximum(tied, 1), 0.0, 1.0), 0.0)
  return {f"top{k}": float(share(k).mean()) for k in ks if k == 1 or k < scores.shape[1]}


def average_precision(scores, targets, *, voc07: bool = False) -> float:
  """AP of one class. Default: sklearn's average_precision_score (sum over thresholds of
  (R_n - R_{n-1}) P_n, tied scores forming one threshold). voc07: the 11-point interpolated AP of
  the VOC2007 devkit (mean over r in {0, 0.1, ..., 1} of the best precision at recall >= r)."""
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets) > 0
  positives = targets.sum()
  if positives == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  scores, targets = scores[order], targets[order]
  tp, fp = np.cumsum(targets), np.cumsum(~targets)
  # The last index of each group of equal scores: one threshold per distinct score.
  last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
  precision = tp[last] / (tp[last] + fp[last])
  recall = tp[last] / positives
  if voc07:
    return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                          for r in np.linspace(0, 1, 11)]))
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, targets, *, voc07: bool = False) -> float:
  """Mean over classes (with at least one positive) of the per-class average precision; the
  classes left out are named in a warning. scores: (N, C) any monotone score (logits);
  targets: (N, C) multi-hot."""
  scores, targets = np.asarray(scores), np.asarray(targets)
  aps = np.array([average_precision(scores[:, c], targets[:, c], voc07=voc07)
                  for c in range(scores.shape[1])])
  left_out = tuple(np.flatnonzero(np.isnan(aps)).tolist())
  if len(left_out) == len(aps):
    raise ValueError("No class has a positive example: mAP is undefined.")
  if left_out:
    _warn_left_out_of_map(left_out, len(aps), len(scores))
  return float(np.mean(aps[~np.isnan(aps)]))


@functools.lru_cache(maxsize=None)
def _warn_left_out_of_map(classes: tuple, num_classes: int, num_examples: int):
  """Once per set of classes and examples: every evaluation of a split would repeat it."""
  logging.warning("mAP over %d of %d classes: class(es) %s have no positive among the %d "
                  "examples scored, so no AP (sklearn's average_precision_score(average="
                  "'macro') would count each as 0).", num_classes - len(classes), num_classes,
                  ", ".join(map(str, classes)), num_examples)


def score(logits, labels, multilabel: bool, voc07: bool = False) -> dict:
  if multilabel:
    return {"mAP": mean_average_precision(logits, labels, voc07=voc07)}
  return topk_accuracy(logits, labels)


# ---------------------------------------------------------------------------------------------
# Data, results and pictures.
# ---------------------------------------------------------------------------------------------


def data_dir(config):
  return config.data.data_dir or None


def train_batches(config, start_step: int, image_size: int):
  """The augmented training iterator of a transfer run: random-resized crops (data.crop_scale)
  and, unless data.flip is False, horizontal flips, from batch `start_step` on."""
  from sit_jax import data
  return data.train_iterator(
      config.data.source, config.data.train_split,
      global_batch_size=config.data.global_batch_size, image_size=image_size,
      crop_scale=tuple(config.data.crop_scale), seed=config.seed, start_step=start_step,
      data_dir=data_dir(config), interpolation=config.data.interpolation,
      flip=config.data.get("flip", True), **data.engine_options(config.data),
      **data.resize_options(config.data))


def train_placer(config, mesh, image_size: int):
  """`train_batches`' host batch -> the step's global batch (resized there with
  data.resize_on='device')."""
  from sit_jax import resample
  return resample.batch_placer(mesh, config.data, image_size, ("image",))


def eval_batches(config, split: str, image_size: int):
  from sit_jax import data
  return data.eval_iterator(config.data.source, split, global_batch_size=config.eval_batch_size,
                            image_size=image_size, data_dir=data_dir(config),
                            resize_mode=config.data.resize_mode,
                            interpolation=config.data.interpolation,
                            **data.engine_options(config.data))


def dataset_infos(config):
  """(train info, test info). Checks, before any work, that the train split has labels and
  that the validation and test splits are held out from it (no shared image, the same class
  folders) and from each other."""
  from sit_jax import data
  options = data.engine_options(config.data)

  def info(key):
    split = config.data[key]
    try:
      return data.dataset_info(config.data.source, split, data_dir(config), **options)
    except data.SplitNotFound as e:
      held_out = sorted((f for f in e.split_folders if f != "train"), key=lambda f: f != "test")
      if key == "test_split" and held_out:  # the folder's own held-out split
        fix = f"--config.data.test_split={held_out[0]} reads its {held_out[0]}/ folder."
      elif key == "val_split" and "test" in e.split_folders:  # keep test/, carve val from train
        fix = ("A validation slice of train, for instance: --config.data.train_split="
               "'train[:85%]' --config.data.val_split='train[85%:]'.")
      else:
        fix = ("Three disjoint slices, for instance: --config.data.train_split='train[:70%]' "
               "--config.data.val_split='train[70%:85%]' --config.data.test_split='train[85%:]'.")
      raise data.SplitNotFound(f"data.{key}={split!r}: {e} {fix}") from None
    except data.DataNotFoundError:  # the source's own error names it
      raise
    except data.DataError as e:  # e.g. a slice of no example
      raise type(e)(f"data.{key}={split!r}: {e}") from None

  train, test = info("train_split"), info("test_split")
  if train.num_classes <= 0:
    raise data.DataError(f"{train.name} has no labels: transfer needs a labelled train split.")
  data.check_held_out(train, test, "data.train_split", "data.test_split")
  if config.data.get("val_split"):
    val = info("val_split")
    data.check_held_out(train, val, "data.train_split", "data.val_split")
    data.check_held_out(val, test, "data.val_split", "data.test_split")
  return train, test


def classes_missing_from_train(config, info, labels=None, *, counts=None) -> dict:
  """{'classes_missing_from_train': [names]} for results.json, with one warning line, where the
  train split (`info`: its DatasetInfo) holds no example of some classes; else {}. `labels`: the
  split's labels as read (default: as listed, `info.labels`; none listed: no check), or
  `counts`: their data.class_counts (`first_epoch_class_counts`). A k-NN bank or a probe fitted
  on the split never predicts those classes, yet its score counts their test images; a slice may
  leave out a rare class, so the run goes on."""
  from sit_jax import data
  labels = info.labels if labels is None else labels
  if counts is None and labels is not None:
    counts = data.class_counts(info, labels)
  if counts is None or info.num_classes <= 0:
    return {}
  missing = [info.classes[c] if info.classes else str(c) for c in np.flatnonzero(counts == 0)]
  if not missing:
    return {}
  logging.warning("data.train_split=%r (%s) has no example of %d of its %d classes (%s%s): what "
                  "is fitted on it never predicts them, yet their test images are scored; "
                  "widen the slice to include them.", config.data.train_split, info.name,
                  len(missing), info.num_classes, ", ".join(missing[:10]),
                  ", ..." if len(missing) > 10 else "")
  return {"classes_missing_from_train": missing}


def first_epoch_class_counts(info, stream) -> np.ndarray | None:
  """data.class_counts of the train split (`info`) as the training `stream` (a data.HostIterator;
  None: this run read none) read its first epoch, summed over the processes; None where a
  process's stream did not read a whole first epoch (a resumed run, or one stopped before it
  ended). A collective: every process calls."""
  from jax.experimental import multihost_utils
  counts = None if stream is None else stream.first_epoch_class_counts
  read = np.full(info.num_classes, -1) if counts is None else counts
  every = multihost_utils.process_allgather(read)
  return None if (every < 0).any() else every.sum(0)


def check_multilabel(info, multilabel: bool):
  from sit_jax import data
  if info.multilabel and not multilabel:
    raise data.DataError(f"{info.name} is multi-label: use the 'multilabel' experiment.")
  if multilabel and not info.multilabel:
    raise data.DataError(f"{info.name} has one class per image: the 'multilabel' experiment "
                         "needs multi-hot labels (e.g. tfds:voc/2007).")


def checkpoint_metadata(config, backbone: Backbone, num_classes: int) -> dict:
  """What a resumed transfer run must match. Not config.init: a fine-tuned backbone is in the
  restored state, and the path may have moved (a run resumed on another machine); a frozen
  backbone's runs add which parameters it holds (supervised.frozen_checkpoint_metadata)."""
  return {"model": vit.architecture(backbone.model_config), "experiment": config.experiment,
          "num_classes": num_classes}


def _canonical(name: str) -> str:
  return "".join(ch for ch in name.lower() if ch.isalnum())


def dataset_name(config) -> str:
  """The name results and pictures give the dataset: config.dataset (e.g. 'digits', 'voc2007')
  when data.source is that dataset, else a name taken from the source actually read
  ('folder:/data/mnist' -> 'mnist', 'tfds:cifar10' -> 'cifar10', 'embedded:digits' ->
  'digits'), so that an overridden source is never reported under the recipe's dataset."""
  source = str(config.data.source)
  kind, sep, rest = source.partition(":")
  if not sep or kind not in ("tfds", "folder", "embedded"):
    kind, rest = "tfds", source  # a bare TFDS name
  if kind == "folder":
    derived = os.path.basename(os.path.normpath(os.path.expanduser(rest))) or rest
  elif kind == "tfds":
    derived = rest.partition(":")[0]  # 'NAME[/CONFIG][:SPLIT]'
  else:
    derived = rest
  recipe = config.get("dataset", "") or ""
  if recipe and _canonical(recipe) == _canonical(derived):
    return recipe
  return derived or recipe


def results_dict(config, backbone: Backbone, train_info, test_info, num_evaluated: int,
                 scores: dict, **extra) -> dict:
  """What results.json says of every transfer run: the data, the checkpoint (and its step), the
  model; then `scores` and `extra`. train_info: data.DatasetInfo (or segmentation's data)."""
  classes = getattr(train_info, "classes", None) or getattr(train_info, "class_names", ())
  return {"experiment": config.experiment, "dataset": dataset_name(config) or test_info.name,
          "source": config.data.source, "train_split": config.data.train_split,
          "test_split": config.data.test_split, "init": backbone.init or "random",
          **({"init_weights": backbone.weights, "init_checkpoint": backbone.location,
              "init_step": backbone.step} if backbone.init else {}),
          "model": backbone.model_config, "image_size": backbone.module.image_size,
          "pretrained_image_size": backbone.pretrained_image_size,
          "num_classes": train_info.num_classes,
          **({"classes": list(classes)} if classes else {}),
          "num_train_examples": train_info.num_examples, "num_examples": int(num_evaluated),
          **scores, **extra}


def _figure(value) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(results: dict, protocol: str, figures: dict) -> dict:
  """The run's results table: `results` with `protocol` and `figures` (name -> number or text)
  added, for results.json, and logged as one line: experiment (protocol) | dataset | checkpoint |
  features | each figure."""
  results = {**results, "protocol": protocol, "figures": figures}
  step = results.get("init_step")
  cells = [f"{results['experiment']} ({protocol})", str(results.get("dataset", "")),
           f"checkpoint {backbone_name(results.get('init', ''), results.get('init_weights'))}"
           + (f" step {step}" if step is not None else ""),
           f"features {results.get('features', '')}"]
  cells += [f"{name} {_figure(value)}" for name, value in figures.items()]
  logging.info("results | %s", " | ".join(cells))
  return results


def tsne(config, workdir, features, labels, title: str, class_names=()):
  """DIR/tsne.png of (up to config.tsne_points) test features, titled `title` and the test split
  (the features it shows and the split its figures were scored on), or None: skipped on non-main
  hosts, and a picture that fails is a warning (the run's figures are what matters). The legend
  names the classes where `class_names` (a folder's) are given, else their labels."""
  if not config.tsne_points or jax.process_index() != 0 or len(features) < 3:
    return None
  from sit_jax import metrics, viz

  def draw():
    import sklearn.manifold  # noqa: F401  (loaded first: the limit only reaches loaded libraries)
    import threadpoolctl  # a scikit-learn dependency
    # One thread: sklearn's OpenMP t-SNE spin-waits when its threads share busy cores (measured
    # 20x slower on a loaded 2-core host); single-threaded, 2000 points take seconds.
    with threadpoolctl.threadpool_limits(limits=1):
      return viz.tsne_plot(features, labels, os.path.join(workdir, metrics.TSNE_PICTURE),
                           title=f"{title} on {config.data.test_split}",
                           max_points=config.tsne_points, seed=config.seed,
                           class_names=class_names or None)
  return viz.draw_or_warn("t-SNE picture", draw)


# ---------------------------------------------------------------------------------------------
# Baseline rows: the same evaluation on raw pixels and on the backbone at random init.
# ---------------------------------------------------------------------------------------------

def raw_pixel_features(params, images_uint8):
  """The flattened normalised images the backbone would see (same eval view and size)."""
  del params
  images = to_input(images_uint8)
  return images.reshape(images.shape[0], -1).astype(jnp.float32)


def baseline_extractors(config, backbone: Backbone, mesh, fn) -> dict:
  """name -> (feature fn of uint8 images, params) for the baseline rows: 'raw_pixels', and
  'random_init' (the backbone's architecture with fresh weights from config.seed, through the
  same feature fn `fn` of normalised images) when config.init names a checkpoint (with
  config.init = '' the evaluated backbone is that random init already)."""
  extractors = {"raw_pixels": (raw_pixel_features, None)}
  if backbone.init:
    fresh = Backbone(backbone.module, None, backbone.model_config, "")
    extractors["random_init"] = (uint8_features(fn),
                                 place_backbone(fresh, mesh, config.sharding_rules, config.seed))
  return extractors


@functools.lru_cache(maxsize=16)
def uint8_features(fn):
  """fn(params, normalised images) -> the same function of uint8 images. Cached: the same fn
  gives the same function, so the backbone and its random-init baseline compile once."""
  return lambda params, images: fn(params, to_input(images))


def split_features(config, fn, params, mesh, image_size: int, what: str = ""):
  """(train features, train labels, test features, test labels) of the eval view of both
  splits through fn(params, uint8 images)."""
  train = extract_features(fn, params, eval_batches(config, config.data.train_split, image_size),
                           mesh, log_progress(f"{what}train features"))
  test = extract_features(fn, params, eval_batches(config, config.data.test_split, image_size),
                          mesh, log_progress(f"{what}test features"))
  return (*train, *test)


def log_baselines(what: str, dataset: str, backbone: Backbone, scores: dict, baselines: dict):
  """One line with the evaluated backbone and the baseline rows side by side."""
  metric = "mAP" if "mAP" in scores else "top1"
  rows = [f"this backbone ({backbone.name}) {scores[metric]:.3f}"]
  rows += [f"{name.replace('_', ' ')} {row[metric]:.3f}" for name, row in baselines.items()]
  logging.info("%s %s on %s: %s", what, metric, dataset, " | ".join(rows))


def log_progress(what: str):
  def progress(i, total):
    if i == total or i % 50 == 0:
      logging.info("%s: batch %d/%d", what, i, total)
  return progress
