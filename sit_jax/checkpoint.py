"""Checkpointing of train-state pytrees with orbax's CheckpointManager.

Layout of a checkpoint directory::

    <directory>/<step>/state/                the train-state pytree (StandardSave, OCDBT)
    <directory>/<step>/_CHECKPOINT_METADATA  orbax's step metadata; its custom metadata is what a
                                             resumed run must match (model, experiment, settings)

orbax decides what is a step (a save is written under a temporary name and renamed when
complete), when to save (`save_decision_policy`: every `every` steps, the last step, and the step
where a preemption is reached) and what to keep (`preservation_policy`: the latest `keep`).
This module adds what orbax leaves to its user: one-line errors that say what to do, the check
of a checkpoint against the run about to resume it, falling back past an unreadable step (which
is set aside, so that training writes that step again), Ctrl-C and SIGTERM on one process, and
the backbone export.

A backbone export (`export_backbone`) is a directory with `params/` (an orbax pytree checkpoint),
`model_config.json` (the model's settings) and, where its writer says where the parameters come
from, `export.json` (a pretraining's: its step, experiment, weights and workdir). On a local disk
it is written beside its directory, in `.<name>.partial`, and renamed into place once whole; an
earlier export is renamed to `.<name>.replaced` on the way and removed after. Readers never take
either for an export.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sit_jax import distributed, metrics
from sit_jax.models import vit

log = logging.getLogger(__name__)

STATE_ITEM = "state"
LEGACY_METADATA_ITEM = "metadata"  # checkpoints written before the custom metadata
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "model_config.json"
# Where an export's parameters come from (a pretraining's step, the file convert's to-jax read),
# apart from the model config that readers build the model from. Exports written before
# 2026-12-06 have none.
EXPORT_ORIGIN = "export.json"
EXPORT_DIR = "backbone"  # of a pretraining workdir
# Beside an export being written (`.<name>.partial`) or replaced (`.<name>.replaced`).
EXPORT_PARTIAL = "partial"
EXPORT_REPLACED = "replaced"
CORRUPT_SUFFIX = ".corrupt"
# Model settings that sit_jax added after it had written checkpoints without them (scan_layers on
# 2026-11-26, standardize_input on 2026-12-03): such a checkpoint was trained as the ViT's default
# for the setting computes, and resumes with that value.
ADDED_MODEL_SETTINGS = ("scan_layers", "standardize_input")
# Sub-directories of a workdir that `load_backbone` searches for step dirs.
CHECKPOINT_SUBDIRS = ("", "checkpoints", "ckpt", "checkpoint")
# The metadata entry of a head trained on a frozen backbone: {"params_hash": of the backbone's
# parameters (None: random init), "path": the directory they were read from}. A resume needs the
# same parameters, read from anywhere; checkpoints written before 2026-12-06 name the path only.
BACKBONE = "backbone"
# The experiments whose checkpoints hold a fine-tuned backbone under a classifier head, params
# {'backbone': ..., 'head': {'fc': ...}} (finetune.Classifier).
CLASSIFIER_EXPERIMENTS = ("finetune", "multilabel")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, found, matched or read."""


class StructureMismatch(CheckpointError):
  """The checkpoint's state has other leaves or shapes than the state requested."""


# ----------------------------------------------------------------------------
# Small helpers.


def _path(path) -> epath.Path:
  path = os.fspath(path)
  return epath.Path(path if metrics.is_remote(path) else os.path.abspath(path))


def _json_normalise(obj, what: str):
  """Round-trips `obj` through JSON (tuples -> lists) or raises CheckpointError."""
  try:
    return json.loads(json.dumps(obj, default=metrics.json_default))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serialisable: {e}") from e


def _short(err: BaseException, limit: int = 300) -> str:
  """One line: TensorStore appends a multi-line JSON spec to a message that already names every
  file of the chain; an operating-system error is its errno's text."""
  msg = str(err)
  if " See full TensorStore details" in msg and err.__cause__ is not None:
    return _short(err.__cause__, limit)  # the cause names the file and what is wrong with it
  code = re.search(r"os_error_code='?(\d+)", msg)
  if isinstance(err, OSError) and err.strerror:
    return err.strerror
  if code:
    return os.strerror(int(code.group(1)))
  msg = " ".join(msg.split(" [tensorstore_spec=")[0].split()) or type(err).__name__
  return msg if len(msg) <= limit else msg[:limit] + " ..."


def _out_of_memory(err: BaseException) -> bool:
  """Whether `err` or an error it wraps is the host's (MemoryError) or a device's lack of
  memory."""
  while err is not None:
    if isinstance(err, MemoryError) or (isinstance(err, jax.errors.JaxRuntimeError)
                                        and "RESOURCE_EXHAUSTED" in str(err)):
      return True
    err = err.__cause__ or err.__context__
  return False


