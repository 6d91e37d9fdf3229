"""The k-NN and few-shot monitor of pretraining: the figures knn.py and fewshot.py give on the
same checkpoint, written to metrics.jsonl and results.json; off for unlabelled data; never the
bank scored against itself."""
import json
import os
import re

import pytest

from configs import fewshot as fewshot_config
from configs import knn as knn_config
from configs import sit_vits
from sit_jax import data, monitor, pretrain, sharding
from sit_jax.transfer import fewshot, knn

BANK, HELD_OUT = "train[:256]", "train[256:384]"


def short_run_config():
  c = sit_vits.get_config("runlocal")
  c.data.split = BANK
  c.total_steps, c.log_every, c.checkpoint_every, c.image_every = 6, 3, 3, 100
  c.eval_every = 3
  c.eval.train_split, c.eval.test_split = BANK, HELD_OUT
  c.eval.fewshot_shots = (5,)
  return c


def test_online_knn_and_fewshot_equal_knn_py_and_fewshot_py_on_the_same_checkpoint(tmp_path,
                                                                                   caplog):
  c = short_run_config()
  c.eval.fewshot_shots = (5, 30)  # the bank's 256 digits hold fewer than 30 of some classes
  workdir = str(tmp_path / "pretrain")
  with caplog.at_level("WARNING"):
    results = pretrain.train_and_evaluate(c, workdir)
  # Said once, and the run goes on: its 30-shot rows hold fewer shots of those classes.
  assert caplog.text.count("Few-shot monitor: eval.fewshot_shots=(5, 30) draws 30 train "
                           "examples of every class") == 1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = {row["step"]: row for row in map(json.loads, f)}
  assert sorted(rows) == [3, 6]
  for row in rows.values():  # one line per log step: losses and both k-NN figures.
    assert {"loss", "knn/student", "knn/teacher", "fewshot/student/5shot"} <= set(row)
  online = results["knn_monitor"]
  assert online["knn/student"] == rows[6]["knn/student"]
  # The count the epochs were set by: resumed on a folder that has grown, the run names it.
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_train_examples"] == 256

  k = knn_config.get_config("runlocal")
  k.init = workdir  # the latest checkpoint: step 6, the student's backbone.
  k.data.image_size = c.data.image_size
  k.data.train_split, k.data.test_split = BANK, HELD_OUT
  k.knn.k = (c.eval.k,)
  k.tsne_points = 0
  standalone = knn.run(k, str(tmp_path / "knn"))
  assert standalone["num_examples"] == 128
  assert standalone["top1"] == pytest.approx(online["knn/student"], abs=1e-9)
  # The teacher's backbone from the same checkpoint gives the monitor's other figure (the two
  # figures differ in this run: 0.3125 and 0.3047).
  assert online["knn/teacher"] != online["knn/student"]
  k.init_weights = "teacher"
  teacher = knn.run(k, str(tmp_path / "knn_teacher"))
  assert teacher["init_weights"] == "teacher" and standalone["init_weights"] == "student"
  assert teacher["top1"] == pytest.approx(online["knn/teacher"], abs=1e-9)

  f = fewshot_config.get_config("runlocal")
  f.init, f.data.image_size = workdir, c.data.image_size
  f.data.train_split, f.data.test_split = BANK, HELD_OUT
  f.fewshot.shots, f.fewshot.seeds, f.fewshot.l2 = (5,), c.eval.fewshot_seeds, (c.eval.fewshot_l2,)
  standalone = fewshot.run(f, str(tmp_path / "fewshot"))
  assert standalone["fewshot"]["5shot"]["test_mean"] == pytest.approx(
      online["fewshot/student/5shot"], abs=1e-6)


