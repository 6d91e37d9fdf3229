"""Host input-pipeline throughput: is the host or the accelerator the bottleneck?

  python benchmarks/input_pipeline.py --config=configs/sit_vits.py:runlocal
  python benchmarks/input_pipeline.py --config=configs/sit_vits.py --config.data.data_dir=... \
      --batches=200

Reads batches from data.pretrain_iterator (decode, two random-resized crops, flips; what the host
does in training) as fast as it can, after a warm-up that lets tf.data fill its buffers, and
reports images/s of this process and per CPU core it may use. With --place the batches are also
turned into global arrays on the mesh (sharding.global_batch), as the trainer does. Compare
with the model images/s of benchmarks/throughput.py divided by the number of processes: the host
keeps up when its figure is higher. The last line of the output is one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_integer("batches", 50, "Batches per timed window.")
flags.DEFINE_integer("warmup", 10, "Batches read before timing.")
flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.")
flags.DEFINE_bool("place", True, "Also place each batch on the mesh (sharding.global_batch).")
flags.mark_flags_as_required(["config"])


def measure(config, *, batches=50, warmup=10, repeats=3, place=True, log=print) -> dict:
  from sit_jax import data, sharding  # data imports TensorFlow.

  per_process = config.data.global_batch_size // jax.process_count()
  it = data.pretrain_iterator(
      config.data.source, config.data.split, global_batch_size=config.data.global_batch_size,
      image_size=config.data.image_size, crop_scale=tuple(config.data.crop_scale),
      seed=config.seed, data_dir=config.data.data_dir or None,
      interpolation=config.data.interpolation)
  mesh = sharding.make_mesh(config.mesh) if place else None

  def read(n):
    for _ in range(n):
      batch = next(it)
      if mesh is not None:
        batch = sharding.global_batch(batch, mesh)
    if mesh is not None:
      jax.block_until_ready(batch)

  t0 = time.perf_counter()
  read(1)
  first_s = time.perf_counter() - t0
  read(warmup)
  rates, cpu = [], []
  for r in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    read(batches)
    wall = time.perf_counter() - t0
    rates.append(batches * per_process / wall)
    cpu.append((time.process_time() - c0) / wall)
    log(f"window {r + 1}/{repeats}: {rates[-1]:.1f} images/s, process CPU use "
        f"{cpu[-1]:.2f} cores")
  rate = statistics.median(rates)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
      "benchmark": "input_pipeline",
      "source": config.data.source, "split": config.data.split,
      "image_size": config.data.image_size,
      "global_batch": config.data.global_batch_size, "process_batch": per_process,
      "process_count": jax.process_count(),
      "cores": cores, "cpu_count": os.cpu_count(),
      "images_per_s": rate,
      "images_per_s_per_core": rate / cores,
      "views_per_s": 2 * rate,
      "process_cpu_cores_used": statistics.median(cpu),
      "first_batch_s": first_s,
      "placed_on_mesh": place,
      "windows_images_per_s": [round(x, 1) for x in rates],
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from sit_jax import distributed
  distributed.initialize()
  r = measure(FLAGS.config, batches=FLAGS.batches, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
              place=FLAGS.place)
  print(f"{r['source']} @ {r['image_size']}px, {r['process_batch']} images per batch per process")
  print(f"  {r['images_per_s']:.1f} images/s per process ({r['views_per_s']:.1f} views/s), "
        f"{r['images_per_s_per_core']:.1f} per core over {r['cores']} cores; "
        f"first batch after {r['first_batch_s']:.1f} s")
  print("  host-bound if the accelerator's images/s per process (benchmarks/throughput.py) is higher.")
  print(json.dumps(r))


if __name__ == "__main__":
  app.run(main)
