"""The ViT variants by name. Free of jax, so that config_check reads them before jax loads."""
import math
import re

# width, depth, heads of the standard variants.
VARIANTS = {
    "Mu": (96, 4, 3),  # a micro ViT for tests and `runlocal`, not from the paper.
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}
# 'S/16': a variant's name and its patch size.
PATTERN = re.compile(rf"({'|'.join(VARIANTS)})/([1-9]\d*)")


def parallel_dims(width: int, heads: int, mlp_ratio: float = 4.0) -> dict[str, tuple[int, str]]:
  """{logical axis: (size, what)} of the dimensions tensor parallelism may split."""
  return {"heads": (heads, "attention heads"), "mlp": (int(width * mlp_ratio), "MLP features"),
          "embed": (width, "features"), "kv": (width // heads, "features per head")}


def uneven_split(name: str, dims: dict[str, tuple[int, str]],
                 splits: dict[str, dict[str, int]]) -> str | None:
  """The line naming `name`, the split and the sizes that would work, for the first of `dims`
  that `splits` ({logical axis: {mesh axis: size}}) divides unevenly; None if all divide."""
  for logical, (size, what) in dims.items():
    axes = splits.get(logical, {})
    ways = math.prod(axes.values())
    if size % ways:
      valid = [d for d in range(1, size + 1) if size % d == 0]
      return (f"{name} has {size} {what}, which the mesh cannot split {ways} ways (logical axis "
              f"{logical!r} -> mesh {' x '.join(f'{a}={s}' for a, s in axes.items())}): use a "
              f"product of those mesh axes that divides {size} ({', '.join(map(str, valid))}), "
              f"or map {logical!r} to None in config.logical_axis_rules.")
  return None


def check_image_size(image_size: int, patch_size: int):
  if image_size <= 0 or image_size % patch_size:
    raise ValueError(
        f"Image size {image_size} is not divisible by the patch size {patch_size}: "
        f"choose an image size that is a multiple of {patch_size} "
        f"(e.g. {max(patch_size, image_size // patch_size * patch_size)}).")
