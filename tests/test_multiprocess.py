"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo collectives) train exactly
like one process with 8 devices fed the same global batches, across a Ctrl-C in one of them and
the resume."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sit_jax import checkpoint, distributed
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/sit_vits.py:runlocal"
# The paper's fills: 'replace' takes its donors from the whole global view, across processes.
RUN_FLAGS = ["--config.total_steps=4", "--config.log_every=1", "--config.checkpoint_every=4",
             "--config.image_every=1000", "--config.gmml.fills=('noise','replace')"]
# Cluster variables of the machine running the tests must not leak into the children.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR",
                     "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")
# Markers of a jaxlib built without CPU cross-process collectives.
_NO_GLOO = ("gloo is not available", "Gloo is not available", "unknown collectives",
            "UNIMPLEMENTED: Cross-process", "jax_cpu_collectives_implementation")

# The single-process reference: 8 devices, each global batch the concatenation of what
# processes 0 and 1 of a 2-process job read (the data layout depends on the process count).
REFERENCE = """
import sys
import numpy as np
from absl import app
from sit_jax import data, main

host_iterator = data.pretrain_iterator

def two_hosts(*args, **kwargs):
  hosts = [host_iterator(*args, **kwargs, process_index=p, process_count=2) for p in range(2)]
  while True:
    parts = [next(h) for h in hosts]
    yield {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

data.pretrain_iterator = two_hosts
app.run(main.main, argv=sys.argv)
"""

# Ctrl-C in process 1's terminal during step 3, as its loop asks whether to stop after step 2.
CTRL_C_IN_PROCESS_1 = """
import os
import signal
import sys
import jax
from absl import app
from sit_jax import checkpoint, main

reached_preemption = checkpoint.Checkpointer.reached_preemption

def ctrl_c_at_step_2(self, step):
  if int(step) == 2 and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGINT)
  return reached_preemption(self, step)

checkpoint.Checkpointer.reached_preemption = ctrl_c_at_step_2
app.run(main.main, argv=sys.argv)
"""


