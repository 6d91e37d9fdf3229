"""Metric logging: metrics.jsonl, TensorBoard, PNG images and a progress line.

Only the main process (jax.process_index() == 0) writes anything; on the other
processes every method returns immediately without touching device values.

A workdir may be remote (gs://bucket/run, any path with "://"), written through etils.epath.
Object stores cannot append, so metrics.jsonl (and the log file, experiment.py) are kept in
memory and rewritten whole, and TensorBoard writes to a local temporary directory that is
copied over: both every REMOTE_FLUSH_SECONDS from a background thread, at flush() and at close.
"""
from __future__ import annotations

import datetime
import io
import json
import logging as std_logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np


def _to_number(name: str, value) -> float | int:
  """An int where the value is one (a count: skipped images, L-BFGS iterations), else a float:
  the progress line prints a count as an integer and a loss of exactly 2.0 as 2.0000."""
  # np.asarray on a jax.Array blocks on the device; that is why this is only
  # called from write_scalars, i.e. at logging steps.
  arr = np.asarray(value)
  if arr.size != 1:
    raise TypeError(f"Scalar {name!r} has shape {arr.shape}; expected a scalar.")
  return int(arr.reshape(())) if np.issubdtype(arr.dtype, np.integer) else float(arr.reshape(()))


def _fmt_value(name: str, v: float | int) -> str:
  if isinstance(v, int) or not math.isfinite(v):
    return str(v)
  if "lr" in name.split("/")[-1].lower() or "learning_rate" in name.lower():
    return f"{v:.1e}"
  if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
    return f"{v:.3e}"
  return f"{v:.4f}"


# Characters TensorBoard refuses in a tag (tensorboardX's SummaryWriter replaced each with "_" and
# logged a line per tag at every write: 16 for a k-NN run's "knn/val/k=10/top1" and the like).
_NOT_IN_TENSORBOARD_TAGS = re.compile(r"[^-/\w.]")


def _import_tensorboardx():
  """Imports tensorboardX without torch. Its package __init__ imports SummaryWriter's module,
  which imports torch where it is installed (as with the `torch` extra, or on a GPU server) for
  one isinstance check: 1.3 CPU seconds and 470 MB of host memory in every process of a run,
  for a writer that sit_jax does not use (EventsWriter and the protos do not need torch)."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX  # noqa: F401
    return
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects.
  try:
    import tensorboardX  # noqa: F401
  finally:
    del sys.modules["torch"]


def _tensorboard_tag(name: str) -> str:
  """The TensorBoard tag of metric `name`: the name, "_" for each character tags cannot hold."""
  return _NOT_IN_TENSORBOARD_TAGS.sub("_", name).lstrip("/")


def json_default(o):
  """json.dumps(default=...) for numpy and JAX values and dates."""
  if isinstance(o, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(o).tolist()
  if isinstance(o, (datetime.date, datetime.datetime)):
    return o.isoformat()
  raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _finite_or_none(obj):
  """NaN and inf -> None (JSON null): strict JSON has no NaN, and readers choke on it."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  return obj


def to_json(obj, **kwargs) -> str:
  """Strict JSON (non-finite floats as null) of dicts holding numpy, JAX and date values."""
  obj = json.loads(json.dumps(obj, default=json_default))
  return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


_compiled = {"seconds": 0.0, "listening": False}


def compile_seconds() -> float:
  """The seconds this process has spent in XLA's compiler since its first call (jax.monitoring's
  backend compile events; tracing and lowering, a small part, are not in them)."""
  if not _compiled["listening"]:
    def add(event: str, seconds: float, **kwargs):
      del kwargs
      if event == "/jax/core/compile/backend_compile_duration":
        _compiled["seconds"] += seconds
    jax.monitoring.register_event_duration_secs_listener(add)
    _compiled["listening"] = True
  return _compiled["seconds"]


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# How often a remote workdir's log.txt, metrics.jsonl and TensorBoard events are uploaded. Each
# upload rewrites whole objects; a run killed without closing them (kill -9, a lost VM) loses
# about the last this many seconds of them (a resumed run redoes the steps since its checkpoint).
REMOTE_FLUSH_SECONDS = 30.0


