import glob
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sit_jax import metrics as metrics_lib
from sit_jax.metrics import MetricWriter
from sit_jax.viz import reconstruction_grid, tsne_plot

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_scalars_jsonl_and_progress_line(tmp_path, capsys):
  w = MetricWriter(tmp_path, total_steps=100, global_batch_size=64,
                   enable_tensorboard=False, is_main_process=True)
  w.write_scalars(10, {"loss": jnp.float32(0.5), "recon": np.float32(0.25),
                       "lr": 1e-3, "skipped_images": 3})
  # A count prints as an integer whatever its size, a float as one even where it is whole.
  w.write_scalars(20, {"loss": jnp.asarray(0.4321), "recon": 2.0,
                       "lr": jnp.asarray([1.2e-4]), "probe/iterations": np.int32(12)})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(l) for l in lines]
  assert [r["step"] for r in rows] == [10, 20]
  assert rows[0]["loss"] == 0.5 and rows[0]["recon"] == 0.25
  assert rows[1]["lr"] == pytest.approx(1.2e-4)
  assert lines[0].endswith('"skipped_images": 3}') and lines[1].endswith('"probe/iterations": 12}')

  out = capsys.readouterr().out.strip().splitlines()
  assert out[0] == "step 10/100 | loss 0.5000 | recon 0.2500 | lr 1.0e-03 | skipped_images 3"
  assert re.fullmatch(
      r"step 20/100 \| loss 0\.4321 \| recon 2\.0000 \| lr 1\.2e-04 \| probe/iterations 12 \| "
      r"\d+ img/s \| ETA \d+:\d\d:\d\d", out[1]), out[1]


def test_non_finite_scalars_are_null_in_metrics_jsonl(tmp_path, capsys):
  """An evaluation may be NaN (a segmentation split with no labelled pixel): metrics.jsonl
  stays strict JSON, as results.json does; the progress line shows the value."""
  w = MetricWriter(tmp_path, total_steps=10, global_batch_size=8, enable_tensorboard=False,
                   is_main_process=True)
  w.write_scalars(4, {"val/mIoU": float("nan"), "x": np.float32("-inf"), "top1": 0.5},
                  timed=False)
  w.close()

  def strict(constant):
    raise ValueError(f"{constant} is not JSON")
  line = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(line, parse_constant=strict) == {"step": 4, "val/mIoU": None, "x": None,
                                                     "top1": 0.5}
  assert capsys.readouterr().out == "step 4/10 | val/mIoU nan | x -inf | top1 0.5000\n"


def test_non_main_process_writes_nothing(tmp_path, capsys):
  d = tmp_path / "w"
  w = MetricWriter(d, total_steps=10, global_batch_size=8, is_main_process=False)
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, "x", np.zeros((4, 4, 3), np.uint8))
  w.write_json("results.json", {"a": 1})
  w.flush()
  w.close()
  assert not d.exists()
  assert capsys.readouterr().out == ""


def tensorboard_events(directory):
  """{(tag, step): float, or the decoded image} of the event files in `directory`, read as
  TensorBoard's loader reads them: the files in name order, and a SessionLog START event of step
  s drops the points of steps s and later read before it. A step with two points is an error."""
  from tensorboardX.proto import event_pb2
  found = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data, i = open(path, "rb").read(), 0
    while i < len(data):  # TFRecords: length (8 bytes), its CRC (4), the record, its CRC (4)
      length = int.from_bytes(data[i:i + 8], "little")
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        found = {key: v for key, v in found.items() if key[1] < event.step}
      for v in event.summary.value:
        assert (v.tag, event.step) not in found, f"two points of {v.tag} at step {event.step}"
        found[v.tag, event.step] = (np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
                                    if v.HasField("image") else v.simple_value)
  return found


