"""Does pretraining learn? Pretrains with a config, then scores the frozen backbones beside the
raw pixels and the same architecture at random init: the figures of benchmarks/learning.md.

  python benchmarks/learning.py --config=configs/sit_vits.py:runlocal --workdir=/tmp/study/sit \
      --split=val [--config.loss.alpha=5 ...]

--split=val (what recipes are chosen on): pretraining reads train[:1200] of the embedded digits,
the k-NN bank and the logistic regression train on it, and train[1200:] is scored; the test split
is never read. --split=test: pretraining on train, bank train, scored on test (README figures).
Scores: DINO's k-NN (k 20, T 0.07; transfer/knn.py) and scikit-learn's logistic regression on
standardised features, for the CLS token, the mean patch token and both, of the student and the
teacher. Prints the row in learning.md's columns (with --baselines, raw pixels and random init
beneath), then the row as one JSON line, which is also appended to --results.
"""
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostutil import checked_config, fail, parse_flags  # noqa: E402
from sit_jax import checkpoint, config_check, data, metrics, pretrain, sharding  # noqa: E402
from sit_jax.models import vit  # noqa: E402
from sit_jax.transfer import common, knn  # noqa: E402

SPLITS = {"val": ("train[:1200]", "train[1200:]"), "test": ("train", "test")}
# Set from --split: an override of one on the command line would be replaced without a word.
SPLIT_KEYS = ("data.split", "eval.train_split", "eval.test_split")
# (features, last_blocks) of transfer/common.make_feature_fn; last 4: DINO's linear evaluation.
FEATURES = (("cls", 1), ("mean", 1), ("cls+mean", 1), ("cls", 4), ("cls+mean", 4))


