import gc
import glob
import json
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sit_jax import checkpoint as ckpt_lib
from sit_jax.checkpoint import CheckpointError, Checkpointer

MODEL = {"name": "vit_tiny", "width": 32, "depth": 2, "patch_size": 4}


def make_state(step=0):
  return {
      "params": {
          "backbone": {"w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6) + step,
                       "b": jnp.full((6,), 0.5, jnp.float32)},
          "head": {"w": jnp.ones((6, 3), jnp.float32) * step},
      },
      "opt_state": {"count": jnp.asarray(step, jnp.int32),
                    "mu": {"w": jnp.zeros((4, 6), jnp.float32)}},
      "step": jnp.asarray(step, jnp.int32),
  }


def abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact(tmp_path):
  state = make_state(3)
  with Checkpointer(tmp_path / "ck", every=1, async_save=False) as ck:
    assert ck.latest_step() is None
    assert ck.save(3, state, metadata={"model": MODEL, "experiment": "t"})
    restored, meta = ck.restore(abstract(state))
  assert_tree_equal(restored, state)
  assert meta == {"model": MODEL, "experiment": "t"}


def test_the_cpu_array_handler_is_set_once_and_silently(tmp_path, caplog):
  """On CPU the Checkpointer swaps orbax's jax.Array handler for one without replica-parallel
  saves; orbax logged 'Type handler registry type ... overriding jax.Array' on every run."""
  import orbax.checkpoint as ocp
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(),
                                          override=True)  # orbax's default, as at import
  caplog.clear()
  with caplog.at_level("INFO"):
    for i in range(2):
      Checkpointer(tmp_path / f"ck{i}", every=1, async_save=False).close()
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler is ckpt_lib._REPLICA_PARALLEL_SAVES_OFF
  assert not [r for r in caplog.records if "overriding" in r.getMessage()], caplog.text
  # The filter that kept the warning out is gone: orbax's own overrides still warn.
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  assert "overriding" in caplog.text


def test_async_save_keep_last_n_and_commit_order(tmp_path):
  ck = Checkpointer(tmp_path / "ck", keep=2, every=1)
  kept = []
  for step in range(1, 5):
    assert ck.save(step, make_state(step), metadata={"model": MODEL})
    # Until the new step is committed, no older kept step may be gone.
    on_disk = {int(d) for d in os.listdir(ck.directory) if d.isdigit()}
    assert step in ck.all_steps() or set(kept) <= on_disk
    ck.wait()
    kept = (kept + [step])[-2:]
  assert ck.all_steps() == [3, 4]
  assert sorted(d for d in os.listdir(ck.directory) if d.isdigit()) == ["3", "4"]
  assert not glob.glob(str(ck.directory / "*tmp*"))
  restored, _ = ck.restore(abstract(make_state(4)))
  assert_tree_equal(restored, make_state(4))
  ck.close()


def test_failed_async_save_with_keep_1_names_the_kept_step(tmp_path, monkeypatch):
  """A save that fails in the background (disk full) leaves the step it would have rotated
  out on disk; the error names it, and it is still the latest step."""
  from orbax.checkpoint._src.checkpointers import async_checkpointer
  ck = Checkpointer(tmp_path / "ck", keep=1, every=1)
  ck.save(1, make_state(1), metadata={"model": MODEL})
  ck.wait()

  # The writes finish and the commit (the rename of the step's directory) fails. Failing before
  # the writes finished left orbax's writer threads waiting 300 s for a signal, at exit.
  wait_for_writes = async_checkpointer._background_wait_for_commit_futures

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures",
                      lambda directory, futures, on_commit, **kw: wait_for_writes(
                          directory, futures, no_space, **kw))
  assert ck.save(2, make_state(2), metadata={"model": MODEL})
  with pytest.raises(CheckpointError, match="step 2 .* No space left on device. The last good "
                                            "checkpoint is step 1."):
    ck.wait()
  monkeypatch.undo()
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  restored, _ = ck.restore(abstract(make_state()))
  assert_tree_equal(restored, make_state(1))
  ck.close()