def test_monitor_is_off_without_labels_and_never_scores_the_bank_against_itself(tmp_path):
  from PIL import Image
  import numpy as np
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  c = short_run_config()
  mesh = sharding.make_mesh(c.mesh)
  c.eval.source, c.eval.train_split = f"folder:{tmp_path}", "train"  # not BANK's 256 of 4
  assert monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c)) is None
  # The images in one sub-folder: one class, where every image is classified right (1.0).
  os.makedirs(tmp_path / "one" / "images")
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(
        tmp_path / "one" / "images" / f"{i}.png")
  c.eval.source = f"folder:{tmp_path / 'one'}"
  assert monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c)) is None

  # A labelled folder without split sub-folders: a held-out slice, never the bank itself.
  for c_ in range(2):
    os.makedirs(tmp_path / "labelled" / f"c{c_}")
    for i in range(10):
      Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(
          tmp_path / "labelled" / f"c{c_}" / f"{i}.png")
  c = short_run_config()
  c.eval.source = f"folder:{tmp_path / 'labelled'}"
  c.eval.train_split, c.eval.test_split = "train", "test"  # the runlocal defaults
  m = monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))
  assert (m.bank_split, m.test_split) == ("train[:90%]", "train[90%:]")
  # A held-out split that holds bank images is no held-out split either.
  c.eval.train_split, c.eval.test_split = "train[:50%]", "train"
  m = monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))
  assert (m.bank_split, m.test_split) == ("train[:90%]", "train[90%:]")
  # Split folders whose classes differ would score the labels of other classes.
  for split, classes in (("train", ("c0", "c1")), ("test", ("c1",))):
    for name in classes:
      os.makedirs(tmp_path / "split" / split / name)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "split" / split / name / "0.png")
  c.eval.source = f"folder:{tmp_path / 'split'}"
  c.eval.train_split, c.eval.test_split = "train", "test"
  with pytest.raises(data.DataError, match="missing: c0"):
    monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))
  c.eval_every = 0
  assert monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c)) is None

  # 4 images: train[90%:] holds none of them. One line, before any work, names the key, the
  # count and slices that hold one out.
  for c_ in range(2):
    os.makedirs(tmp_path / "four" / f"c{c_}")
    for i in range(2):
      Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(
          tmp_path / "four" / f"c{c_}" / f"{i}.png")
  c.eval_every, c.eval.source = 3, f"folder:{tmp_path / 'four'}"
  with pytest.raises(data.DataError, match=re.escape(
      "eval.test_split='test': ") + ".* of its 4 images holds none to score: set " + re.escape(
      "--config.eval.train_split='train[:3]' --config.eval.test_split='train[3:]'")):
    monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))
  c.eval.train_split, c.eval.test_split = "train[:3]", "train[3:]"
  m = monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))
  assert (m.bank_split, m.test_split) == ("train[:3]", "train[3:]")
  c.eval.test_split = "train[90%:]"  # a slice of no image is the key's, not a bare split's
  with pytest.raises(data.DataError, match=re.escape("eval.test_split='train[90%:]': split")):
    monitor.KnnMonitor.from_config(c, mesh, pretrain.model_config(c))


def test_an_eval_batch_the_mesh_cannot_split_names_eval_batch_size(tmp_path, monkeypatch):
  c = short_run_config()
  c.eval.batch_size = 12  # data.global_batch_size stays 64, which 8 devices split.
  # Refused with the training batch, before the data is opened or the step compiled.
  def no_data(*args, **kwargs):
    raise AssertionError("the data was opened before the batch sizes were checked")
  monkeypatch.setattr(data, "dataset_info", no_data)
  with pytest.raises(ValueError, match=r"^eval.batch_size: Global batch size 12 is not divisible"):
    pretrain.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # the workdir it made, and its log.txt, are gone


def test_a_bad_monitor_split_is_refused_before_the_metrics_are_touched(tmp_path):
  """The monitor's splits were read after the writer had started metrics.jsonl and tb/ (and,
  in a workdir without checkpoints, emptied the metrics.jsonl there)."""
  c = short_run_config()
  c.eval.train_split = "bogus"
  rows = '{"step": 3, "knn/student": 0.5}\n'
  (tmp_path / "metrics.jsonl").write_text(rows)  # of a run that saved no checkpoint
  for workdir in (tmp_path, tmp_path / "run"):
    with pytest.raises(data.DataError, match=r"^eval.train_split='bogus': "):
      pretrain.train_and_evaluate(c, str(workdir))
  assert (tmp_path / "metrics.jsonl").read_text() == rows
  assert sorted(os.listdir(tmp_path)) == [".lock", "log.txt", "metrics.jsonl"]
