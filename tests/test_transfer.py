"""Transfer: k-NN, linear probe, fine-tuning, layer-wise lr decay, mAP (the runlocal runs are
test_transfer_runlocal.py's)."""
import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common as config_common
from configs import finetune as finetune_config
from configs import segment as segment_config
from configs import transfer_common
from sit_jax import checkpoint, config_check, data, metrics, sharding, transfer
from sit_jax.models import vit
from sit_jax.transfer import common, deit_augment, finetune, knn, linear, supervised

def leaves(tree):
  return {sharding.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


# ---------------------------------------------------------------------------------------------
# k-NN.
# ---------------------------------------------------------------------------------------------


def knn_numpy(train, train_labels, test, k, temperature, num_classes):
  """DINO's weighted k-NN vote, written out on host numpy (also used by test_baselines.py)."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test @ train.T
  scores = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    for j in np.argsort(-sim[i], kind="stable")[:k]:
      scores[i, train_labels[j]] += np.exp(sim[i, j] / temperature)
  return scores


@pytest.mark.parametrize("k", [1, 5, 20, 300])
def test_knn_matches_brute_force_numpy(mesh, k):
  rng = np.random.default_rng(k)
  train = rng.normal(size=(203, 16)).astype(np.float32)
  labels = rng.integers(0, 5, 203)
  test = rng.normal(size=(37, 16)).astype(np.float32)
  # The bank is split over the 8 devices; 37 test features go through in 3 chunks of 16.
  got = knn.knn_classify(train, labels, test, k, 0.07, 5, mesh=mesh, chunk_size=16)
  want = knn_numpy(train, labels, test, k, 0.07, 5)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_checkpoint_metadata_leaves_out_runtime_settings():
  model_config = {"variant": "Mu/4", "image_size": 32, "remat": True, "dtype": "bfloat16",
                  "drop_path_rate": 0.1, "attention": ""}
  backbone = common.Backbone(None, None, model_config, init="/runs/sit")
  meta = common.checkpoint_metadata(ml_collections.ConfigDict({"experiment": "linear"}),
                                    backbone, 10)
  assert meta == {"model": {"variant": "Mu/4", "image_size": 32}, "experiment": "linear",
                  "num_classes": 10}


def test_topk_accuracy():
  scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
  got = common.topk_accuracy(scores, np.array([1, 2, 0]), ks=(1, 2))
  assert got == {"top1": 1 / 3, "top2": 2 / 3}
  # Of 3 classes every label is among the 5 best: no top5 to report.
  assert set(common.topk_accuracy(scores, np.array([1, 2, 0]))) == {"top1"}


def test_topk_ties_share_the_places_left_whatever_the_class_index():
  """k-NN votes leave the classes no neighbour voted for tied at 0: which of them fill the top 5
  must not depend on their index. One class voted for, the label among the 5 tied at 0 (or 9
  tied at 0 of 10): 1 place of top2 among 5 is a hit with probability 1 / 5, 4 of top5 among 9
  with probability 4 / 9, for the first class as for the last."""
  votes = np.zeros((2, 6))
  votes[:, 3] = 1.0
  assert common.topk_accuracy(votes, np.array([0, 5]), ks=(1, 2)) == {"top1": 0.0, "top2": 0.2}
  votes = np.zeros((2, 10))
  votes[:, 7] = 2.0
  got = common.topk_accuracy(votes, np.array([0, 9]))
  assert got == {"top1": 0.0, "top5": pytest.approx(4 / 9)}
  assert common.topk_accuracy(votes, np.array([7, 7])) == {"top1": 1.0, "top5": 1.0}
  # A diverged head's NaN scores are misses, not ties.
  assert common.topk_accuracy(np.full((2, 10), np.nan), np.array([0, 9])) == {"top1": 0.0,
                                                                              "top5": 0.0}


# ---------------------------------------------------------------------------------------------
# mAP.
# ---------------------------------------------------------------------------------------------


def test_map_hand_computed(caplog):
  scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.4, 0.5], [0.7, 0.35, 0.5], [0.6, 0.8, 0.5]])
  targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
  # Class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2. Class 1: ranks 2, 3 -> (1/2 + 2/3) / 2.
  # Class 2 has no positive: left out of the mean, and the log says so.
  assert common.mean_average_precision(scores, targets) == pytest.approx(
      ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
  assert "mAP over 2 of 3 classes: class(es) 2 have no positive among the 4" in caplog.text
  # VOC07 11-point, class 0: recall 0.5 at precision 1 (r = 0..0.5), 1.0 at 2/3 (r = 0.6..1).
  assert common.average_precision(scores[:, 0], targets[:, 0], voc07=True) == pytest.approx(
      (6 * 1 + 5 * 2 / 3) / 11)


def test_map_matches_sklearn_with_ties():
  from sklearn.metrics import average_precision_score
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, (60, 4)).astype(np.float32)  # many ties
  targets = rng.integers(0, 2, (60, 4))
  want = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(4)])
  assert common.mean_average_precision(scores, targets) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Linear probe.
# ---------------------------------------------------------------------------------------------


def probe_config(**optim):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every = 1000
  c.data = dict(global_batch_size=64)
  c.optim = transfer_common.optim_config("adamw", weight_decay=0.0, warmup_epochs=0, **optim)
  return c


@pytest.mark.parametrize("multilabel", [False, True])
def test_linear_probe_solves_separable_problem(mesh, multilabel):
  rng = np.random.default_rng(0)
  centres = rng.normal(scale=4.0, size=(3, 8))
  labels = rng.integers(0, 3, 600)
  feats = (centres[labels] + rng.normal(size=(600, 8))).astype(np.float32)
  targets = np.eye(3, dtype=np.int32)[labels] if multilabel else labels
  c = probe_config(base_lr=0.05)
  head = linear.make_head(3)
  tx = supervised.make_optimizer(c, 0.05)
  state = linear.fit_head(c, head, tx, feats[:500], targets[:500], 3, mesh, total_steps=150,
                          multilabel=multilabel)
  logits = linear.head_logits(state.params, feats[500:])
  if multilabel:
    assert np.mean((logits > 0) == (targets[500:] > 0)) >= 0.99
  else:
    assert np.mean(logits.argmax(1) == labels[500:]) >= 0.99


def test_a_signal_while_a_head_trains_in_memory_is_not_a_result(mesh, monkeypatch):
  """SIGTERM or Ctrl-C during the SGD probe's head: nothing is saved to resume from, so the run
  must not report the half-trained head's figures as the probe's."""
  from sit_jax import checkpoint, experiment
  monkeypatch.setattr(checkpoint, "signalled", lambda: True)
  feats = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  c = probe_config(base_lr=0.05)
  with pytest.raises(experiment.RunError, match="Stopped by a signal at step 1 of the head's 150"):
    linear.fit_head(c, linear.make_head(3), supervised.make_optimizer(c, 0.05), feats,
                    np.arange(64) % 3, 3, mesh, total_steps=150)


def test_sgd_probe_batch_larger_than_the_train_split_is_refused_before_any_work(tmp_path,
                                                                               monkeypatch):
  from configs import linear as linear_config
  c = linear_config.get_config("runlocal")
  c.linear.solver, c.data.train_split, c.data.val_split = "sgd", "train[:24]", ""
  monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
  with pytest.raises(ValueError, match=r"data.global_batch_size=128 is more than the 24 training "
                     r"examples.*--config.data.global_batch_size=24 or less"):
    linear.run(c, str(tmp_path))


def sklearn_digits_features():
  """scikit-learn's 8x8 digits as 64-d features: 1,500 to fit, 297 to score."""
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = x.astype(np.float32) + np.random.default_rng(0).normal(scale=0.5, size=x.shape).astype(
      np.float32)  # no constant pixels, a less separable problem
  return x[:1500], y[:1500], x[1500:], y[1500:]


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_lbfgs_probe_matches_sklearn_logistic_regression(mesh, C):
  from sklearn.linear_model import LogisticRegression
  train, train_labels, test, test_labels = sklearn_digits_features()
  standardize = linear.feature_standardizer(train)
  a, b = standardize(train), standardize(test)
  sk = LogisticRegression(C=C, tol=1e-8, max_iter=20_000).fit(a, train_labels)
  # sklearn minimises C * sum(CE) + ||W||^2 / 2: our mean CE + l2 / 2 ||W||^2 with l2 = 1/(C n).
  l2 = 1.0 / (C * len(a))
  scores, params, _, info = linear.probe_cached(train, train_labels, test, test_labels, 10,
                                                l2=(l2,), mesh=mesh)
  assert info["grad_norm"] < 1e-4 and info["iterations"] < 5000  # converged, not stopped
  assert abs(scores["top1"] - sk.score(b, test_labels)) <= 0.01
  predictions = linear.head_logits(params, b).argmax(1)
  assert np.mean(predictions == sk.predict(b)) >= 0.99
  # The same minimum: our objective at sklearn's weights is no lower than at ours.
  sk_params = {"kernel": sk.coef_.T.astype(np.float32), "bias": sk.intercept_.astype(np.float32)}
  ones = np.ones(len(a), np.float32)
  at_sklearn = float(linear.logistic_objective(sk_params, a, train_labels, ones, l2))
  assert info["loss"] == pytest.approx(at_sklearn, abs=1e-4)


def test_lbfgs_multilabel_matches_per_class_sklearn(mesh):
  from sklearn.linear_model import LogisticRegression
  train, labels, test, test_labels = sklearn_digits_features()
  multi = lambda y: np.stack([y % 2, y >= 5, y == 3], axis=1).astype(np.int32)
  standardize = linear.feature_standardizer(train)
  a, b = standardize(train), standardize(test)
  l2 = 1e-3
  params, info = linear.fit_logistic(a, multi(labels), 3, l2, mesh, multilabel=True)
  assert info["grad_norm"] < 1e-4
  for c in range(3):  # the sigmoid head is one independent logistic regression per class
    sk = LogisticRegression(C=1 / (l2 * len(a)), tol=1e-8, max_iter=20_000).fit(
        a, multi(labels)[:, c])
    ours = linear.head_logits(params, b)[:, c] > 0
    assert np.mean(ours == sk.predict(b).astype(bool)) >= 0.99


def test_lbfgs_few_examples_solved_on_one_device_as_on_the_mesh(mesh, monkeypatch):
  rng = np.random.default_rng(0)
  feats, labels = rng.normal(size=(200, 16)).astype(np.float32), np.arange(200) % 3
  assert linear._solver_mesh(mesh, 200).devices.size == 1
  one, one_info = linear.fit_logistic(feats, labels, 3, 1e-2, mesh)
  monkeypatch.setattr(linear, "MIN_EXAMPLES_PER_DEVICE", 0)
  assert linear._solver_mesh(mesh, 200) is mesh
  sharded, info = linear.fit_logistic(feats, labels, 3, 1e-2, mesh)
  assert info["loss"] == pytest.approx(one_info["loss"], abs=1e-6)
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(sharded[k], one[k], atol=1e-3)


def test_lbfgs_stopped_by_max_iter_says_so(mesh, caplog):
  rng = np.random.default_rng(0)
  feats, labels = rng.normal(size=(64, 8)).astype(np.float32), np.arange(64) % 3
  _, _, _, info = linear.probe_cached(feats, labels, feats, labels, 3, max_iter=2, mesh=mesh)
  assert info["iterations"] == 2 and info["grad_norm"] > 1e-5
  assert "L-BFGS stopped at linear.max_iter=2 with the gradient's norm" in caplog.text


def test_l2_chosen_on_held_out_train_examples_only(mesh):
  from sklearn.linear_model import LogisticRegression
  train, train_labels, test, test_labels = sklearn_digits_features()
  grid = (1e-4, 1e-2, 1.0)
  scores, _, _, info = linear.probe_cached(train, train_labels, test, test_labels, 10, l2=grid,
                                           val_fraction=0.2, seed=3, mesh=mesh)
  # The held-out part, as documented: the first 20% of a seeded shuffle of the train examples.
  order = np.random.default_rng(3).permutation(1500)
  fit, val = order[300:], order[:300]
  standardize = linear.feature_standardizer(train[fit])
  want = {}
  for l2 in grid:
    sk = LogisticRegression(C=1 / (l2 * len(fit)), tol=1e-8, max_iter=20_000).fit(
        standardize(train[fit]), train_labels[fit])
    want[l2] = sk.score(standardize(train[val]), train_labels[val])
  assert info["held_out_examples"] == 300
  for l2 in grid:
    assert info["held_out"][f"{l2:g}"] == pytest.approx(want[l2], abs=0.01)
  best = max(grid, key=lambda v: (info["held_out"][f"{v:g}"], v))
  assert info["l2"] == best
  # The test labels never choose: scrambling them changes the score, not the choice.
  _, _, _, scrambled = linear.probe_cached(train, train_labels, test, test_labels[::-1], 10,
                                           l2=grid, val_fraction=0.2, seed=3, mesh=mesh)
  assert scrambled["l2"] == info["l2"]


def test_augmented_probe_statistics_sample_every_class(mesh, tmp_path):
  # A folder's evaluation pass runs class by class: statistics of its first images would be
  # those of class a alone. The training batches are a shuffled sample of both classes.
  from configs import linear as linear_config
  from PIL import Image
  for name, value in (("a", 20), ("b", 220)):
    (tmp_path / name).mkdir()
    for i in range(8):
      Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name / f"{i}.png")
  c = linear_config.get_config("runlocal")
  c.data.source, c.data.train_split, c.data.image_size = f"folder:{tmp_path}", "train", 8
  c.data.global_batch_size = c.linear.stats_examples = c.eval_batch_size = 8
  standardize = linear.training_feature_standardizer(c, common.raw_pixel_features, None, mesh, 8,
                                                     16)
  a, b = (np.asarray(common.raw_pixel_features(None, np.full((1, 8, 8, 3), v, np.uint8)))
          for v in (20, 220))
  assert (standardize(a) < -0.1).all() and (standardize(b) > 0.1).all()


