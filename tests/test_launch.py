"""launch/slurm_gpu.sbatch and launch/tpu_vm.sh, run with stand-ins for SLURM's and gcloud's
commands (each logs what it was given): what reaches `python -m sit_jax.main` on the workers."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def tpu_vm(*args, config="configs/sit_vits.py") -> list[str]:
  """launch/tpu_vm.sh for a v4-32 slice and a gs:// workdir, with `args` after them."""
  return ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--name", "sit-s16", "--zone",
          "us-central2-b", "--accelerator", "v4-32", "--config", config, "--workdir",
          "gs://bucket/run", *args]


def _stand_ins(tmp_path, scripts: dict) -> dict:
  """An environment whose PATH finds `scripts` (name -> bash body) first."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in scripts.items():
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_"))}
  env["PATH"] = f"{bin_dir}:{env['PATH']}"
  return env


def _sbatch(tmp_path, cwd, workdir=None, check=True, srun=None):
  """The job, with a stand-in srun that prints its arguments and environment (or runs `srun`)."""
  env = _stand_ins(tmp_path, {
      # A pause between the names: a reader that stops after the first one breaks the pipe.
      "scontrol": "echo node001; sleep 0.2; echo node002\n",
      "srun": srun or ('printf "ARG %s\\n" "$@"; echo "XLA_FLAGS=$XLA_FLAGS"; '
                       'echo "COORDINATOR=$JAX_COORDINATOR_ADDRESS"\n')})
  env.update(SLURM_JOB_NODELIST="node[001-002]", SLURM_JOB_ID="123456", SLURM_NNODES="2",
             SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="12")
  return subprocess.run(
      ["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"), "configs/sit_vits.py",
       workdir or str(tmp_path / "run"), "--config.total_steps=10"],
      cwd=cwd, env=env, capture_output=True, text=True, check=check)


def test_slurm_job_runs_main_on_every_task_with_the_gpu_flags(tmp_path):
  out = _sbatch(tmp_path, REPO)
  args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
  assert args == ["--kill-on-bad-exit=1", "--cpus-per-task=12", "python", "-m", "sit_jax.main",
                  "--config=configs/sit_vits.py", f"--workdir={tmp_path / 'run'}",
                  "--config.total_steps=10"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out.stdout
  assert "COORDINATOR=node001:23456" in out.stdout  # 20000 + job id % 20000
  assert out.stderr == ""


def test_slurm_job_on_a_gpu_node_without_cuda_jax_ends_instead_of_training_on_cpus(tmp_path):
  """Installed without jax[cuda13] (or with JAX_PLATFORMS=cpu in the submitting shell, as here),
  every task fell back to the CPUs with one warning and trained there. The task is a GPU node as
  JAX sees it (an NVIDIA GPU visible) with this machine's jax, which has no CUDA plugin."""
  gpu_node = ("from jax._src import hardware_utils; hardware_utils.has_visible_nvidia_gpu = "
              "lambda: True; import jax; print(jax.devices())")
  out = _sbatch(tmp_path, REPO, check=False, srun=f'exec python -c "{gpu_node}"\n')
  assert out.returncode == 1 and "CpuDevice" not in out.stdout
  assert "RuntimeError: Unable to initialize backend 'cuda'" in out.stderr


