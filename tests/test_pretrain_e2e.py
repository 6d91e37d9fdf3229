"""`python -m sit_jax.main` end to end: outputs, preemption and exact resume, cross-mesh restore, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import PIL
import pytest

from configs import common
from sit_jax import checkpoint, pretrain, sharding
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runlocal at a quarter of its batch (4 images per device): the same code, steps twice as fast.
# The step compiled with LLVM's optimisation, which the suite's XLA flags skip: four runs of the
# command share one compile (the test session's cache) and take 100 steps (9 CPU s less).
RUN_FLAGS = ["--config.total_steps=40", "--config.log_every=5", "--config.checkpoint_every=10",
             "--config.image_every=20", "--config.eval_every=0", "--config.data.global_batch_size=32",
             "--config.compiler_options=xla_backend_optimization_level=3"]


def command(workdir, *flags, config="configs/sit_vits.py:runlocal"):
  return [sys.executable, "-m", "sit_jax.main", f"--config={config}", f"--workdir={workdir}",
          *flags]


def env():
  e = dict(os.environ)
  e.update(XLA_FLAGS=conftest.xla_flags(8), JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  return e


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  proc = subprocess.run(command(workdir, *RUN_FLAGS), cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout, proc.stderr


def test_runlocal_writes_metrics_pictures_checkpoint_and_results(uninterrupted):
  workdir, stdout, stderr = uninterrupted
  assert "step 40/40" in stdout
  first_line = next(line for line in stdout.splitlines() if line.startswith("step "))
  assert "img/s" in first_line and "ETA" in first_line
  assert f"Wrote results.json, metrics.jsonl, config.json, log.txt, checkpoints/40, backbone, " \
      f"images/, tb/ in {workdir}" in stderr
  assert "checkpoint_manager.py" not in stderr  # orbax's INFO lines do not bury the progress.
  with open(os.path.join(workdir, "log.txt")) as f:  # the command beside the resolved config
    assert f.readline().rstrip("\n").endswith(
        "main.py --config=configs/sit_vits.py:runlocal --workdir=" + workdir + " "
        + " ".join(RUN_FLAGS))
    # ... and what else decides the numbers: the code's commit, the packages, the devices.
    environment = next(line for line in f if line.startswith("Environment: "))
  if os.path.isdir(os.path.join(REPO, ".git")):
    assert re.match(r"Environment: sit_jax \S+ \(git [0-9a-f]{40}", environment), environment
  for part in (f"jax {jax.__version__},", f"pillow {PIL.__version__},", "8 cpu device(s)",
               "in 1 process(es)"):
    assert part in environment, (part, environment)
  assert sorted(losses(workdir)) == list(range(5, 41, 5))
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == ["reconstruction_0000020.png",
                                                                 "reconstruction_0000040.png"]
  umask = os.umask(0)
  os.umask(umask)
  for name in ("images/reconstruction_0000040.png", "results.json", "config.json"):
    assert os.stat(os.path.join(workdir, name)).st_mode & 0o777 == 0o666 & ~umask, name
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["step"] == 40 and not results["preempted"]
  assert np.isfinite(results["final_metrics"]["loss"])
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [20, 30, 40]
  params, model_cfg = checkpoint.load_backbone(os.path.join(workdir, "backbone"))
  assert model_cfg["variant"] == "Mu/4" and "blocks_0" in params["backbone"]
  assert checkpoint.export_origin(os.path.join(workdir, "backbone")) == {
      "step": 40, "experiment": "sit", "weights": "student", "workdir": workdir}
  assert json.load(open(os.path.join(workdir, "config.json")))["experiment"] == "sit"
  assert os.listdir(os.path.join(workdir, "tb"))


def last_logged_step(workdir) -> int:
  """The step of the last complete row of metrics.jsonl, 0 before the first."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [line for line in f.read().split("\n")[:-1] if line]
  except FileNotFoundError:
    return 0
  return json.loads(rows[-1])["step"] if rows else 0


