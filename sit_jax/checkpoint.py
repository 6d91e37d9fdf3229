"""Checkpointing of arbitrary train-state pytrees with orbax.

Layout of a checkpoint directory (managed by `ocp.CheckpointManager`)::

    <directory>/<step>/state/      the train-state pytree (StandardSave, OCDBT)
    <directory>/<step>/metadata/   a JSON dict (model config, experiment name, ...)

Orbax writes every step into `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a crashed or in-flight save is never listed as a step. On top of
that we only trust step directories that carry one of orbax's commit files
(see `_COMMIT_MARKERS`), which also covers copies that were interrupted
(e.g. a partial `gsutil cp` of a workdir).

A backbone export (`export_backbone`) is a directory with `params/` (an orbax
pytree checkpoint) and `model_config.json`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sit_jax.models import vit

log = logging.getLogger(__name__)

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "model_config.json"
# Sub-directories of a workdir that `load_backbone` searches for step dirs.
CHECKPOINT_SUBDIRS = ("", "checkpoints", "ckpt", "checkpoint")
_COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, found, matched or read."""


# ----------------------------------------------------------------------------
# Small helpers.


def _is_local(path) -> bool:
  return "://" not in str(path)


def _json_normalise(obj, what: str):
  """Round-trips `obj` through JSON (tuples -> lists) or raises CheckpointError."""
  try:
    return json.loads(json.dumps(obj, default=_json_default))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serialisable: {e}") from e


