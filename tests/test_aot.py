"""Ahead-of-time compile for a topology (--aot_topology): memory figures, clear errors."""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from configs import sit_vits
from sit_jax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_topology_prints_memory_per_device(capsys):
  figures = aot.run(sit_vits.get_config("runlocal"), "cpu:8",
                    compiler_options={"xla_backend_optimization_level": 0})
  out = capsys.readouterr().out
  assert "8 cpu devices" in out and "Memory per device:" in out
  for label in ("arguments", "temporaries", "total"):
    assert label in out
  memory = figures["memory_bytes"]
  assert memory["argument"] > 0 and memory["temp"] > 0
  assert memory["total"] >= memory["argument"]
  assert figures["mesh"] == {"data": 8, "fsdp": 1, "model": 1}


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "Unknown --aot_topology"),
    ("v4:2x2", "3 dimensions"),
    ("cpu", "cpu:N"),
    ("cpu:64", "only 8 cpu devices"),
])
def test_bad_topologies_are_explained(topology, message):
  with pytest.raises(ValueError, match=message):
    aot.topology_devices(topology)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: TPU topologies compile here")
def test_tpu_topology_without_libtpu_says_what_to_install():
  proc = subprocess.run(
      [sys.executable, "-m", "sit_jax.main", "--config=configs/sit_vits.py:runlocal",
       "--aot_topology=v5e:2x2"], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1
  assert "sit_jax: error:" in proc.stderr
  assert f'pip install "jax[tpu]=={jax.__version__}"' in proc.stderr
