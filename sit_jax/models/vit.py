"""Plain pre-norm Vision Transformer (DeiT/DINO style) in Flax linen.

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators).
Parameter names follow timm (`patch_embed`, `cls_token`, `pos_embed`, `blocks_i/{norm1,attn,norm2,mlp}`,
`norm`) so that checkpoints map one to one.

Activations are named by logical axes only ('batch', 'length', 'embed', 'heads', 'kv', 'mlp'):
the config's logical_axis_rules map them to mesh axes (sit_jax/sharding.py).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sit_jax.models import variants
from sit_jax.models.variants import PATTERN as VARIANT_PATTERN, VARIANTS, check_image_size


# Settings that travel with a backbone's parameters to every user of them (a checkpoint brings
# them; the image size and the runtime settings are the user's).
PARAMETER_KEYS = ("variant", "standardize_input")
# Settings that change how the backbone computes, not its parameters.
RUNTIME_KEYS = ("drop_path_rate", "dtype", "attention", "remat", "qkv_per_head",
                "recompute_gelu", "reshard_after_forward")


def parameter_settings(model_config) -> dict:
  """The PARAMETER_KEYS entries of a model config (a checkpoint's or a config's)."""
  return {k: model_config[k] for k in PARAMETER_KEYS if k in model_config}


def architecture(model_config: dict) -> dict:
  """The model settings that define the parameters: what a checkpoint to resume must match.
  A run may resume with the runtime ones changed (e.g. remat after running out of memory)."""
  return {k: v for k, v in model_config.items() if k not in RUNTIME_KEYS}

Dtype = Any
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def parse_variant(variant: str) -> dict:
  """'S/16' -> dict(width=384, depth=12, num_heads=6, patch_size=16)."""
  match = VARIANT_PATTERN.fullmatch(variant)
  if not match:
    raise ValueError(f"Unknown ViT variant {variant!r}: expected one of "
                     f"{sorted(VARIANTS)} followed by '/<patch size>', e.g. 'S/16'.")
  width, depth, heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, num_heads=heads, patch_size=int(match.group(2)))


def variant_name(width: int, depth: int, num_heads: int, patch_size: int) -> str:
  for name, dims in VARIANTS.items():
    if dims == (width, depth, num_heads):
      return f"ViT-{name}/{patch_size}"
  return f"ViT (width {width}, depth {depth}, {num_heads} heads)"


TOKENS = ("batch", "length", "embed")  # the residual stream.


def check_tensor_parallel(name: str, dims: dict[str, tuple[int, str]]):
  """Raises if the mesh and logical axis rules in context (sharding.jit) split one of `dims`
  ({logical axis: (size, what)}) unevenly. Outside such a context there is nothing to check."""
  mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return
  splits = {}
  for logical in dims:
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    splits[logical] = {a: mesh.shape[a] for a in axes}
  message = variants.uneven_split(name, dims, splits)
  if message:
    raise ValueError(message)


def resize_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int],
                     num_prefix_tokens: int = 1) -> jax.Array:
  """Bicubically resizes a (1, prefix + h*w, D) position embedding to a new patch grid.

  As timm's resample_abs_pos_embed: Keys' cubic (a = -0.5), antialiased when shrinking.

  The prefix (CLS) embedding is kept as is. A square old grid is assumed, as in every ViT checkpoint.
  """
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old = int(round(np.sqrt(grid.shape[1])))
  if old * old != grid.shape[1]:
    raise ValueError(f"Position embedding with {grid.shape[1]} patch tokens is not a square grid.")
  if (old, old) == tuple(new_grid):
    return pos_embed
  dim = grid.shape[-1]
  grid = grid.reshape(1, old, old, dim).astype(jnp.float32)
  grid = jax.image.resize(grid, (1, *new_grid, dim), method="bicubic")
  grid = grid.reshape(1, new_grid[0] * new_grid[1], dim).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
  """Stochastic depth rising linearly from 0 at the first block to max_rate at the last."""
  return [max_rate * i / max(depth - 1, 1) for i in range(depth)]


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  `rate` may be traced (the per-layer rate of scanned blocks)."""
  rate: float | jax.Array

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or (isinstance(self.rate, float) and self.rate == 0.0):
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def kernel_read_again_in_backward(product):
  """`product(x, kernel)` (linear in each) whose backward pass reads `kernel` anew instead of
  reusing the forward pass's copy: PyTorch FSDP's reshard_after_forward. Under FSDP each use of
  a kernel all-gathers it; XLA merges the forward's gather with the backward's, so every layer's
  whole kernel stays live from its forward use to its backward one, all of them at once where the
  passes meet. An optimisation barrier on the saved kernel shard makes the backward's gather one
  of its own, which the scheduler places near its use (B/16, batch 1024, FSDP on cpu:8: 11057 ->
  10793 MiB of temporaries, below data parallelism's 11037; libtpu already re-gathers, so on
  v5e:4x4 nothing changes). The same values: only where XLA reads the kernel moves."""

  @jax.custom_vjp
  def apply(x, kernel):
    return product(x, kernel)

  def forward(x, kernel):
    return product(x, kernel), (x, kernel)

  def backward(saved, cotangent):
    x, kernel = saved
    return jax.vjp(product, x, jax.lax.optimization_barrier(kernel))[1](cotangent)

  apply.defvjp(forward, backward)
  return apply


