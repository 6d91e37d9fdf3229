"""Host input-pipeline throughput: is the host or the accelerator the bottleneck, and how does the
pipeline compare with the one before it and with the authors'?

  python benchmarks/input_pipeline.py --config=configs/sit_vits.py:runlocal
  python benchmarks/input_pipeline.py --config=configs/sit_vits.py --config.data.data_dir=... \
      --config.data.workers=16 --batches=200
  python benchmarks/input_pipeline.py --compare          # side by side on generated JPEGs

Without --compare: reads batches from data.pretrain_iterator with the config's data settings
(decode, two random-resized crops, flips; what the host does in training) as fast as it can,
after a warm-up, and reports images/s of this process (and its grain workers) and per core.
With --place the batches are also turned into global arrays on the mesh, as the trainer does.
Compare with the model images/s of benchmarks/throughput.py divided by the number of processes:
the host keeps up when its figure is higher.

--compare writes --images JPEGs of 500x375 (quality 90: crops of scikit-learn's two sample photos)
to a temporary folder and times, in rounds that alternate their order, two 224 crops per image:
  grain        data.pretrain_iterator as pretraining runs it (data.resize_on='device'): PIL
               decodes in threads of this process (workers=0); the crops are cut and resized
               on the accelerator (sit_jax/resample.py), timed apart below
  grain_host   the same with resize_on='host': PIL also crops and resizes
  grain_procs  `grain` with --workers grain worker processes
  before       the tf.data pipeline of commit --baseline (its data.py: TensorFlow decode, crop
               and antialiased resize); needs TensorFlow and git
  authors      the authors' per-image pipeline in one process (torch_reference.AuthorsInput:
               PIL decode, torchvision RandomResizedCrop + flip + ColorJitter + grayscale + PIL
               blur + solarize per view, GMML blocks per image); needs torchvision
For each: images/s, CPU seconds of the process and its children, images per CPU second ("per
core": what one core delivers) and cores used (CPU / wall). Per-core figures are the ones to
compare on a shared machine; the ratios to `before` and `authors` come from the same rounds.
Then the accelerator's share of `grain`: the FLOPs of resample.render_views per image and its
time on this machine's default JAX device (on a CPU that is the work the host was spared, done
by dense matrix products: slower than PIL; on a GPU or TPU it is a few microseconds).
The last line of the output is one JSON object.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from absl import app, flags  # noqa: E402
from hostutil import (checked_config, cpu_seconds, device_resize_cost, parse_flags,  # noqa: E402
                      pretrain_iterator, usable_cores, write_jpegs)
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "sit_vits.py"),
                                "Experiment config (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_integer("batches", 50, "Batches per timed window.", lower_bound=1)
flags.DEFINE_integer("warmup", 10, "Batches read before timing.", lower_bound=0)
flags.DEFINE_integer("repeats", 3, "Timed windows (rounds with --compare); the median counts.",
                     lower_bound=1)
flags.DEFINE_bool("place", True, "Also place each batch on the mesh (sharding.global_batch).")
flags.DEFINE_bool("compare", False, "Time this pipeline, the one of --baseline and the "
                  "authors' side by side on generated JPEGs (module doc).")
flags.DEFINE_integer("images", 256, "--compare: JPEGs to generate.", lower_bound=1)
flags.DEFINE_integer("batch", 64, "--compare: images per batch.", lower_bound=1)
flags.DEFINE_integer("workers", 0, "--compare: grain worker processes of grain_procs "
                     "(0: one per core).")
flags.DEFINE_string("baseline", "a1d16da", "--compare: commit whose sit_jax/data.py is "
                    "`before` (the last tf.data pipeline).")
PIPELINES = ("grain", "grain_host", "grain_procs", "before", "authors")
flags.DEFINE_list("pipelines", list(PIPELINES), "--compare: the pipelines to time.")
flags.DEFINE_string("window", None, "Internal (--compare): time one window of this pipeline "
                    "on --folder and print it as JSON.")
flags.DEFINE_string("folder", None, "Internal (--compare): the JPEG folder.")


def _load_avg():
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------
# One pipeline, the config's.
# ---------------------------------------------------------------------------------------------
def measure(config, *, batches=50, warmup=10, repeats=3, place=True, log=print) -> dict:
  import jax
  from sit_jax import data, resample, sharding

  per_process = config.data.global_batch_size // jax.process_count()
  it = pretrain_iterator(config)
  place_batch = None
  if place:
    place_batch = resample.batch_placer(sharding.make_mesh(config.mesh), config.data,
                                        config.data.image_size, data.view_keys(2))

  def read(n):
    for _ in range(n):
      batch = next(it)
      if place_batch is not None:
        batch = place_batch(batch)
    if place_batch is not None:
      jax.block_until_ready(batch)

  t0 = time.perf_counter()
  read(1)
  first_s = time.perf_counter() - t0
  read(warmup)
  rates, cpu = [], []
  for r in range(repeats):
    t0, c0 = time.perf_counter(), cpu_seconds()
    read(batches)
    wall = time.perf_counter() - t0
    rates.append(batches * per_process / wall)
    cpu.append((cpu_seconds() - c0) / wall)
    log(f"window {r + 1}/{repeats}: {rates[-1]:.1f} images/s, CPU use {cpu[-1]:.2f} cores")
  rate, cores_used = statistics.median(rates), statistics.median(cpu)
  cores = usable_cores()
  return {
      "benchmark": "input_pipeline",
      "source": config.data.source, "split": config.data.split,
      "image_size": config.data.image_size, "flip": config.data.flip,
      **data.engine_options(config.data),
      **data.resize_options(config.data),
      "global_batch": config.data.global_batch_size, "process_batch": per_process,
      "process_count": jax.process_count(),
      "cores": cores, "cpu_count": os.cpu_count(),
      "images_per_s": rate,
      "images_per_s_per_core": rate / cores,
      "images_per_cpu_s": rate / cores_used if cores_used else None,
      "views_per_s": 2 * rate,
      "cpu_cores_used": cores_used,
      "first_batch_s": first_s,
      "placed_on_mesh": place,
      "windows_images_per_s": [round(x, 1) for x in rates],
  }


# ---------------------------------------------------------------------------------------------
# --compare
# ---------------------------------------------------------------------------------------------
def _baseline_data_module(commit):
  """sit_jax/data.py of `commit`, imported as a module of its own."""
  text = subprocess.run(["git", "show", f"{commit}:sit_jax/data.py"], cwd=REPO, check=True,
                        capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "sit_jax_data_before.py")
  with open(path, "w") as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location("sit_jax_data_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _authors_batches(folder, batch, size):
  """The authors' loader, one process: ImageFolder's PIL loader, then AuthorsInput."""
  import torch
  from PIL import Image
  from authors_input import AuthorsInput
  torch.set_num_threads(1)  # a DataLoader worker's setting
  paths = sorted(os.path.join(folder, "photos", f) for f in os.listdir(
      os.path.join(folder, "photos")))
  authors = AuthorsInput(size, seed=0)
  k = 0
  while True:
    images = []
    for _ in range(batch):
      with open(paths[k % len(paths)], "rb") as f:
        images.append(Image.open(f).convert("RGB"))
      k += 1
    yield authors(images)


def _pipeline(name, folder, batch, workers, baseline):
  size = 224
  if name == "authors":
    return _authors_batches(folder, batch, size)
  from sit_jax import data
  kw = dict(global_batch_size=batch, image_size=size, seed=0, process_index=0, process_count=1)
  source = f"folder:{folder}"
  if name == "grain":
    return data.pretrain_iterator(source, None, resize_on="device", **kw)
  if name == "grain_host":
    return data.pretrain_iterator(source, None, resize_on="host", **kw)
  if name == "grain_procs":
    return data.pretrain_iterator(source, None, resize_on="device",
                                  workers=workers or usable_cores(), **kw)
  if name == "before":
    return _baseline_data_module(baseline).pretrain_iterator(source, None, **kw)
  raise ValueError(f"unknown pipeline {name!r}")


def time_window(name, *, folder, batch, batches, warmup, workers, baseline) -> dict:
  """One timed window of one pipeline, alone in this process; its buffers are drained by the
  warm-up (longer than any prefetch) so that the window sees the steady rate."""
  it = _pipeline(name, folder, batch, workers, baseline)
  for _ in range(warmup):
    next(it)
  t0, c0 = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  return dict(images_per_s=batches * batch / wall, images_per_cpu_s=batches * batch / cpu,
              cores_used=cpu / wall, load_avg_1min=_load_avg())


def compare(*, folder, pipelines, batch, batches, warmup, rounds, workers, baseline, log=print):
  """Each window runs in a fresh process, so that no other pipeline's threads or workers run
  beside it; rounds alternate the order of the pipelines."""
  windows, skipped = {name: [] for name in pipelines}, {}
  for r in range(rounds):
    order = pipelines[r % len(pipelines):] + pipelines[:r % len(pipelines)]
    for name in order:
      if name in skipped:
        continue
      cmd = [sys.executable, os.path.abspath(__file__), f"--window={name}", f"--folder={folder}",
             f"--batch={batch}", f"--batches={batches}", f"--warmup={warmup}",
             f"--workers={workers}", f"--baseline={baseline}"]
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
      if proc.returncode:
        skipped[name] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        log(f"{name}: skipped ({skipped[name]})")
        continue
      w = json.loads(proc.stdout.strip().splitlines()[-1])
      windows[name].append(w)
      log(f"round {r + 1}/{rounds} {name:12s} {w['images_per_s']:7.1f} img/s, "
          f"{w['images_per_cpu_s']:7.1f} per core, {w['cores_used']:.2f} cores used; "
          f"load {w['load_avg_1min']:.1f}")
  results = {name: {key: statistics.median(w[key] for w in ws) for key in ws[0]}
             for name, ws in windows.items() if ws}
  per_core = {name: r["images_per_cpu_s"] for name, r in results.items()}
  ratios = {}
  for fast in ("grain", "grain_host", "grain_procs"):
    for slow in ("before", "authors"):
      if fast in per_core and slow in per_core:
        ratios[f"{fast}_over_{slow}_per_core"] = per_core[fast] / per_core[slow]
  return {
      "benchmark": "input_pipeline_compare",
      "images": "500x375 JPEG q90", "views": 2, "image_size": 224, "batch": batch,
      "batches_per_window": batches, "rounds": rounds,
      "cores": usable_cores(), "cpu_count": os.cpu_count(),
      "results": results, "ratios": ratios, "skipped": skipped,
      "windows": windows, "baseline_commit": baseline,
      "device_resize": device_resize_cost(batch),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.window:
    print(json.dumps(time_window(FLAGS.window, folder=FLAGS.folder, batch=FLAGS.batch,
                                 batches=FLAGS.batches, warmup=FLAGS.warmup,
                                 workers=FLAGS.workers, baseline=FLAGS.baseline)))
    return
  if FLAGS.compare:
    unknown = [name for name in FLAGS.pipelines if name not in PIPELINES]
    if unknown or not FLAGS.pipelines:
      raise SystemExit(f"input_pipeline.py: error: --pipelines={','.join(FLAGS.pipelines)}: "
                       f"name some of {', '.join(PIPELINES)}.")
    with tempfile.TemporaryDirectory() as folder:
      write_jpegs(folder, FLAGS.images)
      r = compare(folder=folder, pipelines=FLAGS.pipelines, batch=FLAGS.batch,
                  batches=FLAGS.batches, warmup=FLAGS.warmup, rounds=FLAGS.repeats,
                  workers=FLAGS.workers, baseline=FLAGS.baseline)
    print(f"\n{'':12s}{'img/s':>9s}{'per core':>10s}{'cores':>7s}")
    for name, x in r["results"].items():
      print(f"{name:12s}{x['images_per_s']:9.1f}{x['images_per_cpu_s']:10.1f}"
            f"{x['cores_used']:7.2f}")
    for name, ratio in r["ratios"].items():
      print(f"  {name}: {ratio:.2f}")
    d = r["device_resize"]
    print(f"accelerator's share of `grain`: crop + resize of both views, "
          f"{d['gflop_per_image']:.2f} GFLOP per image, {d['ms_per_image']:.2f} ms per image on "
          f"{d['device']} (decoded buffer {d['decoded_size']} px)")
    print(json.dumps(r))
    return
  from sit_jax import distributed
  distributed.initialize()
  r = measure(checked_config(), batches=FLAGS.batches, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
              place=FLAGS.place)
  print(f"{r['source']} @ {r['image_size']}px, {r['process_batch']} images per batch per process")
  print(f"  {r['images_per_s']:.1f} images/s per process ({r['views_per_s']:.1f} views/s), "
        f"{r['images_per_s_per_core']:.1f} per usable core over {r['cores']} cores "
        f"({r['cpu_cores_used']:.2f} used); first batch after {r['first_batch_s']:.1f} s")
  print("  host-bound if the accelerator's images/s per process (benchmarks/throughput.py) is higher.")
  print(json.dumps(r))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