def test_probe_step_leaves_backbone_bit_identical(mesh):
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  backbone = common.Backbone(module, None, {}, "")
  params = common.place_backbone(backbone, mesh, config_common.REPLICATED)
  before = leaves(jax.device_get(params))
  fn = common.make_feature_fn(module, "cls+mean", last_blocks=2)
  head = linear.make_head(4)
  tx = supervised.make_optimizer(probe_config(base_lr=0.1), 0.1)
  state = linear.init_head_state(head, tx, common.feature_dim(module, "cls+mean", 2),
                                 jax.random.PRNGKey(0))
  head_before = leaves(jax.device_get(state.params))
  step = linear.make_probe_step(fn, head, tx, 4)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({"image": rng.integers(0, 256, (16, 16, 16, 3), np.uint8),
                                 "label": rng.integers(0, 4, 16).astype(np.int32)}, mesh)

  # No gradient reaches the backbone through the probe's loss.
  grads = jax.jit(jax.grad(lambda p: step(state, p, batch)[1]["loss"]))(params)
  assert all(not np.any(g) for g in leaves(grads).values())

  jitted = jax.jit(step, donate_argnums=(0,))
  for _ in range(3):
    state, _ = jitted(state, params, batch)
  after = leaves(jax.device_get(params))
  assert before.keys() == after.keys()
  assert all(np.array_equal(before[k], after[k]) for k in before)
  assert any(not np.array_equal(head_before[k], v)
             for k, v in leaves(jax.device_get(state.params)).items())