def _json_default(o):
  if isinstance(o, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(o).tolist()
  raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _short(err: BaseException, limit: int = 400) -> str:
  msg = f"{type(err).__name__}: {err}"
  msg = msg.split(" [tensorstore_spec=")[0]  # tensorstore appends a huge spec
  return msg if len(msg) <= limit else msg[:limit] + " ..."


def _is_committed(step_dir: epath.Path) -> bool:
  if step_dir.name.endswith(_TMP_SUFFIX) or _TMP_SUFFIX + "-" in step_dir.name:
    return False
  try:
    return step_dir.is_dir() and any(
        (step_dir / m).exists() for m in _COMMIT_MARKERS)
  except OSError:
    return False


def _committed_step_dirs(directory: epath.Path) -> list[tuple[int, epath.Path]]:
  """(step, path) of committed numeric step directories, ascending."""
  try:
    if not directory.is_dir():
      return []
    children = list(directory.iterdir())
  except OSError:
    return []
  out = []
  for child in children:
    if child.name.isdigit() and _is_committed(child):
      out.append((int(child.name), child))
  return sorted(out)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_abstract(tree) -> dict[tuple[str, ...], Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in leaves}


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


class _CorruptCheckpoint(Exception):
  """Internal: the step exists but could not be read (fallback candidate)."""


# ----------------------------------------------------------------------------
# Checkpointer.


class Checkpointer:
  """Keeps the last `max_to_keep` committed checkpoints of a train state.

  Usage in a training loop::

    ckpt = Checkpointer(workdir + "/checkpoints")
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract_state, expected_metadata={"model": cfg})
    for step in ...:
      ...
      ckpt.save(step, state, metadata={"model": cfg, "name": name})
      if preempted():
        ckpt.save(step, state, metadata=..., force=True); ckpt.wait(); break
    ckpt.close()
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1000, async_save: bool = True):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    directory = os.fspath(directory)
    if _is_local(directory):
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.save_interval_steps = int(save_interval_steps)
    self._check_writable()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=self.save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
        # Removes `*.orbax-checkpoint-tmp` leftovers of a crashed save.
        cleanup_tmp_directories=True,
    )
    try:
      self._mngr = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                         METADATA_ITEM: ocp.JsonCheckpointHandler()})
    except Exception as e:
      raise CheckpointError(
          f"Cannot open checkpoint directory {self.directory}: {_short(e)}") from e

  def _check_writable(self):
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except Exception as e:
      raise CheckpointError(
          f"Cannot create checkpoint directory {self.directory}: {_short(e)}. "
          "Pass a writable path.") from e
    if not _is_local(self.directory):
      return
    try:
      fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=str(self.directory))
      os.close(fd)
      os.remove(probe)
    except OSError as e:
      raise CheckpointError(
          f"Checkpoint directory {self.directory} is not writable: {_short(e)}. "
          "Fix its permissions or pass another path.") from e

  # -- queries ---------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Committed steps, ascending."""
    return sorted(s for s in self._mngr.all_steps()
                  if _is_committed(self._step_dir(s)))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step) -> bool:
    step = int(step)
    if step <= 0 or step % self.save_interval_steps:
      return False
    return step not in self._mngr.all_steps()

  def reached_preemption(self, step) -> bool:
    return reached_preemption(step)

  # -- save ------------------------------------------------------------------

  def save(self, step, state, *, metadata: dict, force: bool = False) -> bool:
    """Starts saving `state` (asynchronously unless async_save=False).

    Returns True if a save was started. Older checkpoints are only deleted by
    orbax after the new step has been committed.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    if step in self._mngr.all_steps():
      log.info("Checkpoint for step %d already exists in %s; not saving again.",
               step, self.directory)
      return False
    metadata = _json_normalise(metadata, "Checkpoint metadata")
    try:
      return bool(self._mngr.save(
          step,
          args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardSave(state),
              METADATA_ITEM: ocp.args.JsonSave(metadata)}),
          force=True))
    except Exception as e:
      raise CheckpointError(
          f"Saving step {step} to {self.directory} failed: {_short(e)}") from e

  def wait(self):
    """Blocks until any in-flight async save is committed."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      raise CheckpointError(
          f"Asynchronous checkpoint save to {self.directory} failed: {_short(e)}"
      ) from e

  def close(self):
    try:
      self.wait()
    finally:
      self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restore ---------------------------------------------------------------

  def restore(self, abstract_state, step=None, *,
              expected_metadata: dict | None = None, fallback: bool = False):
    """Restores `(state, metadata)`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (or arrays) whose
        `.sharding` says where each restored leaf goes; it may be a different
        mesh / device count than the one the checkpoint was written from.
      step: step to restore, default the latest committed step.
      expected_metadata: if given, each of its top-level keys (e.g. 'model') is
        compared with the saved metadata before any array is read; a
        difference raises CheckpointError naming the differing fields.
      fallback: if the chosen step is unreadable (corrupt or truncated files),
        try the next older committed step instead of raising.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"No committed checkpoint found in {self.directory}.")
    if step is None:
      candidates = steps[::-1]
    else:
      step = int(step)
      if step not in steps:
        raise CheckpointError(
            f"Step {step} is not a committed checkpoint in {self.directory}; "
            f"available steps: {steps}.")
      candidates = [s for s in steps[::-1] if s <= step]
    if not fallback:
      candidates = candidates[:1]
    if expected_metadata is not None:
      expected_metadata = _json_normalise(expected_metadata, "expected_metadata")

    errors = []
    for s in candidates:
      try:
        return self._restore_step(s, abstract_state, expected_metadata)
      except _CorruptCheckpoint as e:
        errors.append(f"step {s}: {e}")
        if s != candidates[-1]:
          log.warning("Checkpoint step %d in %s is unreadable (%s); falling back "
                      "to an older step.", s, self.directory, e)
    hint = "" if fallback else " Pass fallback=True to try older steps."
    raise CheckpointError(
        f"Checkpoint in {self.directory} is corrupt or unreadable: "
        + "; ".join(errors) + "." + hint)

  def _restore_step(self, step, abstract_state, expected_metadata):
    step_dir = self._step_dir(step)
    try:
      metadata = self._mngr.restore(step, args=ocp.args.Composite(**{
          METADATA_ITEM: ocp.args.JsonRestore()}))[METADATA_ITEM]
    except Exception as e:
      raise _CorruptCheckpoint(f"cannot read metadata: {_short(e)}") from e

    if expected_metadata is not None:
      diffs = []
      for key, value in expected_metadata.items():
        if key not in metadata:
          diffs.append(f"{key}: missing in checkpoint")
        else:
          diffs.extend(_metadata_diff(value, metadata[key], key))
      if diffs:
        raise CheckpointError(
            f"Checkpoint {step_dir} was written with a different configuration "
            f"than requested; differing fields: " + "; ".join(diffs)
            + ". Use a matching config or another workdir.")

    self._check_structure(step, abstract_state)
    try:
      state = self._mngr.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]
    except Exception as e:
      msg = str(e)
      if ("tree structures do not match" in msg
          or "not compatible with the stored shape" in msg):
        msg = msg.replace("- Source:", "- requested:").replace(
            "- Target:", "- in checkpoint:")
        raise CheckpointError(
            f"Checkpoint {step_dir} does not match the requested state "
            f"structure: {msg}") from e
      raise _CorruptCheckpoint(_short(e)) from e
    return state, metadata

  def _check_structure(self, step, abstract_state):
    """Compares leaf paths and shapes with the stored metadata (clear errors)."""
    try:
      tree = self._mngr.item_metadata(step)[STATE_ITEM]
    except Exception as e:
      raise _CorruptCheckpoint(f"cannot read state metadata: {_short(e)}") from e
    if tree is None:
      raise _CorruptCheckpoint("state metadata missing")
    try:
      stored = ocp.tree.to_flat_dict(tree.tree)
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
    raise CheckpointError(
        f"Checkpoint {self._step_dir(step)} does not match the requested state "
        f"(different model or optimizer config?): " + ". ".join(parts) + ".")


# ----------------------------------------------------------------------------
# Preemption.

_PREEMPTED = threading.Event()
_warned_no_sync = False


class _PreemptionFlag:
  """Callable returning True once SIGTERM was received."""

  def __init__(self, previous: dict):
    self._previous = previous

  def __call__(self) -> bool:
    return _PREEMPTED.is_set()

  def clear(self):
    _PREEMPTED.clear()

  def uninstall(self):
    """Puts back the handlers that were active before installation."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _on_signal(signum, frame):
  del signum, frame
  # Only set a flag: the loop saves at a step boundary, never mid-update.
  _PREEMPTED.set()


