"""Every test sees 8 simulated CPU devices so sharding is really exercised."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tfds must never reach the network from a test.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds-data-dir")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)