def _is_stray_read_completion(unraisable) -> bool:
  """Whether an unraisable error is TensorStore completing a read for an asyncio loop that orbax
  has closed: asyncio's `call_soon_threadsafe`, called from TensorStore's C++ thread (so no Python
  caller in the traceback), finding the loop closed."""
  tb = unraisable.exc_traceback  # its first frame is the outermost Python one
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
          and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _no_unretrieved_read_errors(record: logging.LogRecord) -> bool:
  """A filter: False for asyncio's "Task (or Future) exception was never retrieved" of a
  TensorStore read error."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (re.match(r"(Task|Future) exception was never retrieved", record.getMessage())
              and "[tensorstore_spec=" in str(exc))


def _no_orbax_preemption_lines(record: logging.LogRecord) -> bool:
  return not str(record.msg).endswith("Reached preemption sync point, step=%s")


def _no_override_warning(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith("Type handler registry type")


def _quiet_orbax():
  """Drops what orbax prints that our own one line says better. Idempotent.

  * A failed read. When one array of a step cannot be read, orbax closes the asyncio loop of the
    read (asyncio_utils.run_sync) with the reads of the other arrays still in flight. Each that
    completes later raises "Event loop is closed" in TensorStore's thread, and the reads that
    failed log "Task (or Future) exception was never retrieved" with TensorStore's whole spec: on
    a resume past one corrupt step of runlocal, 136 tracebacks on stderr below the one line that
    says what happened. Those, and only those, are dropped; every other unraisable error still
    reaches the hook that was there.
  * A preemption. orbax warns "Reached preemption sync point" (through absl.logging) at each of
    its queries of the step, five times in each process of a two-process job; the trainer's line
    names the step saved and how to resume.
  """
  # addFilter adds a filter once: each is one object.
  logging.getLogger("asyncio").addFilter(_no_unretrieved_read_errors)
  logging.getLogger("absl").addFilter(_no_orbax_preemption_lines)
  previous = sys.unraisablehook
  if getattr(previous, "quiets_failed_reads", False):
    return

  def hook(unraisable):
    if not _is_stray_read_completion(unraisable):
      previous(unraisable)

  hook.quiets_failed_reads = True
  sys.unraisablehook = hook


def _flat_abstract(tree) -> dict[tuple[str, ...], Any]:
  from sit_jax import sharding
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(sharding.path_name(path).split("/")): leaf for path, leaf in leaves}


def _fmt_keys(keys: Iterable[tuple[str, ...]], limit: int = 10) -> str:
  keys = sorted("/".join(k) for k in keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _metadata_diff(expected, actual, prefix="") -> list[str]:
  """Differences between JSON-like values; dict keys are compared as a union."""
  if isinstance(expected, dict) and isinstance(actual, dict):
    diffs = []
    for k in sorted(set(expected) | set(actual), key=str):
      name = f"{prefix}.{k}" if prefix else str(k)
      if k not in actual:
        diffs.append(f"{name}: missing in checkpoint, expected {expected[k]!r}")
      elif k not in expected:
        diffs.append(f"{name}: checkpoint has {actual[k]!r}, expected nothing")
      else:
        diffs.extend(_metadata_diff(expected[k], actual[k], name))
    return diffs
  if expected != actual:
    return [f"{prefix}: checkpoint={actual!r}, expected={expected!r}"]
  return []


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"sit_jax:{name}")


class _Unreadable(Exception):
  """Internal: the step exists but could not be read (fallback candidate)."""


class _UnreadableStep(CheckpointError):
  """Internal: load_backbone could not read a step directory's files."""


# ----------------------------------------------------------------------------
# Ctrl-C and SIGTERM.

_SIGNALLED = threading.Event()
_INTERRUPTIBLE = threading.Event()  # inside `interruptible()`


class Interrupted(Exception):
  """A second SIGTERM cut short the work inside `interruptible()`."""


def signalled() -> bool:
  """True once SIGTERM or SIGINT arrived inside `stop_signals()`."""
  return _SIGNALLED.is_set()


@contextlib.contextmanager
def interruptible():
  """Inside (an evaluation, the wait for the next batch: work that a resumed run does again), a
  SIGTERM after the first raises Interrupted: the training loop saves the step and stops now
  rather than after that work, which may outlast the scheduler's wait before its kill -9.
  Elsewhere (a step, a save) the loop is at most a step from saving it."""
  _INTERRUPTIBLE.set()
  try:
    yield
  finally:
    _INTERRUPTIBLE.clear()


def _on_signal(signum, frame):
  del frame
  if _SIGNALLED.is_set():
    if signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving.
    if _INTERRUPTIBLE.is_set():
      raise Interrupted("a second SIGTERM")
  # Only set a flag: the loop saves at a step boundary, never mid-update.
  _SIGNALLED.set()


def _to_preemption_notice():
  """A multi-process job's SIGINT handler: the first Ctrl-C becomes the SIGTERM that JAX's
  preemption service hears (and tells every process), the second stops at once. Ctrl-C used to
  end its process alone, losing the steps since the last checkpoint, while the others waited
  in their next collective."""
  interrupted = threading.Event()

  def handler(signum, frame):
    del signum, frame
    if interrupted.is_set():
      raise KeyboardInterrupt
    interrupted.set()
    signal.raise_signal(signal.SIGTERM)

  return handler


@contextlib.contextmanager
def stop_signals():
  """Inside, SIGTERM and Ctrl-C (SIGINT) set `signalled()` instead of ending the process; the
  training loop saves the current step and stops (a second Ctrl-C stops at once; a second
  SIGTERM cuts an evaluation short: `interruptible`).

  From the main thread only. A multi-process job leaves SIGTERM to JAX's preemption service,
  whose sync point (`reached_preemption`) makes every host stop at (and save) the same step,
  and sends Ctrl-C there.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if jax.process_count() > 1:
    handlers = {signal.SIGINT: _to_preemption_notice()} if distributed.preemption_service() else {}
  else:
    _SIGNALLED.clear()
    handlers = {signal.SIGTERM: _on_signal, signal.SIGINT: _on_signal}
  previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def reached_preemption(step: int) -> bool:
  """Whether the training loop stops after `step` for a signal inside `stop_signals()` (every
  process of a job must ask at every step, inside `steps_from`): on several processes, at JAX's
  preemption sync point, the same step on every one."""
  if jax.process_count() == 1:
    return signalled()
  return ocp.multihost.reached_preemption(step)


@contextlib.contextmanager
def steps_from(start_step: int):
  """Around a training loop from `start_step` and the wait for its last save: on several
  processes, a SIGTERM inside stops the loop at JAX's sync point (after the last step, the run
  finishes); before or after, it ends the job (distributed.py). The sync point is
  the step after the latest one the processes asked about: the loop asks about `start_step`
  first, or a notice would wait for a step that a resumed loop has passed."""
  if jax.process_count() == 1:
    yield
    return
  reached_preemption(start_step)
  with distributed.training_loop():
    yield


class _Manager(ocp.CheckpointManager):
  """orbax's manager, with `stop_signals()` as the preemption signal of a one-process job (orbax
  reads JAX's preemption sync point, which runs only under jax.distributed)."""

  def reached_preemption(self, step: int) -> bool:
    return reached_preemption(step)


