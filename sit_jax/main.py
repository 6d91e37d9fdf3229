"""Entry point: `python -m sit_jax.main --config=configs/sit_vits.py --workdir=DIR`.

Parses the flags, checks the config (config_check.py), starts jax.distributed on multi-process
jobs, and runs the experiment the config names; with --aot_topology it only compiles the step for
a target topology (aot.py). Mistakes in the input (a flag, the config file, a key or value of the
config, a missing dataset, an unwritable workdir, a checkpoint of another model) end with one
line on stderr, before any work for those the command line shows; set SIT_JAX_TRACEBACK=1 to see
the traceback too. The console shows progress; the full config is in DIR/config.json.
"""
from __future__ import annotations

import errno
import os

# Before anything imports TensorFlow (the host input pipeline) or XLA: their C++ INFO lines
# (TF's oneDNN notice, each after absl's "All log messages before absl::InitializeLog()") are
# not for users. TF prints the oneDNN notice at any log level while oneDNN is on; the input
# pipeline runs no op that oneDNN speeds up.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sit_jax import config_check  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:args]); a configs/ path that is not "
    "in the working directory is taken from the installed sit_jax configs.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (overrides "
                    "JAX_COORDINATOR_ADDRESS; SLURM, OpenMPI and TPU pods need none).")
flags.DEFINE_integer("num_processes", None, "Number of processes (overrides JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (overrides JAX_PROCESS_ID).")
flags.DEFINE_string("aot_topology", None,
                    "Only compile the pretraining step ahead of time for a topology and print its "
                    "memory per device: a TPU slice ('v5e:2x2', 'v4:2x2x1'; needs libtpu, no TPU) "
                    "or 'cpu:N'. No --workdir needed, nothing is trained.")
flags.mark_flags_as_required(["config"])


def user_errors() -> tuple[type[BaseException], ...]:
  """The errors whose message says what to do: one line, no traceback (bugs keep theirs)."""
  from sit_jax import aot, checkpoint, experiment
  errors = [ValueError, FileNotFoundError, PermissionError, checkpoint.CheckpointError,
            aot.TopologyUnavailable, experiment.RunError]
  try:
    from sit_jax import data
    errors.append(data.DataError)
  except (ImportError, AttributeError):
    pass
  return tuple(errors)


def run(config, workdir: str):
  experiment = config.experiment
  if experiment in config_check.PRETRAIN_EXPERIMENTS:
    from sit_jax import pretrain
    return pretrain.train_and_evaluate(config, workdir)
  from sit_jax import transfer
  return transfer.run(config, workdir)


class _QuietLibraries(std_logging.Filter):
  """Keeps libraries' INFO lines off the console: orbax logs a dozen per checkpoint, jax one
  per platform it could not start ("Unable to initialize backend 'tpu'" on every CPU machine).
  Their warnings and errors still come through."""
  SOURCES = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        source in record.pathname for source in self.SOURCES)


# A full disk, a quota, a read-only filesystem: the storage's fault, not a bug of sit_jax.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def exit_with(error: BaseException):
  """Ends the program with one line on stderr; SIT_JAX_TRACEBACK=1 raises `error` instead."""
  if os.environ.get("SIT_JAX_TRACEBACK"):
    raise error
  end(1, " ".join(str(error).split()))


def end(code: int, error: str = ""):
  """Exits with `code`, printing `error` first (one line). A process of a multi-process job ends
  at once, and its line names the process whose error ended the job (distributed.py)."""
  job = _job()
  if error:
    print(f"sit_jax: error: {job.first_error(error) if job else error}", file=sys.stderr)
  (job.leave if job else sys.exit)(code)


def _job():
  """sit_jax.distributed where this process is one of a multi-process job, else None. Imported
  once main starts a job: a mistake on the command line does not import jax."""
  distributed = sys.modules.get("sit_jax.distributed")
  return distributed if distributed is not None and distributed.joined() else None


def start_backend():
  """Starts JAX's devices. A platform JAX cannot start is one line: JAX_PLATFORMS=cuda without
  jax's CUDA plugin failed deep in a traceback (a bare AssertionError for a platform jax does not
  know), with no GPU visible to the task or libtpu missing a RuntimeError at the first step."""
  import jax
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
    reason = f" ({e})" if str(e) else (" (no backend of that name: jax's plugin for it is not "
                                       "installed)")
    raise config_check.ConfigError(
        f"JAX cannot start JAX_PLATFORMS={platforms!r}{reason}. Install jax for the accelerator "
        "(pip install 'jax[cuda13]' for NVIDIA GPUs, 'jax[tpu]' on TPU VMs), make sure this "
        "process can see it, or unset JAX_PLATFORMS to run on what JAX finds.") from e


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags parser: checks the config file, its argument and the --config.KEY names
  first (config_check.check_command_line), so each mistake on the command line is one line."""
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    return flags.FLAGS(config_check.check_command_line(argv))
  except Exception as e:  # everything that fails here is the command line's fault
    exit_with(e)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  FLAGS = flags.FLAGS
  try:
    if len(argv) > 1:
      raise config_check.ConfigError(f"Unexpected arguments {argv[1:]}: every setting is a "
                                     "--flag (e.g. --config.total_steps=100).")
    if not FLAGS.aot_topology and not FLAGS.workdir:
      raise config_check.ConfigError("--workdir is required (except with --aot_topology).")
    config_check.check(FLAGS.config)
    for warning in config_check.unread_overrides(
        FLAGS.config, config_flags.get_override_values(FLAGS["config"])):
      logging.warning(warning)
    if FLAGS.aot_topology:
      from sit_jax import aot
      aot.run(FLAGS.config, FLAGS.aot_topology)
    else:
      from sit_jax import distributed
      if distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                FLAGS.process_id):
        distributed.check_same_config(FLAGS.config)
      start_backend()
      run(FLAGS.config, FLAGS.workdir)
  except KeyboardInterrupt:
    # Inside the training loop the first Ctrl-C saves and stops (trainer.py) and a second one
    # lands here, losing the steps since the last checkpoint; elsewhere (reading data,
    # extracting features) there is nothing to save.
    if os.environ.get("SIT_JAX_TRACEBACK"):
      raise
    print("sit_jax: interrupted (Ctrl-C); start the same command to go on (training resumes "
          "from its latest checkpoint).", file=sys.stderr)
    end(130)
  except Exception as e:
    if isinstance(e, config_check.ConfigError) or isinstance(e, user_errors()):
      exit_with(e)
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      exit_with(OSError(f"{e}. Free space (or fix the storage) and start the same command: "
                        "the checkpoints saved so far are kept, and it resumes from the latest."))
    if _job():  # a bug: its traceback, then the job ends (distributed.py).
      traceback.print_exc()
      end(1, f"{type(e).__name__}: {e}".splitlines()[0])
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
