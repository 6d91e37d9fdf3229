"""Analytic FLOP count of a SiT step, a table of accelerator peaks, and MFU.

Convention (the usual one for MFU, e.g. PaLM / MaxText): only matrix multiplications and
convolutions are counted, at 2 FLOPs per multiply-accumulate. LayerNorm, softmax, GELU, the
residual adds, the losses, photometric augmentation, GMML corruption and the optimizer update are
left out; by XLA's own count they add about 2% to a ViT-S/16 step (below).

One SiT step per source image = two views, each view seen by
  - the student: backbone + reconstruction head + projection head, forward and backward
    (backward = 2 x forward: gradients with respect to activations and to weights), and
  - the teacher: backbone + projection head, forward only.
So per image: 2 x 3 x student_forward + 2 x teacher_forward.

ViT-S/16 at 224 gives 75.62 GFLOP per image and ViT-B/16 286.89 GFLOP (ViT-Ti/16: 20.96), the
figures of DESIGN.md ("Performance model": 75.6 and 287), which use the same convention. What
the convention leaves out, for ViT-S/16 at 224:
  - it counts the student's patch embedding backward at 2x its forward, although the gradient
    with respect to the (corrupted) images is never computed: an overcount of 0.3%;
  - the contrastive logits q.k^T and their gradient: 2048 x B FLOPs per image for a global
    batch B, 7e-6 of the step at B = 256;
  - LayerNorm, softmax, the exact (erf) GELU, bias adds, augmentation, GMML and AdamW, which
    XLA's cost analysis does count. XLA's `flops` for the whole jitted step (CPU, batch 8) is
    1.019x this count for ViT-S/16 (77.07 vs 75.62 GFLOP per image), 1.038x for ViT-Ti/16 and
    1.076x for the runlocal Mu/4 (elementwise work shrinks relative to matmuls as 1/width).
Rematerialisation (model.remat) recomputes the forward pass; this count, like MFU, ignores it.
"""
from __future__ import annotations

from typing import Any, Mapping

# Dense bf16 peak FLOP/s per chip (no 2:4 sparsity). Matched in order against
# jax.Device.device_kind, lower-cased; the first pattern found wins, so specific names come
# before general ones.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),       # SXM ("NVIDIA H100 80GB HBM3").
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("v6 lite", 918e12),    # TPU v6e (Trillium).
    ("v6e", 918e12),
    ("v5 lite", 197e12),    # TPU v5e.
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),     # v5p reports itself as "TPU v5".
    ("tpu v4", 275e12),
)


