"""The set-up and closing of every run (pretraining and each transfer experiment).

    with experiment.Experiment(config, workdir) as exp:  # set up: see below
      ...                                               # read data, build the model
      writer = exp.writer(total_steps, global_batch_size)
      outcome = trainer.train(exp, ...)                 # and evaluations
      exp.finish(results)                               # results.json, one summary line

`Experiment` owns, in this order:
  * the workdir: created, probed for writing (one clear error otherwise) and locked against a
    second run (`WorkdirLock`; a multi-process job takes it on process 0 only), and refused
    when its config.json is another experiment's. A remote workdir (gs://bucket/run) is
    written through etils.epath and cannot be locked;
  * the log file DIR/log.txt (process 0): every log line of the run, starting with the command,
    the full config, which the console does not show, and the code, packages and devices that
    computed it (`environment`);
  * DIR/config.json: a run with checkpoints writes it once they accepted its settings
    (trainer.py), one without with its results (`finish`), so that a run refused or failed on
    the way leaves the config.json of the results there;
  * the mesh (`config.mesh`), and the check that each batch size divides over it;
  * the MetricWriter (`writer()`), created once the run knows its length;
  * results.json and the closing summary line (`finish`).
Leaving the `with` block (normally, on an error or on Ctrl-C) closes the writer, the log file and
the lock; on an error or Ctrl-C, a workdir the run created and saved nothing in is removed
(`Experiment.close`), so that a run refused in set-up leaves no directory that looks like a run's.
"""
from __future__ import annotations

import datetime
import errno
import importlib.metadata
import json
import logging as std_logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence
import uuid
import zlib

from absl import logging
from etils import epath
import jax
import numpy as np

from sit_jax import metrics, sharding

LOCK_FILE = ".lock"
LOG_FILE = "log.txt"
# The packages whose versions can change a run's numbers: what computes, what reads and
# decodes the data (Pillow's resampling, numpy's generators), what restores the checkpoints.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "pillow", "grain",
            "tensorflow-datasets", "tensorflow", "tensorflow-cpu")


def _source_revision() -> str:
  """The git commit of the sit_jax code that runs, and whether its tracked files differ from
  it; '' unless sit_jax runs from a checkout of its own (an install in site-packages may lie
  inside another project's repository)."""
  source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # --no-optional-locks: status must not take the index lock of a checkout someone edits.
  git = ["git", "--no-optional-locks", "-C", source]
  try:
    top, commit = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"],
                                 capture_output=True, text=True, timeout=10,
                                 check=True).stdout.split()
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, ValueError, subprocess.SubprocessError):
    return ""
  if not os.path.samefile(top, source):
    return ""
  return f"git {commit}{' with uncommitted changes' if changed.strip() else ''}"


def environment() -> str:
  """What besides the config decides a run's numbers, in one line for log.txt: the code's
  version, the installed PACKAGES and the devices (results on other ones differ by rounding)."""
  from sit_jax import __version__
  revision = _source_revision()
  packages = []
  for name in PACKAGES:
    try:
      packages.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  return (f"sit_jax {__version__}{f' ({revision})' if revision else ''}, python "
          f"{sys.version.split()[0]}, {', '.join(packages)}; {len(devices)} "
          f"{devices[0].platform} device(s) ({devices[0].device_kind}) in "
          f"{jax.process_count()} process(es)")


class RunError(RuntimeError):
  """A run that cannot start or could not finish; the message is one line saying what to do."""


class WorkdirBusy(RunError):
  """Another run holds the workdir's lock."""


def _lacks_credentials(error: Exception) -> bool:
  """Whether a storage client's error is HTTP 401: no credentials were found (gcsfs then asks as
  an anonymous caller, as TensorFlow's gfile does) or they expired. gcsfs' HttpError has the
  status as `code`; gfile's message names it."""
  return getattr(error, "code", None) == 401 or "response code 401" in str(error)


