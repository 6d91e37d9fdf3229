"""k-NN as DINO users run it: several k from one search equal separate runs, and a run on
cached features equals the fresh run; the cache is keyed on the checkpoint's parameters."""
import os

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import knn as knn_config
from sit_jax import checkpoint, sharding
from sit_jax.models import vit
from sit_jax.transfer import common, feature_cache, knn


def test_several_k_in_one_search_equal_separate_runs():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(301, 12)).astype(np.float32)
  labels = rng.integers(0, 6, 301)
  test = rng.normal(size=(45, 12)).astype(np.float32)
  mesh = sharding.make_mesh()
  together = knn.knn_scores(train, labels, test, (10, 20, 100, 200), 0.07, 6, mesh=mesh,
                            chunk_size=16)
  assert sorted(together) == [10, 20, 100, 200]
  for k, scores in together.items():
    alone = knn.knn_classify(train, labels, test, k, 0.07, 6, mesh=mesh, chunk_size=16)
    np.testing.assert_allclose(scores, alone, rtol=1e-6)


def test_labels_past_num_classes_are_an_error_not_a_silent_drop():
  """A vote for class >= num_classes would vanish from the scores (benchmarks/learning.py once
  scored 26 letters with num_classes=10); counting the classes gives every label its vote."""
  rng = np.random.default_rng(1)
  train = rng.normal(size=(64, 8)).astype(np.float32)
  labels = np.arange(64) % 16
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match="num_classes=10"):
    knn.knn_classify(train, labels, train[:8], 5, 0.07, 10, mesh=mesh)
  counted = knn.knn_classify(train, labels, train[:8], 1, 0.07, mesh=mesh)
  assert counted.shape == (8, 16)
  np.testing.assert_array_equal(counted.argmax(1), labels[:8])  # each point is its own nearest


def export(directory, seed):
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3)))["params"]
  return checkpoint.export_backbone(directory, {"backbone": jax.tree.map(np.asarray, params)},
                                    {"variant": "Mu/4", "image_size": 16})


def small_config(init):
  c = knn_config.get_config("runlocal")
  c.init = str(init)
  c.data.train_split, c.data.val_split = "train[:600]", "train[600:800]"
  c.baselines, c.tsne_points = False, 0
  return c


def test_cached_features_give_the_fresh_numbers(tmp_path):
  first = export(tmp_path / "a", seed=1)
  workdir = tmp_path / "knn"
  fresh = knn.run(small_config(first), str(workdir))
  assert set(fresh["by_k"]) == {"10", "20", "100", "200"}
  assert fresh["k"] in (10, 20, 100, 200)
  assert fresh["top1"] == fresh["by_k"][str(fresh["k"])]["test"]["top1"]
  assert fresh["k"] == max((10, 20, 100, 200),
                           key=lambda k: (fresh["by_k"][str(k)]["val"]["top1"], -k))
  entries = sorted((workdir / "feature_cache").iterdir())
  assert len(entries) == 3
  stamps = [p.stat().st_mtime_ns for p in entries]

  cached = knn.run(small_config(first), str(workdir))  # a later run on the same checkpoint
  assert [p.stat().st_mtime_ns for p in sorted((workdir / "feature_cache").iterdir())] == stamps
  for key in ("top1", "top5", "k", "by_k"):
    assert cached[key] == fresh[key]

  # Another checkpoint (other parameters): new entries, not the old ones.
  other = knn.run(small_config(export(tmp_path / "b", seed=2)), str(workdir))
  assert len(list((workdir / "feature_cache").iterdir())) == 6
  assert other["by_k"] != fresh["by_k"]


