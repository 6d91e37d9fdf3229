"""Checkpoint conversion between PyTorch ViTs (timm, DINO, SiT, GMML) and sit_jax backbones.

    # PyTorch -> a sit_jax backbone export, which every transfer config takes as --config.init
    python -m sit_jax.convert to-jax --input dino_deitsmall16_pretrain.pth --output /ckpt/dino_s16
    # sit_jax (a pretraining or fine-tuning workdir, checkpoint step or backbone export) -> timm
    python -m sit_jax.convert to-timm --input /tmp/sit_local --output /tmp/sit_local.safetensors

to-jax reads .pth/.pt (torch.load, weights only) or .safetensors. It unwraps training
checkpoints ('teacher'/'student' as in DINO and SiT, GMML's 'SiT_model', 'model', ...), strips the
'module.' / 'backbone.' prefixes, drops classification and SSL heads (head.*, head_*,
pre_logits.*) with a warning, and infers the architecture from the shapes: width from cls_token,
depth from the number of blocks, patch size from patch_embed.proj.weight, image size from the
position-embedding grid times the patch size, heads from --num_heads or the standard table.
Anything else (tokens besides CLS: distillation, registers; layer scale, fc_norm, ...) is an
error naming the keys. The export goes to a new or empty directory.

to-timm writes a state dict that timm's `VisionTransformer` loads with strict=True, and prints the
PyTorch lines that load it and compute what sit_jax computes: a backbone's CLS features, or the
logits of a fine-tuned classifier (a configs/finetune.py or fine-tuning multilabel.py workdir):
head.weight and head.bias, pooled as the run's head.features (which the step's metadata records; a
step saved before 2026-12-06 leaves it to its run's config.json), 'cls' (timm's global_pool='token')
or 'mean' (global_pool='avg', fc_norm=False); for 'cls+mean', which timm has no pooling for, a
torch.nn.Linear on the concatenated tokens. For a model.standardize_input backbone the lines
standardise timm's input as sit_jax does. A .safetensors file keeps that setting in its
metadata, which to-jax restores (dropping the classifier). A frozen-backbone run (linear probe,
k-NN, few-shot, segmentation) holds no backbone of its own: to-timm names the one it read.
.safetensors needs only `safetensors`; .pth/.pt need torch.
"""
from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Mapping

import numpy as np
from absl import logging

from sit_jax.models import vit

# Wrappers of a state dict inside training checkpoints, tried in this order ('SiT_model': the
# GMML authors' main.py).
WRAPPERS = ("model", "state_dict", "model_state", "model_state_dict", "module", "net", "network",
            "params", "SiT_model")
HEAD_PREFIXES = ("head.", "head_", "pre_logits.")
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
# Where to-timm keeps, in a .safetensors file's metadata (which timm ignores), the settings that
# travel with the parameters (vit.PARAMETER_KEYS, as JSON), so that to-jax restores them.
SETTINGS_METADATA = "sit_jax.model"
# Tokens besides CLS, which sit_jax's backbone does not have, by their names in their authors' code.
EXTRA_TOKENS = {"dist_token": "DeiT's distillation token", "reg_token": "timm's register tokens",
                "register_tokens": "DINOv2's register tokens",
                "rot_token": "SiT v1's rotation token",
                "contrastive_token": "SiT v1's contrastive token"}


class ConversionError(ValueError):
  """The checkpoint cannot be converted (unknown layout, missing or unexpected parameters)."""


# ---------------------------------------------------------------------------------------------
# The parameter correspondence: timm key -> (sit_jax path, torch -> jax, jax -> torch).
# ---------------------------------------------------------------------------------------------

_same = (lambda x: x, lambda x: x)
_linear = (lambda w: w.T, lambda k: k.T)                                  # (out, in) <-> (in, out)
_conv = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


