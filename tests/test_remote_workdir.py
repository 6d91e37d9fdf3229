"""A remote workdir (gs://...) goes through etils.epath only: nothing lands under the current
directory. A local directory stands in for the bucket gs://b."""
import json
import os
import pathlib
import re
import signal
import sys
import time

from etils.epath import gpath, register
import ml_collections
import numpy as np
import pytest

from sit_jax import experiment, metrics, viz


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  root = tmp_path / "bucket"
  root.mkdir()
  # epath.Path("gs://...") dispatches on its URI prefix: gs://b/x becomes the local ROOT/x, for
  # sit_jax and the libraries it calls alike (orbax).
  local = lambda part: (str(root) + os.fspath(part)[len("gs://b"):]
                        if os.fspath(part).startswith("gs://b") else part)

  class Bucket(gpath.PosixGPath):
    def __new__(cls, *parts):
      return super().__new__(cls, *map(local, parts))

    def __init__(self, *parts):  # Python 3.12's pathlib builds the path here, from the args again
      if sys.version_info >= (3, 12):
        super().__init__(*map(local, parts))

  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "gs://", Bucket)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # Short enough to see the background upload, long enough not to race the assertions.
  monkeypatch.setattr(metrics, "REMOTE_FLUSH_SECONDS", 0.2)
  yield root
  assert not os.listdir(cwd), "a remote workdir wrote under the current directory"


def _config(**kwargs):
  return ml_collections.ConfigDict({"mesh": ml_collections.ConfigDict({}), **kwargs})


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_is_remote():
  assert metrics.is_remote("gs://b/run") and metrics.is_remote("s3://b")
  assert not metrics.is_remote("/tmp/run") and not metrics.is_remote(pathlib.Path("run"))


def test_experiment_writes_into_the_bucket(bucket, caplog):
  caplog.set_level("INFO")
  with experiment.Experiment(_config(note="first"), "gs://b/run/") as exp:
    assert exp.workdir == "gs://b/run"
    writer = exp.writer(total_steps=4, global_batch_size=2)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_scalars(2, {"loss": 0.5})
    writer.write_images(2, "recon/view1", np.zeros((4, 5, 3), np.uint8))
    exp.finish({"final_loss": 0.5, "checkpoint": "gs://b/run/checkpoints/2"},
               also=["gs://b/run/tsne.png"])
  run = bucket / "run"
  assert json.loads((run / "config.json").read_text())["note"] == "first"
  assert json.loads((run / "results.json").read_text())["final_loss"] == 0.5
  assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2]
  assert (run / "images" / "recon_view1_0000002.png").stat().st_size > 0
  assert list((run / "tb").glob("events.out.tfevents.*"))
  log = (run / "log.txt").read_text()
  assert re.match(r"(Command: .*\n)?Config:\n", log) and "no lock is held" in log
  assert not (run / ".lock").exists() and not list(run.glob(".write_probe_*"))
  assert "Wrote results.json, metrics.jsonl, config.json, log.txt, checkpoints/2, tsne.png, " \
         "images/, tb/ in gs://b/run" in caplog.text


def test_resumed_writer_keeps_rows_and_drop_rows_after_cuts(bucket):
  path = "gs://b/run/metrics.jsonl"
  kw = dict(total_steps=10, global_batch_size=1, enable_tensorboard=False,
            is_main_process=True)
  with metrics.MetricWriter("gs://b/run", **kw) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"loss": step})
  with metrics.MetricWriter("gs://b/run", **kw) as w:
    metrics.drop_rows_after(path, 2)  # as trainer.py does on resuming from step 2
    w.write_scalars(3, {"loss": 30})
    assert [json.loads(r)["loss"] for r in metrics.read_text(path).splitlines()] == [1, 2, 30]
    w.flush()
    assert [r["loss"] for r in _rows(bucket / "run" / "metrics.jsonl")] == [1, 2, 30]
    w.write_scalars(4, {"loss": 40})
  assert [r["loss"] for r in _rows(bucket / "run" / "metrics.jsonl")] == [1, 2, 30, 40]
  metrics.drop_rows_after(path, 3)  # no writer open: the object itself is cut
  assert [r["step"] for r in _rows(bucket / "run" / "metrics.jsonl")] == [1, 2, 3]
  assert metrics.read_text(path).count("\n") == 3
  metrics.drop_rows_after("gs://b/none/metrics.jsonl", 3)  # nothing there: nothing to do
  assert not (bucket / "none").exists() and metrics.read_text("gs://b/none/x") is None


def test_background_upload(bucket):
  w = metrics.MetricWriter("gs://b/run", total_steps=10, global_batch_size=1,
                           is_main_process=True)
  try:
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, "recon", np.zeros((4, 4), np.uint8))
    deadline = time.monotonic() + 20
    tb = bucket / "run" / "tb"
    uploaded = bucket / "run" / "metrics.jsonl"
    # The upload rewrites the whole object, which a bucket shows only once written; the local
    # stand-in shows the file from its creation on, empty at first (one CI run read it so).
    while time.monotonic() < deadline and not (
        uploaded.exists() and uploaded.read_text().endswith("\n") and list(tb.glob("events.*"))):
      time.sleep(0.05)
    assert _rows(uploaded) == [{"step": 1, "loss": 1.0}]
    assert list(tb.glob("events.*"))
  finally:
    w.close()


