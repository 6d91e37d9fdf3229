"""The command line and the config, checked before any work: each mistake is one line that
names the key and says what it must be.

    argv = config_check.check_command_line(argv)   # before absl parses the flags
    config_check.check(config)                     # the final config, before the run starts

`check_command_line` loads the --config file as ml_collections' config_flags will (a missing
file, a syntax error or an unknown `:argument` is a `ConfigError`, not a traceback inside flag
parsing) and checks that every --config.KEY override names a key of that config, suggesting the
nearest keys otherwise.

`check` looks every key of the config up in RULES, a table of what each value must be (its
type and range or choices), then runs the cross-key CHECKS. Experiments have different keys
(pretraining has `gmml.*`, the transfer configs `head.*`, `knn.*`, ...): a rule applies where
its key exists, so one table serves them all. To validate a new key, add a row to RULES (the
vocabulary: `integer`, `number`, `one_of`, `subset`, `interval`, `numbers`, BOOL, TEXT, ...);
tests/test_configs.py checks that every key of every config in configs/ has one.
`unread_overrides` names the --config.KEY overrides that the experiment does not read (main.py
warns). Nothing here imports jax.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.machinery
import importlib.util
import os
import re
from typing import Any, Callable, Sequence

import ml_collections

from sit_jax.models import variants

PRETRAIN_EXPERIMENTS = ("gmml", "contrastive", "sit")
TRANSFER_EXPERIMENTS = ("finetune", "linear", "knn", "multilabel", "segment", "fewshot")


class ConfigError(ValueError):
  """A bad config file, config argument, key or value; the message is one line."""


# ---------------------------------------------------------------------------------------------
# The vocabulary of the table.


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ok(value)` says whether a value is allowed; `must` says what it must be, in words."""
  ok: Callable[[Any], bool]
  must: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  """An int or a finite float (not a bool, not nan or inf)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")


def _bounds(lo, hi, lo_open, hi_open) -> tuple[Callable[[Any], bool], str]:
  def inside(v):
    return ((lo is None or (v > lo if lo_open else v >= lo)) and
            (hi is None or (v < hi if hi_open else v <= hi)))
  if lo is not None and hi is not None:
    words = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  elif lo is not None:
    words = f"{'>' if lo_open else '>='} {lo}"
  elif hi is not None:
    words = f"{'<' if hi_open else '<='} {hi}"
  else:
    words = ""
  return inside, words


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
  inside, words = _bounds(lo, hi, False, False)
  return Rule(lambda v: _is_int(v) and inside(v), f"an integer {words}".strip())


def number(lo: float | None = None, hi: float | None = None, *, lo_open=False,
           hi_open=False) -> Rule:
  inside, words = _bounds(lo, hi, lo_open, hi_open)
  return Rule(lambda v: _is_number(v) and inside(v), f"a number {words}".strip())


def one_of(*choices) -> Rule:
  return Rule(lambda v: isinstance(v, type(choices[0])) and v in choices,
              f"one of {', '.join(map(repr, choices))}")


def subset(*choices) -> Rule:
  """A non-empty tuple of distinct `choices`."""
  return Rule(lambda v: isinstance(v, (tuple, list)) and 0 < len(set(v)) == len(v) and
              set(v) <= set(choices),
              f"a non-empty tuple of distinct values from {', '.join(map(repr, choices))}, "
              # 'zeros,noise' on the command line is one string: show the quoted form.
              f"e.g. \"({', '.join(map(repr, choices[:2]))})\"")


def interval(lo: float, hi: float | None = None, *, lo_open=False) -> Rule:
  """(a, b) with lo <= a <= b <= hi: a range such as crop_scale or blur_sigma."""
  inside, words = _bounds(lo, hi, lo_open, False)
  return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and
              all(_is_number(x) and inside(x) for x in v) and v[0] <= v[1],
              f"a pair (low, high) with low <= high, both {words}")


def numbers(item: Rule, *, min_len: int = 0) -> Rule:
  """A tuple of values that each satisfy `item`."""
  return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) >= min_len and
              all(item.ok(x) for x in v),
              f"a tuple{' (non-empty)' if min_len else ''} of values, each {item.must}")


def either(*rules: Rule) -> Rule:
  return Rule(lambda v: any(r.ok(v) for r in rules), " or ".join(r.must for r in rules))


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
COMPILER_OPTIONS = Rule(
    lambda v: isinstance(v, str) and re.fullmatch(r"(\w+=[^,=\s]+(,\w+=[^,=\s]+)*)?", v) is not None,
    "'' or comma-separated name=value XLA options, e.g. 'xla_cpu_enable_fast_math=false'")
NAME = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
FRACTION = number(0, 1)  # also a probability
POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)
COUNT = integer(1)
MESH_AXIS = Rule(lambda v: _is_int(v) and (v == -1 or v >= 1),
                 "an integer >= 1, or -1 for all the devices left")


def _pairs(must: str) -> Rule:
  """A tuple of (name, mesh axes) pairs: sit_jax/sharding.py's rules, where mesh axes are None,
  an axis name or a tuple of them."""
  def axes(v):
    return v is None or isinstance(v, str) or (
        isinstance(v, (tuple, list)) and all(a is None or isinstance(a, str) for a in v))
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(
      isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and axes(p[1])
      for p in v), must)


SHARDING_RULES = _pairs("a tuple of (regex, rule) pairs, e.g. configs/common.py's REPLICATED, "
                        "FSDP or TENSOR_PARALLEL")
LOGICAL_AXIS_RULES = _pairs("a tuple of (logical axis, mesh axes) pairs, e.g. "
                            "sit_jax/sharding.py's LOGICAL_AXIS_RULES")
VARIANT = Rule(lambda v: isinstance(v, str) and bool(variants.PATTERN.fullmatch(v)),
               f"a ViT variant 'NAME/PATCH' with NAME one of {', '.join(variants.VARIANTS)}, "
               "e.g. 'S/16'")
FEATURES = one_of("cls", "mean", "cls+mean")
RESIZE_MODE = one_of("center_crop", "resize")

# ---------------------------------------------------------------------------------------------
# What every key must be. A key that a config does not have is skipped.

RULES: dict[str, Rule] = {
    "experiment": one_of(*PRETRAIN_EXPERIMENTS, *TRANSFER_EXPERIMENTS),
    # jax.random.PRNGKey keeps 32 bits: seed 2**32 would initialise and mask as seed 0 does.
    "seed": integer(0, 2**32 - 1),
    "init": TEXT,
    "init_weights": one_of("student", "teacher"),
    "dataset": NAME,
    # data.* (sit_jax/data.py)
    "data.source": NAME,
    "data.split": NAME,
    "data.train_split": NAME,
    "data.val_split": TEXT,
    "data.test_split": NAME,
    "data.data_dir": TEXT,
    "data.image_size": COUNT,
    "data.crop_scale": interval(0, 1, lo_open=True),
    "data.interpolation": one_of("bicubic_antialias", "bicubic", "bilinear"),
    "data.flip": BOOL,
    "data.resize_mode": RESIZE_MODE,
    "data.global_batch_size": COUNT,
    "data.engine": one_of("grain", "tf"),
    "data.resize_on": one_of("auto", "host", "device"),
    "data.decoded_size": integer(0),
    "data.workers": integer(0),
    "data.num_classes": COUNT,  # segmentation: the classes of a folder's masks.
    "eval_batch_size": COUNT,
    # augment.*: pretraining's photometric preset, transfer's DeiT regularisation.
    "augment.preset": one_of("sit", "gmml", "none"),
    "augment.blur_sigma": interval(0, lo_open=True),
    "augment.randaugment": BOOL,
    "augment.ra_num_ops": integer(0),
    "augment.ra_magnitude": number(0, 10),
    "augment.ra_magnitude_std": NON_NEGATIVE,
    "augment.erase_prob": FRACTION,
    "augment.mixup_alpha": NON_NEGATIVE,
    "augment.cutmix_alpha": NON_NEGATIVE,
    "augment.mix_prob": FRACTION,
    "augment.switch_prob": FRACTION,
    "augment.label_smoothing": number(0, 1, hi_open=True),
    # model.*
    "model.variant": VARIANT,
    "model.drop_path_rate": number(0, 1, hi_open=True),
    "model.recons_blocks": numbers(COUNT),
    "model.dtype": one_of("float32", "bfloat16", "float16"),
    "model.attention": one_of("", "xla", "cudnn"),
    "model.remat": BOOL,
    "model.qkv_per_head": BOOL,
    "model.recompute_gelu": BOOL,
    "model.reshard_after_forward": BOOL,
    "model.scan_layers": BOOL,
    "model.standardize_input": BOOL,
    "model.recon_hidden": integer(0),
    "model.recon_depth": COUNT,
    "model.proj_hidden": COUNT,
    "model.proj_dim": COUNT,
    # gmml.* (sit_jax/gmml.py)
    "gmml.enabled": BOOL,
    "gmml.ratio": FRACTION,
    "gmml.replace_ratio": FRACTION,
    "gmml.fills": subset("noise", "zeros", "replace"),
    "gmml.replace_prob": FRACTION,
    "gmml.align": COUNT,
    "gmml.donor_group": integer(0),
    "loss.alpha": NON_NEGATIVE,
    "loss.temperature": POSITIVE,
    "loss.recon_all_pixels": BOOL,
    "teacher.momentum": FRACTION,
    # optim.* (sit_jax/optim.py; transfer: sit_jax/transfer/supervised.py)
    "optim.name": one_of("adamw", "sgd"),
    # None only in segment configs: each head's own rate, seg.base_lr (see _unset_rate).
    "optim.base_lr": either(POSITIVE, Rule(lambda v: v is None, "unset")),
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.layer_decay": number(0, 1, lo_open=True),
    "optim.clip_norm": NON_NEGATIVE,
    "optim.b1": number(0, 1, hi_open=True),
    "optim.b2": number(0, 1, hi_open=True),
    "optim.eps": POSITIVE,
    "optim.momentum": number(0, 1, hi_open=True),
    # The length of a run.
    "total_epochs": NON_NEGATIVE,
    "total_steps": integer(0),
    "num_train_examples": integer(0),
    # Devices.
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.model": MESH_AXIS,
    "sharding_rules": SHARDING_RULES,
    "compiler_options": COMPILER_OPTIONS,
    "logical_axis_rules": LOGICAL_AXIS_RULES,
    # Logging, evaluation, checkpoints.
    "log_every": COUNT,
    "image_every": COUNT,
    "eval_every": integer(0),
    "eval.source": TEXT,
    "eval.train_split": TEXT,
    "eval.test_split": NAME,
    "eval.resize_mode": RESIZE_MODE,
    "eval.features": FEATURES,
    "eval.k": COUNT,
    "eval.temperature": POSITIVE,
    "eval.batch_size": COUNT,
    "eval.fewshot_shots": numbers(COUNT),
    "eval.fewshot_seeds": COUNT,
    "eval.fewshot_l2": POSITIVE,
    "checkpoint_every": COUNT,
    "keep_checkpoints": COUNT,
    "export_backbone": BOOL,
    # Transfer (configs/transfer_common.py and each transfer config).
    "head.features": FEATURES,
    "head.last_blocks": COUNT,
    "tsne_points": either(one_of(0), integer(3)),  # t-SNE of fewer points cannot run
    "baselines": BOOL,
    "feature_cache": TEXT,
    "knn.k": either(COUNT, numbers(COUNT, min_len=1)),
    "knn.temperature": POSITIVE,
    "knn.chunk_size": COUNT,
    "linear.cache_features": BOOL,
    "linear.normalize_features": BOOL,
    "linear.stats_examples": COUNT,
    "linear.solver": one_of("lbfgs", "sgd"),
    "linear.l2": either(NON_NEGATIVE, numbers(NON_NEGATIVE, min_len=1)),
    "linear.val_fraction": number(0, 1, hi_open=True),
    "linear.max_iter": COUNT,
    "linear.tol": POSITIVE,
    "multilabel.frozen": BOOL,
    "voc07": BOOL,
    "seg.blocks": numbers(COUNT),
    "seg.cls": BOOL,
    "seg.head": one_of("linear", "mlp"),
    "seg.features": one_of("backbone", "raw_pixels"),
    "seg.hidden": COUNT,
    "seg.lr_scales": numbers(POSITIVE, min_len=1),
    "seg.base_lr.linear": POSITIVE,
    "seg.base_lr.mlp": POSITIVE,
    "seg.pictures": integer(0),
    "fewshot.shots": numbers(COUNT, min_len=1),
    "fewshot.seeds": COUNT,
    "fewshot.l2": numbers(POSITIVE, min_len=1),  # 0: the centred Gram matrix is singular
}


def _length_of_run(config) -> str | None:
  if config.get("total_steps", 1) <= 0 and config.get("total_epochs", 1) <= 0:
    return ("total_steps and total_epochs are both 0: set --config.total_steps or "
            "--config.total_epochs to a positive number.")
  return None


def _decoded_size(config) -> str | None:
  data = config.get("data") or {}
  size = data.get("decoded_size", 0)
  views = 2 if config.get("experiment") in PRETRAIN_EXPERIMENTS else 1
  if data.get("resize_on") != "host" and 0 < size < views * data.get("image_size", 0):
    return (f"data.decoded_size {size} cannot hold {views} views of data.image_size "
            f"{data.image_size} side by side: set it to 0 (automatic) or at least "
            f"{views * data.image_size}.")
  return None


def _donor_group(config) -> str | None:
  group = (config.get("gmml") or {}).get("donor_group", 0)
  batch = (config.get("data") or {}).get("global_batch_size", 0)
  if group and batch > group and batch % group:
    return (f"gmml.donor_group {group} does not divide data.global_batch_size {batch} (the "
            f"images of each view): set --config.gmml.donor_group to a divisor of {batch}, "
            f"or 0 for the whole view.")
  return None


def _nothing_to_learn(config) -> str | None:
  # GMML's loss is alpha x the reconstruction: at 0 every gradient is 0 and only weight decay
  # moves the weights, for the whole run.
  if config.get("experiment") == "gmml" and (config.get("loss") or {}).get("alpha", 1) == 0:
    return ("loss.alpha=0 with config.experiment='gmml': the reconstruction, weighted by "
            "alpha, is its only loss, so nothing would be learnt; set --config.loss.alpha to a "
            "positive number (configs/gmml_vits.py: 1). The contrastive loss alone: "
            "configs/contrastive_vits.py.")
  return None


def _engine_source(config) -> str | None:
  data = config.get("data") or {}
  kind = str(data.get("source", "")).partition(":")[0]
  if data.get("engine", "grain") != "grain" and kind in ("folder", "embedded"):
    return (f"data.engine={data.engine!r} reads TFDS datasets only, and data.source is "
            f"{data.source!r}: set --config.data.engine=grain (the default) for {kind} sources.")
  return None


def _unset_rate(config) -> str | None:
  if "optim" in config and config.optim.get("base_lr", 1) is None and "seg" not in config:
    return "optim.base_lr is unset: set --config.optim.base_lr to a positive number."
  return None


# The sections each experiment reads: a config switched to another experiment by
# --config.experiment lacks some (a traceback seconds into the run), and the config file of each.
SECTIONS = {**{e: ("gmml", "loss", "teacher") for e in PRETRAIN_EXPERIMENTS},
            "finetune": ("head", "augment", "optim"), "linear": ("head", "linear", "optim"),
            "knn": ("head", "knn"), "fewshot": ("head", "fewshot"),
            "multilabel": ("head", "multilabel", "optim"), "segment": ("seg", "optim")}
CONFIG_FILES = {"sit": "sit_vits.py", "gmml": "gmml_vits.py",
                "contrastive": "contrastive_vits.py",
                **{e: f"{e}.py" for e in TRANSFER_EXPERIMENTS}}


def _experiment_sections(config) -> str | None:
  experiment = config.get("experiment")
  missing = [s for s in SECTIONS.get(experiment, ()) if s not in config]
  if missing:
    return (f"config.experiment={experiment!r} needs config.{missing[0]}, which this config "
            f"does not have: start from configs/{CONFIG_FILES[experiment]} instead of setting "
            "--config.experiment.")
  if experiment == "multilabel":  # frozen: the linear probe's recipe, else fine-tuning's
    frozen = bool(config.multilabel.get("frozen"))
    needed = "linear" if frozen else "augment"
    if needed not in config:
      return (f"config.multilabel.frozen={frozen} needs config.{needed}, the recipe of that "
              f"mode: use the config argument configs/multilabel.py:frozen={frozen} instead "
              "of --config.multilabel.frozen.")
  return None


def _mesh_wildcards(config) -> str | None:
  mesh = config.get("mesh") or {}
  wild = [f"mesh.{a}" for a, size in mesh.items() if size == -1]
  if len(wild) > 1:
    return (f"{' and '.join(wild)} are {'both' if len(wild) == 2 else 'all'} -1 (all the "
            "devices left), and at most one may be: set the others to a size (FSDP over every "
            "device: mesh.data=1, mesh.fsdp=-1, as the config argument fsdp sets).")
  return None


def _architecture(config) -> str | None:
  """What the ViT of model.variant cannot do: an image size off its patch grid, blocks past its
  depth, a tensor-parallel split its heads or features cannot take. Transfer runs from a
  checkpoint (config.init) take its architecture instead: nothing to check here."""
  match = variants.PATTERN.fullmatch(str((config.get("model") or {}).get("variant", "")))
  if not match or config.get("init"):
    return None
  variant = match.group(0)
  width, depth, heads = variants.VARIANTS[match.group(1)]
  patch = int(match.group(2))
  of = f"the {depth} blocks of model.variant {variant!r}"
  if config.get("init") is not None:
    of += " (the random-init backbone: config.init is '')"
  try:
    variants.check_image_size((config.get("data") or {}).get("image_size", patch), patch)
  except ValueError as e:
    return f"data.image_size, model.variant {variant!r}: {e}"
  for key in ("model.recons_blocks", "seg.blocks"):
    section, name = key.split(".")
    blocks = (config.get(section) or {}).get(name) or ()
    if any(not 1 <= b <= depth for b in blocks):
      return (f"config.{key}={tuple(blocks)} names blocks outside 1..{depth}, {of}: set "
              f"--config.{key} within them.")
  last = (config.get("head") or {}).get("last_blocks", 1)
  if last > depth:
    return (f"config.head.last_blocks={last} is more than {of}: set --config.head.last_blocks "
            f"to at most {depth}.")
  mesh, rules = config.get("mesh") or {}, dict(config.get("logical_axis_rules") or ())
  dims, splits = variants.parallel_dims(width, heads), {}
  for logical in dims:
    axes = rules.get(logical) or ()
    axes = (axes,) if isinstance(axes, str) else tuple(a for a in axes if a)
    if all(mesh.get(a, 1) > 0 for a in axes):  # a -1 (all the devices left): they decide
      splits[logical] = {a: mesh.get(a, 1) for a in axes}
  message = variants.uneven_split(f"model.variant {variant!r}", dims, splits)
  if message and any("model" in axes for axes in splits.values()):
    message += " (The config argument model=N sets mesh.model.)"
  return message


def _mean_of_blocks(config) -> str | None:
  head = config.get("head") or {}
  last = head.get("last_blocks", 1)
  if head.get("features") == "mean" and last > 1:
    return (f"config.head.features='mean' with head.last_blocks={last}: several blocks "
            "concatenate their CLS tokens; set --config.head.features=cls (or cls+mean) or "
            "--config.head.last_blocks=1.")
  return None


def _attention_dtype(config) -> str | None:
  model = config.get("model") or {}
  if model.get("attention") == "cudnn" and model.get("dtype") not in ("bfloat16", "float16"):
    return (f"model.attention='cudnn' (cuDNN's fused attention) needs model.dtype bfloat16 or "
            f"float16, not {model.get('dtype')!r}: set --config.model.dtype=bfloat16, or "
            "--config.model.attention='' (XLA's).")
  return None


def _float16_training(config) -> str | None:
  # No loss scaling: float16's smallest step is 2**-24 (6e-8). At ImageNet scale each pixel's
  # reconstruction gradient (1 / the masked values: 3.1e-8 for SiT) becomes 6e-8 or 0, and a
  # fine-tuning batch of 1,024 leaves every residual-stream gradient below float16's normal range.
  experiment = config.get("experiment")
  trains_backbone = (experiment in (*PRETRAIN_EXPERIMENTS, "finetune") or (
      experiment == "multilabel" and not (config.get("multilabel") or {}).get("frozen")))
  if (config.get("model") or {}).get("dtype") == "float16" and trains_backbone:
    return (f"model.dtype='float16' cannot train ({experiment}): there is no loss scaling, so "
            "gradients near float16's smallest step (6e-8) are rounded to it or to 0 (at "
            "ImageNet scale every reconstruction gradient, most of fine-tuning's); set "
            "--config.model.dtype=bfloat16 (or float32). float16 serves the evaluations of a "
            "frozen backbone.")
  return None


def _validation_split(config) -> str | None:
  # Without it the run failed after extracting every train feature (hours on ImageNet).
  chooses = {"knn": "k", "fewshot": "l2", "segment": "the head's rate (seg.lr_scales)"}.get(
      config.get("experiment"))
  if chooses and not (config.get("data") or {}).get("val_split", "unset"):
    return (f"data.val_split is empty: {config.experiment} chooses {chooses} on it; set a "
            "held-out slice, e.g. --config.data.val_split='train[98%:]' with "
            "--config.data.train_split='train[:98%]'.")
  return None


def _init_exists(config) -> str | None:
  init = config.get("init") or ""
  if not init and config.get("init_weights") == "teacher":
    return ("config.init_weights='teacher' needs a pretrained checkpoint: config.init is '' "
            "(random init), which has no teacher; set --config.init to a SiT or contrastive "
            "pretraining workdir.")
  if not init or "://" in init:
    return None
  if not os.path.exists(init):
    return (f"config.init={init!r} does not exist: set --config.init to a pretraining workdir, "
            "a checkpoint step directory or a backbone export ('' for random init).")
  if os.path.isfile(init):
    return (f"config.init={init!r} is a file; PyTorch and safetensors weights are converted "
            f"first: python -m sit_jax.convert to-jax --input {init} --output DIR, then "
            "--config.init=DIR.")
  return None


# Rules across keys: each returns the one-line message of a mistake, or None.
CHECKS: list[Callable[[ml_collections.ConfigDict], str | None]] = [
    _length_of_run, _nothing_to_learn, _decoded_size, _donor_group, _engine_source, _unset_rate,
    _experiment_sections,
    _mesh_wildcards, _architecture, _mean_of_blocks, _attention_dtype, _float16_training,
    _validation_split,
    _init_exists]


def flatten(config) -> dict[str, Any]:
  """{'optim.base_lr': 5e-4, ...}: the leaves of a (nested) ConfigDict or dict."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first value that breaks a rule of RULES or CHECKS."""
  for key, value in flatten(config).items():
    rule = RULES.get(key)
    if rule is not None and not rule.ok(value):
      raise ConfigError(f"config.{key}={value!r} is invalid: it must be {rule.must} "
                        f"(set --config.{key}).")
  for cross_check in CHECKS:
    message = cross_check(config)
    if message:
      raise ConfigError(message)