def test_last_blocks_features_are_normed_block_cls(mesh):
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  one = jax.jit(common.make_feature_fn(module, "cls", 1))(params, images)
  three = jax.jit(common.make_feature_fn(module, "cls+mean", 3))(params, images)
  assert three.shape == (2, common.feature_dim(module, "cls+mean", 3)) == (2, 4 * 96)
  out = jax.jit(module.apply)({"params": params}, images)
  np.testing.assert_allclose(three[:, 2 * 96:3 * 96], one, atol=1e-5)  # the last block's CLS
  np.testing.assert_allclose(three[:, 3 * 96:], out["patches"].mean(1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuning.
# ---------------------------------------------------------------------------------------------


def test_finetune_starts_from_checkpoint_and_moves(mesh, exported_backbone):
  path, exported = exported_backbone
  c = finetune_config.get_config("runlocal")
  c.init = path
  c.data.image_size = 16  # 8x8 -> 4x4 patch grid: the position embedding is resized.
  c.augment.randaugment = False  # compiles slowly; the finetune runlocal run covers it.
  backbone = common.load_backbone(c, image_size=16)
  assert backbone.model_config["variant"] == "Mu/4" and backbone.pretrained_image_size == 32
  pos = backbone.params["pos_embed"]
  assert pos.shape == (1, 1 + 16, 96)
  np.testing.assert_array_equal(pos[:, 0], exported["pos_embed"][:, 0])
  np.testing.assert_allclose(
      pos, vit.resize_pos_embed(exported["pos_embed"], (4, 4)), atol=1e-6)

  model = finetune.Classifier(backbone.module, 10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 16, 16, 3)))["params"])
  lr = supervised.lr_schedule(c, 100, 10)
  tx = supervised.make_optimizer(c, lr, abstract, 4)
  state, shardings = finetune.create_state(model, tx, 16, mesh, c.sharding_rules,
                                           jax.random.PRNGKey(0), backbone.params)
  loaded = leaves(backbone.params)
  start = leaves(jax.device_get(state.params["backbone"]))
  assert loaded.keys() == start.keys()
  assert all(np.array_equal(loaded[k], start[k]) for k in loaded)
  exported = leaves(exported)
  assert all(np.array_equal(loaded[k], exported[k]) for k in loaded if k != "pos_embed")

  step = jax.jit(finetune.make_finetune_step(c, model, tx, 10, lr=lr),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  for i in range(3):
    batch = {"image": rng.integers(0, 256, (32, 16, 16, 3), np.uint8),
             "label": rng.integers(0, 10, 32).astype(np.int32)}
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 3
  end = leaves(jax.device_get(state.params["backbone"]))
  changed = [k for k in loaded if not np.array_equal(loaded[k], end[k])]
  assert "blocks_0/attn/qkv/kernel" in changed and len(changed) > len(loaded) // 2


def test_finetune_on_fewer_images_than_a_batch_says_so(tmp_path, monkeypatch, caplog):
  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop

  c = finetune_config.get_config("runlocal")
  c.data.train_split, c.data.val_split = "train[:24]", ""
  monkeypatch.setattr(common, "load_backbone", stop)  # the line comes before any work
  with pytest.raises(Stop):
    finetune.run(c, str(tmp_path))
  assert ("embedded:digits/train[:24] has 24 images, fewer than data.global_batch_size 64: "
          "every batch holds images more than once, and an epoch of the schedule "
          "(total_epochs, optim.warmup_epochs) is one step, 2.7 passes") in caplog.text


def test_finetune_state_is_created_only_when_not_resuming(tmp_path, monkeypatch):
  # A resumed run restores onto `abstract` and never calls init: a fresh state built before
  # the loop would stay on the device beside the restored one for the whole run.
  from sit_jax import trainer

  class Stop(Exception):
    pass

  def live_bytes():
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())

  def fake_train(exp, *, init, abstract, **kwargs):
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert live_bytes() - before < state_bytes / 2
    state = init()
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state) == \
        jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), abstract)
    raise Stop

  monkeypatch.setattr(trainer, "train", fake_train)
  c = finetune_config.get_config("runlocal")
  before = live_bytes()
  with pytest.raises(Stop):
    finetune.run(c, str(tmp_path))


