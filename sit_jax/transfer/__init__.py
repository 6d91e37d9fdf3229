"""Transfer of a pretrained backbone: fine-tuning, linear probe, k-NN, multi-label, semantic
segmentation and few-shot.

`run(config, workdir)` runs the experiment `config.experiment` names:
  finetune    the whole network, DeiT recipe (finetune.py)
  linear      a linear head on the frozen backbone (linear.py)
  knn         DINO's weighted k-NN on frozen features (knn.py)
  multilabel  sigmoid head and mAP, fine-tuned or (config.multilabel.frozen) a linear probe
  segment     a per-pixel head on the frozen patch tokens, mIoU (segment.py)
  fewshot     closed-form ridge regression on n frozen features per class (fewshot.py)
The backbone comes from `config.init` (a pretraining workdir, a checkpoint step directory or a
backbone export; '' = random init from config.model). Each run writes DIR/results.json,
DIR/metrics.jsonl (and TensorBoard), and for linear and knn DIR/tsne.png; each prints its
results table in one line.
"""
from sit_jax.transfer.common import (extract_features, load_backbone, make_feature_fn,
                                     mean_average_precision, topk_accuracy)
from sit_jax.transfer.deit_augment import mixup_cutmix, rand_augment, random_erasing
from sit_jax.transfer.finetune import Classifier, create_state, make_finetune_step
from sit_jax.transfer.knn import knn_classify
from sit_jax.transfer.linear import fit_head, make_probe_step
from sit_jax.transfer.supervised import lr_decay_tree, make_optimizer

__all__ = ["EXPERIMENTS", "run", "extract_features", "load_backbone", "make_feature_fn",
           "mean_average_precision", "topk_accuracy", "mixup_cutmix", "rand_augment",
           "random_erasing", "Classifier", "create_state", "make_finetune_step", "knn_classify",
           "fit_head", "make_probe_step", "lr_decay_tree", "make_optimizer"]

EXPERIMENTS = ("finetune", "linear", "knn", "multilabel", "segment", "fewshot")


def run(config, workdir: str) -> dict:
  from sit_jax import checkpoint
  from sit_jax.transfer import common, fewshot, finetune, knn, linear, segment
  if config.get("init"):  # found, and its patch checked, before the workdir is written
    found = checkpoint.locate_backbone(config.init, config.get("init_weights", "student"))
    common.check_image_size_fits(config.init, config.data.image_size,
                                 checkpoint.saved_model_config(found))
  experiment = config.experiment
  if experiment == "finetune":
    return finetune.run(config, workdir)
  if experiment == "linear":
    return linear.run(config, workdir)
  if experiment == "knn":
    return knn.run(config, workdir)
  if experiment == "segment":
    return segment.run(config, workdir)
  if experiment == "fewshot":
    return fewshot.run(config, workdir)
  if experiment == "multilabel":
    if config.multilabel.frozen:
      return linear.run(config, workdir, multilabel=True)
    return finetune.run(config, workdir, multilabel=True)
  raise ValueError(f"Unknown transfer experiment {experiment!r}: choose one of {EXPERIMENTS}.")
