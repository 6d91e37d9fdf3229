"""A run never loses work: the faults a user meets, each tried on the trainer every experiment
uses (NaN, a corrupt checkpoint, a busy workdir, a full disk, Ctrl-C and SIGTERM, a resume that
changes a setting) and, where the console matters, on `python -m sit_jax.main`.

The in-process runs train a tiny least-squares model with trainer.train: the loop, saves and
restores are the real ones, and a run takes a second instead of a compilation of the ViT.
"""
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sit_jax import checkpoint, distributed, experiment, sharding, trainer
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, BATCH, LR = 4, 8, 0.1
BATCH_SIZES = {"data.global_batch_size": BATCH}  # what the Experiment checks against the mesh


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict


def tiny_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      experiment="tiny", seed=0, total_steps=0, log_every=1, checkpoint_every=2, keep_checkpoints=2,
      mesh=dict(data=-1, fsdp=1, model=1), data=dict(global_batch_size=BATCH),
      optim=dict(clip_norm=0.0), init_weights="student",  # init_weights, head: as a transfer run
      head=dict(features="cls")))
  c.update_from_flattened_dict(overrides)
  return c


def batch_of(step: int, nan_at=None):
  """The batch that step `step` + 1 trains on: a function of the step, as the real pipelines."""
  x = np.random.default_rng(step).normal(size=(BATCH, DIM)).astype(np.float32)
  if nan_at is not None and step + 1 == nan_at:
    x[0, 0] = np.nan
  return {"x": x}


def sgd_step(state, batch):
  loss_fn = lambda w: jnp.mean((batch["x"] @ w - 1.0) ** 2)
  loss, grad = jax.value_and_grad(loss_fn)(state.params["w"])
  return (state.replace(step=state.step + 1, params={"w": state.params["w"] - LR * grad}),
          {"loss": loss, "grad_norm": jnp.linalg.norm(grad)})


def train(workdir, total_steps, *, nan_at=None, hooks=(), step_fn=sgd_step, batches=None,
          checkpoints=True, **overrides):
  """One run of the tiny model in `workdir`: (outcome, the Experiment's results.json or the
  error it raised)."""
  batches = batches or (lambda start: (batch_of(s, nan_at) for s in itertools.count(start)))
  config = tiny_config(total_steps=total_steps, **overrides)
  with experiment.Experiment(config, workdir, batch_sizes=BATCH_SIZES) as exp:
    replicated = sharding.replicated(exp.mesh)
    fresh = State(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((DIM,), jnp.float32)})
    fresh = jax.device_put(fresh, replicated)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            fresh)
    jitted = jax.jit(step_fn, out_shardings=(replicated, replicated), donate_argnums=(0,))
    exp.writer(total_steps, BATCH)
    outcome = trainer.train(
        exp, init=lambda: fresh, abstract=abstract, step_fn=jitted, total_steps=total_steps,
        batches=batches, metadata={"model": {"dim": DIM}}, hooks=hooks, checkpoints=checkpoints)
    results = {**outcome.results(), "w": np.asarray(outcome.state.params["w"])}
    try:
      exp.finish(results)
    except experiment.RunError as e:
      return outcome, e
  return outcome, results


def reference_weights(steps: int):
  w = np.zeros(DIM, np.float32)
  for s in range(steps):
    x = batch_of(s)["x"]
    w = w - LR * (2 / BATCH) * x.T @ (x @ w - 1.0)
  return w


def steps_on_disk(workdir):
  return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def restore(workdir, step):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  like = State(step=jax.ShapeDtypeStruct((), jnp.int32),
               params={"w": jax.ShapeDtypeStruct((DIM,), jnp.float32)})
  state, _ = ckpt.restore(like, step)
  return np.asarray(state.params["w"])


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def results_json(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)  # the standard library reads NaN; results.json must not hold any.


def strict_json(path):
  with open(path) as f:
    return json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_tiny_run_matches_plain_numpy_sgd(tmp_path):
  outcome, results = train(tmp_path, 6)
  np.testing.assert_allclose(results["w"], reference_weights(6), rtol=1e-5)
  assert steps_on_disk(tmp_path) == [4, 6] and outcome.complete
  assert results_json(tmp_path)["checkpoint"] == str(tmp_path / "checkpoints" / "6")


# -- NaN and inf ----------------------------------------------------------------------------