def test_save_policy_interval_last_step_and_preemption(tmp_path):
  ck = Checkpointer(tmp_path / "ck", every=10, last_step=25, async_save=False)
  assert [s for s in range(1, 31) if ck.should_save(s)] == [10, 20, 25, 30]
  assert not ck.save(15, make_state(), metadata={})
  assert ck.save(10, make_state(), metadata={})
  assert not ck.should_save(10) and not ck.save(10, make_state(), metadata={})  # exists
  with ckpt_lib.stop_signals():
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(ckpt_lib.signalled)
    assert ck.reached_preemption(13) and ck.should_save(13)  # a preemption saves any step
    assert ck.save(13, make_state(), metadata={})
  assert ck.all_steps() == [10, 13]
  ck.close()


def test_keep_must_be_positive(tmp_path):
  for keep in (0, -1):  # 0 would delete each checkpoint as soon as it is committed.
    with pytest.raises(ValueError, match=f"keep_checkpoints={keep}: keep the latest N >= 1"):
      Checkpointer(tmp_path / "ck", keep=keep)


def test_latest_step_after_reopen(tmp_path):
  ck = Checkpointer(tmp_path / "ck", every=5)
  for s in (5, 10):
    ck.save(s, make_state(s), metadata={"model": MODEL})
  ck.close()
  ck2 = Checkpointer(tmp_path / "ck", every=5)
  assert ck2.latest_step() == 10
  restored, _ = ck2.restore(abstract(make_state()), step=5)
  assert_tree_equal(restored, make_state(5))
  with pytest.raises(CheckpointError, match="available steps"):
    ck2.restore(abstract(make_state()), step=7)
  ck2.close()


