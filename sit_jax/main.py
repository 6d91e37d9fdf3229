"""Entry point: `python -m sit_jax.main --config=configs/sit_vits.py --workdir=DIR`.

Parses the flags, starts jax.distributed on multi-process jobs, and runs the experiment the
config names; with --aot_topology it only compiles the step for a target topology (aot.py).
Mistakes in the input (a wrong config key, a missing dataset, an unwritable workdir, a
checkpoint of another model) end with one clear line instead of a traceback; set
SIT_JAX_TRACEBACK=1 to see the traceback too.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                lock_config=True)
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

PRETRAIN_EXPERIMENTS = ("gmml", "contrastive", "sit")
TRANSFER_EXPERIMENTS = ("finetune", "linear", "knn", "multilabel")


def user_errors() -> tuple[type[BaseException], ...]:
  from sit_jax import checkpoint
  from sit_jax import aot
  errors = [ValueError, FileNotFoundError, PermissionError, checkpoint.CheckpointError,
            aot.TopologyUnavailable]
  try:
    from sit_jax import data
    errors.append(data.DataError)
  except (ImportError, AttributeError):
    pass
  return tuple(errors)


def run(config, workdir: str):
  experiment = config.experiment
  if experiment in PRETRAIN_EXPERIMENTS:
    from sit_jax import pretrain
    return pretrain.train_and_evaluate(config, workdir)
  if experiment in TRANSFER_EXPERIMENTS:
    from sit_jax import transfer
    return transfer.run(config, workdir)
  raise ValueError(f"Unknown experiment {experiment!r}: choose one of "
                   f"{PRETRAIN_EXPERIMENTS + TRANSFER_EXPERIMENTS}.")


class _OnlyWarningsFromLibraries(std_logging.Filter):
  """orbax logs a dozen INFO lines per checkpoint through absl; they would bury the progress
  lines. Its warnings and errors still come through."""
  LIBRARIES = (f"{os.sep}orbax{os.sep}",)

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in self.LIBRARIES)


def main(argv):
  logging.get_absl_handler().addFilter(_OnlyWarningsFromLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if not FLAGS.aot_topology and not FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --aot_topology).")
  config, workdir = FLAGS.config, FLAGS.workdir
  logging.info("Config:\n%s", config)
  try:
    if FLAGS.aot_topology:
      from sit_jax import aot
      aot.run(config, FLAGS.aot_topology)
    else:
      from sit_jax import distributed
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
      run(config, workdir)
  except user_errors() as e:
    if os.environ.get("SIT_JAX_TRACEBACK"):
      raise
    logging.error("%s: %s", type(e).__name__, e)
    print(f"sit_jax: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