def test_nan_loss_stops_at_its_step_and_saves_nothing_non_finite(tmp_path):
  outcome, error = train(tmp_path, 20, nan_at=7)
  assert isinstance(error, experiment.RunError)
  message = str(error)
  assert "\n" not in message and "at step 7" in message and "step 6" in message
  assert outcome.step == 7 and outcome.stopped == "non-finite"
  assert steps_on_disk(tmp_path) == [4, 6]  # the good ones, not rotated out.
  assert np.isfinite(restore(tmp_path, 6)).all()
  results = strict_json(tmp_path / "results.json")  # no bare NaN
  assert results["error"] == message and results["checkpoint"].endswith("/6")
  assert not os.path.exists(tmp_path / "checkpoints" / "8")


def test_hooks_never_evaluate_a_non_finite_step(tmp_path):
  calls = []
  probe = trainer.Hook(1, lambda step, state, batch: calls.append(step) or {"probe": step})
  outcome, error = train(tmp_path, 10, nan_at=3, hooks=[probe], log_every=5)
  assert "at step 3" in str(error) and calls == [1, 2]
  assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2]
  assert outcome.evaluated == {"probe": 2}


def test_non_finite_parameters_with_a_finite_loss_are_never_saved(tmp_path):
  def inf_after_step_3(state, batch):  # an update overflows; the loss it reports is finite.
    state, metrics = sgd_step(state, batch)
    w = jnp.where(state.step > 3, jnp.inf, state.params["w"])
    return state.replace(params={"w": w}), metrics

  _, error = train(tmp_path, 20, step_fn=inf_after_step_3)
  assert "parameters are not finite at step 4" in str(error)
  assert steps_on_disk(tmp_path) == [2]


# -- Corrupt checkpoints ----------------------------------------------------------------------


def truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    os.truncate(f, 3)


# A failed TensorStore read can fire a callback after orbax's asyncio loop has closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_step_is_skipped_and_written_again(tmp_path):
  train(tmp_path, 6)
  truncate_arrays(tmp_path / "checkpoints" / "6")
  outcome, results = train(tmp_path, 8)
  assert outcome.start_step == 4  # fell back past the unreadable step 6 ...
  assert steps_on_disk(tmp_path) == [6, 8]  # ... and wrote it again.
  assert os.path.isdir(tmp_path / "checkpoints" / "6.corrupt")  # kept for a post-mortem
  np.testing.assert_allclose(restore(tmp_path, 6), reference_weights(6), rtol=1e-5)
  np.testing.assert_allclose(results["w"], reference_weights(8), rtol=1e-5)
  assert results_json(tmp_path)["checkpoint"].endswith("/8")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_results_never_name_a_step_that_was_set_aside(tmp_path):
  train(tmp_path, 6)
  truncate_arrays(tmp_path / "checkpoints" / "6")

  def crash(step, state, batch):
    raise RuntimeError("power cut")

  with pytest.raises(RuntimeError, match="power cut"):
    train(tmp_path, 8, hooks=[trainer.Hook(5, crash)])
  # The old results.json named step 6, which is gone: it went too.
  assert not os.path.exists(tmp_path / "results.json")


def test_a_finished_run_started_again_keeps_its_results(tmp_path):
  """The README's advice after a stop, 'start the same command again', on a run that had
  finished: results.json keeps its final metrics, a final hook evaluates again without a second
  row in metrics.jsonl."""
  evaluate = trainer.Hook(2, lambda step, state, batch: {"eval/w0": 1.0}, final=True)
  _, first = train(tmp_path, 4, hooks=[evaluate])
  rows = metric_rows(tmp_path)
  outcome, again = train(tmp_path, 4, hooks=[evaluate])
  assert again["steps_this_run"] == 0 and outcome.evaluated == {"eval/w0": 1.0}
  assert results_json(tmp_path)["final_metrics"] == first["final_metrics"] != {}
  assert metric_rows(tmp_path) == rows
  # The process that finished ended before results.json (killed while exporting the backbone).
  os.remove(tmp_path / "results.json")
  train(tmp_path, 4, hooks=[evaluate])
  assert results_json(tmp_path)["final_metrics"] == first["final_metrics"]