def is_remote(path) -> bool:
  """A path on object storage (gs://bucket/..., s3://...), read and written through epath."""
  return "://" in str(path)


# The remote text files this process has open, by path: drop_rows_after and read_text go through
# them, as the next upload would overwrite a change made to the object itself.
_OPEN_REMOTE_FILES: dict[str, RemoteTextFile] = {}


def atomic_write(path: str, write):
  """Calls write(binary file) on a temporary file beside `path`, then renames it to `path`, so
  readers never see a partial file. The file gets the mode open() would give (0644 under the
  usual umask), not mkstemp's 0600. A remote path (gs://...) is written in one upload, which
  makes the object appear whole or not at all."""
  if is_remote(path):
    from etils import epath
    buffer = io.BytesIO()
    write(buffer)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)  # no-op on buckets; other stores need it
    target.write_bytes(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path, text: str):
  atomic_write(os.fspath(path), lambda f: f.write(text.encode()))


def write_json(path, obj):
  atomic_write_text(path, to_json(obj, indent=2) + "\n")


def _kept_length(lines, step: int) -> int:
  """The length of the leading `lines` (of metrics.jsonl) whose step is `step` or earlier."""
  keep = 0
  for line in lines:
    try:
      if json.loads(line)["step"] > step:
        break
    except (ValueError, KeyError, TypeError):
      break  # a torn last line (the process was killed mid-write) goes too.
    keep += len(line)
  return keep


def drop_rows_after(path: str, step: int):
  """Cuts metrics.jsonl after the last row of `step` or earlier: a resumed run redoes the later
  steps and writes their rows again. Truncates in place, so a writer that holds the file open
  in append mode keeps appending at the new end (for a remote file, the writer's copy is cut)."""
  path = os.fspath(path)
  if is_remote(path):
    held = _OPEN_REMOTE_FILES.get(path)
    if held is not None:
      held.truncate(_kept_length(io.StringIO(held.getvalue()), step))
      return
    from etils import epath
    remote = epath.Path(path)
    if remote.exists():
      data = remote.read_bytes()
      keep = _kept_length(io.BytesIO(data), step)
      if keep < len(data):
        remote.write_bytes(data[:keep])
    return
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    keep = _kept_length(f, step)
  os.truncate(path, keep)


def read_text(path) -> str | None:
  """The text of a local or remote file, None where there is none. A remote file this process
  holds open (metrics.jsonl) reads as written so far, uploaded or not."""
  path = os.fspath(path)
  if is_remote(path):
    held = _OPEN_REMOTE_FILES.get(path)
    if held is not None:
      return held.getvalue()
    from etils import epath
    remote = epath.Path(path)
    return remote.read_text() if remote.exists() else None
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


class _Uploads:
  """Calls `upload()` every REMOTE_FLUSH_SECONDS from a daemon thread, at flush() and at
  close(); one call at a time, so an older state never overwrites a newer one."""

  def __init__(self, upload, what: str):
    self._upload = upload
    self._what = what
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name=f"upload {what}", daemon=True)
    self._thread.start()

  def _loop(self):
    failing = False
    while not self._stop.wait(REMOTE_FLUSH_SECONDS):
      try:
        self.flush()
      except Exception as e:  # pylint: disable=broad-except  (storage clients raise their own)
        if not failing:  # one warning per outage, not one per attempt
          logging.warning("Could not upload %s (retrying every %.0f s): %s", self._what,
                          REMOTE_FLUSH_SECONDS, e)
        failing = True
      else:
        failing = False

  def flush(self):
    with self._lock:
      self._upload()

  def close(self):
    """Stops the thread and uploads once more; raises if that last upload fails."""
    self._stop.set()
    self._thread.join()
    self.flush()


