"""Heads on top of the ViT: pixel reconstruction (GMML), projection (contrastive), classifier."""
from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from sit_jax.models.vit import dense, kernel_einsum, trunc_normal

Dtype = Any


class ReconstructionHead(nn.Module):
  """Per-token MLP then a transposed conv (kernel = stride = patch) back to pixels.

  SiT v3 uses `depth` = 3 layers of width D with GELU; no final activation.
  """
  patch_size: int
  hidden: int | None = None  # None: the backbone width.
  depth: int = 3
  channels: int = 3
  dtype: Dtype = jnp.float32
  reshard_after_forward: bool = False  # vit.kernel_read_again_in_backward

  @nn.compact
  def __call__(self, tokens, grid):
    x = tokens
    for i in range(self.depth):
      x = dense(self.hidden or tokens.shape[-1], f"mlp_{i}", self.dtype,
                self.reshard_after_forward)(x)
      x = nn.gelu(nn.with_logical_constraint(x, ("batch", "length", "mlp")), approximate=False)
    x = einops.rearrange(x, "b (h w) d -> b h w d", h=grid[0], w=grid[1])
    x = PatchToPixels(self.patch_size, self.channels, self.dtype, self.reshard_after_forward,
                      name="to_pixels")(x)
    return nn.with_logical_constraint(x.astype(jnp.float32), ("batch", None, None, None))


class PatchToPixels(nn.Module):
  """(B, h, w, D) tokens -> (B, h*p, w*p, C) pixels: each token becomes its own p x p patch.

  Exactly nn.ConvTranspose(C, (p, p), strides=(p, p), padding="VALID"), with the same parameter
  names, shapes and initialisation (so checkpoints are interchangeable), written as one einsum:
  XLA:CPU lowers that transposed convolution and its gradients several times slower than a
  matmul. lax.conv_transpose applies the kernel spatially flipped, hence [::-1, ::-1].
  """
  patch_size: int
  channels: int
  dtype: Dtype = jnp.float32
  reshard_after_forward: bool = False

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, x.shape[-1], self.channels), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.channels,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    b, h, w, _ = x.shape
    y = kernel_einsum("bhwd,pqdc->bhpwqc", self.reshard_after_forward)(x, kernel[::-1, ::-1])
    return y.reshape(b, h * p, w * p, self.channels) + bias


class ProjectionHead(nn.Module):
  """D -> 4096 -> BN -> ReLU -> 4096 -> BN -> GELU -> 256 -> BN (no affine).

  BatchNorm always uses the statistics of the current batch (SiT never evaluates this head).
  Under jit with a batch sharded over the mesh the mean and variance are taken over the whole
  global batch, which is what SyncBN does in the authors' code. The variance is E[(x - mean)^2]
  as torch computes it, not flax's default E[x^2] - mean^2: at init the CLS features have a large
  mean next to their spread, and the fast form then loses every significant digit in fp32.
  """
  hidden: int = 4096
  out_dim: int = 256
  dtype: Dtype = jnp.float32
  reshard_after_forward: bool = False  # vit.kernel_read_again_in_backward

  @nn.compact
  def __call__(self, x):
    bn = lambda name, affine=True: nn.BatchNorm(
        use_running_average=False, momentum=0.9, epsilon=1e-5, use_scale=affine,
        use_bias=affine, use_fast_variance=False, dtype=jnp.float32, name=name)
    # No bias before a BatchNorm: BN removes it (its gradient is exactly zero).
    linear = lambda n, name: dense(n, name, self.dtype, self.reshard_after_forward, use_bias=False)
    hidden = lambda x: nn.with_logical_constraint(x, ("batch", "mlp"))
    x = nn.relu(bn("bn_0")(hidden(linear(self.hidden, "fc_0")(x))))
    x = nn.gelu(bn("bn_1")(hidden(linear(self.hidden, "fc_1")(x))), approximate=False)
    out = bn("bn_2", affine=False)(linear(self.out_dim, "fc_2")(x))
    return nn.with_logical_constraint(out, ("batch", None))


class ClassifierHead(nn.Module):
  """Linear classifier on CLS or concat(CLS, mean patch token)."""
  num_classes: int
  features: str = "cls"  # 'cls' | 'cls+mean' | 'mean'
  zero_init: bool = True

  @nn.compact
  def __call__(self, backbone_out):
    feats = pool_features(backbone_out, self.features)
    init = nn.initializers.zeros if self.zero_init else trunc_normal
    logits = nn.Dense(self.num_classes, kernel_init=init, dtype=jnp.float32, name="fc")(
        feats.astype(jnp.float32))
    return nn.with_logical_constraint(logits, ("batch", None))


def pool_features(backbone_out, features: str):
  cls, patches = backbone_out["cls"], backbone_out["patches"]
  if features == "cls":
    return cls
  if features == "mean":
    return patches.mean(axis=1)
  if features == "cls+mean":
    return jnp.concatenate([cls, patches.mean(axis=1)], axis=-1)
  raise ValueError(f"Unknown features {features!r}: use 'cls', 'mean' or 'cls+mean'.")
