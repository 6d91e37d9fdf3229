"""The training loop of every experiment (pretraining, fine-tuning, multi-label, probes).

    outcome = trainer.train(exp, init=..., abstract=..., step_fn=..., batches=...,
                            total_steps=..., metadata=..., hooks=[trainer.Hook(every, fn)])

`train` does, in one place: resume from the latest readable checkpoint in DIR/checkpoints (or
`init()` when there is none), the steps, the mean of each metric over the steps between log
steps (a schedule's value: the log step's) with one progress line each, hooks (pictures, the
k-NN monitor, evaluations), saves (orbax decides: every `config.checkpoint_every` steps, the
last step and a preemption step), stopping on SIGTERM or Ctrl-C after saving the current step,
and stopping with one line at the first step whose metrics (or, at a save, parameters) are NaN
or inf, which is never saved.

The host waits for the metrics of step s - 1 once step s is queued: the device always has the
next step to run, and the host is never more than one step ahead, so the step that went
non-finite is named exactly and a signal stops the run within one step.

The caller writes results: `outcome.results()` holds the fields every experiment reports.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from sit_jax import checkpoint, metrics, sharding

# Progress lines and metrics.jsonl list these first, then the rest alphabetically.
METRIC_ORDER = ("loss", "recon", "contrastive", "lr")
# Set for each step by a schedule, not measured: a row shows its own step's value. The mean over
# the steps since the previous row lags the schedule by half of log_every (in warmup, half the lr
# the row's step used).
SCHEDULED = ("lr", "weight_decay", "momentum")


def metric_order(name: str):
  return (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), name)


def ordered(scalars: dict) -> dict:
  return {k: scalars[k] for k in sorted(scalars, key=metric_order)}


# Settings a resumed run must keep, saved with each checkpoint: they change the data order, the
# random numbers, or the structure of the optimiser state (clip_norm on/off adds a transform);
# a transfer run's init_weights says which backbone its state started from, and head.features
# what its head was trained on (CLS and the mean patch token are of one shape: a head trained on
# one would go on training on the other, under a config.json naming the other).
RESUME_SETTINGS = ("data.global_batch_size", "seed", "optim.clip_norm", "init_weights",
                   "head.features")


# The checkpoint metadata entry listing the hooks (indices) that a signal cut short at its step.
UNFINISHED_HOOKS = "unfinished_hooks"


def resume_settings(config) -> dict:
  """{dotted key: value} of the RESUME_SETTINGS the config has."""
  values = {}
  for key in RESUME_SETTINGS:
    value = config
    for part in key.split("."):
      value = value.get(part) if hasattr(value, "get") else None
    if value is not None:
      values[key] = value
  return values


@dataclasses.dataclass(frozen=True)
class Hook:
  """fn(step, state, batch) -> scalars to log (or None), called after the steps that are a
  multiple of `every` (every <= 0: none) and after the last step. With `final`, it is also
  called with batch None at the step a run resumes from when that call did not happen there:
  a resumed finished run, and a step saved by a signal that cut the call short. Its time is
  left out of img/s; the ETA adds the calls still to come, each as long as the latest one."""
  every: int
  fn: Callable[[int, Any, Any], dict | None]
  final: bool = False


@dataclasses.dataclass
class Outcome:
  state: Any
  step: int                 # the last step done
  start_step: int           # the step this process resumed from (0: a fresh run)
  total_steps: int
  metrics: dict             # the means at the last log step (a finished run: the last one's)
  evaluated: dict           # the last scalars of each hook
  checkpoint: str | None    # the latest committed checkpoint step directory
  seconds: float            # wall time of this process's steps
  stopped: str = ""         # '' | 'preempted' | 'non-finite'
  error: str = ""           # why the run failed (non-finite), one line

  @property
  def complete(self) -> bool:
    return self.step >= self.total_steps and not self.error

  def results(self) -> dict:
    """The results.json fields every experiment shares."""
    return {"step": self.step, "total_steps": self.total_steps,
            "final_metrics": self.metrics, "checkpoint": self.checkpoint,
            "steps_this_run": self.step - self.start_step,
            "train_seconds_this_run": self.seconds, "preempted": self.stopped == "preempted",
            **({"error": self.error} if self.error else {})}


class _NonFinite(Exception):
  pass


def _check_finite(step: int, scalars: dict):
  bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
  if bad:
    raise _NonFinite(f"{', '.join(f'{k} {v}' for k, v in ordered(bad).items())} at step {step}")


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train(exp, *, init: Callable[[], Any], abstract, step_fn: Callable,
          batches: Callable[[int], Iterator[dict]], total_steps: int, metadata: dict | None,
          hooks: Sequence[Hook] = (), writer=None, checkpoints: bool = True,
          place: Callable[[dict], dict] | None = None) -> Outcome:
  """Runs step_fn(state, global batch) -> (state, scalar metrics) up to `total_steps`.

  Args:
    exp: the experiment.Experiment (workdir, mesh, config: log_every, checkpoint_every,
      keep_checkpoints).
    init: () -> the fresh state, placed on the mesh; not called when resuming.
    abstract: the state's jax.ShapeDtypeStructs with their shardings (to restore onto).
    step_fn: the jitted step; the state has an integer `.step`.
    batches: start_step -> iterator of host batches (this process's share), from that step.
    total_steps: the step to train to.
    metadata: what a resumed run must match (checkpoint.Checkpointer.restore); the
      RESUME_SETTINGS are added.
    hooks: pictures, monitors, evaluations (`Hook`).
    writer: the MetricWriter; default exp.metric_writer.
    checkpoints: False trains in memory only (a probe's head of a few seconds).
    place: host batch -> the step's global batch (resample.batch_placer); default
      sharding.global_batch on exp.mesh.
  """
  config = exp.config
  writer = writer if writer is not None else exp.metric_writer
  metadata = {**(metadata or {}), "settings": resume_settings(config)}
  place = place or functools.partial(sharding.global_batch, mesh=exp.mesh)
  ckpt = None
  if checkpoints:
    ckpt = checkpoint.Checkpointer(os.path.join(exp.workdir, "checkpoints"),
                                   keep=config.keep_checkpoints, every=config.checkpoint_every,
                                   last_step=total_steps)
  with checkpoint.stop_signals(), (ckpt or _NoCheckpoints()):
    state, saved = None, {}
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None and latest > total_steps:  # said before the state is read
      raise ValueError(f"The checkpoint in {ckpt.directory} is at step {latest}, past "
                       f"total_steps={total_steps}: set total_steps to {latest} or more to go "
                       "on, or pass another --workdir.")
    if latest is not None:
      try:
        state, saved = ckpt.restore(abstract, expected_metadata=metadata, fallback=True)
      except checkpoint.StructureMismatch as e:
        changed = exp.changed_settings()  # the optimiser's or head's settings, say
        if not changed:
          raise
        raise checkpoint.StructureMismatch(
            f"{e} Settings changed since {os.path.join(exp.workdir, 'config.json')} was "
            f"written: {', '.join(changed)}; set back the one that shapes the state to resume, "
            "or pass another --workdir.") from None
      logging.info("Resumed from step %d of %s", int(state.step), ckpt.directory)
    if state is None:
      state = init()
    start_step = int(jax.device_get(state.step))
    # A finished run started again trains no step to average: its final means come with the
    # checkpoint (the process that finished may have ended before writing results.json).
    outcome = Outcome(state, start_step, start_step, total_steps,
                      saved.get("metrics", {}) if start_step == total_steps else {}, {}, None, 0.0)
    if ckpt is not None:
      if 0 < start_step < total_steps and exp.is_main:
        _warn_of_changed_settings(exp, start_step)
      exp.write_config()  # the settings passed the checkpoint's checks
      if exp.is_main:
        _results_of_earlier_runs(exp.workdir, outcome, ckpt.set_aside)
        if writer is not None:
          writer.drop_after(start_step)
    if 0 < start_step < total_steps:
      _call_again(exp, outcome, [hooks[i] for i in saved.get(UNFINISHED_HOOKS, [])
                                 if i < len(hooks)], writer)
    start = time.perf_counter()
    with checkpoint.steps_from(start_step):  # up to the last save committed
      try:
        _loop(exp, ckpt, outcome, step_fn, batches(start_step), place, hooks, writer, metadata)
      except _NonFinite as e:
        outcome.stopped = "non-finite"
        kept = ckpt.latest_step() if ckpt is not None else None
        outcome.error = (
            f"Training stopped: {e}. Nothing non-finite was saved"
            + (f"; the last good checkpoint is step {kept}" if kept is not None else "")
            + ". Lower optim.base_lr and start again"
            + (f" (it resumes from step {kept}), or pass a new --workdir to start afresh."
               if kept is not None else "."))
      outcome.seconds = time.perf_counter() - start
      if ckpt is not None:
        ckpt.wait()  # a failed last save is reported here, with its step.
        latest = ckpt.latest_step()
        outcome.checkpoint = None if latest is None else ckpt.step_path(latest)
  if outcome.complete and outcome.step == outcome.start_step:  # finished in an earlier process
    _call_again(exp, outcome, hooks, writer)
  return outcome


def _call_again(exp, outcome: Outcome, hooks: Sequence[Hook], writer):
  """Calls the `final` ones of `hooks` at the step the run resumed from, with batch None (that
  step's batch is gone), and logs their scalars unless metrics.jsonl has them."""
  for hook in hooks:
    if hook.final:
      evaluated = hook.fn(outcome.step, outcome.state, None) or {}
      outcome.evaluated.update(evaluated)
      if writer is not None and not logged(exp, outcome.step, evaluated):
        writer.write_scalars(outcome.step, evaluated, timed=False)


def _warn_of_changed_settings(exp, step: int):
  """A resumed run may change settings (README, "What is guaranteed"); it says which, as
  config.json is about to describe the new ones only. The schedules are functions of the run's
  length: with another one they jump at the next step rather than continue."""
  changed = exp.changed_settings()
  if not changed:
    return
  length = any(c.split()[0] in ("total_steps", "total_epochs", "num_train_examples")
               for c in changed)
  logging.warning(
      "Step %d resumes with settings changed since %s was written: %s. They apply from step %d "
      "on%s; log.txt keeps each run's config.", step, os.path.join(exp.workdir, "config.json"),
      ", ".join(changed), step + 1,
      " (the schedules of the learning rate and, in pretraining, weight decay and momentum "
      "are set by the run's length: they jump there to the new length's values, not continue)"
      if length else "")


def logged(exp, step: int, scalars: dict) -> bool:
  """Whether metrics.jsonl has a row of `step` with every key of `scalars` (a finished run
  started again evaluates again, and keeps one row per step)."""
  text = metrics.read_text(os.path.join(exp.workdir, "metrics.jsonl")) if exp.workdir else None
  rows = [row for row in map(json.loads, (text or "").splitlines()) if row.get("step") == step]
  return bool(rows) and all(any(k in row for row in rows) for k in scalars)


def _loop(exp, ckpt, outcome: Outcome, step_fn, batches, place, hooks, writer, metadata):
  config, total = exp.config, outcome.total_steps
  state, step = outcome.state, outcome.step
  pending, fetched = [], []  # device metrics of the steps since the last log; host values
  hook_seconds = {}  # hook index -> seconds of its latest call

  def fetch(count: int):
    """Host values of the first `count` pending steps, each checked to be finite."""
    while len(fetched) < count:
      i = len(fetched)
      fetched.append({k: float(v) for k, v in jax.device_get(pending[i]).items()})
      _check_finite(step - len(pending) + i + 1, fetched[-1])

  def save(unfinished_hooks=()):
    fetch(len(pending))
    if not bool(_all_finite(state)):
      raise _NonFinite(f"the parameters are not finite at step {step}")
    ckpt.save(step, state, metadata={**metadata, "metrics": outcome.metrics,
                                     **({UNFINISHED_HOOKS: unfinished_hooks}
                                        if unfinished_hooks else {})})

  def preempted():
    outcome.stopped = "preempted"
    saved = ckpt is not None and ckpt.latest_step() == step  # none at step 0
    logging.warning("Stopped at step %d by a signal%s; start the same command to resume.",
                    step, f", saved in {ckpt.step_path(step)}" if saved else "")

  while step < total:
    try:
      with checkpoint.interruptible():
        batch = place(next(batches))
    except Exception as e:  # pylint: disable=broad-except
      if not _ended_by_signal(e, "Reading the next batch"):
        raise
      if ckpt is not None and step > outcome.start_step and ckpt.latest_step() != step:
        save()
      preempted()
      break
    state, step_metrics = step_fn(state, batch)
    outcome.state = state  # the donated input is gone: keep the live state reachable.
    step += 1
    outcome.step = step
    pending.append(step_metrics)
    fetch(len(pending) - 1)  # one step in flight at most (see the module doc).
    if step == outcome.start_step + 1 and writer is not None:
      fetch(len(pending))  # the first step includes compilation: time the rest.
      writer.start_timing(step)

    evaluated, unfinished = {}, []
    for i, hook in enumerate(hooks):
      if _due(hook, step, total):
        jax.block_until_ready(state)  # steps in flight are training time, not the hook's.
        fetch(len(pending))  # free now: a non-finite step stops before a hook evaluates it.
        hook_start, compiling = time.perf_counter(), metrics.compile_seconds()
        try:
          with checkpoint.interruptible():
            evaluated.update(hook.fn(step, state, batch) or {})
        except Exception as e:  # pylint: disable=broad-except
          if not _ended_by_signal(e, "An evaluation"):
            raise
          # The signal is seen below: the step is saved, naming these for the resumed run.
          unfinished = [j for j in range(i, len(hooks)) if _due(hooks[j], step, total)]
          break
        seconds = time.perf_counter() - hook_start
        if writer is not None:
          writer.exclude_time(seconds)
        # The ETA counts each call to come as long as this one without its compilation (a
        # first call's), which later calls reuse: counted, it made the ETA longer by the first
        # picture's compilation times each picture to come, until the second.
        hook_seconds[i] = seconds - (metrics.compile_seconds() - compiling)
    outcome.evaluated.update(evaluated)

    if step % config.log_every == 0 or step == total:
      fetch(len(pending))
      outcome.metrics = ordered({
          k: fetched[-1][k] if k in SCHEDULED else float(np.mean([f[k] for f in fetched]))
          for k in fetched[0]})
      skipped = _images_skipped(batches)
      if writer is not None:
        hooks_left = sum(seconds * _calls_left(hooks[i], step, total)
                         for i, seconds in hook_seconds.items())
        writer.write_scalars(step, {**outcome.metrics, **evaluated,
                                    **({"skipped_images": skipped} if skipped else {})},
                             untimed_seconds_left=hooks_left)
      pending, fetched = [], []
    elif evaluated and writer is not None:
      writer.write_scalars(step, evaluated, timed=False)

    if ckpt is None:
      stop = checkpoint.reached_preemption(step)
    else:
      stop = ckpt.reached_preemption(step)
      ckpt.raise_failed_save()  # an asynchronous save that failed (disk full) stops the run.
      if ckpt.should_save(step):
        save(unfinished)
    if stop and (step < total or unfinished):  # after the last step's hooks the run is complete.
      preempted()
      break


def _due(hook: Hook, step: int, total: int) -> bool:
  return (hook.every > 0 and step % hook.every == 0) or step == total


def _images_skipped(batches) -> int:
  """The unreadable images the input skipped since this run started (a resumed run counts from
  its resume), summed over the processes: each one's iterator counts those of its own share, and
  process 0 alone writes the rows."""
  return int(np.sum(multihost_utils.process_allgather(getattr(batches, "num_skipped", 0))))


def _calls_left(hook: Hook, step: int, total: int) -> int:
  """How many more times the loop calls `hook` after `step`: at its multiples of `every` up to
  `total`, and at `total` itself."""
  if step >= total:
    return 0
  multiples = total // hook.every - step // hook.every if hook.every > 0 else 0
  return multiples + (hook.every <= 0 or total % hook.every != 0)


def _ended_by_signal(error: Exception, what: str) -> bool:
  """Whether `error` is a stop signal's doing: a SIGTERM sent to the whole process group (a
  scheduler's preemption, `timeout`) also ends the input's worker processes (data.workers), and
  the next batch, or an evaluation's, fails. The loop then saves and stops as for the signal."""
  if not checkpoint.signalled():
    return False
  logging.warning("%s failed after a stop signal (%s: %s); saving the step and stopping.", what,
                  type(error).__name__, " ".join(str(error).split())[:300])
  return True


def _results_of_earlier_runs(workdir: str, outcome: Outcome, set_aside: Sequence[int]):
  """results.json of an earlier process of this workdir. A run that goes on removes it: it
  describes a state the run moves past, and may name a checkpoint that the run's saves rotate
  out (or that was just set aside as corrupt); the run writes a new one at its end. A finished
  run started again keeps its final metrics (from results.json where its checkpoint, written
  before checkpoints kept them, has none)."""
  path = os.path.join(workdir, "results.json")
  text = metrics.read_text(path)
  if text is None:
    return
  earlier = json.loads(text)
  if (outcome.step == outcome.total_steps and earlier.get("step") == outcome.step
      and not set_aside):
    outcome.metrics = outcome.metrics or earlier.get("final_metrics") or {}
    logging.info("The run is complete at step %d; its final metrics are kept.", outcome.step)
    return
  epath.Path(path).unlink()
  if set_aside:
    logging.warning("Removed %s: it described checkpoint step(s) %s, set aside as unreadable.",
                    path, list(set_aside))


class _NoCheckpoints:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False