def test_uncommitted_step_dirs_are_ignored(tmp_path):
  d = tmp_path / "ck"
  with Checkpointer(d, every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
  # What a crash during a save leaves behind must not become the latest step.
  shutil.copytree(d / "1", d / "5.orbax-checkpoint-tmp")
  with Checkpointer(d, every=1) as ck:
    assert ck.latest_step() == 1
    assert ck.all_steps() == [1]
    restored, _ = ck.restore(abstract(make_state()))
    assert_tree_equal(restored, make_state(1))


def _corrupt_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(3)


def test_corrupt_latest_step_error_and_fallback(tmp_path):
  d = tmp_path / "ck"
  with Checkpointer(d, every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
    ck.save(2, make_state(2), metadata={"model": MODEL})
  _corrupt_arrays(d / "2")
  with Checkpointer(d, every=1) as ck:
    with pytest.raises(CheckpointError, match=r"corrupt.*step 2.*fallback=True") as e:
      ck.restore(abstract(make_state()))
    # The file and what is wrong with it, not TensorStore's spec of the array.
    assert "2/state" in str(e.value) and "TensorStore" not in str(e.value)
    restored, _ = ck.restore(abstract(make_state()), fallback=True)
    assert int(restored["step"]) == 1
    assert_tree_equal(restored, make_state(1))
    # The unreadable step is set aside, so that training writes step 2 again.
    assert ck.set_aside == [2] and ck.all_steps() == [1] and ck.should_save(2)
  assert sorted(os.listdir(d)) == ["1", "2.corrupt"]
  _corrupt_arrays(d / "1")  # none readable: one line saying what to do, nothing moved
  with Checkpointer(d, every=1) as ck:
    with pytest.raises(CheckpointError, match=r"step 1: .*1/state.* Move it away .* another "
                       "--workdir to start afresh"):
      ck.restore(abstract(make_state()), fallback=True)
  assert sorted(os.listdir(d)) == ["1", "2.corrupt"]


class _RaisesInDel:
  def __del__(self):
    raise ValueError("an unraisable error of the program's own")


def test_a_failed_read_leaves_one_line_not_tracebacks(tmp_path, monkeypatch, caplog):
  """orbax closes its asyncio loop on the first array it cannot read, with the other reads in
  flight: each that completes later raised "Event loop is closed" from TensorStore's thread
  (tracebacks on stderr, a pytest warning in whichever test ran then), and asyncio logged the
  reads that failed unretrieved with TensorStore's spec. Those are dropped; the program's own
  unraisable errors still reach the hook."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  d = tmp_path / "ck"
  with Checkpointer(d, every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
  _corrupt_arrays(d / "1")
  with Checkpointer(d, every=1) as ck:
    for _ in range(10):  # in-flight reads, at random: 10 restores left 10 to 32 such errors
      with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        ck.restore(abstract(make_state()))
  deadline = time.time() + 2  # the stray completions come from TensorStore's threads
  while time.time() < deadline:
    gc.collect()
    time.sleep(0.1)
  assert seen == []
  assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
  _RaisesInDel()
  gc.collect()
  assert [str(u.exc_value) for u in seen] == ["an unraisable error of the program's own"]


def test_a_restore_out_of_memory_sets_no_step_aside(tmp_path, monkeypatch):
  """A machine too small for the state (an 8-device run resumed on 1) is not a corrupt
  checkpoint: the good latest step stays, and the line says what to do instead."""
  d = tmp_path / "ck"
  with Checkpointer(d, every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
    ck.save(2, make_state(2), metadata={"model": MODEL})
  restore = ckpt_lib._Manager.restore

  def out_of_memory_at_2(self, step, *args, **kwargs):
    if step != 2:
      return restore(self, step, *args, **kwargs)
    try:  # what orbax raises when numpy cannot allocate an array it reads
      raise MemoryError("Unable to allocate 381. MiB for an array with shape (100000000,)")
    except MemoryError as e:
      raise ValueError("Encountered error while reading array index: (). See full TensorStore "
                       "details: ...") from e

  monkeypatch.setattr(ckpt_lib._Manager, "restore", out_of_memory_at_2)
  with Checkpointer(d, every=1) as ck:
    with pytest.raises(CheckpointError, match=r"step 2 .* ran out of memory \(Unable to allocate "
                       r"381. MiB.*kept as it is.*more devices") as e:
      ck.restore(abstract(make_state()), fallback=True)
    assert "corrupt" not in str(e.value) and ck.set_aside == []
  assert sorted(os.listdir(d)) == ["1", "2"]


def test_cross_mesh_restore_8_to_4_devices(tmp_path):
  assert len(jax.devices()) == 8
  mesh8 = Mesh(np.array(jax.devices()).reshape(8), ("data",))
  w = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4)
  state = {
      "w": jax.device_put(w, NamedSharding(mesh8, P("data"))),
      "nested": {"v": jax.device_put(w[:8, :2] * 2, NamedSharding(mesh8, P("data"))),
                 "count": jax.device_put(jnp.arange(3, dtype=jnp.int32),
                                         NamedSharding(mesh8, P()))},
  }
  with Checkpointer(tmp_path / "ck", every=1) as ck:
    ck.save(1, state, metadata={"model": MODEL})
    ck.wait()

    mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",))
    mesh2x2 = Mesh(np.array(jax.devices()[4:]).reshape(2, 2), ("a", "b"))
    target = {
        "w": NamedSharding(mesh4, P("data")),
        "nested": {"v": NamedSharding(mesh2x2, P("a", "b")),
                   "count": NamedSharding(mesh4, P())},
    }
    abs_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target)
    restored, meta = ck.restore(abs_state, expected_metadata={"model": MODEL})
  assert meta["model"] == MODEL
  assert_tree_equal(restored, state)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert x.sharding == s
    assert len(x.sharding.device_set) == 4
  assert restored["w"].addressable_shards[0].data.shape == (4, 4)
  assert restored["nested"]["v"].addressable_shards[0].data.shape == (4, 1)


def test_metadata_mismatch_is_checked_before_arrays(tmp_path):
  d = tmp_path / "ck"
  with Checkpointer(d, every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL, "experiment": "a",
                                        "settings": {"optim.clip_norm": 3.0}})
  # With broken array files, only a check done before reading arrays can
  # produce the config error below.
  _corrupt_arrays(d / "1")
  with Checkpointer(d, every=1) as ck:
    other = dict(MODEL, width=64)
    with pytest.raises(CheckpointError) as e:
      ck.restore(abstract(make_state()), expected_metadata={"model": other})
  msg = str(e.value)
  assert "model.width" in msg and "32" in msg and "64" in msg
  assert "depth" not in msg and "experiment" not in msg
  # Another experiment's checkpoint differs in its settings too: the experiment is named, never
  # a setting whose value, set back, still would not resume it (finetune in a pretraining dir).
  with Checkpointer(d, every=1) as ck:
    with pytest.raises(CheckpointError) as e:
      ck.restore(abstract(make_state()), expected_metadata={
          "model": MODEL, "experiment": "b", "settings": {"optim.clip_norm": 0.0}})
  assert "experiment: checkpoint='a', expected='b'" in str(e.value)
  assert "clip_norm" not in str(e.value)


def test_a_checkpoint_older_than_a_model_setting_resumes_at_its_default(tmp_path):
  """sit_jax before 2026-12-03 saved no model.standardize_input (nor, before 2026-11-26,
  scan_layers): its checkpoints were trained without them, as their default False computes."""
  with Checkpointer(tmp_path / "ck", every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
    now = dict(MODEL, scan_layers=False, standardize_input=False)
    restored, _ = ck.restore(abstract(make_state()), expected_metadata={"model": now})
    assert_tree_equal(restored, make_state(1))
    with pytest.raises(CheckpointError) as e:
      ck.restore(abstract(make_state()),
                 expected_metadata={"model": dict(now, standardize_input=True)})
  assert "model.standardize_input: checkpoint=False, expected=True" in str(e.value)


def test_a_frozen_backbones_head_resumes_on_the_same_parameters_read_from_anywhere():
  """The head of a linear probe or segmentation run resumes on the parameters it was trained
  on, from any path (a moved pretraining); a checkpoint written before their hash on the
  path it names."""
  check = lambda saved, params_hash, path: ckpt_lib._check_metadata(
      "/run/checkpoints/3", {ckpt_lib.BACKBONE: {"params_hash": params_hash, "path": path}},
      saved)
  trained = {ckpt_lib.BACKBONE: {"params_hash": "ab12", "path": "/pre/checkpoints/20"}}
  check(trained, "ab12", "/elsewhere/pre/checkpoints/20")
  random_init = {ckpt_lib.BACKBONE: {"params_hash": None, "path": ""}}
  check(random_init, None, "")
  legacy = {"init": "/pre/checkpoints/20"}
  check(legacy, "ab12", "/pre/checkpoints/20")
  for saved, params_hash, path in [(trained, "cd34", "/pre/checkpoints/40"),
                                   (trained, None, ""),
                                   (random_init, "ab12", "/pre/checkpoints/20"),
                                   (legacy, "ab12", "/elsewhere/pre/checkpoints/20"),
                                   (legacy, None, "")]:
    with pytest.raises(CheckpointError, match="--config.init"):
      check(saved, params_hash, path)
  with pytest.raises(CheckpointError, match="resumes with --config.init=/pre/checkpoints/20 "):
    check(legacy, "ab12", "/elsewhere/pre/checkpoints/20")
  with pytest.raises(CheckpointError) as e:
    check(trained, "cd34", "/pre/checkpoints/40")
  assert ("its head was trained on the frozen backbone of /pre/checkpoints/20, and "
          "/pre/checkpoints/40 holds other parameters") in str(e.value)


def test_structure_mismatch_names_leaves(tmp_path):
  with Checkpointer(tmp_path / "ck", every=1, async_save=False) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
    bad = make_state()
    bad["params"]["head"]["w"] = jnp.zeros((6, 10))
    bad["params"]["extra"] = jnp.zeros(2)
    with pytest.raises(CheckpointError) as e:
      ck.restore(abstract(bad))
  msg = str(e.value)
  assert "params/head/w" in msg and "(6, 3)" in msg and "(6, 10)" in msg
  assert "params/extra" in msg


def test_export_and_load_backbone_round_trip(tmp_path):
  params = {"backbone": make_state(2)["params"]["backbone"]}
  cfg = {"name": "vit_tiny", "width": 32, "mlp_ratio": 4.0, "dims": [1, 2]}
  path = ckpt_lib.export_backbone(tmp_path / "export", params, cfg)
  assert os.path.isfile(os.path.join(path, "model_config.json"))
  loaded, loaded_cfg = ckpt_lib.load_backbone(path)
  assert loaded_cfg == cfg
  assert_tree_equal(loaded, params)
  with pytest.raises(CheckpointError, match="overwrite=True"):
    ckpt_lib.export_backbone(path, params, cfg)
  ckpt_lib.export_backbone(path, params, dict(cfg, width=33), overwrite=True)
  assert ckpt_lib.load_backbone(path)[1]["width"] == 33


def test_an_export_replaces_the_earlier_one_only_once_whole(tmp_path, monkeypatch):
  """A failure or a kill while export_backbone(overwrite=True) writes leaves the earlier export
  loadable (it may be the only copy of that backbone); the next export clears what was left."""
  workdir = tmp_path / "run"
  export = workdir / "backbone"
  old = {"backbone": {"w": np.zeros(3, np.float32)}}
  new = {"backbone": {"w": np.ones(3, np.float32)}}
  ckpt_lib.export_backbone(export, old, MODEL)
  (export / "notes.txt").write_text("mine")
  beside = lambda what: workdir / f".backbone.{what}"

  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")

  for failing in ("orbax.checkpoint.StandardCheckpointer.save", "sit_jax.metrics.atomic_write_text"):
    with monkeypatch.context() as patch:
      patch.setattr(failing, fail)
      with pytest.raises(CheckpointError, match=f"Cannot write backbone export to {export}: No "
                         "space left on device"):
        ckpt_lib.export_backbone(export, new, dict(MODEL, width=64), overwrite=True)
    loaded, config = ckpt_lib.load_backbone(export)
    assert_tree_equal(loaded, old)
    assert config == MODEL
  assert beside("partial").exists()  # a half-written export, never read as one
  assert_tree_equal(ckpt_lib.load_backbone(workdir)[0], old)

  # Stopped between its renames: the earlier export is aside, and a read names it.
  os.rename(export, beside("replaced"))
  for path in (export, workdir):
    with pytest.raises(CheckpointError, match=f"whole in {beside('replaced')}: rename it to "
                       f"{export} \\(the next export there does\\)"):
      ckpt_lib.load_backbone(path)
  with pytest.raises(CheckpointError, match="already holds a backbone export"):
    ckpt_lib.export_backbone(export, new, MODEL)
  with monkeypatch.context() as patch:  # the next export puts it back before it writes
    patch.setattr("orbax.checkpoint.StandardCheckpointer.save", fail)
    with pytest.raises(CheckpointError):
      ckpt_lib.export_backbone(export, new, MODEL, overwrite=True)
  assert_tree_equal(ckpt_lib.load_backbone(export)[0], old)

  ckpt_lib.export_backbone(export, new, dict(MODEL, width=64), overwrite=True)
  loaded, config = ckpt_lib.load_backbone(export)
  assert_tree_equal(loaded, new)
  assert config["width"] == 64
  assert sorted(os.listdir(workdir)) == ["backbone"]
  assert sorted(os.listdir(export)) == ["model_config.json", "notes.txt", "params"]
  assert (export / "notes.txt").read_text() == "mine"

  # Stopped after its renames: readers take the new export; the next export drops the earlier.
  shutil.copytree(export, beside("replaced"), ignore=shutil.ignore_patterns("notes.txt"))
  (beside("replaced") / "more.txt").write_text("mine too")  # not yet moved
  assert_tree_equal(ckpt_lib.load_backbone(workdir)[0], new)
  ckpt_lib.export_backbone(export, old, MODEL, overwrite=True)
  assert sorted(os.listdir(workdir)) == ["backbone"]
  assert (export / "more.txt").read_text() == "mine too"


@pytest.mark.filterwarnings(  # the unreadable copy's read, as in the corrupt step above
    r"ignore:Exception ignored in[\s\S]*Event loop is closed"
    ":pytest.PytestUnraisableExceptionWarning")
def test_load_backbone_from_workdir_and_step_dir(tmp_path, caplog):
  workdir = tmp_path / "run"
  with Checkpointer(workdir / "checkpoints", every=1) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
    ck.save(2, make_state(2), metadata={"model": MODEL})
  with caplog.at_level("WARNING"):
    params, cfg = ckpt_lib.load_backbone(workdir)  # no results.json: the run has not finished
  assert cfg == MODEL
  assert_tree_equal(params, {"backbone": make_state(2)["params"]["backbone"]})
  assert f"Loading step 2, the latest checkpoint of {workdir}, whose run has not finished" in \
      caplog.text
  caplog.clear()
  (workdir / "results.json").write_text(json.dumps(
      {"checkpoint": str(workdir / "checkpoints" / "2"), "preempted": False}))
  ckpt_lib.load_backbone(workdir)
  ckpt_lib.load_backbone(workdir / "checkpoints")  # its results.json is the workdir's
  assert "has not finished" not in caplog.text
  params1, _ = ckpt_lib.load_backbone(workdir / "checkpoints" / "1")
  assert_tree_equal(params1, {"backbone": make_state(1)["params"]["backbone"]})
  # A copy that did not finish: the latest step lacks files. The line says which step to use.
  shutil.copytree(workdir, tmp_path / "copy")
  os.remove(tmp_path / "copy" / "checkpoints" / "2" / "state" / "manifest.ocdbt")
  with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupt .* did not finish\?\). "
                     r"Copy that step again, or pass the step before it, .*copy/checkpoints/1 \(config\.init"):
    ckpt_lib.load_backbone(tmp_path / "copy")

  # A workdir whose checkpoints are gone loads its backbone/ export, or says what it lacks.
  shutil.rmtree(workdir / "checkpoints")
  export = ckpt_lib.export_backbone(workdir / "backbone", params, MODEL)
  assert_tree_equal(ckpt_lib.load_backbone(workdir)[0], params)
  os.remove(os.path.join(export, "model_config.json"))
  with pytest.raises(CheckpointError, match=r"backbone is incomplete: it has no model_config\.json"):
    ckpt_lib.load_backbone(workdir)

  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="Nothing loadable"):
    ckpt_lib.load_backbone(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="does not exist"):
    ckpt_lib.load_backbone(tmp_path / "missing")


def test_an_export_records_the_step_it_holds(tmp_path, caplog, monkeypatch):
  """export.json, beside the model config, says where an export's parameters come from: its
  step is what a transfer records as init_step, as a step directory's name is. An export written
  without one (before export.json, or by to-jax) has no step and loads as before; an export over
  one that had a step does not keep it."""
  params = {"backbone": make_state(3)["params"]["backbone"]}
  origin = {"step": 3, "experiment": "sit", "weights": "student", "workdir": str(tmp_path)}
  export = ckpt_lib.export_backbone(tmp_path / "backbone", params, MODEL, origin=origin)
  assert sorted(os.listdir(export)) == ["export.json", "model_config.json", "params"]
  assert ckpt_lib.export_origin(export) == origin
  assert ckpt_lib.backbone_step(export) == 3
  loaded, config = ckpt_lib.load_backbone(export)
  assert config == MODEL  # the model config holds the model's settings only
  assert_tree_equal(loaded, params)
  assert ckpt_lib.is_export_entry("export.json") and ckpt_lib.is_export_entry(".export.json.x1")

  ckpt_lib.export_backbone(export, params, MODEL, overwrite=True)  # e.g. convert's to-jax
  assert sorted(os.listdir(export)) == ["model_config.json", "params"]
  assert ckpt_lib.export_origin(export) == {} and ckpt_lib.backbone_step(export) is None
  loaded, config = ckpt_lib.load_backbone(export)
  assert config == MODEL
  assert_tree_equal(loaded, params)
  with monkeypatch.context() as patch:  # on an object store, written in place
    patch.setattr(ckpt_lib.metrics, "is_remote", lambda path: True)
    ckpt_lib.export_backbone(tmp_path / "remote", params, MODEL, origin=origin)
    assert ckpt_lib.backbone_step(tmp_path / "remote") == 3
    ckpt_lib.export_backbone(tmp_path / "remote", params, MODEL, overwrite=True)
  assert sorted(os.listdir(tmp_path / "remote")) == ["model_config.json", "params"]

  (tmp_path / "backbone" / "export.json").write_text("[3]")
  with caplog.at_level("WARNING"):
    assert ckpt_lib.backbone_step(export) is None
  assert (f"Ignoring {export}/export.json (a JSON list, not an object): which step the backbone "
          "export holds is unknown." in caplog.text)
  with Checkpointer(tmp_path / "run" / "checkpoints", every=1) as ck:
    ck.save(7, make_state(7), metadata={"model": MODEL})
  assert ckpt_lib.backbone_step(tmp_path / "run" / "checkpoints" / "7") == 7


def test_a_workdir_trained_past_its_export_reads_the_newer_step(tmp_path, caplog):
  """A finished pretraining (step 1, exported to backbone/) started again with a larger
  total_steps: until it ends again, its latest step is newer than backbone/. A transfer of the
  workdir reads the newer step, and the warning names the export and its step (its export.json's:
  the longer run's results.json, written at a preemption, names none), for one that wants the
  end of the first run; the export is left as it is."""
  workdir = tmp_path / "run"
  with Checkpointer(workdir / "checkpoints", every=1, keep=1) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL})
  first = {"backbone": make_state(1)["params"]["backbone"]}
  export = ckpt_lib.export_backbone(workdir / "backbone", first, MODEL, origin={"step": 1})
  with caplog.at_level("WARNING"):  # no results.json: the export says the run finished at 1
    ckpt_lib.read_backbone(workdir)
  assert "has not finished" not in caplog.text
  with Checkpointer(workdir / "checkpoints", every=1, keep=1) as ck:
    ck.save(2, make_state(2), metadata={"model": MODEL})  # keep 1: step 1 goes
  (workdir / "results.json").write_text(json.dumps(
      {"checkpoint": str(workdir / "checkpoints" / "2"), "preempted": True}))
  with caplog.at_level("WARNING"):
    params, _, read_from = ckpt_lib.read_backbone(workdir)
  assert read_from == str(workdir / "checkpoints" / "2")
  assert_tree_equal(params, {"backbone": make_state(2)["params"]["backbone"]})
  end_of_first_run = (f"Its backbone/ export holds the student of step 1, where the run last "
                      f"finished: pass {export} (config.init, or convert's --input) to read that "
                      "one.")
  assert (f"Loading step 2, the latest checkpoint of {workdir}, whose run has not finished" in
          caplog.text)
  assert end_of_first_run in caplog.text
  assert_tree_equal(ckpt_lib.load_backbone(export)[0], first)
  # An export written before export.json: the step that results.json names with it, if any.
  os.remove(workdir / "backbone" / "export.json")
  (workdir / "results.json").write_text(json.dumps(
      {"checkpoint": str(workdir / "checkpoints" / "1"), "backbone": export}))
  caplog.clear()
  with caplog.at_level("WARNING"):
    ckpt_lib.read_backbone(workdir)
  assert end_of_first_run in caplog.text


@pytest.mark.parametrize("keep", [1, 2])
def test_a_step_rotated_out_while_it_is_read_gives_way_to_the_newer_one(tmp_path, monkeypatch,
                                                                         caplog, keep):
  """A probe of a pretraining still running chose its latest step, which the run's
  keep_checkpoints deleted as it saved the next one, before the probe had read it: the probe
  failed, calling the step corrupt. It reads the newer step instead, and says why. Whichever
  step it read, read_backbone names that one (located again afterwards, the newer one was
  named beside the older one's parameters)."""
  workdir = tmp_path / "run"
  pretraining = Checkpointer(workdir / "checkpoints", every=1, keep=keep, async_save=False)
  pretraining.save(1, make_state(1), metadata={"model": MODEL})
  read = ckpt_lib._load_from_step_dir

  def saved_meanwhile(step_dir, weights):
    if step_dir.name == "1":
      pretraining.save(2, make_state(2), metadata={"model": MODEL})  # keep 1: step 1 goes
    return read(step_dir, weights)

  monkeypatch.setattr(ckpt_lib, "_load_from_step_dir", saved_meanwhile)
  with caplog.at_level("WARNING"):
    params, _, read_from = ckpt_lib.read_backbone(workdir)
  step = 2 if keep == 1 else 1
  assert_tree_equal(params, {"backbone": make_state(step)["params"]["backbone"]})
  assert read_from == str(workdir / "checkpoints" / str(step))
  assert ((f"Could not read step 1 of {workdir / 'checkpoints'} (" in caplog.text
           and "its run has saved step 2 since, and keeps only its latest checkpoints "
           "(keep_checkpoints): reading step 2." in caplog.text) == (keep == 1))
  pretraining.close()


def test_teacher_backbone_from_checkpoints_only(tmp_path):
  """weights='teacher' reads the momentum teacher's backbone of a SiT or contrastive checkpoint;
  a backbone export (the student only) and a GMML checkpoint (no teacher) are refused before any
  array is read."""
  def with_teacher(step):
    state = make_state(step)
    teacher = jax.tree.map(lambda x: -x, state["params"]["backbone"])
    return {**state, "teacher": {"backbone": teacher,
                                 "head": {"w": jnp.zeros((6, 3), jnp.float32)}}}

  with Checkpointer(tmp_path / "sit" / "checkpoints", every=1) as ck:
    ck.save(1, with_teacher(1), metadata={"model": MODEL, "experiment": "sit"})
    ck.save(2, with_teacher(2), metadata={"model": MODEL, "experiment": "sit"})
  teacher, cfg = ckpt_lib.load_backbone(tmp_path / "sit", weights="teacher")
  assert cfg == MODEL
  assert_tree_equal(teacher, {"backbone": with_teacher(2)["teacher"]["backbone"]})
  assert_tree_equal(ckpt_lib.load_backbone(tmp_path / "sit" / "checkpoints" / "1", "teacher")[0],
                    {"backbone": with_teacher(1)["teacher"]["backbone"]})
  assert_tree_equal(ckpt_lib.load_backbone(tmp_path / "sit")[0],  # the student by default
                    {"backbone": make_state(2)["params"]["backbone"]})

  export = ckpt_lib.export_backbone(tmp_path / "export", teacher, MODEL)
  with pytest.raises(CheckpointError, match=r"export, which holds the student only.*"
                     r"init_weights='student' \(convert: --use=student\)"):
    ckpt_lib.locate_backbone(export, "teacher")
  with Checkpointer(tmp_path / "gmml" / "checkpoints", every=1) as ck:
    ck.save(1, make_state(1), metadata={"model": MODEL, "experiment": "gmml"})
  with pytest.raises(CheckpointError, match=r"a gmml run, which has no teacher"):
    ckpt_lib.load_backbone(tmp_path / "gmml", "teacher")
  with pytest.raises(ValueError, match=r"weights='ema'"):
    ckpt_lib.load_backbone(tmp_path / "sit", "ema")


def test_unwritable_directory(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  bad = blocker / "ckpt"
  with pytest.raises(CheckpointError) as e:
    Checkpointer(bad)
  assert str(bad) in str(e.value)
  with pytest.raises(CheckpointError, match=str(blocker)):
    ckpt_lib.export_backbone(blocker / "export", {"w": jnp.ones(2)}, {})


def wait_for(condition, seconds=5.0):
  """Python runs a signal handler at the next bytecode boundary of the main thread."""
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline
    time.sleep(0.005)


def test_stop_signals_set_a_flag_and_restore_the_handlers():
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  for sig in (signal.SIGTERM, signal.SIGINT):
    with ckpt_lib.stop_signals():
      assert not ckpt_lib.signalled()
      os.kill(os.getpid(), sig)
      wait_for(ckpt_lib.signalled)
    assert {s: signal.getsignal(s) for s in previous} == previous
  with ckpt_lib.stop_signals():  # a second Ctrl-C stops at once.
    os.kill(os.getpid(), signal.SIGINT)
    wait_for(ckpt_lib.signalled)
    # The handler is called directly: a real signal raising in the pytest worker can land in a
    # garbage-collection callback, where the KeyboardInterrupt is swallowed.
    with pytest.raises(KeyboardInterrupt):
      signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