def key_map(depth: int) -> dict[str, tuple[tuple[str, ...], tuple[Callable, Callable]]]:
  """Every parameter of a depth-`depth` ViT backbone, by its timm name."""
  out = {
      "cls_token": (("cls_token",), _same),
      "pos_embed": (("pos_embed",), _same),
      "patch_embed.proj.weight": (("patch_embed", "kernel"), _conv),
      "patch_embed.proj.bias": (("patch_embed", "bias"), _same),
      "norm.weight": (("norm", "scale"), _same),
      "norm.bias": (("norm", "bias"), _same),
  }
  for i in range(depth):
    for norm in ("norm1", "norm2"):
      out[f"blocks.{i}.{norm}.weight"] = ((f"blocks_{i}", norm, "scale"), _same)
      out[f"blocks.{i}.{norm}.bias"] = ((f"blocks_{i}", norm, "bias"), _same)
    for module, dense in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
      out[f"blocks.{i}.{module}.{dense}.weight"] = ((f"blocks_{i}", module, dense, "kernel"),
                                                    _linear)
      out[f"blocks.{i}.{module}.{dense}.bias"] = ((f"blocks_{i}", module, dense, "bias"), _same)
  return out


def _list(keys, limit: int = 20) -> str:
  keys = sorted(keys, key=_natural)
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------------------------------------
# Reading PyTorch checkpoints.
# ---------------------------------------------------------------------------------------------