@pytest.mark.parametrize("gpu_visible", [True, False])
def test_main_where_jax_cannot_start_cuda_says_so_in_one_line(tmp_path, gpu_visible):
  """The job's JAX_PLATFORMS=cuda reaching sit_jax.main without jax's CUDA plugin: a GPU node as
  above (jax raises RuntimeError), or a machine with no GPU (a bare AssertionError in jax)."""
  see_gpu = ("from jax._src import hardware_utils; hardware_utils.has_visible_nvidia_gpu = "
             "lambda: True; " if gpu_visible else "")
  main = f"{see_gpu}import runpy; runpy.run_module('sit_jax.main', run_name='__main__')"
  env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
  env["JAX_PLATFORMS"] = "cuda"
  out = subprocess.run([sys.executable, "-c", main, "--config=configs/sit_vits.py:runlocal",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 1 and not (tmp_path / "run").exists()
  assert out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith("sit_jax: error: JAX cannot start JAX_PLATFORMS='cuda' (")
  assert ("Unable to initialize backend 'cuda'" in out.stderr) == gpu_visible
  assert "pip install 'jax[cuda13]'" in out.stderr


def test_slurm_job_submitted_elsewhere_says_the_gpu_flags_are_missing(tmp_path):
  """sbatch runs a copy of the script in the submission directory: launch/gpu_xla_flags.sh is
  found only from the repository root, and a job without it must say so, not run silently
  slower."""
  out = _sbatch(tmp_path, str(tmp_path))
  assert "XLA_FLAGS=\n" in out.stdout
  assert "no launch/gpu_xla_flags.sh" in out.stderr and "repository root" in out.stderr


def test_slurm_job_with_a_gs_workdir_makes_no_local_folder(tmp_path):
  """`mkdir -p gs://bucket/run` made the folders gs:/bucket/run in the submission directory."""
  out = _sbatch(tmp_path, str(tmp_path), workdir="gs://bucket/run")
  assert "ARG --workdir=gs://bucket/run" in out.stdout
  assert not (tmp_path / "gs:").exists()


def test_slurm_script_outside_a_job_says_how_to_submit_it(tmp_path):
  env = _stand_ins(tmp_path, {})
  out = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"),
                        "configs/sit_vits.py", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr == (
      "slurm_gpu.sbatch: not in a SLURM job: submit it with sbatch (or run it inside salloc).\n")


def test_tpu_vm_starts_the_same_command_on_every_worker(tmp_path):
  """The commands that gcloud ssh hands each worker's shell, run by bash in a stand-in home:
  main gets every flag intact (a quote included) and its exit status lands in ~/sit_jax.rc;
  the set-up runs again on a worker set up before."""
  commands = tmp_path / "commands"
  env = _stand_ins(tmp_path, {"gcloud": f"""
for a in "$@"; do case "$a" in --command=*) printf '%s\\0' "${{a#--command=}}" >> {commands};; esac; done
"""})
  out = subprocess.run(
      tpu_vm("--", "--config.data.data_dir=gs://b/it's here", config="configs/sit_vits.py:fsdp"),
      env=env, capture_output=True, text=True, check=True)
  assert "Done." in out.stdout and "Deleting TPU sit-s16" in out.stderr
  start = next(c for c in commands.read_text().split("\0") if "nohup" in c)
  home = tmp_path / "home"
  (home / "sit_jax").mkdir(parents=True)
  (home / "sit_venv" / "bin").mkdir(parents=True)
  python = home / "sit_venv" / "bin" / "python"
  python.write_text('#!/usr/bin/env bash\nprintf "ARG %s\\n" "$@"; exit 3\n')
  python.chmod(0o755)
  subprocess.run(["bash", "-c", start], env={**env, "HOME": str(home)}, check=True,
                 capture_output=True)
  for _ in range(400):  # the run is detached: wait for its exit status
    if (home / "sit_jax.rc").exists() and (home / "sit_jax.rc").read_text().strip():
      break
    time.sleep(0.05)
  assert (home / "sit_jax.rc").read_text().strip() == "3"
  assert (home / "sit_jax.log").read_text().splitlines() == [
      "ARG -m", "ARG sit_jax.main", "ARG --config=configs/sit_vits.py:fsdp",
      "ARG --workdir=gs://bucket/run", "ARG --config.data.data_dir=gs://b/it's here"]

  # The set-up, twice on the same worker (a second launch with --existing): uv (0.8 on) refuses
  # to make a virtual environment where one exists unless told to keep or clear it.
  install = next(c for c in commands.read_text().split("\0") if "uv venv" in c)
  # jax[tpu] in the range setup.py admits: another makes the resolution impossible on the TPU.
  jax_range = re.search(r'"jax(>=[^"]+)"', open(os.path.join(REPO, "setup.py")).read()).group(1)
  assert f"'jax[tpu]{jax_range}'" in install
  uv = home / ".local" / "bin" / "uv"
  uv.parent.mkdir(parents=True)
  uv.write_text("""#!/usr/bin/env bash
if [ "$1" = venv ]; then
  venv="${@: -1}"
  if [ -d "$venv" ] && [[ " $* " != *" --allow-existing "* && " $* " != *" --clear "* ]]; then
    echo "error: A virtual environment already exists at: $venv" >&2; exit 2
  fi
  mkdir -p "$venv"
fi
""")
  uv.chmod(0o755)
  curl = tmp_path / "bin" / "curl"
  curl.write_text("#!/usr/bin/env bash\n")  # an install script that installs nothing
  curl.chmod(0o755)
  for _ in range(2):
    subprocess.run(["bash", "-c", install], env={**env, "HOME": str(home)}, check=True)


def test_tpu_vm_ctrl_c_lets_the_run_save_before_deleting_the_tpu(tmp_path):
  """Ctrl-C while the launcher streams the log: the TPU was deleted under a run that had not
  saved its last steps. Now each worker's main gets SIGTERM (which saves the current step) and
  the launcher waits for its exit status, then deletes. gcloud ssh runs the start and stop
  commands in a stand-in home, where `python` is a run that saves on SIGTERM."""
  home, calls = tmp_path / "home", tmp_path / "calls"
  (home / "sit_jax").mkdir(parents=True)
  (home / "sit_venv" / "bin").mkdir(parents=True)
  python = home / "sit_venv" / "bin" / "python"
  python.write_text('#!/usr/bin/env bash\ntrap \'echo step > "$HOME/saved"; exit 0\' TERM\n'
                    'echo $$ > "$HOME/python.pid"; echo running\nwhile :; do sleep 0.1; done\n')
  python.chmod(0o755)
  env = _stand_ins(tmp_path, {"gcloud": f"""
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}";; esac; done
case "$cmd" in
  *nohup*) echo start >> {calls}; HOME={home} exec bash -c "$cmd" ;;
  *"kill -TERM"*) echo stop >> {calls}; HOME={home} exec bash -c "$cmd" ;;
  *"tail -n +1 -F"*) echo stream >> {calls}; exec sleep 60 ;;  # the log streams until Ctrl-C
  *) echo "$4" >> {calls} ;;
esac
"""})
  launcher = subprocess.Popen(
      tpu_vm(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)  # its own process group, as a terminal's foreground job
  try:
    for _ in range(600):
      if calls.exists() and "stream" in calls.read_text():
        break
      time.sleep(0.05)
    assert (home / "sit_jax.log").read_text() == "running\n"
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    _, stderr = launcher.communicate(timeout=120)
  finally:
    if (home / "python.pid").exists():  # a failed test leaves no run behind
      subprocess.run(["kill", "-KILL", (home / "python.pid").read_text().strip()],
                     capture_output=True)
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode == 130
  assert (home / "saved").read_text() == "step\n" and (home / "sit_jax.rc").read_text() == "0\n"
  assert "The run saved its step and ended" in stderr, stderr
  # create, copy, install, start, stream; stopped and saved before the delete.
  assert calls.read_text().split() == ["create", "scp", "ssh", "ssh", "start", "stream",
                                       "stop", "delete"]


@pytest.mark.parametrize("tpu", ["READY", "PREEMPTED"])
def test_tpu_vm_reconnects_when_the_log_stream_drops(tmp_path, tpu):
  """ssh ends with 255 on its own failures too: the launcher took a dropped connection for the
  run's failure and deleted the TPU under the run, losing its steps since the last checkpoint.
  Now it reconnects while worker 0 answers without an exit status (the run goes on); a TPU
  that is gone (preempted) ends the launch with one line, and is deleted for the rerun."""
  calls = tmp_path / "calls"
  env = _stand_ins(tmp_path, {"gcloud": f"""
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}";; esac; done
case "$4 ${{cmd:-}}" in
  "ssh "*"tail -n"*) echo stream >> {calls}
     [ "$(grep -c stream {calls})" = 1 ] && exit 255  # the connection drops
     echo "step 3/3"; exit 0 ;;
  "ssh "*"cat ~/sit_jax.rc"*) echo status >> {calls}; [ {tpu} = READY ] || exit 255 ;;
  "describe "*) echo describe >> {calls}; echo {tpu} ;;
  *) echo "$4" >> {calls} ;;
esac
"""})
  out = subprocess.run(
      tpu_vm(), env=env, capture_output=True, text=True)
  started = ["create", "scp", "ssh", "ssh", "ssh", "stream", "status"]
  if tpu == "READY":
    assert out.returncode == 0, out.stderr
    assert "Reconnecting" in out.stderr and "step 3/3\nDone." in out.stdout
    assert calls.read_text().split() == [*started, "stream", "delete"]
  else:
    assert out.returncode == 255
    assert ("TPU sit-s16 is PREEMPTED: the run ended with it. Start the same command to resume "
            "from the latest checkpoint in gs://bucket/run.") in out.stderr
    assert calls.read_text().split() == [*started, "describe", "delete"]


@pytest.mark.parametrize("args, error", [
    # A mistyped config, or one the copy to the workers leaves behind, used to fail only after
    # the TPU was created and set up.
    (["--config", "configs/sit_vit.py"], "tpu_vm.sh: --config must name a file in"),
    (["--config", "my_configs/sit.py:fsdp"], "tpu_vm.sh: --config must name a file in"),
    (["--config"], "tpu_vm.sh: --config needs a value"),  # was '2: parameter null or not set'
    (["--config", "--workdir", "gs://bucket/run"], "tpu_vm.sh: --config needs a value"),
    # main's flags, parsed here as main parses them: a mistyped key reached the workers.
    (["--config", "configs/sit_vits.py", "--", "--config.data.data_dri=gs://bucket/tfds"],
     "sit_jax: error: Unknown config key data.data_dri (--config.data.data_dri=gs://bucket/tfds):"
     " did you mean data.data_dir?\n"),
])
def test_tpu_vm_refuses_bad_arguments_before_creating_the_tpu(tmp_path, args, error):
  calls = tmp_path / "calls"
  env = _stand_ins(tmp_path, {"gcloud": f'echo "$4" >> {calls}\n'})
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--name=sit-s16", "--zone",
       "us-central2-b", "--accelerator", "v4-8", "--workdir", "gs://bucket/run", *args],
      env=env, capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.startswith(error), out.stderr
  assert not calls.exists()


def test_tpu_vm_ctrl_c_while_creating_says_how_to_delete_the_tpu(tmp_path):
  """Ctrl-C stops gcloud's wait for the creation, not the creation: the launcher ended without a
  word, and a TPU that came up later was billed until found."""
  calls = tmp_path / "calls"
  env = _stand_ins(tmp_path, {"gcloud": f'echo "$4" >> {calls}; [ "$4" = create ] && sleep 10\n'})
  launcher = subprocess.Popen(
      tpu_vm(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)  # its own process group, as a terminal's foreground job
  try:
    for _ in range(200):
      if calls.exists():
        break
      time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)
    _, stderr = launcher.communicate(timeout=30)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode == 130
  assert stderr.endswith("Stopped while TPU sit-s16 was being created; if it comes up, delete it "
                         "with: gcloud compute tpus tpu-vm delete sit-s16 "
                         "--zone=us-central2-b --quiet\n"), stderr
  assert calls.read_text().split() == ["create"]


@pytest.mark.parametrize("state, advice", [
    ("PREEMPTED", "delete it with gcloud compute tpus tpu-vm delete sit-s16 --zone=us-central2-b "
                  "--quiet, then launch again (the run resumes from gs://bucket/run)."),
    ("READY", "add --existing to run on it."),
])
def test_tpu_vm_says_what_to_do_with_a_tpu_of_the_same_name(tmp_path, state, advice):
  """The same command again after a preemption, where the TPU was kept (--keep, --detach, a lost
  connection), met gcloud's ALREADY_EXISTS alone, which says neither that the preempted TPU must
  be deleted nor that a READY one takes --existing."""
  calls = tmp_path / "calls"
  env = _stand_ins(tmp_path, {"gcloud": f"""echo "$4" >> {calls}
case "$4" in
  create) echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS" >&2; exit 1 ;;
  describe) echo {state} ;;
esac
"""})
  out = subprocess.run(tpu_vm(), env=env, capture_output=True, text=True)
  assert out.returncode == 1
  assert out.stderr.endswith(f"tpu_vm.sh: TPU sit-s16 exists and is {state}: {advice}\n"), (
      out.stderr)
  assert calls.read_text().split() == ["create", "describe"]


def test_tpu_vm_existing_refuses_to_start_over_a_going_run(tmp_path):
  """--existing on a TPU whose run (started with --detach) goes on started a second run beside
  it: its set-up replaced the first run's code, its log and pid file replaced the first's (which
  could then no longer be stopped with a save), and it failed on the busy TPU."""
  home, calls = tmp_path / "home", tmp_path / "calls"
  home.mkdir()
  (home / "sit_jax.pid").write_text(f"{os.getpid()}\n")  # a live process: the run
  env = _stand_ins(tmp_path, {"gcloud": f"""
for a in "$@"; do case "$a" in --command=*) cmd="${{a#--command=}}";; esac; done
case "${{cmd:-}}" in
  *"kill -0"*) echo check >> {calls}; HOME={home} exec bash -c "$cmd" ;;
  *) echo "$4" >> {calls} ;;
esac
"""})
  launch = tpu_vm("--existing")
  out = subprocess.run(launch, env=env, capture_output=True, text=True)
  assert out.returncode == 1 and out.stderr.startswith("A run is going on on TPU sit-s16: "), (
      out.stderr)
  assert calls.read_text().split() == ["check"]
  (home / "sit_jax.rc").write_text("0\n")  # that run ended: a new one starts
  calls.unlink()
  out = subprocess.run(launch, env=env, capture_output=True, text=True)
  assert out.returncode == 0 and "Done." in out.stdout, out.stderr
  assert calls.read_text().split()[:2] == ["check", "scp"]
