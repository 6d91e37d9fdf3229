"""Mesh construction, parameter and activation partitioning from config rules, batch placement.

Mesh axes are ('data', 'fsdp', 'model'). The batch is split over data x fsdp.

Parameters follow `config.sharding_rules`, (regex -> rule) pairs matched against the '/'-joined
path of every leaf of the train state (so optimizer moments follow their parameters). A rule is
  - 'replicate',
  - 'fsdp': shard the largest dimension divisible by the fsdp axis size over 'fsdp', or
  - a tuple with one mesh-axis name, tuple of names, or None per dimension, e.g. (None, 'model');
    the layer axis that `scan_layers` stacks in front of a block's parameters takes None.
The first matching rule wins; leaves matching none are replicated.

Activations follow `config.logical_axis_rules`, as in MaxText: the model names the dimensions
of its activations with logical axes only (nn.with_logical_constraint(x, ('batch', 'length',
'embed'))) and the rules map each logical axis to mesh axes, e.g. ('batch', ('data', 'fsdp')),
('heads', 'model'). `jit` traces a step under the mesh and those rules. Without them the model's
constraints are no-ops (as in plain `model.apply` outside a step).
"""
from __future__ import annotations

import functools
import math
import numbers
import re
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sit_jax.models import vit

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Logical axes of activations, named by the model code. 'kv' is the per-head feature dimension.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp")
# The default (config.logical_axis_rules): data parallelism and FSDP split the batch of every
# activation; a 'model' axis > 1 splits attention heads and MLP features (tensor parallelism).
# Unlisted logical axes are not split.
LOGICAL_AXIS_RULES = (("batch", BATCH_AXES), ("heads", "model"), ("mlp", "model"))


