"""Ahead-of-time compile for a topology (--aot_topology): memory figures, clear errors."""
import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from configs import common, sit_vits
from sit_jax import aot, flops, sharding

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
  # XLA's FLOPs beside the analytic count (whole step / 8 devices), within the elementwise work
  # the analytic count leaves out (flops.py: 1.08x for this micro ViT).
  assert "analytic (matmuls" in out and "XLA cost analysis" in out
  assert figures["analytic_flops"] == pytest.approx(flops.sit_step_flops(
      sit_vits.get_config("runlocal")) / 8)
  assert 1.0 < figures["flops"] / figures["analytic_flops"] < 1.3
  assert "counts the body of a loop once" not in out  # only where XLA's figure falls short.


@pytest.mark.parametrize("message, need", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (256.00G) exceeds available HBM (15.75G).", "256.00 GiB"),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 20.47G of 15.75G hbm. Exceeded hbm capacity by 4.72G.", "20.47 GiB"),
])
def test_out_of_memory_is_one_line_with_what_to_try(message, need):
  config = sit_vits.get_config()
  mesh = sharding.make_mesh({"data": 8})
  line = aot.out_of_memory_line(config, mesh, jax.devices(), message)
  assert "\n" not in line
  assert f"XLA needs {need} per device, 15.75 GiB available" in line
  for remedy in ("model.remat=True", "FSDP", "per-device batch (now 32", "more chips"):
    assert remedy in line


def test_out_of_memory_with_fsdp_on_tpu_suggests_windowed_einsums_off():
  class Chip:  # what out_of_memory_line reads of a TPU topology's devices
    platform, device_kind = "tpu", "TPU v5 lite"
  config = sit_vits.get_config()
  config.mesh.update(dict(data=1, fsdp=-1))
  mesh = sharding.make_mesh(config.mesh)
  message = "RESOURCE_EXHAUSTED: Used 20.47G of 15.75G hbm."
  line = aot.out_of_memory_line(config, mesh, [Chip()] * 8, message)
  assert "windowed einsums off (--config.compiler_options=xla_tpu_enable_windowed_einsum" in line
  assert "FSDP (" not in line and "\n" not in line
  # Not on CPU devices, nor when the config already turns them off.
  assert "windowed" not in aot.out_of_memory_line(config, mesh, jax.devices(), message)
  config.compiler_options = common.FSDP_COMPILER_OPTIONS
  assert "windowed" not in aot.out_of_memory_line(config, mesh, [Chip()] * 8, message)


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "Unknown --aot_topology"),
    ("v4:2x2", "3 dimensions"),
    ("cpu", "cpu:N"),
    ("cpu:64", "only 8 cpu devices"),
    ("cpu:0", "N >= 1"),
    ("local:0", "N >= 1"),
    ("v5e:0x2", "every dimension of a slice is at least 1"),
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


def test_compiler_options_parse():
  assert sharding.compiler_options("") == {}
  assert sharding.compiler_options("a=false,b=2,c=0.5,d=True,e=x") == {
      "a": False, "b": "2", "c": "0.5", "d": True, "e": "x"}


def test_options_of_another_backend_are_left_out_and_unknown_ones_are_one_line(tmp_path):
  text = "xla_tpu_a=false,xla_gpu_b=1,xla_cpu_c=2,d=3"
  assert sharding.compiler_options(text, "tpu") == {"xla_tpu_a": False, "d": "3"}
  assert sharding.compiler_options(text, "gpu") == {"xla_gpu_b": "1", "d": "3"}
  assert sharding.compiler_options(text, "cpu") == {"xla_cpu_c": "2", "d": "3"}
  assert len(sharding.compiler_options(text)) == 4
  # A recipe's TPU options do not stop a CPU compile; the others reach XLA (it wrote the step
  # where the config told it to, beside aot's own option).
  config = sit_vits.get_config("runlocal")
  config.compiler_options = ("xla_tpu_enable_windowed_einsum_for_all_gather=false,"
                             f"xla_dump_to={tmp_path},xla_dump_hlo_as_text=true")
  aot.run(config, "cpu:8", compiler_options={"xla_backend_optimization_level": 0})
  assert any("train_step" in p.name for p in tmp_path.iterdir())
  # An option this backend does not know (misspelt, or unprefixed and another backend's).
  for option in ("xla_cpu_enable_fast_mathh", "xla_jf_auto_cross_replica_sharding"):
    with pytest.raises(ValueError, match=f"config.compiler_options: .*{option}.* for cpu"):
      sharding.check_compiler_options({option: False})
    config.compiler_options = f"{option}=false"
    with pytest.raises(ValueError, match=f"config.compiler_options: .*{option}.* for cpu"):
      aot.run(config, "cpu:8", compiler_options={"xla_backend_optimization_level": 0})
  sharding.check_compiler_options({"xla_cpu_enable_fast_math": False})  # CPU's own: no error.
  # Values as XLA takes them: an int option and a string option whose value looks like a number
  # (as an int, XLA refused the latter); a boolean given as 0 is one line.
  sharding.check_compiler_options(sharding.compiler_options(
      "xla_backend_optimization_level=0,xla_dump_hlo_pass_re=1"))
  with pytest.raises(ValueError, match="config.compiler_options: .*xla_cpu_enable_fast_math.*"
                                       "takes true or false"):
    sharding.check_compiler_options(sharding.compiler_options("xla_cpu_enable_fast_math=0"))


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5e-2x2"])
def test_both_spellings_of_a_slice_get_the_verdict(topology, monkeypatch, capsys):
  """'v5e-2x2' (gcloud's accelerator spelling) parses like 'v5e:2x2' and gets the HBM verdict."""
  import types
  from configs import sit_vits
  from sit_jax import flops
  stats = types.SimpleNamespace(argument_size_in_bytes=2**30, output_size_in_bytes=2**30,
                                alias_size_in_bytes=2**30, temp_size_in_bytes=20 * 2**30,
                                generated_code_size_in_bytes=0)
  compiled = types.SimpleNamespace(memory_analysis=lambda: stats, as_text=lambda: "",
                                   cost_analysis=lambda: {})
  mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 1, "model": 1})
  monkeypatch.setattr(aot, "topology_devices", lambda t: (jax.devices()[:1] * 4, "tpu"))
  monkeypatch.setattr(aot, "compile_train_step", lambda c, d, o=None: (compiled, mesh))
  monkeypatch.setattr(flops, "xla_flops", lambda c: 0.0)
  aot.run(sit_vits.get_config("runlocal"), topology)
  assert "Verdict: does NOT fit in the 15.75 GiB" in capsys.readouterr().out
