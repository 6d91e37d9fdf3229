"""Multi-process start-up: one process per host (TPU pods) or per GPU (SLURM / OpenMPI).

Which processes form the job, in order of precedence:
  1. explicit arguments (main.py's --coordinator_address, --num_processes, --process_id);
  2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  3. what JAX detects by itself: an OpenMPI job (mpirun), a SLURM step (srun), a Cloud TPU VM;
     an Open MPI 5 job, which it misses, through mpi4py or with JAX_COORDINATOR_ADDRESS.
A lone process (none of the above, or a job of size 1) does not start jax.distributed at all.
A process other than 0 with a coordinator address (an explicit one, or slurm_gpu.sbatch's) waits
for that port to open and, if it does not within JAX's 5 minutes, ends with one line naming the
address.
On CPU the cross-process collectives go through gloo.

A process that fails ends at once (`leave`), so that the job ends instead of hanging: at a normal
exit jax.distributed's shutdown waits at a barrier (5 minutes) for the other processes, which
meanwhile wait for the failed one in their next collective. Its error goes to the coordination
service's key-value store, and a process ended by that failure (its collective finds the peer
gone) names it (`first_error`) instead of its own broken collective. Every process must run the
same config (`check_same_config`) and find the same data (`check_same_data`).

JAX's preemption service takes SIGTERM from Python in every process and tells only its sync
point, which training loops ask at every step (`training_loop`); elsewhere (a k-NN run, feature
extraction, after a loop's last step) a SIGTERM to any process ends the job with one line
(`watch_preemption_notice`). A lone process ends with the same line (`end_at_sigterm`).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging


def _int_or_none(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def _openmpi_job(environ: Mapping[str, str]) -> bool:
  return "OMPI_MCA_orte_hnp_uri" in environ or "OMPI_COMM_WORLD_SIZE" in environ


def _slurm_step(environ: Mapping[str, str]) -> bool:
  # JAX's own SLURM detection needs all of these; SLURM_NTASKS alone is also set in a plain
  # `salloc` shell, where no srun step (and no peer process) exists.
  return all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                                    "SLURM_PROCID", "SLURM_LOCALID"))


def detected_job_size(environ: Mapping[str, str] = os.environ) -> int | None:
  """Number of processes a SLURM step, OpenMPI job or TPU pod slice announces, else None."""
  # An OpenMPI job first, as JAX checks: mpirun inside an `srun --pty bash` step is MPI's job.
  if _openmpi_job(environ):
    return _int_or_none(environ.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
  if _slurm_step(environ):
    return _int_or_none(environ["SLURM_NTASKS"], "SLURM_NTASKS")
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
  if hosts:
    return len([h for h in hosts.split(",") if h.strip()])
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return 2  # multislice: several hosts by definition.
  return None


def detected_process_id(environ: Mapping[str, str] = os.environ) -> int | None:
  """This process's rank in the OpenMPI job or SLURM step that announces one, else None."""
  if _openmpi_job(environ):
    return _int_or_none(environ.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK")
  if _slurm_step(environ):
    return _int_or_none(environ["SLURM_PROCID"], "SLURM_PROCID")
  return None


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src import cloud_tpu_init
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def _open_mpi_5(environ: Mapping[str, str]) -> bool:
  """An mpirun of Open MPI 5: its ranks have OMPI_COMM_WORLD_* but not the ORTE address that JAX's
  OpenMPI detection looks for."""
  return "OMPI_COMM_WORLD_SIZE" in environ and "OMPI_MCA_orte_hnp_uri" not in environ


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] = os.environ,
            on_tpu_vm: bool = False, have_mpi4py: bool | None = None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None for a single process.

  Missing values are left to JAX's cluster detection (SLURM, OpenMPI, Cloud TPU); an Open MPI 5
  job, which it misses, goes through mpi4py's, or takes its size and rank from Open MPI with the
  coordinator address given.
  """
  coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _int_or_none(environ.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_or_none(environ.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID")
  if _open_mpi_5(environ) and (detected_job_size(environ) or 1) > 1:
    if coordinator_address is None:
      if have_mpi4py is None:
        import importlib.util
        have_mpi4py = importlib.util.find_spec("mpi4py") is not None
      if not have_mpi4py:
        raise ValueError(
            f"An Open MPI 5 job of {environ['OMPI_COMM_WORLD_SIZE']} processes, which JAX does "
            "not detect by itself: pip install mpi4py (JAX then reads the job from MPI), or set "
            "JAX_COORDINATOR_ADDRESS=HOST:PORT of rank 0 (e.g. mpirun -x "
            "JAX_COORDINATOR_ADDRESS=$(hostname):12345 ...).")
      return {"cluster_detection_method": "mpi4py"}
    if num_processes is None:
      num_processes = int(environ["OMPI_COMM_WORLD_SIZE"])
    if process_id is None:
      process_id = _int_or_none(environ.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK")
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  size = num_processes if num_processes is not None else detected_job_size(environ)
  if size is not None:
    if size < 1:
      raise ValueError(f"The number of processes must be >= 1, got {size}.")
    if process_id is not None and not 0 <= process_id < size:
      raise ValueError(f"process_id {process_id} is outside 0..{size - 1}.")
    return kwargs if size > 1 else None
  if kwargs:
    if "coordinator_address" in kwargs and len(kwargs) < 3:
      raise ValueError(
          "A coordinator address was given but not the number of processes and this "
          "process's id, and no SLURM/OpenMPI job was detected: pass --num_processes and "
          "--process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID) too.")
    return kwargs
  # A TPU VM: JAX reads the slice's workers from the metadata server (one worker -> 1 process).
  return {} if on_tpu_vm else None


def _use_gloo_on_cpu():
  """Cross-process collectives on the CPU backend need gloo (set before any backend starts)."""
  if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    return  # the user's choice; JAX reads it itself.
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:
    return
  if current in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed when this is one of several processes; returns whether it did. A
  SIGTERM outside a training loop then ends any process with one line (a lone one too)."""
  on_tpu_vm = _on_cloud_tpu_vm()
  kwargs = resolve(coordinator_address, num_processes, process_id, os.environ, on_tpu_vm)
  if kwargs is None:
    end_at_sigterm()
    return False
  if ("coordinator_address" in kwargs
      and kwargs.get("process_id", detected_process_id(os.environ))):
    wait_for_coordinator(kwargs["coordinator_address"])
  _use_gloo_on_cpu()
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    if kwargs or not on_tpu_vm:
      raise
    # A TPU VM whose metadata does not describe a slice (e.g. Colab): a single host.
    logging.warning("jax.distributed not started (%s); running as a single process.", e)
    end_at_sigterm()
    return False
  check_devices_per_process(jax.devices())
  if preemption_service():
    watch_preemption_notice()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# As long as jax.distributed.initialize waits for the coordinator (its initialization_timeout).