class RemoteTextFile:
  """A text file on object storage, which has no append, written like a file opened with "a":
  the content is kept in memory, starting with the object's (a resumed run keeps its earlier
  lines), and the whole object is rewritten when it changed, every REMOTE_FLUSH_SECONDS and at
  sync() and close(). flush() uploads nothing: callers may call it after every line."""

  def __init__(self, path: str):
    from etils import epath
    self.path = os.fspath(path)
    existing = epath.Path(self.path)
    self._chunks = [existing.read_text()] if existing.exists() else []
    self._dirty = False
    self._lock = threading.Lock()  # the content; uploads are serialised by _Uploads
    self._uploads = _Uploads(self._upload, self.path)
    _OPEN_REMOTE_FILES[self.path] = self

  def write(self, text: str):
    with self._lock:
      self._chunks.append(text)
      self._dirty = True

  def getvalue(self) -> str:
    with self._lock:
      self._chunks = ["".join(self._chunks)]
      return self._chunks[0]

  def truncate(self, size: int):
    with self._lock:
      text = "".join(self._chunks)
      self._chunks = [text[:size]]
      self._dirty = self._dirty or size < len(text)

  def _upload(self):
    with self._lock:
      if not self._dirty:
        return
      text = "".join(self._chunks)
      self._chunks, self._dirty = [text], False
    try:
      atomic_write(self.path, lambda f: f.write(text.encode()))
    except BaseException:
      with self._lock:
        self._dirty = True  # the next upload tries again, with whatever came since
      raise

  def flush(self):
    pass

  def sync(self):
    self._uploads.flush()

  def close(self):
    if _OPEN_REMOTE_FILES.get(self.path) is self:
      del _OPEN_REMOTE_FILES[self.path]
    self._uploads.close()


class _TensorBoardMirror:
  """Copies the event files of a local directory, new or grown since the last copy, to a
  remote one: tensorboardX writes gs:// only with google-cloud-storage installed, and by
  rewriting each whole file at every flush."""

  def __init__(self, remote_dir: str):
    self.local_dir = tempfile.mkdtemp(prefix="sit_jax_tb_")
    self.remote_dir = remote_dir
    self._copied = {}  # relative path -> (size, mtime) when copied
    self._uploads = _Uploads(self._upload, f"TensorBoard events to {remote_dir}")

  def _upload(self):
    for root, _, files in os.walk(self.local_dir):
      for name in files:
        local = os.path.join(root, name)
        stat = os.stat(local)
        rel = os.path.relpath(local, self.local_dir)
        if self._copied.get(rel) != (stat.st_size, stat.st_mtime_ns):
          with open(local, "rb") as f:
            data = f.read()
          atomic_write(os.path.join(self.remote_dir, rel), lambda f, data=data: f.write(data))
          self._copied[rel] = (stat.st_size, stat.st_mtime_ns)

  def sync(self):
    self._uploads.flush()

  def close(self):
    try:
      self._uploads.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard events not copied to %s (they are in %s): %s",
                      self.remote_dir, self.local_dir, e)
    else:
      shutil.rmtree(self.local_dir, ignore_errors=True)


# write_images' file names: images/{name}_{step:07d}.png.
_PICTURE_NAME = re.compile(r"[-\w.]+_(\d{7,})\.png")
# The t-SNE of a transfer run's test features (transfer/common.tsne), drawn at the run's end.
TSNE_PICTURE = "tsne.png"


