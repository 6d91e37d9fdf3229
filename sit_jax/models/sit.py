"""The SiT network: ViT backbone + reconstruction head + projection head."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from sit_jax.models import heads, vit


class SiT(nn.Module):
  """Student and teacher share this module; the teacher only runs backbone + projection.

  `backbone_config` is a dict of ViT settings (see vit.backbone_from_config); the head settings
  are plain fields so the whole network is described by the `model` config.
  """
  backbone_config: dict
  recon_hidden: int | None = None
  recon_depth: int = 3
  proj_hidden: int = 4096
  proj_dim: int = 256
  use_recon: bool = True
  use_proj: bool = True

  def setup(self):
    self.backbone = vit.backbone_from_config(self.backbone_config)
    dtype, reshard = self.backbone.dtype, self.backbone.reshard_after_forward
    if self.use_recon:
      self.recon_head = heads.ReconstructionHead(
          self.backbone.patch_size, self.recon_hidden, self.recon_depth, dtype=dtype,
          reshard_after_forward=reshard)
    if self.use_proj:
      self.projection = heads.ProjectionHead(self.proj_hidden, self.proj_dim, dtype=dtype,
                                             reshard_after_forward=reshard)

  def __call__(self, images, *, train: bool, recon: bool = True, proj: bool = True):
    out = self.backbone(images, train=train)
    result = {"cls": out["cls"]}
    if self.use_recon and recon:
      result["recon"] = self.recon_head(out["recon_tokens"], out["grid"])
    if self.use_proj and proj:
      result["proj"] = self.projection(out["cls"]).astype(jnp.float32)
    return result


def sit_from_config(model_cfg, experiment: str) -> SiT:
  if experiment not in ("gmml", "contrastive", "sit"):
    raise ValueError(f"Unknown experiment {experiment!r}: use 'gmml' (reconstruction only), "
                     "'contrastive' or 'sit' (both).")
  backbone = {k: model_cfg[k] for k in
              (*vit.PARAMETER_KEYS, "image_size", "recons_blocks", "scan_layers",
               *vit.RUNTIME_KEYS)
              if k in model_cfg}
  return SiT(
      backbone_config=backbone,
      recon_hidden=model_cfg.get("recon_hidden") or None,
      recon_depth=model_cfg.get("recon_depth", 3),
      proj_hidden=model_cfg.get("proj_hidden", 4096),
      proj_dim=model_cfg.get("proj_dim", 256),
      use_recon=experiment in ("gmml", "sit"),
      use_proj=experiment in ("contrastive", "sit"),
  )
