"""What the transfer configs (finetune, linear, knn, multilabel, segment, fewshot) share: the
datasets and the defaults of every transfer run; each config file adds its own recipe and
per-dataset table.

`config.init` is the pretrained backbone: a pretraining workdir, a checkpoint step directory or a
backbone export ('' = random init: the baseline row). With a checkpoint the architecture comes
from it; `config.model` only gives the random-init architecture and the runtime settings (drop
path, compute dtype, attention kernel, remat). Any dataset works through
--config.data.source=... (tfds:NAME, folder:/path, embedded:digits) and the split names.
"""
from __future__ import annotations

import ml_collections

from configs import common

# The datasets of the paper in TFDS: where they are and which splits train / validate /
# evaluate. Every recipe is chosen on the validation split (big_vision's minival: a slice of
# train held out, or the dataset's own validation split); `eval_every` scores it during
# training, and the test split is scored once, at the end.
# resize_mode of the evaluation view: 'resize' (whole image) for small or multi-object images,
# 'center_crop' (central 87.5%) for object-centric photos.
DATASETS = {
    "cifar10": dict(source="tfds:cifar10", train_split="train[:98%]", val_split="train[98%:]",
                    test_split="test", resize_mode="resize"),
    "cifar100": dict(source="tfds:cifar100", train_split="train[:98%]",
                     val_split="train[98%:]", test_split="test", resize_mode="resize"),
    "oxford_flowers102": dict(source="tfds:oxford_flowers102", train_split="train",
                              val_split="validation", test_split="test",
                              resize_mode="center_crop"),
    "oxford_iiit_pet": dict(source="tfds:oxford_iiit_pet", train_split="train[:90%]",
                            val_split="train[90%:]", test_split="test",
                            resize_mode="center_crop"),
    "stl10": dict(source="tfds:stl10", train_split="train[:90%]", val_split="train[90%:]",
                  test_split="test", resize_mode="resize"),
    "imagenet2012": dict(source="tfds:imagenet2012", train_split="train[:99%]",
                         val_split="train[99%:]", test_split="validation",
                         resize_mode="center_crop"),
    "voc2007": dict(source="tfds:voc/2007", train_split="train", val_split="validation",
                    test_split="test", resize_mode="resize"),
    # COCO's test split has no annotations: its validation split (5,000 images) is the test.
    "coco2017": dict(source="tfds:coco/2017", train_split="train[:98%]",
                     val_split="train[98%:]", test_split="validation", resize_mode="resize"),
    # ADE20K: TFDS's 'test' split is ADE's validation set (the challenge's test labels are not
    # public). Its masks are the 100 categories of the instance task (segment_data.py).
    "scene_parse150": dict(source="tfds:scene_parse150", train_split="train[:98%]",
                           val_split="train[98%:]", test_split="test", resize_mode="resize"),
    # Offline, bundled with scikit-learn: what `runlocal` uses. 300 of the 1,500 train digits
    # validate (the split the runlocal recipes were chosen on, benchmarks/learning.md).
    "digits": dict(source="embedded:digits", train_split="train[:80%]",
                   val_split="train[80%:]", test_split="test", resize_mode="resize"),
    "digits_multilabel": dict(source="embedded:digits_multilabel", train_split="train[:80%]",
                              val_split="train[80%:]", test_split="test",
                              resize_mode="resize"),
    "digit_canvas": dict(source="embedded:digit_canvas", train_split="train[:80%]",
                         val_split="train[80%:]", test_split="test", resize_mode="resize"),
}


def dataset_row(table: dict, dataset: str) -> dict:
  if dataset not in table or dataset not in DATASETS:
    known = sorted(set(table) & set(DATASETS))
    raise ValueError(f"No defaults for dataset {dataset!r} in this config; known: {known}. "
                     "For another dataset pick the closest one and override "
                     "--config.data.source / train_split / test_split.")
  return table[dataset]


# Frozen-feature evaluations (knn.py, fewshot.py): image size and extraction batch per dataset.
FEATURE_RECIPES = {
    "imagenet2012": dict(image_size=224, batch=1024),
    "cifar10": dict(image_size=224, batch=512),
    "cifar100": dict(image_size=224, batch=512),
    "oxford_flowers102": dict(image_size=224, batch=256),
    "oxford_iiit_pet": dict(image_size=224, batch=256),
    "stl10": dict(image_size=224, batch=512),
    "digits": dict(image_size=16, batch=128),  # the size runlocal pretrains at.
}


def frozen_features_config(experiment: str, dataset: str) -> ml_collections.ConfigDict:
  """Defaults of an evaluation on cached frozen CLS features (k-NN, few-shot)."""
  r = dataset_row(FEATURE_RECIPES, dataset)
  c = transfer_config(experiment, dataset)
  c.data.image_size = r["image_size"]
  c.eval_batch_size = r["batch"]
  c.head.features = "cls"
  c.head.last_blocks = 1
  c.feature_cache = ""  # '': DIR/feature_cache; a path shares it between workdirs; 'off'.
  return c


