"""sit_jax: SiT / GMML self-supervised Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