def test_checkpoint_identity_follows_the_parameter_values():
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  params = jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 16, 16, 3)))["params"])
  make = lambda p: common.Backbone(module, p, {"variant": "Mu/4", "image_size": 16}, "/x",
                                   checkpoint_hash=common.parameters_hash(p))
  same = jax.tree.map(np.copy, params)
  moved = jax.tree.map(np.copy, params)
  moved["cls_token"] = moved["cls_token"] + 1e-6
  identity = feature_cache.checkpoint_identity(make(params), 0)
  assert identity == feature_cache.checkpoint_identity(make(same), 0)
  assert identity != feature_cache.checkpoint_identity(make(moved), 0)
  random = common.Backbone(module, None, {"variant": "Mu/4", "image_size": 16}, "")
  assert (feature_cache.checkpoint_identity(random, 0)
          != feature_cache.checkpoint_identity(random, 1))
  # The same parameters computing in bfloat16 give other features than in float32.
  in_dtype = lambda dtype: feature_cache.checkpoint_identity(common.Backbone(
      module, params, {"variant": "Mu/4", "image_size": 16, "dtype": dtype}, "/x",
      checkpoint_hash=common.parameters_hash(params)), 0)
  assert in_dtype("float32") != in_dtype("bfloat16")


@pytest.fixture
def counted_extraction(monkeypatch):
  """split_features without a backbone: each extraction is counted and gives fixed features."""
  calls = []

  def extract(fn, params, batches, mesh, progress):
    calls.append(1)
    return np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(3)

  monkeypatch.setattr(common, "extract_features", extract)
  monkeypatch.setattr(common, "eval_batches", lambda *args: None)
  return calls


def _split_features(config, workdir):
  return feature_cache.split_features(config, str(workdir), "params x", None, None, None,
                                      "test", "cls", 16)


def test_a_cache_hit_counts_only_where_every_process_has_the_entry(tmp_path, monkeypatch,
                                                                     counted_extraction):
  """Extraction is collective: a process that skipped it while another extracts would hang or
  feed the others different arrays (a cache on each host's disk, written by process 0 alone)."""
  config = small_config("")
  _split_features(config, tmp_path)
  _split_features(config, tmp_path)
  assert len(counted_extraction) == 1  # stored, then read
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  found = {}
  monkeypatch.setattr(feature_cache.multihost_utils, "process_allgather",
                      lambda hit: np.array([bool(hit), found["other"]]))
  found["other"] = False
  features, labels = _split_features(config, tmp_path)
  assert len(counted_extraction) == 2
  np.testing.assert_array_equal(labels, np.arange(3))
  found["other"] = True
  _split_features(config, tmp_path)
  assert len(counted_extraction) == 2


def test_a_remote_cache_is_read_and_written_through_epath(tmp_path, monkeypatch,
                                                          counted_extraction):
  """feature_cache=gs://... (or a gs:// workdir) goes to the bucket, not to a local 'gs:' folder."""
  import pathlib
  bucket = tmp_path / "bucket"
  os.makedirs(bucket / "fc")
  monkeypatch.setattr(epath, "Path", lambda p: pathlib.Path(str(p).replace("gs://b", str(bucket))))
  monkeypatch.chdir(tmp_path)
  config = small_config("")
  config.feature_cache = "gs://b/fc"
  _split_features(config, "gs://b/run")
  _split_features(config, "gs://b/run")
  assert len(counted_extraction) == 1
  assert [p.suffix for p in (bucket / "fc").iterdir()] == [".npz"]
  assert not os.path.exists(tmp_path / "gs:")


def test_features_come_in_the_split_order_the_batches_name():
  """Two hosts' batches interleave the split (host 0: 0, 2, 4; host 1: 1, 3, 5 in each global
  batch): the features come out in the split's order, as one process extracts them, so that
  few-shot draws and the probe's held-out rows are the same examples on any number of hosts."""
  mesh = sharding.make_mesh({"data": 8})
  positions = np.array([0, 2, 4, 6, 1, 3, 5, -1])  # the global batch as two hosts give it
  images = np.zeros((8, 2, 2, 3), np.uint8)
  images[:, 0, 0, 0] = np.maximum(positions, 0) * 10
  batch = {"image": images, "label": np.maximum(positions, 0) % 3, "index": positions,
           "mask": positions >= 0}
  features, labels = common.extract_features(
      lambda params, x: x[:, 0, 0, 0].astype(jnp.float32), None, [batch], mesh)
  np.testing.assert_array_equal(features, np.arange(7) * 10.0)
  np.testing.assert_array_equal(labels, np.arange(7) % 3)
