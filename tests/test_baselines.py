"""Baseline rows of the k-NN and linear runs (raw pixels, random init) against independently
computed numbers, and the dataset name of results and pictures."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import knn as knn_config
from configs import linear as linear_config
from sit_jax import augment, checkpoint, data
from sit_jax.models import vit
from sit_jax.transfer import common, knn, linear
from test_transfer import knn_numpy  # the reference k-NN of the k-NN tests

SIZE = 16  # small images keep the runs short; the baselines do not depend on the size.


def raw_pixels(split):
  """The flattened evaluation view ('resize' to SIZE) normalised with the ImageNet statistics,
  computed here in numpy, and the labels."""
  batch = next(data.eval_iterator("embedded:digits", split, global_batch_size=2000,
                                  image_size=SIZE, resize_mode="resize", process_index=0,
                                  process_count=1))
  images = batch["image"][batch["mask"]].astype(np.float64) / 255.0
  mean, std = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)
  return ((images - mean) / std).reshape(len(images), -1), batch["label"][batch["mask"]]


def small_config(module, **overrides):
  c = module.get_config("runlocal")
  c.data.image_size = SIZE
  c.data.train_split = "train[:600]"
  c.tsne_points = 0
  c.update_from_flattened_dict(overrides)  # 'optim.eps' -> c.optim.eps
  return c


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A backbone as `:runlocal` pretraining exports it (standardising its input, as the
  transfer configs' random init does, so the two random-init rows are the same network)."""
  model_config = {"variant": "Mu/4", "image_size": SIZE, "standardize_input": True}
  module = vit.backbone_from_config(model_config)
  params = module.init(jax.random.PRNGKey(7), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return checkpoint.export_backbone(tmp_path_factory.mktemp("export") / "backbone",
                                    {"backbone": jax.tree.map(np.asarray, params)}, model_config)


def test_knn_baselines_match_numpy_and_random_init_run(tmp_path, exported):
  c = small_config(knn_config, init=str(exported), **{"knn.k": (20,)})
  assert c.baselines  # on for runlocal
  results = knn.run(c, str(tmp_path / "pretrained"))
  baselines = results["baselines"]
  with open(tmp_path / "pretrained" / "results.json") as f:
    assert json.load(f)["baselines"] == baselines

  # Raw pixels: the same top-1 as a numpy k-NN on the numpy-normalised images.
  train, train_labels = raw_pixels("train[:600]")
  test, test_labels = raw_pixels("test")
  scores = knn_numpy(train, train_labels, test, 20, c.knn.temperature, 10)
  assert baselines["raw_pixels"]["dim"] == SIZE * SIZE * 3
  assert baselines["raw_pixels"]["top1"] == pytest.approx(np.mean(scores.argmax(1) == test_labels),
                                                          abs=1 / 297 + 1e-9)

  # Random init: what a run of the same architecture from config.init='' (same seed) gives.
  random = knn.run(small_config(knn_config, init="", **{"knn.k": (20,)}),
                   str(tmp_path / "random"))
  assert baselines["random_init"]["top1"] == random["top1"]
  assert random["baselines"]["random_init"]["top1"] == random["top1"]
  assert random["baselines"]["raw_pixels"] == baselines["raw_pixels"]


def test_linear_raw_pixel_baseline_matches_sklearn(tmp_path):
  from sklearn.linear_model import LogisticRegression
  c = small_config(linear_config, init="")
  c.linear.l2 = (1e-2,)  # one value: compare with sklearn at the same penalty
  results = linear.run(c, str(tmp_path))
  row = results["baselines"]["raw_pixels"]
  assert row["l2"] == 1e-2 and row["dim"] == SIZE * SIZE * 3
  train, train_labels = raw_pixels("train[:600]")
  test, test_labels = raw_pixels("test")
  std = train.std(0)
  std[std < 1e-6] = 1.0
  scale = lambda x: (x - train.mean(0)) / std
  sk = LogisticRegression(C=1 / (1e-2 * len(train)), tol=1e-8, max_iter=20_000).fit(
      scale(train), train_labels)
  assert row["top1"] == pytest.approx(sk.score(scale(test), test_labels), abs=0.01)
  # config.init='' evaluates the random init itself: its baseline row is the run's own score.
  assert results["baselines"]["random_init"]["top1"] == results["top1"]
  assert results["probe"]["grad_norm"] < 1e-3


@pytest.mark.parametrize("source,recipe,want", [
    ("embedded:digits", "digits", "digits"),
    ("folder:/data/my_mnist/", "digits", "my_mnist"),
    ("folder:~/pets", "digits", "pets"),
    ("tfds:voc/2007", "voc2007", "voc2007"),
    ("tfds:cifar100", "cifar10", "cifar100"),
    ("cifar10:train", "imagenet2012", "cifar10"),
    ("embedded:digits_multilabel", "digits_multilabel", "digits_multilabel"),
])
def test_dataset_name_follows_the_source(source, recipe, want):
  c = ml_collections.ConfigDict({"dataset": recipe, "data": {"source": source}})
  assert common.dataset_name(c) == want


def test_folder_source_is_named_after_the_folder(tmp_path, monkeypatch, caplog):
  images, labels = data.embedded_digits()
  root = tmp_path / "handwritten"
  for i in range(90):
    # class_3 holds one image, the folder's last: the seeded slices put it in train[70:].
    folder = root / (f"class_{labels[i] % 3}" if i < 89 else "class_3")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[i]).save(folder / f"{i}.png")
  titles = []
  from sit_jax import viz
  names = []
  monkeypatch.setattr(viz, "tsne_plot", lambda *args, title, class_names, **kw: (
      titles.append(title) or names.append(class_names)))
  c = small_config(knn_config, **{"data.source": f"folder:{root}", "data.train_split": "train[:60]",
                                  "data.val_split": "train[60:70]",
                                  "data.test_split": "train[70:]", "baselines": False,
                                  "knn.k": (5,), "tsne_points": 100})
  results = knn.run(c, str(tmp_path / "run"))
  assert results["dataset"] == "handwritten" and results["num_examples"] == 20
  assert titles and "handwritten" in titles[0] and "digits" not in titles[0]
  assert titles[0].endswith("on train[70:]")  # the split whose features it shows
  # The legend names the folder's classes (it said 0, 1, ... for folder names as for digits).
  assert names == [("class_0", "class_1", "class_2", "class_3")]
  # The bank holds no class_3 image: the run goes on, and says so (it was silent).
  assert results["classes_missing_from_train"] == ["class_3"]
  assert "data.train_split='train[:60]'" in caplog.text and "(class_3)" in caplog.text