def images_and_labels(source, split, size):
  it = data.eval_iterator(source, split, global_batch_size=128, image_size=size,
                          resize_mode="resize", interpolation="bicubic_antialias")
  batches = list(it)
  images = np.concatenate([b["image"][b["mask"]] for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  return images, labels


def scores(train_x, train_y, test_x, test_y, mesh):
  from sklearn.linear_model import LogisticRegression
  knn_scores = knn.knn_classify(train_x, train_y, test_x, 20, 0.07, mesh=mesh)
  knn_top1 = float((knn_scores.argmax(1) == test_y).mean())
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  clf = LogisticRegression(max_iter=3000, C=1.0)
  clf.fit((train_x - mean) / std, train_y)
  return {"knn": knn_top1, "logistic": float(clf.score((test_x - mean) / std, test_y))}


def backbone_scores(module, params, images, mesh):
  out = {}
  for features, last_blocks in FEATURES:
    fn = jax.jit(common.make_feature_fn(module, features, last_blocks))
    feats = [np.asarray(fn(params, common.to_input(x))) for x in images[:2]]
    name = features if last_blocks == 1 else f"last{last_blocks}:{features}"
    out[name] = scores(feats[0], images[2], feats[1], images[3], mesh)
  return out


def table(row: dict, image_size: int) -> str:
  """learning.md's columns: the run's backbones, then the baselines the row has."""
  def line(name, scored, teacher=None, contrastive=None):
    knn = f"{scored['cls']['knn']:.3f}" + (f" / {teacher['cls']['knn']:.3f}" if teacher else "")
    return (f"| {name} | {knn} | {scored['mean']['knn']:.3f} | {scored['cls']['logistic']:.3f} | "
            f"{scored['last4:cls']['logistic']:.3f} | "
            f"{'' if contrastive is None else f'{contrastive:.2f}'} |")
  lines = ["| run | k-NN CLS student / teacher | k-NN mean patch | linear CLS | linear last-4 CLS "
           "| contrastive at end |", "|---|---|---|---|---|---|",
           line(row["name"], row["student"], row.get("teacher"),
                (row["final_metrics"] or {}).get("contrastive"))]
  if "raw_pixels" in row:
    raw = row["raw_pixels"]
    lines.append(f"| raw pixels, {image_size} px | {raw['knn']:.3f} | | {raw['logistic']:.3f} | | |")
  if "random_init" in row:
    lines.append(line("random init", row["random_init"]))
  return "\n".join(lines)


def settings_changed(config_json: str, config) -> str:
  """The keys whose values differ between a run's config.json and `config`, '' if none."""
  saved = config_check.flatten(json.load(open(config_json)))
  now = config_check.flatten(json.loads(metrics.to_json(config.to_dict())))
  if not now.get("num_train_examples"):  # 0: pretraining counted the split, and saved the count
    now["num_train_examples"] = data.dataset_info(
        config.data.source, config.data.split, data_dir=config.data.data_dir or None,
        **data.engine_options(config.data)).num_examples
  changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
  return ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed[:6])


def split_overrides(overrides: dict) -> list[str]:
  """The keys of SPLIT_KEYS among the command line's --config overrides (a nested dict)."""
  return [key for key in SPLIT_KEYS if key in config_check.flatten(overrides)]


def main(_):
  config = checked_config()
  workdir = flags.FLAGS.workdir
  bank_split, test_split = SPLITS[flags.FLAGS.split]
  overridden = split_overrides(config_flags.get_override_values(flags.FLAGS["config"]))
  if overridden:
    fail(ValueError(f"--config.{overridden[0]} is set by --split here (val: pretraining and bank "
                    f"{SPLITS['val'][0]}, scored {SPLITS['val'][1]}; test: {SPLITS['test'][0]}, "
                    f"scored {SPLITS['test'][1]}): drop it and choose with --split."))
  with config.unlocked():
    config.data.split = bank_split
    config.eval.train_split, config.eval.test_split = bank_split, test_split
  try:  # both splits before pretraining: the scored one is read only after it
    for split in (bank_split, test_split):
      data.dataset_info(config.data.source, split, data_dir=config.data.data_dir or None,
                        **data.engine_options(config.data))
  except data.DataError as e:
    fail(ValueError(f"--split={flags.FLAGS.split} reads {bank_split} and {test_split} of "
                    f"{config.data.source}: {e}"))
  start = time.perf_counter()
  results_path = os.path.join(workdir, "results.json")
  done = os.path.exists(results_path) and not json.load(open(results_path)).get("preempted")
  if done:  # a finished pretraining is scored again only for the config (and split) it ran
    changed = settings_changed(os.path.join(workdir, "config.json"), config)
    if changed:
      fail(ValueError(f"{workdir} holds a finished run of another config ({changed}): pass "
                      "another --workdir."))
  else:
    pretrain.train_and_evaluate(config, workdir)
  train_seconds = time.perf_counter() - start
  result = json.load(open(results_path))

  mesh = sharding.make_mesh()
  size = config.data.image_size
  train_images, train_labels = images_and_labels(config.data.source, bank_split, size)
  test_images, test_labels = images_and_labels(config.data.source, test_split, size)
  images = (train_images, test_images, train_labels, test_labels)
  model_config = pretrain.model_config(config)
  module = vit.backbone_from_config({**vit.parameter_settings(model_config), "image_size": size,
                                     "dtype": "float32"})
  step_dir = os.path.join(workdir, "checkpoints", str(result["step"]))
  backbone = lambda weights: checkpoint.load_backbone(step_dir, weights)[0]["backbone"]
  row = {"name": flags.FLAGS.name or os.path.basename(workdir.rstrip("/")),
         "split": flags.FLAGS.split, "overrides": sys.argv[1:], "train_seconds": train_seconds,
         "final_metrics": result.get("final_metrics"),
         "student": backbone_scores(module, backbone("student"), images, mesh)}
  if pretrain.uses_teacher(config):
    row["teacher"] = backbone_scores(module, backbone("teacher"), images, mesh)
  if flags.FLAGS.baselines:
    flat = lambda x: np.asarray(common.to_input(x)).reshape(len(x), -1)
    row["raw_pixels"] = scores(flat(train_images), train_labels, flat(test_images),
                               test_labels, mesh)
    random_params = jax.jit(lambda rng: module.init(
        rng, np.zeros((1, size, size, 3), np.float32))["params"])(jax.random.PRNGKey(config.seed))
    row["random_init"] = backbone_scores(module, random_params, images, mesh)
  with open(flags.FLAGS.results, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(f"{row['name']}: pretraining {train_seconds:.0f} s, {flags.FLAGS.split} split")
  print(table(row, size))
  print(json.dumps(row))


def define_flags():  # here, not on import: the tests load this module beside sit_jax.main's flags
  config_flags.DEFINE_config_file("config", None, "Pretraining config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Pretraining workdir (reused when already complete).")
  flags.DEFINE_enum("split", "val", ["val", "test"], "val: train[:1200] -> train[1200:]; test.")
  flags.DEFINE_string("results", "/tmp/learning_results.jsonl", "JSON lines appended here.")
  flags.DEFINE_string("name", "", "Row name (default: the workdir's base name).")
  flags.DEFINE_bool("baselines", False, "Also score raw pixels and random init.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  define_flags()
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
