"""The ViT variants by name. Free of jax, so that config_check reads them before jax loads."""
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