# ----------------------------------------------------------------------------
# Checkpointer.


_REPLICA_PARALLEL_SAVES_OFF = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)


def _no_replica_parallel_saves():
  """orbax's replica-parallel saving has each device write a slice of every replicated array,
  cut by a jitted slice per array shape: on XLA:CPU those compiles cost seconds per first save
  (120 small arrays on 8 devices: 29 s against 0.1 s), and CPU devices share the host's memory,
  so it gains nothing there. Sets orbax's (process-wide) jax.Array handler, once, without the
  warning orbax logs at every override ('Type handler registry type ... overriding jax.Array')
  on every run: the override is the point."""
  if ocp.type_handlers.get_type_handler(jax.Array) is _REPLICA_PARALLEL_SAVES_OFF:
    return
  absl_logger = logging.getLogger("absl")  # orbax logs through absl.logging
  absl_logger.addFilter(_no_override_warning)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, _REPLICA_PARALLEL_SAVES_OFF, override=True)
  finally:
    absl_logger.removeFilter(_no_override_warning)


class Checkpointer:
  """Saves a train state every `every` steps, at `last_step` and at a preemption, and keeps the
  latest `keep` (>= 1) committed checkpoints.

  Usage in a training loop (trainer.py)::

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3, every=1000, last_step=total_steps)
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_state, expected_metadata={...}, fallback=True)
    for step in ...:
      ...
      stop = ckpt.reached_preemption(step)
      if ckpt.should_save(step):
        ckpt.save(step, state, metadata={...})
      if stop: break
    ckpt.close()
  """

  def __init__(self, directory, *, keep: int = 3, every: int = 1000,
               last_step: int | None = None, async_save: bool = True):
    if keep < 1:  # 0 would delete every checkpoint as soon as it is written.
      raise ValueError(f"keep_checkpoints={keep}: keep the latest N >= 1 checkpoints.")
    if every < 1:
      raise ValueError(f"checkpoint_every={every}: save every N >= 1 steps (the last step is "
                       "always saved).")
    self.directory = _path(directory)
    self.set_aside: list[int] = []  # unreadable steps moved away by restore(fallback=True)
    self._saving = None  # the step of the last asynchronous save not yet checked
    self._check_writable()
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if last_step:
      policies.append(ocp.checkpoint_managers.SpecificStepsPolicy([last_step]))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True)  # removes what a crash left half-written.
    if jax.default_backend() == "cpu":
      _no_replica_parallel_saves()
    _quiet_orbax()
    try:
      self._mngr = _Manager(self.directory, options=options,
                            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})
    except Exception as e:
      raise CheckpointError(f"Cannot open checkpoint directory {self.directory}: "
                            f"{_short(e)}") from e

  def _check_writable(self):
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      if (not metrics.is_remote(self.directory)
          and not os.access(self.directory, os.W_OK | os.X_OK)):
        raise PermissionError(13, "Permission denied")
    except Exception as e:
      raise CheckpointError(f"Checkpoint directory {self.directory} is not writable: "
                            f"{_short(e)}. Fix its permissions or pass another path.") from e

  # -- queries ---------------------------------------------------------------

  def step_path(self, step: int) -> str:
    return str(self.directory / str(int(step)))

  def all_steps(self) -> list[int]:
    """Committed steps, ascending."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step) -> bool:
    return self._mngr.should_save(int(step))

  def reached_preemption(self, step) -> bool:
    """Whether to save `step` and stop (every process of a job must ask at every step)."""
    return self._mngr.reached_preemption(int(step))

  # -- save ------------------------------------------------------------------

  def save(self, step, state, *, metadata: dict) -> bool:
    """Starts saving `state` (asynchronously unless async_save=False) if orbax's policy says
    so; returns whether it did. Older checkpoints go only once the new one is committed."""
    step = int(step)
    metadata = _json_normalise(metadata, "Checkpoint metadata")
    self.wait()  # orbax would wait too, and blame a failure of the previous save on this one.
    try:
      saved = bool(self._mngr.save(step, args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardSave(state)}), custom_metadata=metadata))
    except Exception as e:
      raise self._save_error(step, e) from e
    if saved:
      self._saving = step
    return saved

  def _save_error(self, step: int | None, err: BaseException) -> CheckpointError:
    # orbax drops the steps a save rotates out from its list when the save starts, and they stay
    # on disk if it fails: only the directory says what is kept (keep=1 listed none).
    with contextlib.suppress(Exception):
      self._mngr.reload()
    kept = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"Saving {'a checkpoint' if step is None else f'step {step}'} to {self.directory} "
        f"failed: {_short(err)}. "
        + (f"The last good checkpoint is step {kept[-1]}." if kept else "No checkpoint is "
           "kept.") + " Free space (or fix the directory) and start the same command to resume.")

  def raise_failed_save(self):
    """Raises if the last asynchronous save has ended without committing its step (disk
    full, say); cheap and non-blocking while it is still running."""
    if self._saving is None or self._mngr.is_saving_in_progress():
      return
    self.wait()

  def wait(self):
    """Blocks until the in-flight save is committed; raises a one-line error naming its step
    if it failed."""
    step, self._saving = self._saving, None
    try:
      self._mngr.wait_until_finished()
      self._mngr.check_for_errors()
    except Exception as e:
      raise self._save_error(step, e) from e
    if step is not None and not (self.directory / str(step)).exists():
      # orbax logs a failed finalisation instead of raising it, and still lists the step.
      raise self._save_error(step, OSError("the step was not committed"))

  def close(self):
    try:
      self.wait()
    finally:
      self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is None:
      self.close()
      return
    try:  # the error on its way out says what happened; orbax would raise a failed save again.
      self.close()
    except Exception:  # pylint: disable=broad-except
      log.debug("Closing %s after an error", self.directory, exc_info=True)

  # -- restore ---------------------------------------------------------------

  def metadata(self, step: int) -> dict:
    """The custom metadata saved with `step`."""
    return _read_metadata(self.directory / str(step))

  def restore(self, abstract_state, step=None, *,
              expected_metadata: dict | None = None, fallback: bool = False):
    """Restores `(state, metadata)`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (or arrays) whose `.sharding` says
        where each restored leaf goes; it may be another mesh or device count than the one
        the checkpoint was written from.
      step: step to restore, default the latest committed step.
      expected_metadata: if given, each of its top-level keys (e.g. 'model') is compared with
        the saved metadata before any array is read; a difference raises CheckpointError
        naming the differing fields ('settings': one dotted config key each, and what to do).
      fallback: if the chosen step is unreadable (corrupt or truncated files), restore the
        next older readable step instead, and set the unreadable ones aside (renamed
        `<step>.corrupt`, listed in `set_aside`) so that training writes those steps again.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No committed checkpoint found in {self.directory}.")
    if step is None:
      candidates = steps[::-1]
    else:
      step = int(step)
      if step not in steps:
        raise CheckpointError(f"Step {step} is not a committed checkpoint in "
                              f"{self.directory}; available steps: {steps}.")
      candidates = [s for s in steps[::-1] if s <= step]
    if not fallback:
      candidates = candidates[:1]
    if expected_metadata is not None:
      expected_metadata = _json_normalise(expected_metadata, "expected_metadata")

    errors = []
    for s in candidates:
      try:
        restored = self._restore_step(s, abstract_state, expected_metadata)
      except _Unreadable as e:
        errors.append((s, str(e)))
        if s != candidates[-1]:
          log.warning("Checkpoint step %d in %s is unreadable (%s); falling back to an older "
                      "step.", s, self.directory, e)
        continue
      if errors:
        self._set_aside([bad for bad, _ in errors])
      return restored
    hint = (" Move it away (kept for a post-mortem) or pass another --workdir to start afresh."
            if fallback else " Pass fallback=True to try older steps.")
    raise CheckpointError(
        f"Checkpoint in {self.directory} is corrupt or unreadable: "
        + "; ".join(f"step {s}: {e}" for s, e in errors) + "." + hint)

  def _set_aside(self, steps: list[int]):
    if jax.process_index() == 0:
      for s in steps:
        target = self.directory / f"{s}{CORRUPT_SUFFIX}"
        n = 1
        while target.exists():
          target, n = self.directory / f"{s}{CORRUPT_SUFFIX}{n}", n + 1
        (self.directory / str(s)).rename(target)
        log.warning("Set aside unreadable checkpoint step %d as %s; training will write that "
                    "step again.", s, target)
    _sync("set_aside")
    self._mngr.reload()
    self.set_aside += steps

  def _restore_step(self, step, abstract_state, expected_metadata):
    step_dir = self.directory / str(step)
    metadata = self.metadata(step)
    if expected_metadata is not None:
      _check_metadata(step_dir, expected_metadata, metadata)
    self._check_structure(step, abstract_state)
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]
    except Exception as e:
      if _out_of_memory(e):  # the step is fine: it must not be set aside as unreadable.
        raise CheckpointError(
            f"Restoring step {step} from {self.directory} ran out of memory ({_short(e)}); the "
            "checkpoint is kept as it is. Resume where the train state fits: more devices or "
            "hosts, or the fsdp rules (config argument fsdp) to shard it over them.") from e
      raise _Unreadable(_short(e)) from e
    return state, metadata

  def _check_structure(self, step, abstract_state):
    """Compares leaf paths and shapes with the stored metadata (clear errors)."""
    try:
      tree = self._mngr.item_metadata(step)[STATE_ITEM]
    except Exception as e:
      raise _Unreadable(f"cannot read its state metadata: {_short(e)}") from e
    if tree is None:
      raise _Unreadable("its state metadata is missing")
    try:
      stored = ocp.tree.to_flat_dict(tree.tree)
      stored = {tuple(str(p) for p in k): v for k, v in stored.items()}
      wanted = _flat_abstract(abstract_state)
    except Exception:  # Unknown layout: let orbax do its own checks.
      log.debug("Structure pre-check skipped", exc_info=True)
      return
    missing = set(wanted) - set(stored)
    unexpected = set(stored) - set(wanted)
    shape_diffs = []
    for k in sorted(set(wanted) & set(stored)):
      want = getattr(wanted[k], "shape", None)
      have = getattr(stored[k], "shape", None)
      if want is not None and have is not None and tuple(want) != tuple(have):
        shape_diffs.append(f"{'/'.join(k)}: checkpoint {tuple(have)} vs "
                           f"requested {tuple(want)}")
    if not (missing or unexpected or shape_diffs):
      return
    parts = []
    if missing:
      parts.append(f"requested but not in checkpoint: {_fmt_keys(missing)}")
    if unexpected:
      parts.append(f"in checkpoint but not requested: {_fmt_keys(unexpected)}")
    if shape_diffs:
      more = f" (+{len(shape_diffs) - 10} more)" if len(shape_diffs) > 10 else ""
      parts.append("shape mismatch: " + "; ".join(shape_diffs[:10]) + more)
    raise StructureMismatch(
        f"Checkpoint {self.directory / str(step)} does not match the requested state "
        f"(different model or optimizer config?): " + ". ".join(parts) + ".")


