"""Throughput and MFU of the jitted SiT pretraining step.

  python benchmarks/throughput.py --config=configs/sit_vits.py:runlocal
  python benchmarks/throughput.py --config=configs/sit_vits.py --config.data.global_batch_size=512 \
      --steps=50 --e2e=false

Three figures, kept apart because they answer different questions:
  compile   jax.jit(step).lower(...).compile(), timed on its own;
  model     the step on device-resident synthetic batches (random uint8 views already placed on
            the mesh): what the accelerator can do;
  e2e       the same step fed by the real input pipeline (data.pretrain_iterator +
            resample.batch_placer each step, with the config's data.resize_on): what training
            will actually see.
Each timed window dispatches `--steps` steps and blocks only at its end; `--repeats` windows are
timed and the median is reported (hosts are often shared, so single windows are noisy).
The last line of the output is one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from hostutil import checked_config, fail, parse_flags, pretrain_iterator  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sit_jax import flops as flops_lib  # noqa: E402
from sit_jax import pretrain, sharding  # noqa: E402

# XLA's figure is used for MFU only while it stays this close to the analytic count; outside
# (e.g. cuDNN attention is a custom call XLA does not count, remat recomputes the forward) the
# analytic count is used and `flops_source` says so.
XLA_AGREEMENT = (0.8, 1.5)


# ---------------------------------------------------------------------------------------------
# Setup: the same state and step as pretrain.train_and_evaluate.
# ---------------------------------------------------------------------------------------------


def build(config, mesh, total_steps: int = 10_000):
  """(state, jitted step). Schedules are built for `total_steps`; their values do not matter."""
  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, total_steps, steps_per_epoch=max(total_steps // 100, 1))
  tx = pretrain.build_optimizer(config, schedules)
  _, shardings, init = pretrain.state_layout(config, model, tx, mesh, jax.random.PRNGKey(0))
  state = init()
  compiler_options = sharding.compiler_options(config.compiler_options, jax.default_backend())
  sharding.check_compiler_options(compiler_options)  # as pretraining does: one line if unknown
  step = pretrain.jit_train_step(pretrain.make_train_step(config, model, tx, schedules),
                                 shardings, mesh, config.logical_axis_rules, compiler_options)
  return state, step


def synthetic_batch(config, mesh, seed: int = 0) -> dict:
  """Random uint8 views (and labels) as global arrays on the mesh, like a pipeline batch."""
  rng = np.random.default_rng(seed)
  b, s = config.data.global_batch_size, config.data.image_size
  host = {"view1": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "view2": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "label": np.zeros((b,), np.int32)}
  # Every process makes the same global batch, so each takes its own rows.
  n, p = jax.process_count(), jax.process_index()
  local = jax.tree.map(lambda x: x[p * (b // n):(p + 1) * (b // n)], host)
  batch = sharding.global_batch(local, mesh)
  return jax.block_until_ready(batch)


def compile_step(step, state, batch):
  """(compiled, lower_seconds, compile_seconds)."""
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def run_window(compiled, state, next_batch, steps: int):
  """Dispatches `steps` steps, blocks once at the end; returns (state, seconds)."""
  t0 = time.perf_counter()
  metrics = None
  for _ in range(steps):
    state, metrics = compiled(state, next_batch())
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0


def peak_memory_bytes() -> int | None:
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # not implemented on some backends
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def compiled_memory_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries XLA planned for one device (aliased buffers once)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:
    return None


# ---------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------


def measure(config, *, steps: int = 10, warmup: int = 2, repeats: int = 3, e2e: bool = True,
            peak_flops: float | None = None, log=print) -> dict:
  """Compiles and times the step; returns the figures of the JSON line."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.data.global_batch_size, mesh)
  devices = jax.devices()
  state, step = build(config, mesh)
  batch = synthetic_batch(config, mesh)
  compiled, lower_s, compile_s = compile_step(step, state, batch)
  log(f"lower {lower_s:.2f} s, compile {compile_s:.2f} s")

  gb = config.data.global_batch_size
  analytic = flops_lib.sit_step_flops(config)
  per_device = flops_lib.xla_flops(compiled)
  xla_total = per_device * len(devices) if per_device is not None else None
  ratio = xla_total / analytic if xla_total and analytic else None
  use_xla = ratio is not None and XLA_AGREEMENT[0] <= ratio <= XLA_AGREEMENT[1]
  step_flops = xla_total if use_xla else analytic
  peak = flops_lib.peak_flops_for(devices[0], peak_flops)

  state, warm_s = run_window(compiled, state, lambda: batch, warmup)
  log(f"warm-up {warmup} steps {warm_s:.2f} s")
  windows = []
  for r in range(repeats):
    state, seconds = run_window(compiled, state, lambda: batch, steps)
    windows.append(seconds / steps)
    log(f"model window {r + 1}/{repeats}: {1e3 * seconds / steps:.1f} ms/step")
  step_s = statistics.median(windows)

  result = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "model": config.model.variant,
      "experiment": config.experiment,
      "dtype": config.model.dtype,
      "attention": config.model.attention or None,
      "remat": bool(config.model.remat),
      "image_size": config.data.image_size,
      "global_batch": gb,
      "images_per_s": gb / step_s,
      "step_ms": 1e3 * step_s,
      "step_ms_min": 1e3 * min(windows),
      "step_ms_windows": [round(1e3 * w, 2) for w in windows],
      "tflops_per_s": step_flops / step_s / 1e12,
      "mfu": flops_lib.mfu(step_flops, step_s, peak, len(devices)),
      "mfu_analytic": flops_lib.mfu(analytic, step_s, peak, len(devices)),
      "flops_source": "xla" if use_xla else "analytic",
      "xla_flops_per_step": xla_total,
      "analytic_flops_per_step": analytic,
      "xla_over_analytic": ratio,
      "analytic_gflops_per_image": analytic / gb / 1e9,
      "peak_flops_per_device": peak,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "compiled_memory_bytes": compiled_memory_bytes(compiled),
      "steps": steps, "warmup": warmup, "repeats": repeats,
  }

  it = None
  if e2e:
    from sit_jax import data
    try:
      it = pretrain_iterator(config)
    except data.DataError as e:  # e.g. ImageNet not prepared here: keep the model figures.
      log(f"e2e skipped: {e}")
      result["e2e_error"] = str(e)
  if it is not None:
    from sit_jax import resample
    place = resample.batch_placer(mesh, config.data, config.data.image_size, data.view_keys(2))
    next_batch = lambda: place(next(it))
    # Drain what the pipeline built ahead (its workers' and threads' buffers) before timing: a
    # window that starts on full buffers times their draining, not the steady rate.
    state, _ = run_window(compiled, state, next_batch,
                          max(warmup, data.prefetch_depth(config.data.workers)))
    e2e_windows = []
    for r in range(repeats):
      state, seconds = run_window(compiled, state, next_batch, steps)
      e2e_windows.append(seconds / steps)
      log(f"e2e window {r + 1}/{repeats}: {1e3 * seconds / steps:.1f} ms/step")
    e2e_s = statistics.median(e2e_windows)
    result.update({"e2e_images_per_s": gb / e2e_s, "e2e_step_ms": 1e3 * e2e_s,
                   "e2e_mfu": flops_lib.mfu(step_flops, e2e_s, peak, len(devices)),
                   "e2e_source": config.data.source})
  result["peak_memory_bytes"] = peak_memory_bytes()
  return result


