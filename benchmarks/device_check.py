"""The accelerator check: one run on a machine with one GPU, one JSON line (benchmarks/README.md).

  bash benchmarks/device_check.sh --out=F.json  # one GPU, under 6 minutes
  bash benchmarks/device_check.sh --dry-run      # the same code on the CPU, tiny shapes (CI)

Cases, each compiled and timed in this process (bf16, synthetic device-resident batches, SiT):
ViT-S/16 and ViT-B/16 at 224 px, two batch sizes each with XLA attention and remat off, then
one factor changed at a time at the smaller batch: cuDNN attention, remat on. For each: compile
seconds, step ms, images/s, analytic and XLA FLOPs, MFU against flops.PEAK_FLOPS, and XLA's
planned memory per device; the process's peak memory in use comes at the end (the allocator
cannot be reset between cases). Then end to end: a generated folder of 500x375 JPEGs through
the real pipeline (grain, one worker process per core, crop and resize on the GPU) into the
ViT-S/16 step; the pipeline alone, with the resize on the GPU and with PIL; the GPU's time and
FLOPs for the crop and resize. A case that fails (out of memory, no cuDNN) records its error; cases past the time budget
are skipped, so that the JSON always comes. With --out the JSON is also rewritten after every
case, and past --hard_limit_s a watchdog saves it marked `aborted`, prints every thread's stack
(where it hung) and ends the process and its input workers: a lease that runs out keeps what was
measured.
"""
from __future__ import annotations

import faulthandler
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("dry_run", False, "Tiny shapes on the CPU: checks the script, measures nothing.")
flags.DEFINE_float("budget_s", 300.0, "Start no new case after this many seconds.")
flags.DEFINE_integer("steps", 10, "Steps per timed window.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed windows per case; the median counts.", lower_bound=1)
flags.DEFINE_string("out", None, "Also write the JSON here, rewritten after every case.")
flags.DEFINE_float("hard_limit_s", 480.0, "Past this, save what was measured and exit (code 3).")

# (name, variant, global batch, attention, remat)
GPU_CASES = [
    ("S16_b256", "S/16", 256, "xla", False),
    ("S16_b512", "S/16", 512, "xla", False),
    ("S16_b256_cudnn", "S/16", 256, "cudnn", False),
    ("S16_b256_remat", "S/16", 256, "xla", True),
    ("B16_b128", "B/16", 128, "xla", False),
    ("B16_b256", "B/16", 256, "xla", False),
    ("B16_b128_cudnn", "B/16", 128, "cudnn", False),
    ("B16_b128_remat", "B/16", 128, "xla", True),
]
# One of each kind on the CPU (another model or batch is the same code): a micro ViT at 32 px
# with small heads. Each case is a compile of ~8 CPU seconds, and tests/test_device_check.py
# runs them all.
DRY_CASES = [("S16_b8", "Mu/8", 8, "xla", False), ("S16_b8_cudnn", "Mu/8", 8, "cudnn", False),
             ("S16_b8_remat", "Mu/8", 8, "xla", True)]


def case_config(variant, batch, attention, remat, image_size, dry):
  from configs import sit_vits
  c = sit_vits.get_config()
  if dry:  # the paper's 4096-wide projection head dominates compile time on the CPU
    c.model.proj_hidden, c.model.proj_dim = 64, 32
  c.model.variant = variant
  c.model.dtype = "bfloat16"
  c.model.attention = attention
  c.model.remat = remat
  c.data.image_size = image_size
  c.data.global_batch_size = batch
  return c


def run_case(config, steps, repeats):
  import jax
  import throughput  # benchmarks/throughput.py
  from sit_jax import flops as flops_lib, sharding
  mesh = sharding.make_mesh(config.mesh)
  state, step = throughput.build(config, mesh)
  batch = throughput.synthetic_batch(config, mesh)
  compiled, lower_s, compile_s = throughput.compile_step(step, state, batch)
  state, _ = throughput.run_window(compiled, state, lambda: batch, 2)
  windows = []
  for _ in range(repeats):
    state, seconds = throughput.run_window(compiled, state, lambda: batch, steps)
    windows.append(seconds / steps)
  step_s = statistics.median(windows)
  gb, devices = config.data.global_batch_size, jax.devices()
  analytic = flops_lib.sit_step_flops(config)
  xla = flops_lib.xla_flops(compiled)
  peak = flops_lib.peak_flops_for(devices[0])
  return {
      "variant": config.model.variant, "global_batch": gb,
      "attention": config.model.attention, "remat": config.model.remat,
      "compile_s": lower_s + compile_s, "step_ms": 1e3 * step_s, "images_per_s": gb / step_s,
      "analytic_tflop_per_step": analytic / 1e12,
      "xla_tflop_per_step": xla * len(devices) / 1e12 if xla else None,
      "mfu_analytic": flops_lib.mfu(analytic, step_s, peak, len(devices)),
      "compiled_memory_gib": (throughput.compiled_memory_bytes(compiled) or 0) / 2**30 or None,
  }, (state, compiled, step, batch)


