"""DINO's weighted k-NN classifier on l2-normalised frozen features.

For a test feature q: similarities s_i = q . x_i with every train feature x_i, the k largest
(s_j, y_j), weights exp(s_j / T), and the score of class c = sum of the weights of the neighbours
labelled c. Several k come from one search of the max(k) nearest neighbours. The train bank is
split over all devices of the mesh: each device takes the top k of its own shard, the
k * devices candidates are gathered, and the top k of those is the answer. Test features go
through in chunks, so memory is O(chunk * bank / devices) per device.
"""
from __future__ import annotations

import functools
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sit_jax import sharding
from sit_jax.transfer import common, feature_cache


def l2_normalize(x, eps=1e-12):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _bank_on_mesh(train_feats, train_labels, mesh, k):
  """Pads the bank so that every device holds the same number (>= k) of rows; padding rows get
  label -1 and never win (their similarity is -inf)."""
  devices = mesh.size
  n = len(train_feats)
  rows = max(math.ceil(n / devices), k)
  pad = rows * devices - n
  feats = np.concatenate([train_feats, np.zeros((pad, train_feats.shape[1]), np.float32)])
  labels = np.concatenate([train_labels.astype(np.int32), np.full((pad,), -1, np.int32)])
  spec = NamedSharding(mesh, P(sharding.AXES))
  return jax.device_put(feats, spec), jax.device_put(labels, spec)


@functools.lru_cache(maxsize=16)
def _make_topk(mesh, k):
  axes = sharding.AXES

  def local(test, bank, labels):
    sim = test @ bank.T
    sim = jnp.where(labels[None, :] >= 0, sim, -jnp.inf)
    values, index = jax.lax.top_k(sim, k)
    values = jax.lax.all_gather(values, axes, axis=1, tiled=True)
    cand = jax.lax.all_gather(labels[index], axes, axis=1, tiled=True)
    values, best = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(cand, best, axis=1)

  # After the gather every device holds the same answer: the output is replicated.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes)),
                               out_specs=(P(), P()), check_vma=False))


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _vote(values, neighbour_labels, temperature, k, num_classes):
  """Class scores from the k nearest of the sorted neighbours (the first k columns)."""
  weights = jnp.exp(values[:, :k] / temperature)  # exp(-inf) = 0 for padding rows
  labels = neighbour_labels[:, :k]
  rows = jnp.arange(values.shape[0])[:, None]
  return jnp.zeros((values.shape[0], num_classes), jnp.float32).at[
      rows, jnp.where(labels >= 0, labels, num_classes)].add(weights, mode="drop")


def knn_scores(train_feats, train_labels, test_feats, ks=(20,), temperature: float = 0.07,
               num_classes: int | None = None, *, mesh=None, chunk_size: int = 1024) -> dict:
  """k -> class scores (num_test, num_classes) of DINO's weighted k-NN vote, for every k of
  `ks` from one search of the max(ks) nearest neighbours (the k nearest are its first k).

  Features are l2-normalised here. `mesh` (default: all devices) holds the train bank split over
  its devices; test features are processed `chunk_size` at a time.
  """
  ks = tuple(int(k) for k in np.atleast_1d(ks))
  if min(ks) < 1:
    raise ValueError(f"k must be >= 1, got {ks}.")
  train_feats, test_feats = l2_normalize(train_feats), l2_normalize(test_feats)
  train_labels = np.asarray(train_labels)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  elif train_labels.max() >= num_classes:
    # A label past num_classes would silently drop out of the vote (scatter mode "drop").
    raise ValueError(f"k-NN bank label {int(train_labels.max())} >= num_classes={num_classes}: "
                     "pass the dataset's number of classes (or None to count them).")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  bank, labels = _bank_on_mesh(train_feats, train_labels, mesh, max(ks))
  topk = _make_topk(mesh, max(ks))
  scores = {k: [] for k in ks}
  for lo in range(0, len(test_feats), chunk_size):
    chunk = test_feats[lo:lo + chunk_size]
    padded = np.zeros((chunk_size, chunk.shape[1]), np.float32)
    padded[:len(chunk)] = chunk
    values, neighbour_labels = topk(jax.device_put(padded, sharding.replicated(mesh)), bank,
                                    labels)
    for k in ks:
      scores[k].append(np.asarray(_vote(values, neighbour_labels, temperature, k,
                                        num_classes))[:len(chunk)])
  return {k: np.concatenate(rows) for k, rows in scores.items()}