def test_load_backbone_from_pretraining_workdir(tmp_path, exported_backbone, caplog):
  _, params = exported_backbone
  state = {"step": np.int32(7), "params": {"backbone": params, "recon_head": {"w": np.ones(3)}}}
  with checkpoint.Checkpointer(tmp_path / "checkpoints", every=7, async_save=False) as ckpt:
    assert ckpt.save(7, state, metadata={"model": {"variant": "Mu/4", "image_size": 32}})
  c = finetune_config.get_config("runlocal")
  c.init = str(tmp_path)
  c.model.variant = "S/16"
  assert c.model.standardize_input  # runlocal's random init; this checkpoint was saved without
  backbone = common.load_backbone(c, image_size=32)
  got = leaves(backbone.params)
  assert all(np.array_equal(got[k], v) for k, v in leaves(params).items())
  assert not backbone.module.standardize_input
  ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
  assert [m.split(":")[0] for m in ignored] == ["config.model.standardize_input=True ignored",
                                                "config.model.variant=S/16 ignored"]
  # The checkpoint's patch (4) decides which sizes fit; config_check cannot see it.
  with pytest.raises(ValueError, match=r"^data.image_size=18 does not fit the Mu/4 backbone of "):
    common.load_backbone(c, image_size=18)
  # A run says so before it writes its workdir, from the step's metadata (no array read).
  c.data.image_size = 18
  with pytest.raises(ValueError, match=r"^data.image_size=18 does not fit the Mu/4 backbone of "):
    transfer.run(c, str(tmp_path / "finetune"))
  assert not (tmp_path / "finetune").exists()
  # results.json names the step the workdir's latest checkpoint was (a pretraining that goes on
  # moves it) and the classes; an export has no step.
  info = data.DatasetInfo(12, 3, "folder:/x/train", classes=("ant", "bee", "cat"))
  results = common.results_dict(c, backbone, info, info, 4, {})
  assert (results["init_checkpoint"], results["init_step"]) == (
      str(tmp_path / "checkpoints" / "7"), 7)
  assert (results["num_classes"], results["classes"]) == (3, ["ant", "bee", "cat"])
  # An export's step is the one its export.json records (a pretraining's end).
  c.init = checkpoint.export_backbone(tmp_path / "export", {"backbone": params},
                                      {"variant": "Mu/4", "image_size": 32}, origin={"step": 7})
  results = common.results_dict(c, common.load_backbone(c, image_size=32), info, info, 4, {})
  assert (results["init_checkpoint"], results["init_step"]) == (c.init, 7)
  c.init = str(exported_backbone[0])
  results = common.results_dict(c, common.load_backbone(c, image_size=32), info, info, 4, {})
  assert (results["init_checkpoint"], results["init_step"]) == (str(exported_backbone[0]), None)