def end_to_end(config, built, folder, steps, repeats, workers):
  """images/s of a case's step fed by the real pipeline (the views cut and resized on the
  device, as `data.resize_on=auto` does on a GPU), of the pipeline alone with that and with PIL
  resizing on the host, and the device's share (resample.render_views)."""
  import throughput
  from hostutil import device_resize_cost
  from sit_jax import data, resample, sharding
  state, compiled, _, _ = built
  mesh = sharding.make_mesh(config.mesh)
  config.data.resize_on = "device"

  def pipeline(resize_on):
    return data.pretrain_iterator(
        f"folder:{folder}", None, global_batch_size=config.data.global_batch_size,
        image_size=config.data.image_size, crop_scale=tuple(config.data.crop_scale),
        seed=0, flip=config.data.flip, workers=workers, resize_on=resize_on)

  # Each measurement first drains what the pipeline built ahead (workers x their threads'
  # and buffers' batches): a window on full buffers times their draining, not the steady rate.
  depth = data.prefetch_depth(workers)

  def alone(it):
    for _ in range(depth + 1):
      next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    return config.data.global_batch_size * steps / (time.perf_counter() - t0)

  it = pipeline("device")
  place = resample.batch_placer(mesh, config.data, config.data.image_size, data.view_keys(2))
  next_batch = lambda: place(next(it))
  state, _ = throughput.run_window(compiled, state, next_batch, depth + 2)
  e2e = []
  for _ in range(repeats):
    state, seconds = throughput.run_window(compiled, state, next_batch, steps)
    e2e.append(seconds / steps)
  gb = config.data.global_batch_size
  return {"variant": config.model.variant, "global_batch": gb, "workers": workers,
          "jpegs": "500x375 q90", "resize_on": "device",
          "e2e_images_per_s": gb / statistics.median(e2e),
          "pipeline_images_per_s": alone(it),
          "pipeline_host_resize_images_per_s": alone(pipeline("host")),
          "device_resize": device_resize_cost(gb, config.data.image_size),
          "skipped_images": it.num_skipped}


def save(result, path):
  """Rewrites `path` (if any) with `result`; a reader never sees half of it."""
  if path:
    from sit_jax import metrics
    metrics.atomic_write_text(path, json.dumps(result))


def start_watchdog(result, path, limit_s):
  """Past `limit_s`: mark `result` aborted, save it, print every thread's stack and exit, taking
  the input pipeline's worker processes along (orphans would hold the output pipes open)."""
  def fire():
    result["aborted"] = f"hard limit of {limit_s:.0f} s; the stacks on stderr show where"
    try:  # whatever fails here (the main thread changing `result`, a full disk), exit below
      save(result, path)
      print(json.dumps(result), flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"could not save the partial result: {e}", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for child in multiprocessing.active_children():
      child.kill()
    os._exit(3)
  timer = threading.Timer(limit_s, fire)
  timer.daemon = True
  timer.start()
  # A backstop that needs no GIL, should a C call hold it past the limit.
  faulthandler.dump_traceback_later(limit_s + 30, exit=True)
  return timer


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  import jax
  import throughput
  from hostutil import usable_cores, write_jpegs
  dry = FLAGS.dry_run
  cases, size = (DRY_CASES, 32) if dry else (GPU_CASES, 224)
  device = jax.devices()[0]
  result = {"benchmark": "device_check", "dry_run": dry, "backend": jax.default_backend(),
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, "python": sys.version.split()[0],
            "host_cores": usable_cores(), "dtype": "bfloat16", "image_size": size,
            "cases": {}}
  watchdog = start_watchdog(result, FLAGS.out, FLAGS.hard_limit_s)
  save(result, FLAGS.out)
  log = lambda *a: print(f"[{time.perf_counter() - start:6.1f} s]", *a, file=sys.stderr,
                         flush=True)
  first = None
  for name, variant, batch, attention, remat in cases:
    if time.perf_counter() - start > FLAGS.budget_s:
      result["cases"][name] = {"skipped": "time budget"}
      continue
    if attention == "cudnn" and jax.default_backend() != "gpu":
      result["cases"][name] = {"skipped": "cuDNN attention needs a GPU"}
      continue
    config = case_config(variant, batch, attention, remat, size, dry)
    log(name, "compiling and timing")
    try:
      result["cases"][name], built = run_case(config, FLAGS.steps, FLAGS.repeats)
      first = first or (config, built)  # the end-to-end run reuses the first case's step
      del built
    except Exception as e:  # out of memory, an unsupported attention: record it, go on
      result["cases"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    jax.clear_caches()
    gc.collect()
    log(name, json.dumps(result["cases"][name]))
    save(result, FLAGS.out)
  result["peak_memory_gib"] = (throughput.peak_memory_bytes() or 0) / 2**30 or None

  if first is None:
    result["end_to_end"] = {"skipped": "no case ran"}
  elif time.perf_counter() - start > FLAGS.budget_s:
    result["end_to_end"] = {"skipped": "time budget"}
  else:
    with tempfile.TemporaryDirectory() as folder:
      log("end_to_end: writing JPEGs")
      write_jpegs(folder, 64 if dry else 1024)
      log("end_to_end: the pipeline into the first case's step, then the pipeline alone")
      try:
        result["end_to_end"] = end_to_end(*first, folder, FLAGS.steps, FLAGS.repeats,
                                          workers=1 if dry else usable_cores())
      except Exception as e:
        result["end_to_end"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    del first
  result["wall_s"] = time.perf_counter() - start
  watchdog.cancel()
  faulthandler.cancel_dump_traceback_later()
  save(result, FLAGS.out)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