def _read_metadata(step_dir: epath.Path) -> dict:
  """The custom metadata of a step directory, or the JSON item that checkpoints written before
  the custom metadata carry."""
  legacy = step_dir / LEGACY_METADATA_ITEM / "metadata"
  try:
    custom = ocp.metadata.get_step_metadata(step_dir).custom_metadata
    return custom or (json.loads(legacy.read_text()) if legacy.exists() else {})
  except Exception as e:
    raise _Unreadable(f"cannot read its metadata: {_short(e)}") from e


def _with_added_model_settings(metadata: dict) -> dict:
  """`metadata` with the ADDED_MODEL_SETTINGS its 'model' lacks, at the ViT's defaults."""
  model = metadata.get("model")
  if not isinstance(model, dict):
    return metadata
  defaults = {f.name: f.default for f in dataclasses.fields(vit.VisionTransformer)}
  return {**metadata, "model": {**{k: defaults[k] for k in ADDED_MODEL_SETTINGS}, **model}}


def _check_metadata(step_dir, expected: dict, actual: dict):
  """Raises CheckpointError if `actual` differs from `expected` on one of its keys. Other
  entries (model, experiment) come first, listing the differing fields: another experiment's
  checkpoint differs in its settings too, and setting those back would not resume it. Then the
  'settings' entry ({dotted config key: value}), one sentence per setting."""
  expected, actual = _with_added_model_settings(expected), _with_added_model_settings(actual)
  diffs = []
  for key, value in expected.items():
    if key in ("settings", BACKBONE):
      continue
    if key not in actual:
      diffs.append(f"{key}: missing in checkpoint")
    else:
      diffs.extend(_metadata_diff(value, actual[key], key))
  if diffs:
    raise CheckpointError(
        f"Checkpoint {step_dir} was written with a different configuration than requested; "
        "differing fields: " + "; ".join(diffs) + ". Use a matching config or another workdir.")
  settings = [f"{key} was {actual['settings'][key]!r} when the checkpoint was written and is "
              f"{value!r} now" for key, value in expected.get("settings", {}).items()
              if key in actual.get("settings", {}) and actual["settings"][key] != value]
  if settings:
    first = next(iter(k for k, v in expected["settings"].items()
                      if actual.get("settings", {}).get(k, v) != v))
    raise CheckpointError(
        f"Cannot resume {step_dir}: " + "; ".join(settings) + ". A resumed run must keep it "
        f"(it changes the trained state or the data order): set {first} back to resume, or "
        "pass another --workdir to start afresh.")
  if BACKBONE in expected:
    _check_backbone(step_dir, expected[BACKBONE], actual)