def test_layer_decay_factors_and_updates():
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  model = finetune.Classifier(module, 3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  factors = leaves(supervised.lr_decay_tree(params, depth=4, decay=0.5))
  assert factors["head/fc/kernel"] == 1.0 and factors["backbone/norm/scale"] == 1.0
  assert factors["backbone/blocks_3/mlp/fc1/kernel"] == 0.5
  assert factors["backbone/blocks_0/attn/qkv/kernel"] == 0.5 ** 4
  assert factors["backbone/pos_embed"] == factors["backbone/patch_embed/kernel"] == 0.5 ** 5

  # One AdamW step with unit gradients and no weight decay moves every weight by exactly lr
  # times its factor.
  c = ml_collections.ConfigDict({"optim": transfer_common.optim_config(
      "adamw", weight_decay=0.0, layer_decay=0.5)})
  c.optim.eps = 1e-12
  tx = supervised.make_optimizer(c, 0.1, params, depth=4)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  updates = leaves(updates)
  for name, factor in factors.items():
    np.testing.assert_allclose(updates[name], -0.1 * factor, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# On-device augmentation.
# ---------------------------------------------------------------------------------------------


def test_mixup_cutmix_targets_and_lam():
  images = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3))
  targets = supervised.soft_targets(jnp.arange(8) % 4, 4, 0.1)
  mix = jax.jit(deit_augment.mixup_cutmix, static_argnames=("prob",))
  for seed in range(6):
    mixed, mixed_targets, lam = mix(jax.random.PRNGKey(seed), images, targets)
    assert mixed.shape == images.shape and 0.0 <= float(lam) <= 1.0
    np.testing.assert_allclose(mixed_targets.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1],
                               atol=1e-6)
  same, _, lam = mix(jax.random.PRNGKey(0), images, targets, prob=0.0)
  assert float(lam) == 1.0 and np.array_equal(same, images)