class MetricWriter:
  """Writes scalars/images/JSON under `workdir` from the main process only."""

  def __init__(self, workdir, *, total_steps: int, global_batch_size: int,
               enable_tensorboard: bool = True, is_main_process: bool | None = None,
               stream=None, log_file: std_logging.Handler | None = None):
    """log_file: the handler of the workdir's log.txt, which gets each progress line too."""
    self.workdir = os.fspath(workdir)
    self.total_steps = int(total_steps)
    self.global_batch_size = int(global_batch_size)
    self.is_main = (jax.process_index() == 0 if is_main_process is None
                    else bool(is_main_process))
    self._stream = stream  # None: sys.stdout at print time (works with capsys)
    self._log_file = log_file
    self._jsonl = None
    self._tb = None  # the event file under tb/, on the main process with enable_tensorboard
    self._tb_mirror = None  # a remote workdir's TensorBoard copy
    # Timing state for img/s and ETA; the first logged step only sets the
    # baseline so compilation time does not distort the estimate.
    self._first = None   # (step, time) at the first write_scalars call
    self._last = None    # (step, time) at the previous call
    self._kept_step = -1  # drop_after's: the steps up to it were written by an earlier process
    if not self.is_main:
      return
    jsonl = os.path.join(self.workdir, "metrics.jsonl")
    if is_remote(self.workdir):
      self._jsonl = RemoteTextFile(jsonl)
    else:
      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = open(jsonl, "a")
    if enable_tensorboard:
      # Each event on disk when written, as metrics.jsonl's rows: tensorboardX's SummaryWriter
      # writes from a thread every 2 minutes, so a process killed outright (kill -9) lost the
      # points of steps its checkpoint kept, which the resumed run does not write again.
      _import_tensorboardx()
      from tensorboardX import event_file_writer
      tb_dir = os.path.join(self.workdir, "tb")
      if is_remote(tb_dir):
        self._tb_mirror = _TensorBoardMirror(tb_dir)
        tb_dir = self._tb_mirror.local_dir
      os.makedirs(tb_dir, exist_ok=True)
      self._tb = event_file_writer.EventsWriter(os.path.join(tb_dir, "events"))

  @property
  def writes_tensorboard(self) -> bool:
    return self._tb is not None

  def drop_after(self, step: int):
    """Forgets what was written of the steps after `step`, which the run does again (a resume;
    -1: a run started afresh): metrics.jsonl loses their rows, images/ their pictures (a run
    that draws at other steps would leave them beside its own), and TensorBoard their points
    (its loader drops the points of steps from `step` + 1 on that came before a SessionLog
    START event of that step; without it, each step done again would be a second point).
    A run that has its last step to do again loses its t-SNE too: a run that draws none (a
    preempted one, tsne_points 0, a picture that fails) would leave the earlier one, whose
    title names the earlier checkpoint and figure, beside its own results."""
    if not self.is_main:
      return
    self._kept_step = step
    drop_rows_after(os.path.join(self.workdir, "metrics.jsonl"), step)
    from etils import epath
    images = epath.Path(os.path.join(self.workdir, "images"))
    if images.is_dir():
      for picture in images.iterdir():
        drawn_at = _PICTURE_NAME.fullmatch(picture.name)
        if drawn_at and int(drawn_at.group(1)) > step:
          picture.unlink()
    tsne = epath.Path(os.path.join(self.workdir, TSNE_PICTURE))
    if step < self.total_steps and tsne.exists():
      tsne.unlink()
    from tensorboardX.proto import event_pb2
    self._write_event(step + 1, session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START))

  def _write_event(self, step: int, **fields):
    """One TensorBoard event (a summary, a session log) of `step`, flushed to the file."""
    if self._tb is None:
      return
    from tensorboardX.proto import event_pb2
    self._tb.write_event(event_pb2.Event(
        wall_time=datetime.datetime.now().timestamp(), step=step, **fields))
    self._tb.flush()

  # -- scalars ---------------------------------------------------------------

  def start_timing(self, step):
    """Counts img/s and ETA from now, `step` done: called once the first step (compilation)
    is over, so that the first progress line already has both."""
    self._first = self._last = (int(step), time.perf_counter())

  def exclude_time(self, seconds: float):
    """Leaves `seconds` (an evaluation, say) out of the img/s and ETA of the next line."""
    if self._first is not None:
      self._first = (self._first[0], self._first[1] + seconds)
      self._last = (self._last[0], self._last[1] + seconds)

  def write_scalars(self, step, scalars: dict[str, Any], *, timed: bool = True,
                    untimed_seconds_left: float = 0.0):
    """Appends to metrics.jsonl (NaN and inf as null) and TensorBoard and prints a progress
    line; `timed=False` for lines between training logs (evaluations), which neither show nor
    reset img/s and ETA. The ETA is the steps left at the rate so far plus
    `untimed_seconds_left` (the evaluations still to come, whose time exclude_time took out)."""
    if not self.is_main:
      return
    step = int(step)
    values = {k: _to_number(k, v) for k, v in scalars.items()}
    now = time.perf_counter()

    self._jsonl.write(json.dumps(_finite_or_none({"step": step, **values}), allow_nan=False)
                      + "\n")
    self._jsonl.flush()
    from tensorboardX.proto import summary_pb2
    self._write_event(step, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=_tensorboard_tag(k), simple_value=v)
        for k, v in values.items()]))

    parts = [f"step {step}/{self.total_steps}"] if self.total_steps else []  # 0: not a loop
    parts += [f"{k} {_fmt_value(k, v)}" for k, v in values.items()]
    if not timed:
      self._print(" | ".join(parts))
      return
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      img_s = (step - self._last[0]) * self.global_batch_size / (now - self._last[1])
      parts.append(f"{img_s:.0f} img/s")
      steps_per_s = (step - self._first[0]) / (now - self._first[1])
      if steps_per_s > 0:
        eta = max(self.total_steps - step, 0) / steps_per_s + untimed_seconds_left
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
    if self._first is None or step <= self._last[0]:
      self._first = (step, now)  # First call, or the step counter was reset.
    self._last = (step, now)
    self._print(" | ".join(parts))

  def _print(self, line: str):
    """The progress line on the console, without a log prefix, and in log.txt with its time."""
    print(line, file=self._stream or sys.stdout, flush=True)
    if self._log_file is not None:
      self._log_file.handle(std_logging.makeLogRecord(
          {"msg": line, "levelno": std_logging.INFO, "levelname": "INFO"}))

  # -- images ----------------------------------------------------------------

  def write_images(self, step, name: str, image_uint8_hwc):
    """Saves images/{name}_{step:07d}.png and a TensorBoard image. A picture of a step that an
    earlier process wrote (up to drop_after's step: a finished run started again) is kept as
    it is: drawing it again would add a second TensorBoard image of that step."""
    if not self.is_main:
      return None
    img = np.asarray(image_uint8_hwc)
    if img.dtype != np.uint8:
      raise TypeError(f"write_images expects uint8, got {img.dtype}")
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
      raise ValueError(f"write_images expects (H, W[, 1|3|4]), got {img.shape}")
    from PIL import Image
    safe = name.replace("/", "_")
    path = os.path.join(self.workdir, "images", f"{safe}_{int(step):07d}.png")
    if int(step) <= self._kept_step:
      from etils import epath
      if epath.Path(path).exists():  # local or remote
        return path
    atomic_write(path, lambda f: Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
                 .save(f, format="PNG"))
    if self._tb is not None:
      from tensorboardX import summary
      self._write_event(int(step), summary=summary.image(_tensorboard_tag(name), img,
                                                         dataformats="HWC"))
    return path

  # -- json ------------------------------------------------------------------

  def write_json(self, filename: str, obj):
    """Atomically writes workdir/filename (e.g. config.json, results.json)."""
    if not self.is_main:
      return None
    path = os.path.join(self.workdir, filename)
    write_json(path, obj)
    return path

  # -- lifecycle -------------------------------------------------------------

  def flush(self):
    """Writes out everything so far (for a remote workdir: uploads it now)."""
    if self._jsonl is not None:
      self._jsonl.flush()
      if isinstance(self._jsonl, RemoteTextFile):
        self._jsonl.sync()
    if self._tb_mirror is not None:  # each TensorBoard event is flushed when written
      self._tb_mirror.sync()

  def close(self):
    try:
      if self._jsonl is not None:
        jsonl, self._jsonl = self._jsonl, None
        jsonl.close()
    finally:
      if self._tb is not None:
        try:
          self._tb.close()
        except OSError as e:  # a full disk: metrics.jsonl and the checkpoints say what was kept.
          logging.warning("TensorBoard events not flushed: %s", e.strerror or e)
        self._tb = None
      if self._tb_mirror is not None:
        self._tb_mirror.close()
        self._tb_mirror = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
