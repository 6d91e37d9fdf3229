"""Ahead-of-time compile of the pretraining step for a target topology, without its hardware.

    python -m sit_jax.main --config=configs/sit_vitb.py --aot_topology=v5e:4x4
    python -m sit_jax.main --config=configs/sit_vits.py:runlocal --aot_topology=cpu:8

lowers the jitted train step on abstract inputs (the train state and a global batch with the
shardings of a real run on that topology), compiles it with XLA for the target, and prints the
compiled program's memory per device (arguments, outputs, temporaries, generated code) against
the HBM that XLA reports as available, and its FLOPs beside the analytic count, so one can see
whether a config and batch size fit before asking for the machines. A program that XLA finds
too large ends in one line: what it needs, what the chip has, what to try. Nothing is trained
or read.

Topologies:
  TPU slices 'v4:2x2x1', 'v5e:2x2', 'v5p:2x2x1' (or 'v5:...'), 'v6e:4x4', ... (the names of
  `gcloud compute tpus tpu-vm create --topology`, prefixed with the generation). Compiling for a
  TPU needs the libtpu that matches jax on this machine (`pip install "jax[tpu]==<jax version>"`,
  x86-64 Linux; README: "Will it fit"), but no TPU.
  'cpu:N'    N devices of the local CPU backend (forced with jax_num_cpu_devices if needed),
             compiled with XLA:CPU's memory-minimising scheduler (AOT_COMPILER_OPTIONS).
  'local' or 'local:N'  the devices this machine has (e.g. its GPUs).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from sit_jax import flops, optim, pretrain, sharding

# HBM per JAX device (a chip; v4/v5p run both cores of a chip as one "megacore" device) that
# XLA reports as available to a program, in GiB: libtpu 0.0.42's "exceeds available HBM" figure
# for each generation, a little under the chip's 16 / 32 / 95 / 32 GiB.
TPU_HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5": 95.74, "v6e": 31.25}
MEGACORE = ("v4", "v5")
PRETRAIN_EXPERIMENTS = ("gmml", "contrastive", "sit")


class TopologyUnavailable(RuntimeError):
  """The platform needed to compile for the requested topology is not installed here."""


class DoesNotFit(ValueError):
  """XLA refused to compile the step: it needs more memory per device than the chip has."""


def _tpu_devices(generation: str, dims: tuple[int, ...]):
  from jax.experimental import topologies
  name = f"{generation}:{'x'.join(map(str, dims))}"
  dims3 = tuple(dims) + (1,) * (3 - len(dims))
  per_host = tuple(min(2, d) for d in dims3[:2]) + (1,)
  if generation in MEGACORE:
    wrap = tuple(d >= 4 and all(x >= 4 for x in dims3) for d in dims3)
  else:  # v5e / v6e: only full 16-chip rows wrap around.
    wrap = tuple(d == 16 for d in dims3[:2]) + (False,)
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=name,
        chip_config_name="megacore" if generation in MEGACORE else "default",
        chips_per_host_bounds=per_host, num_slices=1, wrap=wrap)
  except RuntimeError as e:
    if "not installed" in str(e) or "TPU support" in str(e):
      raise TopologyUnavailable(
          f"Compiling for the TPU topology {name!r} needs libtpu on this machine (no TPU "
          f"needed): `pip install \"jax[tpu]=={jax.__version__}\"` installs the libtpu of this "
          "jax (x86-64 Linux), or run on a TPU VM. Use --aot_topology=cpu:N to try the compile "
          "path on this CPU.") from e
    raise ValueError(f"libtpu cannot build the TPU topology {name!r}: "
                     f"{str(e).splitlines()[0][:300]}") from e
  return list(topology.devices)


def topology_devices(topology: str) -> tuple[list, str]:
  """(devices, platform) for 'cpu:N', 'local[:N]' or a TPU slice like 'v5e:2x2'."""
  topology = topology.strip().lower()
  match = re.fullmatch(r"(cpu|local)(?::(\d+))?", topology)
  if match:
    kind, count = match.group(1), match.group(2)
    count = int(count) if count else None
    if kind == "cpu" and not count:
      raise ValueError("Give the number of CPU devices: --aot_topology=cpu:N with N >= 1, e.g. "
                       "cpu:8.")
    if count == 0:
      raise ValueError("--aot_topology=local:N needs N >= 1 (or local for every device).")
    if kind == "cpu":
      from jax._src import xla_bridge
      if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", count)
      devices = jax.devices("cpu")
    else:
      devices = jax.devices()
    if count is not None:
      if len(devices) < count:
        raise ValueError(
            f"--aot_topology={topology}: only {len(devices)} {devices[0].platform} devices "
            f"here (JAX started before the topology was set; for CPU start a fresh process "
            f"or set XLA_FLAGS=--xla_force_host_platform_device_count={count}).")
      devices = devices[:count]
    return devices, devices[0].platform
  match = re.fullmatch(r"(v4|v5e|v5p|v5|v6e)[:\-]((?:\d+x){1,2}\d+)", topology)
  if match:
    generation = "v5" if match.group(1) == "v5p" else match.group(1)
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if 0 in dims:
      raise ValueError(f"--aot_topology={topology}: every dimension of a slice is at least 1.")
    want = 3 if generation in MEGACORE else 2
    if len(dims) != want:
      example = "x".join(["2", "2", "1"][:want])
      raise ValueError(f"{match.group(1)} slices have {want} dimensions, e.g. "
                       f"{match.group(1)}:{example}.")
    return _tpu_devices(generation, dims), "tpu"
  raise ValueError(
      f"Unknown --aot_topology {topology!r}: use a TPU slice (v4:2x2x1, v5e:2x2, v5p:2x2x1, "
      "v6e:4x4, ...), cpu:N or local[:N].")


# Put before config.compiler_options (which override them) and, like them, applied only on their
# backend (sharding.compiler_options). XLA:CPU's memory-minimising scheduler: its default favours
# concurrency and issues collectives as early as it can (every FSDP all-gather at the start of the
# program), which a TPU's memory-aware scheduler does not; the question compiling here answers is
# memory (runlocal on cpu:8: data-parallel temporaries 13.9 -> 12.4 MiB, FSDP 16.1 -> 14.6 MiB).
AOT_COMPILER_OPTIONS = "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def compile_train_step(config, devices, compiler_options: dict | None = None):
  """Compiles the pretraining step of `config` for `devices`; returns (compiled, mesh).

  `compiler_options` go to XLA, e.g. {'xla_backend_optimization_level': 0} to compile faster
  (buffer assignment, hence the memory figures, happens before the backend optimises).
  """
  if config.experiment not in PRETRAIN_EXPERIMENTS:
    raise ValueError(f"--aot_topology compiles the pretraining step ({PRETRAIN_EXPERIMENTS}); "
                     f"config.experiment is {config.experiment!r}.")
  pretrain.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  sharding.check_batch_size(config.data.global_batch_size, mesh)
  # The schedules' lengths only change constants in the step, not its memory: no dataset needed.
  total_steps, steps_per_epoch = optim.schedule_lengths(
      config, config.num_train_examples or config.data.global_batch_size)

  model = pretrain.build_model(config)
  schedules = pretrain.build_schedules(config, total_steps, steps_per_epoch)
  tx = pretrain.build_optimizer(config, schedules)
  init = functools.partial(pretrain.init_state, config, model, tx)
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  state_shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  state = sharding.abstract_with_shardings(abstract, state_shardings)

  batch_size, size = config.data.global_batch_size, config.data.image_size
  batch_sharding = sharding.batch_sharding(mesh)
  view = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8, sharding=batch_sharding)
  batch = {"view1": view, "view2": view,
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}

  step = pretrain.jit_train_step(pretrain.make_train_step(config, model, tx, schedules),
                                 state_shardings, mesh, config.logical_axis_rules)
  lowered = step.lower(state, batch)
  options = {**sharding.compiler_options(f"{AOT_COMPILER_OPTIONS},{config.compiler_options}",
                                         devices[0].platform),
             **(compiler_options or {})}
  try:
    return lowered.compile(compiler_options=options or None), mesh
  except jax.errors.JaxRuntimeError as e:
    bad_option = sharding.bad_compiler_option(e, devices[0].platform)
    if bad_option:
      raise bad_option from None
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(out_of_memory_line(config, mesh, devices, str(e))) from None


def _gib(text: str) -> float | None:
  """'17.57G' / '512.00M' (XLA's sizes) -> GiB."""
  match = re.fullmatch(r"([\d.]+)([KMGT])i?B?", text.strip())
  if not match:
    return None
  return float(match.group(1)) * 1024.0 ** ("KMGT".index(match.group(2)) - 2)


def out_of_memory_line(config, mesh, devices, message: str) -> str:
  """One line for XLA's RESOURCE_EXHAUSTED: what the step needs, what the chip has, what to try."""
  sizes = re.findall(r"\(([\d.]+[KMGT])i?B?\)", message)  # '... temporaries (256.00G) exceeds
  used = re.search(r"Used ([\d.]+[KMGT]) of ([\d.]+[KMGT])", message)  # available HBM (15.75G)'
  need, have = ((used.group(1), used.group(2)) if used else sizes[:2] if len(sizes) >= 2
                else (None, None))
  verdict = (f"XLA needs {_gib(need):.2f} GiB per device, {_gib(have):.2f} GiB available"
             if need else "XLA needs more memory per device than is available")
  per_device = config.data.global_batch_size // sharding.data_parallel_size(mesh)
  tries = []
  if not config.model.remat:
    tries.append("--config.model.remat=True")
  if mesh.shape["fsdp"] == 1:
    tries.append("FSDP (the config argument fsdp, e.g. --config=configs/sit_vitb.py:fsdp)")
  elif devices[0].platform == "tpu" and "windowed_einsum" not in config.compiler_options:
    from configs import common  # The recipe's options (README, "FSDP and libtpu's windowed einsums").
    tries.append(f"libtpu's windowed einsums off (--config.compiler_options="
                 f"{common.FSDP_COMPILER_OPTIONS})")
  if per_device > 1:
    tries.append(f"a smaller per-device batch (now {per_device}: --config.data.global_batch_size="
                 f"{config.data.global_batch_size // 2})")
  tries.append("more chips")
  return (f"{config.model.variant} at global batch {config.data.global_batch_size} does not "
          f"fit on {len(devices)} {devices[0].device_kind} devices (mesh {dict(mesh.shape)}): "
          f"{verdict}. Try " + ", ".join(tries) + ".")


def memory_figures(compiled) -> dict:
  """Bytes per device of the compiled program."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
             for name in ("argument", "output", "alias", "temp", "generated_code")}
  # Donated state is aliased to the output: count it once. The program itself lives in HBM too.
  figures["total"] = (figures["argument"] + figures["output"] - figures["alias"]
                      + figures["temp"] + figures["generated_code"])
  return figures


def has_loop(compiled) -> bool:
  """Whether the program has a while loop (nn.scan over layers, or the windowed einsums XLA
  builds for FSDP and tensor parallelism): XLA's cost analysis counts a loop body once."""
  try:
    return re.search(r"\bwhile\(", compiled.as_text()) is not None
  except Exception:  # not every backend gives the text.
    return False


def _fmt(num_bytes: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes} B"


def run(config, topology: str, compiler_options: dict | None = None) -> dict:
  """Compiles for `topology`, prints the memory per device and the FLOPs, returns the figures."""
  devices, platform = topology_devices(topology)
  compiled, mesh = compile_train_step(config, devices, compiler_options)
  figures = memory_figures(compiled)
  xla_flops = flops.xla_flops(compiled) or 0.0
  analytic = flops.sit_step_flops(config) / len(devices)
  lines = [
      f"AOT compile: {config.experiment} step of {config.model.variant} at "
      f"{config.data.image_size}px, global batch {config.data.global_batch_size}, for "
      f"{topology} ({len(devices)} {platform} devices, mesh {dict(mesh.shape)}).",
      "Memory per device:",
  ]
  labels = {"argument": "arguments (state + batch)", "output": "outputs (state + metrics)",
            "alias": "aliased (donated state, counted once)", "temp": "temporaries",
            "generated_code": "generated code",
            "total": "total (args + outputs - aliased + temps + code)"}
  for key, label in labels.items():
    if figures.get(key) or key in ("temp", "total") and key in figures:
      lines.append(f"  {label:<48} {_fmt(figures[key]):>12}")
  if not figures:
    lines.append("  (this backend reports no memory analysis)")
  loop = has_loop(compiled)
  lines.append("FLOPs per device per step:")
  if xla_flops:
    lines.append(f"  {'XLA cost analysis':<48} {xla_flops / 1e9:>8.1f} GFLOP"
                 f"  ({xla_flops / analytic:.2f}x the analytic count)")
  lines.append(f"  {'analytic (matmuls, sit_jax/flops.py)':<48} {analytic / 1e9:>8.1f} GFLOP")
  # XLA counts more than matmuls: below the analytic count, a loop body was counted once.
  if xla_flops and loop and xla_flops < analytic:
    what = ("the scanned blocks (model.scan_layers)" if config.model.get("scan_layers") else
            "the loops XLA builds for sharded matmuls (windowed einsums)")
    lines.append(f"  XLA counts the body of a loop once, here {what}: its figure is low; the "
                 "analytic count is the one for MFU.")
  generation = re.split(r"[:\-]", topology.strip().lower())[0]  # 'v5e:2x2' or 'v5e-2x2'
  generation = "v5" if generation == "v5p" else generation
  if platform == "tpu" and generation in TPU_HBM_GIB and figures:
    hbm = TPU_HBM_GIB[generation] * 2**30
    verdict = "fits" if figures["total"] <= hbm else "does NOT fit"
    lines.append(f"Verdict: {verdict} in the {TPU_HBM_GIB[generation]} GiB of HBM XLA reports "
                 f"available per device ({100 * figures['total'] / hbm:.0f}% used).")
  print("\n".join(lines), flush=True)
  return {"topology": topology, "platform": platform, "num_devices": len(devices),
          "mesh": dict(mesh.shape), "memory_bytes": figures, "flops": xla_flops,
          "analytic_flops": analytic, "loop": loop}
