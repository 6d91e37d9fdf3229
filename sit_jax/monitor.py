"""k-NN (and few-shot) monitor of the backbones during pretraining (DINO's k-NN monitor,
big_vision's evals).

Every `eval_every` steps the student's and the teacher's backbones embed a labelled bank split
and a held-out split (the evaluation view, one jitted pass over batches sharded on the mesh), and
DINO's weighted k-NN (transfer/knn.py: the bank split over the devices) scores the held-out split.
The functions, the view and the defaults are those of `configs/knn.py`, so the figure equals what
knn.py reports for the same checkpoint and splits. With eval.fewshot_shots the same features also
give big_vision's few-shot ridge (transfer/fewshot.py, the fixed l2 eval.fewshot_l2): shots
drawn from the bank, scored on the held-out split, the mean over eval.fewshot_seeds draws.
"""
from __future__ import annotations

import time

from absl import logging

from sit_jax.models import vit
from sit_jax.transfer import common, fewshot, knn


def eval_splits(config) -> tuple[str, str, str]:
  """(source, bank split, held-out split) of the monitor; '' fields follow the pretraining data."""
  e = config.eval
  return (e.source or config.data.source, e.train_split or config.data.split, e.test_split)


def engine_options(config) -> dict:
  """The pretraining data's engine reads the bank too when it is the same source; another
  source (the embedded digits, a folder) is read by the default engine."""
  from sit_jax import data
  return data.engine_options(config.data) if eval_splits(config)[0] == config.data.source else {}