def knn_classify(train_feats, train_labels, test_feats, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, *, mesh=None, chunk_size: int = 1024):
  """Class scores (num_test, num_classes) of DINO's weighted k-NN vote; argmax is the prediction."""
  return knn_scores(train_feats, train_labels, test_feats, (k,), temperature, num_classes,
                    mesh=mesh, chunk_size=chunk_size)[k]


def run(config, workdir: str) -> dict:
  """Features of the train (the bank), validation and test splits with the frozen backbone
  (cached in the workdir for later runs on the same checkpoint), k-NN scores for every k of
  config.knn.k; k is chosen on validation and the test split scored at it. With
  config.baselines the same k-NN on raw pixels and on the backbone at random init."""
  from sit_jax import experiment

  start = time.perf_counter()
  d = config.data
  ks = tuple(int(k) for k in np.atleast_1d(config.knn.k))
  batch_sizes = {"eval_batch_size": config.eval_batch_size}
  with experiment.Experiment(config, workdir, batch_sizes=batch_sizes) as exp:
    mesh = exp.mesh
    train_info, test_info = common.dataset_infos(config)
    common.check_multilabel(train_info, False)
    size = d.image_size
    backbone = common.load_backbone(config, image_size=size, drop_path_rate=0.0)
    params = common.place_backbone(backbone, mesh, config.sharding_rules, config.seed)
    fn = common.make_feature_fn(backbone.module, config.head.features, config.head.last_blocks)
    features = common.features_name(config)
    identity = feature_cache.checkpoint_identity(backbone, config.seed)
    bank, val, test = (feature_cache.split_features(config, exp.workdir, identity,
                                                    common.uint8_features(fn), params, mesh,
                                                    split, features, size)
                       for split in (d.train_split, d.val_split, d.test_split))
    logging.info("k-NN: %d train, %d validation, %d test features of dimension %d",
                 len(bank[0]), len(val[0]), len(test[0]), bank[0].shape[1])
    extra = common.classes_missing_from_train(config, train_info, bank[1])

    def evaluate(bank_feats, bank_labels, feats, labels, ks=ks):
      scores = knn_scores(bank_feats, bank_labels, feats, ks, config.knn.temperature,
                          train_info.num_classes, mesh=mesh, chunk_size=config.knn.chunk_size)
      return {k: common.topk_accuracy(s, labels) for k, s in scores.items()}

    on_val, on_test = evaluate(*bank, *val), evaluate(*bank, *test)
    best = max(ks, key=lambda k: (on_val[k]["top1"], -k))  # ties: the smaller k
    accuracy = on_test[best]
    writer = exp.writer(0, config.eval_batch_size)
    writer.write_scalars(0, {f"knn/{split}/k={k}/{m}": v for split, rows in
                             (("val", on_val), ("test", on_test)) for k, row in rows.items()
                             for m, v in row.items()}, timed=False)

    if config.get("baselines", False):
      baselines = {}
      for name, (base_fn, base_params) in common.baseline_extractors(config, backbone, mesh,
                                                                     fn).items():
        feats = common.split_features(config, base_fn, base_params, mesh, size, f"{name}: ")
        baselines[name] = {**evaluate(*feats, ks=(best,))[best], "dim": int(feats[0].shape[1])}
      if "random_init" not in baselines:  # the evaluated backbone is the random init
        baselines["random_init"] = {**accuracy, "dim": int(bank[0].shape[1])}
      writer.write_scalars(0, {f"baselines/{name}/{k}": v for name, row in baselines.items()
                               for k, v in row.items() if k != "dim"}, timed=False)
      common.log_baselines(f"k-NN (k {best})", common.dataset_name(config), backbone,
                           accuracy, baselines)
      extra["baselines"] = baselines

    results = common.results_dict(
        config, backbone, train_info, test_info, len(test[1]), accuracy, k=best,
        temperature=config.knn.temperature, features=features,
        by_k={str(k): {"val": on_val[k], "test": on_test[k]} for k in ks},
        val_split=d.val_split, **extra, seconds=time.perf_counter() - start)
    results = common.results_table(
        results, f"weighted k-NN, T {config.knn.temperature}, k chosen on validation",
        {"k": best, "val top1": on_val[best]["top1"], "test top1": accuracy["top1"],
         **{f"test top1 k={k}": on_test[k]["top1"] for k in ks if k != best}})
    tsne = common.tsne(config, exp.workdir, *test, f"k-NN {results['dataset']} "
                       f"({backbone.name}): top-1 {accuracy['top1']:.3f}",
                       class_names=train_info.classes)
    exp.finish(results, also=[tsne] if tsne else [])
  return results
