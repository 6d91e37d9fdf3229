"""A multi-process job whose processes do not all succeed (jax.distributed over 127.0.0.1, gloo)."""
import contextlib
import json
import socket
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import PIL.Image
import pytest

from sit_jax import data, distributed, experiment, sharding

from test_multiprocess import REPO, _env, _free_port, _wait

STOPPED = ("sit_jax: error: Stopped by a signal outside a training loop, where nothing is saved "
           "part-way: start the same command again to go on (training resumes from its latest "
           "checkpoint).")


def _two_processes(tmp_path, flags, cwds=(REPO, REPO)):
  """Processes 0 and 1 of a job, each started in its directory with `flags` and its own
  (index -> list); their exit statuses and last lines on stderr."""
  if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
    pytest.skip("this jax has no CPU cross-process collectives")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sit_jax.main", "--config=configs/sit_vits.py:runlocal",
       f"--workdir={tmp_path / 'run'}", *flags[i],
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=cwds[i], env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = _wait(procs, timeout=90)
  codes = [p.returncode for p in procs]
  assert codes == [1, 1], [err[-2000:] for _, err in outputs]
  return [err.strip().splitlines()[-1] for _, err in outputs]


def test_an_error_in_one_process_ends_the_job(tmp_path):
  """Process 1 cannot read its data (the folder is not mounted on its host): it ends with its
  one line at once instead of waiting at jax.distributed's shutdown barrier, and process 0,
  whose next collective then fails, ends too and names process 1's error (both used to wait
  for each other until killed)."""
  hosts = [tmp_path / "host0", tmp_path / "host1"]
  (hosts[0] / "images").mkdir(parents=True)
  hosts[1].mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), np.uint8)
  for i, image in enumerate(pixels):
    PIL.Image.fromarray(image).save(hosts[0] / "images" / f"{i}.png")
  same = ["--config.data.source=folder:images"]
  last_lines = _two_processes(tmp_path, [same, same], cwds=hosts)
  missing = "image folder 'images' does not exist"
  assert last_lines[1] == f"sit_jax: error: {missing}"
  assert last_lines[0].startswith(f"sit_jax: error: process 1 of 2 failed: {missing} (this "
                                  "process then: ")


def test_processes_started_with_other_settings_are_refused(tmp_path):
  """Process 1 started with another total_steps trained its replica on another learning-rate
  schedule without a word, until the processes' collectives no longer matched (process 1
  saving its last step while process 0 trained on) and the job hung until killed."""
  last_lines = _two_processes(tmp_path, [["--config.total_steps=6"],
                                         ["--config.total_steps=4"]])
  assert last_lines == ["sit_jax: error: Process 1 of 2 was started with other settings than "
                        "process 0 (total_steps 6 vs 4): start every process with the same "
                        "command."] * 2


def test_hosts_that_find_other_data_are_refused(tmp_path, monkeypatch):
  """Each host reads its own copy of a folder: a host whose copy held 150 of the 200 images
  derived the epoch, and with it the learning-rate schedule (warmup 20 steps instead of 30),
  from its own count, and trained its replica on it without a word. Process 1 here, its folder
  beside what process 0 found (the collective's answer)."""
  for i, name in enumerate(["cat/0.png", "cat/1.png", "dog/0.png"]):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    PIL.Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / name)
  source = f"folder:{tmp_path}"
  monkeypatch.setattr(distributed, "joined", lambda: True)
  for found_by_0, differs in [((4, ["cat", "dog"]), "3 examples of 2 classes vs 4 examples of 2"),
                              ((3, ["cat", "cow"]), "other class folders vs process 0's")]:
    monkeypatch.setattr(distributed, "_every_process",
                        lambda text, found=found_by_0: [json.dumps(found), text])
    with pytest.raises(ValueError, match=rf"^Process 1 of 2 finds other data in {source} than "
                                         rf"process 0 \({differs}.*: every host must read the "
                                         "same split"):
      data.dataset_info(source, None)
  monkeypatch.setattr(distributed, "_every_process", lambda text: [text, text])
  assert data.dataset_info(source, None).num_examples == 3


def test_a_process_without_its_coordinator_ends_with_one_line(monkeypatch):
  """Process 1 whose coordinator is not there (process 0 not started, a wrong host or port, a
  firewall) waited 5 minutes in jax.distributed.initialize, then aborted with a C++ stack that
  blamed another process having died. It now waits as long for the port, then ends with one
  line naming the address; so does a SLURM task, whose rank JAX reads itself."""
  monkeypatch.setattr(distributed, "COORDINATOR_WAIT_SECONDS", 0)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: pytest.fail("jax waits 5 minutes, then aborts"))
  port = _free_port()
  with pytest.raises(ValueError, match=rf"^No coordinator at 127.0.0.1:{port} after 0 s: "
                                       "process 0 of the job serves it there"):
    distributed.initialize(f"127.0.0.1:{port}", 2, 1)
  # A task of launch/slurm_gpu.sbatch: the address from the script, the rank from SLURM.
  for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
                     "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                     "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(ValueError, match=rf"^No coordinator at 127.0.0.1:{port} after 0 s"):
    distributed.initialize()
  with pytest.raises(ValueError, match="must be HOST:PORT, got 'node001'"):
    distributed.initialize("node001", 2, 1)
  with socket.create_server(("127.0.0.1", 0)) as coordinator:
    distributed.wait_for_coordinator(f"127.0.0.1:{coordinator.getsockname()[1]}")