def _is_tensor(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _to_numpy(x) -> np.ndarray:
  """Floating weights as float32 (sit_jax's parameters always are), from torch or numpy
  (.safetensors stored in float16 or bfloat16)."""
  if not isinstance(x, np.ndarray):
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()
  floating = np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"
  return x.astype(np.float32) if floating and x.dtype != np.float32 else x


def load_file(path: str, *, unsafe_pickle: bool = False) -> Any:
  """The object stored in a .pth/.pt (torch.load on the CPU) or .safetensors file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  if os.path.isdir(path):
    raise ConversionError(f"{path} is a directory, not a .pth/.pt/.safetensors file (a sit_jax "
                          "workdir or backbone export needs no conversion: --config.init takes "
                          "it as it is, and to-timm converts it for timm).")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file as load_numpy
      from safetensors import SafetensorError
    except ImportError as e:
      raise ConversionError("Reading .safetensors needs `pip install safetensors`.") from e
    try:
      try:
        return load_numpy(path)
      except (TypeError, ValueError):  # e.g. bfloat16, which numpy cannot hold.
        from safetensors.torch import load_file as load_torch
        return load_torch(path, device="cpu")
    except SafetensorError as e:
      raise ConversionError(f"{path} is not a readable .safetensors file ({e}); is it "
                            "truncated?") from e
  with open(path, "rb") as f:
    start = f.read(32)
  # torch.save writes a zip archive ('PK'), before torch 1.6 a pickle (protocol 2+: 0x80).
  if not start.startswith((b"PK", b"\x80")):
    found = f"it begins {start!r}" if start else "it is empty"
    raise ConversionError(f"{path} is not a PyTorch file ({found}): a failed or cut-off "
                          "download? Fetch it again.")
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"Reading {path} needs PyTorch (pip install torch), or convert "
                          "it to .safetensors first.") from e
  try:
    if unsafe_pickle:
      return torch.load(path, map_location="cpu", weights_only=False)
    # DINO/SiT/GMML checkpoints store their argparse Namespace beside the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError, by damage.
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if refused:
      raise ConversionError(
          f"{path} holds Python objects besides tensors ({refused.group(1)}), which "
          "torch.load(weights_only=True) refuses. If you trust the file, pass --unsafe_pickle."
      ) from e
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ConversionError(f"{path} is not a readable PyTorch file ({reason}); is it truncated "
                          "or corrupt? Fetch it again.") from e


def saved_settings(path: str) -> dict:
  """The settings to-timm kept in a .safetensors file ({} for other files)."""
  if not path.endswith(".safetensors"):
    return {}
  from safetensors import safe_open
  with safe_open(path, "numpy") as f:
    return json.loads((f.metadata() or {}).get(SETTINGS_METADATA, "{}"))


def find_state_dict(obj: Any, use: str = "teacher") -> tuple[dict[str, Any], str]:
  """(flat {name: tensor} dict, where it was found) inside a checkpoint object.

  `use` picks 'teacher' or 'student' in self-distillation checkpoints that hold both.
  """
  where = []
  for _ in range(8):
    if not isinstance(obj, Mapping):
      raise ConversionError(f"Expected a dict of tensors at {'/'.join(where) or 'the top'}, "
                            f"found {type(obj).__name__}.")
    tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
    if tensors and len(tensors) >= len(obj) / 2:
      return tensors, "/".join(where) or "top level"
    if "teacher" in obj or "student" in obj:
      if use not in obj:
        other = "student" if use == "teacher" else "teacher"
        raise ConversionError(f"The checkpoint has no {use!r} entry (keys: {_list(obj)}): pass "
                              f"--use={other} to convert the {other}.")
      key = use
    else:
      key = next((k for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
      if key is None:
        raise ConversionError(
            f"No state dict found at {'/'.join(where) or 'the top level'} of the checkpoint: its "
            f"keys are {_list(map(str, obj))}; expected tensors or one of "
            f"{('teacher', 'student') + WRAPPERS}.")
    where.append(key)
    obj = obj[key]
  raise ConversionError("The checkpoint is nested too deeply to find its state dict.")


def backbone_state(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Strips wrapper prefixes and drops heads: (backbone tensors by timm name, dropped keys)."""
  state = dict(state)
  dropped = []
  changed = True
  while changed:
    changed = False
    for prefix in STRIP_PREFIXES:
      if any(k.startswith(prefix) for k in state):
        # The backbone of a wrapper (SSL model = backbone + heads): the rest are heads.
        inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        dropped += [k for k in state if not k.startswith(prefix)]
        state, changed = inside, True
  heads = [k for k in state if k.startswith(HEAD_PREFIXES)]
  dropped += heads
  for k in heads:
    del state[k]
  extra = [k for k in EXTRA_TOKENS if k in state]
  if extra:
    raise ConversionError(
        f"The checkpoint has {', '.join(f'{k} ({EXTRA_TOKENS[k]})' for k in extra)}: tokens "
        "besides CLS, which sit_jax's backbone (CLS and the patches) has no place for; such a "
        "ViT cannot be converted.")
  if any(k.startswith("fc_norm.") for k in state):
    raise ConversionError(
        "The checkpoint has fc_norm.*: it is a global-average-pooling ViT whose final norm "
        "applies to the pooled patch tokens, not a CLS-token ViT with a final norm over all "
        "tokens as sit_jax's backbone; converting it would change its features.")
  return {k: _to_numpy(v) for k, v in state.items()}, dropped


def infer_model_config(state: Mapping[str, np.ndarray], num_heads: int | None = None) -> dict:
  """sit_jax's model config (variant, image_size) from the shapes of a timm-named state dict."""
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
    if key not in state:
      raise ConversionError(f"Missing {key!r}, needed to infer the architecture; the state "
                            f"dict has: {_list(state)}.")
  width = int(state["cls_token"].shape[-1])
  blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
  depth = max(blocks) + 1 if blocks else 0
  patch = int(state["patch_embed.proj.weight"].shape[-1])
  tokens = int(state["pos_embed"].shape[1]) - 1
  grid = int(round(np.sqrt(tokens)))
  if grid * grid != tokens:
    raise ConversionError(f"pos_embed has {tokens + 1} positions, not CLS + a square grid of "
                          "patches as sit_jax's backbone: one without a CLS position (timm's "
                          "no_embed_class) or for non-square images cannot be converted.")
  fc1 = state.get("blocks.0.mlp.fc1.weight")
  if fc1 is not None and fc1.shape[0] != 4 * width:
    raise ConversionError(f"MLP hidden size {fc1.shape[0]} is not 4 x width {width}; sit_jax "
                          "backbones use mlp_ratio 4.")
  matches = [name for name, (w, d, h) in vit.VARIANTS.items()
             if w == width and d == depth and (num_heads is None or h == num_heads)]
  if not matches:
    table = ", ".join(f"{n}: width {w}, depth {d}, {h} heads"
                      for n, (w, d, h) in vit.VARIANTS.items())
    heads = f", {num_heads} heads" if num_heads else ""
    raise ConversionError(f"No sit_jax variant has width {width}, depth {depth}{heads} "
                          f"(variants: {table}).")
  return {"variant": f"{matches[0]}/{patch}", "image_size": grid * patch, "dtype": "float32",
          "drop_path_rate": 0.0, "attention": "", "remat": False, "recons_blocks": []}


def torch_to_params(state: Mapping[str, Any], num_heads: int | None = None
                    ) -> tuple[dict, dict]:
  """(sit_jax backbone params, model config) from a timm-named backbone state dict."""
  state = {k: _to_numpy(v) for k, v in state.items()}
  config = infer_model_config(state, num_heads)
  mapping = key_map(vit.parse_variant(config["variant"])["depth"])
  missing, unknown = set(mapping) - set(state), set(state) - set(mapping)
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing ({len(missing)}): {_list(missing)}")
    if unknown:
      parts.append(f"unexpected ({len(unknown)}): {_list(unknown)}")
    raise ConversionError(f"The state dict does not match a {config['variant']} ViT "
                          f"backbone; " + "; ".join(parts) + ".")
  params: dict = {}
  for name, (path, (to_jax, _)) in mapping.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(to_jax(state[name]))
  check_shapes(params, config)
  return params, config


def check_shapes(params: Mapping, config: Mapping):
  """Raises unless `params` has exactly the leaves and shapes of the backbone `config` builds."""
  import jax
  import jax.numpy as jnp

  from sit_jax import sharding
  module = vit.backbone_from_config(config)
  size = config["image_size"]
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])
  want = {sharding.path_name(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  have = {sharding.path_name(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:10]
    raise ConversionError(f"Converted parameters do not fit a {config['variant']} backbone at "
                          f"{size}px: differing (leaf, shape) pairs {diff}.")


def params_to_timm(params: Mapping) -> dict[str, np.ndarray]:
  """A sit_jax backbone's params (the tree under 'backbone') as a timm state dict (numpy)."""
  depth = len([k for k in params if re.fullmatch(r"blocks_\d+", k)])
  out = {}
  missing = []
  for name, (path, (_, to_torch)) in key_map(depth).items():
    node = params
    try:
      for p in path:
        node = node[p]
    except (KeyError, TypeError):
      missing.append("/".join(path))
      continue
    out[name] = np.ascontiguousarray(to_torch(np.asarray(node)))
  if missing:
    raise ConversionError(f"The sit_jax params lack {_list(missing)}.")
  return out


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str, overwrite: bool):
  """Raises unless to-jax may write an export to `output_dir`: a new or empty directory, or with
  `overwrite` one that holds an export and nothing else."""
  from etils import epath
  from sit_jax import checkpoint
  d = epath.Path(output_dir)
  names = [p.name for p in d.iterdir()] if d.is_dir() else []
  others = [n for n in names if not checkpoint.is_export_entry(n)]
  if others:
    raise ConversionError(
        f"{output_dir} holds other files ({_list(others, 5)}): write the export to a new or empty "
        "directory (in a workdir it would stand in for the run's checkpoints wherever "
        "--config.init names the workdir).")
  if names and not overwrite:
    raise ConversionError(f"{output_dir} already holds a backbone export; pass --overwrite to "
                          "replace it.")


def to_jax(input_path: str, output_dir: str, *, num_heads: int | None = None,
           use: str = "teacher", overwrite: bool = False, unsafe_pickle: bool = False) -> dict:
  """Converts a PyTorch ViT checkpoint into a sit_jax backbone export; returns its model config."""
  from sit_jax import checkpoint
  check_output_dir(output_dir, overwrite)
  obj = load_file(input_path, unsafe_pickle=unsafe_pickle)
  state, where = find_state_dict(obj, use)
  state, dropped = backbone_state(state)
  if dropped:
    logging.warning("Dropped %d parameters that are not the backbone (heads): %s", len(dropped),
                    _list(dropped, 12))
  params, config = torch_to_params(state, num_heads)
  # The variant is the shapes'; standardize_input only a file of to-timm's can say.
  config.update({k: v for k, v in saved_settings(input_path).items() if k != "variant"})
  checkpoint.export_backbone(output_dir, {"backbone": params}, config, overwrite=overwrite,
                             origin={"converted_from": os.path.abspath(input_path)})
  print(f"Wrote the {config['variant']} backbone of {input_path} ({where}) at "
        f"{config['image_size']}px to {output_dir}; use it with --config.init={output_dir}\n"
        "sit_jax gives it images normalised by ImageNet's mean and std, as DINO, DeiT, MAE and "
        "SiT trained theirs; weights trained otherwise (timm's augreg ViTs: mean = std = 0.5) see "
        "other inputs than in training.")
  return config


def save_state_dict(state: Mapping[str, np.ndarray], path: str, settings: Mapping):
  """Writes `state`; a .safetensors file keeps `settings` (vit.PARAMETER_KEYS) in its metadata."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(dict(state), path, metadata={SETTINGS_METADATA: json.dumps(dict(settings))})
  elif path.endswith((".pth", ".pt", ".bin")):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f"Writing {path} needs PyTorch; write a .safetensors file "
                            "instead.") from e
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
  else:
    raise ConversionError(f"Unknown output format {path!r}: use .safetensors, .pth or .pt.")


# What a backbone with model.standardize_input does to its input (vit.standardize_per_image), for
# timm: x, (N, 3, H, W), normalised by ImageNet's mean and std as sit_jax normalises it.
TIMM_STANDARDIZE = ("x = (x - x.mean((2, 3), keepdim=True)) / "
                    "x.std((2, 3), keepdim=True, unbiased=False).clamp_min(0.01)")
# Transfer runs that evaluate config.init's backbone frozen, and hold none of their own (as does
# a multilabel run with multilabel.frozen); those that fine-tune it under a classifier are
# checkpoint.CLASSIFIER_EXPERIMENTS.
FROZEN_EXPERIMENTS = ("linear", "knn", "fewshot", "segment")
# timm's VisionTransformer arguments that pool the tokens as head.features does
# (heads.pool_features: after the final norm), and how the command names each pooling.
TIMM_POOLING = {"cls": "global_pool='token'", "mean": "global_pool='avg', fc_norm=False"}
POOLING_NAMES = {"cls": "the CLS token", "mean": "the mean patch token",
                 "cls+mean": "CLS and the mean patch token concatenated"}


def _workdir_json(workdir, name: str = "config.json") -> dict:
  """A run's config.json (or results.json) in `workdir`, {} where there is none."""
  from sit_jax import metrics
  text = metrics.read_text(os.path.join(workdir, name))
  return json.loads(text) if text else {}


def check_not_a_frozen_run(path: str):
  """Raises, naming the backbone it evaluated, if `path` is the workdir of a frozen-backbone
  transfer run."""
  run = _workdir_json(path)
  experiment = run.get("experiment")
  if not (experiment in FROZEN_EXPERIMENTS
          or experiment == "multilabel" and (run.get("multilabel") or {}).get("frozen")):
    return
  # The step the run read (results.json), not config.init's latest, which a pretraining moves.
  init = _workdir_json(path, "results.json").get("init_checkpoint") or run.get("init") or ""
  teacher = run.get("init_weights") == "teacher"
  backbone = (f"convert that one: --input={init}{' --use=teacher' if teacher else ''}" if init
              else "it was a random init (config.init=''), nothing trained to convert")
  raise ConversionError(
      f"{path} is the workdir of a {experiment} run, which evaluates the frozen backbone of its "
      "config.init and saves no backbone of its own (nor a head timm computes: to-timm writes "
      f"backbones and fine-tuned classifiers, configs/finetune.py); {backbone}.")


def classifier_head(path: str, width: int) -> tuple[str, dict[str, np.ndarray]] | None:
  """(head.features, timm's head.weight and head.bias) of the fine-tuning checkpoint that
  `path` (a workdir or step directory) names; None for a pretraining checkpoint or an export.
  The pooling is the one the step's metadata records, else its run's config.json."""
  from sit_jax import checkpoint
  step_dir = checkpoint.locate_backbone(path)
  read = checkpoint.read_classifier_head(step_dir)
  if read is None:
    return None
  head, saved = read
  run_dir = checkpoint.run_workdir(step_dir.parent)
  configured = (_workdir_json(run_dir).get("head") or {}).get("features")
  if saved and configured and saved != configured:
    raise ConversionError(
        f"The classifier of {step_dir} was trained on head.features={saved!r} (its metadata), "
        f"but the config.json in {run_dir} says {configured!r}: the step is another run's. "
        "Copy the step directory out of that workdir and convert the copy: its metadata says "
        "how it pools.")
  fc = head["fc"]
  kernel = np.asarray(fc["kernel"])
  if kernel.shape[0] == 2 * width:
    features = "cls+mean"
  else:  # CLS or the mean patch token: the same shapes, which the step's metadata tells apart
    features = saved or configured  # (a step saved before 2026-12-06: its run's config.json)
    if features not in TIMM_POOLING:
      found = f"says head.features={features!r}" if features else "is missing"
      raise ConversionError(
          f"Cannot tell whether the classifier of {step_dir} is on the CLS token or on the mean "
          f"patch token: its metadata does not say (it was saved before sit_jax recorded "
          f"head.features there), and the config.json of its run in {run_dir} {found}. Convert "
          "the checkpoint inside the run's workdir.")
  return features, {"head.weight": np.ascontiguousarray(kernel.T),
                    "head.bias": np.asarray(fc["bias"])}


def timm_code(config: Mapping, path: str, features: str | None, num_classes: int) -> list[str]:
  """PyTorch lines that load the to-timm file `path` and compute, from images x, what sit_jax
  computes: `logits` of a classifier on `features` (head.features), else the CLS `features`."""
  arch = vit.parse_variant(config["variant"])
  native = features in TIMM_POOLING
  args = (f"img_size={config['image_size']}, patch_size={arch['patch_size']}, "
          f"embed_dim={arch['width']}, depth={arch['depth']}, num_heads={arch['num_heads']}, "
          f"num_classes={num_classes if native else 0}"
          + (f", {TIMM_POOLING[features]}" if native else ""))
  lines = (["import safetensors.torch, timm, torch",
            f"state = safetensors.torch.load_file({path!r})"] if path.endswith(".safetensors")
           else ["import timm, torch", f"state = torch.load({path!r})"])
  lines.append(f"model = timm.models.vision_transformer.VisionTransformer({args}).eval()")
  if features == "cls+mean":
    lines += [f"head = torch.nn.Linear({2 * arch['width']}, {num_classes})",
              "head.load_state_dict({'weight': state.pop('head.weight'), "
              "'bias': state.pop('head.bias')})"]
  lines += ["model.load_state_dict(state, strict=True)",
            "# x: images (N, 3, H, W) normalised by ImageNet's mean and std, as sit_jax does"]
  if config.get("standardize_input"):
    lines.append(f"{TIMM_STANDARDIZE}  # model.standardize_input, which timm's model lacks")
  if features is None:
    lines.append("features = model(x)  # CLS after the final norm: sit_jax's head.features=cls")
  elif native:
    lines.append("logits = model(x)")
  else:
    lines += ["tokens = model.forward_features(x)",
              "logits = head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1))"]
  return lines


def to_timm(input_path: str, output_path: str, use: str = "student") -> dict:
  """Writes the backbone of a sit_jax export/checkpoint/workdir as a timm state dict (a
  checkpoint's student, or with use='teacher' its momentum teacher), with a fine-tuning
  checkpoint's classifier head."""
  from sit_jax import checkpoint
  if os.path.isfile(input_path):
    raise ConversionError(f"{input_path} is a file: to-timm reads a sit_jax workdir, checkpoint "
                          "step or backbone export (to-jax converts PyTorch weights to one).")
  check_not_a_frozen_run(input_path)
  # The head of the step the backbone came from: a run still saving moves a workdir's latest.
  loaded, config, location = checkpoint.read_backbone(input_path, use)
  if "backbone" not in loaded:
    raise ConversionError(f"{input_path} holds no 'backbone' parameters ({_list(loaded)}).")
  state = params_to_timm(loaded["backbone"])
  width = vit.parse_variant(config["variant"])["width"]
  head = classifier_head(location, width)
  features, num_classes, wrote = None, 0, f"the {config['variant']} backbone"
  if head:
    features, head_state = head
    state.update(head_state)
    num_classes = len(head_state["head.bias"])
    wrote += (f" and its fine-tuned classifier ({num_classes} classes) on "
              f"{POOLING_NAMES[features]}" + ("" if features in TIMM_POOLING else
                                              ", a pooling timm's VisionTransformer lacks"))
  save_state_dict(state, output_path, vit.parameter_settings(config))
  print(f"Wrote {len(state)} tensors to {output_path}: {wrote}. In PyTorch:\n"
        + "\n".join(f"  {line}" for line in timm_code(config, output_path, features,
                                                      num_classes)))
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sit_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to-jax", help="PyTorch ViT checkpoint -> sit_jax backbone export")
  a.add_argument("--input", required=True, help=".pth / .pt / .safetensors file")
  a.add_argument("--output", required=True, help="directory of the backbone export")
  a.add_argument("--num_heads", type=int, default=None,
                 help="attention heads (default: the standard table for the width)")
  a.add_argument("--use", choices=("teacher", "student"), default="teacher",
                 help="which network of a self-distillation checkpoint (default: teacher)")
  a.add_argument("--overwrite", action="store_true", help="replace an existing export")
  a.add_argument("--unsafe_pickle", action="store_true",
                 help="torch.load(weights_only=False): only for files you trust")
  b = sub.add_parser("to-timm",
                     help="sit_jax backbone or fine-tuned classifier -> timm state dict")
  b.add_argument("--input", required=True,
                 help="a backbone export, a checkpoint step directory, or a pretraining or "
                      "fine-tuning workdir")
  b.add_argument("--output", required=True, help=".safetensors, .pth or .pt file")
  b.add_argument("--use", choices=("student", "teacher"), default="student",
                 help="which network of a checkpoint (default: the student, as the transfer "
                      "configs' init_weights; an export holds the student only)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing file")
  args = parser.parse_args(argv)
  from sit_jax import checkpoint
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(std_logging.WARNING)  # orbax is chatty at INFO.
  try:
    if args.command == "to-jax":
      to_jax(args.input, args.output, num_heads=args.num_heads, use=args.use,
             overwrite=args.overwrite, unsafe_pickle=args.unsafe_pickle)
    else:
      if not args.overwrite and os.path.exists(args.output):
        raise ConversionError(f"{args.output} exists; pass --overwrite to replace it.")
      to_timm(args.input, args.output, use=args.use)
  except (ConversionError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f"sit_jax.convert: error: {e}", file=sys.stderr)
    return 1
  finally:  # main() called from Python leaves the caller's logging as it was.
    absl_logger.setLevel(level)
  return 0


if __name__ == "__main__":
  sys.exit(main())