def test_multilabel_finetune_step_honours_label_smoothing_and_mixup():
  # The step's loss on multi-hot targets, against optax's sigmoid cross-entropy of the targets
  # smoothed by hand (timm's BinaryCrossEntropy: 1 - s + s / C, s / C) and mixed by
  # mixup_cutmix with the step's key. A linear model on the pixels keeps it fast.
  import flax.linen as nn
  import optax
  from configs import multilabel as multilabel_config

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, images, *, train=False):
      return nn.Dense(5, kernel_init=nn.initializers.normal(0.1))(images.reshape(len(images), -1))

  c = multilabel_config.get_config("runlocal")
  c.augment.randaugment = False
  model, tx = Linear(), optax.sgd(0.1)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"]
  state = supervised.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=jax.random.PRNGKey(2))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (6, 8, 8, 3), np.uint8),
           "label": (rng.random((6, 5)) < 0.4).astype(np.int32)}
  images = common.to_input(batch["image"])  # no RandAugment, no erasing
  k_mix = jax.random.split(jax.random.fold_in(state.rng, 0), 3)[1]
  for smoothing, mixup in ((0.0, 0.0), (0.2, 0.0), (0.0, 0.8)):
    c.augment.label_smoothing, c.augment.mixup_alpha = smoothing, mixup
    _, metrics_ = finetune.make_finetune_step(c, model, tx, 5, multilabel=True)(state, batch)
    targets = jnp.asarray(batch["label"] * (1 - smoothing) + smoothing / 5, jnp.float32)
    mixed, targets, _ = deit_augment.mixup_cutmix(
        k_mix, images, targets, mixup_alpha=mixup, cutmix_alpha=0.0,
        prob=c.augment.mix_prob, switch_prob=c.augment.switch_prob)
    want = optax.sigmoid_binary_cross_entropy(model.apply({"params": params}, mixed),
                                              targets).mean()
    np.testing.assert_allclose(float(metrics_["loss"]), float(want), rtol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_transfer_train_batches_flip_switch(flip):
  # Digits are not mirror-symmetric: the runlocal fine-tuning turns flips off. With the crop
  # off too, each host image is then exactly the evaluation view of a train digit.
  assert not finetune_config.get_config("runlocal").data.flip
  c = finetune_config.get_config("runlocal")
  c.data.flip, c.data.crop_scale, c.data.image_size = flip, (1.0, 1.0), 16
  eval_images = next(data.eval_iterator(
      c.data.source, c.data.train_split, global_batch_size=2000, image_size=16,
      resize_mode="resize", process_index=0, process_count=1))["image"]
  known = {x.tobytes() for x in eval_images}
  mirrored = {x[:, ::-1].tobytes() for x in eval_images} - known
  batch = next(common.train_batches(c, 0, 16))
  got = [x.tobytes() for x in batch["image"]]
  assert all(g in known or g in mirrored for g in got)
  assert any(g in mirrored for g in got) == flip


def test_rand_augment_and_erasing_shapes_and_ranges():
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
  out = jax.jit(deit_augment.rand_augment)(jax.random.PRNGKey(1), images)
  assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert not np.allclose(out, images)
  erase = jax.jit(deit_augment.random_erasing, static_argnums=(2,))
  assert np.array_equal(erase(jax.random.PRNGKey(2), images, 0.0), images)
  erased = erase(jax.random.PRNGKey(2), images, 1.0)
  changed = np.any(np.asarray(erased) != np.asarray(images), axis=-1).mean(axis=(1, 2))
  assert np.all(changed > 0) and np.all(changed <= 1 / 3 + 0.1)


# ---------------------------------------------------------------------------------------------
# Multi-label data (the data.py addition).
# ---------------------------------------------------------------------------------------------


def test_multilabel_labels():
  it = data.eval_iterator("embedded:digits_multilabel", "test", global_batch_size=256,
                          image_size=32, process_index=0, process_count=1)
  assert it.info.multilabel and it.info.num_classes == 12
  batch = next(it)
  digits = data.embedded_digits()[1][data.DIGITS_TRAIN:][:256]
  np.testing.assert_array_equal(batch["label"][:, :10].argmax(1), digits)
  np.testing.assert_array_equal(batch["label"][:, 10], digits % 2)
  np.testing.assert_array_equal(batch["label"][:, 11], digits >= 5)
  batch = next(it)  # the last batch is padded: 297 - 256 = 41 real examples
  assert batch["label"].shape == (256, 12) and np.all(batch["label"][41:] == -1)

  class Builder:  # a voc/2007-like feature spec: 'labels' is a Sequence(ClassLabel)
    class info:
      features = {"labels": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=4))}

  label_of, num_classes, multilabel, path = data._tfds_labels(Builder)
  assert (num_classes, multilabel, path) == (4, True, ("labels",))
  np.testing.assert_array_equal(label_of(np.array([1, 3, 1])), [0, 1, 0, 1])
  np.testing.assert_array_equal(label_of(np.zeros([0], np.int64)), [0, 0, 0, 0])


def test_transfer_splits_are_held_out_before_any_work(tmp_path):
  """An image folder without a test/ folder cannot be scored as its own test split, and the
  validation and test slices may not overlap: the error names the keys, before any backbone."""
  from configs import knn as knn_config
  from PIL import Image
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    for i in range(5):
      Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
  c = knn_config.get_config("runlocal")
  c.data.source = f"folder:{tmp_path}"
  with pytest.raises(data.SplitNotFound, match=r"data.test_split='test': .*split 'test' read as "
                     r"the whole folder.* --config.data.val_split='train\[70%:85%\]'"):
    common.dataset_infos(c)
  c.data.train_split, c.data.val_split, c.data.test_split = "train[:60%]", "train[60%:80%]", \
      "train[70%:]"
  with pytest.raises(data.DataError, match=r"data.test_split \(.*\) holds 1 of the 2 images of "
                     r"data.val_split"):
    common.dataset_infos(c)
  c.data.test_split = "train[95%:]"  # none of the 10 images: the line names the key
  with pytest.raises(data.DataError, match=r"^data.test_split='train\[95%:\]': split .* selects "
                     r"no examples of the split's 10: widen the slice\.$"):
    common.dataset_infos(c)
  c.data.test_split = "train[80%:]"
  train, test = common.dataset_infos(c)
  assert (train.num_examples, test.num_examples, train.classes) == (6, 2, ("a", "b"))

  # A folder with train/ and test/ but no val/: the line proposes its own test/ folder, and a
  # validation slice of train that keeps it, not three slices of train that would leave it out.
  split_folder = tmp_path / "splits"
  for split in ("train", "test"):
    for name in ("a", "b"):
      shutil.copytree(tmp_path / name, split_folder / split / name)
  c = knn_config.get_config()  # test_split 'validation' (val/), as the paper's configs
  c.data.source = f"folder:{split_folder}"
  with pytest.raises(data.SplitNotFound, match=r"split folders are test, train\. "
                     r"--config.data.test_split=test reads its test/ folder\.$"):
    common.dataset_infos(c)
  c.data.val_split, c.data.test_split = "val", "test"
  with pytest.raises(data.SplitNotFound, match=r"data.val_split='val': .* "
                     r"--config.data.train_split='train\[:85%\]' "
                     r"--config.data.val_split='train\[85%:\]'\.$"):
    common.dataset_infos(c)