def format_table(r: dict) -> str:
  def f(x, spec):
    return "n/a" if x is None else format(x, spec)

  rows = [
      ("device", f"{r['device_count']} x {r['device_kind']} ({r['backend']})"),
      ("model", f"{r['model']} {r['experiment']} {r['dtype']} @ {r['image_size']}px, "
                f"global batch {r['global_batch']}"),
      ("compile", f"{r['compile_s']:.2f} s (lower {r['lower_s']:.2f} s)"),
      ("model step", f"{r['step_ms']:.1f} ms (min {r['step_ms_min']:.1f}), "
                     f"{r['images_per_s']:.1f} img/s"),
      ("FLOPs / step", f"XLA {f(r['xla_flops_per_step'] and r['xla_flops_per_step'] / 1e9, '.2f')} "
                       f"GFLOP, analytic {r['analytic_flops_per_step'] / 1e9:.2f} GFLOP "
                       f"(ratio {f(r['xla_over_analytic'], '.3f')})"),
      ("TFLOP/s", f"{r['tflops_per_s']:.3f} ({r['flops_source']} FLOPs)"),
      ("MFU", f"{f(r['mfu'], '.1%')} (peak {f(r['peak_flops_per_device'], '.3g')} FLOP/s/device)"),
  ]
  if "e2e_step_ms" in r:
    rows.append(("e2e step", f"{r['e2e_step_ms']:.1f} ms, {r['e2e_images_per_s']:.1f} img/s, "
                             f"MFU {f(r['e2e_mfu'], '.1%')}"))
  mem = r["peak_memory_bytes"] or r["compiled_memory_bytes"]
  rows.append(("memory", "n/a" if mem is None else
               f"{mem / 2**20:.1f} MiB ({'peak in use' if r['peak_memory_bytes'] else 'XLA plan'})"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 10, "Steps per timed window.", lower_bound=1)
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling (and before e2e timing).",
                       lower_bound=0)
  flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.", lower_bound=1)
  flags.DEFINE_bool("e2e", True, "Also time the step fed by the real input pipeline.")
  flags.DEFINE_float("peak_flops", None, "Peak FLOP/s per device for MFU (overrides the table).")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from sit_jax import distributed
  distributed.initialize()
  config = checked_config()
  try:
    result = measure(config, steps=FLAGS.steps, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                     e2e=FLAGS.e2e, peak_flops=FLAGS.peak_flops)
  except ValueError as e:  # as in sit_jax.main: the model's and mesh's refusals say what to set
    fail(e)
  if jax.process_index() == 0:
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