def transfer_config(experiment: str, dataset: str) -> ml_collections.ConfigDict:
  """Defaults of every transfer experiment on `dataset` (a key of DATASETS)."""
  c = ml_collections.ConfigDict()
  c.experiment = experiment
  c.dataset = dataset
  c.init = ""                   # pretrained backbone path; '' = random init.
  # 'teacher': the momentum teacher of a SiT or contrastive run's checkpoint (what DINO's
  # evaluations read; the monitor prints it as knn/teacher) instead of the student.
  c.init_weights = "student"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = DATASETS[dataset]["source"]
  c.data.train_split = DATASETS[dataset]["train_split"]
  c.data.val_split = DATASETS[dataset]["val_split"]    # chooses recipes; eval_every scores it.
  c.data.test_split = DATASETS[dataset]["test_split"]  # scored once, at the end.
  c.data.data_dir = ""          # TFDS data_dir; empty: TFDS default.
  c.data.image_size = 224
  c.data.crop_scale = (0.08, 1.0)  # random-resized crop of the training images.
  c.data.flip = True            # random horizontal flips of the training images.
  c.data.resize_mode = DATASETS[dataset]["resize_mode"]
  c.data.interpolation = "bicubic_antialias"  # as PIL; 'bicubic', 'bilinear': faster hosts.
  # 'host': transfer datasets are often small images enlarged to 224, cheaper to send resized;
  # 'device' sends the decoded image (sit_jax/resample.py), as pretraining does.
  c.data.resize_on = "host"
  c.data.decoded_size = 0
  c.data.engine = "grain"       # 'grain'; 'tf' for TFDS TFRecord (pip install 'sit_jax[tf]').
  c.data.workers = 0            # grain worker processes; 0: threads of this process only.
  c.data.global_batch_size = 256
  c.eval_batch_size = 256

  c.model = ml_collections.ConfigDict()
  c.model.variant = "S/16"      # random init only; a checkpoint brings its own.
  c.model.standardize_input = False  # the same.
  c.model.drop_path_rate = 0.0
  c.model.dtype = "bfloat16"     # frozen features too; DINO's evaluations compute in float32.
  c.model.attention = ""
  c.model.remat = False
  c.model.recompute_gelu = False  # GELU recomputed in the backward pass (vit.Mlp): CPU.

  c.head = ml_collections.ConfigDict()
  c.head.features = "cls"       # 'cls', 'mean' or 'cls+mean' (concat CLS and mean patch token).

  c.total_epochs = 100.0
  c.total_steps = 0             # > 0 overrides total_epochs.

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding_rules = common.REPLICATED
  c.logical_axis_rules = common.LOGICAL_AXIS_RULES
  # XLA options of the training step of fine-tuning and segmentation, as pretraining's
  # (configs/common.py): 'name=value,...', xla_tpu_* ones applied on TPUs only.
  c.compiler_options = ""
  c.tsne_points = 2000          # t-SNE of test features (linear, knn); 0: none.
  c.log_every = 50
  c.eval_every = 0              # > 0: score the validation split every so many steps.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1
  return c


def optim_config(name="adamw", base_lr=5e-4, weight_decay=0.05, warmup_epochs=5,
                 layer_decay=1.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,                 # 'adamw' or 'sgd'.
      base_lr=base_lr,           # per 256 examples: lr = base_lr * global_batch_size / 256.
      min_lr=1e-6, warmup_epochs=float(warmup_epochs), weight_decay=float(weight_decay),
      layer_decay=float(layer_decay),  # < 1: layer-wise lr decay (BEiT/DeiT fine-tuning).
      clip_norm=0.0,             # > 0: per-tensor gradient clipping.
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.9))


def linear_probe_config(cache_features: bool = True, **overrides) -> ml_collections.ConfigDict:
  """The linear probe on frozen features (linear, multilabel frozen=True)."""
  lin = ml_collections.ConfigDict(dict(
      cache_features=cache_features,  # features once (eval view), else augmented SGD steps.
      normalize_features=True,   # standardise with the train features' mean / std.
      stats_examples=10_000,     # augmented mode: examples for those statistics.
      # Cached mode: 'lbfgs' = full-batch logistic regression to convergence (sklearn's
      # LogisticRegression with C = 1 / (l2 n)); 'sgd' = mini-batches with config.optim.
      solver="lbfgs",
      # L2 penalty (l2 / 2) ||W||^2 on the mean cross-entropy; with several values the one with
      # the best score on a held-out val_fraction of the train features (fixed shuffle) wins,
      # then the head is refitted on all train features. The test split never chooses.
      l2=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
      val_fraction=0.2,
      max_iter=5000,             # L-BFGS iterations at most,
      tol=1e-5))                 # or until the gradient's l2 norm is below this.
  lin.update(overrides)
  return lin


def deit_augment_config(**overrides) -> ml_collections.ConfigDict:
  """DeiT's regularisation: RandAugment m9 mstd0.5 (on-device subset, see deit_augment.py),
  random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1."""
  a = ml_collections.ConfigDict(dict(
      randaugment=True, ra_num_ops=2, ra_magnitude=9.0, ra_magnitude_std=0.5,
      erase_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5,
      label_smoothing=0.1))
  a.update(overrides)
  return a


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment on the embedded digits with the micro ViT: a minute or two on a CPU.
  The image size stays that of the config's 'digits' RECIPES row (its only place)."""
  c.data.crop_scale = (0.35, 1.0)
  c.data.global_batch_size = 64
  c.eval_batch_size = 128
  c.model.variant = "Mu/4"
  c.model.dtype = "float32"
  c.model.standardize_input = True  # random init as pretraining's runlocal builds it.
  c.log_every = 20
  c.checkpoint_every = 100
  return c