def test_failed_uploads_are_retried(bucket, monkeypatch, caplog):
  def refuse(self, data):
    raise RuntimeError("503 Service Unavailable")
  works = gpath.PosixGPath.write_bytes
  monkeypatch.setattr(gpath.PosixGPath, "write_bytes", refuse)
  log = metrics.RemoteTextFile("gs://b/run/log.txt")
  log.write("a\n")
  with pytest.raises(RuntimeError, match="503"):
    log.sync()
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline and "Could not upload" not in caplog.text:
    time.sleep(0.05)
  time.sleep(0.5)  # more failed attempts, which add no warning
  monkeypatch.setattr(gpath.PosixGPath, "write_bytes", works)
  log.write("b\n")
  log.close()
  assert (bucket / "run" / "log.txt").read_text() == "a\nb\n"
  assert caplog.text.count("Could not upload gs://b/run/log.txt (retrying every 0 s): 503") == 1


def test_unwritable_remote_workdir(bucket, monkeypatch):
  def refuse(self, data):
    raise RuntimeError("403 Forbidden")
  monkeypatch.setattr(gpath.PosixGPath, "write_bytes", refuse)
  with pytest.raises(PermissionError, match=r"gs://b/run is not writable \(RuntimeError: 403"):
    experiment.Experiment(_config(), "gs://b/run")


def test_a_missing_storage_client_names_the_extra(bucket, monkeypatch):
  """Without TensorFlow, etils reads gs:// through gcsfs, which the default install leaves out."""
  def no_client(self, data):
    raise ImportError("Please install gcsfs to access Google Storage")
  monkeypatch.setattr(gpath.PosixGPath, "write_bytes", no_client)
  with pytest.raises(ValueError, match=r"gs://b/run needs a client for its storage .*"
                     r"pip install 'sit_jax\[gcs\]'"):
    experiment.Experiment(_config(), "gs://b/run")


def test_tsne_plot_to_bucket(bucket):
  rng = np.random.default_rng(0)
  path = viz.tsne_plot(rng.normal(size=(12, 4)), np.arange(12) % 2, "gs://b/run/tsne.png")
  assert path == "gs://b/run/tsne.png"
  assert (bucket / "run" / "tsne.png").read_bytes().startswith(b"\x89PNG")


def test_pretraining_run_and_resume(bucket, caplog, monkeypatch):
  """python -m sit_jax.main --config=configs/sit_vits.py:runlocal --workdir=gs://b/run, in
  process: SIGTERM after step 2 of 3, then resumed to 3 (the same run: its programs come from
  the compilation cache). Checkpoints and the backbone export go through orbax, which reads the
  same gs:// mapping."""
  from configs import sit_vits
  from sit_jax import pretrain
  caplog.set_level("INFO")
  config = sit_vits.get_config("runlocal")
  config.total_steps, config.eval_every, config.log_every = 3, 0, 1
  write_scalars = metrics.MetricWriter.write_scalars

  def preempt_after_step_2(writer, step, scalars, **kwargs):
    write_scalars(writer, step, scalars, **kwargs)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # Python runs the handler at the next bytecode boundary.

  # The first run draws a picture at each step, and the store refuses their uploads: each is
  # one warning and the run goes on (it ended at step 1 in the storage client's traceback).
  write_bytes = gpath.PosixGPath.write_bytes
  def refuse_pictures(path, data):
    if "/images/" in os.fspath(path):
      raise RuntimeError("503 Service Unavailable")
    return write_bytes(path, data)

  image_every, config.image_every = config.image_every, 1
  with monkeypatch.context() as patch:
    patch.setattr(metrics.MetricWriter, "write_scalars", preempt_after_step_2)
    patch.setattr(gpath.PosixGPath, "write_bytes", refuse_pictures)
    first = pretrain.train_and_evaluate(config, "gs://b/run")
  # Set back by hand: pytest 9.2's monkeypatch deletes a ConfigDict field it set (it looks for
  # the old value in the instance's __dict__, where ConfigDict keeps no fields).
  config.image_every = image_every
  run = bucket / "run"
  assert first["step"] == 2 and first["preempted"] and (run / "checkpoints" / "2").is_dir()
  assert caplog.text.count("Reconstruction picture not drawn: 503 Service Unavailable") == 2
  assert not (run / "backbone").exists()  # exported when the run completes.
  # Rows past the checkpoint, as a run killed after its last save leaves them: the resumed run
  # drops them and writes its own.
  with open(run / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
  (run / "images").mkdir(exist_ok=True)  # and its pictures, which the resumed run removes
  (run / "images" / "reconstruction_0000004.png").write_bytes(b"")
  second = pretrain.train_and_evaluate(config, "gs://b/run")
  assert second["step"] == 3 and second["steps_this_run"] == 1 and not second["preempted"]
  assert (run / "backbone" / "model_config.json").exists()
  rows = _rows(run / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] > 0
  assert json.loads((run / "results.json").read_text())["step"] == 3
  log = (run / "log.txt").read_text()
  assert log.count("Config:\n") == 2 and "Resumed from step 2" in log
  # The picture of the last step (a preempted run draws none at the step it saves).
  assert [p.name for p in (run / "images").iterdir()] == ["reconstruction_0000003.png"]
  assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2