def test_a_resumed_run_drops_the_results_of_the_process_before(tmp_path):
  """results.json of an earlier process names its checkpoint, which the resumed run's saves
  rotate out (keep 2): it goes when the run goes on, and the run writes its own at the end."""
  train(tmp_path, 4)
  assert results_json(tmp_path)["checkpoint"].endswith("/4")

  def crash(step, state, batch):
    if step == 9:
      raise RuntimeError("power cut")

  with pytest.raises(RuntimeError, match="power cut"):
    train(tmp_path, 10, hooks=[trainer.Hook(1, crash)])
  assert steps_on_disk(tmp_path) == [6, 8]
  assert not os.path.exists(tmp_path / "results.json")


def test_an_evaluation_run_again_keeps_one_row_per_step(tmp_path):
  """Runs with no checkpoint to resume (k-NN, few-shot, a linear probe) start metrics.jsonl
  afresh, as results.json: the rows of the earlier run were kept, each step twice."""
  for top1 in (0.5, 0.75):
    with experiment.Experiment(tiny_config(), tmp_path, batch_sizes=BATCH_SIZES) as exp:
      exp.writer(0, BATCH).write_scalars(0, {"test/top1": top1}, timed=False)
  assert [(r["step"], r["test/top1"]) for r in metric_rows(tmp_path)] == [(0, 0.75)]


def test_only_the_process_that_writes_the_results_says_it_wrote_them(tmp_path, caplog):
  """Every process of a several-host job logged 'Wrote results.json, ...', which process 0 alone
  writes."""
  caplog.set_level("INFO")
  for main in (False, True):
    caplog.clear()
    with experiment.Experiment(tiny_config(), tmp_path / str(main),
                               batch_sizes=BATCH_SIZES) as exp:
      exp.is_main = main  # as jax.process_index() != 0 would make it
      exp.finish({"top1": 0.5})
    assert ("Wrote results.json" in caplog.text) == main
    assert (tmp_path / str(main) / "results.json").exists() == main


def test_another_experiment_in_the_workdir_is_refused_before_writing(tmp_path):
  """A transfer run pointed at its pretraining workdir (no checkpoints of its own to check:
  an L-BFGS probe) replaced the pretraining's results.json and added to its metrics.jsonl."""
  train(tmp_path, 4)
  kept = {name: (tmp_path / name).read_bytes()
          for name in ("results.json", "metrics.jsonl", "config.json", "log.txt")}
  with pytest.raises(experiment.RunError, match=r"holds a 'tiny' run \(its config.json\), not "
                     "'linear'.*pass another --workdir"):
    train(tmp_path, 4, experiment="linear")
  assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_a_run_refused_leaves_the_config_of_the_results(tmp_path):
  """A run with no checkpoints (k-NN, the L-BFGS probe) started again with a batch size the mesh
  refuses, or data that are not there, wrote its config.json first: the results of the run
  there were described by the settings of one that never ran."""
  train(tmp_path, 2, checkpoints=False)
  kept = (tmp_path / "config.json").read_bytes()
  with pytest.raises(ValueError, match="eval_batch_size: Global batch size 12 is not divisible"):
    experiment.Experiment(tiny_config(total_steps=2, eval_batch_size=12), tmp_path,
                          batch_sizes={"eval_batch_size": 12})
  with pytest.raises(FileNotFoundError):
    with experiment.Experiment(tiny_config(total_steps=2, seed=1), tmp_path,
                               batch_sizes=BATCH_SIZES):
      raise FileNotFoundError("image folder 'images' does not exist")  # read in the workdir
  assert (tmp_path / "config.json").read_bytes() == kept
  train(tmp_path, 2, checkpoints=False, seed=1)
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1


def test_a_finished_run_whose_checkpoints_are_gone_is_refused_before_writing(tmp_path):
  """Checkpoints deleted to save space: the same command again trained from step 0, wiped
  metrics.jsonl at once and replaced results.json (and a pretraining's backbone/) at the end."""
  train(tmp_path, 4)
  shutil.rmtree(tmp_path / "checkpoints")
  kept = {name: (tmp_path / name).read_bytes()
          for name in ("results.json", "metrics.jsonl", "config.json", "log.txt")}
  checkpoint_path = os.path.join(tmp_path, "checkpoints", "4")
  with pytest.raises(experiment.RunError, match=re.escape(
      f"holds a finished run whose checkpoint ({checkpoint_path}, named in its results.json) is "
      "gone") + r".*Pass another --workdir, or delete results.json"):
    train(tmp_path, 4)
  assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
  # A run that stopped before its first checkpoint names none, and starts again as asked.
  _, error = train(tmp_path / "nan", 4, nan_at=1)
  assert isinstance(error, experiment.RunError) and not steps_on_disk(tmp_path / "nan")
  _, results = train(tmp_path / "nan", 4)
  assert results["step"] == 4