def test_a_resumed_run_leaves_one_point_and_one_row_per_step(tmp_path):
  """A run resumed from step 2 does steps 3 and 4 again: metrics.jsonl and TensorBoard keep the
  earlier run's steps 1 and 2 and the resumed run's 3 and 4, once each. images/ keeps the
  earlier run's pictures up to step 2 and the resumed run's, which draws at step 3: the earlier
  run's picture of step 4 was left there, drawn by parameters the run no longer has."""
  def run(loss_of_step, steps, resumed_from=None, pictures=()):
    with MetricWriter(tmp_path, total_steps=4, global_batch_size=8,
                      is_main_process=True) as w:
      if resumed_from is not None:
        w.drop_after(resumed_from)
      for step in steps:
        w.write_scalars(step, {"loss": loss_of_step(step)})
        if step in pictures:
          w.write_images(step, "reconstruction", np.full((2, 2, 3), step, np.uint8))
    # Each writer names its file after the second it started: the resumed run's is later.
    (events,) = set(glob.glob(str(tmp_path / "tb" / "*"))) - set(renamed)
    renamed.append(str(tmp_path / "tb" / f"events.out.tfevents.{len(renamed)}"))
    os.rename(events, renamed[-1])
  renamed = []
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "notes_0000009.txt").write_text("a file of the user's own")
  run(float, (1, 2, 3, 4), pictures=(2, 4))
  run(lambda step: step / 4, (3, 4), resumed_from=2, pictures=(3,))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(row["step"], row["loss"]) for row in rows] == [(1, 1), (2, 2), (3, 0.75), (4, 1)]
  events = tensorboard_events(tmp_path / "tb")
  assert {key: events.pop(key)[0, 0, 0] for key in [("reconstruction", 2),
                                                    ("reconstruction", 3)]} == {
      ("reconstruction", 2): 2, ("reconstruction", 3): 3}
  assert events == {("loss", 1): 1, ("loss", 2): 2, ("loss", 3): 0.75, ("loss", 4): 1}
  assert sorted(os.listdir(tmp_path / "images")) == [
      "notes_0000009.txt", "reconstruction_0000002.png", "reconstruction_0000003.png"]


def test_a_run_started_again_keeps_one_picture_per_step_and_no_earlier_tsne(tmp_path):
  """A finished segmentation run started again draws its test picture at its last step again:
  the earlier process's is kept, and TensorBoard keeps one image of the step (it had two). A
  run that does its last step again (a longer run, a k-NN or L-BFGS probe run again) drops the
  earlier run's tsne.png, whose title names the earlier checkpoint and figure: a run that then
  draws none (tsne_points 0, a preempted run, a picture that fails) left it beside its results."""
  tsne = tmp_path / metrics_lib.TSNE_PICTURE
  events_files = []

  def run(total_steps, resumed_from, picture_value=None):
    with MetricWriter(tmp_path, total_steps=total_steps, global_batch_size=8,
                      is_main_process=True) as w:
      w.drop_after(resumed_from)
      if picture_value is not None:
        w.write_images(4, "segmentation", np.full((2, 2, 3), picture_value, np.uint8))
    (events,) = set(glob.glob(str(tmp_path / "tb" / "*"))) - set(events_files)
    events_files.append(str(tmp_path / "tb" / f"events.out.tfevents.{len(events_files)}"))
    os.rename(events, events_files[-1])

  run(4, -1, picture_value=1)
  tsne.write_bytes(b"the t-SNE of step 4")
  run(4, 4, picture_value=2)  # finished, started again: the last step is not done again
  assert tensorboard_events(tmp_path / "tb")["segmentation", 4][0, 0, 0] == 1
  with Image.open(tmp_path / "images" / "segmentation_0000004.png") as im:
    assert np.asarray(im)[0, 0, 0] == 1
  assert tsne.read_bytes() == b"the t-SNE of step 4"
  run(8, 4)  # resumed to a longer run
  assert not tsne.exists()
  tsne.write_bytes(b"a k-NN run's t-SNE")
  run(0, -1)  # a k-NN run again (no steps, no checkpoints)
  assert not tsne.exists()


def test_images_and_tensorboard(tmp_path, caplog):
  w = MetricWriter(tmp_path, total_steps=10, global_batch_size=8,
                   enable_tensorboard=True, is_main_process=True)
  img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  path = w.write_images(5, "recon", img)
  with caplog.at_level("INFO"):
    w.write_scalars(5, {"loss": 1.0, "knn/val/k=10/top1": 0.25})  # knn.py's names
  # What a process killed now (kill -9) leaves: tensorboardX's writer queued the points for two
  # minutes, and the steps up to the checkpoint are not done again by the resumed run.
  events = tensorboard_events(tmp_path / "tb")
  w.close()
  assert path == str(tmp_path / "images" / "recon_0000005.png")
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == (30, 20) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), img)
  # TensorBoard holds what metrics.jsonl and the PNG do; a tag cannot hold "=", and its
  # replacement is no line on the console.
  assert events.keys() == {("recon", 5), ("loss", 5), ("knn/val/k_10/top1", 5)}
  np.testing.assert_array_equal(events["recon", 5], img)
  assert (events["loss", 5], events["knn/val/k_10/top1", 5]) == (1.0, 0.25)
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  with pytest.raises(TypeError):
    MetricWriter(tmp_path, total_steps=1, global_batch_size=1,
                 enable_tensorboard=False).write_images(0, "f", img / 255.0)