COORDINATOR_WAIT_SECONDS = 300


def wait_for_coordinator(address: str, seconds: float | None = None):
  """Waits until process 0's coordination service at `address` (HOST:PORT) takes connections.
  JAX's own wait ends, after as long, in an abort with a C++ stack that blames another process
  having died."""
  seconds = COORDINATOR_WAIT_SECONDS if seconds is None else seconds
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"The coordinator address must be HOST:PORT, got {address!r}.")
  deadline = time.monotonic() + seconds
  for attempt in itertools.count():
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
      return
    except OSError:
      if attempt == 0:
        logging.info("Waiting up to %.0f s for the coordinator at %s (process 0).", seconds,
                     address)
      if time.monotonic() >= deadline:
        raise ValueError(
            f"No coordinator at {address} after {seconds:.0f} s: process 0 of the job serves it "
            "there. Start process 0 with the same address, or check the host and port, and "
            "that this host can reach it on that port.") from None
      time.sleep(1)


def check_devices_per_process(devices):
  """Every process must hold the same number of `devices` (the job's): the batch is split evenly
  over the processes, and each host's share evenly over its devices."""
  counts = collections.Counter(d.process_index for d in devices)
  if len(set(counts.values())) > 1:
    raise ValueError(
        f"The processes of the job have different numbers of devices (process: devices "
        f"{dict(sorted(counts.items()))}); each needs the same number: check the devices every "
        "task is given (CUDA_VISIBLE_DEVICES, --gpus-per-task).")