def test_tfds_class_names_are_recorded_as_a_folders_are():
  """results.json names a TFDS dataset's classes by its ClassLabel's names (tfds' metadata, no
  download), as it names a folder's by its class folders; the names a ClassLabel makes up from
  its number of classes ('0', '1', ...: cifar10's mock metadata) are not recorded."""
  from configs import knn as knn_config
  c = knn_config.get_config("runlocal")
  c.data.train_split, c.data.val_split, c.data.test_split = "train[:50%]", "", "train[50%:]"
  backbone = common.load_backbone(c, image_size=16)  # random init: a module, no parameters
  for source, want in (("tfds:cats_vs_dogs", ["cat", "dog"]), ("tfds:cifar10", None)):
    c.data.source = source
    with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: [{}] * 4):
      train, test = common.dataset_infos(c)
    assert common.results_dict(c, backbone, train, test, 2, {}).get("classes") == want


def test_augmented_probe_on_tfds_names_the_classes_its_first_epoch_did_not_read(
    tmp_path, monkeypatch, caplog):
  """A TFDS split's labels are in its records: the augmented probe reads them once an epoch,
  so the check of classes missing from the train split takes the first epoch's labels; a run
  resumed past it (its stream counts none) or that read no batch has none to check."""
  from configs import linear as linear_config
  from sit_jax import trainer
  examples = [dict(image=np.full((8, 8, 3), 10 * i, np.uint8), label=0) for i in range(20)]

  def first_epoch(exp, *, batches, total_steps, **kwargs):
    stream = batches(0)
    for _ in range(3):  # 20 cats (no dog), 8 a batch: the first epoch is 3 batches
      next(stream)
    return trainer.Outcome(None, 3, 0, total_steps, {}, {}, None, 0.0)

  monkeypatch.setattr(trainer, "train", first_epoch)
  monkeypatch.setattr(common, "place_backbone", lambda *args: None)  # not read: a compile less
  c = linear_config.get_config("runlocal")
  c.data.source, c.data.image_size, c.data.global_batch_size = "tfds:cats_vs_dogs", 16, 8
  c.data.train_split, c.data.val_split, c.data.test_split = "train[:50%]", "", "train[50%:]"
  c.linear.cache_features, c.baselines, c.tsne_points = False, False, 0
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    results = linear.run(c, str(tmp_path))
  assert results["classes_missing_from_train"] == ["dog"]
  assert "has no example of 1 of its 2 classes (dog)" in caplog.text

  info = data.DatasetInfo(20, 2, "tfds:cats_vs_dogs/train[:50%]", classes=("cat", "dog"))
  resumed = type("Stream", (), {"first_epoch_class_counts": None})()
  assert common.first_epoch_class_counts(info, resumed) is None
  assert common.first_epoch_class_counts(info, None) is None


def test_blocks_past_a_loaded_backbones_depth_name_their_key():
  """A checkpoint brings its own depth, so config_check cannot see these: the line names the key."""
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  with pytest.raises(ValueError, match=r"^head.last_blocks=5 must be within 1..4"):
    common.make_feature_fn(module, "cls", last_blocks=5)
  with pytest.raises(ValueError, match=r"^seg.blocks=\(2, 5\) names blocks outside 1..4"):
    common.make_patch_fn(module, blocks=(2, 5))
  with pytest.raises(ValueError, match=r"^head.features='mean' with head.last_blocks=2: .*"
                     r"--config.head.last_blocks=1"):
    common.make_feature_fn(module, "mean", last_blocks=2)
  # That one is the config's alone: the command line says it before any work.
  config = config_check.load("configs/linear.py:runlocal")  # head.last_blocks 4
  config.head.features = "mean"
  with pytest.raises(config_check.ConfigError, match=r"^config.head.features='mean' with "
                     r"head.last_blocks=4: .* --config.head.last_blocks=1.$"):
    config_check.check(config)
  # Keys a protocol does not read are not in its config, so setting one is an error, not a
  # silent no-op: fine-tuning's head reads the last block, segmentation its seg.* tokens.
  for spec, key in (("finetune.py:runlocal", "head.last_blocks"),
                    ("multilabel.py:runlocal", "head.last_blocks"),
                    ("segment.py:runlocal", "head.features")):
    with pytest.raises(config_check.ConfigError, match=rf"^Unknown config key {key}"):
      config_check.check_key(config_check.load(f"configs/{spec}"), key)
  config_check.check_key(config_check.load("configs/multilabel.py:runlocal,frozen=True"),
                         "head.last_blocks")


# ---------------------------------------------------------------------------------------------
# Resume after a preemption (in process: SIGTERM after a step's progress line, then the same
# config again, its programs from the compilation cache).
# ---------------------------------------------------------------------------------------------


def run_stopped_after(step, config, workdir, monkeypatch):
  """transfer.run(config, workdir), with a SIGTERM once `step`'s progress line is written."""
  write_scalars = metrics.MetricWriter.write_scalars

  def preempt(writer, at, scalars, **kwargs):
    write_scalars(writer, at, scalars, **kwargs)
    if at == step and "loss" in scalars:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # Python runs the handler at the next bytecode boundary.

  with monkeypatch.context() as patch:
    patch.setattr(metrics.MetricWriter, "write_scalars", preempt)
    return transfer.run(config, str(workdir))