def test_processes_with_different_device_counts_are_refused():
  """A task given fewer GPUs than the others used to fail in the first collective with numpy's
  'cannot reshape array of size 6 into shape (2,4)'."""
  devices = [types.SimpleNamespace(process_index=p) for p in (0, 0, 0, 0, 1, 1)]
  with pytest.raises(ValueError, match=r"different numbers of devices \(process: devices "
                                       r"\{0: 4, 1: 2\}\)"):
    distributed.check_devices_per_process(devices)
  distributed.check_devices_per_process(devices[:2] + devices[4:])  # 2 and 2: fine


def test_a_workdir_the_hosts_do_not_share_is_refused(tmp_path):
  """Each host used to write its part of every checkpoint into a workdir of its own: the run
  failed only at its first save, and process 0's committed checkpoint lacked process 1's part."""
  shared, own = tmp_path / "shared", tmp_path / "own"
  shared.mkdir()
  own.mkdir()
  (own / experiment.LOCK_FILE).write_text("pid 1 on other-host since 2026-01-01T00:00:00\n")
  lock = experiment.WorkdirLock(str(shared))
  lock.acquire()
  try:
    mark = experiment.lock_mark(lock.holder)
    experiment.WorkdirLock(str(shared)).check_shared(mark, wait_seconds=0)
    for workdir in (own, tmp_path / "empty"):  # an earlier run's lock file, or none
      with pytest.raises(experiment.RunError, match=f"Workdir {workdir} is not shared"):
        experiment.WorkdirLock(str(workdir)).check_shared(mark, wait_seconds=0)
  finally:
    lock.release()


def test_a_model_axis_across_processes_is_refused():
  """Each process reads rows of its own; with mesh.model spanning processes those rows filled
  one shared replica of the batch, and the step trained on different data in each process."""
  def mesh_devices(processes, shape):
    devices = np.empty(len(processes), object)
    devices[:] = [types.SimpleNamespace(process_index=p) for p in processes]
    return devices.reshape(shape)

  with pytest.raises(ValueError, match=r"Mesh \{'data': 1, 'fsdp': 1, 'model': 3\}: the model "
                                       r"axis spans processes.* at most the 1 devices"):
    sharding.check_batch_rows_per_process(mesh_devices([0, 1, 2], (1, 1, 3)))
  with pytest.raises(ValueError, match="at most the 2 devices"):  # model 4 over 2 + 2
    sharding.check_batch_rows_per_process(mesh_devices([0, 0, 1, 1], (1, 1, 4)))
  # model 2 inside each of 2 processes, data x fsdp 2 x 2: each batch shard in one process.
  sharding.check_batch_rows_per_process(mesh_devices([0, 0, 0, 0, 1, 1, 1, 1], (2, 2, 2)))


# A process of a job (of 1: the notice and its exit are JAX's own), its SIGTERM watched as
# distributed.initialize watches it.
WATCHED = """
import os, signal, sys, time, jax
from sit_jax import distributed
jax.distributed.initialize(sys.argv[1], 1, 0)
distributed.watch_preemption_notice()
if sys.argv[2] == "sigterm":
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(60)
"""


def test_a_sigterm_outside_training_ends_the_job_with_one_line():
  """JAX's preemption service takes SIGTERM from Python on several processes, and only the
  training loops' sync point heard it: a two-process k-NN run sent SIGTERM went on to its end
  (exit status 0, 40 s later). It now ends with one line, exit status 1, as a head trained in
  memory does; a process that ends normally is not aborted by the watch."""
  for how, code, last_line in [("sigterm", 1, STOPPED), ("exit", 0, "")]:
    proc = subprocess.run([sys.executable, "-c", WATCHED, f"127.0.0.1:{_free_port()}", how],
                          cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=50)
    lines = [l for l in proc.stderr.splitlines() if not l.startswith(("I", "W"))]
    assert (proc.returncode, lines[-1:]) == (code, [last_line] if last_line else []), proc.stderr


class _Now(threading.Event):
  def wait(self, timeout=None):
    return False


def test_process_0_decides_for_the_job_whether_a_notice_ends_it(monkeypatch, capsys):
  """Processes a step apart at a training loop's start or end all end, or all leave the notice
  to the loop (which stops at the sync point, or finishes its last step): one ending alone
  would break the others' collectives."""
  store = {distributed._PREEMPTION_NOTICE: "now"}
  monkeypatch.setattr(distributed, "_client", lambda: types.SimpleNamespace(
      key_value_try_get=store.__getitem__, key_value_set=store.__setitem__))
  monkeypatch.setattr(distributed, "_ENDING", _Now())
  left = []
  monkeypatch.setattr(distributed, "leave", left.append)

  def watch(process, training):
    monkeypatch.setattr(jax, "process_index", lambda: process)
    with distributed.training_loop() if training else contextlib.nullcontext():
      distributed._end_at_preemption_notice()
    return left.pop() if left else None

  assert watch(0, training=True) is None and store[distributed._STOP] == "train"
  assert watch(1, training=False) is None  # process 0's loop stops at the sync point
  del store[distributed._STOP]
  assert watch(0, training=False) == 1 and store[distributed._STOP] == "end"
  assert watch(1, training=True) == 1
  assert capsys.readouterr().err.splitlines() == [STOPPED] * 2