def _unread(config) -> dict[str, str]:
  """The settings of a config that its run does not read ('eval.': a section), each with why
  not. Pretraining configs share one set of keys (configs/common.py)."""
  unread = {}
  if config.get("total_steps", 0) > 0:  # sit_jax/optim.py:schedule_lengths
    unread["total_epochs"] = (f"total_steps={config.total_steps} sets the run's length "
                              "(--config.total_steps=0 runs total_epochs)")
  experiment = config.get("experiment")
  if experiment not in PRETRAIN_EXPERIMENTS:
    return {**unread, **_unread_on_frozen_features(config)}
  if experiment == "contrastive":
    unread.update(dict.fromkeys(
        ("loss.alpha", "loss.recon_all_pixels", "model.recons_blocks", "model.recon_hidden",
         "model.recon_depth", "image_every"),
        "config.experiment='contrastive' has no reconstruction"))
    if not (config.get("gmml") or {}).get("enabled"):
      unread["gmml."] = ("config.experiment='contrastive' trains on clean views "
                         "(--config.gmml.enabled=True corrupts them)")
  fills = tuple((config.get("gmml") or {}).get("fills") or ())
  if "replace" not in fills:  # sit_jax/gmml.py: which of these each fill reads
    unread.update(dict.fromkeys(("gmml.replace_ratio", "gmml.replace_prob", "gmml.donor_group"),
                                f"gmml.fills={fills} has no 'replace'"))
  elif len(fills) == 1:
    unread.update(dict.fromkeys(("gmml.ratio", "gmml.replace_prob"),
                                "gmml.fills=('replace',) corrupts by gmml.replace_ratio alone"))
  if experiment == "gmml":
    unread.update(dict.fromkeys(
        ("loss.temperature", "teacher.", "model.proj_hidden", "model.proj_dim"),
        "config.experiment='gmml' has no contrastive loss or teacher"))
  if not config.get("eval_every"):
    unread["eval."] = "the k-NN monitor is off (eval_every=0)"
  return unread


