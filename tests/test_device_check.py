"""benchmarks/device_check.sh --dry-run: the accelerator check runs end to end on the CPU with tiny
shapes and prints its one JSON line, so that it works the day a GPU is lent."""
import json
import os
import subprocess

import pytest

import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dry(*flags):
  # One CPU device, whatever the test session simulates.
  env = dict(os.environ, XLA_FLAGS=conftest.xla_flags(1))
  return subprocess.run(
      ["bash", "benchmarks/device_check.sh", "--dry-run", "--steps=2", "--repeats=1", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_device_check_dry_run(tmp_path):
  out = tmp_path / "check.json"
  proc = run_dry("--budget_s=3000", "--hard_limit_s=3000", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == r  # the file holds the final JSON, not an earlier stage
  assert "aborted" not in r
  assert r["dry_run"] and r["backend"] == "cpu" and r["dtype"] == "bfloat16"
  assert set(r["cases"]) == {"S16_b8", "S16_b8_cudnn", "S16_b8_remat"}
  assert r["cases"]["S16_b8_cudnn"] == {"skipped": "cuDNN attention needs a GPU"}
  for name in ("S16_b8", "S16_b8_remat"):
    case = r["cases"][name]
    assert case["step_ms"] > 0 and case["compile_s"] > 0, (name, case)
    assert case["images_per_s"] == pytest.approx(case["global_batch"] / case["step_ms"] * 1e3)
    assert case["mfu_analytic"] is None  # no peak FLOP/s for CPUs
  # Remat recomputes the forward pass: XLA counts more FLOPs, the analytic count does not.
  plain, remat = r["cases"]["S16_b8"], r["cases"]["S16_b8_remat"]
  assert remat["analytic_tflop_per_step"] == plain["analytic_tflop_per_step"]
  assert remat["xla_tflop_per_step"] > plain["xla_tflop_per_step"]
  e2e = r["end_to_end"]
  assert e2e["e2e_images_per_s"] > 0 and e2e["pipeline_images_per_s"] > 0 and e2e["workers"] == 1
  assert e2e["resize_on"] == "device" and e2e["pipeline_host_resize_images_per_s"] > 0
  assert e2e["device_resize"]["gflop_per_image"] > 0
  assert e2e["skipped_images"] == 0


def test_device_check_hard_limit_keeps_what_was_measured(tmp_path):
  # 3 s after start-up the first compile is under way: the watchdog must save the JSON marked
  # aborted, print the stacks (where it hung) and exit 3, not leave the lease to run out.
  out = tmp_path / "check.json"
  proc = run_dry("--budget_s=3000", "--hard_limit_s=3", f"--out={out}")
  assert proc.returncode == 3, proc.stderr[-4000:]
  saved = json.loads(out.read_text())
  assert saved["aborted"].startswith("hard limit of 3 s")
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == saved
  assert "most recent call first" in proc.stderr and "device_check.py" in proc.stderr


def test_both_spellings_of_dry_run_run_on_the_cpu(tmp_path):
  """`--dry_run` (device_check.py's own flag) sourced the GPU's XLA flags and left JAX free to
  pick a GPU, without the dry run's fast compile flags."""
  python = tmp_path / "python"  # stands in for the interpreter: prints what it was given
  python.write_text('#!/bin/sh\necho "$JAX_PLATFORMS|$XLA_FLAGS|$*"\n')
  python.chmod(0o755)
  for spelling in ("--dry-run", "--dry_run"):
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", spelling], cwd=REPO, text=True,
                          capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHON=str(python), XLA_FLAGS=""))
    platforms, xla_flags, args = proc.stdout.strip().split("|")
    assert (platforms, args) == ("cpu", "benchmarks/device_check.py --dry_run"), spelling
    assert "--xla_backend_optimization_level=0" in xla_flags and "xla_gpu" not in xla_flags