def start_and_wait_for_step(workdir, step: int):
  """A run started in the background, once it has itself logged a row of `step` or later
  (rows of an earlier run in `workdir` at or before its checkpoint stay in metrics.jsonl)."""
  proc = subprocess.Popen(command(workdir, *RUN_FLAGS), cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while last_logged_step(workdir) < step:
    assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
    time.sleep(0.2)
  return proc


@pytest.fixture(scope="module")
def interrupted(uninterrupted, tmp_path_factory):
  """One workdir, three runs of the same command: Ctrl-C once the first row is logged; resumed,
  then SIGTERM (what a Cloud TPU preemption sends) once it has logged step 10 or later; resumed
  to the end. (After `uninterrupted`, so that the compilation cache is warm.)"""
  workdir = str(tmp_path_factory.mktemp("interrupted"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  read_results = lambda: json.load(open(os.path.join(workdir, "results.json")))
  proc = start_and_wait_for_step(workdir, 5)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  ctrl_c = dict(returncode=proc.returncode, stderr=stderr, results=read_results(),
                latest_step=checkpoint.Checkpointer(ckpt_dir).latest_step())

  proc = start_and_wait_for_step(workdir, max(10, ctrl_c["results"]["step"] + 1))
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  preempted = read_results()

  resumed = subprocess.run(command(workdir, *RUN_FLAGS), cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return dict(workdir=workdir, ctrl_c=ctrl_c, preempted=preempted, resumed=read_results())


def test_preempted_run_resumes_and_matches_uninterrupted_losses(uninterrupted, interrupted):
  reference = losses(uninterrupted[0])
  first, second = interrupted["preempted"], interrupted["resumed"]
  # The SIGTERM run itself resumed from the Ctrl-C checkpoint.
  assert first["steps_this_run"] == first["step"] - interrupted["ctrl_c"]["results"]["step"]
  assert first["preempted"] and 10 <= first["step"] < 35, first
  assert second["step"] == 40 and second["steps_this_run"] == 40 - first["step"]
  assert not second["preempted"]
  got = losses(interrupted["workdir"])
  # Logged losses are means over the last 5 steps: compare windows that lie after the resume.
  later = [s for s in reference if s - 5 >= first["step"]]
  assert later
  for s in later:
    np.testing.assert_allclose(got[s], reference[s], rtol=1e-5, err_msg=f"step {s}")


def test_ctrl_c_saves_the_current_step_and_exits_without_a_traceback(interrupted):
  c = interrupted["ctrl_c"]
  stderr, results = c["stderr"], c["results"]
  assert c["returncode"] == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  assert results["preempted"] and results["checkpoint"].endswith(f"/{results['step']}")
  assert c["latest_step"] == results["step"]


def tiny_layout(config, mesh):
  """(abstract state, shardings, init) on `mesh`; init compiles, the layout alone does not."""
  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, 100, 10)
  tx = pretrain.build_optimizer(config, schedules)
  init = lambda rng: pretrain.init_state(config, model, tx, rng)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  return abstract, shardings, lambda: jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))


def test_checkpoint_from_8_devices_restores_onto_4(tmp_path):
  config = common.shrink_for_runlocal(common.pretrain_config())
  config.sharding_rules = common.FSDP
  _, _, init8 = tiny_layout(config, sharding.make_mesh({"data": 4, "fsdp": 2}))
  state8 = init8()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=5, async_save=False)
  assert ckpt.save(5, state8, metadata=pretrain.checkpoint_metadata(config))
  mesh4 = sharding.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
  abstract, shardings4, _ = tiny_layout(config, mesh4)
  restored, _ = ckpt.restore(sharding.abstract_with_shardings(abstract, shardings4),
                             expected_metadata=pretrain.checkpoint_metadata(config))
  kernel = restored.params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.devices.size == 4 and "fsdp" in tuple(kernel.sharding.spec)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state8))
  # A checkpoint of another model is refused before any array is read.
  other = common.shrink_for_runlocal(common.pretrain_config())
  other.model.variant = "Mu/8"
  with pytest.raises(checkpoint.CheckpointError, match="variant"):
    ckpt.restore(sharding.abstract_with_shardings(abstract, shardings4),
                 expected_metadata=pretrain.checkpoint_metadata(other))


@pytest.mark.parametrize("override,message", [
    ({"data.source": "tfds:imagenet20l2"}, "imagenet2012"),
    ({"data.image_size": 30}, "not divisible by the patch size 4"),
    ({"data.global_batch_size": 12}, "not divisible by the data-parallel size 8"),
    ({"data.source": "folder:/nonexistent/images"}, "/nonexistent/images"),
    ({"experiment": "simclr"}, "Unknown experiment"),
])
def test_bad_input_gives_a_clear_error(tmp_path, override, message):
  config = common.shrink_for_runlocal(common.pretrain_config())
  for key, value in override.items():
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
  with pytest.raises(Exception, match=message):
    pretrain.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir_and_cli_errors_are_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = subprocess.run(command(str(blocker / "run")), cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1
  assert "sit_jax: error: Workdir" in proc.stderr and "not writable" in proc.stderr
  assert "Traceback" not in proc.stderr
  misspelt = subprocess.run(command(str(tmp_path / "w"), "--config.optim.base_lrr=0.1"),
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert misspelt.returncode != 0 and "base_lrr" in misspelt.stderr