def install_preemption_handler(signals=(signal.SIGTERM,)) -> Callable[[], bool]:
  """Installs a flag-setting handler for SIGTERM; returns `preempted()`.

  Must be called from the main thread. With several JAX processes the handler
  is not installed: JAX's coordination service installs its own SIGTERM
  notifier (which a Python handler would replace) and agrees on a common
  sync step; use `reached_preemption(step)` there.
  """
  previous = {}
  if jax.process_count() > 1:
    log.info("Multi-process run: relying on JAX's preemption sync point "
             "instead of a Python SIGTERM handler.")
  else:
    for sig in signals:
      previous[sig] = signal.signal(sig, _on_signal)
  return _PreemptionFlag(previous)


def reached_preemption(step) -> bool:
  """True if this step is where all processes should save and exit.

  Single process: the local SIGTERM flag. Multi-process: JAX's preemption sync
  point (every process must call this at every step), so that all hosts save
  the same step; falls back to the local flag if the service is unavailable.
  """
  global _warned_no_sync
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    except RuntimeError as e:
      if not _warned_no_sync:
        log.warning("JAX preemption sync service unavailable (%s); using the "
                    "local SIGTERM flag, hosts may disagree on the save step.", e)
        _warned_no_sync = True
  return _PREEMPTED.is_set()


# ----------------------------------------------------------------------------
# Backbone export / import.


def _atomic_write_text(path: epath.Path, text: str):
  if _is_local(path):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, str(path))
  else:
    path.write_text(text)


def export_backbone(directory, params, model_config: dict, *,
                    overwrite: bool = False) -> str:
  """Writes `params` (e.g. {'backbone': ...}) and model_config.json; returns the path.

  `model_config.json` is written last, so its presence marks a complete export.
  """
  d = epath.Path(os.path.abspath(directory) if _is_local(directory)
                 else os.fspath(directory))
  model_config = _json_normalise(model_config, "model_config")
  params_dir = d / EXPORT_PARAMS
  config_path = d / EXPORT_CONFIG
  try:
    if params_dir.exists() or config_path.exists():
      if not overwrite:
        raise CheckpointError(
            f"{d} already holds a backbone export; pass overwrite=True or "
            "choose another directory.")
      if jax.process_index() == 0:
        if config_path.exists():
          config_path.unlink()
        if params_dir.exists():
          params_dir.rmtree()
    if jax.process_count() > 1:  # nobody writes before process 0 has cleared an old export.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("sit_jax:export_backbone:cleared")
    d.mkdir(parents=True, exist_ok=True)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"Cannot write backbone export to {d}: {_short(e)}") from e
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(params_dir, params)
      ckptr.wait_until_finished()
    if jax.process_index() == 0:
      _atomic_write_text(config_path, json.dumps(model_config, indent=2) + "\n")
  except Exception as e:
    raise CheckpointError(f"Cannot write backbone export to {d}: {_short(e)}") from e
  return str(d)


