"""Few-shot linear evaluation of frozen features by closed-form ridge regression (big_vision's
few-shot evaluator).

For n shots and a seed, n train examples of every class are drawn; their l2-normalised features
x are regressed onto one-hot targets in {-1, 1} with an unpenalised bias:

    W = argmin ||(x - mean x) W - (y - mean y)||^2 + l2 ||W||^2,   b = mean y - (mean x) W,

and a test example's class is the argmax of x W + b. One eigendecomposition of the smaller Gram
matrix (n C x n C, or D x D when there are more examples than dimensions) gives W for every l2
of the grid at once. The l2 of each shot count is the one with the best mean accuracy on the
validation split over the seeds; the test split is scored at it: mean and standard deviation
over the seeds.
"""
from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sit_jax.transfer import common, feature_cache, knn


def sample_shots(labels, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """Indices of `shots` examples of each class (all of a class that has fewer), drawn without
  replacement by a generator seeded with (seed, shots)."""
  rng = np.random.default_rng([seed, shots])
  chosen = []
  for c in range(num_classes):
    of_class = np.flatnonzero(labels == c)
    chosen.append(rng.choice(of_class, min(shots, len(of_class)), replace=False))
  return np.sort(np.concatenate(chosen))


def check_shots(labels, shots_list, info, key: str = "fewshot.shots") -> None:
  """Refuses a train split (`info`: its DatasetInfo) with fewer examples of a class than the
  largest shot count: its row would fit fewer shots than it says, every seed the same ones.
  `key`: the setting that holds `shots_list`, for the line."""
  counts = np.bincount(labels, minlength=info.num_classes)
  short = np.flatnonzero(counts < max(shots_list))
  if short.size:
    names = info.classes or tuple(map(str, range(info.num_classes)))
    listed = ", ".join(f"{names[c]}: {counts[c]}" for c in short[:5])
    fitting = tuple(s for s in shots_list if s <= counts.min())
    fix = (f"keep the shot counts they allow (--config.{key}='{fitting}') or add images"
           if fitting else "add images")
    raise ValueError(
        f"{key}={tuple(shots_list)} draws {max(shots_list)} train examples of every "
        f"class, and {info.name} has fewer of {short.size} of its {info.num_classes} classes "
        f"({listed}{', ...' if short.size > 5 else ''}): {fix}.")


@functools.partial(jax.jit, static_argnames=("num_classes",))
def ridge_solutions(x, labels, l2s, num_classes: int):
  """(W (L, D, C), b (L, C)): the ridge regression above for each of the L penalties."""
  x = x.astype(jnp.float32)
  y = 2.0 * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  n, d = x.shape
  if n <= d:  # W = xc^T (xc xc^T + l2 I)^-1 yc
    eigs, q = jnp.linalg.eigh(xc @ xc.T)
    left, right = xc.T @ q, q.T @ yc
  else:       # W = (xc^T xc + l2 I)^-1 xc^T yc
    eigs, q = jnp.linalg.eigh(xc.T @ xc)
    left, right = q, q.T @ (xc.T @ yc)
  eigs = jnp.maximum(eigs, 0.0)  # a Gram matrix: negative only by rounding
  w = jax.vmap(lambda l2: (left / (eigs + l2)) @ right)(jnp.asarray(l2s, jnp.float32))
  return w, y_mean - jnp.einsum("d,ldc->lc", x_mean, w)


@jax.jit
def _accuracies(w, b, x, labels):
  """(L,) accuracy of each (W, b) on (x, labels); one penalty at a time keeps memory N x C."""
  return jax.lax.map(lambda wb: jnp.mean(jnp.argmax(x @ wb[0] + wb[1], -1) == labels), (w, b))


def fewshot_accuracies(train_feats, train_labels, eval_sets: dict, shots: int, seeds: int,
                       l2s, num_classes: int) -> dict:
  """name -> (seeds, L) accuracies on each eval set (name -> (features, labels)) of the ridge
  fitted to `shots` examples per class, for each seed and each l2 of `l2s`."""
  train_feats = knn.l2_normalize(train_feats)
  eval_sets = {k: (jnp.asarray(knn.l2_normalize(f)), jnp.asarray(l)) for k, (f, l) in
               eval_sets.items()}
  out = {name: [] for name in eval_sets}
  for seed in range(seeds):
    idx = sample_shots(train_labels, shots, seed, num_classes)
    w, b = ridge_solutions(train_feats[idx], train_labels[idx], tuple(l2s), num_classes)
    for name, (f, l) in eval_sets.items():
      out[name].append(np.asarray(_accuracies(w, b, f, l)))
  return {name: np.stack(rows) for name, rows in out.items()}


def evaluate(train_feats, train_labels, val_feats, val_labels, test_feats, test_labels, *,
             shots_list, seeds: int, l2s, num_classes: int) -> dict:
  """'{n}shot' -> {test_mean, test_std, val_mean, l2, test_per_seed, val_by_l2}: l2 chosen on
  the validation mean over seeds (ties: the larger l2), test scored at it."""
  l2s = tuple(float(v) for v in l2s)
  rows = {}
  for shots in shots_list:
    acc = fewshot_accuracies(train_feats, train_labels,
                             {"val": (val_feats, val_labels), "test": (test_feats, test_labels)},
                             shots, seeds, l2s, num_classes)
    val_mean = acc["val"].mean(0)
    best = max(range(len(l2s)), key=lambda i: (val_mean[i], l2s[i]))
    test = acc["test"][:, best]
    rows[f"{shots}shot"] = {"test_mean": float(test.mean()), "test_std": float(test.std()),
                            "val_mean": float(val_mean[best]), "l2": l2s[best],
                            "test_per_seed": [float(v) for v in test],
                            "val_by_l2": {f"{v:g}": float(a) for v, a in zip(l2s, val_mean)}}
  return rows


def run(config, workdir: str) -> dict:
  from sit_jax import experiment

  start = time.perf_counter()
  d, f = config.data, config.fewshot
  batch_sizes = {"eval_batch_size": config.eval_batch_size}
  with experiment.Experiment(config, workdir, batch_sizes=batch_sizes) as exp:
    train_info, test_info = common.dataset_infos(config)
    common.check_multilabel(train_info, False)
    if train_info.labels is not None:  # listed (a folder, an embedded dataset): before any work
      check_shots(train_info.labels, tuple(f.shots), train_info)
    size = d.image_size
    backbone = common.load_backbone(config, image_size=size, drop_path_rate=0.0)
    params = common.place_backbone(backbone, exp.mesh, config.sharding_rules, config.seed)
    fn = common.make_feature_fn(backbone.module, config.head.features, config.head.last_blocks)
    features = common.features_name(config)
    identity = feature_cache.checkpoint_identity(backbone, config.seed)
    split_features = functools.partial(feature_cache.split_features, config, exp.workdir,
                                       identity, common.uint8_features(fn), params, exp.mesh,
                                       features=features, image_size=size)
    train = split_features(d.train_split)
    check_shots(train[1], tuple(f.shots), train_info)  # TFDS; or a folder's unreadable images
    val, test = split_features(d.val_split), split_features(d.test_split)
    logging.info("few-shot: %d train, %d validation, %d test features of dimension %d",
                 len(train[0]), len(val[0]), len(test[0]), train[0].shape[1])
    rows = evaluate(*train, *val, *test, shots_list=tuple(f.shots), seeds=f.seeds, l2s=f.l2,
                    num_classes=train_info.num_classes)
    scalars = {f"fewshot/{k}/{m}": v[m] for k, v in rows.items() for m in ("test_mean", "val_mean")}
    extra = {}
    if config.get("baselines", False):
      # The same protocol on raw pixels and (with an init) the random-init backbone.
      baselines = {"random_init": rows} if not backbone.init else {}
      for name, (base_fn, base_params) in common.baseline_extractors(config, backbone, exp.mesh,
                                                                     fn).items():
        feats = [common.extract_features(base_fn, base_params,
                                         common.eval_batches(config, split, size), exp.mesh,
                                         common.log_progress(f"{name}: {split} features"))
                 for split in (d.train_split, d.val_split, d.test_split)]
        baselines[name] = evaluate(*feats[0], *feats[1], *feats[2], shots_list=tuple(f.shots),
                                   seeds=f.seeds, l2s=f.l2, num_classes=train_info.num_classes)
      scalars.update({f"baselines/{name}/{k}": v["test_mean"]
                      for name, by_shots in baselines.items() for k, v in by_shots.items()})
      for k in rows:
        logging.info("few-shot %s test accuracy: this backbone (%s) %.3f | %s", k,
                     backbone.name, rows[k]["test_mean"],
                     " | ".join(f"{n.replace('_', ' ')} {b[k]['test_mean']:.3f}"
                                for n, b in baselines.items()))
      extra["baselines"] = {name: {k: {m: v[m] for m in ("test_mean", "test_std")}
                                   for k, v in by_shots.items()}
                            for name, by_shots in baselines.items()}
    exp.writer(0, config.eval_batch_size).write_scalars(0, scalars, timed=False)
    results = common.results_dict(config, backbone, train_info, test_info, len(test[1]),
                                  {"fewshot": rows, **extra}, features=features, seeds=f.seeds,
                                  val_split=d.val_split, seconds=time.perf_counter() - start)
    results = common.results_table(
        results, f"ridge on {f.seeds} seeds of n shots, l2 chosen on validation",
        {f"{k} test": f"{v['test_mean']:.4f}±{v['test_std']:.4f}" for k, v in rows.items()})
    exp.finish(results)
  return results