def _unread_on_frozen_features(config) -> dict[str, str]:
  """What the evaluations of a frozen backbone do not read (sit_jax/transfer/knn.py, fewshot.py,
  linear.py): k-NN and few-shot train nothing; the cached probe fits its head on the evaluation
  view's features, by L-BFGS on all of them at once or by SGD with config.optim; the augmented
  probe trains by SGD with config.optim."""
  experiment = config.get("experiment")
  # Fine-tuning's and segmentation's training steps take config.compiler_options; the frozen
  # protocols' small programs (features, heads, the L-BFGS solve) are compiled with XLA's defaults.
  not_compiled = {"compiler_options": f"config.experiment={experiment!r} compiles no training "
                                      "step with config.compiler_options (fine-tuning and "
                                      "segmentation do)"}
  if experiment in ("knn", "fewshot"):
    return {**not_compiled,
            **dict.fromkeys(("total_epochs", "total_steps"),
                            f"config.experiment={experiment!r} trains nothing"),
            **dict.fromkeys(("data.crop_scale", "data.flip"),
                            f"config.experiment={experiment!r} reads every split in its "
                            "evaluation view (data.resize_mode), unaugmented"),
            "data.global_batch_size": f"config.experiment={experiment!r} extracts features "
                                      "in batches of eval_batch_size"}
  frozen = (config.get("multilabel") or {}).get("frozen")
  probe = config.get("linear") if experiment == "linear" or frozen else None
  if probe is None:
    return {}
  if not probe.get("cache_features"):
    # The baselines rows fit the cached L-BFGS probe, which reads the rest.
    keys = ("linear.solver",) + (() if config.get("baselines") else (
        "linear.l2", "linear.val_fraction", "linear.max_iter", "linear.tol"))
    return {**not_compiled, **dict.fromkeys(keys, "linear.cache_features=False trains the head "
                                                  "by SGD on augmented crops with config.optim")}
  unread = {**not_compiled,
            **dict.fromkeys(("data.crop_scale", "data.flip", "linear.stats_examples"),
                            "linear.cache_features=True fits the head on features of the "
                            "evaluation view (data.resize_mode), unaugmented")}
  if probe.get("solver") == "lbfgs":
    unread.update(dict.fromkeys(
        ("optim.", "total_epochs", "total_steps", "data.global_batch_size"),
        "linear.solver='lbfgs' fits the head on all the train features at once, to "
        "convergence (linear.max_iter, linear.tol), its l2 chosen among linear.l2"))
  else:
    unread.update(dict.fromkeys(("linear.l2", "linear.val_fraction", "linear.max_iter",
                                 "linear.tol"),
                                "linear.solver='sgd' trains the head with config.optim"))
  return unread