def peak_flops_for(device: Any = None, override: float | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one `device` (a jax.Device or a device-kind string).

  Returns `override` when given, None for unknown devices (e.g. CPUs), so that MFU is None
  rather than a made-up number.
  """
  if override:
    return float(override)
  if device is None:
    import jax
    device = jax.devices()[0]
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  kind = kind.lower()
  for pattern, peak in PEAK_FLOPS:
    if pattern in kind:
      return peak
  return None


def mfu(flops_per_step: float, step_seconds: float, peak: float | None,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all `num_devices` chips."""
  if peak is None or not peak or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (peak * num_devices)


# ---------------------------------------------------------------------------------------------
# Counting. Every function returns FLOPs (2 per MAC) for ONE image (one view).
# ---------------------------------------------------------------------------------------------


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> dict[str, int]:
  """Matmul FLOPs of one pre-norm transformer block on `tokens` tokens of `width`.

  Attention scores (Q K^T) and the weighted sum of values (A V) are T x T x D MACs each,
  whatever the number of heads.
  """
  hidden = int(width * mlp_ratio)
  return {
      "qkv": dense_flops(tokens, width, 3 * width),
      "attn_scores": 2 * tokens * tokens * width,
      "attn_values": 2 * tokens * tokens * width,
      "proj": dense_flops(tokens, width, width),
      "mlp": dense_flops(tokens, width, hidden) + dense_flops(tokens, hidden, width),
  }


def vit_forward_flops(width: int, depth: int, patch_size: int, image_size: int,
                      mlp_ratio: float = 4.0, channels: int = 3,
                      num_prefix_tokens: int = 1) -> dict[str, int]:
  """Forward FLOPs of the ViT backbone for one image, by part."""
  patches = (image_size // patch_size) ** 2
  tokens = patches + num_prefix_tokens
  block = block_flops(tokens, width, mlp_ratio)
  return {
      "patch_embed": dense_flops(patches, patch_size * patch_size * channels, width),
      "blocks": depth * sum(block.values()),
  }


def recon_head_flops(width: int, patch_size: int, image_size: int, hidden: int | None = None,
                     depth: int = 3, channels: int = 3) -> int:
  """`depth` Dense layers on every patch token, then the transposed conv (kernel = stride =
  patch), which is a Dense(hidden -> patch * patch * channels) per token."""
  patches = (image_size // patch_size) ** 2
  hidden = hidden or width
  flops, d_in = 0, width
  for _ in range(depth):
    flops += dense_flops(patches, d_in, hidden)
    d_in = hidden
  return flops + dense_flops(patches, d_in, patch_size * patch_size * channels)


def projection_head_flops(width: int, hidden: int = 4096, out_dim: int = 256) -> int:
  """D -> hidden -> hidden -> out_dim on the CLS token (BatchNorm not counted)."""
  return (dense_flops(1, width, hidden) + dense_flops(1, hidden, hidden)
          + dense_flops(1, hidden, out_dim))


def sit_flops_per_image(variant: str = "S/16", image_size: int = 224, *,
                        experiment: str = "sit", recon_hidden: int | None = None,
                        recon_depth: int = 3, proj_hidden: int = 4096, proj_dim: int = 256,
                        mlp_ratio: float = 4.0) -> dict[str, float]:
  """FLOPs of one pretraining step per source image (two views), by part.

  experiment: 'sit' (reconstruction + contrastive with an EMA teacher), 'gmml' (reconstruction
  only, no teacher, no projection head) or 'contrastive' (no reconstruction head).
  """
  from sit_jax.models import vit  # only for the variant table.
  arch = vit.parse_variant(variant)
  width, depth, patch = arch["width"], arch["depth"], arch["patch_size"]
  backbone = sum(vit_forward_flops(width, depth, patch, image_size, mlp_ratio).values())
  recon = proj = 0
  if experiment in ("sit", "gmml"):
    recon = recon_head_flops(width, patch, image_size, recon_hidden, recon_depth)
  if experiment in ("sit", "contrastive"):
    proj = projection_head_flops(width, proj_hidden, proj_dim)
  views = 2
  student = views * 3 * (backbone + recon + proj)
  teacher = views * (backbone + proj) if experiment in ("sit", "contrastive") else 0
  return {"backbone_forward": float(backbone), "recon_head_forward": float(recon),
          "projection_head_forward": float(proj), "student": float(student),
          "teacher": float(teacher), "total": float(student + teacher)}


def sit_step_flops(config) -> float:
  """Analytic FLOPs of one step of a pretraining `config` (its whole global batch)."""
  m = config.model
  per_image = sit_flops_per_image(
      m.variant, config.data.image_size, experiment=config.experiment,
      recon_hidden=m.get("recon_hidden") or None, recon_depth=m.get("recon_depth", 3),
      proj_hidden=m.get("proj_hidden", 4096), proj_dim=m.get("proj_dim", 256))
  return per_image["total"] * config.data.global_batch_size


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled jax function from XLA's cost analysis, None if XLA does not say.

  `cost_analysis()` returned a list with one dict per program in older jax versions and a
  dict in newer ones. Under SPMD the module is the per-device program: multiply by the
  number of devices for the whole step.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not isinstance(cost, Mapping):
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops >= 0 else None