def _every_process(text: str) -> list[str]:
  """`text` of every process of the job, in process order (a collective: every process calls)."""
  from jax.experimental import multihost_utils
  encoded = text.encode()
  lengths = multihost_utils.process_allgather(np.int32(len(encoded)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  return [row[:n].tobytes().decode() for row, n in
          zip(multihost_utils.process_allgather(padded), lengths)]


def check_same_config(config):
  """Every process must run the same config: one started with other settings (another
  total_steps, say) trained its devices' replica with them (another learning-rate schedule)
  without a word, until the processes' collectives no longer matched and the job hung."""
  from sit_jax import config_check, metrics
  texts = _every_process(metrics.to_json(config.to_dict(), sort_keys=True))
  other = next((p for p, t in enumerate(texts) if t != texts[0]), None)
  if other is None:
    return
  first, theirs = (config_check.flatten(json.loads(texts[p])) for p in (0, other))
  changed = [f"{key} {first.get(key, 'unset')} vs {theirs.get(key, 'unset')}"
             for key in sorted(set(first) | set(theirs)) if first.get(key) != theirs.get(key)]
  raise ValueError(f"Process {other} of {len(texts)} was started with other settings than "
                   f"process 0 ({'; '.join(changed)}): start every process with the same "
                   "command.")


def check_same_data(name: str, num_examples: int, classes: int | tuple[str, ...]):
  """Every process must find the same split `name`, of `num_examples` and `classes` (a count, or
  a folder's class names): a host whose copy of a folder held other images derived the epoch,
  and with it the learning-rate schedule, from its own count and trained its devices' replica
  on it without a word. A collective: every process calls."""
  texts = _every_process(json.dumps([num_examples, classes]))
  other = next((p for p, t in enumerate(texts) if t != texts[0]), None)
  if other is None:
    return
  found = []
  for n, labels in (json.loads(texts[p]) for p in (other, 0)):
    count = len(labels) if isinstance(labels, list) else labels
    found.append(f"{n} examples" + (f" of {count} classes" if count else ""))
  if found[0] == found[1]:
    found = ["other class folders", "process 0's"]
  raise ValueError(f"Process {other} of {len(texts)} finds other data in {name} than process 0 "
                   f"({found[0]} vs {found[1]}): every host must read the same split (the same "
                   "files, or a data_dir they share).")


_ERRORS = "sit_jax/errors/"  # key-value directory: process index -> its error


def _state():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state


def _client():
  return _state().client


def preemption_service() -> bool:
  """Whether JAX's preemption service runs (in a multi-process job, unless disabled)."""
  return _state().preemption_sync_manager is not None


def joined() -> bool:
  """Whether this process started jax.distributed (is one of a multi-process job)."""
  return _client() is not None


def first_error(message: str) -> str:
  """The line to print for `message`, this process's error: recorded for the other processes;
  if one recorded its own before (its exit is what broke this process's collectives), the line
  names that process and its error first."""
  client = _client()
  try:
    reported = sorted(client.key_value_dir_get(_ERRORS))
    client.key_value_set(f"{_ERRORS}{jax.process_index()}", message)
  except Exception:  # pylint: disable=broad-except  (the coordinator, in process 0, is gone)
    return message
  earlier = [(key[len(_ERRORS):], text) for key, text in reported if text != message]
  if not earlier:
    return message
  process, text = earlier[0]
  return (f"process {process} of {jax.process_count()} failed: {text} (this process then: "
          f"{message})")


_LEFT = "sit_jax/left/"  # key-value directory: the processes other than 0 that are leaving
# How long process 0 waits for the others to leave too (see `leave`).
LEAVE_WAIT_SECONDS = 10


def leave(code: int):
  """Ends this process of a multi-process job with exit status `code` at once, without
  jax.distributed's shutdown barrier (see the module doc).

  Process 0 serves the coordination service, and its exit aborts every process still connected
  (SIGABRT and a C++ stack, before that process prints its own line): where all processes fail
  together (a check every process makes alike), it waits for the others to leave first, up to
  LEAVE_WAIT_SECONDS (which a failure of process 0 alone adds to the job's end)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  client = _client()
  try:
    if jax.process_index() != 0:
      client.key_value_set(f"{_LEFT}{jax.process_index()}", "")
    else:
      deadline = time.monotonic() + LEAVE_WAIT_SECONDS
      while (len(client.key_value_dir_get(_LEFT)) < jax.process_count() - 1
             and time.monotonic() < deadline):
        time.sleep(0.05)
  except Exception:  # pylint: disable=broad-except  (the coordinator, in process 0, is gone)
    pass
  os._exit(code)  # pylint: disable=protected-access


# Where JAX's preemption service (XLA's PreemptionSyncManager) records that a process of the job
# received SIGTERM, for every process to read.
_PREEMPTION_NOTICE = "RECEIVED_PREEMPTION_NOTICE"
_STOP = "sit_jax/stop"  # process 0's answer to the notice: "end", or "train" (see `training_loop`)
_IN_TRAINING = threading.Event()
_ENDING = threading.Event()  # the program ends: stop waiting for the notice.
_ANSWERING = threading.Lock()  # process 0 answers once: from the watch, or at a loop's end.
STOPPED = ("Stopped by a signal outside a training loop, where nothing is saved part-way: start "
           "the same command again to go on (training resumes from its latest checkpoint).")


@contextlib.contextmanager
def training_loop():
  """Inside (a training loop, to its last save committed), a SIGTERM is the loop's: it stops at
  JAX's preemption sync point, the same step on every process (checkpoint.reached_preemption),
  or, after the loop's last step, the run finishes. A notice the watch has not read yet when the
  loop ends (it looks every second) is the loop's too: answered then, it no longer ends a run
  whose last step is saved, or the wait for that save, with exit status 1."""
  _IN_TRAINING.set()
  try:
    yield
  finally:
    with _ANSWERING:
      try:
        if jax.process_index() == 0 and _client().key_value_try_get(_PREEMPTION_NOTICE):
          _answer("train")
      except Exception:  # pylint: disable=broad-except  (no notice)
        pass
      _IN_TRAINING.clear()


def _answer(answer: str) -> str:
  """Process 0's answer to the notice for every process: `answer`, unless it gave one already.
  Called holding _ANSWERING."""
  try:
    return _client().key_value_try_get(_STOP)
  except Exception:  # pylint: disable=broad-except  (not answered yet)
    _client().key_value_set(_STOP, answer)
    return answer


def _wait_for(key: str) -> str | None:
  """`key`'s value once a process sets it (looked up every second); None if the program ends
  first."""
  while not _ENDING.wait(1):
    try:
      return _client().key_value_try_get(key)
    except Exception:  # pylint: disable=broad-except  (not set yet)
      pass
  return None


def watch_preemption_notice():
  """Starts `_end_at_preemption_notice` in a thread, ended before jax's own exit handler shuts
  jax.distributed down: a thread still in its calls then aborts the process ("terminate called
  after throwing an instance of ''")."""
  watcher = threading.Thread(target=_end_at_preemption_notice, daemon=True)
  watcher.start()
  atexit.register(lambda: (_ENDING.set(), watcher.join()))


def end_at_sigterm():
  """A lone process's `watch_preemption_notice`: a SIGTERM outside a training loop (the loop
  takes it itself: checkpoint.stop_signals) ends the process with the job's line, exit status 1,
  where Python's default ended it with none (exit status 143). After a loop's last step (the
  final evaluations, the backbone export, results.json) the last step is saved: the same command
  resumes the finished run and does them again. From the main thread."""
  signal.signal(signal.SIGTERM, _end_at_sigterm)


def _end_at_sigterm(signum, frame):
  del signum, frame
  # Raised, not os._exit: cleanups run (a temporary file is removed, log.txt records the stop,
  # the workdir's lock is released). A SystemExit, which no `except Exception` (a picture's
  # warning) takes for an error to go on after; Python prints its text and exits with status 1.
  raise SystemExit(f"sit_jax: error: {STOPPED}")


def _end_at_preemption_notice():
  """Ends this process with one line (exit status 1, as a head trained in memory does) once a
  process of the job has received SIGTERM outside a training loop. Process 0 decides for every
  process, which may be a step apart at a loop's start or end: the job ends together, or leaves
  the notice to the loop together."""
  if _wait_for(_PREEMPTION_NOTICE) is None:
    return
  if jax.process_index() == 0:
    with _ANSWERING:
      answer = _answer("train" if _IN_TRAINING.is_set() else "end")
  else:
    answer = _wait_for(_STOP)
  if answer == "end":
    print(f"sit_jax: error: {STOPPED}", file=sys.stderr)
    leave(1)