def unread_overrides(config, overrides) -> list[str]:
  """A warning for each --config.KEY of `overrides` that the run does not read: accepted, it
  would be in config.json as though it had shaped the run."""
  unread, warnings = _unread(config), []
  for key, value in overrides.items():
    why = [why for prefix, why in unread.items() if key == prefix or key.startswith(prefix)]
    if why and key != "gmml.enabled":
      warnings.append(f"--config.{key}={value!r} has no effect: {why[0]}.")
  return warnings


# ---------------------------------------------------------------------------------------------
# The command line.

_CONFIG_FLAG = re.compile(r"^--?config(=|$)")
_OVERRIDE_FLAG = re.compile(r"^--?(?:no)?config\.([^=]+)")


# sit_jax's configs, installed beside it (setup.py). Not `import configs`: a project's own
# `configs` package in the working directory comes first on sys.path and hides it.
INSTALLED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs")


def resolve(path: str) -> str:
  """A config path as given if it exists, else 'configs/NAME' in the installed `configs`
  package: after a `pip install`, `--config=configs/sit_vits.py` works from any directory."""
  installed = _installed(path)
  return installed if installed and not os.path.exists(path) and os.path.exists(installed) \
      else path


def _installed(path: str) -> str | None:
  """'configs/NAME' in the installed `configs` package, or None."""
  parts = os.path.normpath(path).split(os.sep)
  return os.path.join(INSTALLED_CONFIGS, *parts[1:]) if parts[0] == "configs" else None