def _env(num_devices):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  # Both sides compile with the same flags.
  env.update(XLA_FLAGS=conftest.xla_flags(num_devices),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def _wait(procs, timeout):
  deadline = time.time() + timeout
  outputs = [None] * len(procs)
  try:
    for i, proc in enumerate(procs):
      outputs[i] = proc.communicate(timeout=max(1, deadline - time.time()))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return outputs


def _two_processes(program, workdir, common):
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, *program, f"--workdir={workdir}", *common,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _check_exits(names, procs, outputs):
  codes = [p.returncode for p in procs]
  if codes[:2] != [0, 0]:
    stderr = "\n".join(err for _, err in outputs[:2])
    if any(marker in stderr for marker in _NO_GLOO):
      pytest.skip("gloo CPU collectives are unavailable in this jaxlib: " + stderr[-500:])
  for name, code, (_, err) in zip(names, codes, outputs):
    assert code == 0, f"{name} failed:\n{err[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The two-process job stopped by Ctrl-C in process 1, then resumed by the same command; the
  one-process reference beside it. Returns their workdirs, the resumed processes' outputs and
  the stopped processes' stderr."""
  if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
    pytest.skip("this jax has no CPU cross-process collectives "
                "(jax_cpu_collectives_implementation)")
  multi = str(tmp_path_factory.mktemp("two_processes"))
  single = str(tmp_path_factory.mktemp("one_process"))
  common = [f"--config={CONFIG}", *RUN_FLAGS]
  reference = subprocess.Popen(
      [sys.executable, "-c", REFERENCE, f"--workdir={single}", *common],
      cwd=REPO, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stopped = _two_processes(["-c", CTRL_C_IN_PROCESS_1], multi, common)
    stopped_outputs = _wait(stopped, timeout=360)
    _check_exits(("stopped process 0", "stopped process 1"), stopped, stopped_outputs)
    resumed = _two_processes(["-m", "sit_jax.main"], multi, common)
    outputs = _wait(resumed + [reference], timeout=360)
  finally:
    if reference.poll() is None:
      reference.kill()
      reference.communicate()
  _check_exits(("process 0", "process 1", "reference"), resumed + [reference], outputs)
  return multi, single, outputs, [err for _, err in stopped_outputs]


def test_two_processes_match_one_process(runs):
  multi, single, outputs, _ = runs
  got, want = _losses(multi), _losses(single)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step in want:
    for key in ("loss", "recon", "contrastive"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=2e-5,
                                 err_msg=f"{key} at step {step}")
    # The gradient norm sums the per-parameter noise of the all-reduce order, amplified by Adam's
    # normalised steps (see below): 6e-5 apart at step 4 with the PIL pipeline's pictures.
    np.testing.assert_allclose(got[step]["grad_norm"], want[step]["grad_norm"], rtol=2e-4,
                               err_msg=f"grad_norm at step {step}")
  # The k-NN monitor's final evaluation (bank and held-out features gathered from both
  # processes): the same neighbours, so the same top-1 (up to a float tie).
  for key in ("knn/student", "knn/teacher"):
    assert abs(got[4][key] - want[4][key]) <= 1 / 297 + 1e-9, (key, got[4][key], want[4][key])
  # Both processes took part: the job had 8 devices in 2 processes.
  assert "process 1 of 2, 4 local / 8 global devices" in outputs[1][1]
  # Only process 0 prints the progress lines.
  assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0]


def test_ctrl_c_in_one_process_saves_the_same_step_in_every_process(runs):
  """Ctrl-C ended process 1 alone, losing the steps since the last checkpoint, and process 0
  waited in its next collective until JAX's heartbeat aborted it a minute later. Now it is a
  preemption notice: every process saves the same step and ends with exit status 0."""
  multi, _, _, stopped_stderr = runs
  steps = [re.findall(r"Stopped at step (\d+) by a signal, saved in (\S+);", err)
           for err in stopped_stderr]
  assert steps[0] == steps[1] and len(steps[0]) == 1, stopped_stderr
  # That line alone: orbax warned "Reached preemption sync point" five times in each process.
  assert not any("preemption sync point" in err for err in stopped_stderr), stopped_stderr
  (step, path), = steps[0]
  assert int(step) < 4 and path == os.path.join(multi, "checkpoints", step)
  assert checkpoint.Checkpointer(os.path.join(multi, "checkpoints")).all_steps() == [int(step), 4]


def test_two_processes_save_checkpoints_and_backbone(runs):
  multi, single, _, _ = runs
  results = json.load(open(os.path.join(multi, "results.json")))
  assert results["step"] == 4 and not results["preempted"]
  got, config = checkpoint.load_backbone(os.path.join(multi, "backbone"))
  want, _ = checkpoint.load_backbone(os.path.join(single, "backbone"))
  assert config["variant"] == "Mu/4"
  # Adam moves even parameters with near-zero gradients by ~lr per step, so summation-order
  # noise in the all-reduce shows up at the scale of lr * steps (~1e-4), not of the float error.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


@pytest.mark.parametrize("env, flags, expected", [
    ({}, {}, None),
    ({"SLURM_NTASKS": "4"}, {}, None),  # a salloc shell, no srun step.
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, {}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
      "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}, {}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "x"}, {}, {}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "c:2", "process_id": 0},
     {"coordinator_address": "c:2", "num_processes": 2, "process_id": 0}),
    ({}, {"coordinator_address": "c:2", "num_processes": 1, "process_id": 0}, None),
])
def test_resolve_precedence(env, flags, expected):
  assert distributed.resolve(**flags, environ=env) == expected


def test_resolve_errors():
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    distributed.resolve("c:1", environ={})
  with pytest.raises(ValueError, match="outside 0..1"):
    distributed.resolve("c:1", 2, 2, environ={})
  assert distributed.resolve(environ={}, on_tpu_vm=True) == {}


SRUN_PTY = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # an interactive `srun --pty bash` step


def test_openmpi_jobs_are_found_as_jax_finds_them():
  """mpirun inside a one-task SLURM step is an 8-process MPI job (JAX checks OpenMPI first); an
  Open MPI 5 job, whose ranks lack the ORTE address JAX's detection reads, goes through mpi4py
  or takes its size and rank from Open MPI once the coordinator is given."""
  ompi4 = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_RANK": "3"}
  ompi5 = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}
  assert distributed.resolve(environ={**SRUN_PTY, **ompi4}) == {}  # left to JAX: OpenMPI
  assert distributed.resolve(environ=SRUN_PTY) is None              # one task: one process
  assert distributed.resolve(environ={**SRUN_PTY, **ompi5}, have_mpi4py=True) == {
      "cluster_detection_method": "mpi4py"}
  assert distributed.resolve(environ={**ompi5, "JAX_COORDINATOR_ADDRESS": "h:9"},
                             have_mpi4py=False) == {
      "coordinator_address": "h:9", "num_processes": 8, "process_id": 3}
  with pytest.raises(ValueError, match="Open MPI 5 job of 8 processes.*pip install mpi4py.*"
                     "JAX_COORDINATOR_ADDRESS"):
    distributed.resolve(environ=ompi5, have_mpi4py=False)
  assert distributed.resolve(environ={"OMPI_COMM_WORLD_SIZE": "1"}, have_mpi4py=False) is None