def test_another_total_steps_on_resume(tmp_path, caplog, monkeypatch):
  """Below the checkpoint's step: one line, before the state is read. Above it: the run goes on,
  and the user is told that the schedules, functions of the run's length, jump at the next
  step."""
  train(tmp_path, 4)
  with monkeypatch.context() as m, pytest.raises(
      ValueError, match=r"at step 4, past total_steps=2: set total_steps to 4 or more"):
    m.setattr(checkpoint.Checkpointer, "restore", lambda *args, **kwargs: pytest.fail("read"))
    train(tmp_path, 2)
  assert steps_on_disk(tmp_path) == [2, 4]
  _, results = train(tmp_path, 6, log_every=2)
  assert ("Step 4 resumes with settings changed since" in caplog.text
          and "log_every 1 -> 2, total_steps 4 -> 6. They apply from step 5 on (the "
          "schedules" in caplog.text)
  np.testing.assert_allclose(results["w"], reference_weights(6), rtol=1e-5)


# -- Killed ---------------------------------------------------------------------------------

KILLED_AT_5 = """
import os, signal, sys
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
import test_reliability as t
from sit_jax import trainer
def kill(step, state, batch):  # right after the asynchronous save of step 4 started
  if step == 5:
    os.kill(os.getpid(), signal.SIGKILL)
t.train(sys.argv[1], 8, hooks=[trainer.Hook(1, kill)], checkpoint_every=4)
"""


def test_kill_9_during_a_save_loses_nothing_saved(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": conftest.xla_flags(8)}
  proc = subprocess.run([sys.executable, "-c", KILLED_AT_5, str(tmp_path), REPO], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  # Step 4 is committed or was never listed (a temporary name); either way the run resumes.
  outcome, results = train(tmp_path, 8, checkpoint_every=4)
  assert outcome.start_step in (0, 4)
  np.testing.assert_allclose(results["w"], reference_weights(8), rtol=1e-5)
  assert steps_on_disk(tmp_path) == [4, 8]
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))


# -- metrics.jsonl after a resume ---------------------------------------------------------------


def test_resumed_steps_do_not_repeat_metric_rows(tmp_path):
  def crash_at_7(step, state, batch):
    if step == 7:
      raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    train(tmp_path, 10, hooks=[trainer.Hook(1, crash_at_7)])
  assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2, 3, 4, 5, 6]  # 6 is saved
  _, results = train(tmp_path, 10)
  rows = metric_rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 11))
  np.testing.assert_allclose(results["w"], reference_weights(10), rtol=1e-5)


# -- Signals --------------------------------------------------------------------------------


def send(sig):
  os.kill(os.getpid(), sig)
  time.sleep(0.05)  # Python runs the handler at the next bytecode boundary.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_current_step_and_resumes_exactly(tmp_path, sig):
  def signal_at_3(step, state, batch):
    if step == 3:
      send(sig)

  # What the process had (the default, or SIG_IGN for SIGINT in a shell's background job) comes back.
  handler_before = signal.getsignal(sig)
  outcome, results = train(tmp_path, 10, hooks=[trainer.Hook(1, signal_at_3)])
  assert outcome.stopped == "preempted" and outcome.step == 3 and results["preempted"]
  assert steps_on_disk(tmp_path) == [2, 3]
  assert signal.getsignal(sig) == handler_before
  _, results = train(tmp_path, 10)
  np.testing.assert_allclose(results["w"], reference_weights(10), rtol=1e-5)


