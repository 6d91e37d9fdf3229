"""DINO's weighted k-NN classifier on l2-normalised frozen features.

For a test feature q: similarities s_i = q . x_i with every train feature x_i, the k largest
(s_j, y_j), weights exp(s_j / T), and the score of class c = sum of the weights of the neighbours
labelled c. The train bank is split over all devices of the mesh: each device takes the top k of
its own shard, the k * devices candidates are gathered, and the top k of those is the answer.
Test features go through in chunks, so memory is O(chunk * bank / devices) per device.
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
from sit_jax.transfer import common


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


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _vote(values, neighbour_labels, temperature, num_classes):
  weights = jnp.exp(values / temperature)  # exp(-inf) = 0 for padding rows
  return jnp.einsum("nk,nkc->nc", weights, jax.nn.one_hot(neighbour_labels, num_classes))


def knn_classify(train_feats, train_labels, test_feats, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, *, mesh=None, chunk_size: int = 1024):
  """Class scores (num_test, num_classes) of DINO's weighted k-NN vote; argmax is the prediction.

  Features are l2-normalised here. `mesh` (default: all devices) holds the train bank split over
  its devices; test features are processed `chunk_size` at a time.
  """
  train_feats, test_feats = l2_normalize(train_feats), l2_normalize(test_feats)
  train_labels = np.asarray(train_labels)
  if num_classes is None:
    num_classes = int(train_labels.max()) + 1
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  bank, labels = _bank_on_mesh(train_feats, train_labels, mesh, k)
  topk = _make_topk(mesh, k)
  vote = functools.partial(_vote, temperature=temperature, num_classes=num_classes)
  scores = []
  for lo in range(0, len(test_feats), chunk_size):
    chunk = test_feats[lo:lo + chunk_size]
    padded = np.zeros((chunk_size, chunk.shape[1]), np.float32)
    padded[:len(chunk)] = chunk
    values, neighbour_labels = topk(jax.device_put(padded, sharding.replicated(mesh)), bank,
                                    labels)
    scores.append(np.asarray(vote(values, neighbour_labels))[:len(chunk)])
  return np.concatenate(scores)


def run(config, workdir: str) -> dict:
  """Features of the train and test splits with the frozen backbone, k-NN scores, results; with
  config.baselines the same k-NN on raw pixels and on the backbone at random init."""
  from sit_jax import metrics

  start = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh)
  train_info, test_info = common.dataset_infos(config)
  common.check_multilabel(train_info, False)
  size = config.data.image_size
  backbone = common.load_backbone(config, image_size=size, drop_path_rate=0.0)
  params = common.place_backbone(backbone, mesh, config.sharding_rules, config.seed)
  fn = common.make_feature_fn(backbone.module, config.head.features, config.head.last_blocks)

  def evaluate(train_feats, train_labels, test_feats, test_labels):
    scores = knn_classify(train_feats, train_labels, test_feats, config.knn.k,
                          config.knn.temperature, train_info.num_classes, mesh=mesh,
                          chunk_size=config.knn.chunk_size)
    return common.topk_accuracy(scores, test_labels)

  train_feats, train_labels, test_feats, test_labels = common.split_features(
      config, common.uint8_features(fn), params, mesh, size)
  logging.info("k-NN: %d train, %d test features of dimension %d", len(train_feats),
               len(test_feats), train_feats.shape[1])
  accuracy = evaluate(train_feats, train_labels, test_feats, test_labels)
  writer = metrics.MetricWriter(workdir, total_steps=0, global_batch_size=config.eval_batch_size)
  writer.write_json("config.json", config.to_dict())
  writer.write_scalars(0, {f"knn/{k}": v for k, v in accuracy.items()})

  extra = {}
  if config.get("baselines", False):
    baselines = {}
    for name, (base_fn, base_params) in common.baseline_extractors(config, backbone, mesh,
                                                                   fn).items():
      feats = common.split_features(config, base_fn, base_params, mesh, size, f"{name}: ")
      baselines[name] = {**evaluate(*feats), "dim": int(feats[0].shape[1])}
    if "random_init" not in baselines:  # the evaluated backbone is the random init
      baselines["random_init"] = {**accuracy, "dim": int(train_feats.shape[1])}
    writer.write_scalars(0, {f"baselines/{name}/{k}": v for name, row in baselines.items()
                             for k, v in row.items() if k != "dim"})
    common.log_baselines("k-NN", common.dataset_name(config), backbone.init, accuracy,
                         baselines)
    extra["baselines"] = baselines

  results = common.results_dict(config, backbone, train_info, test_info, len(test_labels),
                                accuracy, k=config.knn.k, temperature=config.knn.temperature,
                                **extra, seconds=time.perf_counter() - start)
  writer.write_json("results.json", results)
  writer.close()
  common.tsne(config, workdir, test_feats, test_labels,
              f"k-NN {results['dataset']} ({results['init']}): top-1 {accuracy['top1']:.3f}")
  return results