def _restore_numpy(item_dir: epath.Path, select: Callable[[Any], Any] | None = None):
  """Restores a pytree checkpoint as host numpy arrays (any device topology).

  `select` maps the stored metadata tree to the sub-tree to read; the rest is
  not loaded.
  """
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


def _load_from_step_dir(step_dir: epath.Path):
  state_dir = step_dir / STATE_ITEM
  meta_path = step_dir / METADATA_ITEM / "metadata"
  try:
    metadata = json.loads(meta_path.read_text())
  except Exception as e:
    raise CheckpointError(
        f"Cannot read checkpoint metadata {meta_path}: {_short(e)}") from e
  model_config = metadata.get("model") if isinstance(metadata, dict) else None
  if not isinstance(model_config, dict):
    raise CheckpointError(
        f"Checkpoint {step_dir} has no 'model' dict in its metadata "
        f"(keys: {sorted(metadata) if isinstance(metadata, dict) else metadata!r}).")

  def select(tree):
    if not isinstance(tree, dict) or "params" not in tree:
      keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise CheckpointError(
          f"Train state in {state_dir} has no 'params' entry (top-level keys: {keys}).")
    if not isinstance(tree["params"], dict) or "backbone" not in tree["params"]:
      raise CheckpointError(
          f"Train state in {state_dir} has no params['backbone'] "
          f"(params keys: {sorted(tree['params'])}).")
    return {"params": {"backbone": tree["params"]["backbone"]}}

  try:
    restored = _restore_numpy(state_dir, select)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(
        f"Checkpoint {step_dir} is corrupt or unreadable: {_short(e)}") from e
  # A scan_layers run stacks its blocks; readers of backbones always get blocks_0..blocks_{d-1}.
  if model_config.get("scan_layers"):
    model_config = {**model_config, "scan_layers": False}
  return {"backbone": vit.unstack_blocks(restored["params"]["backbone"])}, model_config


def load_backbone(path) -> tuple[Any, dict]:
  """Loads `(params, model_config)` as host numpy arrays.

  `path` may be
    * an `export_backbone` directory: returns the exported params tree as is;
    * a checkpoint step directory (`<step>/state`, `<step>/metadata`), or
    * a pretraining workdir (itself, or its checkpoints/ or ckpt/ sub-directory,
      holding step directories): the latest committed step is used.
  For checkpoints the result is `{'backbone': state['params']['backbone']}` and
  `metadata['model']`, matching what `export_backbone` is given.
  """
  p = epath.Path(os.path.abspath(path) if _is_local(path) else os.fspath(path))
  if not p.exists():
    raise CheckpointError(f"load_backbone: {p} does not exist.")

  if (p / EXPORT_CONFIG).exists():
    if not (p / EXPORT_PARAMS).is_dir():
      raise CheckpointError(f"Backbone export {p} has {EXPORT_CONFIG} but no "
                            f"{EXPORT_PARAMS}/ directory.")
    try:
      model_config = json.loads((p / EXPORT_CONFIG).read_text())
      params = _restore_numpy(p / EXPORT_PARAMS)
    except Exception as e:
      raise CheckpointError(
          f"Backbone export {p} is corrupt or unreadable: {_short(e)}") from e
    return params, model_config

  if (p / STATE_ITEM).is_dir() and (p / METADATA_ITEM).is_dir():
    if not _is_committed(p):
      raise CheckpointError(
          f"{p} is an incomplete (uncommitted) checkpoint; use a committed step.")
    return _load_from_step_dir(p)

  searched = []
  for sub in CHECKPOINT_SUBDIRS:
    d = p / sub if sub else p
    searched.append(str(d))
    steps = [(s, sd) for s, sd in _committed_step_dirs(d)
             if (sd / STATE_ITEM).is_dir()]
    if steps:
      return _load_from_step_dir(steps[-1][1])
  raise CheckpointError(
      f"Nothing loadable at {p}: expected a backbone export ({EXPORT_CONFIG} + "
      f"{EXPORT_PARAMS}/), a checkpoint step directory ({STATE_ITEM}/ + "
      f"{METADATA_ITEM}/), or a workdir with committed step directories "
      f"(searched {', '.join(searched)}).")