class KnnMonitor:
  """Call with {'student': backbone params, 'teacher': ...} -> {'knn/student': top-1, ...}."""

  def __init__(self, config, mesh, module: vit.VisionTransformer, bank_info, test_info,
               bank_split: str, test_split: str):
    e = config.eval
    self.source = eval_splits(config)[0]
    self.engine_options = engine_options(config)
    self.bank_split, self.test_split = bank_split, test_split
    self.mesh, self.module = mesh, module
    self.num_classes = bank_info.num_classes
    self.batch_size, self.resize_mode = e.batch_size, e.resize_mode
    self.interpolation, self.data_dir = config.data.interpolation, config.data.data_dir or None
    self.k, self.temperature = e.k, e.temperature
    self.shots, self.seeds, self.l2 = tuple(e.fewshot_shots), e.fewshot_seeds, e.fewshot_l2
    self.bank_info, self.shots_checked = bank_info, False
    self.features_of = common.uint8_features(common.make_feature_fn(module, e.features, 1))
    logging.info("k-NN monitor every %d steps: bank %s (%d), held out %s (%d), %s features",
                 config.eval_every, bank_info.name, bank_info.num_examples, test_info.name,
                 test_info.num_examples, e.features)

  @classmethod
  def from_config(cls, config, mesh, model_config: dict) -> "KnnMonitor | None":
    """The monitor, or None when it is off (eval_every = 0) or the data has no labels.

    Checks the splits before training starts: a bad one is one clear error then, not after the
    first `eval_every` steps (eval.batch_size is checked with the training batch, by
    pretrain.train_and_evaluate's Experiment).
    """
    from sit_jax import data
    e = config.eval
    if config.eval_every <= 0:
      return None
    source, bank_split, test_split = eval_splits(config)
    if e.k < 1 or e.temperature <= 0:
      raise ValueError(f"eval.k={e.k} and eval.temperature={e.temperature} must be positive.")
    data_dir = config.data.data_dir or None
    options = engine_options(config)

    def info(split, key):
      try:
        return data.dataset_info(source, split, data_dir, **options)
      except data.DataNotFoundError:  # the source's own error names it
        raise
      except data.DataError as error:
        raise type(error)(f"{key}={split!r}: {error}") from None

    bank = info(bank_split, "eval.train_split")  # the key that sets the bank
    if bank.num_classes < 2 or bank.multilabel:
      # With one class (images in a single sub-folder) every image is classified right: 1.0.
      logging.warning("k-NN monitor off: %s has %s (set eval.source and eval.train_split to a "
                      "split of two classes or more to watch features learn).", bank.name,
                      "one class" if bank.num_classes == 1 else "no class labels")
      return None
    try:
      test = info(test_split, "eval.test_split")
    except data.SplitNotFound:
      test = None
    if test is None or data.shared_examples(bank, test):
      # A folder without that split, or a test split that holds bank images: scoring the bank
      # against itself would report ~1.0, so hold out a slice of the bank's split instead.
      base = data.split_slice(bank_split)[0]
      held_out = f"{base}[90%:]"
      try:
        test = data.dataset_info(source, held_out, data_dir, **options)
      except data.DataError:  # 90% of 4 images or fewer rounds to all of them
        n = data.dataset_info(source, base, data_dir, **options).num_examples
        raise data.DataError(
            f"eval.test_split={test_split!r}: {source} has no such split held out from the "
            f"bank, and {held_out} of its {n} images holds none to score: set "
            + (f"--config.eval.train_split='{base}[:{n - 1}]' --config.eval.test_split="
               f"'{base}[{n - 1}:]' (one image held out), " if n > 1 else "")
            + (f"add a {test_split}/ folder of the class folders, " if test is None else "")
            + "or turn the monitor off with --config.eval_every=0.") from None
      bank_split, test_split = f"{base}[:90%]", held_out
      logging.warning("k-NN monitor: %s has no %r split held out from the bank; the bank is %s "
                      "and the held-out images %s (set eval.train_split / eval.test_split to "
                      "choose).", source, config.eval.test_split, bank_split, test_split)
      bank = data.dataset_info(source, bank_split, data_dir, **options)
    data.check_held_out(bank, test, "eval.train_split", "eval.test_split")
    runtime = {"dtype": model_config.get("dtype", "float32"),
               "attention": model_config.get("attention", ""),
               "scan_layers": model_config.get("scan_layers", False)}
    module = vit.backbone_from_config({**vit.parameter_settings(model_config),
                                       "image_size": model_config["image_size"], **runtime})
    return cls(config, mesh, module, bank, test, bank_split, test_split)

  def _batches(self, split):
    from sit_jax import data
    return data.eval_iterator(self.source, split, global_batch_size=self.batch_size,
                              image_size=self.module.image_size, data_dir=self.data_dir,
                              resize_mode=self.resize_mode, interpolation=self.interpolation,
                              **self.engine_options)

  def __call__(self, backbones: dict) -> dict:
    start, results = time.perf_counter(), {}
    for name, params in backbones.items():
      bank, bank_labels = common.extract_features(self.features_of, params,
                                                  self._batches(self.bank_split), self.mesh)
      test, test_labels = common.extract_features(self.features_of, params,
                                                  self._batches(self.test_split), self.mesh)
      scores = knn.knn_classify(bank, bank_labels, test, self.k, self.temperature,
                                self.num_classes, mesh=self.mesh)
      results[f"knn/{name}"] = common.topk_accuracy(scores, test_labels, ks=(1,))["top1"]
      if self.shots and not self.shots_checked:
        self.shots_checked = True
        try:  # a warning: the pretraining goes on, its few-shot rows mean fewer shots
          fewshot.check_shots(bank_labels, self.shots, self.bank_info, "eval.fewshot_shots")
        except ValueError as e:
          logging.warning("Few-shot monitor: %s", e)
      for shots in self.shots:
        accuracy = fewshot.fewshot_accuracies(bank, bank_labels, {"test": (test, test_labels)},
                                              shots, self.seeds, (self.l2,), self.num_classes)
        results[f"fewshot/{name}/{shots}shot"] = float(accuracy["test"].mean())
    logging.info("Monitor of %s evaluated in %.1f s (figures on the progress line)",
                 " and ".join(backbones), time.perf_counter() - start)
    return results
