"""The transfer runlocal runs (k-NN, linear probe, fine-tuning, multi-label) as a user starts
them: `python -m sit_jax.main --config=configs/<experiment>.py:runlocal`, shortened, and a
fine-tuning run in process with its training stubbed. Apart from test_transfer.py so that
pytest-xdist can run the two halves on different workers."""
import json
import os
import subprocess
import sys

import pytest
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The runlocal runs, as a user starts them.
# ---------------------------------------------------------------------------------------------


def run_main(config_arg, workdir, *flags):
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(8),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "sit_jax.main", f"--config={config_arg}",
         f"--workdir={workdir}", *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("experiment,with_init", [("knn", False), ("linear", True),
                                                  ("finetune", True), ("multilabel", True)])
def test_runlocal(tmp_path, exported_backbone, experiment, with_init):
  flags = [f"--config.init={exported_backbone[0]}"] if with_init else []
  # The recipes' length is measured, not tested: short runs of the same code.
  if experiment in ("finetune", "multilabel"):
    flags += ["--config.total_steps=30", "--config.eval_every=10"]
  if experiment == "finetune":  # config.compiler_options reach XLA for the training step alone
    flags += [f"--config.compiler_options=xla_dump_to={tmp_path / 'xla'}"]
  if experiment == "linear":
    # Two L2 values still go through the held-out choice (tested in test_transfer.py). 50
    # iterations for each of the three probes (this backbone and the two baselines) still give
    # the raw pixels 0.98; the run takes 17 s instead of 30 s with 300.
    flags += ["--config.linear.max_iter=50", "--config.linear.l2=(1e-4, 1e-2)"]
  results = run_main(f"configs/{experiment}.py:runlocal", tmp_path, *flags)
  assert results["experiment"] == experiment
  assert results["init"] == (exported_backbone[0] if with_init else "random")
  assert results["num_examples"] == 297
  if experiment == "multilabel":
    assert 0.0 < results["mAP"] <= 1.0
  else:
    assert 0.0 <= results["top5"] <= 1.0 and results["top1"] <= results["top5"]
    assert results["dataset"] == "digits"
  assert os.path.getsize(tmp_path / "metrics.jsonl") > 0
  if experiment == "finetune":  # (and the identity that checks them before any work)
    assert {name.split(".")[1] for name in os.listdir(tmp_path / "xla")} == {
        "jit_step", "jit_compiler_options_check"}
  if experiment in ("finetune", "multilabel"):
    # eval_every scores the validation split; the test split is scored once, at the end.
    with open(tmp_path / "metrics.jsonl") as f:
      rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if any(k.startswith("val/") for k in r)] == [10, 20, 30]
    assert [r["step"] for r in rows if any(k.startswith("test/") for k in r)] == [30]
    # results.json names the split its val/ figures come from.
    assert results["val_split"] == "train[80%:]" and any(k.startswith("val/")
                                                         for k in results["figures"])
  if experiment in ("knn", "linear"):
    # The results line and results.json name the features the protocol read (runlocal's probe:
    # the CLS tokens of the last 4 blocks).
    blocks = {"knn": 1, "linear": 4}[experiment]
    assert results["features"] == f"cls of the last {blocks} block(s)"
    assert (tmp_path / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    # runlocal adds the baseline rows.
    assert set(results["baselines"]) == {"raw_pixels", "random_init"}
    assert 0.5 < results["baselines"]["raw_pixels"]["top1"] <= 1.0


# ---------------------------------------------------------------------------------------------
# In process, the training stubbed (no step compiled).
# ---------------------------------------------------------------------------------------------


def test_finetune_names_the_classes_its_train_split_lacks(tmp_path, monkeypatch, caplog):
  """Fine-tuning, single- and multi-label, warns and lists in results.json the classes its train
  split has no example of, as k-NN and the probes do, and goes on: an embedded split's labels as
  listed, before training; a TFDS split's as its first epoch read them, after."""
  import numpy as np
  import tensorflow_datasets as tfds
  from configs import finetune as finetune_config
  from configs import multilabel as multilabel_config
  from sit_jax import trainer
  from sit_jax.transfer import finetune
  warning = "has no example of"

  def stub_train(read_batches, warned_before):
    def train(exp, *, batches, total_steps, **kwargs):
      assert (warning in caplog.text) == warned_before
      stream = batches(0)
      for _ in range(read_batches):
        next(stream)
      return trainer.Outcome(None, read_batches, 0, total_steps, {}, {}, None, 0.0)
    return train

  monkeypatch.setattr(finetune, "state_layout", lambda *args: (None, None, None))  # not built
  # train[:8] of the digits has no 3, 4, 6 or 9 (and holds odd digits and digits >= 5).
  monkeypatch.setattr(trainer, "train", stub_train(1, warned_before=True))
  c = multilabel_config.get_config("runlocal")
  c.data.train_split, c.data.global_batch_size = "train[:8]", 8
  results = finetune.run(c, str(tmp_path / "digits"), multilabel=True)
  assert results["classes_missing_from_train"] == ["3", "4", "6", "9"]
  with open(tmp_path / "digits" / "results.json") as f:
    assert json.load(f)["classes_missing_from_train"] == ["3", "4", "6", "9"]

  # 20 cats, no dog (the mock serves all 20 to each split): 8 a batch, the first epoch is 3.
  caplog.clear()
  examples = [dict(image=np.full((8, 8, 3), 10 * i, np.uint8), label=0) for i in range(20)]
  c = finetune_config.get_config("runlocal")
  c.data.source, c.data.global_batch_size = "tfds:cats_vs_dogs", 8
  c.data.train_split, c.data.val_split, c.data.test_split = "train[:50%]", "", "train[50%:]"
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples):
    monkeypatch.setattr(trainer, "train", stub_train(3, warned_before=False))
    results = finetune.run(c, str(tmp_path / "tfds"))
    assert results["classes_missing_from_train"] == ["dog"]
    assert "(tfds:cats_vs_dogs/train[:50%]) has no example of 1 of its 2 classes (dog)" in (
        caplog.text)