def ensure_writable(directory: str) -> str | None:
  """Creates `directory` and checks that files can be made in it (one clear error if not).

  Returns the topmost directory it created (`directory` or one above it), None where `directory`
  was there (and always for a remote one)."""
  if metrics.is_remote(directory):
    try:
      remote = epath.Path(directory)
      remote.mkdir(parents=True, exist_ok=True)
      probe = remote / f".write_probe_{uuid.uuid4().hex}"
      probe.write_bytes(b"")
      probe.unlink()
    except ImportError as e:  # etils reads gs:// through gcsfs, or TensorFlow's gfile
      raise ValueError(f"Workdir {directory} needs a client for its storage ({e}): "
                       "pip install 'sit_jax[gcs]' (gcsfs) for gs://.") from e
    except Exception as e:  # storage clients raise their own errors, not OSError
      if _lacks_credentials(e):
        raise PermissionError(
            f"Workdir {directory} cannot be reached without valid Google credentials "
            f"({type(e).__name__}: {e}): run `gcloud auth application-default login` (or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service account's key file), then the same "
            "command again.") from e
      raise PermissionError(f"Workdir {directory} is not writable ({type(e).__name__}: {e}): "
                            "pass a --workdir you can write to.") from e
    return None
  created = None
  path = directory
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    created, path = path, os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    # A unique name: every process of a multi-process job probes the same (shared) workdir.
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"Workdir {directory} is not writable ({e.strerror}): pass a "
                          "--workdir you can write to.") from e
  return created


class WorkdirLock:
  """An exclusive `flock` on DIR/.lock, which records the holder's pid, host and start time.

  The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
  stale file never blocks a new run. Only process 0 of a job locks: the other processes of the
  same job share its workdir by design.
  """

  def __init__(self, directory: str):
    self.path = os.path.join(directory, LOCK_FILE)
    self._fd = None
    self.holder = ""

  def acquire(self):
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirBusy(f"Workdir {os.path.dirname(self.path)} is in use by {holder}: wait "
                        "for that run to end, stop it, or pass another --workdir.") from None
    started = datetime.datetime.now().isoformat(timespec="seconds")
    self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, self.holder.encode(), 0)
    os.fsync(fd)  # for the job's other hosts (check_shared)
    self._fd = fd

  def check_shared(self, holder_mark: int, wait_seconds: float = 60.0):
    """On the other processes of a job: the lock file must be the one process 0 wrote
    (`holder_mark`: lock_mark of its holder line), else each host writes its part of every
    checkpoint into a workdir of its own and no host has a whole one. A shared filesystem may
    show the new file late: it is looked for during `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while True:
      try:
        with open(self.path) as f:
          if lock_mark(f.read()) == holder_mark:
            return
      except FileNotFoundError:
        pass
      if time.monotonic() >= deadline:
        raise RunError(
            f"Workdir {os.path.dirname(self.path)} is not shared by the processes of this job: "
            f"process {jax.process_index()} does not see the {LOCK_FILE} that process 0 wrote "
            "there. Each process writes its part of every checkpoint into the workdir: use a "
            "path that all hosts mount (a shared filesystem) or gs://.")
      time.sleep(1)

  def release(self):
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the lock; the file stays.
      self._fd = None


def lock_mark(holder: str) -> int:
  """A lock file's holder line as a number the job's processes can broadcast."""
  return zlib.crc32(holder.encode()) & 0x7FFFFFFF


def _from_orbax(record) -> bool:
  return f"{os.sep}orbax{os.sep}" in record.pathname


class _NotLibraryInfo(std_logging.Filter):
  """orbax logs a dozen INFO lines per checkpoint: the log file keeps its warnings only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not _from_orbax(record)


class _NoLibraryErrors(std_logging.Filter):
  """A failed save makes orbax log a traceback from each of its threads, and asyncio one for
  each of its writes when they are collected (hundreds of lines); checkpoint.py reports the
  failure in one line, so the console leaves them to log.txt. Installed for the rest of the
  process: the asyncio lines come at its exit."""

  def filter(self, record):
    return record.levelno < std_logging.ERROR or not (
        _from_orbax(record) or (record.name == "asyncio" and "orbax" in record.getMessage()))


_CONSOLE_FILTER = _NoLibraryErrors()


