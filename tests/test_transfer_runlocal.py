"""The transfer runlocal runs (k-NN, linear probe, fine-tuning, multi-label) as a user starts
them: `python -m sit_jax.main --config=configs/<experiment>.py:runlocal`, shortened. Apart from
test_transfer.py so that pytest-xdist can run the two halves on different workers."""
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