def test_tensorboard_events_do_not_import_torch(tmp_path):
  """tensorboardX's package imports torch where it is installed (the test extra installs it):
  1.3 CPU seconds and 470 MB in every process of a run, for nothing the events writer uses.
  Checked in a child: this worker may have imported torch already."""
  pytest.importorskip("torch")
  code = ("import sys; from sit_jax.metrics import MetricWriter; "
          "w = MetricWriter(sys.argv[1], total_steps=2, global_batch_size=4, "
          "is_main_process=True); w.write_scalars(1, {'loss': 0.5}); w.close(); "
          "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  # torch was not imported, and a later `import torch` in the process still works.
  assert result.stdout.split()[-2:] == ["False", "2.0"]
  assert tensorboard_events(tmp_path / "tb") == {("loss", 1): 0.5}


def test_write_json_atomic(tmp_path, monkeypatch):
  w = MetricWriter(tmp_path, total_steps=1, global_batch_size=1,
                   enable_tensorboard=False, is_main_process=True)
  path = w.write_json("results.json", {"acc": np.float32(0.5), "v": jnp.arange(3)})
  assert json.loads(open(path).read()) == {"acc": 0.5, "v": [0, 1, 2]}

  def failing_replace(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(metrics_lib.os, "replace", failing_replace)
  with pytest.raises(OSError):
    w.write_json("results.json", {"acc": 0.9})
  monkeypatch.undo()
  # The old file is intact and no temp file is left behind.
  assert json.loads(open(path).read())["acc"] == 0.5
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "results.json"]
  w.close()


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_reconstruction_grid(scale):
  rng = np.random.default_rng(0)
  pix = [rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8) for _ in range(3)]
  mean, std = np.array(MEAN) * scale, np.array(STD) * scale
  norm = [(p / 255.0 * scale - mean) / std for p in pix]
  grid = reconstruction_grid(*[jnp.asarray(x, jnp.float32) for x in norm], mean, std)
  assert grid.dtype == np.uint8 and grid.shape == (3 * 8 + 2 * 2, 3 * 6 + 2 * 2, 3)
  for i in range(3):        # rows = images
    for j in range(3):      # columns = original | corrupted | reconstructed
      cell = grid[i * 10:i * 10 + 8, j * 8:j * 8 + 6]
      np.testing.assert_array_equal(cell, pix[j][i])
  assert (grid[8:10] == 255).all() and (grid[:, 6:8] == 255).all()
  assert reconstruction_grid(*norm, mean, std, max_images=2).shape[0] == 2 * 8 + 2


def test_reconstruction_grid_clips():
  x = np.full((1, 2, 2, 3), 10.0, np.float32)
  grid = reconstruction_grid(x, -x, x, MEAN, STD)
  assert (grid[:, :2] == 255).all() and (grid[:, 4:6] == 0).all()


def test_tsne_plot_small(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 20)
  feats = rng.normal(size=(60, 16)) + labels[:, None] * 3.0
  path = tsne_plot(feats, labels, tmp_path / "plots" / "tsne.png", title="test")
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 100


def test_tsne_of_fewer_than_3_points_is_refused(tmp_path, monkeypatch):
  """t-SNE cannot run on 2 points (sklearn: perplexity must be less than n_samples) and drew 1
  point captioned "(all features equal)": tsne_points 1 or 2 is a config error before any work
  (a linear probe drew it before writing results.json, which the error then lost)."""
  from sit_jax import config_check
  config = config_check.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                          "linear.py:runlocal"))
  for points in (0, 3):
    config.tsne_points = points
    config_check.check(config)
  for points in (1, 2):
    config.tsne_points = points
    with pytest.raises(config_check.ConfigError, match=f"config.tsne_points={points} is invalid"):
      config_check.check(config)
    with pytest.raises(ValueError, match="at least 3 points"):
      tsne_plot(np.arange(40.0).reshape(10, 4), np.arange(10) % 2, tmp_path / "t.png",
                max_points=points)
  assert not (tmp_path / "t.png").exists()
  # Whatever else fails in the picture, the run keeps its figures: k-NN and the linear probe
  # draw it before results.json, which they then write. A scikit-learn that will not import
  # ended the run in its traceback: t-SNE's imports were outside the guard.
  from sit_jax import viz
  from sit_jax.transfer import common
  def broken(*args, **kwargs):
    raise MemoryError("no room for the plot")
  warnings = []
  monkeypatch.setattr(viz.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  config.tsne_points = 3
  with monkeypatch.context() as m:
    m.setattr(viz, "tsne_plot", broken)
    assert common.tsne(config, str(tmp_path), np.zeros((5, 4)), np.arange(5), "title") is None
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "sklearn.manifold", None)  # import sklearn.manifold fails
    assert common.tsne(config, str(tmp_path), np.zeros((5, 4)), np.arange(5), "title") is None
  assert warnings[0] == "t-SNE picture not drawn: no room for the plot"
  assert warnings[1].startswith("t-SNE picture not drawn: import of sklearn.manifold halted")
  assert len(warnings) == 2 and not (tmp_path / "tsne.png").exists()