def _check_backbone(step_dir, expected: dict, actual: dict):
  """Raises CheckpointError unless the frozen backbone about to be read is the one the saved
  head was trained on: the same parameters (a checkpoint without their hash: the same path)."""
  saved = actual.get(BACKBONE) or {"params_hash": None, "path": actual.get("init")}
  name = lambda path: path or "the random-init backbone (config.init='')"
  if saved["params_hash"] is None and saved["path"]:  # written before the hash
    if saved["path"] != expected["path"]:
      raise CheckpointError(
          f"Cannot resume {step_dir}: its head was trained on the frozen backbone of "
          f"{saved['path']}, and was saved before sit_jax recorded which parameters those are: "
          f"it resumes with --config.init={saved['path']} only (not {name(expected['path'])}),"
          " or pass another --workdir to start afresh.")
  elif saved["params_hash"] != expected["params_hash"]:
    raise CheckpointError(
        f"Cannot resume {step_dir}: its head was trained on the frozen backbone of "
        f"{name(saved['path'])}, and {name(expected['path'])} holds other parameters. Set "
        "--config.init to the backbone it was trained on (that directory, or a copy of it) to "
        "resume, or pass another --workdir to start afresh.")


# ----------------------------------------------------------------------------
# Backbone export / import.


def export_backbone(directory, params, model_config: dict, *, overwrite: bool = False,
                    origin: dict | None = None) -> str:
  """Writes `params` (e.g. {'backbone': ...}), model_config.json and, given `origin` (where the
  parameters come from, e.g. {'step': 1000, 'experiment': 'sit', 'weights': 'student',
  'workdir': ...}; `backbone_step` reads its step), export.json; returns the path.

  `model_config.json` is written last, so its presence marks a complete export. On a local disk
  an earlier export is replaced only once the new one is whole (a pretraining run started again
  exports over the run's first export, which may be the only copy of that backbone left): a kill
  or an error on the way leaves it loadable. Other files in the directory stay.
  """
  d = _path(directory)
  model_config = _json_normalise(model_config, "model_config")
  origin = _json_normalise(origin, "origin") if origin else None
  # An object store renames by copying and deleting each object, which is no atomic switch: a
  # remote export is written in place, once the earlier one is deleted.
  remote = metrics.is_remote(d)
  final = d if remote else epath.Path(os.path.realpath(d))  # a symlink's target is replaced
  partial, replaced = _beside(final, EXPORT_PARTIAL), _beside(final, EXPORT_REPLACED)
  written = d if remote else partial
  try:
    if not overwrite and (_holds_export(d) or _holds_export(replaced)):
      raise CheckpointError(
          f"{d} already holds a backbone export; pass overwrite=True or "
          "choose another directory.")
    if jax.process_index() == 0:
      if remote:
        for name in (EXPORT_CONFIG, EXPORT_ORIGIN):  # model_config.json first: incomplete now
          if (d / name).exists():
            (d / name).unlink()
        if (d / EXPORT_PARAMS).exists():
          (d / EXPORT_PARAMS).rmtree()
      else:
        _clear_interrupted_export(final, partial, replaced)
      d.mkdir(parents=True, exist_ok=True)  # a file there, or an unwritable parent: one line now
      written.mkdir(exist_ok=True)
    _sync("export_backbone:cleared")  # nobody writes before process 0 has cleared the way.
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"Cannot write backbone export to {d}: {_short(e)}") from e
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(written / EXPORT_PARAMS, params)
      ckptr.wait_until_finished()
    if jax.process_index() == 0:
      if origin:
        metrics.atomic_write_text(written / EXPORT_ORIGIN, json.dumps(origin, indent=2) + "\n")
      metrics.atomic_write_text(written / EXPORT_CONFIG, json.dumps(model_config, indent=2) + "\n")
      if not remote:
        final.rename(replaced)
        partial.rename(final)
        _drop_replaced(replaced, final)
    _sync("export_backbone:written")
  except Exception as e:
    raise CheckpointError(f"Cannot write backbone export to {d}: {_short(e)}") from e
  return str(d)