@pytest.mark.parametrize("where", ["batches", "hook", "second SIGTERM"])
def test_input_workers_ended_by_the_signal_save_the_current_step(tmp_path, where):
  """A SIGTERM to the process group (a scheduler, `timeout`) also ends grain's worker processes
  (data.workers): the next batch, or an evaluation's, fails instead of coming. The resumed run
  does the evaluation the signal cut short, and none that was done. A second SIGTERM cuts an
  evaluation short the same way (it was ignored: the loop saved the step only once the
  evaluation, minutes on a large k-NN bank, was done, if the kill -9 had not come first)."""
  interrupted, calls = [True], []

  def dead_workers():
    send(signal.SIGTERM)
    if where == "second SIGTERM":
      send(signal.SIGTERM)
      pytest.fail("the evaluation went on after a second SIGTERM")
    raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")

  def batches(start):
    for s in itertools.count(start):
      if where == "batches" and s == 3 and interrupted[0]:
        dead_workers()
      yield batch_of(s)

  def monitor(step, state, batch):  # done at step 3 before the evaluation is cut short
    calls.append(("monitor", step))
    return {"monitor": float(step)}

  def evaluation(step, state, batch):
    calls.append(("evaluation", step))
    if where != "batches" and step == 3 and interrupted[0]:
      dead_workers()
    return {"val": float(step)}

  hooks = [trainer.Hook(1, monitor, final=True), trainer.Hook(1, evaluation, final=True)]
  outcome, results = train(tmp_path, 10, batches=batches, hooks=hooks)
  assert outcome.stopped == "preempted" and outcome.step == 3 and results["preempted"]
  assert steps_on_disk(tmp_path) == [2, 3]
  interrupted[0] = False
  calls.clear()
  _, results = train(tmp_path, 10, batches=batches, hooks=hooks)
  np.testing.assert_allclose(results["w"], reference_weights(10), rtol=1e-5)
  redone = [("evaluation", 3)] if where != "batches" else []
  assert calls[:len(redone) + 1] == redone + [("monitor", 4)]
  for key in ("monitor", "val"):
    assert [row["step"] for row in metric_rows(tmp_path) if key in row] == list(range(1, 11))


def test_a_signal_at_the_last_step_leaves_a_complete_run(tmp_path):
  def signal_at_4(step, state, batch):
    if step == 4:
      send(signal.SIGTERM)

  outcome, results = train(tmp_path, 4, hooks=[trainer.Hook(1, signal_at_4)])
  assert outcome.complete and not outcome.stopped and not results["preempted"]
  assert steps_on_disk(tmp_path) == [2, 4]


def test_a_sigterm_after_the_loop_ends_a_lone_process_as_a_jobs(tmp_path, monkeypatch):
  """After a training loop's last step (the final evaluations, the backbone export,
  results.json), a lone process sent SIGTERM ended with Python's default: exit status 143, no
  line. It ends as a process of a job does, in distributed.STOPPED (exit status 1), which
  log.txt records; the same command then finishes the run."""
  finish = experiment.Experiment.finish

  def signalled_finish(self, results, **kwargs):
    send(signal.SIGTERM)
    return finish(self, results, **kwargs)

  handler_before = signal.getsignal(signal.SIGTERM)
  try:
    assert not distributed.initialize()  # a lone process
    # Else the signal below ends pytest.
    assert signal.getsignal(signal.SIGTERM) not in (handler_before, signal.SIG_DFL)
    with monkeypatch.context() as patched, pytest.raises(SystemExit) as stopped:
      patched.setattr(experiment.Experiment, "finish", signalled_finish)
      train(tmp_path, 4)
  finally:
    signal.signal(signal.SIGTERM, handler_before)
  line = f"sit_jax: error: {distributed.STOPPED}"
  assert stopped.value.code == line  # Python prints it, exit status 1
  assert line in (tmp_path / "log.txt").read_text()
  assert not (tmp_path / "results.json").exists() and steps_on_disk(tmp_path) == [2, 4]
  outcome, results = train(tmp_path, 4)
  assert (outcome.start_step, results["step"], results["preempted"]) == (4, 4, False)
  np.testing.assert_allclose(results["w"], reference_weights(4), rtol=1e-5)


class _SyncPoint:
  """JAX's preemption sync point in one process: a notice syncs at the step after the latest one
  the processes asked about."""

  def __init__(self):
    self.latest, self.step = 0, None

  def notice(self):
    self.step = self.latest + 1

  def __call__(self, step):
    self.latest = step
    return step == self.step


class _TwoProcesses:
  """jax, as checkpoint.py sees it in process 0 of a job of 2."""
  process_count = staticmethod(lambda: 2)

  def __getattr__(self, name):
    return getattr(jax, name)