def rows(workdir):
  """metrics.jsonl without its timings."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_sec", "eta")}
            for line in f]


def test_finetune_resumed_after_sigterm_equals_the_uninterrupted_run(tmp_path, exported_backbone,
                                                                     monkeypatch):
  """Mixup/CutMix, random erasing, label smoothing and drop path draw from the step's key, the
  lr follows warmup-cosine with layer decay, and the data order goes on mid-epoch: stopped after
  step 5 of 6 and started again, every step's loss and the final figures are bit-identical.
  (RandAugment draws from the same key; it is left off for its compile time.)"""
  c = finetune_config.get_config("runlocal")
  c.init = exported_backbone[0]
  c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 6, 1, 4, 3
  # 2 steps an epoch: step 5 starts the third epoch, step 6 (after the resume) goes on in it.
  c.data.train_split, c.data.val_split = "train[:40]", "train[40:56]"
  c.data.test_split = "test[:16]"
  c.data.global_batch_size = c.eval_batch_size = 16
  c.augment = transfer_common.deit_augment_config(randaugment=False)  # runlocal's is off
  c.model.drop_path_rate, c.optim.layer_decay, c.optim.warmup_epochs = 0.1, 0.75, 0.0

  full = transfer.run(c, str(tmp_path / "full"))
  stopped = run_stopped_after(5, c, tmp_path / "stopped", monkeypatch)
  assert stopped["preempted"] and not stopped["complete"] and stopped["steps"] == 5
  # Its figures are the validation of step 3, the last one it did; no test split.
  step_3 = rows(tmp_path / "full")[2]
  assert stopped["figures"] == {k: step_3[k] for k in ("val/top1", "val/top5")}
  assert "top1" not in stopped
  assert os.listdir(tmp_path / "stopped" / "checkpoints") == ["5"]  # keep_checkpoints=1
  # Resumed on another machine: the workdir and the backbone it started from copied elsewhere.
  shutil.copytree(tmp_path / "stopped", tmp_path / "moved" / "stopped")
  c.init = str(shutil.copytree(exported_backbone[0], tmp_path / "moved" / "backbone"))
  resumed = transfer.run(c, str(tmp_path / "moved" / "stopped"))

  assert rows(tmp_path / "moved" / "stopped") == rows(tmp_path / "full")
  losses = [r["loss"] for r in rows(tmp_path / "full")]
  assert len(set(losses)) == 6 and np.isfinite(losses).all()
  assert [r["step"] for r in rows(tmp_path / "full") if "val/top1" in r] == [3, 6]
  assert not resumed["preempted"] and resumed["complete"] and resumed["steps_this_run"] == 1
  differ = {k for k in full if full[k] != resumed[k]}
  assert differ == {"checkpoint", "init", "init_checkpoint", "steps_this_run", "seconds_this_run"}
  with open(tmp_path / "moved" / "stopped" / "results.json") as f:
    assert json.load(f) == resumed


def test_a_frozen_backbone_resumes_moved_and_is_refused_when_its_pretraining_moved_on(
    tmp_path, exported_backbone, monkeypatch):
  """A segmentation head (as a linear probe's) is saved without the backbone it was trained
  on: each start reads config.init again. A pretraining workdir that saved a step since would
  silently put other features under the head: the resume is refused naming both steps. The
  same parameters read from anywhere else (the pretraining and the run copied to another disk)
  resume."""
  _, params = exported_backbone
  pretraining = tmp_path / "pretraining"

  def pretrain_until(step, scale):
    state = {"step": np.int32(step),
             "params": {"backbone": jax.tree.map(lambda x: x * scale, params)}}
    with checkpoint.Checkpointer(pretraining / "checkpoints", every=1, keep=2,
                                 async_save=False) as ckpt:
      assert ckpt.save(step, state, metadata={"model": {"variant": "Mu/4", "image_size": 32}})

  pretrain_until(1, 1.0)
  c = segment_config.get_config("runlocal")
  c.init = str(pretraining)
  c.total_steps, c.log_every, c.eval_every, c.seg.lr_scales = 2, 1, 0, (1.0,)
  first = run_stopped_after(1, c, tmp_path / "seg", monkeypatch)
  assert first["preempted"] and first["step"] == 1

  pretrain_until(2, 0.5)
  with pytest.raises(checkpoint.CheckpointError) as e:
    transfer.run(c, str(tmp_path / "seg"))
  message = str(e.value)
  assert "\n" not in message
  assert (f"trained on the frozen backbone of {pretraining}/checkpoints/1, and "
          f"{pretraining}/checkpoints/2 holds other parameters") in message
  # What it says to do resumes, from copies of both workdirs elsewhere.
  moved = tmp_path / "moved"
  shutil.copytree(pretraining, moved / "pretraining")
  shutil.copytree(tmp_path / "seg", moved / "seg")
  c.init = str(moved / "pretraining" / "checkpoints" / "1")
  resumed = transfer.run(c, str(moved / "seg"))
  assert resumed["step"] == 2 and resumed["steps_this_run"] == 1 and "mIoU" in resumed