def _beside(d: epath.Path, what: str) -> epath.Path:
  return d.parent / f".{d.name}.{what}"


def _holds_export(d: epath.Path) -> bool:
  return (d / EXPORT_CONFIG).exists() or (d / EXPORT_PARAMS).exists()


def is_export_entry(name: str) -> bool:
  """Whether `name` in an export directory is the export's own: its files, or what a write of
  them left (orbax's `params.orbax-checkpoint-tmp-*`, atomic_write's `.model_config.json.*`)."""
  return name.lstrip(".").startswith((EXPORT_CONFIG, EXPORT_PARAMS, EXPORT_ORIGIN))


def _drop_replaced(replaced: epath.Path, d: epath.Path):
  """Removes the earlier export that `d` replaced, after moving the files that are not the
  export's into `d`."""
  if replaced.exists():
    for entry in replaced.iterdir():
      if not is_export_entry(entry.name):
        entry.rename(d / entry.name)
    replaced.rmtree()


def _clear_interrupted_export(d: epath.Path, partial: epath.Path, replaced: epath.Path):
  """Undoes what an export stopped on its way left beside `d`: a half-written export, and an
  earlier export renamed aside (back to `d` where the new one never got there). Only the next
  export does this: a reader that renamed would race with an export between its renames, and
  may have no right to write."""
  if partial.exists():
    partial.rmtree()
  if replaced.exists() and not d.exists():
    replaced.rename(d)
  _drop_replaced(replaced, d)


def _interrupted_export(d: epath.Path) -> str:
  """The sentence naming the earlier export that a stopped export left renamed aside from `d`."""
  replaced = _beside(d, EXPORT_REPLACED)
  if metrics.is_remote(d) or d.exists() or not _holds_export(replaced):
    return ""
  return (f" An export into {d} was stopped while it replaced the one there, which is whole in "
          f"{replaced}: rename it to {d} (the next export there does).")


def _restore_numpy(item_dir: epath.Path, select: Callable[[Any], Any] | None = None):
  """Restores a pytree checkpoint as host numpy arrays (any device topology).

  `select` maps the stored metadata tree to the sub-tree to read; the rest is
  not loaded.
  """
  _quiet_orbax()
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ocp.PyTreeCheckpointHandler().metadata(item_dir)
    tree = meta.tree if hasattr(meta, "tree") else meta
    if select is not None:
      tree = select(tree)
    is_leaf = lambda x: x is None
    item = jax.tree.map(
        lambda m: None if m is None else np.zeros((0,)), tree, is_leaf=is_leaf)
    restore_args = jax.tree.map(
        lambda m: None if m is None else ocp.RestoreArgs(restore_type=np.ndarray),
        tree, is_leaf=is_leaf)
    return ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=select is not None))


def _step_metadata(step_dir: epath.Path) -> dict:
  try:
    return _read_metadata(step_dir)
  except _Unreadable as e:
    raise _UnreadableStep(f"Checkpoint {step_dir}: {e}") from e