class _QuietErrors:
  """A full disk ends the run with its own one-line error; the log file does not add a
  '--- Logging error ---' traceback to the console for each line it cannot write."""

  def handleError(self, record):
    del record


class _LogFile(_QuietErrors, std_logging.FileHandler):
  pass


class _RemoteLogFile(_QuietErrors, std_logging.StreamHandler):
  """The log file of a remote workdir: a metrics.RemoteTextFile, uploaded every
  metrics.REMOTE_FLUSH_SECONDS and at close."""

  def __init__(self, path: str):
    super().__init__(metrics.RemoteTextFile(path))

  def close(self):
    try:
      self.stream.close()
    finally:
      super().close()


def _flat(tree: dict, prefix: str = "") -> dict:
  """{'optim': {'base_lr': 1}} -> {'optim.base_lr': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


class Experiment:
  """The workdir, lock, log file, config.json, mesh and writer of one run (see the module doc).

  Attributes: config, workdir (absolute, or a remote URL as given), mesh, is_main (process 0),
  and `metric_writer` once `writer()` was called.
  """

  def __init__(self, config, workdir: str, *, batch_sizes: dict[str, int] | None = None):
    """batch_sizes: {config key: batch size}, each of which must divide over the mesh; default
    the config's data.global_batch_size and eval_batch_size (where it has them)."""
    self.config = config
    remote = metrics.is_remote(workdir)
    self.workdir = os.fspath(workdir).rstrip("/") if remote else os.path.abspath(workdir)
    self.is_main = jax.process_index() == 0
    self.metric_writer = None
    # flock needs a local (or NFS) file: object storage has nothing like it.
    self._lock = None if remote else WorkdirLock(self.workdir)
    self._log_handler = None
    created = ensure_writable(self.workdir)
    self._lock_workdir()
    # What `_remove_if_unused` may remove on an error: the directories this run created, on the
    # process that holds their lock.
    self._created = created if self.is_main and self._lock is not None else None
    try:
      self._check_same_experiment()
      self._check_checkpoints_kept()
      self._open_log()
      if remote and self.is_main:
        logging.info("Workdir %s is remote: no lock is held, so make sure no other run "
                     "writes to it.", self.workdir)
      self.mesh = sharding.make_mesh(config.mesh)
      if batch_sizes is None:
        batch_sizes = {"data.global_batch_size": config.get("data", {}).get("global_batch_size"),
                       "eval_batch_size": config.get("eval_batch_size")}
      for key, size in batch_sizes.items():
        if size:
          try:
            sharding.check_batch_size(size, self.mesh)
          except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    except BaseException:
      self.close(failed=True)
      raise

  def _lock_workdir(self):
    if self._lock is None:
      return
    busy = None
    if self.is_main:
      try:
        self._lock.acquire()
      except WorkdirBusy as e:
        busy = e
    if jax.process_count() > 1:  # the other processes of the job stop with process 0.
      from jax.experimental import multihost_utils
      mark = lock_mark(self._lock.holder) if self.is_main and busy is None else 0
      taken, mark = multihost_utils.broadcast_one_to_all(
          (np.int32(busy is not None), np.int32(mark)))
      if taken and busy is None:
        busy = WorkdirBusy(f"Workdir {self.workdir} is in use by another run (process 0 of "
                           "this job could not lock it): wait for that run to end, stop it, or "
                           "pass another --workdir.")
      if not taken and not self.is_main:
        self._lock.check_shared(int(mark))
    if busy is not None:
      raise busy

  def _check_same_experiment(self):
    """Refuses a workdir whose config.json is another experiment's: the run would replace its
    results.json and add its rows to its metrics.jsonl."""
    text = metrics.read_text(os.path.join(self.workdir, "config.json"))
    earlier = json.loads(text).get("experiment") if text else None
    if earlier and self.config.get("experiment") and earlier != self.config.experiment:
      raise RunError(f"Workdir {self.workdir} holds a {earlier!r} run (its config.json), not "
                     f"{self.config.experiment!r}: running here would replace its results.json "
                     "and mix its metrics.jsonl; pass another --workdir.")

  def _check_checkpoints_kept(self):
    """Refuses a workdir whose results.json names a checkpoint that is no longer there (the
    checkpoints deleted to save space, say): a run here would start again from step 0 and
    replace what the finished run left."""
    if self._has_checkpoints():
      return
    text = metrics.read_text(os.path.join(self.workdir, "results.json"))
    named = json.loads(text).get("checkpoint") if text else None
    if named:
      backbone = (" and backbone/" if epath.Path(os.path.join(self.workdir, "backbone")).exists()
                  else "")
      raise RunError(
          f"Workdir {self.workdir} holds a finished run whose checkpoint ({named}, named in its "
          f"results.json) is gone: a run here would train again from step 0 and replace its "
          f"results.json, metrics.jsonl, its pictures{backbone}. Pass another --workdir, or delete "
          "results.json there to train again in it.")

  def _open_log(self):
    if not self.is_main:
      return
    path = os.path.join(self.workdir, LOG_FILE)
    handler = _RemoteLogFile(path) if metrics.is_remote(path) else _LogFile(path)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_NotLibraryInfo())
    handler.setLevel(std_logging.INFO)
    # The command beside the resolved config: how the run was asked for (overrides, arguments);
    # none where no script started the process (python -c, an interpreter).
    command = f"Command: {shlex.join(sys.argv)}\n" if os.path.isfile(sys.argv[0]) else ""
    handler.stream.write(f"{command}Config:\n{self.config}\nEnvironment: {environment()}\n")
    handler.flush()
    std_logging.getLogger().addHandler(handler)
    self._log_handler = handler
    logging.get_absl_handler().addFilter(_CONSOLE_FILTER)  # a no-op if already there

  def writer(self, total_steps: int, global_batch_size: int) -> metrics.MetricWriter:
    """The run's MetricWriter (metrics.jsonl, TensorBoard, pictures, progress lines). A run
    with no checkpoint to resume (an evaluation run again, say) starts metrics.jsonl and the
    TensorBoard series afresh, as its results.json; a resumed run's trainer cuts them after the
    resumed step."""
    self.metric_writer = metrics.MetricWriter(self.workdir, total_steps=total_steps,
                                              global_batch_size=global_batch_size,
                                              log_file=self._log_handler)
    if self.is_main and not self._has_checkpoints():
      self.metric_writer.drop_after(-1)
    return self.metric_writer

  def _has_checkpoints(self) -> bool:
    checkpoints = epath.Path(os.path.join(self.workdir, "checkpoints"))
    return checkpoints.is_dir() and any(checkpoints.iterdir())

  def changed_settings(self) -> list[str]:
    """'key old -> new' for each setting of the config that differs from DIR/config.json's
    (the config of the run that wrote the checkpoints); [] without a config.json."""
    text = metrics.read_text(os.path.join(self.workdir, "config.json"))
    if not text:
      return []
    earlier = _flat(json.loads(text))
    now = _flat(json.loads(metrics.to_json(self.config.to_dict())))
    return [f"{key} {earlier.get(key, 'unset')} -> {now.get(key, 'unset')}"
            for key in sorted(set(earlier) | set(now)) if earlier.get(key) != now.get(key)]

  def write_config(self) -> str:
    """DIR/config.json: the config of this run. A run that resumes writes it only after the
    checkpoint accepted its settings, so a refused resume leaves the one the checkpoints
    were trained with."""
    return self.write_json("config.json", self.config.to_dict())

  def write_json(self, filename: str, obj) -> str:
    """Atomically writes DIR/filename from process 0; returns its path."""
    path = os.path.join(self.workdir, filename)
    if self.is_main:
      metrics.write_json(path, obj)
    return path

  def finish(self, results: dict, *, also: Sequence[str] = ()):
    """Writes results.json and logs one line saying what this run wrote where; raises RunError
    if results has an 'error' (training stopped on NaN, say).

    `also` names further outputs (paths under the workdir, or absolute) for the line; the
    checkpoint and backbone paths in `results` are named without being listed.
    """
    self.write_config()
    self.write_json("results.json", results)
    wrote = ["results.json", "metrics.jsonl", "config.json", LOG_FILE]
    wrote += [self._relative(results[key]) for key in ("checkpoint", "backbone")
              if results.get(key)]
    wrote += [self._relative(p) for p in also]
    if epath.Path(os.path.join(self.workdir, "images")).is_dir():  # local or remote
      wrote.append("images/")
    if self.metric_writer is not None and self.metric_writer.writes_tensorboard:
      wrote.append("tb/")  # a remote one may not be uploaded yet: the writer says
    if self.is_main:  # the others wrote none of it (their share of a checkpoint aside)
      logging.info("Wrote %s in %s", ", ".join(wrote), self.workdir)
    if results.get("error"):
      raise RunError(results["error"])

  def _relative(self, path: str) -> str:
    """`path` relative to the workdir where it is under it, for the closing line."""
    path = os.fspath(path)
    if metrics.is_remote(self.workdir) or metrics.is_remote(path):
      return path[len(self.workdir) + 1:] if path.startswith(self.workdir + "/") else path
    return os.path.relpath(path, self.workdir) if os.path.isabs(path) else path

  def close(self, *, failed: bool = False):
    """Closes the writer, the log file and the lock; the lock is released whatever fails.

    failed: the run ends on an error or Ctrl-C; a workdir it created and saved nothing in goes
    (`_remove_if_unused`).
    """
    try:
      if self.metric_writer is not None:
        writer, self.metric_writer = self.metric_writer, None
        writer.close()
    finally:
      try:
        if self._log_handler is not None:
          handler, self._log_handler = self._log_handler, None
          std_logging.getLogger().removeHandler(handler)
          handler.close()  # remote: the last upload of log.txt
      finally:
        if failed:
          self._remove_if_unused()
        elif self._lock is not None:
          self._lock.release()

  def _remove_if_unused(self):
    """Releases the lock; and where this run created the workdir and saved nothing in it (it
    holds only what set-up writes: `_set_up_paths`), removes those and the directories this run
    created. Never raises: the run's error is the one to report."""
    removed = False
    try:
      paths = self._set_up_paths() if self._created else None
      for path in paths or ():  # the lock file last, still held: no other run can take it
        (os.rmdir if os.path.isdir(path) else os.remove)(path)
      removed = paths is not None
    except OSError:
      pass
    finally:
      if self._lock is not None:
        self._lock.release()
    if not removed:
      return
    directory = self.workdir
    try:  # fails, leaving them, where someone put something there meanwhile
      while True:
        os.rmdir(directory)
        if directory == self._created:
          return
        directory = os.path.dirname(directory)
    except OSError:
      pass

  def _set_up_paths(self) -> list[str] | None:
    """The workdir's entries, the lock file last, when they are only what set-up writes: the
    lock, log.txt, an empty metrics.jsonl and tb/ with its event files (which hold a row only
    where metrics.jsonl does); None if it holds anything else (a checkpoint, config.json,
    results.json, a backbone, cached features, pictures, a file someone put there)."""
    paths = []
    for entry in list(os.scandir(self.workdir)):
      if entry.name == "tb" and entry.is_dir(follow_symlinks=False):
        events = list(os.scandir(entry.path))
        if not all(e.name.startswith("events.") and e.is_file(follow_symlinks=False)
                   for e in events):
          return None
        paths += [e.path for e in events] + [entry.path]
      elif entry.name == "metrics.jsonl" and entry.is_file(follow_symlinks=False):
        if entry.stat().st_size:
          return None
        paths.append(entry.path)
      elif entry.name == LOG_FILE and entry.is_file(follow_symlinks=False):
        paths.append(entry.path)
      elif entry.name != LOCK_FILE:
        return None
    return paths + [os.path.join(self.workdir, LOCK_FILE)]

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc is None:
      self.close()
      return
    if self._log_handler is not None:  # the console gets the error from main.py.
      self._log_handler.handle(std_logging.makeLogRecord(dict(
          levelno=std_logging.ERROR, levelname="ERROR", msg=f"{exc_type.__name__}: {exc}")))
    try:  # the error on its way out says what happened, not a failure to close after it.
      self.close(failed=True)
    except Exception:  # pylint: disable=broad-except
      logging.debug("Closing %s after an error", self.workdir, exc_info=True)