def _hidden_configs() -> str:
  """Why `from configs import common` failed where another `configs` package hides sit_jax's."""
  spec = importlib.util.find_spec("configs")
  found = spec and spec.submodule_search_locations and list(spec.submodule_search_locations)[0]
  if not found or os.path.realpath(found) == os.path.realpath(INSTALLED_CONFIGS):
    return ""
  return (f"; `import configs` finds {found}, which hides sit_jax's configs "
          f"({INSTALLED_CONFIGS}): run from a directory without a `configs` package.")


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of 'path/to/config.py[:argument]', loaded as config_flags loads it."""
  path, colon, argument = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path} not found{_nearest_files(path)}")
  if path.endswith(".json"):
    raise ConfigError(f"Config file {path} is JSON: --config takes a Python config file "
                      "(configs/NAME.py[:ARGUMENT], or a copy of one); a workdir's config.json "
                      "is the record of its run, not a config file.")
  # As config_flags loads it: a file of Python source whatever its name ends in.
  loader = importlib.machinery.SourceFileLoader("_sit_jax_config", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"Syntax error in {path} line {e.lineno}: {e.msg}.") from e
  except Exception as e:  # an import error, or any mistake at the top of the config file
    hidden = _hidden_configs() if isinstance(e, ImportError) else ""
    raise ConfigError(f"Config file {path}: {_one_line(e)}{hidden}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"Config file {path} has no get_config() function.")
  try:
    config = module.get_config(*([argument] if colon else []))
  except Exception as e:  # e.g. an unknown config argument (configs/common.py:parse_arg)
    raise ConfigError(f"--config={spec}: {_one_line(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() of {path} returned {type(config).__name__}, "
                      "not a ConfigDict.")
  return config


def check_command_line(argv: Sequence[str]) -> list[str]:
  """Checks --config and its --config.KEY overrides; returns argv with the config path resolved
  (see `resolve`). Raises ConfigError. Without --config it changes nothing: absl reports that."""
  argv = list(argv)
  given = [i for i, arg in enumerate(argv) if _CONFIG_FLAG.match(arg)]
  if len(given) > 1:  # absl would take the last, with the overrides checked against the first
    files = [argv[i].partition("=")[2] if "=" in argv[i] else " ".join(argv[i + 1:i + 2])
             for i in given]
    raise ConfigError(f"--config is given {len(given)} times ({', '.join(files)}): give one "
                      "config file; --config.KEY=VALUE changes its settings.")
  for i, arg in enumerate(argv):
    if _CONFIG_FLAG.match(arg):
      if "=" in arg:
        flag, spec = arg.split("=", 1)
      elif i + 1 < len(argv):  # '--config FILE'
        flag, spec = arg, argv.pop(i + 1)
      else:
        return argv
      path, colon, argument = spec.partition(":")
      spec = resolve(path) + colon + argument
      argv[i] = f"{flag}={spec}"
      config = load(spec)
      for override in argv:
        match = _OVERRIDE_FLAG.match(override)
        if match:
          check_key(config, match.group(1), override)
      return argv
  return argv


def check_key(config: ml_collections.ConfigDict, key: str, flag: str = "") -> None:
  """Raises ConfigError, with the nearest valid keys, if `key` ('optim.base_lr') is not one."""
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    name = part.split("[")[0]  # 'blocks[0]': an item of a tuple
    if not (isinstance(node, (ml_collections.ConfigDict, dict)) and name in node):
      break
    node = node[name]
  else:
    if isinstance(node, (ml_collections.ConfigDict, dict)):  # it would drop the keys it leaves out
      raise ConfigError(f"config.{key} is a section: set its keys one by one "
                        f"({', '.join(f'--config.{key}.{k}' for k in sorted(node)[:3])}, ...).")
    return
  # A misspelt name is matched within its section: the shared 'optim.' would make every optim
  # key look close to any misspelt one.
  if depth == len(parts) - 1 and isinstance(node, (ml_collections.ConfigDict, dict)):
    section, names = ".".join(parts[:-1]), sorted(node)
    nearest = [f"{section}.{n}" if section else n
               for n in difflib.get_close_matches(parts[-1], names, n=3)]
  else:  # a misspelt section
    section, names = "", sorted(config)
    nearest = difflib.get_close_matches(key, sorted(flatten(config)), n=3)
  hint = (f"did you mean {' or '.join(nearest)}?" if nearest else
          f"the keys of {section or 'the config'} are {', '.join(names)}.")
  raise ConfigError(f"Unknown config key {key}{f' ({flag})' if flag else ''}: {hint}")


def _nearest_files(path: str) -> str:
  """'; did you mean configs/sit_vits.py?', or the configs there are."""
  directory = os.path.dirname(path) or "."
  if not os.path.isdir(directory):
    directory = os.path.dirname(_installed(path) or "")
  names = sorted(n for n in os.listdir(directory) if n.endswith(".py") and n != "__init__.py") \
      if os.path.isdir(directory) else []
  nearest = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.8)
  if nearest:
    return f"; did you mean {os.path.join(os.path.dirname(path), nearest[0])}?"
  return f"; the configs there are {', '.join(names)}." if names else "."


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"