def _load_from_step_dir(step_dir: epath.Path, weights: str = "student"):
  state_dir = step_dir / STATE_ITEM
  metadata = _step_metadata(step_dir)
  model_config = metadata.get("model") if isinstance(metadata, dict) else None
  if not isinstance(model_config, dict):
    raise CheckpointError(
        f"Checkpoint {step_dir} has no 'model' dict in its metadata "
        f"(keys: {sorted(metadata) if isinstance(metadata, dict) else metadata!r}).")

  entry = "params" if weights == "student" else "teacher"

  def select(tree):
    if not isinstance(tree, dict) or entry not in tree:
      keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise CheckpointError(
          f"Train state in {state_dir} has no '{entry}' entry (top-level keys: {keys}).")
    if not isinstance(tree[entry], dict) or "backbone" not in tree[entry]:
      raise CheckpointError(
          f"Train state in {state_dir} has no {entry}['backbone'] "
          f"({entry} keys: {sorted(tree[entry])}).")
    return {entry: {"backbone": tree[entry]["backbone"]}}

  try:
    restored = _restore_numpy(state_dir, select)
  except CheckpointError:
    raise
  except Exception as e:
    raise _UnreadableStep(
        f"Checkpoint {step_dir} is corrupt or unreadable: {_short(e)}") from e
  # A scan_layers run stacks its blocks; readers of backbones always get blocks_0..blocks_{d-1}.
  if model_config.get("scan_layers"):
    model_config = {**model_config, "scan_layers": False}
  return {"backbone": vit.unstack_blocks(restored[entry]["backbone"])}, model_config


def _load_export(p: epath.Path):
  missing = [name for name, ok in ((EXPORT_CONFIG, (p / EXPORT_CONFIG).is_file()),
                                   (f"{EXPORT_PARAMS}/", (p / EXPORT_PARAMS).is_dir())) if not ok]
  if missing:
    raise CheckpointError(f"Backbone export {p} is incomplete: it has no "
                          f"{' and no '.join(missing)} (an export that was interrupted? export "
                          "again, or point init at the pretraining checkpoints).")
  try:
    model_config = json.loads((p / EXPORT_CONFIG).read_text())
    params = _restore_numpy(p / EXPORT_PARAMS)
  except Exception as e:
    raise CheckpointError(f"Backbone export {p} is corrupt or unreadable: {_short(e)}") from e
  return params, model_config


def run_workdir(steps_dir: epath.Path) -> epath.Path:
  """The workdir of the run whose step directories are in `steps_dir`: the parent of its
  checkpoints/ (ckpt/, checkpoint/) sub-directory, or the directory itself."""
  if steps_dir.name in CHECKPOINT_SUBDIRS and not (steps_dir / "results.json").exists():
    return steps_dir.parent
  return steps_dir


def _warn_if_unfinished(workdir: epath.Path, step: int, weights: str):
  """A workdir's latest checkpoint is the end of its run only where results.json names it and
  the run was not stopped early, or where its backbone/ export (made at a run's end only) records
  that step: a run still going, preempted or extended has neither. Its backbone/ export is then
  of an earlier end (a finished run started again with a larger total_steps): the line names it,
  for a transfer that wants that one."""
  try:
    results = json.loads((workdir / "results.json").read_text())
  except Exception:  # pylint: disable=broad-except
    results = {}
  named = os.path.basename(str(results.get("checkpoint") or ""))
  export = workdir / EXPORT_DIR
  exported = (export / EXPORT_CONFIG).exists()  # a whole export
  export_step = backbone_step(export) if exported else None
  if (named == str(step) and not results.get("preempted")) or export_step == step:
    return
  earlier = ""
  if weights == "student" and exported:
    if export_step is None and results.get("backbone") and named:
      export_step = named  # an export without export.json: results.json names its step
    end = f"step {export_step}, " if export_step is not None else ""
    earlier = (f" Its {EXPORT_DIR}/ export holds the student of {end}where the run last "
               f"finished: pass {export} (config.init, or convert's --input) to read that one.")
  log.warning("Loading step %d, the latest checkpoint of %s, whose run has not finished (its "
              "results.json does not name that step as the end of the run): a backbone from "
              "mid-training.%s", step, workdir, earlier)


BACKBONE_WEIGHTS = ("student", "teacher")


def load_backbone(path, weights: str = "student") -> tuple[Any, dict]:
  """`(params, model_config)` of `read_backbone`."""
  return read_backbone(path, weights)[:2]


def read_backbone(path, weights: str = "student") -> tuple[Any, dict, str]:
  """Loads `(params, model_config)` as host numpy arrays, and the directory they were read from
  (a workdir's latest step when it was read: a run still saving moves it).

  `path` may be
    * an `export_backbone` directory: returns the exported params tree as is;
    * a checkpoint step directory (`<step>/state` and orbax's step metadata), or
    * a pretraining workdir: the latest committed step of the workdir itself or of its
      checkpoints/ (or ckpt/) sub-directory, else its backbone/ export (written at the run's
      end, which a finished run started again with a larger total_steps trains past: the
      warning that the step is not the end of the run names the export).
  For checkpoints the result is `{'backbone': state['params']['backbone']}` (with
  weights='teacher': `state['teacher']['backbone']`, the momentum teacher's) and
  `metadata['model']`, matching what `export_backbone` is given.
  """
  p = _path(path)
  found = locate_backbone(p, weights)
  if not (found / STATE_ITEM).is_dir():
    return (*_load_export(found), str(found))
  if found == p:
    return (*_load_from_step_dir(found, weights), str(found))
  while True:  # the latest step of a workdir, whose run may still be saving
    step = int(found.name)
    try:
      loaded = _load_from_step_dir(found, weights)
      break
    except _UnreadableStep as e:
      steps = _backbone_steps(found.parent)
      if steps and steps[-1] > step:  # a running pretraining's keep_checkpoints rotated it out
        log.warning("Could not read step %d of %s (%s); its run has saved step %d since, and "
                    "keeps only its latest checkpoints (keep_checkpoints): reading step %d.",
                    step, found.parent, _short(e), steps[-1], steps[-1])
        found = found.parent / str(steps[-1])
        continue
      older = [s for s in steps if s < step]
      if not older:
        raise
      raise CheckpointError(
          f"{e} (a copy of {p} that did not finish?). Copy that step again, or pass the step "
          f"before it, {found.parent / str(older[-1])} (config.init, or convert's --input).") from e
  _warn_if_unfinished(run_workdir(found.parent), step, weights)
  return (*loaded, str(found))


