"""sit_jax: SiT / GMML self-supervised Vision Transformers in JAX/Flax.

A pretrained backbone's features of your own images, as the k-NN computes them:
`sit_jax.features.load(path, image_size=...)(images)`.
"""

__version__ = "0.1.0"
