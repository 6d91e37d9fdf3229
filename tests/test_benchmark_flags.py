"""The benchmarks that take --config check it as `python -m sit_jax.main` does, before any work: a
misspelt key or a bad value is one line (learning.py pretrained with teacher.momentum=1.5, which
main refuses, and scored the result as a recipe)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark(script, *args):
  return subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def one_line(proc):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


def test_learning_refuses_a_bad_value_before_pretraining(tmp_path):
  workdir, results = tmp_path / "run", tmp_path / "results.jsonl"
  line = one_line(benchmark("learning.py", "--config=configs/sit_vits.py:runlocal",
                            f"--workdir={workdir}", f"--results={results}",
                            "--config.teacher.momentum=1.5", "--config.total_steps=1"))
  assert line.startswith("learning.py: error: config.teacher.momentum=1.5 is invalid")
  assert not workdir.exists() and not results.exists()


@pytest.mark.parametrize("script", ["throughput.py", "input_pipeline.py"])
def test_a_misspelt_key_is_one_line(script):
  line = one_line(benchmark(script, "--config=configs/sit_vits.py:runlocal",
                            "--config.gmml.ratoi=0.3"))
  assert "gmml.ratoi" in line and "did you mean gmml.ratio" in line


@pytest.mark.parametrize("script, flag", [("throughput.py", "--steps=0"),
                                          ("input_pipeline.py", "--repeats=0")])
def test_an_empty_window_is_refused_in_one_line(script, flag):
  """Zero steps or windows divided by zero (or took the median of nothing) after the compile."""
  line = one_line(benchmark(script, "--config=configs/sit_vits.py:runlocal", flag))
  assert flag.split("=")[0] in line and "positive" in line


def test_an_unknown_pipeline_to_compare_is_one_line(tmp_path):
  """It was skipped after its first window, and the comparison exited 0 with an empty table."""
  line = one_line(benchmark("input_pipeline.py", "--compare", "--pipelines=grian"))
  assert "--pipelines=grian" in line and "grain_host" in line


def test_a_setting_the_model_refuses_is_one_line():
  """README: `throughput.py ... --config.model.attention=cudnn` is for GPUs; on a CPU the model's
  refusal came at the end of a traceback."""
  line = one_line(benchmark("throughput.py", "--config=configs/sit_vits.py:runlocal",
                            "--config.model.attention=cudnn", "--config.model.dtype=bfloat16",
                            "--e2e=false"))
  assert line.startswith("throughput.py: error: model.attention='cudnn'") and "GPU" in line


def test_torch_reference_checks_its_own_flags_in_one_line():
  """--image_size and --model override the config after its checks: a size the patch does not
  divide failed in a traceback once JAX built the model (after torch had loaded)."""
  line = one_line(benchmark("torch_reference.py", "--image_size=100"))
  assert line.startswith("torch_reference.py: error: data.image_size") and "multiple of 16" in line


def test_the_benchmarks_read_the_pipeline_pretraining_reads():
  """input_pipeline.py and torch_reference.py built it without data.flip: the runlocal recipe's
  unflipped views were timed flipped."""
  import numpy as np
  from configs import sit_vits
  from sit_jax import data
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import hostutil
  config = sit_vits.get_config("runlocal")
  config.data.resize_on = "host"  # the views themselves, not the device's crop windows
  assert config.data.flip is False
  kw = dict(global_batch_size=64, image_size=16, crop_scale=(0.8, 1.0), seed=0)
  unflipped = next(data.pretrain_iterator("embedded:digits", "train", flip=False, **kw))
  flipped = next(data.pretrain_iterator("embedded:digits", "train", flip=True, **kw))
  batch = next(hostutil.pretrain_iterator(config))
  for view in ("view1", "view2"):
    assert np.array_equal(batch[view], unflipped[view])
    assert not np.array_equal(batch[view], flipped[view])


def test_learning_reads_both_splits_before_pretraining(tmp_path):
  """An image folder without test/ pretrained for minutes, then failed in a traceback reading the
  split it scores."""
  import numpy as np
  from PIL import Image
  for label in ("a", "b"):
    (tmp_path / "images" / "train" / label).mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "images" / "train" / label / "0.png")
  workdir = tmp_path / "run"
  line = one_line(benchmark("learning.py", "--config=configs/sit_vits.py:runlocal",
                            f"--workdir={workdir}", f"--results={tmp_path / 'results.jsonl'}",
                            "--split=test", f"--config.data.source=folder:{tmp_path / 'images'}",
                            "--config.total_steps=1"))
  assert line.startswith("learning.py: error: --split=test reads train and test of folder:")
  assert "no test/ folder" in line and not workdir.exists()


@pytest.mark.parametrize("commits, message", [((), "name the commits"),
                                              (("HEAD", "nosuch"), "nosuch is not a commit")])
def test_install_footprint_refuses_bad_commits_before_installing(commits, message):
  """No commit measured nothing and exited 0; a misspelt one failed after minutes of installing
  the commits before it."""
  proc = subprocess.run(["bash", "benchmarks/install_footprint.sh", *commits], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and not proc.stdout
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr


def test_torch_reference_refuses_a_model_the_pytorch_side_does_not_build():
  """`--config=...:runlocal` timed its small heads (256/64 projection, no drop path) against
  PyTorch's 4096/4096/256 and judged the goal met at a ratio of 0.15."""
  line = one_line(benchmark("torch_reference.py", "--config=configs/sit_vits.py:runlocal",
                            "--config.data.decoded_size=0", "--image_size=32", "--batch=2",
                            "--rounds=1", "--steps=1", "--warmup=0", "--e2e=false"))
  assert line.startswith("torch_reference.py: error: the sit_jax step would not be the PyTorch")
  assert "model.proj_hidden=256 (PyTorch's side: 4096)" in line