def test_tsne_plot_of_equal_features(tmp_path):
  """A collapsed backbone's features are one point: sklearn's t-SNE crashed the process on
  them (a segfault, before a linear probe wrote results.json), so run it in a child."""
  code = ("import sys, numpy as np; from sit_jax.viz import tsne_plot; "
          "tsne_plot(np.ones((40, 16)), np.arange(40) % 2, sys.argv[1])")
  path = tmp_path / "tsne.png"
  result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
  assert result.returncode == 0, result.stderr[-2000:]
  with Image.open(path) as im:
    assert im.format == "PNG"


def test_pictures_gather_only_the_grids_images():
  """The picture hook's output is replicated onto every device: the whole batch there was 36
  bytes a pixel per image on each device (7 GiB at 224 px and batch 4,096), for a grid of 8."""
  import jax
  from configs import sit_vits
  from sit_jax import pretrain
  config = sit_vits.get_config("runlocal")
  model = pretrain.build_model(config)
  tx = pretrain.build_optimizer(config, pretrain.build_schedules(config, 10, 10))
  state = jax.eval_shape(lambda: pretrain.init_state(config, model, tx, jax.random.PRNGKey(0)))
  size = config.data.image_size
  batch = {view: jax.ShapeDtypeStruct((64, size, size, 3), np.uint8) for view in ("view1", "view2")}
  pictures = jax.eval_shape(pretrain.make_reconstruct(config, model), state, batch)
  assert [p.shape for p in pictures] == [(8, size, size, 3)] * 3


def test_results_name_the_splits_the_knn_monitor_read(tmp_path, monkeypatch):
  """A folder without a test split: the monitor holds out train[90%:] of the bank, and
  results.json said its figures came from the 'train' bank and a 'test' split that is not there."""
  from configs import sit_vits
  from sit_jax import pretrain, trainer
  for c in range(2):
    os.makedirs(tmp_path / "images" / f"c{c}")
    for i in range(10):
      Image.fromarray(np.full((8, 8, 3), 20 * i + c, np.uint8)).save(
          tmp_path / "images" / f"c{c}" / f"{i}.png")
  config = sit_vits.get_config("runlocal")
  config.data.source = f"folder:{tmp_path / 'images'}"
  config.total_steps, config.eval_every, config.export_backbone = 1, 1, False

  def monitor_only(exp, *, total_steps, hooks, **kwargs):  # the loop's outcome, without a step
    return trainer.Outcome(None, total_steps, 0, total_steps, {}, {"knn/student": 0.5}, None, 0.0)
  monkeypatch.setattr(trainer, "train", monitor_only)
  results = pretrain.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["knn_monitor"]["bank"] == [config.data.source, "train[:90%]", "train[90%:]"]




def test_pictures_show_the_views_the_network_read():
  """The picture hook gets the state after a step and the batch that step read: its clean and
  corrupted columns are view 1 as that step's teacher and student read it, with that step's
  mask. They were drawn with other keys: other augmentations, and a mask that matched the
  loss's on 57% of the pixels."""
  import jax
  from configs import sit_vits
  from sit_jax import pretrain
  from sit_jax.models import vit

  class Passthrough:
    """A stand-in network: keeps what it reads and reconstructs it as it is."""
    def __init__(self):
      self.read = {}

    def apply(self, variables, images, train, **kwargs):
      del variables, kwargs
      jax.debug.callback(lambda x: self.read.setdefault(train, np.asarray(x)), images)
      return {"recon": images, "proj": images.reshape(len(images), -1)}, {}

  config = sit_vits.get_config("runlocal")
  config.model.standardize_input = True  # the network reads each image standardised
  schedules = pretrain.build_schedules(config, 10, 10)
  tx = pretrain.build_optimizer(config, schedules)
  network = Passthrough()
  state = pretrain.TrainState(step=jnp.int32(3), params={}, teacher={}, opt_state=tx.init({}),
                              rng=jax.random.PRNGKey(1))
  size = config.data.image_size
  batch = {v: np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
           for v in ("view1", "view2")}
  after, _ = jax.jit(pretrain.make_train_step(config, network, tx, schedules))(state, batch)
  jax.effects_barrier()
  # Rows alternate view 1 and view 2 of each image (views_to_rows): view 1 is every other row.
  read = {"teacher": network.read[False][0::2], "student": network.read[True][0::2]}
  clean, corrupted, _ = map(np.asarray, jax.jit(pretrain.make_reconstruct(config, network))(
      after, batch))
  # The columns are in the views' ImageNet normalisation.
  mean, std = vit.per_image_moments(clean)
  np.testing.assert_allclose((clean - mean) / std, read["teacher"], atol=1e-4)
  np.testing.assert_allclose((corrupted - mean) / std, read["student"], atol=1e-4)
  masked = (read["student"] != read["teacher"]).any(-1)
  assert 0.1 < masked.mean() < 0.5  # gmml.ratio 0.3