@pytest.mark.parametrize("resumed", [False, True])
def test_several_processes_stop_at_the_sync_point(tmp_path, monkeypatch, resumed):
  """On several processes a SIGTERM reaches the loop through JAX's sync point only. A loop that
  trains in memory (the SGD probe's head) never asked it and trained to its end; a resumed loop
  first asked at its first step, so a notice while that step compiled synced at step 1, passed
  already: it trained to its end too. Both stop at the step after the one they start from."""
  if resumed:
    train(tmp_path, 4)
  sync = _SyncPoint()  # a new process's
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync)
  monkeypatch.setattr(checkpoint, "jax", _TwoProcesses())

  def noticed_step(state, batch):
    sync.notice()  # runs once: while the first step compiles
    return sgd_step(state, batch)

  outcome, _ = train(tmp_path, 10, step_fn=noticed_step, checkpoints=resumed)
  start = 4 if resumed else 0
  assert (outcome.stopped, outcome.step) == ("preempted", start + 1)
  if resumed:
    assert steps_on_disk(tmp_path)[-1] == start + 1


class _Now:
  """distributed._ENDING for a watch that looks once, at once."""
  wait = staticmethod(lambda timeout=None: False)


def test_a_notice_as_the_last_save_commits_lets_several_processes_finish(tmp_path, monkeypatch):
  """On several processes the watch (distributed.py) reads JAX's notice once a second, and ended
  the job (exit status 1) where process 0 was no longer in a training loop: a notice that came
  after the last step's question, as its save was committed, ended a complete run before its
  results.json (or killed that save). A notice before the last save is committed is the loop's:
  the run finishes; one after it still ends the job."""
  store = {}
  monkeypatch.setattr(distributed, "_client", lambda: types.SimpleNamespace(
      key_value_try_get=store.__getitem__, key_value_set=store.__setitem__))
  monkeypatch.setattr(distributed, "_ENDING", _Now())
  left = []
  monkeypatch.setattr(distributed, "leave", left.append)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: False)
  monkeypatch.setattr(checkpoint, "jax", _TwoProcesses())
  wait = checkpoint.Checkpointer.wait

  def notice_during_the_last_wait(self):
    if self.latest_step() == 4:
      store[distributed._PREEMPTION_NOTICE] = "now"
    return wait(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "wait", notice_during_the_last_wait)
  outcome, results = train(tmp_path, 4)
  distributed._end_at_preemption_notice()  # the watch looks after the loop
  assert outcome.complete and not results["preempted"] and results_json(tmp_path)["step"] == 4
  assert (store[distributed._STOP], left) == ("train", [])


# -- Resume settings ------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("seed", 1), ("data.global_batch_size", 16),
                                        ("optim.clip_norm", 1.0), ("init_weights", "teacher"),
                                        ("head.features", "mean")])
def test_resume_with_another_setting_names_it(tmp_path, key, value):
  train(tmp_path, 4)
  config_json = (tmp_path / "config.json").read_text()
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(tmp_path, 8, **{key: value})
  message = str(e.value)
  assert "\n" not in message and f"set {key} back" in message and len(message) < 400
  assert f"{key} was" in message and repr(value) in message
  # config.json still describes the run the checkpoints belong to.
  assert (tmp_path / "config.json").read_text() == config_json
  written = (tmp_path / "config.json").stat().st_mtime_ns
  train(tmp_path, 6)  # an accepted resume records its config
  assert (tmp_path / "config.json").stat().st_mtime_ns != written


def test_a_state_that_no_longer_matches_names_the_settings_changed(tmp_path):
  """Settings that change the state's structure (an optimiser's or head's, say) are refused by the
  structure check, which lists leaves and shapes: the line also names what the config changed."""
  train(tmp_path, 4)
  config = tiny_config(total_steps=8, log_every=2)
  with experiment.Experiment(config, tmp_path, batch_sizes=BATCH_SIZES) as exp:
    wider = State(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros((DIM + 1,), jnp.float32)})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wider)
    with pytest.raises(checkpoint.StructureMismatch,
                       match=r"does not match the requested state .* Settings changed since "
                             r"\S+config.json was written: log_every 1 -> 2, total_steps 4 -> 8; "
                             r"set back the one that shapes the state"):
      trainer.train(exp, init=lambda: wider, abstract=abstract, step_fn=None, total_steps=8,
                    batches=None, metadata={"model": {"dim": DIM}})