def regathering_dot_general(x, kernel, dimension_numbers, precision=None,
                            preferred_element_type=None):
  """jax.lax.dot_general with kernel_read_again_in_backward, for nn.Dense(dot_general=...)."""
  return kernel_read_again_in_backward(functools.partial(
      jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
      preferred_element_type=preferred_element_type))(x, kernel)


def kernel_einsum(spec: str, reshard_after_forward: bool):
  """jnp.einsum(spec, x, kernel), with `reshard_after_forward` kernel_read_again_in_backward."""
  product = functools.partial(jnp.einsum, spec)
  return kernel_read_again_in_backward(product) if reshard_after_forward else product


def dense(features: int, name: str, dtype, reshard_after_forward: bool,
          use_bias: bool = True) -> nn.Dense:
  """The networks' nn.Dense: a truncated-normal kernel, with `reshard_after_forward` gathered
  again for the backward pass (kernel_read_again_in_backward)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=trunc_normal,
                  dot_general=regathering_dot_general if reshard_after_forward else None,
                  name=name)


class QkvProjection(nn.Module):
  """timm's fused qkv Linear (the same parameters as nn.Dense: `kernel` (width, 3 * width) and
  `bias`, in q|k|v, head, feature order) computed with the kernel viewed as (width, 3, heads,
  head_dim), so tensor parallelism splits it by heads. The flat kernel split over `model` hands
  each device a contiguous quarter of q|k|v, not its heads: GSPMD then gathered the (batch,
  tokens, 3, heads, head_dim) output whole on every device (443 MB per block for B/16 at 512 rows;
  B/16 model=4 + remat at batch 1024 on v5e:4x4: 14.47 -> 7.08 GiB per chip). Without tensor
  parallelism it costs a little (B/16 FSDP on v5e:4x4: 12.46 -> 12.78 GiB), hence opt-in
  (model.qkv_per_head, set by the `model=N` config argument)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  reshard_after_forward: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kernel = self.param("kernel", trunc_normal, (width, 3 * width))
    bias = self.param("bias", nn.initializers.zeros_init(), (3 * width,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    shape = (3, self.num_heads, width // self.num_heads)
    kernel = nn.with_logical_constraint(kernel.reshape(width, *shape),
                                        ("embed", None, "heads", "kv"))
    product = kernel_einsum("btd,dshk->btshk", self.reshard_after_forward)
    return product(x, kernel) + bias.reshape(shape)


class Attention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None  # None: XLA picks; 'cudnn': fused kernel on GPU.
  qkv_per_head: bool = False  # QkvProjection: for tensor parallelism.
  reshard_after_forward: bool = False

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"Width {width} is not divisible by {self.num_heads} heads.")
    head_dim = width // self.num_heads
    if self.qkv_per_head:
      qkv = QkvProjection(self.num_heads, self.dtype, self.reshard_after_forward, name="qkv")(x)
    else:
      qkv = dense(3 * width, "qkv", self.dtype, self.reshard_after_forward)(x)
      qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "kv"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(batch, tokens, width)
    return dense(width, "proj", self.dtype, self.reshard_after_forward)(out)


def exact_gelu(x):
  """timm's nn.GELU: the erf form."""
  return jax.nn.gelu(x, approximate=False)


recomputed_gelu = jax.checkpoint(exact_gelu)  # Keeps only x for the backward pass.


class Mlp(nn.Module):
  """fc1, GELU, fc2. `recompute_gelu` keeps only GELU's input for the backward pass and
  recomputes the rest there: differentiated as it is, GELU keeps three more tensors of fc1's
  output size. A CPU setting (the same gradients, rounded differently): runlocal on cpu:8,
  compiled as a CPU run compiles it, needs 10.7 instead of 13.9 MiB of temporaries (11.9 vs 12.4
  with the memory-minimising scheduler of aot.AOT_COMPILER_OPTIONS), and steps 4-15% faster
  depending on the CPU (README); compiled for a TPU it needed more (B/16, batch 1024, v5e:4x4:
  13.95 vs 13.72 GiB per chip)."""
  hidden: int
  dtype: Dtype = jnp.float32
  recompute_gelu: bool = False
  reshard_after_forward: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = dense(self.hidden, "fc1", self.dtype, self.reshard_after_forward)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = (recomputed_gelu if self.recompute_gelu else exact_gelu)(x)
    return dense(width, "fc2", self.dtype, self.reshard_after_forward)(x)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str | None = None
  qkv_per_head: bool = False
  recompute_gelu: bool = False
  reshard_after_forward: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    drop = DropPath(self.drop_path)
    x = nn.with_logical_constraint(x, TOKENS)
    y = Attention(self.num_heads, self.dtype, self.attention, self.qkv_per_head,
                  self.reshard_after_forward, name="attn")(norm("norm1")(x))
    x = nn.with_logical_constraint(x + drop(y, deterministic), TOKENS)
    y = Mlp(int(width * self.mlp_ratio), self.dtype, self.recompute_gelu,
            self.reshard_after_forward, name="mlp")(norm("norm2")(x))
    return nn.with_logical_constraint(x + drop(y, deterministic), TOKENS)


class _ScannedBlock(nn.Module):
  """One step of nn.scan over the blocks: carry (tokens, running recons_blocks average),
  per-layer inputs (drop-path rate, weight of this block's output in that average)."""
  num_heads: int
  mlp_ratio: float
  dtype: Dtype
  attention: str | None
  remat: bool
  qkv_per_head: bool
  recompute_gelu: bool
  reshard_after_forward: bool

  @nn.compact
  def __call__(self, carry, per_layer, deterministic: bool):
    x, recon_sum = carry
    rate, recon_weight = per_layer
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    x = block_cls(self.num_heads, self.mlp_ratio, rate, self.dtype, self.attention,
                  self.qkv_per_head, self.recompute_gelu, self.reshard_after_forward,
                  name="block")(x, deterministic)
    if recon_sum is not None:
      recon_sum = recon_sum + recon_weight.astype(x.dtype) * x
    return (x, recon_sum), None


def standardize_per_image(images, eps: float = 1e-2):
  """Each image's channels shifted and scaled to mean 0 and std 1 over its pixels (float32).

  Invariant to any per-image, per-channel affine change of the pixels (exposure, contrast, a
  colour cast), so the ImageNet normalisation applied before it makes no difference. `eps` floors
  the std (about one grey level in ImageNet units) so that a flat image becomes zeros."""
  mean, std = per_image_moments(images, eps)
  return (jnp.asarray(images, jnp.float32) - mean) / std


def per_image_moments(images, eps: float = 1e-2):
  """(mean, std) of each image's channels over its pixels, the std floored at `eps`: what
  standardize_per_image subtracts and divides by (x * std + mean undoes it)."""
  x = jnp.asarray(images, jnp.float32)
  mean = x.mean(axis=(-3, -2), keepdims=True)
  std = jnp.sqrt(jnp.square(x - mean).mean(axis=(-3, -2), keepdims=True))
  return mean, jnp.maximum(std, eps)


class VisionTransformer(nn.Module):
  """ViT backbone returning CLS and patch tokens after the final LayerNorm.

  `image_size` is the resolution the position embedding is created for; other input sizes
  (divisible by the patch) interpolate it bicubically on the fly.
  `recons_blocks` (1-based block numbers) additionally returns, normalised by the final LayerNorm,
  the average of those blocks' outputs (GMML reads its reconstruction from there).
  `scan_layers` runs the blocks as one nn.scan (one compiled block, parameters stacked under
  `blocks/block` with a leading layer axis) instead of `blocks_0..blocks_{depth-1}`: compile time
  and program size stop growing with depth. `stack_blocks`/`unstack_blocks` convert the layouts.
  `standardize_input` standardises each image first (`standardize_per_image`): part of what
  the parameters mean, so it is saved with them and every user of the backbone gets it.
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  image_size: int = 224
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  recons_blocks: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: bool = False
  scan_layers: bool = False
  qkv_per_head: bool = False
  recompute_gelu: bool = False
  reshard_after_forward: bool = False
  standardize_input: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    batch, height, width_px, _ = images.shape
    check_image_size(self.image_size, self.patch_size)
    for side in (height, width_px):
      check_image_size(side, self.patch_size)
    for b in self.recons_blocks:
      if not 1 <= b <= self.depth:
        raise ValueError(f"model.recons_blocks entry {b} is outside 1..{self.depth}, the blocks of "
                         f"this {self.depth}-deep ViT: set --config.model.recons_blocks within them.")
    check_tensor_parallel(
        variant_name(self.width, self.depth, self.num_heads, self.patch_size),
        variants.parallel_dims(self.width, self.num_heads, self.mlp_ratio))

    if self.standardize_input:
      images = standardize_per_image(images)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="patch_embed")(images.astype(self.dtype))
    grid = x.shape[1:3]
    x = nn.with_logical_constraint(x.reshape(batch, grid[0] * grid[1], self.width), TOKENS)

    cls = self.param("cls_token", trunc_normal, (1, 1, self.width))
    num_patches = (self.image_size // self.patch_size) ** 2
    pos = self.param("pos_embed", trunc_normal, (1, 1 + num_patches, self.width))
    pos = resize_pos_embed(pos, grid)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype), x], 1)
    x = x + pos.astype(self.dtype)

    rates = drop_path_rates(self.drop_path_rate, self.depth)
    if self.scan_layers:
      x, recon = self._scanned_blocks(x, rates, train)
    else:
      block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
      collected = []
      for i, rate in enumerate(rates):
        x = block_cls(self.num_heads, self.mlp_ratio, rate, self.dtype, self.attention,
                      self.qkv_per_head, self.recompute_gelu, self.reshard_after_forward,
                      name=f"blocks_{i}")(x, not train)
        if i + 1 in self.recons_blocks:
          collected.append(x)
      recon = sum(collected) / len(collected) if collected else None

    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
    out = norm(x)
    result = {"cls": out[:, 0], "patches": out[:, 1:], "grid": grid}
    result["recon_tokens"] = result["patches"] if recon is None else norm(recon)[:, 1:]
    return result

  def _scanned_blocks(self, x, rates, train):
    chosen = set(self.recons_blocks)
    weights = np.array([1.0 / len(chosen) if i + 1 in chosen else 0.0
                        for i in range(self.depth)], np.float32)
    scan = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True,
                   "dropout": True}, in_axes=(0, nn.broadcast), length=self.depth)
    blocks = scan(self.num_heads, self.mlp_ratio, self.dtype, self.attention, self.remat,
                  self.qkv_per_head, self.recompute_gelu, self.reshard_after_forward,
                  name=SCANNED_BLOCKS)
    recon_sum = nn.with_logical_constraint(jnp.zeros_like(x), TOKENS) if chosen else None
    # The rates are traced in the scan: without drop path, training must not draw (nor need) masks.
    deterministic = not train or self.drop_path_rate == 0
    (x, recon_sum), _ = blocks((x, recon_sum), (jnp.asarray(rates, jnp.float32),
                                                jnp.asarray(weights)), deterministic)
    return x, recon_sum


# ---------------------------------------------------------------------------------------------
# Scanned <-> per-block parameter layouts. Exports, conversion and transfer use `blocks_i`.
# ---------------------------------------------------------------------------------------------
SCANNED_BLOCKS = "blocks"


def is_scanned_layer(path_name: str) -> bool:
  """Whether a parameter (by its '/'-joined path) is stacked over layers by `scan_layers`."""
  return re.search(rf"(^|/){SCANNED_BLOCKS}/", path_name) is not None


def unstack_blocks(backbone_params: dict) -> dict:
  """{'blocks': {'block': stacked}} -> {'blocks_0': ..., 'blocks_{depth-1}': ...}; other
  entries (and an already unstacked tree) are returned as they are."""
  if SCANNED_BLOCKS not in backbone_params:
    return backbone_params
  out = {k: v for k, v in backbone_params.items() if k != SCANNED_BLOCKS}
  stacked = backbone_params[SCANNED_BLOCKS]["block"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out


def stack_blocks(backbone_params: dict) -> dict:
  """The inverse of unstack_blocks: blocks_0..blocks_{depth-1} -> {'blocks': {'block': ...}}."""
  names = sorted((k for k in backbone_params if re.fullmatch(r"blocks_\d+", k)),
                 key=lambda k: int(k.split("_")[1]))
  if not names:
    return backbone_params
  out = {k: v for k, v in backbone_params.items() if k not in names}
  out[SCANNED_BLOCKS] = {"block": jax.tree.map(lambda *layers: jnp.stack(layers),
                                               *(backbone_params[n] for n in names))}
  return out


def backbone_from_config(cfg) -> VisionTransformer:
  """Builds the backbone from a config dict (variant='S/16', image_size, drop_path_rate, ...)."""
  arch = parse_variant(cfg["variant"])
  check_image_size(cfg["image_size"], arch["patch_size"])
  attention = cfg.get("attention") or None
  if attention not in (None, "xla", "cudnn"):
    raise ValueError(f"model.attention must be '', 'xla' or 'cudnn', not {attention!r}.")
  dtype = cfg.get("dtype", "float32")
  if attention == "cudnn" and (jax.default_backend() != "gpu"
                               or dtype not in ("bfloat16", "float16")):
    raise ValueError(f"model.attention='cudnn' is cuDNN's fused attention: it needs a GPU and "
                     f"model.dtype bfloat16 or float16, not {jax.default_backend()} and {dtype}; "
                     "set --config.model.attention='' (XLA's) here.")
  if dtype == "float16" and jax.default_backend() == "cpu":
    raise ValueError("model.dtype='float16' does not run on cpu: XLA:CPU has no float16 matmul "
                     "accumulating in float32, which attention needs; set "
                     "--config.model.dtype=bfloat16 (or float32) here.")
  return VisionTransformer(
      **arch,
      image_size=cfg["image_size"],
      drop_path_rate=cfg.get("drop_path_rate", 0.0),
      recons_blocks=tuple(cfg.get("recons_blocks") or ()),
      dtype=jnp.dtype(dtype),
      attention=attention,
      remat=cfg.get("remat", False),
      scan_layers=cfg.get("scan_layers", False),
      qkv_per_head=cfg.get("qkv_per_head", False),
      recompute_gelu=cfg.get("recompute_gelu", False),
      reshard_after_forward=cfg.get("reshard_after_forward", False),
      standardize_input=cfg.get("standardize_input", False),
  )
