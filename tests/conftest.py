"""Every test sees 8 simulated CPU devices so sharding is really exercised."""
import atexit
import gc
import os
import shutil
import tempfile

# On a loaded 2-core machine a simulated device can reach a collective long after the others:
# XLA:CPU aborts the process after 40 s by default (its rendezvous and collective timeouts).
# Tests compile many small programs and run few steps of each: LLVM's optimisation of the
# generated CPU code is most of their compile time and buys little (the suite on 2 cores:
# 11.5-12.6 minutes before, 10.3-11.1 after).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Not --xla_cpu_use_fusion_emitters=false: XLA:CPU's older emitters compile the tiny SiT step in
# about half the CPU time (the suite 9:40 against 11:28 on the 2-core EPYC, 2026-12-07), but their
# sharded and single-device programs disagree: the augmentation over 8 devices had colour channels
# swapped against one device's, and the sharded steps' losses were 0.16% off the single device's.


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS of the processes the tests start: num_devices simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}"


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8) +
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    " --xla_cpu_collective_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tfds must never reach the network from a test.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-data-dir")
os.environ.setdefault("NO_GCE_CHECK", "true")

# One XLA compilation cache for this test session, shared by the pytest-xdist workers and the
# `python -m sit_jax.main` children (they inherit the environment): the e2e, resume and notebook
# runs compile the same programs, and compiling dominates their time on 2 cores. It starts empty
# every session, so nothing carries over between runs.
if "SIT_JAX_TEST_CACHE" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="sit_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["SIT_JAX_TEST_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def exported_backbone(tmp_path_factory):
  """A Mu/4 backbone for 32 px images, exported as pretraining would export it (test_transfer.py
  and test_transfer_runlocal.py): (path, params)."""
  import jax.numpy as jnp
  import numpy as np
  from sit_jax import checkpoint
  from sit_jax.models import vit
  module = vit.backbone_from_config({"variant": "Mu/4", "image_size": 32})
  params = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(np.asarray, params)
  path = checkpoint.export_backbone(tmp_path_factory.mktemp("export") / "backbone",
                                    {"backbone": params}, {"variant": "Mu/4", "image_size": 32})
  return path, params


# pytest-xdist hands each worker a whole file at a time (--dist loadfile), in the collection order
# (--no-loadscope-reorder, pytest.ini; by default it orders files by their number of tests). The
# slowest files go first and the quick ones fill in at the end, so that the workers finish
# together: ordered by number of tests, one of 2 workers sat idle for the last 44 s of the suite.
# By CPU seconds on 2 cores (pytest --durations=0); the files left out take under 10 s each.
SLOWEST_FILES = ("test_pretrain_step.py", "test_pretrain_e2e.py", "test_activation_sharding.py",
                 "test_multiprocess.py", "test_transfer_runlocal.py", "test_segment.py",
                 "test_gmml.py", "test_no_tf.py", "test_device_check.py", "test_models.py",
                 "test_transfer.py", "test_notebook.py", "test_remote_workdir.py",
                 "test_monitor.py", "test_resample.py", "test_convert.py", "test_baselines.py",
                 "test_aot.py", "test_standardize_input.py", "test_data.py", "test_augment.py",
                 "test_reliability.py", "test_fewshot.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  # A stable sort: the tests of a file keep their order.
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """One last collection while the session still reports what it finds, then the heap frozen.
  pytest's clean-up collects garbage five times more after a pytest-xdist worker has reported
  finished; each full collection of a worker's heap (TensorFlow, torch, JAX and their programs) took
  1.1 s, and execnet interrupts a worker still busy 5 s after the controller's teardown: the suite
  ended with a KeyboardInterrupt traceback from inside JAX's garbage-collection callback."""
  gc.collect()
  gc.freeze()