def test_a_refused_resume_of_the_augmented_probe_extracts_no_features(tmp_path, monkeypatch):
  """The augmented linear probe computed its feature statistics (linear.stats_examples images
  through the backbone) before trainer.train could refuse the resume; now at its first step."""
  from configs import linear as linear_config
  from sit_jax.transfer import common, linear

  def refused(exp, **kwargs):
    raise checkpoint.CheckpointError("Cannot resume: seed was 0 and is 1 now.")

  extracted = []
  monkeypatch.setattr(linear, "training_feature_standardizer",
                      lambda *args: extracted.append(args))
  monkeypatch.setattr(trainer, "train", refused)
  monkeypatch.setattr(common, "place_backbone", lambda *args: None)  # not read: a compile less
  c = linear_config.get_config("runlocal")
  c.linear.cache_features, c.baselines = False, False
  with pytest.raises(checkpoint.CheckpointError):
    linear.run(c, str(tmp_path))
  assert extracted == []


# -- Busy workdir ---------------------------------------------------------------------------


HOLD_LOCK = ("import sys, time; from sit_jax import experiment; "
             "experiment.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
             "time.sleep(600)")


def test_a_second_run_on_a_busy_workdir_is_refused_at_once(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    start = time.time()
    with pytest.raises(experiment.WorkdirBusy) as e:
      experiment.Experiment(tiny_config(), str(tmp_path))
    assert time.time() - start < 5
    assert f"pid {holder.pid}" in str(e.value) and "\n" not in str(e.value)
  finally:
    holder.kill()  # the kernel drops the lock with its holder, however it ends.
    holder.wait()
  with experiment.Experiment(tiny_config(), str(tmp_path)):
    pass


def test_busy_workdir_on_the_command_line_is_one_line(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = subprocess.run(
        [sys.executable, "-m", "sit_jax.main", "--config=configs/sit_vits.py:runlocal",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": REPO})
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if "in use by" in line]
  assert errors and f"pid {holder.pid}" in errors[-1]
  assert not os.path.exists(tmp_path / "checkpoints")


# -- Disk full ------------------------------------------------------------------------------


def _mount_tmpfs(path, size="4m") -> bool:
  if os.geteuid() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


# The failed write can fire a tensorstore callback after orbax's asyncio loop has closed; Python
# reports it as an unraisable "Event loop is closed" error (as in test_checkpoint's corrupt step).
@pytest.mark.filterwarnings(
    r"ignore:Exception ignored in[\s\S]*Event loop is closed"
    ":pytest.PytestUnraisableExceptionWarning")
def test_disk_full_is_reported_at_the_failing_save_and_keeps_the_last_good_one(tmp_path,
                                                                               monkeypatch):
  ckpt_dir = tmp_path / "checkpoints"
  mounted = _mount_tmpfs(ckpt_dir)
  try:
    def fill_disk_at_4(step, state, batch):
      if step != 4:
        return
      if mounted:
        deadline = time.time() + 60
        while not os.path.isdir(ckpt_dir / "2"):  # the asynchronous save of step 2 is done.
          assert time.time() < deadline
          time.sleep(0.01)
        with open(ckpt_dir / "filler", "wb", buffering=0) as f:
          try:
            while True:
              f.write(b"\0" * 4096)
          except OSError:
            pass
      else:  # no tmpfs here: the save fails as a full disk makes it fail.
        def no_space(self, step, *args, **kwargs):
          raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpoint._Manager, "save", no_space)

    with pytest.raises(checkpoint.CheckpointError) as e:
      train(tmp_path, 10, hooks=[trainer.Hook(1, fill_disk_at_4)])
    message = str(e.value)
    assert "\n" not in message and len(message) < 400
    assert "step 4" in message and "No space left on device" in message
    assert "last good checkpoint is step 2" in message
    monkeypatch.undo()
    if mounted:
      os.remove(ckpt_dir / "filler")
    assert steps_on_disk(tmp_path) == [2]
    np.testing.assert_allclose(restore(tmp_path, 2), reference_weights(2), rtol=1e-5)
  finally:
    if mounted:
      subprocess.run(["umount", str(ckpt_dir)], check=False)


# -- File modes -----------------------------------------------------------------------------


def test_outputs_are_written_with_the_usual_mode(tmp_path):
  train(tmp_path, 2)
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "results.json", "metrics.jsonl", "log.txt"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