def saved_model_config(found) -> dict:
  """The model config saved with the backbone that `locate_backbone` found, read without any
  array; {} where it cannot be read (loading the backbone then says why)."""
  found = _path(found)
  try:
    if (found / STATE_ITEM).is_dir():
      return dict(_step_metadata(found).get("model") or {})
    return json.loads((found / EXPORT_CONFIG).read_text())
  except Exception:  # pylint: disable=broad-except
    return {}


def export_origin(export) -> dict:
  """What a backbone export's export.json says of where its parameters come from (a
  pretraining's step, a converted file); {} for an export without one (written before
  2026-12-06)."""
  path = _path(export) / EXPORT_ORIGIN
  try:
    if not path.exists():
      return {}
    origin = json.loads(path.read_text())
    if isinstance(origin, dict):
      return origin
    error = f"a JSON {type(origin).__name__}, not an object"
  except Exception as e:  # pylint: disable=broad-except
    error = _short(e)
  log.warning("Ignoring %s (%s): which step the backbone export holds is unknown. Delete the file, "
              "or export the backbone again.", path, error)
  return {}


def backbone_step(found) -> int | None:
  """The training step of the backbone that `locate_backbone` found: a step directory's, or the
  one its export.json records; None for an export without one."""
  found = _path(found)
  if not _holds_export(found):  # a step directory (which a running pretraining may rotate out)
    return int(found.name) if found.name.isdigit() else None
  step = export_origin(found).get("step")
  return step if isinstance(step, int) else None


def read_classifier_head(step_dir) -> tuple[dict, str | None] | None:
  """The classifier head (`state['params']['head']`, host numpy arrays) of a step directory of a
  fine-tuning run (CLASSIFIER_EXPERIMENTS), and its pooling as the step's metadata records it
  (head.features; None in a checkpoint written before 2026-12-06, whose run's config.json says
  it: `run_workdir`); None for a backbone export or another experiment's step."""
  step_dir = _path(step_dir)
  if not (step_dir / STATE_ITEM).is_dir():
    return None
  metadata = _step_metadata(step_dir)
  if metadata.get("experiment") not in CLASSIFIER_EXPERIMENTS:
    return None
  head = _restore_numpy(step_dir / STATE_ITEM,
                        lambda tree: {"params": {"head": tree["params"]["head"]}})["params"]["head"]
  return head, (metadata.get("settings") or {}).get("head.features")


def locate_backbone(path, weights: str = "student") -> epath.Path:
  """The directory `load_backbone(path, weights)` reads, found without reading any array (a
  transfer run checks its `config.init` before writing to its workdir): a backbone export or a
  committed step directory. Raises CheckpointError naming what was searched, or why it holds no
  teacher."""
  found = _locate(path)
  if weights not in BACKBONE_WEIGHTS:
    raise ValueError(f"weights={weights!r}: one of {BACKBONE_WEIGHTS}.")
  if weights == "teacher":
    if not (found / STATE_ITEM).is_dir():
      raise CheckpointError(
          f"{found} is a backbone export, which holds the student only: the teacher is in the "
          "pretraining run's checkpoints (set config.init to its workdir or a step directory), "
          "or use config.init_weights='student' (convert: --use=student).")
    experiment = _step_metadata(found).get("experiment")
    if experiment not in (None, "sit", "contrastive"):
      raise CheckpointError(f"{found} is a checkpoint of a {experiment} run, which has no "
                            "teacher: use config.init_weights='student' (convert: --use=student).")
  return found


def _backbone_steps(directory: epath.Path) -> list[int]:
  """The committed steps of `directory` that hold a train state, ascending."""
  try:
    return sorted(s for s in ocp.utils.checkpoint_steps(directory)
                  if (directory / str(s) / STATE_ITEM).is_dir())
  except (OSError, ValueError):
    return []


def _locate(path) -> epath.Path:
  p = _path(path)
  if not p.exists():
    raise CheckpointError(f"load_backbone: {p} does not exist.{_interrupted_export(p)}")
  if (p / EXPORT_CONFIG).exists() or (p / EXPORT_PARAMS).is_dir():
    return p
  if (p / STATE_ITEM).is_dir():
    if not ocp.path.step.is_checkpoint_finalized(p):
      raise CheckpointError(f"{p} is an incomplete (uncommitted) checkpoint; use a committed "
                            "step.")
    return p

  searched = []
  for sub in CHECKPOINT_SUBDIRS:
    d = p / sub if sub else p
    searched.append(str(d))
    steps = _backbone_steps(d)
    if steps:
      return d / str(steps[-1])
  if (p / EXPORT_DIR).is_dir():
    return p / EXPORT_DIR
  raise CheckpointError(
      f"Nothing loadable at {p}: expected a backbone export ({EXPORT_CONFIG} + "
      f"{EXPORT_PARAMS}/), a checkpoint step directory ({STATE_ITEM}/), or a pretraining "
      f"workdir with committed step directories or a {EXPORT_DIR}/ export (searched "
      f"{', '.join(searched)}).{_interrupted_export(p / EXPORT_DIR)}")