def make_mesh(axis_sizes: dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all, every process) with sizes {'data': -1, 'fsdp': 1, 'model': 1}.

  One size may be -1, meaning all remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": -1, "fsdp": 1, "model": 1, **dict(axis_sizes or {})}
  unknown = set(sizes) - set(AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}: the mesh axes are {AXES}.")
  bad = {a: s for a, s in sizes.items()
         if isinstance(s, bool) or not isinstance(s, numbers.Integral) or (s < 1 and s != -1)}
  if bad:
    raise ValueError(f"Mesh axis sizes {bad}: each must be an integer >= 1, or -1 for all the "
                     "devices left.")
  shape = [int(sizes[a]) for a in AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh {sizes}.")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"Mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available; set one axis to -1.")
  # Auto axes: XLA's sharding propagation places the activations (GSPMD), rules place the state.
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_name(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def _spec_for(rule, shape, mesh: Mesh, name: str) -> P:
  if rule == "replicate" or len(shape) == 0:
    return P()
  if rule == "fsdp":
    size = mesh.shape["fsdp"]
    if size == 1:
      return P()
    # Never the layer axis of scanned blocks: each scan step would gather every layer.
    first = 1 if vit.is_scanned_layer(name) else 0
    candidates = [d for d in np.argsort(shape)[::-1]
                  if d >= first and shape[d] % size == 0 and shape[d] >= size]
    if not candidates:
      return P()
    spec = [None] * len(shape)
    spec[int(candidates[0])] = "fsdp"
    return P(*spec)
  if isinstance(rule, str):
    raise ValueError(f"Sharding rule {rule!r} for {name}: a rule is 'replicate', 'fsdp' or a "
                     "tuple with one mesh axis (a name, a tuple of names, or None) per "
                     "dimension, e.g. (None, 'model').")
  rule = tuple(rule)
  if vit.is_scanned_layer(name) and len(rule) == len(shape) - 1:
    rule = (None,) + rule
  if len(rule) != len(shape):
    raise ValueError(f"Sharding rule {rule} for {name} has {len(rule)} entries but the "
                     f"array has shape {tuple(shape)}.")
  for axis, dim in zip(rule, shape):
    if axis is not None:
      names = (axis,) if isinstance(axis, str) else tuple(axis)
      unknown = set(names) - set(mesh.shape)
      if unknown:
        raise ValueError(f"Sharding rule {rule} for {name} names unknown mesh axes "
                         f"{sorted(unknown)}: the mesh axes are {tuple(mesh.shape)}.")
      axis_size = math.prod(mesh.shape[a] for a in names)
      if dim % axis_size:
        raise ValueError(f"Sharding rule {rule} for {name}: dimension {dim} is not divisible "
                         f"by mesh axis {axis!r} of size {axis_size}.")
  return P(*rule)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) from the first matching rule."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
  used = set()

  def leaf_sharding(path, leaf):
    name = path_name(path)
    shape = getattr(leaf, "shape", ())
    for i, (pattern, rule) in enumerate(compiled):
      if pattern.search(name):
        used.add(i)
        return NamedSharding(mesh, _spec_for(rule, shape, mesh, name))
    return NamedSharding(mesh, P())

  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, tree)
  # A mistyped regex would otherwise leave its leaves replicated without a word.
  unused = [pattern for i, (pattern, _) in enumerate(rules) if i not in used]
  if unused:
    logging.warning("Sharding rules %s place no leaf (they match none, or an earlier rule "
                    "matches first); the leaves they were meant for follow the other rules.",
                    unused)
  return shardings


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract`'s leaves carrying `shardings` (a tree like it): what a
  checkpoint is restored onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays split over the batch axes of the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      host_batch)


def check_batch_size(global_batch_size: int, mesh: Mesh):
  size = data_parallel_size(mesh)
  if global_batch_size % size:
    # A resume must keep its checkpoint's batch: on devices that do not divide it (a run moved
    # from 8 devices to 6), a model axis can leave a data-parallel size that does.
    devices = mesh.devices.size
    keep = next((m for m in range(2, devices // 2 + 1) if devices % m == 0
                 and global_batch_size % (devices // m) == 0), None)
    keep = (f", or keep {global_batch_size} with a model axis: --config.mesh.model={keep} "
            f"(data-parallel size {devices // keep})") if keep and mesh.shape["model"] == 1 else ""
    raise ValueError(
        f"Global batch size {global_batch_size} is not divisible by the data-parallel size {size} "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}): use a multiple of {size}, "
        f"e.g. {max(size, global_batch_size // size * size)}{keep}.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  if jax.process_count() > 1:  # (not for --aot_topology: one process compiles for all hosts)
    check_batch_rows_per_process(mesh.devices)


def check_batch_rows_per_process(devices: np.ndarray):
  """Every process reads batch rows of its own, so none may share a batch shard with another:
  a `model` axis across processes would have each of them put its own rows where the step
  takes one replica (training went on, on different data per process). `devices`: the mesh's,
  shaped (data, fsdp, model)."""
  processes = np.vectorize(lambda d: d.process_index)(devices).reshape(-1, devices.shape[-1])
  if any(len(set(shard)) > 1 for shard in processes):
    raise ValueError(
        f"Mesh {dict(zip(AXES, devices.shape))}: the model axis spans processes, which each "
        f"read their own batch rows: make mesh.model at most the "
        f"{devices.size // len(np.unique(processes))} devices of a process (and data x fsdp a "
        "multiple of the number of processes).")


# XLA options named for one backend: config.compiler_options applies them only there, so a
# recipe's TPU options do not stop its runs on CPU or GPU.
BACKEND_OPTION_PREFIXES = {"xla_tpu_": "tpu", "xla_gpu_": "gpu", "xla_cpu_": "cpu"}


def compiler_options(text: str, platform: str | None = None) -> dict[str, bool | str]:
  """'a=false,b=2' (config.compiler_options) -> {'a': False, 'b': '2'}.

  true/false become booleans (XLA takes no text for a boolean option); every other value stays
  text, which XLA parses by the option's type (as an int 1, a string option's '1' is refused).
  With `platform` ('tpu', 'gpu', 'cpu'), the options of the other backends (xla_tpu_*,
  xla_gpu_*, xla_cpu_*) are left out; options without such a prefix always stay.
  """
  options = {}
  for item in filter(None, text.split(",")):
    name, value = item.split("=", 1)
    backend = next((b for prefix, b in BACKEND_OPTION_PREFIXES.items()
                    if name.startswith(prefix)), None)
    if platform is not None and backend not in (None, platform):
      logging.info("Compiler option %s is %s's: not applied on %s.", name, backend, platform)
      continue
    options[name] = {"true": True, "false": False}.get(value.lower(), value)
  return options


def step_compiler_options(text: str) -> dict[str, bool | str]:
  """config.compiler_options of the backend jax runs on, checked with XLA before any work."""
  options = compiler_options(text, jax.default_backend())
  check_compiler_options(options)
  return options


def check_compiler_options(options: dict, backend: str | None = None) -> None:
  """Raises, naming the option, if XLA for `backend` (default: jax's) does not know one:
  compiles an identity with them, before any real work."""
  if not options:
    return

  def compiler_options_check(x):
    return x

  try:
    jax.jit(compiler_options_check, compiler_options=options,
            backend=backend).lower(0.0).compile()
  except jax.errors.JaxRuntimeError as e:
    raise bad_compiler_option(e, backend or jax.default_backend()) or e from None


def bad_compiler_option(error: Exception, platform: str) -> ValueError | None:
  """The one-line error for an option XLA does not know or a value it cannot take (None for any
  other error)."""
  first_line = str(error).splitlines()[0]
  if "No such compile option" in first_line:
    return ValueError(f"config.compiler_options: {first_line} for {platform} (check the name; "
                      f"an option of one backend needs its prefix, xla_tpu_, xla_gpu_ or "
                      f"xla_cpu_, to be left out on the others).")
  if re.search(r"is not a valid \w+ value", first_line):
    return ValueError(f"config.compiler_options: {first_line} (a boolean option takes true or "
                      f"false).")
  return None


def jit(fn, mesh: Mesh, logical_axis_rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
        **jit_kwargs):
  """jax.jit of `fn`, traced under `mesh` and the logical axis rules of the activations.

  The model's nn.with_logical_constraint calls then pin each activation to the mesh axes the
  rules give its logical axes: the batch of every activation stays split over (data, fsdp) even
  where the parameters are split along another dimension (FSDP), which sharding propagation
  alone would follow instead.
  """
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in logical_axis_rules)
  unknown = {name for name, _ in rules} - set(LOGICAL_AXES)
  if unknown:
    raise ValueError(f"logical_axis_rules name unknown logical axes {sorted(unknown)}; the "
                     f"model's logical axes are {LOGICAL_AXES}.")
  for name, axes in rules:
    missing = set((axes,) if isinstance(axes, str) else axes or ()) - set(AXES)
    if missing:
      raise ValueError(f"logical_axis_rules map {name!r} to unknown mesh axes "
                       f"{sorted(missing)}: the mesh axes are {AXES}.")

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kwargs)

