"""Few-shot ridge regression: the closed form against numpy's least squares, the shot sampling,
the l2 chosen on validation, and a run whose cached features give the fresh run's numbers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fewshot as fewshot_config
from sit_jax import checkpoint
from sit_jax.models import vit
from sit_jax.transfer import common, fewshot


def lstsq_ridge(x, labels, l2, num_classes):
  """The same ridge regression as an ordinary least-squares problem for numpy: the design
  [x, 1] stacked over sqrt(l2) [I, 0] (no penalty on the bias), targets 2 one-hot - 1 over 0."""
  n, d = x.shape
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  design = np.block([[x, np.ones((n, 1))], [np.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
  targets = np.concatenate([y, np.zeros((d, num_classes))])
  solution = np.linalg.lstsq(design, targets, rcond=None)[0]
  return solution[:d], solution[d]


@pytest.mark.parametrize("n, d", [(30, 16), (24, 40)])  # more examples than dimensions, and fewer
def test_ridge_equals_numpy_least_squares(n, d):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  labels = rng.integers(0, 4, n)
  l2s = (1e-2, 0.5, 8.0)
  w, b = fewshot.ridge_solutions(jnp.asarray(x, jnp.float32), jnp.asarray(labels), l2s, 4)
  for i, l2 in enumerate(l2s):
    want_w, want_b = lstsq_ridge(x, labels, l2, 4)
    np.testing.assert_allclose(np.asarray(w[i]), want_w, atol=2e-4, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(b[i]), want_b, atol=2e-4, rtol=2e-3)


def test_shots_per_class_are_distinct_and_reproducible():
  labels = np.repeat(np.arange(5), 20)
  labels[:3] = 4  # class 0 keeps 17 examples
  a = fewshot.sample_shots(labels, 10, seed=3, num_classes=5)
  assert np.array_equal(a, fewshot.sample_shots(labels, 10, seed=3, num_classes=5))
  assert not np.array_equal(a, fewshot.sample_shots(labels, 10, seed=4, num_classes=5))
  assert len(set(a.tolist())) == 50 and np.bincount(labels[a]).tolist() == [10] * 5
  # A class with fewer examples than shots gives all it has.
  assert np.bincount(labels[fewshot.sample_shots(labels, 18, 0, 5)]).tolist() == [17] + [18] * 4


# The fewest train images of a class in each recipe's shot pool, from the datasets' published
# sizes: flowers' train split holds 10 of each class, ImageNet's smallest class 732 (of which
# train[:10%] keeps about 73), pets' 93-100 per class (train[:90%]), the 1,200 digits 111.
FEWEST_PER_CLASS = {"imagenet2012": 60, "cifar10": 4800, "cifar100": 450, "stl10": 420,
                    "oxford_flowers102": 10, "oxford_iiit_pet": 75, "digits": 111}


def test_each_recipes_shots_fit_its_train_split():
  assert set(FEWEST_PER_CLASS) == set(fewshot_config.RECIPES)
  for dataset, fewest in FEWEST_PER_CLASS.items():
    c = fewshot_config.get_config("runlocal" if dataset == "digits" else f"dataset={dataset}")
    assert max(c.fewshot.shots) <= fewest, (dataset, c.fewshot.shots)


def test_l2_is_chosen_on_validation_and_test_scored_at_it():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 8))
  make = lambda n: (np.repeat(np.arange(3), n),
                    np.repeat(centres, n, axis=0) + rng.normal(size=(3 * n, 8)))
  (ty, tx), (vy, vx), (sy, sx) = make(30), make(20), make(20)
  rows = fewshot.evaluate(tx, ty, vx, vy, sx, sy, shots_list=(5,), seeds=3,
                          l2s=(1e-3, 1.0, 1e3), num_classes=3)
  row = rows["5shot"]
  assert row["l2"] == max((1e-3, 1.0, 1e3), key=lambda v: (row["val_by_l2"][f"{v:g}"], v))
  assert row["val_mean"] == row["val_by_l2"][f"{row['l2']:g}"]
  assert row["test_mean"] == pytest.approx(np.mean(row["test_per_seed"]))
  assert row["test_std"] == pytest.approx(np.std(row["test_per_seed"]))
  acc = fewshot.fewshot_accuracies(tx, ty, {"test": (sx, sy)}, 5, 3, (row["l2"],), 3)["test"]
  np.testing.assert_allclose(acc[:, 0], row["test_per_seed"])


def test_a_folder_whose_files_changed_is_extracted_again(tmp_path, monkeypatch):
  """The feature cache of a folder split follows its files: images added to a class that had too
  few, or moved to another class, are not read from the entry of the folder as it was."""
  from PIL import Image
  from sit_jax.transfer import feature_cache
  extracted = []
  monkeypatch.setattr(common, "eval_batches", lambda *args: None)
  monkeypatch.setattr(common, "extract_features",
                      lambda *args: extracted.append(1) or (np.zeros((1, 2)), np.zeros(1)))
  train = tmp_path / "data" / "train"
  for c in ("a", "b"):
    os.makedirs(train / c)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(train / c / "0.png")
  config = fewshot_config.get_config("runlocal")
  config.data.source = f"folder:{tmp_path / 'data'}"
  features = lambda: feature_cache.split_features(config, str(tmp_path), "params x", None, None,
                                                  None, "train", "cls", 16)
  features(), features()
  assert len(extracted) == 1
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(train / "b" / "1.png")
  features()
  os.rename(train / "b" / "1.png", train / "a" / "1.png")
  features(), features()
  assert len(extracted) == 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 16})
  params = module.init(jax.random.PRNGKey(7), jnp.zeros((1, 16, 16, 3)))["params"]
  return checkpoint.export_backbone(tmp_path_factory.mktemp("export") / "backbone",
                                    {"backbone": jax.tree.map(np.asarray, params)},
                                    {"variant": "Mu/4", "image_size": 16})


def test_fewshot_run_and_its_cached_rerun(tmp_path, exported, monkeypatch):
  c = fewshot_config.get_config("runlocal")
  c.init = str(exported)
  c.fewshot.shots, c.fewshot.seeds = (1, 5), 2
  workdir = tmp_path / "run"
  fresh = fewshot.run(c, str(workdir))
  assert set(fresh["fewshot"]) == {"1shot", "5shot"}
  assert 0.1 < fresh["fewshot"]["5shot"]["test_mean"] <= 1.0
  assert "5shot test" in fresh["figures"] and fresh["protocol"]
  cache = sorted((workdir / "feature_cache").iterdir())
  assert len(cache) == 3  # train, validation, test
  stamps = [p.stat().st_mtime_ns for p in cache]
  cached = fewshot.run(c, str(workdir))
  assert [p.stat().st_mtime_ns for p in sorted((workdir / "feature_cache").iterdir())] == stamps
  assert cached["fewshot"] == fresh["fewshot"]
  # runlocal adds the baseline rows: the same protocol on raw pixels and on a random init.
  assert set(fresh["baselines"]) == {"raw_pixels", "random_init"}
  for row in fresh["baselines"].values():
    assert set(row) == {"1shot", "5shot"} and 0.0 < row["5shot"]["test_mean"] <= 1.0
  assert cached["baselines"] == fresh["baselines"]
  # A shot count that some class of train has fewer examples for: one line naming the classes
  # (the 1,200 train digits hold 111-128 of each), from the listed labels before any backbone
  # is loaded or feature extracted.
  c.fewshot.shots = (1, 5, 120)
  with monkeypatch.context() as m, pytest.raises(
      ValueError, match=r"fewshot.shots=\(1, 5, 120\) draws 120 train examples of every class, "
      r"and embedded:digits/train\[:80%\] has fewer of \d of its 10 classes \(\d: 11\d.*"
      r"--config.fewshot.shots='\(1, 5\)'"):
    m.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded before the check"))
    fewshot.run(c, str(workdir))
  c.fewshot.shots = (1, 5)
  with open(workdir / "results.json") as f:
    assert json.load(f)["fewshot"] == fresh["fewshot"]
  # The random-init row is the run at init='' (same seed, the checkpoint's architecture): its
  # images normalised once, as the backbone's are (twice changed every feature of a backbone
  # without standardize_input: 5-shot 0.157 against 0.449).
  c.init, c.baselines, c.model.standardize_input = "", False, False
  at_random_init = fewshot.run(c, str(tmp_path / "random"))["fewshot"]
  for shots, row in fresh["baselines"]["random_init"].items():
    assert row == pytest.approx({m: at_random_init[shots][m] for m in ("test_mean", "test_std")})