def test_progress_lines_eta_counts_the_evaluations_to_come_and_lr_is_the_steps(tmp_path, capsys,
                                                                                monkeypatch):
  """On a clock where each step takes 1 s and each evaluation 5 s (the first 30 s more, to
  compile), every ETA from the first evaluation on is the time the run then still takes (it had
  left out the evaluations to come: 0:00:06 at step 4, where 16 s were left; then counted each
  with the first one's compilation: 0:01:16), and the lr of a row is the one its step used (it was
  the mean since the previous row: 0.05 at step 2, whose lr is 0.1), while the losses are means.
  The rows count the unreadable images skipped on every process (process 0 had written its own:
  none, so no row said that the other process skipped 3). log.txt has the lines too."""
  import itertools
  import types
  from sit_jax import trainer
  import test_reliability

  clock = [0.0]
  fake_time = types.SimpleNamespace(perf_counter=lambda: clock[0])
  monkeypatch.setattr(trainer, "time", fake_time)
  monkeypatch.setattr(metrics_lib, "time", fake_time)

  class Batches:  # process 0's input, which met no unreadable image
    num_skipped = 0

    def __init__(self, start):
      self.steps = itertools.count(start)

    def __next__(self):
      clock[0] += 1.0
      return test_reliability.batch_of(next(self.steps))

  other_process_skipped = 3
  monkeypatch.setattr(trainer.multihost_utils, "process_allgather",
                      lambda count: np.array([count, other_process_skipped]))

  def evaluate(step, state, batch):
    if step == 4:  # the first call compiles for 30 s, which the later calls do not
      clock[0] += 30.0
      jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration",
                                                30.0)
    clock[0] += 5.0
    return {"eval": step}

  def step_with_lr(state, batch):  # lr = 0.1 * the index of the step, as a schedule's
    new_state, step_metrics = test_reliability.sgd_step(state, batch)
    return new_state, {**step_metrics, "lr": 0.1 * state.step}

  test_reliability.train(str(tmp_path), 10, step_fn=step_with_lr, batches=Batches,
                         hooks=[trainer.Hook(4, evaluate)], log_every=2, checkpoint_every=100)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
  etas = [sum(int(x) * 60 ** i for i, x in enumerate(reversed(
      re.search(r"ETA (\d+):(\d\d):(\d\d)", line).groups()))) for line in lines]
  # What is left after steps 2, 4, 6, 8 and 10: 1 s for each step, 5 s for each evaluation to
  # come (at steps 4, 8 and 10, the last). The first line has measured no evaluation yet.
  left = [8 + 15, 6 + 10, 4 + 10, 2 + 5, 0]
  assert etas == [8] + left[1:], lines
  # log.txt has the progress lines too, each after its time: its monitor's log lines point to
  # them, and a run watched from its workdir (gs://) showed none.
  logged = (tmp_path / "log.txt").read_text().splitlines()
  assert [line.split(" INFO ", 1)[1] for line in logged if " INFO step " in line] == lines
  rows = test_reliability.metric_rows(str(tmp_path))
  assert [row["lr"] for row in rows] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
  assert [row["skipped_images"] for row in rows] == [3] * 5
  w, losses = np.zeros(test_reliability.DIM, np.float32), []
  for step in range(10):
    x = test_reliability.batch_of(step)["x"]
    losses.append(np.mean((x @ w - 1.0) ** 2))
    w = w - test_reliability.LR * (2 / test_reliability.BATCH) * x.T @ (x @ w - 1.0)
  assert [row["loss"] for row in rows] == pytest.approx(np.mean(np.reshape(losses, (5, 2)), 1))
